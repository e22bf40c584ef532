"""Turns the Trainer's constructor and ``fit`` arguments into validated components.

Every check here runs on the host before anything is traced, and every error names the
argument and the fix (see docs/errors.md).
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Iterable
from typing import Any, Literal

import keras
import numpy as np
import tensorflow as tf

from tfloop._autograph import user_code
from tfloop.callbacks import Callback
from tfloop.checkpoint import Checkpointer
from tfloop.errors import ConfigError

Nested = Any

logger = logging.getLogger("tfloop")


def _resolve_checkpoint(checkpoint: Any) -> Checkpointer | None:
    if checkpoint is None or isinstance(checkpoint, Checkpointer):
        return checkpoint
    if isinstance(checkpoint, (str, os.PathLike)):
        return Checkpointer(checkpoint)
    raise ConfigError(
        f"checkpoint must be a directory path, a tfloop.Checkpointer or None, got {checkpoint!r}."
    )


def _resolve_optimizer(optimizer: Any) -> keras.optimizers.Optimizer:
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


def _resolve_loss(loss: Any) -> Any:
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
        return _LossFunction(loss)
    raise ConfigError(f"loss must be a name, a keras Loss or a callable, got {loss!r}.")


class _LossFunction(keras.losses.Loss):  # type: ignore[misc]
    """Wraps ``fn(y_true, y_pred)``; Keras's ``Loss.__call__`` applies sample weights and the
    mean over the batch, so per-example and already-reduced functions both work."""

    def __init__(self, fn: Any) -> None:
        super().__init__(name=getattr(fn, "__name__", "loss"))
        self.fn = fn

    def call(self, y_true: Any, y_pred: Any) -> Any:
        return user_code(self.fn)(y_true, y_pred)


def _validate_metric_specs(metrics: Any) -> list[Any]:
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
                    f"metrics: {spec!r} is not a Keras metric name; use e.g. 'accuracy', "
                    "'mae', 'mse', or pass a keras.metrics.Metric."
                ) from error
        elif not (isinstance(spec, keras.metrics.Metric) or callable(spec)):
            raise ConfigError(
                f"metrics: {spec!r} is neither a metric name, a keras.metrics.Metric nor a "
                "callable(y_true, y_pred)."
            )
    return specs


def _resolve_metric(spec: Any, loss: Any, y: Nested, y_pred: Nested) -> keras.metrics.Metric:
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


def _validate_steps_per_execution(value: Any) -> int | Literal["auto"]:
    if value == "auto":
        return "auto"
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"steps_per_execution must be 'auto' or an int >= 1, got {value!r}.")
    return value


def _validate_jit_compile(value: Any) -> bool | Literal["auto"]:
    if value == "auto" or isinstance(value, bool):
        return value  # type: ignore[no-any-return]
    raise ConfigError(f"jit_compile must be True, False or 'auto', got {value!r}.")


_CONVOLUTIONS = tuple(
    getattr(keras.layers, name)
    for name in (
        "Conv1D",
        "Conv2D",
        "Conv3D",
        "Conv1DTranspose",
        "Conv2DTranspose",
        "Conv3DTranspose",
        "SeparableConv1D",
        "SeparableConv2D",
        "DepthwiseConv1D",
        "DepthwiseConv2D",
        "ConvLSTM1D",
        "ConvLSTM2D",
        "ConvLSTM3D",
    )
    if hasattr(keras.layers, name)
)
_JIT_CHOICE_LOGGED: weakref.WeakSet[Any] = weakref.WeakSet()


def _auto_jit_compile(model: Any) -> bool:
    """What ``jit_compile="auto"`` starts with: XLA, except for convolutions on a CPU.

    XLA's CPU convolutions are far slower than TensorFlow's own (oneDNN) kernels: a small
    Conv2D network (the benchmarks' ``cnn``) trained at 93-163 samples/s with XLA against
    5,500-8,800 without, in tfloop, on this project's 2-core test machine (TF 2.21). So a Keras model with a convolution layer (``Conv*``, ``SeparableConv*``,
    ``DepthwiseConv*``, ``ConvLSTM*``), trained where TensorFlow sees no GPU or TPU, runs
    without XLA; the choice is logged once per model, at INFO. Every other model starts with
    XLA (and falls back without it if XLA cannot compile the step). ``jit_compile=True`` or
    ``False`` overrides this.
    """
    if not isinstance(model, keras.Model) or not _CONVOLUTIONS:
        return True
    if tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU"):
        return True
    convolutions = sorted(
        {
            type(layer).__name__
            for layer in model._flatten_layers(include_self=False)
            if isinstance(layer, _CONVOLUTIONS)
        }
    )
    if not convolutions:
        return True
    if model not in _JIT_CHOICE_LOGGED:
        _JIT_CHOICE_LOGGED.add(model)
        logger.info(
            "tfloop: jit_compile='auto' runs without XLA: the model has convolution layers "
            "(%s) and trains on a CPU, where XLA convolutions are much slower. Pass "
            "jit_compile=True to use XLA anyway.",
            ", ".join(convolutions),
        )
    return False


def _validate_clip(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"clip_global_norm must be a positive number or None, got {value!r}.")
    return float(value)


def _validate_callbacks(callbacks: Iterable[Any]) -> list[Callback]:
    if isinstance(callbacks, Callback):
        callbacks = [callbacks]
    result = list(callbacks)
    for callback in result:
        if isinstance(callback, keras.callbacks.Callback):
            raise ConfigError(
                f"callbacks: {type(callback).__name__} is a Keras callback; wrap Keras callbacks "
                "in tfloop.callbacks.KerasCallbacks([...]), or subclass tfloop.Callback."
            )
        if not isinstance(callback, Callback):
            raise ConfigError(
                f"callbacks: {callback!r} is not a tfloop.Callback; subclass tfloop.Callback."
            )
    return result


def _validate_count(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name} must be an int >= {minimum}, got {value!r}.")
    return int(value)
