"""TensorBoard: scalars, learning rate and throughput as TensorBoard event files."""

from __future__ import annotations

import os
from typing import Any, Literal

from tfloop import _validate
from tfloop._cadence import EveryNSteps
from tfloop._logs import COUNTERS, STEP, without
from tfloop.callbacks._common import learning_rate_of
from tfloop.callbacks.base import Callback, Logs, update_count
from tfloop.callbacks.throughput import Throughput
from tfloop.errors import ConfigError
from tfloop.io import checks, files

__all__ = ["TensorBoard"]


def _require_tensorboard() -> None:
    try:
        import tensorboard  # noqa: F401
    except ImportError as error:
        raise ConfigError(
            "TensorBoard needs the tensorboard package, which TensorFlow 2.21 no longer "
            "installs: pip install 'tfloop[tensorboard]' (or pip install tensorboard)."
        ) from error


class TensorBoard(Callback):
    """Writes the logs as TensorBoard scalars under ``log_dir/train`` and ``log_dir/validation``.

    Keras's layout and tag names, so dashboards carry over: each epoch writes
    ``epoch_<name>`` (training keys under ``train``, ``val_*`` keys without their prefix
    under ``validation``) at step = epoch, plus ``epoch_learning_rate``,
    ``epoch_steps_per_second`` and ``epoch_samples_per_second``. With ``update_freq=n`` the
    running metrics are also written as ``batch_<name>`` at step = optimizer updates, at the end
    of the first execution that reaches each multiple of ``n`` updates (so at most once per
    execution). ``evaluate`` outside ``fit``, and each validation of
    ``fit(validation_every_n_steps=n)``, write ``evaluation_<name>_vs_iterations`` under
    ``validation`` at step = optimizer updates.

    Needs the ``tensorboard`` package (``pip install 'tfloop[tensorboard]'``); without it the
    constructor raises :class:`tfloop.errors.ConfigError` saying so.

    Args:
        log_dir: the directory of this run, local or a URL (``gs://bucket/logs``: TensorBoard
            reads it there); proved writable when ``fit`` starts.
        update_freq: ``"epoch"``, or write batch scalars every this many updates.
        throughput: also write steps and samples per second (see ``Throughput``).

    Examples:
        >>> import tempfile
        >>> board = TensorBoard(tempfile.mkdtemp())  # doctest: +SKIP
    """

    chief_only = True  # one file for the cluster

    def __init__(
        self,
        log_dir: str | os.PathLike[str] = "logs",
        update_freq: int | Literal["epoch"] = "epoch",
        throughput: bool = True,
    ) -> None:
        _require_tensorboard()
        if update_freq != "epoch":
            update_freq = _validate.count(update_freq, "update_freq", 1, owner="TensorBoard")
        self.log_dir = checks.check_scheme(log_dir, "TensorBoard log_dir")
        self.update_freq = update_freq
        self._every = EveryNSteps(update_freq) if update_freq != "epoch" else None
        self._throughput = Throughput() if throughput else None
        self._writers: dict[str, Any] = {}
        self._last_step = 0

    def _writer(self, name: str) -> Any:
        import tensorflow as tf

        if name not in self._writers:
            self._writers[name] = tf.summary.create_file_writer(files.join(self.log_dir, name))
        return self._writers[name]

    def _scalars(self, writer: str, values: dict[str, float], step: int) -> None:
        import tensorflow as tf

        with self._writer(writer).as_default():
            for name, value in values.items():
                tf.summary.scalar(name, value, step=step)

    def _extras(self, logs: Logs) -> dict[str, float]:
        """The learning rate and the throughput, unless the logs already carry them."""
        extra: dict[str, float] = {}
        if self.trainer is not None and "learning_rate" not in logs:
            extra["learning_rate"] = learning_rate_of(self.trainer.optimizer)
        return extra

    def on_fit_start(self, logs: Logs) -> None:
        checks.check_writable(self.log_dir, "TensorBoard log_dir")
        if self._throughput is not None and self.trainer is not None:
            self._throughput.set_trainer(self.trainer)
        self._last_step = update_count(self.trainer) if self.trainer else 0

    def on_epoch_start(self, epoch: int, logs: Logs) -> None:
        if self._throughput is not None:
            self._throughput.on_epoch_start(epoch, logs)

    def on_train_batch_end(self, batch: int, logs: Logs) -> None:
        rates: Logs = {"step": logs.get("step", 0.0)}
        if self._throughput is not None:
            self._throughput.on_train_batch_end(batch, rates)
        step = int(logs.get("step", 0))
        last, self._last_step = self._last_step, step
        if self._every is None or not self._every.crossed(last, step):
            return
        values = without(logs, COUNTERS)
        values.update(self._extras(logs))
        values.update({k: v for k, v in without(rates, COUNTERS).items() if k not in logs})
        self._scalars("train", {f"batch_{k}": v for k, v in values.items()}, step)

    def on_epoch_end(self, epoch: int, logs: Logs) -> None:
        rates: Logs = {}
        if self._throughput is not None:
            self._throughput.on_epoch_end(epoch, rates)
        train = {k: v for k, v in logs.items() if not k.startswith("val_")}
        train.update(self._extras(logs))
        train.update({k: v for k, v in rates.items() if k not in logs})
        validation = {k.removeprefix("val_"): v for k, v in logs.items() if k.startswith("val_")}
        self._scalars("train", {f"epoch_{k}": v for k, v in train.items()}, epoch)
        if validation:
            self._scalars("validation", {f"epoch_{k}": v for k, v in validation.items()}, epoch)
        for writer in self._writers.values():
            writer.flush()

    def on_eval_start(self, logs: Logs) -> None:
        if self._throughput is not None:
            self._throughput.on_eval_start(logs)

    def on_eval_end(self, logs: Logs) -> None:
        if self._throughput is not None:
            self._throughput.on_eval_end(logs)
        if self.trainer is None:
            return
        info = self.trainer.run_info
        if info.in_fit and not info.step_validation:
            return  # an epoch's validation: written with the epoch
        step = int(logs[STEP]) if info.in_fit else update_count(self.trainer)
        values = {f"evaluation_{k}_vs_iterations": v for k, v in without(logs, COUNTERS).items()}
        self._scalars("validation", values, step)
        if info.in_fit:
            self._writer("validation").flush()
        else:
            self.close()

    def on_fit_end(self, logs: Logs) -> None:
        self.close()

    def close(self) -> None:
        """Flushes and closes the event files (``fit`` does it at its end)."""
        for writer in self._writers.values():
            writer.close()
        self._writers = {}
