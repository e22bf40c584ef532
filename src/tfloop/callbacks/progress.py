"""ProgressBar: a live bar on a terminal, plain periodic lines elsewhere (CI logs)."""

from __future__ import annotations

import sys
import time
from typing import IO, Any

from tqdm.auto import tqdm

from tfloop._logs import COUNTERS, format_logs, without
from tfloop.callbacks.base import Callback, Logs

__all__ = ["ProgressBar"]


class ProgressBar(Callback):
    """Shows training progress: rate, ETA, the share of time spent waiting for input, metrics.

    On a terminal it draws a tqdm bar updated once per compiled execution. When the output is
    not a terminal (CI, a log file) it writes plain lines with no control codes: one every
    ``interval`` seconds during an epoch, and one at the end of each epoch.

    ``input wait`` is the share of the epoch's time so far that the loop waited for its input
    (``RunInfo.input_seconds``): near 100% the loop is input-bound (see the ``Throughput``
    callback for what helps).

    ``fit(verbose=1)`` (the default) adds one; ``verbose=0`` turns it off.

    Examples:
        >>> import io
        >>> out = io.StringIO()
        >>> bar = ProgressBar(stream=out)
        >>> bar.on_epoch_start(0, {})
        >>> bar.on_epoch_end(0, {"loss": 0.25})
        >>> "loss: 0.2500" in out.getvalue() and "\\r" not in out.getvalue()
        True
    """

    def __init__(self, stream: IO[str] | None = None, interval: float = 10.0) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.interval = interval
        self._bar: Any = None
        self._epochs: int | None = None
        self._start = 0.0
        self._last_line = 0.0

    @property
    def live(self) -> bool:
        isatty = getattr(self.stream, "isatty", None)
        return bool(isatty and isatty())

    def _steps(self) -> int | None:
        return self.trainer.run_info.steps_per_epoch if self.trainer else None

    def _input_wait(self, elapsed: float) -> str:
        run_info = getattr(self.trainer, "run_info", None)
        seconds = float(getattr(run_info, "input_seconds", 0.0))
        return f"input wait {min(100.0, 100.0 * seconds / max(elapsed, 1e-9)):.0f}%"

    def on_fit_start(self, logs: Logs) -> None:
        self._epochs = self.trainer.run_info.epochs if self.trainer else None

    def on_epoch_start(self, epoch: int, logs: Logs) -> None:
        self._start = self._last_line = time.perf_counter()
        self._epoch = epoch
        label = f"epoch {epoch + 1}" + (f"/{self._epochs}" if self._epochs else "")
        self._label = label
        if self.live:
            self._bar = tqdm(
                total=self._steps(), desc=label, unit="step", file=self.stream, leave=True
            )

    def on_train_batch_end(self, batch: int, logs: Logs) -> None:
        now = time.perf_counter()
        if self._bar is not None:
            self._bar.update(batch + 1 - self._bar.n)
            postfix = f"{self._input_wait(now - self._start)} - {format_logs(logs)}"
            self._bar.set_postfix_str(postfix, refresh=False)
            return
        if now - self._last_line >= self.interval:
            self._last_line = now
            total = self._steps()
            where = f"{batch + 1}/{total}" if total else f"{batch + 1}"
            rate = (batch + 1) / max(now - self._start, 1e-9)
            wait = self._input_wait(now - self._start)
            self._write(
                f"{self._label} - step {where} - {rate:.0f} steps/s - {wait} - {format_logs(logs)}"
            )

    def on_epoch_end(self, epoch: int, logs: Logs) -> None:
        elapsed = time.perf_counter() - self._start
        wait = self._input_wait(elapsed)
        if self._bar is not None:
            self._bar.set_postfix_str(f"{wait} - {format_logs(logs)}", refresh=True)
            self._bar.close()
            self._bar = None
            return
        label = getattr(self, "_label", f"epoch {epoch + 1}")
        self._write(f"{label} - {elapsed:.1f}s - {wait} - {format_logs(logs)}")

    def on_eval_end(self, logs: Logs) -> None:
        info = None if self.trainer is None else self.trainer.run_info
        if info is not None and info.in_fit:
            if info.step_validation:  # an epoch's validation is part of the epoch line
                values = {f"val_{k}": v for k, v in without(logs, COUNTERS).items()}
                line = f"validation at step {int(logs['step'])} - {format_logs(values)}"
                if self._bar is not None:
                    self._bar.write(line, file=self.stream)
                else:
                    self._write(line)
            return
        self._write(f"evaluate - {format_logs(logs)}")

    def _write(self, line: str) -> None:
        print(line, file=self.stream, flush=True)
