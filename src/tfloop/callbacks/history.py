"""History: the per-epoch logs of ``fit``, as in Keras."""

from __future__ import annotations

from tfloop.callbacks.base import Callback, Logs

__all__ = ["History"]


class History(Callback):
    """Records each epoch's logs; ``fit`` returns it.

    Attributes:
        history: ``{name: [value per epoch]}``, e.g. ``history["val_loss"]``.
        epoch: the epoch indices that were recorded.

    Example:
        >>> h = History()
        >>> h.on_epoch_end(0, {"loss": 1.0})
        >>> h.on_epoch_end(1, {"loss": 0.5})
        >>> h.history
        {'loss': [1.0, 0.5]}
    """

    def __init__(self) -> None:
        self.history: dict[str, list[float]] = {}
        self.epoch: list[int] = []

    def on_epoch_end(self, epoch: int, logs: Logs) -> None:
        self.epoch.append(epoch)
        for name, value in logs.items():
            self.history.setdefault(name, []).append(value)

    def __repr__(self) -> str:
        return f"History(epochs={len(self.epoch)}, keys={sorted(self.history)})"
