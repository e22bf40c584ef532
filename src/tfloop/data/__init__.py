"""Turns user input into *superbatches* for the compiled loop.

The compiled loop takes ``K`` batches per call, stacked along a new leading "step" axis, so one
iterator call feeds ``K`` steps. This module makes those superbatches from

* in-memory NumPy arrays or tensors (a tuple ``(x, y)`` / ``(x, y, sample_weight)``, dicts
  allowed inside): tfloop owns batching, a seeded per-epoch shuffle and prefetch;
* a batched ``tf.data.Dataset`` (``tfds.load(..., as_supervised=True).batch(n)`` included).

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

from tfloop import _validate
from tfloop.data._arrays import ArraySource, standardize_arrays
from tfloop.data._cache import TENSORS
from tfloop.data._datasets import DatasetSource
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
    "DataSource",
    "Piece",
    "Position",
    "StepStream",
    "adapt",
    "batch_size_of",
    "choose_steps_per_execution",
    "is_batched_input",
    "one_batch",
    "static_batch_size",
    "unpack_batch",
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
) -> DataSource:
    """Validates ``data`` and wraps it in a :class:`DataSource` (see the module docstring).

    ``steps`` is how many batches the caller will take (``None``: all of them); an infinite
    input without it is a DataError that says to pass ``steps_argument``. ``K`` is chosen from
    ``steps_per_execution`` (``"auto"`` or an int), the size of a batch and those steps.
    """
    if batch_size is not None:
        batch_size = _validate.count(batch_size, "batch_size", minimum=1)
    source: DataSource
    if isinstance(data, tf.data.Dataset):
        if batch_size is not None:
            raise ConfigError(
                f"batch_size={batch_size} was given with a tf.data.Dataset as {argument}; a "
                "dataset is batched by its own .batch(n). Drop batch_size, or pass arrays."
            )
        source = DatasetSource(data, 1, argument)
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
        raise DataError(
            f"{argument} is an infinite dataset (it repeats forever); pass {steps_argument}=... "
            "to say how many batches to use."
        )
    source.steps_per_execution = choose_steps_per_execution(
        steps_per_execution, source.bytes_per_batch, steps or source.steps_per_epoch
    )
    source.steps = steps
    return source


def is_batched_input(data: Any) -> bool:
    """Whether ``data`` yields its own batches (a dataset, a PyDataset, a generator...), as
    opposed to arrays that tfloop batches.

    Examples:
        >>> is_batched_input(tf.data.Dataset.range(3).batch(2)), is_batched_input([1, 2])
        (True, False)
    """
    import inspect

    import keras

    return (
        isinstance(data, (tf.data.Dataset, keras.utils.PyDataset))
        or inspect.isgenerator(data)
        or (callable(data) and not hasattr(data, "shape"))
    )


def static_batch_size(batch: Any) -> int | None:
    """The static size of ``batch``'s first dimension (None if unknown)."""
    first = tf.nest.flatten(batch)[0]
    shape = getattr(first, "shape", None)
    if shape is None or len(shape) == 0:
        return None
    return None if shape[0] is None else int(shape[0])


def one_batch(data: Any, **options: Any) -> DataSource:
    """One batch of arrays (``x``, ``(x, y)``, ``(x, y, sample_weight)``) as a source of one
    step, for ``train_on_batch`` and the like; ``options`` go to :func:`adapt`.

    Examples:
        >>> import numpy as np
        >>> source = one_batch((np.zeros((5, 2)), np.ones(5)))
        >>> data, start, stop = source.stream(0).next_chunk(1)
        >>> tuple(data[0].shape), (start, stop)
        ((1, 5, 2), (0, 1))
    """
    if is_batched_input(data):
        raise ConfigError(
            f"a {type(data).__name__} is not one batch; pass arrays (x, y, sample_weight)."
        )
    arrays = standardize_arrays(data, "x")
    size = static_batch_size(arrays)
    return adapt(arrays, batch_size=size, steps_per_execution=1, steps=1, shuffle=False, **options)
