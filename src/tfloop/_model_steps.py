"""A Keras model's own steps, run as ``model.fit`` runs them.

keras-io's "Customizing what happens in fit()" teaches users to override ``train_step``,
``test_step`` or ``predict_step`` on a ``keras.Model`` subclass, and to list their own metric
trackers in its ``metrics`` property (and ``compute_metrics`` to change what is logged). A model
that overrides any of these *owns its steps*: ``Trainer(model)`` then runs the model's
``train_step`` / ``test_step`` / ``predict_step`` (Keras's own for those it does not override)
inside the fused K-step loop, with the model's optimizer(s) and compiled state, exactly as
``make_train_function`` calls them:

- the model's ``metrics`` are the Trainer's: reset at each epoch's start and before an
  evaluation, and reported as Keras reports them (:func:`keras_logs`): the metrics' results
  when the step returns the same keys, else what the last step returned, flattened as
  ``pythonify_logs`` flattens it (a ``CompileMetrics`` result, a dict, adds its entries);
- an update is one call of the model's ``train_step`` (a GAN's step may apply two optimizers,
  and the model's own ``optimizer`` may never be used), counted by :class:`ModelSteps`;
- what only tfloop's own step can do (``accumulate_steps``, ``clip_global_norm``,
  ``non_finite``) is a ConfigError that says so: the model applies its optimizer itself.

A ``Trainer`` subclass that overrides a step keeps it: the subclass wins over the model.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import keras
import tensorflow as tf

from tfloop import _distribute
from tfloop._logs import STEP, floats, without
from tfloop.errors import ConfigError

__all__ = [
    "OWNABLE",
    "ModelSteps",
    "check_has_call",
    "for_model",
    "keras_logs",
    "model_overrides",
]

Nested = Any

OWNABLE = ("train_step", "test_step", "predict_step", "metrics", "compute_metrics")
"""What a ``keras.Model`` subclass may override to own its steps (as keras-io teaches)."""


def model_overrides(model: Any) -> frozenset[str]:
    """The members of :data:`OWNABLE` that ``model``'s class overrides (none for a model that
    is not a ``keras.Model``).

    Examples:
        >>> import keras
        >>> class Custom(keras.Model):
        ...     def train_step(self, data):
        ...         return {}
        >>> sorted(model_overrides(Custom()))
        ['train_step']
        >>> model_overrides(keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]))
        frozenset()
    """
    if not isinstance(model, keras.Model):
        return frozenset()
    return frozenset(
        name
        for name in OWNABLE
        if inspect.getattr_static(type(model), name, None)
        is not inspect.getattr_static(keras.Model, name)
    )


def defines_call(model: Any) -> bool:
    """Whether a Keras model can be called on inputs (a subclass may define no ``call()``:
    keras-io's VAE runs its encoder and decoder in ``train_step`` only)."""
    if not isinstance(model, keras.Model):
        return True
    return inspect.getattr_static(type(model), "call") is not inspect.getattr_static(
        keras.Model, "call"
    )


def check_has_call(model: Any, what: str) -> None:
    """A ConfigError naming the cause when ``what`` needs ``model(x)`` and the model defines
    no ``call()``."""
    if defines_call(model):
        return
    name = type(model).__name__
    raise ConfigError(
        f"model: {name} defines no call(), and {what} calls the model on x (so does "
        "model.fit's, in Keras). Define call() on the model, or override the step that needs "
        "it (train_step / test_step / predict_step) on the model or in a Trainer subclass."
    )


def check_trainer_options(
    model: Any, *, accumulate_steps: int, clip_global_norm: float | None, non_finite: str
) -> None:
    """A ConfigError for the options a model-owned ``train_step`` cannot honour: it applies the
    model's optimizer(s) itself, so tfloop cannot accumulate, clip or drop its updates."""
    name = type(model).__name__
    fixes = {
        "accumulate_steps": (
            accumulate_steps != 1,
            "compile the model with an optimizer given gradient_accumulation_steps=..., or "
            "move the step into a Trainer subclass that calls self.apply_gradients",
        ),
        "clip_global_norm": (
            clip_global_norm is not None,
            "give the model's optimizer global_clipnorm=...",
        ),
        "non_finite": (
            non_finite != "ignore",
            "check the loss in the model's train_step, or move the step into a Trainer "
            "subclass that calls self.apply_gradients",
        ),
    }
    for argument, (given, fix) in fixes.items():
        if given:
            raise ConfigError(
                f"{argument} cannot act on {name}'s own train_step, which applies the model's "
                f"optimizer itself (tfloop runs it as model.fit does). To get it, {fix}."
            )


def for_model(model: Any, options: Any, *, runs_train_step: bool) -> ModelSteps | None:
    """The :class:`ModelSteps` of ``model`` if it owns its steps (None otherwise), after
    checking ``options`` (the Trainer's) against the model's ``train_step`` if it is run."""
    if not model_overrides(model):
        return None
    if runs_train_step:
        check_trainer_options(
            model,
            accumulate_steps=options.accumulate_steps,
            clip_global_norm=options.clip_global_norm,
            non_finite=options.non_finite,
        )
    return ModelSteps(model, options.strategy)


class ModelSteps:
    """The steps, metrics and update count of a Keras model that owns its steps.

    ``train_step`` runs the model's and counts it: that count is the run's update count (the
    ``step`` of the logs, of ``max_steps`` and ``every_n_steps``), checkpointed with the rest.
    Under a strategy each replica counts its own call (the counters agree).
    """

    def __init__(self, model: keras.Model, strategy: tf.distribute.Strategy | None) -> None:
        self.model = model
        with _distribute.scope(strategy):
            on_read: dict[str, Any] = {}
            if _distribute.is_replicated(strategy):
                on_read = {
                    "synchronization": _distribute.ON_READ,
                    "aggregation": tf.VariableAggregation.ONLY_FIRST_REPLICA,
                }
            self.steps_run = tf.Variable(
                tf.constant(0, tf.int64), trainable=False, name="model_train_steps", **on_read
            )

    @property
    def metrics(self) -> list[Any]:
        """The model's ``metrics`` (its override, or Keras's: the loss tracker, the compiled
        metrics, its own trackers)."""
        return list(self.model.metrics)

    def build(self, batch: Nested) -> None:
        """What ``model.fit`` builds before its first step (``_maybe_symbolic_build``): under a
        strategy, the model, its compiled metrics and loss and its optimizer, symbolically
        (replicas cannot create variables inside the compiled loop); nothing otherwise."""
        build = getattr(self.model, "_maybe_symbolic_build", None)
        if build is not None:
            build(data_batch=batch)

    def train_step(self, batch: Nested) -> dict[str, Any] | None:
        logs: dict[str, Any] | None = self.model.train_step(batch)
        self.steps_run.assign_add(1)
        return logs

    def test_step(self, batch: Nested) -> dict[str, Any] | None:
        logs: dict[str, Any] | None = self.model.test_step(batch)
        return logs

    def predict_step(self, batch: Nested) -> Any:
        return self.model.predict_step(batch)

    def update_count(self) -> tf.Tensor:
        return tf.identity(self.steps_run)


def keras_logs(results: Mapping[str, Any], step_logs: Mapping[str, Any] | None) -> dict[str, float]:
    """An execution's logs as ``model.fit`` makes them (``_get_metrics_result_or_logs``): the
    metrics' ``results`` when the last step returned the same keys, else the step's values;
    both flattened (``pythonify_logs``). The loop's counters (``step``, ...) are kept.

    Examples:
        >>> keras_logs({"loss": 0.5, "mae": 0.25, "step": 3}, {"loss": 0.4, "mae": 0.2})
        {'loss': 0.5, 'mae': 0.25, 'step': 3.0}
        >>> keras_logs({"total_loss": 0.5, "step": 3}, {"loss": 0.4, "kl": {"kl_loss": 0.1}})
        {'kl_loss': 0.1, 'loss': 0.4, 'step': 3.0}
    """
    counters = {name: results[name] for name in results if name == STEP or name.startswith("_")}
    measured = floats(without(results, counters))
    returned = floats(step_logs or {})
    chosen = measured if step_logs is None or set(returned) == set(measured) else returned
    return {**chosen, **floats(counters)}
