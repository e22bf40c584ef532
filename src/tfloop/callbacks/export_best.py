"""ExportBest: export the model whenever a monitored quantity reaches a new best."""

from __future__ import annotations

import logging
import os
from typing import Any

from tfloop._export import export_model
from tfloop._logs import COUNTERS, without
from tfloop._monitor import Monitor
from tfloop.callbacks.base import Callback, Logs, update_count
from tfloop.io import checks, files

__all__ = ["ExportBest"]

logger = logging.getLogger("tfloop")


class ExportBest(Callback):
    """Exports the model to ``path`` at each new best value of ``monitor``.

    Checked at each epoch end and, for a ``val_*`` key, at each validation of
    ``fit(validation_every_n_steps=n)``. The export is ``Trainer.export``'s: a ``.keras`` file
    for a path ending in ``.keras``, a SavedModel directory otherwise. It is atomic: written
    under a temporary name next to ``path`` and renamed into place, so a reader (a serving
    job polling ``path``) sees the previous best or the new one, never a half-written export.
    "Better" is Keras's rule (``mode="auto"``: a loss goes down, a metric asks itself).

    ``state_dict()`` holds the best value, its epoch and step, so a resumed run exports only
    what beats the best of the whole run.

    Args:
        path: where the model goes (``.keras`` file or SavedModel directory), local or a URL
            (``gs://...``; what is atomic there: ``docs/cloud-storage.md``). Its directory is
            proved writable when ``fit`` starts.
        monitor: the log key, e.g. ``"val_loss"`` or ``"val_accuracy"``.
        mode: ``"min"``, ``"max"`` or ``"auto"``.
        min_delta: the smallest change that counts as an improvement.
        verbose: 1 logs each export.

    Attributes:
        best: the best value so far (``None`` before the first).
        best_epoch, best_step: where it was reached (epoch 0-based; step: update count).

    Examples:
        >>> import os, tempfile, numpy as np, keras, tfloop
        >>> path = os.path.join(tempfile.mkdtemp(), "best.keras")
        >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        >>> export = tfloop.callbacks.ExportBest(path, monitor="loss")
        >>> trainer = tfloop.Trainer(model, "sgd", "mse", callbacks=[export])
        >>> _ = trainer.fit((np.ones((8, 2)), np.ones((8, 1))), epochs=3, verbose=0)
        >>> os.path.exists(path), export.best_epoch
        (True, 2)
    """

    chief_only = True  # one file for the cluster

    def __init__(
        self,
        path: str | os.PathLike[str],
        monitor: str = "val_loss",
        mode: str = "auto",
        min_delta: float = 0.0,
        verbose: int = 0,
    ) -> None:
        self.path = checks.check_scheme(path, "ExportBest path")
        self.monitor = Monitor("ExportBest", monitor, mode, min_delta)
        self.verbose = verbose
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.best_step: int | None = None
        self._restored = False

    def on_fit_start(self, logs: Logs) -> None:
        if not self._restored:  # a state restored from a checkpoint is the run's own
            self.best = self.best_epoch = self.best_step = None
        self._restored = False
        self.monitor.bind(self.trainer)
        checks.check_writable(
            files.split(self.path)[0], f"ExportBest path {self.path!r}: its directory"
        )

    def on_epoch_end(self, epoch: int, logs: Logs) -> None:
        self._consider(self.monitor.value(logs), epoch, None)

    def on_eval_end(self, logs: Logs) -> None:
        info = None if self.trainer is None else self.trainer.run_info
        if info is not None and info.in_fit and info.step_validation:
            value = self.monitor.validation_value(without(logs, COUNTERS))
            self._consider(value, info.epoch, int(logs["step"]))

    def _consider(self, value: float | None, epoch: int, step: int | None) -> None:
        if value is None or value != value or not self.monitor.is_improvement(value, self.best):
            return  # NaN is never a best
        self.best, self.best_epoch = value, epoch
        self.best_step = step if step is not None else self._updates()
        if self.trainer is None:
            return
        export_model(self.trainer.model, self.path)
        if self.verbose:
            logger.warning(
                "tfloop: %s improved to %.6g at step %s; exported to %s",
                self.monitor.monitor,
                value,
                self.best_step,
                self.path,
            )

    def _updates(self) -> int | None:
        return None if self.trainer is None else update_count(self.trainer)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "best_step": self.best_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = None if state["best"] is None else float(state["best"])
        self.best_epoch, self.best_step = state["best_epoch"], state["best_step"]
        self._restored = True
