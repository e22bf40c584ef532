"""An append-only file of whole lines that a resumed run can roll back to a saved offset."""

from __future__ import annotations

import os
from typing import Any

from tfloop.io import checks, files

__all__ = ["LogFile"]


class LogFile:
    """Writes whole lines, flushed one by one, and remembers the byte offset after the last.

    The file is opened lazily, at the first write, so that a checkpoint restored at the start of
    ``fit`` (:meth:`roll_back_to`) is known by then. Opening:

    - after :meth:`roll_back_to` (a resume): cut the file back to the saved offset, so the
      records the resumed run writes again are not duplicated, then append;
    - ``append=False`` and first open by this object: start an empty file;
    - otherwise append, dropping a partial last line a killed process may have left.

    ``path`` may be a URL (``tfloop.io.files``). Local and ``ram://`` files are appended to in
    place. An object (``gs://``, ``s3://``) cannot be appended to: the lines are kept in memory
    and the whole object is written again at each flush, so a reader always sees whole lines
    (each write of an object replaces it in one piece).

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

    def __init__(self, path: str | os.PathLike[str], append: bool, argument: str = "path") -> None:
        self.path = checks.check_scheme(path, argument)
        self.append = append
        self.offset = 0
        self._file: Any = None  # a GFile appending in place, or None
        self._lines: bytearray | None = None  # everything written, where objects are rewritten
        self._opened_before = False
        self._roll_back: int | None = None

    def check_writable(self, argument: str) -> None:
        """Creates the file's directory and proves it writable (at the start of ``fit``)."""
        checks.check_writable(files.split(self.path)[0], f"{argument}: its directory")

    def open(self) -> None:
        if self._file is not None or self._lines is not None:
            return
        files.makedirs(files.split(self.path)[0])
        if self._roll_back is None and not self.append and not self._opened_before:
            kept = b""  # a new file
            files.publish(self.path, kept)
        else:
            data = files.read_bytes(self.path) if files.exists(self.path) else b""
            keep = data.rfind(b"\n") + 1 if self._roll_back is None else self._roll_back
            kept = data[:keep]
            if len(kept) != len(data) or not data:
                files.publish(self.path, kept)  # cut back (and made, if missing)
        self._roll_back = None
        self._opened_before = True
        if files.appends_in_place(self.path):
            self._file = files.open(self.path, "ab")
        else:
            self._lines = bytearray(kept)
        self.offset = len(kept)

    def write(self, text: str) -> None:
        """Appends ``text`` (whole lines) in one write and flushes it."""
        self.open()
        data = text.encode("utf-8")
        if self._file is not None:
            self._file.write(data)
            self._file.flush()
        else:
            assert self._lines is not None
            self._lines += data
            files.publish(self.path, bytes(self._lines))
        self.offset += len(data)

    def read(self) -> str:
        """The file's whole lines (a partial last line of a killed process left out)."""
        if not files.exists(self.path):
            return ""
        data = files.read_bytes(self.path)
        return data[: data.rfind(b"\n") + 1].decode("utf-8")

    def rewrite(self, text: str) -> None:
        """Replaces the file's content with ``text`` (whole lines), atomically: a reader sees
        the old file or the new one, never a mix. Appending goes on after it."""
        files.makedirs(files.split(self.path)[0])
        was_open = self._file is not None or self._lines is not None
        self.close()
        files.publish(self.path, text)
        self._roll_back = None
        self._opened_before = True
        if was_open:
            self.open()
        else:
            self.offset = len(text.encode("utf-8"))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = self._lines = None

    def roll_back_to(self, offset: int) -> None:
        """Makes the next open cut the file back to ``offset`` bytes (a resumed run)."""
        self.close()
        self._roll_back = int(offset)
        self.offset = int(offset)
