"""Callback base class and the list that dispatches events to callbacks in order.

Events (Keras names, so users feel at home) are called on the host, between compiled
executions: a batch event fires once per execution of ``steps_per_execution`` steps, with the
logs of its last step, and never forces a device sync of its own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

__all__ = ["Callback", "CallbackList", "Logs", "RunInfo", "TrainerView", "update_count"]

Logs = dict[str, float]


@dataclasses.dataclass
class RunInfo:
    """What a callback may know about the ``fit`` in progress (``trainer.run_info``).

    Attributes:
        in_fit: whether a ``fit`` is running (an ``evaluate`` inside it is a validation).
        epochs: the epoch ``fit`` stops at (``None`` outside ``fit``).
        steps_per_epoch: micro-batches per epoch, if known.
        validates: whether this ``fit`` has validation data.
        epoch: the current epoch (0-based).
        validation_every_n_steps: ``fit(validation_every_n_steps=...)``, or ``None``.
        step_validation: ``True`` during a validation pass of ``validation_every_n_steps``
            (from its ``on_eval_start`` to its ``on_eval_end``, whose logs then hold ``step``).
        max_steps: ``fit(max_steps=...)`` (updates in total), or ``None``.
        input_seconds: seconds the current epoch's training has spent waiting for its input
            so far: pulling batches from the iterator and stacking them, between compiled
            executions (0 at each epoch start). Near the epoch's time, the loop is input-bound.
        chief: whether this process writes the run's files: ``False`` on the other workers of
            a multi-worker strategy, where callbacks with ``chief_only`` get no events.
    """

    in_fit: bool = False
    epochs: int | None = None
    steps_per_epoch: int | None = None
    validates: bool = False
    epoch: int = 0
    validation_every_n_steps: int | None = None
    step_validation: bool = False
    max_steps: int | None = None
    input_seconds: float = 0.0
    chief: bool = True


class TrainerView(Protocol):
    """The part of a ``tfloop.Trainer`` callbacks use (all public; a test may pass a stub)."""

    model: Any
    optimizer: Any
    stop_training: bool
    run_info: RunInfo

    @property
    def metrics(self) -> list[Any]: ...

    @property
    def trainable_variables(self) -> list[Any]: ...

    @property
    def non_finite_steps(self) -> int: ...

    @property
    def first_non_finite_step(self) -> int: ...

    @property
    def first_non_finite_tensor(self) -> str: ...


class Callback:
    """Base class of callbacks: override the events you need; each gets ``self.trainer``.

    ``on_train_batch_end(batch, logs)`` is called once per compiled execution: ``batch`` is the
    index (within the epoch) of the last micro-batch that execution ran, and ``logs`` holds the
    running epoch metrics, ``step`` (optimizer updates so far) and ``batch``.

    Examples:
        >>> import tfloop
        >>> class PrintEpochs(tfloop.Callback):
        ...     def on_epoch_end(self, epoch, logs):
        ...         print(epoch, sorted(logs))
        >>> PrintEpochs().on_epoch_end(0, {"loss": 0.5})
        0 ['loss']
    """

    trainer: Any = None
    """The :class:`TrainerView` of the Trainer running this callback (set by the Trainer)."""

    chief_only: bool = False
    """Whether only the chief runs this callback under a multi-worker strategy (every worker
    runs the same ``fit``, so a callback that writes a file would write it once per worker).
    The loggers, ``TensorBoard``, ``ExportBest`` and ``Profiler`` set it; set it on your own
    callbacks that write shared files."""

    def set_trainer(self, trainer: TrainerView) -> None:
        """Called by the Trainer before any event."""
        self.trainer = trainer

    def on_fit_start(self, logs: Logs) -> None:
        """Before the first epoch of ``fit``."""

    def on_fit_end(self, logs: Logs) -> None:
        """After the last epoch of ``fit`` (also after an early stop)."""

    def on_epoch_start(self, epoch: int, logs: Logs) -> None:
        """Before the first step of ``epoch`` (0-based)."""

    def on_epoch_end(self, epoch: int, logs: Logs) -> None:
        """After ``epoch``, with its final training metrics and ``val_*`` metrics if evaluated."""

    def on_train_batch_end(self, batch: int, logs: Logs) -> None:
        """After each compiled execution of training steps."""

    def on_eval_start(self, logs: Logs) -> None:
        """Before ``evaluate`` (or a validation pass inside ``fit``)."""

    def on_eval_end(self, logs: Logs) -> None:
        """After ``evaluate`` (or a validation pass), with its results.

        Inside ``fit`` the results have their plain names (``loss``, not ``val_loss``) and
        ``step``, the update count they were measured at; ``trainer.run_info.step_validation``
        tells a validation of ``validation_every_n_steps`` from an epoch end's.
        """

    def on_predict_start(self, logs: Logs) -> None:
        """Before ``predict``."""

    def on_predict_end(self, logs: Logs) -> None:
        """After ``predict``."""

    def on_checkpoint(self, path: str, logs: Logs) -> None:
        """After a checkpoint was written to ``path``."""

    def state_dict(self) -> dict[str, Any]:
        """State to save in checkpoints (JSON-serializable), so a resumed run continues exactly.

        Override together with :meth:`load_state_dict` in callbacks that keep state across
        epochs (a best value, a patience counter, a file offset). The default has none.
        """
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores what :meth:`state_dict` returned."""


def update_count(trainer: Any) -> int:
    """The trainer's updates so far (``Trainer.update_count``: ``optimizer.iterations``, or
    the train steps of a model that runs its own); a stub without it gives its optimizer's."""
    count = getattr(trainer, "update_count", None)
    if count is not None:
        return int(count)
    value = trainer.optimizer.iterations
    return int(value.numpy()) if hasattr(value, "numpy") else int(value)


class CallbackList:
    """Calls an event on each callback, in the order given.

    Examples:
        >>> import tfloop
        >>> seen = []
        >>> class Record(tfloop.Callback):
        ...     def on_fit_start(self, logs):
        ...         seen.append(type(self).__name__)
        >>> CallbackList([Record()]).on_fit_start({})
        >>> seen
        ['Record']
    """

    def __init__(
        self, callbacks: Iterable[Callback] = (), trainer: TrainerView | None = None
    ) -> None:
        self.callbacks: Sequence[Callback] = list(callbacks)
        self._trainer = trainer
        if trainer is not None:
            for callback in self.callbacks:
                callback.set_trainer(trainer)

    def _call(self, event: str, *args: Any) -> None:
        chief = self._trainer is None or self._trainer.run_info.chief
        for callback in self.callbacks:
            if chief or not callback.chief_only:
                getattr(callback, event)(*args)

    def on_fit_start(self, logs: Logs) -> None:
        self._call("on_fit_start", logs)

    def on_fit_end(self, logs: Logs) -> None:
        self._call("on_fit_end", logs)

    def on_epoch_start(self, epoch: int, logs: Logs) -> None:
        self._call("on_epoch_start", epoch, logs)

    def on_epoch_end(self, epoch: int, logs: Logs) -> None:
        self._call("on_epoch_end", epoch, logs)

    def on_train_batch_end(self, batch: int, logs: Logs) -> None:
        self._call("on_train_batch_end", batch, logs)

    def on_eval_start(self, logs: Logs) -> None:
        self._call("on_eval_start", logs)

    def on_eval_end(self, logs: Logs) -> None:
        self._call("on_eval_end", logs)

    def on_predict_start(self, logs: Logs) -> None:
        self._call("on_predict_start", logs)

    def on_predict_end(self, logs: Logs) -> None:
        self._call("on_predict_end", logs)

    def on_checkpoint(self, path: str, logs: Logs) -> None:
        self._call("on_checkpoint", path, logs)
