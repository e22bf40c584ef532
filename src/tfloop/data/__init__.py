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

import inspect
from collections.abc import Mapping
from typing import Any

import keras
import tensorflow as tf

from tfloop import _distribute, _validate
from tfloop.data._arrays import ArraySource, standardize_arrays
from tfloop.data._cache import TENSORS
from tfloop.data._functions import CoordinatedSource, function_source
from tfloop.data._host import IterableSource
from tfloop.data._kinds import describe, is_arrays, is_batch_iterable, is_batched_input
from tfloop.data._pipeline import uses_data_service
from tfloop.data._pydataset import PyDatasetSource
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
from tfloop.data._split import split_for_validation, with_sample_weight
from tfloop.data._weights import (
    check_class_weight,
    check_single_output,
    check_spec_for_class_weight,
    class_weight_map,
    class_weight_to_sample_weights,
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
    "class_weight_to_sample_weights",
    "is_arrays",
    "is_batched_input",
    "one_batch",
    "split_for_validation",
    "static_batch_size",
    "unpack_batch",
    "uses_data_service",
    "with_sample_weight",
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
    class_weight: Mapping[int, float] | None = None,
    passes: int = 1,
    strategy: tf.distribute.Strategy | None = None,
) -> DataSource:
    """Validates ``data`` and wraps it in a :class:`DataSource` (see the module docstring).

    Args:
        data: ``(x, y)`` / ``(x, y, sample_weight)`` arrays or tensors; a batched
            ``tf.data.Dataset``; a ``keras.utils.PyDataset``; a generator, or any other
            iterable of batches (a list of batch tuples, an object whose ``__iter__`` returns
            a new iterator). Batches are ``(x,)``, ``(x, y)`` or ``(x, y, sample_weight)``.
        batch_size: examples per batch, for arrays only (default 32); anything else batches
            itself, and passing it is a ConfigError.
        steps_per_execution: ``K``, ``"auto"`` or an int.
        steps: how many batches the caller takes per pass (``None``: all of them). An infinite
            input without it is a DataError that says to pass ``steps_argument``. A
            PyDataset pass reads no more than ``steps`` batches; every pass restarts from the
            input's beginning (the first ``steps`` batches each time, as ``validation_steps``).
        steps_argument: the caller's name for ``steps``, for error messages.
        shuffle: reshuffle arrays (examples) and PyDatasets (batch order) every epoch, by
            ``(seed, epoch)``. Datasets and generators keep their own order.
        seed: the shuffle's seed.
        argument: the caller's name for ``data``, for error messages.
        class_weight: ``{class index: weight}``, turned into per-example sample weights as
            Keras does (:func:`class_weight_to_sample_weights`; a class not in the dict weighs
            1.0). Needs ``(x, y)`` batches with a single ``y``; not with sample weights.
        passes: how many times the caller reads ``data`` from its beginning (``fit``: its
            epochs when ``steps_per_epoch`` is None, else 1, as one stream then runs across
            epochs; validation: how many times it validates). A generator can be read only
            once: more passes are a DataError before anything runs.
        strategy: the strategy this input trains under, if each worker is to read its own
            shard (``fit``'s training data); ``None`` reads it whole. A dataset function
            ``fn(tf.distribute.InputContext)`` is called with each worker's context.

    Examples:
        >>> import numpy as np
        >>> batches = [(np.ones((4, 2)), np.array([0, 1, 1, 2])) for _ in range(3)]
        >>> source = adapt(batches, class_weight={1: 2.0})
        >>> source.steps_per_epoch, source.resumes_by_count
        (3, True)
        >>> source.stream(0).peek_batch()[2].numpy()
        array([1., 2., 2., 1.], dtype=float32)
    """
    if batch_size is not None:
        batch_size = _validate.count(batch_size, "batch_size", minimum=1)
    passes = _validate.count(passes, "passes", minimum=1)
    weights = None if class_weight is None else check_class_weight(class_weight)
    if data is None:
        raise DataError(f"{argument} is None: pass (x, y) arrays or a batched tf.data.Dataset.")
    if inspect.isgeneratorfunction(data):
        raise DataError(
            f"{argument} is a generator function; call it and pass the generator it returns "
            f"({argument}=my_batches(), not {argument}=my_batches)."
        )
    if batch_size is not None and not is_arrays(data):
        raise ConfigError(
            f"batch_size={batch_size} was given with {describe(data)} as {argument}, "
            "which makes its own batches (a dataset by its .batch(n)). Drop batch_size, or "
            "pass arrays."
        )
    if _distribute.is_parameter_server(strategy) and not callable(data):
        raise ConfigError(
            f"under ParameterServerStrategy every worker builds its own input, so {argument} "
            "must be a dataset function, `def dataset_fn(context): return dataset`, not a "
            f"{type(data).__name__}."
        )
    source: DataSource
    if isinstance(data, tf.data.Dataset):
        if weights is not None:
            check_spec_for_class_weight(data.element_spec, argument)
            data = data.map(class_weight_map(weights))
        source = dataset_source(data, argument, strategy)
    elif callable(data) and not isinstance(data, keras.utils.PyDataset) and not is_arrays(data):
        if weights is not None:
            raise ConfigError(
                f"class_weight was given with a dataset function as {argument}; put the "
                "weights in the batches the function's dataset yields (x, y, sample_weight)."
            )
        source = function_source(data, argument, strategy)
    elif isinstance(data, keras.utils.PyDataset):
        source = PyDatasetSource(
            data,
            shuffle=shuffle,
            seed=seed,
            steps=steps,
            argument=argument,
            class_weight=weights,
        )
    elif is_batch_iterable(data):
        source = IterableSource(data, argument, weights)
        if source.one_shot and passes > 1:
            raise DataError(
                f"{argument} is a generator (an iterator), which can be read only once, but "
                f"it would be read {passes} times. Pass steps_per_epoch=... so that one "
                "stream runs across the epochs, or a re-iterable input: a list of batches, an "
                "object whose __iter__ returns a new iterator, or a keras.utils.PyDataset."
            )
    else:
        arrays = standardize_arrays(data, argument)
        if weights is not None:
            arrays = _with_class_weights(arrays, weights, argument)
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
    source.steps = steps
    return source


def _with_class_weights(arrays: Any, class_weight: dict[int, float], argument: str) -> Any:
    """``(x, y)`` arrays with the sample weights ``class_weight`` gives (once, on the host)."""
    x, y, sample_weight = unpack_batch(arrays if isinstance(arrays, tuple) else (arrays,))
    if sample_weight is not None:
        raise ConfigError(
            f"class_weight and sample_weight were both given for {argument}; use one or the "
            "other (or fold the class weights into the sample weights)."
        )
    check_single_output(y, argument)
    weights = class_weight_to_sample_weights(y, class_weight)
    return (x, y, tf.constant(weights))


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
