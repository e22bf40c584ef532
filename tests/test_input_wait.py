"""The time the loop waits for its input: measured by the controller around every pull from the
stream, exposed as ``RunInfo.input_seconds``, reported by ``Throughput`` and the progress line."""

from __future__ import annotations

import io
import itertools
import os
import subprocess
import sys

import pytest
import tensorflow as tf
from conftest import make_data, make_model

import tfloop
from tfloop.callbacks import ProgressBar, Throughput


class FakeClock:
    """Seconds that advance by ``step`` at every call."""

    def __init__(self, step: float):
        self.ticks = itertools.count()
        self.step = step

    def __call__(self) -> float:
        return next(self.ticks) * self.step


class Record(tfloop.Callback):
    def __init__(self):
        self.executions = 0
        self.batch_waits: list[float] = []
        self.epoch_inputs: list[float] = []

    def on_epoch_start(self, epoch, logs):
        self.executions = 0

    def on_train_batch_end(self, batch, logs):
        self.executions += 1
        self.batch_waits.append(logs.get("input_wait"))

    def on_epoch_end(self, epoch, logs):
        self.epoch_inputs.append((self.trainer.run_info.input_seconds, self.executions))


def trainer_with(*callbacks, steps_per_execution=2):
    return tfloop.Trainer(
        make_model(),
        "sgd",
        "categorical_crossentropy",
        steps_per_execution=steps_per_execution,
        callbacks=list(callbacks),
        jit_compile=False,
    )


@pytest.mark.parametrize("as_dataset", [False, True])
def test_the_controller_times_every_pull_from_the_stream(monkeypatch, as_dataset):
    # Every interval the controller measures lasts one tick of the fake clock: one per
    # execution, and one for the pull that finds the epoch over.
    monkeypatch.setattr("tfloop._controller.perf_counter", FakeClock(1.0))
    x, y = make_data(40)  # 5 batches of 8: executions of 2, 2, 1 steps
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(8) if as_dataset else (x, y)
    record = Record()
    trainer_with(record).fit(data, epochs=2, batch_size=None if as_dataset else 8, verbose=0)
    assert record.epoch_inputs == [(4.0, 3), (4.0, 3)]


def test_throughput_reports_the_share_of_time_spent_waiting_for_input(monkeypatch):
    monkeypatch.setattr("tfloop._controller.perf_counter", FakeClock(1.0))
    record = Record()
    # Throughput's clock advances 10 s per event, the controller's 1 s per pull: a tenth
    throughput = Throughput(clock=FakeClock(10.0))
    history = trainer_with(throughput, record).fit(make_data(40), epochs=1, batch_size=8, verbose=0)
    assert record.batch_waits == [0.1, 0.1, 0.1]
    assert history.history["input_wait"] == [0.1]


def test_the_progress_line_shows_the_input_wait(monkeypatch):
    out = io.StringIO()
    trainer = trainer_with(ProgressBar(stream=out, interval=0.0))
    trainer.fit(make_data(40), epochs=1, batch_size=8, verbose=0)
    lines = out.getvalue().splitlines()
    assert lines and all("input wait " in line and "%" in line for line in lines)


def test_a_stream_dropped_at_interpreter_exit_does_not_hang_the_exit():
    # A stream still referenced when the process ends (by the traceback of the error that
    # ends it, say) is released at exit; a release thread started then never runs.
    code = (
        "import tensorflow as tf\n"
        "from tfloop.data._source import StepStream\n"
        "dataset = tf.data.Dataset.range(4).batch(2)\n"
        "iterator = iter(dataset)\n"
        "kept = StepStream(iter([]), 2, iterator)\n"
        "raise SystemExit(7)\n"
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, "-c", code], env=env, timeout=60, check=False)
    assert done.returncode == 7
