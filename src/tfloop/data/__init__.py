"""Turns user input into *superbatches* for the compiled loop.

The compiled loop takes ``K`` batches per call, stacked along a new leading "step" axis, so one
iterator call feeds ``K`` steps. This module makes those superbatches from

* in-memory NumPy arrays or tensors (a tuple ``(x, y)`` / ``(x, y, sample_weight)``, dicts
  allowed inside): tfloop owns batching, a seeded per-epoch shuffle and prefetch;
* a batched ``tf.data.Dataset`` (``tfds.load(..., as_supervised=True).batch(n)`` included);
  under ``MultiWorkerMirroredStrategy`` each worker reads its shard (``_sharding.py``);
* a dataset function ``fn(tf.distribute.InputContext) -> tf.data.Dataset`` (``_functions.py``).

It also chooses ``K`` (``steps_per_execution="auto"``), and owns the *position* a checkpoint
saves and a resume starts from (:class:`Position`, :meth:`DataSource.resume`).

Every piece handed to the loop has exactly ``K`` step slots, of which the first ``steps`` are
real. The tail of an epoch (fewer than ``K`` batches left) is padded up to ``K`` so that it reuses
the compiled function of the full superbatch; only a batch with a different shape (the last,
partial batch) gets a trace of its own, cached across epochs.

Examples:
    >>> import numpy as np
    >>> from tfloop.data import adapt
    >>> source = adapt((np.zeros((100, 3)), np.zeros(100)), batch_size=32,
    ...                steps_per_execution=2, shuffle=False, seed=0)
    >>> source.steps_per_execution
    2
    >>> source.steps_per_epoch
    4
    >>> [(tuple(p.data[0].shape), p.steps) for p in source.epoch(0)]
    [((2, 32, 3), 2), ((2, 32, 3), 1), ((2, 4, 3), 1)]
    >>> stream = source.stream(0, start_step=3)  # resume at the fourth batch
    >>> stream.peek_batch()[0].shape
    TensorShape([4, 3])
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from tfloop import _distribute, _validate
from tfloop.data._arrays import ArraySource, standardize_arrays
from tfloop.data._cache import TENSORS
from tfloop.data._functions import CoordinatedSource, function_source
from tfloop.data._pipeline import uses_data_service
from tfloop.data._sharding import dataset_source
from tfloop.data._source import (
    DataSource,
    Piece,
    Position,
    StepStream,
    batch_size_of,
    choose_steps_per_execution,
    unpack_batch,
)
from tfloop.errors import ConfigError, DataError

__all__ = [
    "CoordinatedSource",
    "DataSource",
    "Piece",
    "Position",
    "StepStream",
    "adapt",
    "batch_size_of",
    "choose_steps_per_execution",
    "unpack_batch",
    "uses_data_service",
]

DEFAULT_BATCH_SIZE = 32


def adapt(
    data: Any,
    *,
    batch_size: int | None = None,
    steps_per_execution: int | str = "auto",
    steps: int | None = None,
    steps_argument: str = "steps",
    shuffle: bool = True,
    seed: int = 0,
    argument: str = "data",
    strategy: tf.distribute.Strategy | None = None,
) -> DataSource:
    """Validates ``data`` and wraps it in a :class:`DataSource` (see the module docstring).

    ``steps`` is how many batches the caller will take (``None``: all of them); an infinite
    input without it is a DataError that says to pass ``steps_argument``. ``K`` is chosen from
    ``steps_per_execution`` (``"auto"`` or an int), the size of a batch and those steps.
    ``strategy``: the strategy this input trains under, if each worker is to read its own
    shard (``fit``'s training data); ``None`` reads it whole.
    """
    if batch_size is not None:
        batch_size = _validate.count(batch_size, "batch_size", minimum=1)
    if _distribute.is_parameter_server(strategy) and not callable(data):
        raise ConfigError(
            f"under ParameterServerStrategy every worker builds its own input, so {argument} "
            "must be a dataset function, `def dataset_fn(context): return dataset`, not a "
            f"{type(data).__name__}."
        )
    source: DataSource
    if isinstance(data, tf.data.Dataset) or callable(data):
        if batch_size is not None:
            raise ConfigError(
                f"batch_size={batch_size} was given with a tf.data.Dataset (or a dataset "
                f"function) as {argument}; a dataset is batched by its own .batch(n). Drop "
                "batch_size, or pass arrays."
            )
        if isinstance(data, tf.data.Dataset):
            source = dataset_source(data, argument, strategy)
        else:
            source = function_source(data, argument, strategy)
    elif data is None:
        raise DataError(f"{argument} is None: pass (x, y) arrays or a batched tf.data.Dataset.")
    else:
        arrays = standardize_arrays(data, argument)
        source = ArraySource(
            arrays,
            batch_size or DEFAULT_BATCH_SIZE,
            1,
            shuffle,
            seed,
            argument,
            pipelines=TENSORS.pipelines_for(arrays),
        )
    if source.infinite and steps is None:
        what = "is an infinite dataset (it repeats forever)"
        if isinstance(source, CoordinatedSource):
            what = "is read by every worker of the ParameterServerStrategy cluster, repeated"
        raise DataError(
            f"{argument} {what}; pass {steps_argument}=... to say how many batches to use."
        )
    source.steps_per_execution = choose_steps_per_execution(
        steps_per_execution, source.bytes_per_batch, steps or source.steps_per_epoch
    )
    return source
