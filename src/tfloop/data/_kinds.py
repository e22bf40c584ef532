"""Which kind of input a value is: arrays tfloop batches, or something that batches itself."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf

__all__ = ["describe", "is_arrays", "is_batch_iterable", "is_batched_input"]


def is_arrays(data: Any) -> bool:
    """Whether :func:`~tfloop.data.adapt` reads ``data`` as in-memory arrays, which tfloop
    batches (``batch_size``), shuffles and can split (``validation_split``).

    Everything else batches itself: a ``tf.data.Dataset``, a ``keras.utils.PyDataset``, a
    generator or another iterable of batches, a list of batch tuples.

    Examples:
        >>> import numpy as np, tensorflow as tf
        >>> is_arrays((np.zeros((4, 2)), np.zeros(4)))
        True
        >>> is_arrays(tf.data.Dataset.range(3).batch(2)), is_arrays(iter([]))
        (False, False)
    """
    if data is None or isinstance(data, (tf.data.Dataset, keras.utils.PyDataset)):
        return False
    if callable(data) and not hasattr(data, "shape"):  # a dataset or generator function
        return False
    return not is_batch_iterable(data)


def is_batched_input(data: Any) -> bool:
    """Whether ``data`` yields its own batches (a dataset, a PyDataset, a generator...), as
    opposed to arrays that tfloop batches (``None`` is neither).

    Examples:
        >>> import tensorflow as tf
        >>> is_batched_input(tf.data.Dataset.range(3).batch(2)), is_batched_input([1, 2])
        (True, False)
    """
    return data is not None and not is_arrays(data)


def is_batch_iterable(data: Any) -> bool:
    """Whether ``data`` is read as a stream of batches: a generator or any other iterable that
    is not arrays (a tuple, a dict, an array or a tensor), or a list whose every element is a
    batch tuple ``(x,)``, ``(x, y)`` or ``(x, y, sample_weight)``."""
    if isinstance(data, list):
        return bool(data) and all(isinstance(batch, tuple) for batch in data)
    if isinstance(data, (tuple, dict, str, bytes, np.ndarray)) or tf.is_tensor(data):
        return False
    if hasattr(data, "__array__"):  # pandas and other array-likes
        return False
    return hasattr(data, "__iter__") or hasattr(data, "__next__")


def describe(data: Any) -> str:
    """What kind of input ``data`` is, for messages: ``"a tf.data.Dataset"``, ...

    Examples:
        >>> describe(iter([])), describe([(1, 2)])
        ('a generator (list_iterator)', 'an iterable of batches (list)')
    """
    if isinstance(data, tf.data.Dataset):
        return "a tf.data.Dataset"
    if isinstance(data, keras.utils.PyDataset):
        return "a keras.utils.PyDataset"
    if is_batch_iterable(data):
        one_shot = hasattr(data, "__next__")
        kind = "a generator" if one_shot else "an iterable of batches"
        return f"{kind} ({type(data).__name__})"
    return f"arrays ({type(data).__name__})"
