"""Throughput: samples per second, steps per second and the share of time spent waiting for
input, in the logs."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from tfloop.callbacks.base import Callback, Logs, update_count

__all__ = ["Throughput"]

SAMPLES = "samples_per_second"
STEPS = "steps_per_second"
INPUT_WAIT = "input_wait"


class Throughput(Callback):
    """Adds ``samples_per_second``, ``steps_per_second`` and ``input_wait`` to the training logs.

    Batch logs get the rates of the execution that just ran (its steps over the time since the
    previous batch event, or since the epoch started); epoch logs get the rates over the
    epoch's training, from its start to its last execution, so validation time is not counted
    (a validation of ``validation_every_n_steps``, in the middle of the epoch, is left out too).
    Steps are optimizer updates (the ``step`` in the logs): with ``accumulate_steps=k`` one
    step is k micro-batches. Samples are the examples the loss was averaged over, read from the
    Trainer's ``loss_tracker`` (a subclass whose ``train_step`` updates it without
    ``sample_weight=batch size`` counts batches instead).

    ``input_wait`` is the fraction of that time the loop spent waiting for its input (pulling
    batches from the iterator and stacking them: ``RunInfo.input_seconds``), from 0 to 1. Near
    1 the loop is input-bound: the model waits for the data, and a faster model will not make
    training faster; a parallel ``map``, ``cache``, ``prefetch`` or the tf.data service will
    (see "Feeding data fast" in the docs).

    Put it before the callbacks that should see the rates (loggers, ``History``, which is
    always last). It adds no device work: the values it reads are fetched with the logs.

    Args:
        clock: seconds as a float (``time.perf_counter``; tests pass a fake clock).

    Examples:
        >>> import types, tfloop
        >>> ticks = iter([0.0, 2.0])
        >>> meter = Throughput(clock=lambda: next(ticks))
        >>> meter.trainer = types.SimpleNamespace(
        ...     loss_tracker=types.SimpleNamespace(count=0.0),
        ...     optimizer=types.SimpleNamespace(iterations=0),
        ...     run_info=tfloop.callbacks.RunInfo())
        >>> meter.on_epoch_start(0, {})
        >>> meter.trainer.loss_tracker.count = 640.0
        >>> meter.trainer.run_info.input_seconds = 0.5
        >>> logs = {"loss": 0.5, "step": 10.0}
        >>> meter.on_train_batch_end(9, logs)
        >>> logs["samples_per_second"], logs["steps_per_second"], logs["input_wait"]
        (320.0, 5.0, 0.25)
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self._start = self._last = _Mark(0.0, 0.0, 0, 0.0)
        self._paused_at: float | None = None

    def _samples(self) -> float:
        tracker = getattr(self.trainer, "loss_tracker", None)
        return float(np.asarray(getattr(tracker, "count", 0.0))) if tracker is not None else 0.0

    def _input_seconds(self) -> float:
        run_info = getattr(self.trainer, "run_info", None)
        return float(getattr(run_info, "input_seconds", 0.0))

    def on_epoch_start(self, epoch: int, logs: Logs) -> None:
        steps = update_count(self.trainer) if self.trainer is not None else 0
        # A resumed epoch's tracker already holds the examples run before the checkpoint.
        self._start = self._last = _Mark(self.clock(), self._samples(), steps, 0.0)

    def on_train_batch_end(self, batch: int, logs: Logs) -> None:
        steps = int(logs.get("step", self._last.steps))
        now = _Mark(self.clock(), self._samples(), steps, self._input_seconds())
        _add_rates(logs, self._last, now)
        self._last = now

    def on_epoch_end(self, epoch: int, logs: Logs) -> None:
        _add_rates(logs, self._start, self._last)

    def on_eval_start(self, logs: Logs) -> None:
        if self._mid_epoch_validation():
            self._paused_at = self.clock()

    def on_eval_end(self, logs: Logs) -> None:
        if self._paused_at is not None and self._mid_epoch_validation():
            pause, self._paused_at = self.clock() - self._paused_at, None
            # The clock of the epoch and of the next execution stood still meanwhile.
            self._start = self._start._replace(time=self._start.time + pause)
            self._last = self._last._replace(time=self._last.time + pause)

    def _mid_epoch_validation(self) -> bool:
        info = getattr(self.trainer, "run_info", None)
        return bool(info is not None and info.in_fit and info.step_validation)


class _Mark(NamedTuple):
    time: float
    samples: float
    steps: int
    input_seconds: float


def _add_rates(logs: Logs, before: _Mark, after: _Mark) -> None:
    seconds = after.time - before.time
    if seconds <= 0:
        return
    logs[SAMPLES] = (after.samples - before.samples) / seconds
    logs[STEPS] = (after.steps - before.steps) / seconds
    logs[INPUT_WAIT] = min(1.0, max(0.0, (after.input_seconds - before.input_seconds) / seconds))
