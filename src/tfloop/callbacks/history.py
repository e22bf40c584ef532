"""History: the per-epoch logs of ``fit``, as in Keras, its validations every n updates, and a
plot of them."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from tfloop._logs import COUNTERS, STEP, without
from tfloop.callbacks.base import Callback, Logs

__all__ = ["History"]


class History(Callback):
    """Records each epoch's logs; ``fit`` returns it.

    Attributes:
        history: ``{name: [value per epoch]}``, e.g. ``history["val_loss"]``. As in Keras, a
            key only gets values for the epochs that had it (``val_*`` with
            ``validation_freq > 1``).
        epoch: the epoch indices that were recorded.
        evaluations: one dict per validation of ``fit(validation_every_n_steps=n)``, in order:
            ``{"step": 500, "epoch": 0, "val_loss": ..., ...}`` (``step``: the update count
            it was measured at; ``epoch``: the epoch it fell in, 0-based).

    A checkpoint holds the History (``state_dict``): a run resumed from one returns the
    History of the whole run, as an uninterrupted run would.

    Examples:
        >>> h = History()
        >>> h.on_epoch_end(0, {"loss": 1.0})
        >>> h.on_epoch_end(1, {"loss": 0.5})
        >>> h.history
        {'loss': [1.0, 0.5]}
    """

    def __init__(self) -> None:
        self.history: dict[str, list[float]] = {}
        self.epoch: list[int] = []
        self.evaluations: list[dict[str, Any]] = []
        self._records: list[tuple[int, dict[str, float]]] = []

    def on_epoch_end(self, epoch: int, logs: Logs) -> None:
        self.epoch.append(epoch)
        self._records.append((epoch, dict(logs)))
        for name, value in logs.items():
            self.history.setdefault(name, []).append(value)

    def on_eval_end(self, logs: Logs) -> None:
        info = None if self.trainer is None else self.trainer.run_info
        if info is not None and info.in_fit and info.step_validation:
            record: dict[str, Any] = {"step": int(logs[STEP]), "epoch": info.epoch}
            record.update({f"val_{k}": v for k, v in without(logs, COUNTERS).items()})
            self.evaluations.append(record)

    def state_dict(self) -> dict[str, Any]:
        return {
            "epochs": [[epoch, logs] for epoch, logs in self._records],
            "evaluations": [dict(record) for record in self.evaluations],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history, self.epoch, self._records = {}, [], []
        for epoch, logs in state.get("epochs", []):
            self.on_epoch_end(int(epoch), dict(logs))
        self.evaluations = [dict(record) for record in state.get("evaluations", [])]

    @classmethod
    def from_jsonl(cls, path: str | os.PathLike[str]) -> History:
        """The History of a run from the epoch records a ``JSONLLogger`` wrote to ``path``.

        Examples:
            >>> import os, tempfile
            >>> from tfloop.callbacks import JSONLLogger
            >>> path = os.path.join(tempfile.mkdtemp(), "run.jsonl")
            >>> logger = JSONLLogger(path)
            >>> for epoch, loss in enumerate([0.9, 0.4]):
            ...     logger.on_epoch_end(epoch, {"loss": loss})
            >>> History.from_jsonl(path).history
            {'loss': [0.9, 0.4]}
        """
        from tfloop.callbacks._plot import read_epoch_records

        history = cls()
        for epoch, logs in read_epoch_records(path):
            history.on_epoch_end(epoch, logs)
        return history

    def plot(
        self,
        path: str | os.PathLike[str],
        keys: Sequence[str] | None = None,
        title: str | None = None,
    ) -> str:
        """Writes loss and metric curves to the PNG ``path`` (needs ``tfloop[plot]``).

        One panel per quantity, its training and ``val_`` curves together, against the epoch.
        ``keys`` picks what to draw (default: every key); an unknown key raises ConfigError
        listing the available ones. ``path`` may be a URL (``gs://...``). Returns the path
        written, as a string.

        Examples:
            >>> import os, tempfile
            >>> h = History()
            >>> for epoch, loss in enumerate([1.0, 0.6, 0.4]):
            ...     h.on_epoch_end(epoch, {"loss": loss, "val_loss": loss + 0.1})
            >>> h.plot(os.path.join(tempfile.mkdtemp(), "curves.png")).endswith("curves.png")
            True
        """
        from tfloop.callbacks._plot import plot_curves

        return plot_curves(self._records, path, keys=keys, title=title)

    def __repr__(self) -> str:
        return f"History(epochs={len(self.epoch)}, keys={sorted(self.history)})"
