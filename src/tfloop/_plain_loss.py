"""The loss and metrics of a model that is not a ``keras.Model`` (a ``tf.Module``).

A Keras model gets Keras's own machinery (``_compile.py``); a plain ``tf.Module`` has no
``compile``, so its loss (a name, a Keras loss or ``fn(y_true, y_pred)``) and metrics are kept
here, with the same interface.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from tfloop._autograph import user_code
from tfloop.errors import ConfigError

__all__ = ["LossFunction", "PlainLossAndMetrics", "resolve_loss", "validate_metric_specs"]

Nested = Any


class PlainLossAndMetrics:
    """The loss function, the ``loss`` tracker and the metrics of a ``tf.Module``'s Trainer.

    Metrics given by name are resolved at the first batch (``"accuracy"`` needs the label and
    output shapes), in :meth:`build`.
    """

    def __init__(self, loss: Any, metrics: Any) -> None:
        self.loss = resolve_loss(loss)
        self.specs = validate_metric_specs(metrics)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.compiled_metrics: list[keras.metrics.Metric] = []
        self.built = False

    @property
    def metrics(self) -> list[keras.metrics.Metric]:
        """The loss tracker followed by the compiled metrics; their results are the logs."""
        return [self.loss_tracker, *self.compiled_metrics]

    def build(self, y: Nested, y_pred: Nested) -> None:
        """Resolves the metrics for targets ``y`` and outputs ``y_pred`` (once)."""
        if not self.built:
            self.compiled_metrics = [resolve_metric(spec, y, y_pred) for spec in self.specs]
            self.built = True

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
        """The mean loss of a batch, times ``replicas``, plus the ``extra`` loss terms.

        Keras losses divide by the number of replicas under a strategy; the Trainer weights
        each replica's mean by its example count instead, so the division is undone. An
        empty replica share gives a zero that still depends on the weights.
        """
        if self.loss is None:
            raise ConfigError(
                "loss is None: pass Trainer(loss=...) or override compute_loss in a subclass."
            )
        loss = self.loss(y, y_pred, sample_weight=sample_weight)
        if loss.shape.rank == 1 and loss.shape[0] == 0:
            # A replica's share of a batch smaller than the replica count is empty; Keras
            # returns its per-example losses (none) instead of a mean. It has weight zero; the
            # sum keeps it connected to the weights, so its gradients are zeros, not None,
            # and every replica takes part in the same all-reduce.
            loss = tf.reduce_sum(loss)
        if replicas > 1:
            loss = loss * tf.cast(replicas, loss.dtype)
        if extra:
            loss = loss + tf.add_n([tf.cast(term, loss.dtype) for term in extra])
        return loss

    def update(self, x: Nested, y: Nested, y_pred: Nested, sample_weight: Nested = None) -> None:
        """Updates every compiled metric with one batch."""
        for metric in self.compiled_metrics:
            metric.update_state(y, y_pred, sample_weight=sample_weight)


def resolve_loss(loss: Any) -> Any:
    if loss is None or isinstance(loss, keras.losses.Loss):
        return loss
    if isinstance(loss, str):
        try:
            loss = keras.losses.get(loss)
        except ValueError as error:
            raise ConfigError(
                f"loss={loss!r} is not a Keras loss name; use e.g. 'mse', "
                "'categorical_crossentropy', 'sparse_categorical_crossentropy', or a callable."
            ) from error
        if isinstance(loss, keras.losses.Loss):
            return loss
    if callable(loss):
        # The wrapper reduces per-example values to the mean over the batch (sample weights
        # included), as Keras's own losses do.
        return LossFunction(loss)
    raise ConfigError(f"loss must be a name, a keras Loss or a callable, got {loss!r}.")


class LossFunction(keras.losses.Loss):  # type: ignore[misc]
    """Wraps ``fn(y_true, y_pred)``; Keras's ``Loss.__call__`` applies sample weights and the
    mean over the batch, so per-example and already-reduced functions both work."""

    def __init__(self, fn: Any) -> None:
        super().__init__(name=getattr(fn, "__name__", "loss"))
        self.fn = fn

    def call(self, y_true: Any, y_pred: Any) -> Any:
        return user_code(self.fn)(y_true, y_pred)


def validate_metric_specs(metrics: Any, argument: str = "metrics") -> list[Any]:
    """``metrics`` as a list of names, Metrics or callables; a ConfigError names a bad one."""
    if metrics is None:
        return []
    if isinstance(metrics, (str, keras.metrics.Metric)) or callable(metrics):
        metrics = [metrics]
    specs = list(metrics)
    for spec in specs:
        if isinstance(spec, str):
            if spec in ("accuracy", "acc"):
                continue
            try:
                keras.metrics.get(spec)
            except ValueError as error:
                raise ConfigError(
                    f"{argument}: {spec!r} is not a Keras metric name; use e.g. 'accuracy', "
                    "'mae', 'mse', or pass a keras.metrics.Metric."
                ) from error
        elif not (isinstance(spec, keras.metrics.Metric) or callable(spec)):
            raise ConfigError(
                f"{argument}: {spec!r} is neither a metric name, a keras.metrics.Metric nor a "
                "callable(y_true, y_pred)."
            )
    return specs


def resolve_metric(spec: Any, y: Nested, y_pred: Nested) -> keras.metrics.Metric:
    if isinstance(spec, keras.metrics.Metric):
        return spec
    if isinstance(spec, str) and spec in ("accuracy", "acc"):
        return _accuracy(spec, y, y_pred)
    if isinstance(spec, str):
        metric = keras.metrics.get(spec)
        if isinstance(metric, keras.metrics.Metric):
            metric.name = spec
            return metric
        spec = metric
    return keras.metrics.MeanMetricWrapper(spec, name=getattr(spec, "__name__", "metric"))


def _accuracy(name: str, y: Nested, y_pred: Nested) -> keras.metrics.Metric:
    """Picks binary, sparse or categorical accuracy from the shapes, as Keras does."""
    y_true_shape = tuple(tf.nest.flatten(y)[0].shape) if y is not None else ()
    y_pred_shape = tuple(tf.nest.flatten(y_pred)[0].shape)
    if y_pred_shape[-1:] == (1,) or len(y_pred_shape) == 1:
        return keras.metrics.BinaryAccuracy(name=name)
    if len(y_true_shape) < len(y_pred_shape) or (
        y_true_shape[-1:] == (1,) and y_pred_shape[-1] != 1
    ):
        return keras.metrics.SparseCategoricalAccuracy(name=name)
    return keras.metrics.CategoricalAccuracy(name=name)
