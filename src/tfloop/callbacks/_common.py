"""Small helpers shared by the built-in callbacks: the learning rate, weight snapshots, checks."""

from __future__ import annotations

import math
from typing import Any

import keras
import numpy as np

__all__ = [
    "finite_or_none",
    "has_schedule",
    "learning_rate_of",
    "restore_weights",
    "snapshot_weights",
]


def learning_rate_of(optimizer: Any) -> float:
    """The optimizer's current learning rate; a schedule is evaluated at ``iterations``."""
    return float(np.asarray(keras.ops.convert_to_numpy(optimizer.learning_rate)))


def has_schedule(optimizer: Any) -> bool:
    """Whether the learning rate is a ``LearningRateSchedule`` (then it cannot be assigned)."""
    rate = getattr(optimizer, "_learning_rate", None)
    return isinstance(rate, keras.optimizers.schedules.LearningRateSchedule)


def _weights(model: Any) -> list[Any]:
    # Keras weights exclude seed-generator states, so restoring them leaves dropout's RNG alone.
    if isinstance(model, keras.layers.Layer):
        return list(model.weights)
    return list(model.variables)


def snapshot_weights(model: Any) -> list[np.ndarray]:
    """Host copies of the model's weights (a ``tf.Module``'s variables)."""
    return [np.array(variable.numpy()) for variable in _weights(model)]


def restore_weights(model: Any, values: list[np.ndarray]) -> None:
    """Assigns what :func:`snapshot_weights` returned."""
    for variable, value in zip(_weights(model), values, strict=True):
        variable.assign(value)


def finite_or_none(value: Any) -> float | None:
    """``float(value)``, or ``None`` for NaN/Inf (strict JSON has no NaN)."""
    number = float(value)
    return number if math.isfinite(number) else None
