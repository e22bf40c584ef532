"""Exporting a model for inference without tfloop: a ``.keras`` file or a SavedModel.

Every export is atomic: it is written under a temporary name next to ``path`` and renamed into
place once complete, so a reader (a serving job, a copy) never sees a half-written export.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from typing import Any

import keras
import tensorflow as tf

from tfloop.errors import ConfigError

__all__ = ["export_model"]


def export_model(model: Any, path: str | os.PathLike[str]) -> str:
    """Saves ``model`` to ``path``, atomically; returns the path written.

    A path ending in ``.keras`` gets a Keras model file (``keras.models.load_model``); any
    other path a SavedModel directory (``tf.saved_model.load``), which a plain ``tf.Module``
    is always exported to. A file replaces the previous one in one rename; a directory takes
    two (the old one out of the way, the new one in), so for a moment ``path`` may be missing,
    but it is never half-written.

    Examples:
        >>> import os, tempfile, keras
        >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        >>> path = export_model(model, os.path.join(tempfile.mkdtemp(), "model.keras"))
        >>> sorted(os.listdir(os.path.dirname(path)))
        ['model.keras']
    """
    path = os.fspath(path).rstrip(os.sep) or os.fspath(path)
    keras_file = path.endswith(".keras")
    if keras_file and not isinstance(model, keras.Model):
        raise ConfigError(
            f"export path {path!r} asks for a .keras file, but the model is a "
            f"{type(model).__name__}, not a keras.Model; pass a directory path."
        )
    if keras_file and os.path.isdir(path):
        raise ConfigError(
            f"export path {path!r} is a directory, where a .keras file is asked for; pass "
            "another path, or remove the directory."
        )
    if not keras_file and os.path.lexists(path) and not os.path.isdir(path):
        raise ConfigError(
            f"export path {path!r} is an existing file, and a SavedModel is a directory; pass "
            "another path (or one ending in .keras for a Keras file), or remove the file."
        )
    parent, name = os.path.split(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    # Hidden, in the same directory (a rename across file systems is not atomic); a .keras
    # file keeps its suffix, which Keras requires.
    temporary = os.path.join(parent, f".{name}.tmp-{uuid.uuid4().hex[:8]}")
    if keras_file:
        temporary += ".keras"
    try:
        _write(model, temporary, keras_file)
        _replace(temporary, path)
    finally:
        _remove(temporary)
    return path


def _write(model: Any, path: str, keras_file: bool) -> None:
    if keras_file:
        model.save(path)
    elif isinstance(model, keras.Model):
        model.export(path, format="tf_saved_model", verbose=False)
    else:
        tf.saved_model.save(model, path)


def _replace(source: str, destination: str) -> None:
    """Moves ``source`` to ``destination``: one atomic rename for a file; a directory (which
    a rename cannot overwrite) is swapped in with a rename out of the way first."""
    if os.path.lexists(destination) and (os.path.isdir(source) or os.path.isdir(destination)):
        old = _swap_out(destination)
        os.replace(source, destination)
        _remove(old)
    else:
        os.replace(source, destination)


def _swap_out(path: str) -> str:
    """Renames ``path`` to a temporary name next to it; returns that name."""
    parent, name = os.path.split(path)
    old = os.path.join(parent, f".{name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(path, old)
    return old


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
