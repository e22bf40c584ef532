"""Exporting a model for inference without tfloop: a ``.keras`` file or a SavedModel."""

from __future__ import annotations

import os
from typing import Any

import keras
import tensorflow as tf

from tfloop.errors import ConfigError

__all__ = ["export_model"]


def export_model(model: Any, path: str | os.PathLike[str]) -> str:
    """Saves ``model`` to ``path``; returns the path written.

    A path ending in ``.keras`` gets a Keras model file (``keras.models.load_model``); any
    other path a SavedModel directory (``tf.saved_model.load``), which a plain ``tf.Module``
    is always exported to.
    """
    path = os.fspath(path)
    if isinstance(model, keras.Model):
        if path.endswith(".keras"):
            model.save(path)
        else:
            model.export(path, format="tf_saved_model", verbose=False)
        return path
    if path.endswith(".keras"):
        raise ConfigError(
            f"export path {path!r} asks for a .keras file, but the model is a "
            f"{type(model).__name__}, not a keras.Model; pass a directory path."
        )
    tf.saved_model.save(model, path)
    return path
