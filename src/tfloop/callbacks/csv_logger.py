"""CSVLogger: one CSV row per epoch, as Keras's, with columns that may grow and safe resume."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any, BinaryIO

from tfloop.callbacks.base import Callback, Logs
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

    Args:
        filename: the CSV file; parent directories are created.
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

    def __init__(
        self, filename: str | os.PathLike[str], separator: str = ",", append: bool = False
    ) -> None:
        if not isinstance(separator, str) or len(separator) != 1:
            raise ConfigError(f"CSVLogger: separator must be one character, got {separator!r}.")
        self.filename = Path(filename)
        self.separator = separator
        self.append = append
        self.columns: list[str] = []
        self.rows = 0
        self._file: BinaryIO | None = None
        self._opened_before = False
        self._roll_back: dict[str, Any] | None = None

    def on_epoch_end(self, epoch: int, logs: Logs) -> None:
        self._open()
        new = [name for name in sorted(logs) if name not in self.columns]
        if new or not self.columns:
            self._rewrite((self.columns or ["epoch"]) + new, self._read_rows())
        row = {"epoch": str(epoch), **{name: _cell(value) for name, value in logs.items()}}
        self._write_lines([[row.get(name, "") for name in self.columns]])
        self.rows += 1

    def on_fit_end(self, logs: Logs) -> None:
        self._close()

    def state_dict(self) -> dict[str, Any]:
        return {"columns": list(self.columns), "rows": self.rows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._close()
        self._roll_back = {"columns": list(state["columns"]), "rows": int(state["rows"])}

    # ------------------------------------------------------------------------ the file

    def _open(self) -> None:
        if self._file is not None:
            return
        self.filename.parent.mkdir(parents=True, exist_ok=True)
        if self._roll_back is not None:
            rows = self._read_rows()[: self._roll_back["rows"]]
            self._rewrite(self._roll_back["columns"] or self.columns, rows)
        elif not self.append and not self._opened_before:
            self._rewrite([], [])
        else:
            # Rewriting what is there also drops a partial last line of a killed run.
            self._rewrite(self._read_header(), self._read_rows())
        self._roll_back = None
        self._opened_before = True
        self._file = open(self.filename, "ab")  # noqa: SIM115 - kept open across epochs

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _complete_lines(self) -> list[list[str]]:
        if not self.filename.exists():
            return []
        text = self.filename.read_text(encoding="utf-8")
        text = text[: text.rfind("\n") + 1]
        return list(csv.reader(io.StringIO(text), delimiter=self.separator))

    def _read_header(self) -> list[str]:
        lines = self._complete_lines()
        return lines[0] if lines else []

    def _read_rows(self) -> list[dict[str, str]]:
        lines = self._complete_lines()
        if not lines:
            return []
        header = lines[0]
        return [dict(zip(header, line, strict=False)) for line in lines[1:]]

    def _rewrite(self, columns: list[str], rows: list[dict[str, str]]) -> None:
        was_open = self._file is not None
        self._close()
        temporary = self.filename.with_name(self.filename.name + ".tmp")
        with open(temporary, "wb") as file:
            lines = ([columns] if columns else []) + [
                [row.get(name, "") for name in columns] for row in rows
            ]
            file.write(self._encode(lines))
        os.replace(temporary, self.filename)
        self.columns, self.rows = list(columns), len(rows)
        if was_open:
            self._file = open(self.filename, "ab")  # noqa: SIM115

    def _write_lines(self, lines: list[list[str]]) -> None:
        assert self._file is not None
        self._file.write(self._encode(lines))
        self._file.flush()

    def _encode(self, lines: list[list[str]]) -> bytes:
        buffer = io.StringIO()
        writer = csv.writer(buffer, delimiter=self.separator, lineterminator="\n")
        writer.writerows(lines)
        return buffer.getvalue().encode("utf-8")


def _cell(value: Any) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)
