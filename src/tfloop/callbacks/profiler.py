"""Profiler: trace chosen compiled executions with the TensorFlow profiler."""

from __future__ import annotations

import logging
import os
from typing import Any

from tfloop import _validate
from tfloop.callbacks.base import Callback, Logs
from tfloop.errors import ConfigError
from tfloop.io import checks

__all__ = ["Profiler"]

logger = logging.getLogger("tfloop")


class Profiler(Callback):
    """Traces compiled executions ``executions[0]`` to ``executions[1]`` of each ``fit``.

    Executions are counted from 1, across epochs, as ``on_train_batch_end`` sees them: the
    default ``(2, 3)`` skips the first, which traces and compiles the loop, and records two
    steady ones. The trace starts at the end of execution ``executions[0] - 1`` (at the start
    of ``fit`` for 1) and stops at the end of ``executions[1]`` (or when ``fit`` ends), so it
    also holds what the host does between them (callbacks, a save, a validation).

    The TensorFlow profiler writes ``log_dir/plugins/profile/<run>/<host>.xplane.pb``, read by
    TensorBoard's Profile tab (``pip install tensorboard-plugin-profile``, then
    ``tensorboard --logdir log_dir``). Each execution is marked as a step named ``train``
    numbered by the update count it started at, so the Overview page's "step time" is the
    time of one execution: ``steps_per_execution`` steps. ``docs/training-control.md`` says how to
    read a superbatch execution in the Trace Viewer.

    Args:
        log_dir: where the trace goes (the ``log_dir`` of a ``TensorBoard`` callback works),
            local or a URL; proved writable when ``fit`` starts.
        executions: ``(first, last)``, 1-based and inclusive, or one int for one execution.

    Examples:
        >>> import tempfile
        >>> Profiler(tempfile.mkdtemp(), executions=(3, 4)).executions
        (3, 4)
    """

    chief_only = True  # one file for the cluster

    def __init__(
        self, log_dir: str | os.PathLike[str], executions: int | tuple[int, int] = (2, 3)
    ) -> None:
        self.log_dir = checks.check_scheme(log_dir, "Profiler log_dir")
        self.executions = _executions(executions)
        self.traced: list[int] = []  # the executions of the last fit that were traced
        self._count = 0
        self._tracing = False

    def on_fit_start(self, logs: Logs) -> None:
        checks.check_writable(self.log_dir, "Profiler log_dir")
        self._count = 0
        self.traced = []
        if self.executions[0] == 1:
            self._start()

    def on_train_batch_end(self, batch: int, logs: Logs) -> None:
        self._count += 1
        if self._tracing:
            self.traced.append(self._count)
        if self._count == self.executions[1]:
            self._stop()
        elif self._count == self.executions[0] - 1:
            self._start()

    def on_fit_end(self, logs: Logs) -> None:
        self._stop()

    def _start(self) -> None:
        import tensorflow as tf

        try:
            tf.profiler.experimental.start(self.log_dir)
        except Exception as error:  # another profiler is running: trace nothing, train on
            logger.warning(
                "tfloop: Profiler could not start the TensorFlow profiler (%s); no trace.",
                _validate.first_line(error),
            )
            return
        self._tracing = True

    def _stop(self) -> None:
        import tensorflow as tf

        if self._tracing:
            self._tracing = False
            tf.profiler.experimental.stop()


def _executions(value: Any) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        and 1 <= value[0] <= value[1]
    ):
        return int(value[0]), int(value[1])
    raise ConfigError(
        f"Profiler: executions must be (first, last) with 1 <= first <= last, or one int >= 1 "
        f"(executions are counted from 1), got {value!r}."
    )
