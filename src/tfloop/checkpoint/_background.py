"""The checkpointer's background writer: one long-lived thread running writes in order."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from tfloop._validate import first_line
from tfloop.errors import CheckpointError

__all__ = ["BackgroundWrite", "WriterThread"]

logger = logging.getLogger("tfloop")


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


class BackgroundWrite:
    """The checkpoint write in flight on the writer thread, and how it ended.

    ``submit`` hands a write to the thread; ``wait`` blocks until it is done and raises a
    :class:`~tfloop.errors.CheckpointError` if it failed (or logs it, for a ``fit`` that is
    already raising), saying the checkpoints of the index are intact.
    """

    def __init__(self, index: str, explain: Callable[[BaseException], str | None]) -> None:
        self._index = index  # the ``checkpoint`` index file, named in a failure's message
        self._explain = explain  # a better message for some failures (None: the usual one)
        self._thread = WriterThread()
        self.pending: str | None = None  # the path the write in flight is making
        self._error: BaseException | None = None

    def submit(self, path: str, write: Callable[[], None]) -> None:
        self.pending = path
        self._thread.submit(self._run, write)

    def _run(self, write: Callable[[], None]) -> None:
        try:
            write()
        except BaseException as error:  # kept for wait() to raise on the training thread
            self._error = error

    def wait(self, *, raise_error: bool = True) -> None:
        if self.pending is None:
            return
        self._thread.join()
        error, path = self._error, self.pending
        self._error = self.pending = None
        if error is None:
            return
        message = self._explain(error) or (
            f"writing checkpoint {path!r} failed ({type(error).__name__}: "
            f"{first_line(error)}); the checkpoints listed in {self._index!r} are intact."
        )
        if not raise_error:
            logger.error("tfloop: %s", message)
            return
        raise CheckpointError(message) from error
