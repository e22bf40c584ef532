"""Finished ``tf.data`` iterators are released on a background thread.

Releasing an exhausted iterator (the last reference to its resource) on the training thread
blocked that thread for up to 2 s at some epoch ends, with the CPU idle, whenever other
processes kept the machine busy; the same release on another thread took 1-4 ms (mlp-ds
benchmark workload, 2 shared cores, 10 interleaved epochs: 5 of 10 epoch ends stalled 0.7-1.9 s
on the training thread, none on a background one). So a stream that goes away hands its
iterator here, and the next epoch starts at once.
"""

from __future__ import annotations

import atexit
import queue
import sys
import threading
from typing import Any

__all__ = ["release_later"]

IDLE_SECONDS = 1.0
_pending: queue.Queue[Any] = queue.Queue()
_lock = threading.Lock()
_alive = False
_exiting = False


@atexit.register
def _at_exit() -> None:
    global _exiting
    _exiting = True


def release_later(*objects: Any) -> None:
    """Drops ``objects`` on the background thread (started when needed, ended when idle).

    At interpreter exit they are dropped here: a thread started then never runs, and
    ``Thread.start`` would wait for it forever (a process ending on an error hung so).
    """
    global _alive
    if _exiting or sys.is_finalizing():
        return
    with _lock:
        _pending.put(objects)
        if not _alive:
            _alive = True
            threading.Thread(target=_run, name="tfloop-iterator-release", daemon=True).start()


def _run() -> None:
    global _alive
    while True:
        try:
            objects = _pending.get(timeout=IDLE_SECONDS)
        except queue.Empty:
            with _lock:
                if _pending.empty():
                    _alive = False
                    return
            continue
        del objects
