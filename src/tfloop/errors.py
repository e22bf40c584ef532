"""Errors raised by tfloop.

Every error tfloop raises on purpose is a :class:`TfloopError`, so one ``except`` clause catches
them all. Each message names the argument at fault and how to fix it. They are raised before any
compiled work starts, so nothing already trained or saved is lost.

Examples:
    >>> import tfloop
    >>> try:
    ...     tfloop.Trainer(object(), loss="mse")
    ... except tfloop.errors.ConfigError as error:
    ...     print(type(error).__name__)
    ConfigError
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "NonFiniteError",
    "TfloopError",
    "WorkerError",
]


class TfloopError(Exception):
    """Base class of every error raised by tfloop."""


class ConfigError(TfloopError, ValueError):
    """An argument of ``Trainer``, ``fit``, ``evaluate``, ``predict`` or a component is invalid."""


class DataError(TfloopError, ValueError):
    """The input data cannot be used: empty, unbatched, infinite without a step count, or a shape
    or dtype the model cannot take."""


class CheckpointError(TfloopError):
    """A checkpoint cannot be written or restored safely."""


class WorkerError(TfloopError):
    """A worker of a multi-worker cluster failed or stopped responding during training.

    The other workers stop (TensorFlow aborts the collectives after its heartbeat timeout)
    instead of hanging; checkpoints already written are intact, so restarting every worker with
    the same command resumes from the latest one.
    """


class NonFiniteError(TfloopError, FloatingPointError):
    """Training produced a NaN or Inf loss or gradient (raised by ``NonFiniteGuard("raise")``).

    The offending update was dropped in-graph, so the weights are still finite. ``step`` is the
    optimizer update at which it happened (``None`` if only a range is known) and ``tensor``
    names what was non-finite: ``"loss"``, a gradient (``"gradient of dense/kernel"``) or
    ``"loss or gradients"``.
    """

    def __init__(self, message: str, step: int | None = None, tensor: str | None = None) -> None:
        super().__init__(message)
        self.step = step
        self.tensor = tensor
