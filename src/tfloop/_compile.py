"""The loss and the metrics of a Keras model: Keras's own ``compile`` machinery, reused.

A ``keras.Model`` is trained with what ``Model.compile`` gives it: the Trainer takes the
compiled model's configuration, overlays its own explicit arguments, compiles the model with
the result (when anything is to change) and then calls ``Model.compute_loss`` (the loss
structure matched to the outputs, ``loss_weights``, regularizers and ``add_loss`` terms) and
``Model.compute_metrics`` (per-output metrics, ``weighted_metrics``), as ``model.fit`` does.
The logs are those of ``model.fit``: ``loss``, ``<output>_loss``, ``<output>_<metric>``.

On top, the Trainer keeps what makes it exact: its own ``loss`` tracker weighted by the
examples of each step, each replica's mean loss multiplied back by the number of replicas
(Keras divides by it; tfloop weights each replica's share by its example count instead), and
the accumulation weight (the example count, which is exact for Keras's default
``sum_over_batch_size`` reduction, with or without sample weights).

A ``tf.Module`` has no ``compile``: ``_plain_loss.py`` keeps its loss and metrics.

Examples:
    >>> import keras, numpy as np
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    >>> optimizer, compiled = compile_model(model, loss="mse", metrics=["mae"])
    >>> model.compiled, type(optimizer).__name__
    (True, 'Adam')
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

import keras
import tensorflow as tf

from tfloop._plain_loss import PlainLossAndMetrics, validate_metric_specs
from tfloop.errors import ConfigError

__all__ = ["KerasLossAndMetrics", "LossAndMetrics", "compile_model", "resolve_optimizer"]

Nested = Any
LossAndMetrics = Any  # KerasLossAndMetrics | PlainLossAndMetrics: the same interface

logger = logging.getLogger("tfloop")

_COMPILE_ARGUMENTS = ("loss", "loss_weights", "metrics", "weighted_metrics")


def resolve_optimizer(optimizer: Any) -> keras.optimizers.Optimizer:
    if isinstance(optimizer, keras.optimizers.Optimizer):
        return optimizer
    if isinstance(optimizer, str):
        try:
            return keras.optimizers.get(optimizer)
        except ValueError as error:
            raise ConfigError(
                f"optimizer={optimizer!r} is not a Keras optimizer name; use e.g. 'adam', "
                "'sgd', 'rmsprop', 'adamw', or pass a keras.optimizers.Optimizer."
            ) from error
    raise ConfigError(
        f"optimizer must be a name or a keras.optimizers.Optimizer, got {type(optimizer).__name__}."
    )


def compile_model(
    model: Any,
    optimizer: Any = None,
    loss: Any = None,
    metrics: Any = None,
    loss_weights: Any = None,
    weighted_metrics: Any = None,
) -> tuple[keras.optimizers.Optimizer, LossAndMetrics]:
    """The optimizer and the loss-and-metrics a Trainer of ``model`` uses.

    A ``keras.Model`` compiled by the user keeps its configuration, and the arguments given
    here (not None) replace those parts of it; the model is compiled again with the result
    when anything changes, or compiled for the first time when it was not and a loss or a
    metric is given. The optimizer is the one given, else the compiled model's, else Adam.
    Call it inside the strategy's scope: ``compile`` creates the optimizer's state there.
    """
    given = {
        "loss": loss,
        "loss_weights": loss_weights,
        "metrics": metrics,
        "weighted_metrics": weighted_metrics,
    }
    _check_names(loss, metrics, weighted_metrics)
    if not isinstance(model, keras.Model):
        if (
            loss_weights is not None
            or weighted_metrics is not None
            or isinstance(loss, (dict, list, tuple))
        ):
            raise ConfigError(
                f"loss_weights, weighted_metrics and a loss per output need a keras.Model; the "
                f"model is a {type(model).__name__}. Pass one loss, or override compute_loss."
            )
        chosen = resolve_optimizer(optimizer if optimizer is not None else "adam")
        return chosen, PlainLossAndMetrics(loss, metrics or ())
    compiled = bool(getattr(model, "compiled", False))
    base = dict(model._compile_config.config) if compiled else {}
    config = {name: base.get(name) for name in _COMPILE_ARGUMENTS}
    config.update({name: value for name, value in given.items() if value is not None})
    if optimizer is not None:
        chosen = resolve_optimizer(optimizer)
    elif compiled and isinstance(getattr(model, "optimizer", None), keras.optimizers.Optimizer):
        chosen = model.optimizer
    else:
        chosen = resolve_optimizer("adam")
    changes = any(value is not None for value in given.values()) or optimizer is not None
    if (compiled and changes) or (not compiled and any(v is not None for v in config.values())):
        try:
            model.compile(optimizer=chosen, **config)
        except (ValueError, TypeError) as error:
            raise ConfigError(
                f"the model cannot be compiled with these arguments: {error}"
            ) from error
        chosen = model.optimizer  # under mixed_float16, Keras wraps it in a LossScaleOptimizer
    return chosen, KerasLossAndMetrics(model)


class KerasLossAndMetrics:
    """The loss and metrics of a (compiled, or not) Keras model, through Keras's own calls."""

    def __init__(self, model: keras.Model) -> None:
        self.model = model
        self.loss_tracker = keras.metrics.Mean(name="loss")

    @property
    def loss(self) -> Any:
        """The compiled loss, a callable ``(y_true, y_pred, sample_weight=None)`` that matches
        the loss structure to the outputs (Keras's ``CompileLoss``); None without one."""
        if not self.model.compiled:
            return None
        return getattr(self.model, "_compile_loss", None)

    @property
    def specs(self) -> bool:
        """Whether there are compiled metrics to build on the first batch."""
        if not self.model.compiled:
            return False
        config = self.model._compile_config.config
        return bool(config.get("metrics") or config.get("weighted_metrics"))

    @property
    def compiled_metrics(self) -> list[Any]:
        """The model's metrics besides Keras's own loss tracker (tfloop keeps its own)."""
        own = getattr(self.model, "_loss_tracker", None)
        return [metric for metric in self.model.metrics if metric is not own]

    @property
    def metrics(self) -> list[Any]:
        """tfloop's loss tracker, then the model's other metrics; a metric whose name is taken
        already is left out (once named in a warning): its result would shadow the first's."""
        metrics, names = [], set()
        for metric in [self.loss_tracker, *self.compiled_metrics]:
            if metric.name in names:
                _warn_shadowed(metric)
                continue
            names.add(metric.name)
            metrics.append(metric)
        return metrics

    def build(self, y: Nested, y_pred: Nested) -> None:
        """Nothing: Keras builds its compiled loss and metrics at their first call."""

    def loss_value(
        self,
        x: Nested,
        y: Nested,
        y_pred: Nested,
        sample_weight: Nested,
        training: bool,
        *,
        replicas: int = 1,
        extra: Any = None,
    ) -> tf.Tensor:
        """``model.compute_loss`` (regularizers included: ``extra`` is not added), times
        ``replicas``.

        Keras weights each ``<output>_loss`` tracker by the *static* batch size, which
        ``model.fit`` never knows (its batches have a dynamic batch dimension), so there every
        batch counts once; tfloop's steps have static shapes, and the outputs' batch dimension
        is hidden from that count to log what ``model.fit`` logs.
        """
        if not self.model.compiled:
            raise ConfigError(
                "loss is None: pass Trainer(loss=...), compile the model with a loss, or "
                "override compute_loss in a subclass."
            )
        loss = self.model.compute_loss(
            x=x,
            y=y,
            y_pred=_hide_batch_dimension(y_pred),
            sample_weight=sample_weight,
            training=training,
        )
        if replicas > 1:
            loss = loss * tf.cast(replicas, loss.dtype)
        return loss

    def update(self, x: Nested, y: Nested, y_pred: Nested, sample_weight: Nested = None) -> None:
        """``model.compute_metrics``: the compiled metrics and weighted metrics."""
        if self.model.compiled:
            self.model.compute_metrics(x, y, y_pred, sample_weight)


_SHADOWED: weakref.WeakSet[Any] = weakref.WeakSet()


def _warn_shadowed(metric: Any) -> None:
    if metric not in _SHADOWED:
        _SHADOWED.add(metric)
        logger.warning(
            "tfloop: the model's metric %r (%s) is left out of the Trainer's metrics and "
            "logs: an earlier metric has that name (tfloop's 'loss' tracker, or a compiled "
            "metric). Give it another name to log it.",
            metric.name,
            type(metric).__name__,
        )


def _hide_batch_dimension(y_pred: Nested) -> Nested:
    # One output has no per-output loss tracker: nothing to hide (and static shapes are kept).
    if tf.executing_eagerly() or len(tf.nest.flatten(y_pred)) < 2:
        return y_pred

    def hide(t: Any) -> Any:
        if not tf.is_tensor(t) or t.shape.rank in (None, 0):
            return t
        return tf.compat.v1.placeholder_with_default(t, [None, *t.shape[1:]])

    return tf.nest.map_structure(hide, y_pred)


def _check_names(loss: Any, metrics: Any, weighted_metrics: Any) -> None:
    """Names Keras does not know are a ConfigError now, not an error at the first batch."""
    for leaf in tf.nest.flatten(loss) if loss is not None else []:
        if isinstance(leaf, str):
            try:
                keras.losses.get(leaf)
            except ValueError as error:
                raise ConfigError(
                    f"loss={leaf!r} is not a Keras loss name; use e.g. 'mse', "
                    "'categorical_crossentropy', 'sparse_categorical_crossentropy', or a "
                    "callable."
                ) from error
        elif leaf is not None and not callable(leaf):
            raise ConfigError(f"loss must be a name, a keras Loss or a callable, got {leaf!r}.")
    for argument, value in (("metrics", metrics), ("weighted_metrics", weighted_metrics)):
        if value is not None:
            leaves = [v for v in tf.nest.flatten(value) if v is not None]
            validate_metric_specs(leaves, argument)
