"""A monitored quantity: its lookup in the logs, its direction, and what counts as better.

EarlyStopping, ReduceLROnPlateau, ExportBest and the Checkpointer's ``keep_best`` all watch one
log key the same way (Keras's ``MonitorCallback`` rule), so the rule lives here, below both
the callbacks and the checkpoints.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from tfloop import _validate
from tfloop.errors import ConfigError

__all__ = ["Mode", "Monitor", "flat_metrics"]

Mode = Literal["auto", "min", "max"]


class Monitor:
    """One monitored log key and the rule for "better" (Keras's ``MonitorCallback`` rule).

    ``current`` improves on ``best`` when ``current < best - min_delta`` (mode ``"min"``) or
    ``current > best + min_delta`` (mode ``"max"``); anything improves on ``None``.

    Examples:
        >>> monitor = Monitor("EarlyStopping", "loss", "min", min_delta=0.1)
        >>> monitor.is_improvement(0.85, 1.0), monitor.is_improvement(0.95, 1.0)
        (True, False)
    """

    def __init__(self, owner: str, monitor: str, mode: str, min_delta: float) -> None:
        if not isinstance(monitor, str) or not monitor:
            raise ConfigError(f"{owner}: monitor must be a log key such as 'val_loss'.")
        if mode not in ("auto", "min", "max"):
            raise ConfigError(f"{owner}: mode must be 'auto', 'min' or 'max', got {mode!r}.")
        self.owner = owner
        self.monitor = monitor
        self.mode: Mode = mode  # type: ignore[assignment]
        self.min_delta = _validate.number(min_delta, "min_delta", owner=owner)
        self._direction: Literal["min", "max"] | None = None if mode == "auto" else mode  # type: ignore[assignment]
        self._trainer: Any = None

    @property
    def watches_validation(self) -> bool:
        """Whether the key is a validation result (``val_*``)."""
        return self.monitor.startswith("val_")

    def bind(self, trainer: Any) -> None:
        """At the start of ``fit``: checks what can be checked before training.

        ``trainer`` is a ``TrainerView`` (its ``run_info`` and ``metrics`` are read). A
        ``val_*`` key needs ``validation_data``. The direction of a Trainer metric is fixed
        now, so an undecidable ``mode="auto"`` fails before training; other keys (a typo, a
        value a callback adds) are decided at the first epoch end, where a missing key is
        reported as missing.
        """
        self._trainer = trainer
        if trainer is None:
            return
        info = trainer.run_info
        in_fit_without_validation = info.in_fit and not info.validates
        if self.watches_validation and in_fit_without_validation:
            raise ConfigError(
                f"{self.owner}: monitor={self.monitor!r} needs validation results, but fit has "
                "no validation_data. Pass validation_data=... to fit, or monitor a training key "
                f"such as {self.monitor.removeprefix('val_')!r}."
            )
        names = {getattr(metric, "name", None) for metric in flat_metrics(trainer.metrics)}
        if self._direction is None and self.monitor.removeprefix("val_") in names:
            self.direction()

    def value(self, logs: Mapping[str, float]) -> float | None:
        """The monitored value; ``None`` in an epoch without validation (``validation_freq``).

        Raises:
            ConfigError: the key is not in the logs; the message lists the keys that are.
        """
        if self.monitor in logs:
            return float(logs[self.monitor])
        if self.watches_validation and not any(key.startswith("val_") for key in logs):
            return None  # validation did not run this epoch
        available = ", ".join(sorted(logs)) or "(none)"
        raise ConfigError(
            f"{self.owner}: monitor={self.monitor!r} is not in the epoch logs. Available keys: "
            f"{available}. Pass one of them as monitor=..."
        )

    def validation_value(self, results: Mapping[str, float]) -> float | None:
        """The monitored value in the ``results`` of a validation pass (raw names, no
        ``val_``); ``None`` for a training key, which only epoch ends judge."""
        if not self.watches_validation:
            return None
        return self.value({f"val_{name}": value for name, value in results.items()})

    def direction(self) -> Literal["min", "max"]:
        """``"min"`` or ``"max"``; mode ``"auto"`` asks the metric (as Keras does)."""
        if self._direction is None:
            self._direction = _infer_direction(self.owner, self.monitor, self._trainer)
        return self._direction

    def is_improvement(self, current: float, best: float | None) -> bool:
        if best is None:
            return True
        if self.direction() == "min":
            return current < best - self.min_delta
        return current > best + self.min_delta


def flat_metrics(metrics: list[Any]) -> list[Any]:
    """``metrics`` with Keras's compiled-metrics containers opened (as Keras's own monitor
    callbacks look into them)."""
    flat = []
    for metric in metrics:
        inner = getattr(metric, "metrics", None)
        flat.extend(inner if isinstance(inner, list) and inner else [metric])
    return flat


def _infer_direction(owner: str, monitor: str, trainer: Any) -> Literal["min", "max"]:
    name = monitor.removeprefix("val_")
    if name == "loss" or name.endswith("_loss"):
        return "min"
    for metric in flat_metrics(getattr(trainer, "metrics", None) or []):
        direction = getattr(metric, "_direction", None)
        if getattr(metric, "name", None) == name and direction in ("up", "down"):
            return "max" if direction == "up" else "min"
    raise ConfigError(
        f"{owner}: mode='auto' cannot tell whether {monitor!r} should go down or up; pass "
        "mode='min' or mode='max'."
    )
