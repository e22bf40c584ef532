"""``validation_split`` and ``sample_weight`` for in-memory arrays, as in ``Model.fit``."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import tensorflow as tf

from tfloop.data._arrays import check_lengths
from tfloop.data._kinds import describe, is_arrays
from tfloop.errors import ConfigError, DataError

__all__ = ["split_for_validation", "with_sample_weight"]

Nested = Any


def _parts(data: Any, argument: str) -> tuple[Any, ...]:
    """``data`` as an arrays tuple ``(x, ...)``, or a DataError naming what it is instead."""
    if not is_arrays(data):
        raise DataError(
            f"{argument} is {describe(data)}; validation_split and sample_weight work "
            "on in-memory arrays only (tfloop slices them). Pass validation_data=... (a "
            "dataset, PyDataset or generator of its own), or put the weights in each batch "
            "as (x, y, sample_weight)."
        )
    if isinstance(data, list):
        data = tuple(data)
    if not isinstance(data, tuple):
        data = (data,)
    while data and data[-1] is None:
        data = data[:-1]
    if not data:
        raise DataError(f"{argument} is empty: pass (x, y) arrays.")
    return tuple(data)


def split_for_validation(data: Any, validation_split: float) -> tuple[Any, Any]:
    """Splits arrays into a training part and a validation part as ``Model.fit`` does.

    ``data`` is ``(x, y)`` or ``(x, y, sample_weight)`` (any leaf a NumPy array or a tensor,
    nested dicts and tuples allowed). The validation part is the **last** examples, taken
    before any shuffling; the split point is Keras's
    ``int(math.floor(n * (1.0 - validation_split)))``, float rounding included (10 examples
    and 0.8 give 1 training example and 9 for validation). Sample weights are split with the
    rest; ``class_weight`` is for the training part only (pass it to ``adapt`` for that part).

    Raises:
        ConfigError: ``validation_split`` is not a number strictly between 0 and 1.
        DataError: ``data`` is not arrays, or one of the parts would be empty.

    Examples:
        >>> import numpy as np
        >>> train, validation = split_for_validation((np.arange(10), np.arange(10)), 0.25)
        >>> train[0].tolist(), validation[1].tolist()  # floor(10 * 0.75) = 7 for training
        ([0, 1, 2, 3, 4, 5, 6], [7, 8, 9])
    """
    if (
        not isinstance(validation_split, (int, float, np.integer, np.floating))
        or isinstance(validation_split, (bool, np.bool_))
        or not 0 < validation_split < 1
    ):
        raise ConfigError(
            f"validation_split must be a float strictly between 0 and 1, got {validation_split!r}."
        )
    parts = _parts(data, "data")
    arrays = tf.nest.map_structure(_sliceable, parts)
    check_lengths(arrays, "data")
    n = int(tf.nest.flatten(arrays)[0].shape[0])
    # Keras's float expression (array_slicing.train_validation_split), rounding included.
    split_at = math.floor(n * (1.0 - validation_split))
    if split_at in (0, n):
        side = "training" if split_at == 0 else "validation"
        raise DataError(
            f"validation_split={validation_split} of {n} examples leaves the {side} part "
            "empty; pass more data or another validation_split."
        )
    train = tf.nest.map_structure(lambda a: a[:split_at], arrays)
    validation = tf.nest.map_structure(lambda a: a[split_at:], arrays)
    return train, validation


def _sliceable(leaf: Any) -> Any:
    if tf.is_tensor(leaf) or isinstance(leaf, np.ndarray):
        return leaf
    return np.asarray(leaf)


def with_sample_weight(data: Any, sample_weight: Any) -> Any:
    """``(x, y)`` arrays with ``sample_weight`` attached: ``(x, y, sample_weight)``.

    ``sample_weight`` has one weight per example, ``(N,)`` (or ``(N, T)`` per timestep), or a
    structure like ``y`` with one array per output. It weights the loss and
    ``weighted_metrics``. ``None`` returns ``data`` unchanged.

    Raises:
        ConfigError: ``data`` has no targets, or already carries sample weights.
        DataError: ``data`` is not arrays (a dataset carries its weights in each batch), or
            the lengths differ.

    Examples:
        >>> import numpy as np
        >>> x, y, w = with_sample_weight((np.zeros((3, 2)), np.ones(3)), np.array([1, 2, 3]))
        >>> w.tolist()
        [1, 2, 3]
    """
    if sample_weight is None:
        return data
    parts = _parts(data, "data")
    if len(parts) < 2:
        raise ConfigError(
            "sample_weight was given without targets y; sample weights weight the loss of "
            "each example against its target, so pass (x, y) with it."
        )
    if len(parts) == 3:
        raise ConfigError(
            "sample_weight was given twice: as an argument and as the third element of "
            "(x, y, sample_weight); pass it once."
        )
    weighted = (*parts, sample_weight)
    check_lengths(tf.nest.map_structure(_sliceable, weighted), "sample_weight")
    return weighted
