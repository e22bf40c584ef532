"""``class_weight``: per-class weights turned into per-example sample weights, as Keras does.

Keras's rule (``class_weight_to_sample_weights``, the NumPy path its arrays, PyDatasets and
``train_on_batch`` use): labels whose last axis is not 1 are one-hot (the class is the
``argmax``), a last axis of 1 is squeezed, then the label is rounded (half to even) to an int;
the weight is ``class_weight.get(class, 1.0)`` in ``keras.config.floatx()``. tfloop applies the
same rule to every input: arrays once on the host, PyDatasets and generators per batch on the
host, ``tf.data`` datasets with a map that gives a class missing from the dict the weight 1.0 as
well (Keras's own ``tf.data`` map fails on a label above the largest key).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tfloop.data._source import unpack_batch
from tfloop.errors import ConfigError, DataError

__all__ = [
    "check_class_weight",
    "check_single_output",
    "check_spec_for_class_weight",
    "class_weight_map",
    "class_weight_to_sample_weights",
]

Nested = Any


def check_class_weight(class_weight: Any) -> dict[int, float]:
    """``class_weight`` as a dict of int class -> float weight, or a ConfigError."""
    if not isinstance(class_weight, Mapping):
        raise ConfigError(
            f"class_weight must be a dict mapping class indices to weights, e.g. "
            f"{{0: 1.0, 1: 5.0}}; got {type(class_weight).__name__}."
        )
    checked = {}
    for key, value in class_weight.items():
        if not isinstance(key, (int, np.integer)) or isinstance(key, (bool, np.bool_)):
            raise ConfigError(
                f"class_weight keys must be int class indices; got {key!r}. Map each class "
                "index (the label, or the position of the 1 in a one-hot label) to a weight."
            )
        if not isinstance(value, (int, float, np.integer, np.floating)) or isinstance(
            value, (bool, np.bool_)
        ):
            raise ConfigError(f"class_weight[{key!r}] must be a number; got {value!r}.")
        checked[int(key)] = float(value)
    return checked


def check_single_output(y: Nested, argument: str) -> None:
    """A DataError if ``y`` (targets or their spec) has several outputs, as class_weight needs
    one label per example."""
    if y is None:
        raise DataError(
            f"class_weight was given but {argument} has no targets; class_weight turns each "
            "example's label into its weight, so pass (x, y)."
        )
    if tf.nest.is_nested(y):
        raise DataError(
            f"class_weight is only supported for a single output, but the targets of "
            f"{argument} are a {type(y).__name__} of {len(tf.nest.flatten(y))}; pass one "
            "sample_weight array per output instead (a structure like y)."
        )


def class_weight_to_sample_weights(y: Any, class_weight: Mapping[int, float]) -> np.ndarray:
    """The sample weight of each example of ``y`` under ``class_weight``, as Keras computes it.

    ``y`` holds one label per example: class indices ``(N,)`` or ``(N, 1)`` (floats are rounded,
    half to even: 0.5 is class 0) or one-hot / probability rows ``(N, C)`` (the class is the
    ``argmax``). A class missing from ``class_weight`` gets the weight 1.0. The result has shape
    ``(N,)`` and dtype ``keras.config.floatx()``. Per-timestep labels ``(N, T, 1)`` are a
    DataError: pass ``sample_weight`` for those.

    Examples:
        >>> import numpy as np
        >>> class_weight_to_sample_weights(np.array([0, 1, 2, 1]), {0: 0.5, 2: 3.0})
        array([0.5, 1. , 3. , 1. ], dtype=float32)
        >>> class_weight_to_sample_weights(np.eye(3)[[2, 0]], {2: 4})
        array([4., 1.], dtype=float32)
    """
    class_weight = check_class_weight(class_weight)
    check_single_output(y, "y")
    labels = np.asarray(y)
    classes = _classes(labels)
    unique, inverse = np.unique(classes, return_inverse=True)
    table = np.array([class_weight.get(int(c), 1.0) for c in unique], keras.config.floatx())
    weights: np.ndarray = table[inverse.reshape(-1)]
    return weights


def _classes(labels: np.ndarray) -> np.ndarray:
    if labels.ndim > 1:
        labels = np.argmax(labels, axis=-1) if labels.shape[-1] != 1 else labels[..., 0]
    if labels.ndim != 1:
        raise DataError(
            f"class_weight needs one label per example: y of shape (N,), (N, 1) or one-hot "
            f"(N, classes); got y of shape {labels.shape}. For per-timestep weights pass "
            "sample_weight instead."
        )
    return np.round(labels).astype("int32")


def class_weight_map(class_weight: Mapping[int, float]) -> Any:
    """A ``tf.data`` map function ``(x, y) -> (x, y, sample_weight)`` with the same weights as
    :func:`class_weight_to_sample_weights` (a class missing from the dict gets 1.0).

    Examples:
        >>> import tensorflow as tf
        >>> add = class_weight_map({0: 0.5, 2: 3.0})
        >>> ds = tf.data.Dataset.from_tensor_slices(([1.0, 2.0, 3.0], [0, 7, 2])).batch(3)
        >>> next(iter(ds.map(add)))[2].numpy()
        array([0.5, 1. , 3. ], dtype=float32)
    """
    class_weight = check_class_weight(class_weight)
    # A class missing from the dict gets 1.0: the sorted keys are searched, with a last entry
    # past every class (its weight 1.0) where a class that is not a key is sent.
    keys = sorted(class_weight)
    sorted_keys = tf.constant(keys, tf.int64)
    values = tf.constant([class_weight[k] for k in keys] + [1.0], keras.config.floatx())

    @tf.autograph.experimental.do_not_convert  # type: ignore[untyped-decorator]
    def add_weights(*batch: Any) -> Any:
        x, y, _ = unpack_batch(batch)
        if not keys:
            return x, y, tf.ones(tf.shape(y)[:1], values.dtype)
        classes = tf.cast(_tensor_classes(y), tf.int64)
        position = tf.searchsorted(sorted_keys, classes)
        found = tf.gather(sorted_keys, tf.minimum(position, len(keys) - 1)) == classes
        weights = tf.gather(values, tf.where(found, position, len(keys)))
        return x, y, weights

    return add_weights


def _tensor_classes(y: tf.Tensor) -> tf.Tensor:
    rank = y.shape.rank
    if rank is not None and rank >= 2:
        last = y.shape[-1]
        if last is None:
            y = tf.cond(
                tf.shape(y)[-1] != 1,
                lambda: tf.cast(tf.argmax(y, axis=-1), y.dtype),
                lambda: tf.squeeze(y, axis=-1),
            )
        else:
            y = tf.argmax(y, axis=-1) if last != 1 else tf.squeeze(y, axis=-1)
    if y.dtype.is_floating:
        y = tf.round(y)  # half to even, as NumPy's round
    return tf.cast(y, tf.int32)


def check_spec_for_class_weight(spec: Nested, argument: str) -> None:
    """A ConfigError/DataError unless batches shaped like ``spec`` can take class weights:
    ``(x, y)`` with a single ``y`` of one label per example."""
    _, y, sample_weight = unpack_batch(spec)
    if sample_weight is not None:
        raise ConfigError(
            f"class_weight was given but {argument} already yields sample weights (x, y, "
            "sample_weight); use one or the other: drop class_weight, or fold the class "
            "weights into the sample weights."
        )
    check_single_output(y, argument)
    if y.shape.rank is not None and y.shape.rank > 2:
        raise DataError(
            f"class_weight needs one label per example: y of shape (N,), (N, 1) or one-hot "
            f"(N, classes); {argument} yields y of shape {y.shape}. For per-timestep weights "
            "pass sample_weight instead."
        )
