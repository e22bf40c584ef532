"""EarlyStopping: stop ``fit`` when a monitored quantity stops improving."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from tfloop import _validate
from tfloop._monitor import Monitor
from tfloop.callbacks._common import restore_weights, snapshot_weights
from tfloop.callbacks.base import Callback, Logs

__all__ = ["EarlyStopping"]

logger = logging.getLogger("tfloop")


class EarlyStopping(Callback):
    """Stops training when ``monitor`` has not improved for ``patience`` epochs.

    The rule is Keras's: an epoch improves when its value beats the best so far by more than
    ``min_delta`` (lower in mode ``"min"``, higher in ``"max"``; ``"auto"`` asks the metric).
    After an epoch without improvement, ``wait`` grows; when ``wait >= patience`` (and it is not
    the first epoch) training stops at the end of that epoch. Epochs before
    ``start_from_epoch``, and epochs without validation when monitoring a ``val_*`` key
    (``validation_freq > 1``), are not counted. With ``baseline``, ``wait`` restarts only on
    epochs that also beat the baseline.

    ``restore_best_weights=True`` puts back the weights of the best epoch when ``fit`` ends.
    ``state_dict()`` holds ``best``, ``wait``, ``best_epoch`` and ``stopped_epoch``, so a resumed
    run stops at the same epoch; the best weights themselves are not in it (they would double
    every checkpoint), so after a resume only a best epoch reached after the resume is restored.

    Args:
        monitor: the log key to watch, e.g. ``"val_loss"``, ``"loss"``, ``"val_accuracy"``.
        min_delta: the smallest change that counts as an improvement (>= 0).
        patience: epochs without improvement before stopping.
        mode: ``"min"``, ``"max"`` or ``"auto"``.
        baseline: a value the monitored quantity must beat to reset ``wait``.
        restore_best_weights: restore the best epoch's weights at the end of ``fit``.
        start_from_epoch: epochs to let pass before monitoring starts.
        verbose: 1 logs when it stops and when it restores weights.

    Raises:
        ConfigError: at the start of ``fit`` for a ``val_*`` monitor without
            ``validation_data``; at the first epoch end for a key the logs do not have (the
            message lists the keys they have).

    Examples:
        >>> stopper = EarlyStopping(monitor="loss", patience=1)
        >>> for epoch, loss in enumerate([1.0, 0.5, 0.6, 0.7, 0.1]):
        ...     stopper.on_epoch_end(epoch, {"loss": loss})
        ...     if stopper.stopped_epoch:
        ...         break
        >>> stopper.stopped_epoch, stopper.best, stopper.best_epoch
        (2, 0.5, 1)
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        min_delta: float = 0.0,
        patience: int = 0,
        mode: str = "auto",
        baseline: float | None = None,
        restore_best_weights: bool = False,
        start_from_epoch: int = 0,
        verbose: int = 0,
    ) -> None:
        owner = "EarlyStopping"
        self.monitor = Monitor(owner, monitor, mode, min_delta)
        self.patience = _validate.count(patience, "patience", owner=owner)
        self.baseline = None if baseline is None else float(baseline)
        self.restore_best_weights = bool(restore_best_weights)
        self.start_from_epoch = _validate.count(start_from_epoch, "start_from_epoch", owner=owner)
        self.verbose = verbose
        self.best_weights: list[np.ndarray] | None = None
        self._restored = False
        self._reset()

    def _reset(self) -> None:
        self.wait = 0
        self.best: float | None = None
        self.best_epoch = 0
        self.stopped_epoch = 0
        self.best_weights = None

    def on_fit_start(self, logs: Logs) -> None:
        # A state restored from a checkpoint (before this event) is the run's own; keep it.
        if not self._restored:
            self._reset()
        self._restored = False
        self.monitor.bind(self.trainer)

    def on_epoch_end(self, epoch: int, logs: Logs) -> None:
        current = self.monitor.value(logs)
        if current is None or epoch < self.start_from_epoch:
            return
        if self.restore_best_weights and self.best_weights is None and self.best is None:
            self._remember_weights(epoch)  # the first monitored epoch is the best so far
        self.wait += 1
        if self.monitor.is_improvement(current, self.best):
            self.best, self.best_epoch = current, epoch
            if self.restore_best_weights:
                self._remember_weights(epoch)
            if self.baseline is None or self.monitor.is_improvement(current, self.baseline):
                self.wait = 0
            return
        if self.wait >= self.patience and epoch > 0:
            self.stopped_epoch = epoch
            if self.trainer is not None:
                self.trainer.stop_training = True

    def on_fit_end(self, logs: Logs) -> None:
        if self.stopped_epoch > 0 and self.verbose:
            logger.warning("tfloop: epoch %d: early stopping", self.stopped_epoch + 1)
        if not self.restore_best_weights or self.trainer is None:
            return
        if self.best_weights is None:
            if self.best is not None:
                logger.warning(
                    "tfloop: EarlyStopping: the best epoch, %d, came before the run was resumed "
                    "and its weights are not in checkpoints; keeping the last weights.",
                    self.best_epoch + 1,
                )
            return
        if self.verbose:
            logger.warning(
                "tfloop: restoring the weights of the best epoch, %d", self.best_epoch + 1
            )
        restore_weights(self.trainer.model, self.best_weights)

    def _remember_weights(self, epoch: int) -> None:
        if self.trainer is not None:
            self.best_weights = snapshot_weights(self.trainer.model)
            self.best_epoch = epoch

    def state_dict(self) -> dict[str, Any]:
        return {
            "wait": self.wait,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "stopped_epoch": self.stopped_epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._reset()
        self.wait = int(state["wait"])
        self.best = None if state["best"] is None else float(state["best"])
        self.best_epoch = int(state["best_epoch"])
        self.stopped_epoch = int(state["stopped_epoch"])
        self._restored = True
