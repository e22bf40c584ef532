"""Keep-best: the k checkpoints with the best monitored value, and their records.

A checkpoint saved where the monitored value is known (an epoch end, a validation of
``validation_every_n_steps``) is offered with that value; the k best are kept past
``max_to_keep`` (dropped from the ``checkpoint`` index, as TF's ``keep_checkpoint_every_n_hours``
keeps a checkpoint, but not deleted). The records go into every checkpoint's metadata, so a
resumed run knows which files are the best ones.

Examples:
    >>> best = BestCheckpoints(keep=2, monitor="val_loss", mode="min")
    >>> [best.offer(step, value) for step, value in [(10, 0.5), (20, 0.3), (30, 0.4)]]
    [True, True, True]
    >>> best.steps, best.best_step
    ([20, 30], 20)
    >>> best.offer(40, 0.9)
    False
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from tfloop._monitor import Monitor

__all__ = ["BestCheckpoints"]


class BestCheckpoints:
    """The ``keep`` best ``(step, value)`` records by ``monitor`` (ties: the earlier step)."""

    def __init__(self, keep: int, monitor: str, mode: str) -> None:
        self.keep = keep
        self.monitor = Monitor("Checkpointer", monitor, mode, 0.0)
        self.records: list[tuple[int, float]] = []  # best first

    @property
    def steps(self) -> list[int]:
        """The steps of the kept checkpoints, best first."""
        return [step for step, _ in self.records]

    @property
    def best_step(self) -> int | None:
        return self.records[0][0] if self.records else None

    def value(self, logs: Mapping[str, float], *, validation_only: bool) -> float | None:
        """The monitored value in ``logs`` (None if keep-best is off or it is not there);
        ``validation_only``: the logs of a validation of ``validation_every_n_steps``, where
        only a ``val_*`` key is judged."""
        if self.keep == 0:
            return None
        if validation_only and not self.monitor.watches_validation:
            return None
        return self.monitor.value(logs)

    def offer(self, step: int, value: float) -> bool:
        """Records checkpoint ``step`` with ``value``; whether it is among the best now. A
        step offered again (saved again at the same update) takes its new value."""
        records = [(s, v) for s, v in self.records if s != step]
        if not math.isnan(value):
            records.append((step, value))
        sign = 1.0 if self.monitor.direction() == "min" else -1.0
        records.sort(key=lambda record: (sign * record[1], record[0]))
        self.records = records[: self.keep]
        return step in self.steps

    def state(self) -> list[list[Any]]:
        """The records, for a checkpoint's metadata."""
        return [[step, value] for step, value in self.records]

    def load(self, state: Any, exists: Any) -> None:
        """Takes the records of a restored checkpoint; ``exists(step)`` filters out those
        whose files are gone."""
        self.records = [(int(step), float(value)) for step, value in state or [] if exists(step)]
