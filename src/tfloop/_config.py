"""Turns the Trainer's constructor arguments into validated components.

Every check here runs on the host before anything is traced, and every error names the
argument and the fix (see docs/errors.md).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
from typing import Any, Literal

import keras
import tensorflow as tf

from tfloop import _distribute, _validate, _xla
from tfloop._update import NonFinitePolicy, validate_non_finite
from tfloop.accumulate import validate_steps
from tfloop.callbacks import Callback, KerasCallbacks, NonFiniteGuard
from tfloop.checkpoint import Checkpointer
from tfloop.errors import ConfigError
from tfloop.io import checks

Nested = Any

__all__ = [
    "TrainerOptions",
    "jit_choice",
    "options",
    "resolve_checkpoint",
    "resolve_non_finite",
    "validate_callbacks",
    "validate_jit_compile",
    "validate_steps_per_execution",
]

logger = logging.getLogger("tfloop")


@dataclasses.dataclass(frozen=True)
class TrainerOptions:
    """The Trainer's validated constructor arguments (besides the model and what
    ``Model.compile`` takes)."""

    strategy: tf.distribute.Strategy | None
    accumulate_steps: int
    drop_remainder: bool
    steps_per_execution: int | Literal["auto"]
    jit_compile: bool | Literal["auto"]
    run_eagerly: bool
    clip_global_norm: float | None
    callbacks: list[Callback]
    checkpoint: Checkpointer | None
    seed: int | None
    non_finite: NonFinitePolicy
    data_seed: int  # the array shuffle's seed: ``seed``, or a random one

    def attributes(self) -> dict[str, Any]:
        """The Trainer's public attributes among these."""
        hidden = ("non_finite", "data_seed")
        return {
            field.name: getattr(self, field.name)
            for field in dataclasses.fields(self)
            if field.name not in hidden
        }


def options(
    model: Any,
    *,
    accumulate_steps: Any,
    drop_remainder: Any,
    steps_per_execution: Any,
    jit_compile: Any,
    run_eagerly: Any,
    clip_global_norm: Any,
    non_finite: Any,
    callbacks: Any,
    checkpoint: Any,
    strategy: Any,
    seed: Any,
) -> TrainerOptions:
    """Checks every constructor argument; each error names the argument and the fix."""
    if not hasattr(model, "trainable_variables"):
        raise ConfigError(
            f"model must be a keras.Model or a tf.Module owning tf.Variables, got "
            f"{type(model).__name__}."
        )
    callbacks = validate_callbacks(callbacks)
    seed = None if seed is None else _validate.count(seed, "seed")
    return TrainerOptions(
        strategy=_distribute.validate(strategy),
        accumulate_steps=validate_steps(accumulate_steps, "accumulate_steps"),
        drop_remainder=_validate.boolean(drop_remainder, "drop_remainder"),
        steps_per_execution=validate_steps_per_execution(steps_per_execution),
        jit_compile=validate_jit_compile(jit_compile),
        run_eagerly=_validate.boolean(run_eagerly, "run_eagerly"),
        clip_global_norm=_validate.optional_number(clip_global_norm, "clip_global_norm"),
        callbacks=callbacks,
        checkpoint=resolve_checkpoint(checkpoint),
        seed=seed,
        non_finite=resolve_non_finite(non_finite, callbacks),
        data_seed=seed if seed is not None else random.SystemRandom().randrange(2**31),
    )


def resolve_checkpoint(checkpoint: Any) -> Checkpointer | None:
    if checkpoint is None or isinstance(checkpoint, Checkpointer):
        return checkpoint
    if isinstance(checkpoint, (str, os.PathLike)):
        return Checkpointer(checks.check_scheme(checkpoint, "checkpoint"))
    raise ConfigError(
        f"checkpoint must be a directory path, a tfloop.Checkpointer or None, got {checkpoint!r}."
    )


def validate_steps_per_execution(value: Any) -> int | Literal["auto"]:
    if value == "auto":
        return "auto"
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"steps_per_execution must be 'auto' or an int >= 1, got {value!r}.")
    return value


def validate_jit_compile(value: Any) -> bool | Literal["auto"]:
    if value == "auto" or isinstance(value, bool):
        return value  # type: ignore[no-any-return]
    raise ConfigError(f"jit_compile must be True, False or 'auto', got {value!r}.")


def jit_choice(
    jit_compile: bool | Literal["auto"],
    model: Any,
    strategy: tf.distribute.Strategy | None,
    model_step: bool = False,
) -> tuple[bool, bool]:
    """XLA on or off, and whether a failure to compile falls back without it.

    ``model_step``: the step is a Keras model's own (``_model_steps.py``); "auto" then takes
    the model's compiled ``jit_compile``, as ``model.fit`` does (XLA draws other random
    numbers than the plain graph, so a step with random ops would give other numbers).
    """
    if jit_compile == "auto" and model_step and strategy is None:
        return bool(getattr(model, "jit_compile", False)), False
    if _distribute.is_parameter_server(strategy):
        # XLA cannot reach variables on another task (the parameter servers).
        if jit_compile is True:
            raise ConfigError(
                "jit_compile=True is not supported under ParameterServerStrategy: XLA cannot "
                "compile a step whose variables live on the parameter servers. Pass "
                "jit_compile='auto' or False."
            )
        return False, False
    if strategy is not None:
        # Under a strategy XLA compiles each replica's step (the loop itself holds the
        # cross-replica calls). "auto" turns it on for GPUs and TPUs only: XLA on CPU cannot
        # reach the variables of a second (logical) CPU device.
        if jit_compile == "auto":
            return _distribute.uses_accelerators(strategy), False
        return bool(jit_compile), False
    if jit_compile == "auto":
        jit, reason = _xla.auto_jit_compile(model)
        _xla.log_choice(model, jit, reason)
        return jit, True
    return bool(jit_compile), False


def validate_callbacks(callbacks: Any) -> list[Callback]:
    """``callbacks`` as a list of tfloop callbacks; Keras callbacks are run through
    :class:`~tfloop.callbacks.KerasCallbacks` (each keeps its place in the order)."""
    if callbacks is None:
        return []
    if isinstance(callbacks, (Callback, keras.callbacks.Callback)):
        callbacks = [callbacks]
    result: list[Callback] = []
    for callback in callbacks:
        if isinstance(callback, keras.callbacks.Callback):
            callback = KerasCallbacks([callback])
        if not isinstance(callback, Callback):
            raise ConfigError(
                f"callbacks: {callback!r} is neither a tfloop.Callback nor a Keras callback; "
                "subclass tfloop.Callback."
            )
        result.append(callback)
    return result


def resolve_non_finite(policy: Any, callbacks: list[Callback]) -> NonFinitePolicy:
    """The non-finite policy: ``non_finite=``, or the one a ``NonFiniteGuard`` asks for.

    Decided once, at construction: the policy is part of what the train step traces.
    """
    chosen = validate_non_finite(policy)
    guards = [callback for callback in callbacks if isinstance(callback, NonFiniteGuard)]
    for guard in guards:
        if guard.graph_policy != guards[0].graph_policy:
            raise ConfigError(
                f"callbacks: {type(guards[0]).__name__} and {type(guard).__name__} ask for "
                "different non-finite policies; keep one of them."
            )
    if not guards:
        return chosen
    wanted = guards[0].graph_policy
    if chosen != "ignore" and chosen != wanted:
        raise ConfigError(
            f"non_finite={chosen!r} disagrees with the {type(guards[0]).__name__} in callbacks, "
            f"which asks for {wanted!r}; keep one of them."
        )
    return wanted
