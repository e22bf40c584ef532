"""KerasCallbacks: run stock ``keras.callbacks.Callback`` s inside ``Trainer.fit``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import keras
import numpy as np

from tfloop._logs import COUNTERS, without
from tfloop._monitor import flat_metrics
from tfloop.callbacks._common import restore_weights, snapshot_weights
from tfloop.callbacks.base import Callback, Logs, TrainerView
from tfloop.errors import ConfigError

__all__ = ["KerasCallbacks"]

# The counters of stock callbacks that a resumed run needs (their on_train_begin resets them).
_RESUMABLE: dict[type, tuple[str, ...]] = {
    keras.callbacks.EarlyStopping: ("wait", "stopped_epoch", "best", "best_epoch"),
    keras.callbacks.ReduceLROnPlateau: ("wait", "cooldown_counter", "best"),
}


class KerasCallbacks(Callback):
    """Runs Keras callbacks, unchanged, against the Trainer's model, optimizer and logs.

    Each Keras callback gets a view of the model (``callback.model``) whose ``optimizer`` is
    the Trainer's, whose ``stop_training`` is ``trainer.stop_training`` and whose ``metrics``
    are the Trainer's; everything else (``get_weights``, ``save``, ``layers``...) is the model's.
    Events map as ``fit`` → ``on_train_begin/end``, ``on_epoch_start`` →
    ``on_epoch_begin``, validation and ``evaluate`` → ``on_test_begin/end``, ``predict`` →
    ``on_predict_begin/end``. A training batch event is one compiled execution:
    ``on_train_batch_begin(first)`` and ``on_train_batch_end(last, logs)`` are called back to
    back after it, with the indices of its first and last micro-batch. Keras's per-batch
    test and predict events are not called.

    Tested: ``EarlyStopping``, ``ReduceLROnPlateau``, ``CSVLogger``, ``LambdaCallback``,
    ``TerminateOnNaN``, ``LearningRateScheduler``, ``ModelCheckpoint`` (per epoch). See
    ``docs/callbacks.md`` for the ones that need more (``BackupAndRestore``,
    ``TensorBoard``, batch-frequency saving). ``state_dict()`` keeps the counters of Keras's
    ``EarlyStopping`` and ``ReduceLROnPlateau`` for resume.

    Args:
        callbacks: ``keras.callbacks.Callback`` instances, called in this order.

    Examples:
        >>> import keras, numpy as np, tfloop
        >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        >>> stop = keras.callbacks.EarlyStopping(monitor="loss", min_delta=100.0)
        >>> trainer = tfloop.Trainer(model, "sgd", "mse",
        ...                          callbacks=[tfloop.callbacks.KerasCallbacks([stop])])
        >>> history = trainer.fit((np.ones((8, 2)), np.ones((8, 1))), epochs=5, verbose=0)
        >>> len(history.history["loss"])
        2
    """

    def __init__(self, callbacks: Iterable[keras.callbacks.Callback]) -> None:
        if isinstance(callbacks, keras.callbacks.Callback):
            callbacks = [callbacks]
        self.callbacks = list(callbacks)
        for callback in self.callbacks:
            if not isinstance(callback, keras.callbacks.Callback):
                raise ConfigError(
                    f"KerasCallbacks: {callback!r} is not a keras.callbacks.Callback; pass "
                    "tfloop callbacks to Trainer(callbacks=...) directly."
                )
        self._pending: list[dict[str, Any]] | None = None
        self._first_batch = 0

    def set_trainer(self, trainer: TrainerView) -> None:
        super().set_trainer(trainer)
        view = _ModelView(trainer)
        for callback in self.callbacks:
            callback.set_model(view)

    def _each(self, event: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, event)(*args)

    def on_fit_start(self, logs: Logs) -> None:
        trainer = self.trainer
        params = {
            "epochs": trainer.run_info.epochs if trainer else None,
            "steps": trainer.run_info.steps_per_epoch if trainer else None,
            "verbose": 1,  # read only by ProgbarLogger, which is there to print
        }
        self._each("set_params", params)
        self._each("on_train_begin", logs)
        if self._pending is not None:
            for callback, state in zip(self.callbacks, self._pending, strict=False):
                for name, value in state.items():
                    setattr(callback, name, value)
            self._pending = None

    def on_fit_end(self, logs: Logs) -> None:
        self._each("on_train_end", logs)

    def on_epoch_start(self, epoch: int, logs: Logs) -> None:
        self._first_batch = 0
        self._each("on_epoch_begin", epoch, logs)

    def on_train_batch_end(self, batch: int, logs: Logs) -> None:
        # Keras's batch logs hold only metrics: ``step`` and ``batch`` would, for example,
        # override the batch number ModelCheckpoint formats into its file name.
        metrics = without(logs, COUNTERS)
        self._each("on_train_batch_begin", self._first_batch)
        self._each("on_train_batch_end", batch, metrics)
        logs.update(metrics)
        self._first_batch = batch + 1

    def on_epoch_end(self, epoch: int, logs: Logs) -> None:
        self._each("on_epoch_end", epoch, logs)

    def on_eval_start(self, logs: Logs) -> None:
        self._each("on_test_begin", logs)

    def on_eval_end(self, logs: Logs) -> None:
        self._each("on_test_end", without(logs, COUNTERS))

    def on_predict_start(self, logs: Logs) -> None:
        self._each("on_predict_begin", logs)

    def on_predict_end(self, logs: Logs) -> None:
        self._each("on_predict_end", logs)

    def state_dict(self) -> dict[str, Any]:
        states = []
        for callback in self.callbacks:
            names = next((n for t, n in _RESUMABLE.items() if isinstance(callback, t)), ())
            states.append({name: _plain(getattr(callback, name, None)) for name in names})
        return {"callbacks": states}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Applied after on_train_begin, which resets these counters.
        self._pending = [dict(s) for s in state["callbacks"]]


class _ModelView:
    """The model as Keras callbacks see it: the Trainer's optimizer, metrics and stop flag."""

    def __init__(self, trainer: TrainerView) -> None:
        object.__setattr__(self, "_trainer", trainer)

    @property
    def optimizer(self) -> Any:
        return self._trainer.optimizer

    @property
    def stop_training(self) -> bool:
        return bool(self._trainer.stop_training)

    @stop_training.setter
    def stop_training(self, value: bool) -> None:
        self._trainer.stop_training = bool(value)

    @property
    def metrics(self) -> list[Any]:
        # Keras's mode="auto" looks for metric directions inside a MetricsList.
        try:
            from keras.src.trainers.compile_utils import MetricsList
        except ImportError:  # pragma: no cover - Keras moved it
            return list(self._trainer.metrics)
        first, *others = self._trainer.metrics
        return [first, MetricsList(flat_metrics(others))]

    def get_weights(self) -> list[np.ndarray]:
        return snapshot_weights(self._trainer.model)

    def set_weights(self, weights: list[np.ndarray]) -> None:
        restore_weights(self._trainer.model, list(weights))

    def __getattr__(self, name: str) -> Any:
        if name == "_trainer":  # not set yet (copy, pickle): do not recurse
            raise AttributeError(name)
        return getattr(self._trainer.model, name)


def _plain(value: Any) -> Any:
    """A JSON-friendly copy of a counter (NumPy and tensor scalars become Python numbers)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    array = np.asarray(value)
    return int(array) if np.issubdtype(array.dtype, np.integer) else float(array)
