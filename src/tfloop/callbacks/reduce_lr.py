"""ReduceLROnPlateau: lower the learning rate when a monitored quantity stops improving."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from tfloop import _validate
from tfloop._monitor import Monitor
from tfloop.callbacks._common import has_schedule, learning_rate_of
from tfloop.callbacks.base import Callback, Logs
from tfloop.errors import ConfigError

__all__ = ["ReduceLROnPlateau"]

logger = logging.getLogger("tfloop")


class ReduceLROnPlateau(Callback):
    """Multiplies the learning rate by ``factor`` after ``patience`` epochs without improvement.

    Keras's rule: after a reduction, ``cooldown`` epochs pass before ``wait`` counts again; the
    rate never goes below ``min_lr``. Each epoch's logs get ``learning_rate`` (the rate the
    epoch ran with). The learning rate itself is an optimizer variable, so checkpoints keep it;
    ``state_dict()`` holds ``best``, ``wait`` and ``cooldown_counter``.

    The optimizer must have a plain (assignable) learning rate, not a ``LearningRateSchedule``.

    Args:
        monitor: the log key to watch.
        factor: the multiplier, 0 < factor < 1.
        patience: epochs without improvement before a reduction.
        mode: ``"min"``, ``"max"`` or ``"auto"``.
        min_delta: the smallest change that counts as an improvement.
        cooldown: epochs to wait after a reduction before counting again.
        min_lr: the lower bound of the learning rate.
        verbose: 1 logs each reduction.

    Examples:
        >>> import keras, types
        >>> reduce = ReduceLROnPlateau(monitor="loss", factor=0.5, patience=1)
        >>> optimizer = keras.optimizers.SGD(1.0)
        >>> reduce.trainer = types.SimpleNamespace(optimizer=optimizer)
        >>> for epoch, loss in enumerate([1.0, 1.0, 1.0]):
        ...     reduce.on_epoch_end(epoch, {"loss": loss})
        >>> float(optimizer.learning_rate)
        0.25
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        factor: float = 0.1,
        patience: int = 10,
        mode: str = "auto",
        min_delta: float = 1e-4,
        cooldown: int = 0,
        min_lr: float = 0.0,
        verbose: int = 0,
    ) -> None:
        owner = "ReduceLROnPlateau"
        factor = _validate.number(factor, "factor", owner=owner)
        if not 0.0 < factor < 1.0:
            raise ConfigError(f"{owner}: factor must be between 0 and 1 (exclusive), got {factor}.")
        self.monitor = Monitor(owner, monitor, mode, min_delta)
        self.factor = factor
        self.patience = _validate.count(patience, "patience", owner=owner)
        self.cooldown = _validate.count(cooldown, "cooldown", owner=owner)
        self.min_lr = _validate.number(min_lr, "min_lr", owner=owner)
        self.verbose = verbose
        self._restored = False
        self._reset()

    def _reset(self) -> None:
        self.best: float | None = None
        self.wait = 0
        self.cooldown_counter = 0

    def on_fit_start(self, logs: Logs) -> None:
        if not self._restored:
            self._reset()
        self._restored = False
        self.monitor.bind(self.trainer)
        if self.trainer is not None and has_schedule(self.trainer.optimizer):
            raise ConfigError(
                "ReduceLROnPlateau: the optimizer's learning rate is a LearningRateSchedule, "
                "which cannot be lowered; create the optimizer with a float learning_rate."
            )

    def on_epoch_end(self, epoch: int, logs: Logs) -> None:
        assert self.trainer is not None, "ReduceLROnPlateau needs a trainer (set_trainer)"
        optimizer = self.trainer.optimizer
        logs["learning_rate"] = learning_rate_of(optimizer)
        current = self.monitor.value(logs)
        if current is None:
            return
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.wait = 0
        if self.monitor.is_improvement(current, self.best):
            self.best, self.wait = current, 0
        elif self.cooldown_counter == 0:
            self.wait += 1
            if self.wait >= self.patience and self._reduce(optimizer, epoch):
                self.cooldown_counter = self.cooldown
                self.wait = 0

    def _reduce(self, optimizer: Any, epoch: int) -> bool:
        old = learning_rate_of(optimizer)
        # The rate is a float32 variable: compare in float32, or a rate already at min_lr
        # (rounded up) would count as "reduced" again and restart the cooldown.
        if old <= float(np.float32(self.min_lr)):
            return False
        new = max(old * self.factor, self.min_lr)
        optimizer.learning_rate = new
        if self.verbose:
            logger.warning("tfloop: epoch %d: learning rate reduced to %g", epoch + 1, new)
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "wait": self.wait, "cooldown_counter": self.cooldown_counter}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = None if state["best"] is None else float(state["best"])
        self.wait = int(state["wait"])
        self.cooldown_counter = int(state["cooldown_counter"])
        self._restored = True
