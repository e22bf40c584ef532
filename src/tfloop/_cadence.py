"""Cadences: when something periodic is due, as small objects (CLU's periodic actions).

A cadence answers two questions of the host loop: *is it due now* (after an execution that
moved the update count from ``last`` to ``now``), and *how many updates until it is next due*
(so the loop can cut an execution short and land exactly on that update).

Examples:
    >>> every = EveryNSteps(100)
    >>> every.crossed(95, 130), every.crossed(100, 199), every.until_next(130)
    (True, False, 70)
    >>> ticks = iter([0.0, 5.0, 12.0])
    >>> timer = EveryNSeconds(10.0, clock=lambda: next(ticks))
    >>> timer.due(), timer.due()
    (False, True)
    >>> ticks = iter([0.0, 30.0, 61.0])
    >>> budget = Deadline(60.0, clock=lambda: next(ticks))
    >>> budget.expired(), budget.expired()
    (False, True)
    >>> ticks = iter([0.0, 5.0])
    >>> resumed = Deadline(60.0, clock=lambda: next(ticks), spent=50.0)  # 10 s are left
    >>> resumed.spent()
    55.0
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["Deadline", "EveryNSeconds", "EveryNSteps"]


class EveryNSteps:
    """Due at every multiple of ``n`` updates."""

    def __init__(self, n: int) -> None:
        self.n = int(n)

    def crossed(self, last: int, now: int) -> bool:
        """Whether a multiple of ``n`` lies in ``(last, now]``."""
        return now // self.n > last // self.n

    def until_next(self, step: int) -> int:
        """Updates from ``step`` to the next multiple of ``n`` (``n`` at a multiple)."""
        return self.n - step % self.n


class EveryNSeconds:
    """Due once ``seconds`` have passed since it was last due (or made, or reset)."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = float(seconds)
        self.clock = clock
        self._last = clock()

    def due(self) -> bool:
        """Whether the interval has passed; if so the interval starts again now."""
        now = self.clock()
        if now - self._last >= self.seconds:
            self._last = now
            return True
        return False

    def reset(self) -> None:
        """Starts the interval again now."""
        self._last = self.clock()


class Deadline:
    """Expires once ``seconds`` have been spent: ``spent`` before it was made (by the calls a
    resumed run continues) plus the time since (a run's time budget)."""

    def __init__(
        self, seconds: float, clock: Callable[[], float] = time.monotonic, spent: float = 0.0
    ) -> None:
        self.seconds = float(seconds)
        self.clock = clock
        self.before = float(spent)
        self._start = clock()

    def spent(self) -> float:
        """The seconds spent so far, those spent before it was made included."""
        return self.before + self.clock() - self._start

    def expired(self) -> bool:
        """Whether the budget is spent."""
        return self.spent() >= self.seconds
