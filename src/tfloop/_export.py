"""Exporting a model for inference without tfloop: a ``.keras`` file or a SavedModel.

Every export is written under a temporary name next to ``path`` and moved into place once
complete (``tfloop.io.files.replace``): on local disk a reader (a serving job, a copy) never sees
a half-written export. On an object store (``gs://``) and on ``ram://`` a ``.keras`` file is one
object, replaced whole; a SavedModel directory is moved object by object, its old
``saved_model.pb`` deleted first and the new one written last, so a reader finds either no
SavedModel or a complete one.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

import keras
import tensorflow as tf

from tfloop.errors import ConfigError
from tfloop.io import checks, files

__all__ = ["export_model"]

# What a SavedModel reader opens first: written last, deleted first (see the module docstring).
SAVED_MODEL_LAST = ("saved_model.pb",)


def export_model(model: Any, path: str | os.PathLike[str]) -> str:
    """Saves ``model`` to ``path``, atomically; returns the path written.

    A path ending in ``.keras`` gets a Keras model file (``keras.models.load_model``); any
    other path a SavedModel directory (``tf.saved_model.load``), which a plain ``tf.Module``
    is always exported to. A file replaces the previous one in one rename; a directory takes
    two (the old one out of the way, the new one in), so for a moment ``path`` may be missing,
    but it is never half-written. ``path`` may be a URL (``gs://...``, ``ram://...``).

    Examples:
        >>> import os, tempfile, keras
        >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        >>> path = export_model(model, os.path.join(tempfile.mkdtemp(), "model.keras"))
        >>> sorted(os.listdir(os.path.dirname(path)))
        ['model.keras']
    """
    path = checks.check_scheme(path, "export path")
    path = path.rstrip("/") or path
    keras_file = path.endswith(".keras")
    if keras_file and not isinstance(model, keras.Model):
        raise ConfigError(
            f"export path {path!r} asks for a .keras file, but the model is a "
            f"{type(model).__name__}, not a keras.Model; pass a directory path."
        )
    if keras_file and files.isdir(path):
        raise ConfigError(
            f"export path {path!r} is a directory, where a .keras file is asked for; pass "
            "another path, or remove the directory."
        )
    if not keras_file and files.exists(path) and not files.isdir(path):
        raise ConfigError(
            f"export path {path!r} is an existing file, and a SavedModel is a directory; pass "
            "another path (or one ending in .keras for a Keras file), or remove the file."
        )
    parent, name = files.split(path)
    files.makedirs(parent)
    # Hidden, in the same directory (a rename across file systems is not atomic); a .keras
    # file keeps its suffix, which Keras requires.
    temporary = files.join(parent, f".{name}.tmp-{uuid.uuid4().hex[:8]}")
    if keras_file:
        temporary += ".keras"
    try:
        _write(model, temporary, keras_file)
        files.replace(temporary, path, last=SAVED_MODEL_LAST)
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


def _remove(path: str) -> None:
    if files.isdir(path):
        files.rmtree(path)
    else:
        files.remove(path)
