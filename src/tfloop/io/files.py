"""Every file tfloop reads or writes goes through here, on ``tf.io.gfile``.

A path is a ``str`` or ``os.PathLike``: local (relative to the working directory, ``~`` not
expanded) or a URL of a filesystem TensorFlow has (``gs://``, ``ram://``; ``s3://``, ``hdfs://``
with tensorflow-io). A URL stays a URL: paths are joined and split here as strings, never with
pathlib (which turns ``ram://ck`` into ``ram:/ck``). Failures are ``OSError``, as for local files.

Whether a path may be used (its scheme, a probe write) is ``checks.py``. What is atomic where
(the table: ``docs/cloud-storage.md``): :func:`publish` replaces a file so
that a reader sees the old one or the new one (a temporary file renamed where renames are
atomic; on an object store one object written in one piece, which the store shows whole);
:func:`replace` moves a finished file or directory into place (a directory in two renames on
local disk; elsewhere object by object, its ``last`` names removed first and written last, as
a pointer is); an object cannot be appended to (:func:`appends_in_place`).

Examples:
    >>> from tfloop.io import files
    >>> directory = files.join("ram://doc", "run")
    >>> files.makedirs(directory)  # on ram://, only directories made so can be listed
    >>> files.publish(files.join(directory, "a.txt"), "one\\n")
    >>> directory, files.read_text(directory + "/a.txt"), files.listdir(directory)
    ('ram://doc/run', 'one\\n', ['a.txt'])
    >>> files.split("gs://bucket/run/a.txt"), files.scheme("gs://bucket/run")
    (('gs://bucket/run', 'a.txt'), 'gs')
    >>> files.rmtree("ram://doc")
    >>> files.exists(directory)
    False
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import uuid
from collections.abc import Callable, Collection
from typing import Any, ParamSpec, TypeVar

import tensorflow as tf
from tensorflow.python.lib.io import file_io

__all__ = [
    "PathLike", "appends_in_place", "atomic_rename", "exists", "glob", "isdir", "join", "listdir",
    "makedirs", "open", "publish", "read_bytes", "read_text", "remove", "replace", "rmtree",
    "scheme", "split", "write",
]  # fmt: skip

PathLike = str | os.PathLike[str]
_P = ParamSpec("_P")
_R = TypeVar("_R")

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_OS_ERRORS: dict[type[Exception], type[OSError]] = {
    tf.errors.NotFoundError: FileNotFoundError,
    tf.errors.PermissionDeniedError: PermissionError,
    tf.errors.AlreadyExistsError: FileExistsError,
}


def _os_errors(function: Callable[_P, _R]) -> Callable[_P, _R]:
    """Makes TensorFlow's errors of ``function`` the ``OSError`` a local file would raise."""

    @functools.wraps(function)
    def wrapped(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return function(*args, **kwargs)
        except tf.errors.OpError as error:
            raise _OS_ERRORS.get(type(error), OSError)(error.message) from error

    return wrapped


def scheme(path: PathLike) -> str:
    """The scheme of a URL (``"gs"`` for ``gs://b/x``); ``""`` for a local path."""
    match = _URL.match(os.fspath(path))
    return match.group()[:-3] if match else ""


def join(path: PathLike, *parts: str) -> str:
    """``path`` and ``parts`` joined with ``/`` (a URL stays a URL)."""
    return str(tf.io.gfile.join(os.fspath(path), *parts))


def split(path: PathLike) -> tuple[str, str]:
    """``(parent, name)`` of ``path``: ``("gs://b/run", "a.txt")``, ``("", "a.txt")``."""
    text = os.fspath(path)
    match = _URL.match(text)
    root = match.end() if match else int(text.startswith("/"))
    head, _, name = text[root:].rstrip("/").rpartition("/")
    return text[:root] + head, name


def atomic_rename(path: PathLike) -> bool:
    """Whether a rename on ``path``'s filesystem is atomic (False on object stores)."""
    return bool(file_io.has_atomic_move(os.fspath(path)))


def appends_in_place(path: PathLike) -> bool:
    """Whether a file there can be appended to (local disk, ``ram://``); an object cannot."""
    return scheme(path) in ("", "file", "ram")


@_os_errors
def exists(path: PathLike) -> bool:
    """Whether a file or directory ``path`` exists."""
    return bool(tf.io.gfile.exists(os.fspath(path)))


@_os_errors
def isdir(path: PathLike) -> bool:
    """Whether ``path`` is a directory (on ``ram://``: whether a file's name starts with it)."""
    return bool(tf.io.gfile.isdir(os.fspath(path)))


@_os_errors
def listdir(path: PathLike) -> list[str]:
    """The names in directory ``path`` (a subdirectory's without a trailing ``/``)."""
    return sorted(name.rstrip("/") for name in tf.io.gfile.listdir(os.fspath(path)))


@_os_errors
def glob(pattern: str) -> list[str]:
    """The paths matching ``pattern`` (``*``, ``?`` within a name), sorted."""
    return sorted(tf.io.gfile.glob(pattern))


@_os_errors
def makedirs(path: PathLike) -> None:
    """Creates directory ``path`` and its parents (nothing for ``""``, the working directory)."""
    if os.fspath(path):
        tf.io.gfile.makedirs(os.fspath(path))


def open(path: PathLike, mode: str = "rb") -> Any:
    """A ``tf.io.gfile.GFile`` (``"rb"``, ``"wb"``, ``"ab"``, or text ``"r"``, ``"w"``,
    ``"a"``); its reads and writes raise ``tf.errors.OpError``."""
    return tf.io.gfile.GFile(os.fspath(path), mode)


@_os_errors
def read_bytes(path: PathLike) -> bytes:
    """The content of file ``path``."""
    with tf.io.gfile.GFile(os.fspath(path), "rb") as file:
        return bytes(file.read())


def read_text(path: PathLike) -> str:
    """The content of file ``path``, decoded as UTF-8."""
    return read_bytes(path).decode("utf-8")


@_os_errors
def write(path: PathLike, data: bytes) -> None:
    """Writes file ``path`` (not atomically: see :func:`publish`)."""
    path = os.fspath(path)
    if scheme(path) == "ram":
        remove(path)  # ram:// writes over a file without truncating it
    with tf.io.gfile.GFile(path, "wb") as file:
        file.write(data)


def publish(path: PathLike, data: bytes | str) -> None:
    """Replaces file ``path`` by ``data``; a reader sees the old file or the new one."""
    text = os.fspath(path)
    data = data.encode("utf-8") if isinstance(data, str) else data
    if not atomic_rename(text):
        write(text, data)  # one object, written in one piece: shown once complete
        return
    temporary = f"{text}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        write(temporary, data)
        _rename(temporary, text)
    except BaseException:
        remove(temporary)
        raise


@_os_errors
def _rename(source: str, destination: str) -> None:
    tf.io.gfile.rename(source, destination, overwrite=True)


def replace(source: PathLike, destination: PathLike, last: Collection[str] = ()) -> None:
    """Moves the finished file or directory ``source`` to ``destination`` (see the module's
    docstring for what is atomic where); ``last``: names in a directory written last."""
    source, destination = os.fspath(source), os.fspath(destination)
    if not isdir(source):
        _rename(source, destination)
    elif atomic_rename(destination) and scheme(destination) != "ram":  # ram:// renames files only
        old = None
        if exists(destination):
            parent, name = split(destination)
            old = join(parent, f".{name}.old-{uuid.uuid4().hex[:8]}")
            _rename(destination, old)
        _rename(source, destination)
        if old is not None:
            rmtree(old)
    else:
        for name in last:  # the old directory stops looking complete first
            remove(join(destination, name))
        rmtree(destination)
        names = [
            join(directory[len(source) :].lstrip("/"), name) if directory != source else name
            for directory, _, names in tf.io.gfile.walk(source)
            for name in names
        ]
        for name in sorted(names, key=lambda name: name in last):
            makedirs(split(join(destination, name))[0])
            _rename(join(source, name), join(destination, name))
        rmtree(source)


@_os_errors
def remove(path: PathLike) -> None:
    """Deletes file ``path``; nothing if it does not exist."""
    with contextlib.suppress(tf.errors.NotFoundError):
        tf.io.gfile.remove(os.fspath(path))


@_os_errors
def rmtree(path: PathLike) -> None:
    """Deletes directory ``path`` and its content (a symbolic link: the link only); nothing
    if it does not exist."""
    text = os.fspath(path)
    if not scheme(text) and os.path.islink(text):
        os.remove(text)
    elif tf.io.gfile.exists(text):
        try:
            tf.io.gfile.rmtree(text)
        except tf.errors.NotFoundError:  # ram:// lists only the directories makedirs made
            for directory, _, names in list(tf.io.gfile.walk(text)):
                for name in names:
                    remove(join(directory, name))
