"""CSVLogger: one CSV row per epoch, as Keras's, with columns that may grow and safe resume."""

from __future__ import annotations

import csv
import io
import os
from typing import Any

from tfloop._logs import COUNTERS, STEP, without
from tfloop.callbacks._logfile import LogFile
from tfloop.callbacks.base import Callback, Logs, update_count
from tfloop.errors import ConfigError

__all__ = ["CSVLogger"]


class CSVLogger(Callback):
    """Writes each epoch's logs as a row of ``filename``: ``epoch`` then the log keys, sorted.

    A key that appears after the first row (``val_*`` with ``validation_freq > 1``, a value a
    later callback adds) becomes a new column: the file is rewritten, atomically, with the
    wider header, and earlier rows get an empty cell there. Rows are flushed as written.
    ``state_dict()`` holds the columns and the number of rows, so a run resumed from a
    checkpoint cuts the file back to the rows that checkpoint had seen, and no epoch appears
    twice.

    With ``fit(validation_every_n_steps=n)`` every row also has ``step`` (the update count),
    and each such validation adds a row of its own: ``epoch`` (the epoch it fell in), ``step``
    and the ``val_*`` values, the training columns empty.

    Args:
        filename: the CSV file, local or a URL (``gs://...``; see ``LogFile`` for object
            stores); parent directories are created, and proved writable when ``fit`` starts.
        separator: the field separator (one character).
        append: keep an existing file's rows (otherwise the first write starts it afresh).

    Examples:
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "log.csv")
        >>> logger = CSVLogger(path)
        >>> logger.on_epoch_end(0, {"loss": 0.5})
        >>> logger.on_epoch_end(1, {"loss": 0.25, "val_loss": 0.75})
        >>> logger.on_fit_end({})
        >>> print(open(path).read().strip())
        epoch,loss,val_loss
        0,0.5,
        1,0.25,0.75
    """

    chief_only = True  # one file for the cluster

    def __init__(
        self, filename: str | os.PathLike[str], separator: str = ",", append: bool = False
    ) -> None:
        if not isinstance(separator, str) or len(separator) != 1:
            raise ConfigError(f"CSVLogger: separator must be one character, got {separator!r}.")
        self.separator = separator
        self.append = append
        self.columns: list[str] = []
        self.rows = 0
        self._file = LogFile(filename, append=append, argument="CSVLogger filename")
        self._started = False
        self._roll_back: dict[str, Any] | None = None

    @property
    def filename(self) -> str:
        return self._file.path

    def on_fit_start(self, logs: Logs) -> None:
        self._file.check_writable(f"CSVLogger filename {self.filename!r}")

    def on_epoch_end(self, epoch: int, logs: Logs) -> None:
        info = None if self.trainer is None else self.trainer.run_info
        if info is not None and info.validation_every_n_steps is not None:
            logs = {STEP: update_count(self.trainer), **logs}
        self._row(epoch, logs)

    def on_eval_end(self, logs: Logs) -> None:
        info = None if self.trainer is None else self.trainer.run_info
        if info is not None and info.in_fit and info.step_validation:
            values = {f"val_{name}": value for name, value in without(logs, COUNTERS).items()}
            self._row(info.epoch, {STEP: int(logs[STEP]), **values})

    def _row(self, epoch: int, logs: dict[str, Any]) -> None:
        self._start()
        new = [name for name in sorted(logs) if name not in self.columns]
        if new or not self.columns:
            self._rewrite((self.columns or ["epoch"]) + new, self._read_rows())
        row = {"epoch": str(epoch), **{name: _cell(value) for name, value in logs.items()}}
        self._file.write(self._encode([[row.get(name, "") for name in self.columns]]))
        self.rows += 1

    def on_fit_end(self, logs: Logs) -> None:
        self._file.close()

    def state_dict(self) -> dict[str, Any]:
        return {"columns": list(self.columns), "rows": self.rows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._file.close()
        self._roll_back = {"columns": list(state["columns"]), "rows": int(state["rows"])}

    # ------------------------------------------------------------------------ the file

    def _start(self) -> None:
        """At the first row of a fit: cut a resumed run's file back to its checkpoint's rows;
        else start afresh, or keep what is there (``append``), dropping a partial last line."""
        if self._roll_back is not None:
            rows = self._read_rows()[: self._roll_back["rows"]]
            self._rewrite(self._roll_back["columns"] or self.columns, rows)
        elif not self._started:
            lines = self._lines() if self.append else []
            self._rewrite(lines[0] if lines else [], self._read_rows() if lines else [])
        self._roll_back = None
        self._started = True

    def _lines(self) -> list[list[str]]:
        return list(csv.reader(io.StringIO(self._file.read()), delimiter=self.separator))

    def _read_rows(self) -> list[dict[str, str]]:
        lines = self._lines()
        if not lines:
            return []
        header = lines[0]
        return [dict(zip(header, line, strict=False)) for line in lines[1:]]

    def _rewrite(self, columns: list[str], rows: list[dict[str, str]]) -> None:
        lines = ([columns] if columns else []) + [
            [row.get(name, "") for name in columns] for row in rows
        ]
        self._file.rewrite(self._encode(lines))
        self.columns, self.rows = list(columns), len(rows)

    def _encode(self, lines: list[list[str]]) -> str:
        buffer = io.StringIO()
        writer = csv.writer(buffer, delimiter=self.separator, lineterminator="\n")
        writer.writerows(lines)
        return buffer.getvalue()


def _cell(value: Any) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)
