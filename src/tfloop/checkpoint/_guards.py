"""What a checkpoint must not be: non-finite weights, or a restore into something else.

A run whose loss went NaN without a non-finite policy would otherwise save NaN weights at
every later save, and ``max_to_keep`` would rotate out the last finite checkpoints: nothing
good would be left to resume from. And a checkpoint of an Adam trainer restored into an SGD
trainer would restore the weights and drop the optimizer's state without a word.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import tensorflow as tf

from tfloop.errors import CheckpointError

__all__ = ["FiniteWeights", "check_kinds", "kinds"]


class FiniteWeights:
    """Whether every floating-point trainable variable of a model is finite (one traced
    reduction, read at each save)."""

    def __init__(self, model: Any) -> None:
        variables = [
            v for v in getattr(model, "trainable_variables", []) if tf.as_dtype(v.dtype).is_floating
        ]
        self._check: Any = None
        if variables:

            def all_finite() -> tf.Tensor:
                return tf.reduce_all([tf.reduce_all(tf.math.is_finite(v)) for v in variables])

            self._check = tf.function(all_finite, autograph=False)

    def __call__(self) -> bool:
        return self._check is None or bool(self._check())


def kinds(objects: Mapping[str, Any]) -> dict[str, str]:
    """The class of each saved object (lists of variables aside), recorded in the metadata."""
    return {
        name: type(obj).__name__
        for name, obj in objects.items()
        if not isinstance(obj, (list, tuple))
    }


def check_kinds(path: str, saved: Mapping[str, str] | None, current: Mapping[str, str]) -> None:
    """A CheckpointError when the checkpoint at ``path`` holds another kind of optimizer (or
    model) than the run restoring it."""
    for name, kind in (saved or {}).items():
        if name in current and current[name] != kind:
            raise CheckpointError(
                f"checkpoint {path!r} holds a {kind} as its {name}, this run has a "
                f"{current[name]}: restoring would keep the weights and silently drop the "
                f"{name}'s state. Resume with the same {name}, use another checkpoint "
                "directory, or pass Checkpointer(restore=None) to start fresh."
            )
