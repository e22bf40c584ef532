"""LearningRateScheduler: set the learning rate per epoch, or per update with a Keras schedule."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import keras
import numpy as np

from tfloop.callbacks._common import has_schedule, learning_rate_of
from tfloop.callbacks.base import Callback, Logs, TrainerView
from tfloop.errors import ConfigError

__all__ = ["LearningRateScheduler"]

EpochSchedule = Callable[..., float]


class LearningRateScheduler(Callback):
    """Drives the learning rate from ``schedule``.

    ``schedule`` is either

    - a function ``schedule(epoch)`` or ``schedule(epoch, lr)`` returning the rate of ``epoch``
      (0-based), set before the epoch's first step, as in Keras; or
    - a ``keras.optimizers.schedules.LearningRateSchedule``: it is installed as the optimizer's
      learning rate and evaluated in-graph at every update with ``optimizer.iterations``. That
      count is of **updates**, not micro-batches, so with ``accumulate_steps=k`` the schedule
      moves once per k micro-batches, and fused executions see each update's own rate. Passing
      the schedule to the optimizer directly (``keras.optimizers.SGD(schedule)``) is the same.

    Either way each epoch's logs get ``learning_rate`` (the rate at the epoch's end).

    Args:
        schedule: the function or ``LearningRateSchedule``.

    Examples:
        >>> import keras, types
        >>> scheduler = LearningRateScheduler(lambda epoch, lr: lr * 0.5)
        >>> scheduler.trainer = types.SimpleNamespace(optimizer=keras.optimizers.SGD(1.0))
        >>> for epoch in range(3):
        ...     scheduler.on_epoch_start(epoch, {})
        >>> logs = {}
        >>> scheduler.on_epoch_end(2, logs)
        >>> logs
        {'learning_rate': 0.125}
    """

    def __init__(
        self, schedule: EpochSchedule | keras.optimizers.schedules.LearningRateSchedule
    ) -> None:
        self.schedule = schedule
        self._per_update = isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule)
        if self._per_update:
            self._arity = 0
        elif callable(schedule):
            self._arity = _arity(schedule)
        else:
            raise ConfigError(
                "LearningRateScheduler: schedule must be a function schedule(epoch[, lr]) -> "
                f"float or a keras LearningRateSchedule, got {schedule!r}."
            )

    def set_trainer(self, trainer: TrainerView) -> None:
        super().set_trainer(trainer)
        # Installed before the training loop is traced, which reads the optimizer's rate.
        optimizer = trainer.optimizer
        if self._per_update and getattr(optimizer, "_learning_rate", None) is not self.schedule:
            optimizer.learning_rate = self.schedule

    def on_epoch_start(self, epoch: int, logs: Logs) -> None:
        if self._per_update:
            return
        assert self.trainer is not None, "LearningRateScheduler needs a trainer (set_trainer)"
        optimizer = self.trainer.optimizer
        if has_schedule(optimizer):
            raise ConfigError(
                "LearningRateScheduler: the optimizer already has a LearningRateSchedule; pass "
                "that schedule here (or to the optimizer) instead of an epoch function."
            )
        args = (epoch,) if self._arity == 1 else (epoch, learning_rate_of(optimizer))
        rate = self.schedule(*args)
        if isinstance(rate, bool) or not isinstance(rate, (int, float, np.integer, np.floating)):
            raise ConfigError(
                f"LearningRateScheduler: schedule returned {rate!r} for epoch {epoch}; it must "
                "return a float."
            )
        optimizer.learning_rate = float(rate)

    def on_epoch_end(self, epoch: int, logs: Logs) -> None:
        if self.trainer is not None:
            logs["learning_rate"] = learning_rate_of(self.trainer.optimizer)


def _arity(schedule: Callable[..., Any]) -> int:
    try:
        parameters = inspect.signature(schedule).parameters.values()
    except (TypeError, ValueError):
        return 2
    positional = [
        p
        for p in parameters
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    if len(positional) in (1, 2):
        return len(positional)
    if not positional and any(p.kind is p.VAR_POSITIONAL for p in parameters):
        return 2
    raise ConfigError(
        "LearningRateScheduler: schedule must take (epoch) or (epoch, lr), got a function of "
        f"{len(positional)} required arguments."
    )
