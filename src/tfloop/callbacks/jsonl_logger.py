"""JSONLLogger: one JSON object per line, per epoch (and per n steps), safe to resume."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from tfloop import _validate
from tfloop._cadence import EveryNSteps
from tfloop._logs import COUNTERS, STEP, without
from tfloop.callbacks._common import finite_or_none
from tfloop.callbacks._logfile import LogFile
from tfloop.callbacks.base import Callback, Logs, update_count

__all__ = ["JSONLLogger"]


class JSONLLogger(Callback):
    """Writes the run's logs to ``path`` as JSON Lines: one object per record.

    Records (``"event"`` says which; every record has ``"time"``, Unix seconds):

    - ``{"event": "epoch", "epoch": 0, "step": 100, "loss": ..., "val_loss": ...}`` after
      each epoch;
    - ``{"event": "step", "epoch": 0, "step": 64, "batch": 63, "loss": ...}`` when
      ``every_n_steps`` is set: at the end of the first execution that reaches each multiple
      of ``every_n_steps`` updates, so under ``steps_per_execution=K`` ``step`` may be past the
      multiple (by less than K); the values are the running epoch metrics;
    - ``{"event": "validation", "epoch": 0, "step": 500, "val_loss": ...}`` after each
      validation of ``fit(validation_every_n_steps=n)``, at exactly that update count;
    - ``{"event": "evaluate", "step": ..., "loss": ...}`` after ``evaluate`` outside ``fit``
      (``step``: the optimizer's update count, so a sidecar job running
      ``tfloop.evaluate_checkpoints`` logs each checkpoint at its step).

    NaN and Inf are written as ``null`` (strict JSON). Each record is one ``write`` followed by
    a flush, so a killed process leaves at most a partial last line, which the next open drops.
    ``state_dict()`` holds the byte offset after the last record; a run resumed from a
    checkpoint cuts the file back to it, so no record appears twice.
    ``History.from_jsonl(path)`` reads the epoch records back (``tfloop plot`` draws them).

    Args:
        path: the file, local or a URL (``gs://...``; on an object store the file is written
            again whole at each record, see ``docs/cloud-storage.md``); parent directories are
            created, and proved writable when ``fit`` starts.
        every_n_steps: also write a step record every this many updates (``None``: epochs only).
        append: keep an existing file's records (otherwise the first write starts it afresh).

    Examples:
        >>> import json, os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "run.jsonl")
        >>> logger = JSONLLogger(path)
        >>> logger.on_epoch_end(0, {"loss": 0.5})
        >>> logger.on_fit_end({})
        >>> record = json.loads(open(path).readline())
        >>> record["event"], record["epoch"], record["loss"]
        ('epoch', 0, 0.5)
    """

    chief_only = True  # one file for the cluster

    def __init__(
        self,
        path: str | os.PathLike[str],
        every_n_steps: int | None = None,
        append: bool = False,
    ) -> None:
        self.every_n_steps = _validate.optional_count(
            every_n_steps, "every_n_steps", owner="JSONLLogger"
        )
        self._every = EveryNSteps(self.every_n_steps) if self.every_n_steps else None
        self._file = LogFile(path, append=append, argument="JSONLLogger path")
        self._epoch = 0
        self._last_step: int | None = None

    @property
    def path(self) -> str:
        return self._file.path

    def on_fit_start(self, logs: Logs) -> None:
        self._file.check_writable(f"JSONLLogger path {self.path!r}")
        self._last_step = self._current_step(0)

    def on_epoch_start(self, epoch: int, logs: Logs) -> None:
        self._epoch = epoch

    def on_train_batch_end(self, batch: int, logs: Logs) -> None:
        if self._every is None:
            return
        step = int(logs.get("step", 0))
        if self._every.crossed(self._last_step or 0, step):
            record = {"event": "step", "epoch": self._epoch, "batch": batch}
            self._write({**record, **without(logs, COUNTERS)}, step)
        self._last_step = step

    def on_epoch_end(self, epoch: int, logs: Logs) -> None:
        self._write({"event": "epoch", "epoch": epoch, **logs}, self._current_step(0))

    def on_eval_end(self, logs: Logs) -> None:
        if self.trainer is None:
            return
        info = self.trainer.run_info
        if not info.in_fit:
            self._write({"event": "evaluate", **logs}, self._current_step(0))
            self._file.close()
        elif info.step_validation:
            values = {f"val_{name}": value for name, value in without(logs, COUNTERS).items()}
            self._write({"event": "validation", "epoch": info.epoch, **values}, int(logs[STEP]))

    def on_fit_end(self, logs: Logs) -> None:
        self._last_step = None
        self._file.close()

    def _current_step(self, default: int) -> int:
        if self.trainer is not None:
            return update_count(self.trainer)
        return default

    def _write(self, record: dict[str, Any], step: int) -> None:
        record = {**record, "step": step, "time": time.time()}
        values = {
            name: finite_or_none(value) if isinstance(value, float) else value
            for name, value in record.items()
        }
        self._file.write(json.dumps(values, allow_nan=False) + "\n")

    def state_dict(self) -> dict[str, Any]:
        return {"offset": self._file.offset}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._file.roll_back_to(int(state["offset"]))
