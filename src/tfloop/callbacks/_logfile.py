"""An append-only file of whole lines that a resumed run can roll back to a saved offset."""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

__all__ = ["LogFile"]


class LogFile:
    """Writes whole lines, flushed one by one, and remembers the byte offset after the last.

    The file is opened lazily, at the first write, so that a checkpoint restored at the start of
    ``fit`` (:meth:`roll_back_to`) is known by then. Opening:

    - after :meth:`roll_back_to` (a resume): cut the file back to the saved offset, so the
      records the resumed run writes again are not duplicated, then append;
    - ``append=False`` and first open by this object: start an empty file;
    - otherwise append, dropping a partial last line a killed process may have left.

    Examples:
        >>> import tempfile, os
        >>> log = LogFile(os.path.join(tempfile.mkdtemp(), "run.log"), append=False)
        >>> log.write("one\\n")
        >>> saved = log.offset
        >>> log.write("two\\n")
        >>> log.close()
        >>> log.roll_back_to(saved)
        >>> log.write("three\\n")
        >>> open(log.path).read().split()
        ['one', 'three']
    """

    def __init__(self, path: str | os.PathLike[str], append: bool) -> None:
        self.path = Path(path)
        self.append = append
        self.offset = 0
        self._file: BinaryIO | None = None
        self._opened_before = False
        self._roll_back: int | None = None

    def open(self) -> None:
        if self._file is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._roll_back is not None:
            self._truncate(self._roll_back)
        elif not self.append and not self._opened_before:
            self._truncate(0)
        else:
            self._truncate(self._complete_size())
        self._roll_back = None
        self._opened_before = True
        self._file = open(self.path, "ab")  # noqa: SIM115 - kept open across events
        self.offset = self._file.tell()

    def write(self, text: str) -> None:
        """Appends ``text`` (whole lines) in one write and flushes it."""
        self.open()
        assert self._file is not None
        self._file.write(text.encode("utf-8"))
        self._file.flush()
        self.offset = self._file.tell()

    def read(self) -> str:
        """The file's whole lines (a partial last line of a killed process left out)."""
        if not self.path.exists():
            return ""
        data = self.path.read_bytes()
        return data[: data.rfind(b"\n") + 1].decode("utf-8")

    def rewrite(self, text: str) -> None:
        """Replaces the file's content with ``text`` (whole lines), atomically: a reader sees
        the old file or the new one, never a mix. Appending goes on after it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        was_open = self._file is not None
        self.close()
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_bytes(text.encode("utf-8"))
        os.replace(temporary, self.path)
        self._roll_back = None
        self._opened_before = True
        if was_open:
            self.open()
        else:
            self.offset = len(text.encode("utf-8"))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def roll_back_to(self, offset: int) -> None:
        """Makes the next open cut the file back to ``offset`` bytes (a resumed run)."""
        self.close()
        self._roll_back = int(offset)
        self.offset = int(offset)

    def _complete_size(self) -> int:
        """The size up to and including the last newline (0 for a missing file)."""
        if not self.path.exists():
            return 0
        data = self.path.read_bytes()
        return data.rfind(b"\n") + 1

    def _truncate(self, size: int) -> None:
        if not self.path.exists():
            self.path.touch()
        if self.path.stat().st_size > size:
            with open(self.path, "r+b") as file:
                file.truncate(size)
