"""Whether tfloop may use a path: before training, not after an hour of it.

:func:`check_scheme` when an object is made (no I/O: TensorFlow's registry of filesystems);
:func:`check_writable` when ``fit`` starts (a probe file written and removed, so a missing
bucket, a permission or missing credentials show then).

Examples:
    >>> from tfloop.io import checks
    >>> checks.check_scheme("gs://bucket/run", "Checkpointer directory")
    'gs://bucket/run'
    >>> checks.check_scheme("gss://bucket/run", "Checkpointer directory")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    tfloop.errors.ConfigError: ... no filesystem for gss://; check the spelling (TensorFlow has ...
    >>> checks.check_writable("ram://probe/run", "Checkpointer directory")
"""

from __future__ import annotations

import os
import uuid
from typing import Any

import tensorflow as tf

from tfloop.errors import ConfigError
from tfloop.io import files

__all__ = ["check_scheme", "check_writable"]

# Schemes that tensorflow-io registers when it is imported.
_TENSORFLOW_IO = ("s3", "hdfs", "viewfs", "har", "az", "http", "https", "oss")
_GCS_CREDENTIALS = (
    "on Google Cloud the machine's service account; elsewhere GOOGLE_APPLICATION_CREDENTIALS "
    "or gcloud auth application-default login"
)


def check_scheme(path: Any, argument: str) -> str:
    """``path`` as a string; a ConfigError naming ``argument`` if it is not a path, or if
    TensorFlow has no filesystem for its scheme (asked of TensorFlow's registry: no I/O)."""
    if not isinstance(path, (str, os.PathLike)) or not isinstance(os.fspath(path), str):
        raise ConfigError(f"{argument} must be a path (a str or os.PathLike), got {path!r}.")
    text, registered = os.fspath(path), tf.io.gfile.get_registered_schemes()
    name = files.scheme(text)
    if name and name not in registered:
        known = ", ".join(f"{s}://" for s in sorted(registered) if s not in ("", "file"))
        fix = (
            f"pip install tensorflow-io and import tensorflow_io before using the path: it "
            f"adds TensorFlow's {name}:// filesystem"
            if name in _TENSORFLOW_IO
            else f"check the spelling (TensorFlow has {known} and local paths)"
        )
        raise ConfigError(
            f"{argument} {text!r}: TensorFlow has no filesystem for {name}://; {fix}."
        )
    return text


def check_writable(
    directory: files.PathLike, argument: str, error: type[Exception] = ConfigError, fix: str = ""
) -> None:
    """Creates ``directory``, then writes and removes a small file in it: a permission or
    credentials problem is ``error`` (naming ``argument``) now, not at the first save."""
    text = os.fspath(directory)
    probe = files.join(text, f".tfloop-write-test-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        files.makedirs(text)
        files.write(probe, b"ok")
        files.remove(probe)
    except OSError as cause:
        where = "pass a directory you can write to"
        if files.scheme(text) not in ("", "file"):
            where = "check that the path exists and that this job's credentials may write there"
        if files.scheme(text) == "gs":
            where += f" ({_GCS_CREDENTIALS})"
        detail = str(cause).partition("\n")[0]
        raise error(f"{argument} {text!r} is not writable ({detail}); {where}{fix}.") from cause
