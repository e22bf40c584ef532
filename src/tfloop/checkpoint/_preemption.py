"""Preemption: signals that make ``fit`` save at the next execution boundary and return."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Sequence
from typing import Any

__all__ = ["PreemptionSignals"]

logger = logging.getLogger("tfloop")


class PreemptionSignals:
    """While installed, the given signals set :attr:`received` instead of killing the process.

    Installed only in the main thread (Python delivers signals there); elsewhere it does
    nothing, and the signal keeps its usual effect. A process forked while it is installed (a
    ``PyDataset``'s ``use_multiprocessing`` workers) gets the signal's default effect: the pool
    that made it stops it with SIGTERM, and would otherwise wait forever.

    Examples:
        >>> import os, signal
        >>> signals = PreemptionSignals([signal.SIGUSR1])
        >>> signals.install()
        >>> os.kill(os.getpid(), signal.SIGUSR1)
        >>> signals.received
        True
        >>> signals.uninstall()
    """

    def __init__(self, signals: Sequence[int]) -> None:
        self.signals = tuple(signals)
        self.received = False
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        self.received = False
        if not self.signals or threading.current_thread() is not threading.main_thread():
            return

        pid = os.getpid()

        def handler(signum: int, frame: Any) -> None:
            if os.getpid() != pid:  # a forked child: this run is not its to save
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
                return
            logger.warning("tfloop: got signal %d; saving at the next step boundary", signum)
            self.received = True

        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, handler)

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
