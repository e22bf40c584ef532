"""Errors raised by tfloop.

Every error tfloop raises on purpose is a :class:`TfloopError`, so one ``except`` clause catches
them all. Each message names the argument at fault and how to fix it. They are raised before any
compiled work starts, so nothing already trained or saved is lost.

Example:
    >>> import tfloop
    >>> try:
    ...     tfloop.Trainer(object(), loss="mse")
    ... except tfloop.errors.ConfigError as error:
    ...     print(type(error).__name__)
    ConfigError
"""

from __future__ import annotations

__all__ = ["CheckpointError", "ConfigError", "DataError", "TfloopError"]


class TfloopError(Exception):
    """Base class of every error raised by tfloop."""


class ConfigError(TfloopError, ValueError):
    """An argument of ``Trainer``, ``fit``, ``evaluate``, ``predict`` or a component is invalid."""


class DataError(TfloopError, ValueError):
    """The input data cannot be used: empty, unbatched, infinite without a step count, or a shape
    or dtype the model cannot take."""


class CheckpointError(TfloopError):
    """A checkpoint cannot be written or restored safely."""
