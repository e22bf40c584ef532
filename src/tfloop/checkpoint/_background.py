"""The checkpointer's background writer: one long-lived thread running writes in order."""

from __future__ import annotations

import queue
import threading
from typing import Any

__all__ = ["WriterThread"]


class WriterThread:
    """One long-lived background thread that runs the submitted writes in order.

    Starting a thread per save cost about half a millisecond of the training thread (the GIL
    handed back and forth). The thread ends after a second without work, so an idle
    Checkpointer holds no thread, and it holds no reference to the Checkpointer between jobs.
    """

    IDLE_SECONDS = 1.0

    def __init__(self) -> None:
        self._jobs: queue.Queue[tuple[Any, tuple[Any, ...]]] = queue.Queue()
        self._lock = threading.Lock()
        self._alive = False

    def submit(self, fn: Any, *args: Any) -> None:
        with self._lock:
            self._jobs.put((fn, args))
            if not self._alive:
                self._alive = True
                threading.Thread(
                    target=self._run, name="tfloop-checkpoint-writer", daemon=True
                ).start()

    def join(self) -> None:
        """Blocks until every submitted job has run."""
        self._jobs.join()

    def _run(self) -> None:
        while True:
            try:
                fn, args = self._jobs.get(timeout=self.IDLE_SECONDS)
            except queue.Empty:
                with self._lock:
                    if self._jobs.empty():
                        self._alive = False
                        return
                continue
            try:
                fn(*args)  # _write keeps its own errors for wait() to raise
            finally:
                del fn, args
                self._jobs.task_done()
