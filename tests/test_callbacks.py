"""The built-in callbacks: event order, Keras parity, logging, resume state, non-finite policy."""

from __future__ import annotations

import csv
import io
import json
import math
import re
import sys
import types
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_weights_equal, make_data, make_model, weights_of
from hypothesis import given, settings
from hypothesis import strategies as st

import tfloop
from tfloop.callbacks import (
    CSVLogger,
    EarlyStopping,
    JSONLLogger,
    KerasCallbacks,
    LearningRateScheduler,
    NonFiniteGuard,
    ProgressBar,
    ReduceLROnPlateau,
    TensorBoard,
    TerminateOnNaN,
    Throughput,
)
from tfloop.errors import ConfigError, NonFiniteError


def trainer_for(*callbacks, optimizer="sgd", metrics=("accuracy",), **options):
    options.setdefault("jit_compile", False)
    return tfloop.Trainer(
        make_model(),
        optimizer,
        "categorical_crossentropy",
        list(metrics),
        callbacks=list(callbacks),
        **options,
    )


class Recorder(tfloop.Callback):
    """Records every event as a string, prefixed by ``name``, into a shared list."""

    def __init__(self, name, events):
        self.name, self.events = name, events

    def _add(self, text):
        self.events.append(f"{self.name}:{text}")

    def on_fit_start(self, logs):
        self._add("fit_start")

    def on_fit_end(self, logs):
        self._add("fit_end")

    def on_epoch_start(self, epoch, logs):
        self._add(f"epoch_start {epoch}")

    def on_epoch_end(self, epoch, logs):
        self._add(f"epoch_end {epoch} {','.join(sorted(logs))}")

    def on_train_batch_end(self, batch, logs):
        self._add(f"batch {batch} step={int(logs['step'])} batch={int(logs['batch'])}")

    def on_eval_start(self, logs):
        self._add("eval_start")

    def on_eval_end(self, logs):
        self._add(f"eval_end {','.join(sorted(logs))}")

    def on_predict_start(self, logs):
        self._add("predict_start")

    def on_predict_end(self, logs):
        self._add("predict_end")


class Inject(tfloop.Callback):
    """Puts ``values[epoch]`` into the epoch logs as ``key`` (runs before the callback tested)."""

    def __init__(self, key, values):
        self.key, self.values = key, values

    def on_epoch_end(self, epoch, logs):
        logs[self.key] = float(self.values[epoch])


# ------------------------------------------------------------------------------ event order


def expected_fit_events(epochs, batches, k, accumulate, validation):
    keys = "accuracy,loss"
    events = ["fit_start"]
    for epoch in range(epochs):
        events.append(f"epoch_start {epoch}")
        ends = [min(end, batches) - 1 for end in range(k, batches + k, k)]
        for last in ends:
            updates_in_epoch = math.ceil((last + 1) / accumulate)
            step = epoch * math.ceil(batches / accumulate) + updates_in_epoch
            events.append(f"batch {last} step={step} batch={last}")
        if validation:  # inside fit, the results come with the update count
            events += ["eval_start", f"eval_end {keys},step"]
            events.append(f"epoch_end {epoch} accuracy,loss,val_accuracy,val_loss")
        else:
            events.append(f"epoch_end {epoch} {keys}")
    return [*events, "fit_end"]


@pytest.mark.parametrize("validation", [False, True])
@pytest.mark.parametrize(("k", "accumulate"), [(1, 1), (3, 1), (4, 2)])
def test_fit_events_come_in_order_once_per_execution(validation, k, accumulate):
    events = []
    x, y = make_data(40)  # 5 batches of 8
    trainer = trainer_for(
        Recorder("a", events),
        Recorder("b", events),
        steps_per_execution=k,
        accumulate_steps=accumulate,
    )
    trainer.fit(
        (x, y), epochs=2, batch_size=8, validation_data=(x, y) if validation else None, verbose=0
    )
    expected = expected_fit_events(2, 5, k, accumulate, validation)
    # every event reaches the callbacks in list order: a, then b
    assert events == [f"{name}:{event}" for event in expected for name in "ab"]


def test_evaluate_and_predict_events_come_in_order():
    events = []
    trainer = trainer_for(Recorder("a", events), steps_per_execution=2)
    x, y = make_data(20)
    trainer.evaluate((x, y), batch_size=4)
    trainer.predict(x, batch_size=4)
    assert events == [
        "a:eval_start",
        "a:eval_end accuracy,loss",
        "a:predict_start",
        "a:predict_end",
    ]


# ---------------------------------------------------------------------------- EarlyStopping


class FakeKerasModel:
    """What Keras's monitor callbacks touch when driven by hand."""

    def __init__(self, learning_rate=1.0):
        self.stop_training = False
        self.metrics = []
        self.optimizer = keras.optimizers.SGD(learning_rate)
        self.run_info = tfloop.callbacks.RunInfo()


def fake_trainer(learning_rate=1.0):
    return types.SimpleNamespace(
        stop_training=False,
        metrics=[],
        optimizer=keras.optimizers.SGD(learning_rate),
        run_info=tfloop.callbacks.RunInfo(),
    )


values = st.lists(st.integers(0, 6).map(float), min_size=1, max_size=10)


@settings(max_examples=60)
@given(
    sequence=values,
    patience=st.integers(0, 3),
    min_delta=st.sampled_from([0.0, 0.5, 1.0]),
    mode=st.sampled_from(["min", "max"]),
    baseline=st.one_of(st.none(), st.integers(0, 6).map(float)),
    start_from_epoch=st.integers(0, 2),
)
def test_early_stopping_stops_where_keras_early_stopping_stops(
    sequence, patience, min_delta, mode, baseline, start_from_epoch
):
    arguments = dict(
        monitor="score",
        min_delta=min_delta,
        patience=patience,
        mode=mode,
        baseline=baseline,
        start_from_epoch=start_from_epoch,
    )
    ours = EarlyStopping(**arguments)
    ours.trainer = fake_trainer()
    ours.on_fit_start({})
    theirs = keras.callbacks.EarlyStopping(**arguments)
    theirs.set_model(FakeKerasModel())
    theirs.on_train_begin({})
    for epoch, value in enumerate(sequence):
        ours.on_epoch_end(epoch, {"score": value})
        theirs.on_epoch_end(epoch, {"score": value})
        assert ours.trainer.stop_training == theirs.model.stop_training
        assert (ours.wait, ours.best_epoch) == (theirs.wait, theirs.best_epoch)
        assert ours.best == (None if theirs.best is None else float(theirs.best))
        if ours.trainer.stop_training:
            break
    assert ours.stopped_epoch == theirs.stopped_epoch


def test_early_stopping_stops_at_the_right_epoch_and_restores_the_best_weights():
    score = [3.0, 1.0, 2.0, 1.5, 0.0, 0.0]  # best at epoch 1, then 2 epochs without improvement
    snapshots = {}

    class Snapshot(tfloop.Callback):
        def on_epoch_end(self, epoch, logs):
            snapshots[epoch] = weights_of(self.trainer.model)

    stopper = EarlyStopping("score", patience=2, mode="min", restore_best_weights=True)
    trainer = trainer_for(Inject("score", score), Snapshot(), stopper, steps_per_execution=2)
    history = trainer.fit(make_data(40), epochs=6, batch_size=8, verbose=0)
    assert history.epoch == [0, 1, 2, 3]
    assert (stopper.stopped_epoch, stopper.best_epoch, stopper.best) == (3, 1, 1.0)
    assert_weights_equal(weights_of(trainer.model), snapshots[1])
    with pytest.raises(AssertionError):
        assert_weights_equal(snapshots[3], snapshots[1])


def test_early_stopping_state_resumes_to_the_same_stop():
    sequence = [5.0, 4.0, 4.5, 4.2, 4.1, 3.0, 3.5, 3.6, 3.7]

    def run(stopper, epochs, start=0):
        stopper.trainer = fake_trainer()
        stopper.on_fit_start({})
        for epoch in range(start, epochs):
            stopper.on_epoch_end(epoch, {"loss": sequence[epoch]})
            if stopper.trainer.stop_training:
                return epoch
        return None

    straight = run(EarlyStopping("loss", patience=2), len(sequence))
    first = EarlyStopping("loss", patience=2)
    assert run(first, 3) is None
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    resumed = EarlyStopping("loss", patience=2)
    resumed.load_state_dict(state)  # the Checkpointer restores before on_fit_start
    assert run(resumed, len(sequence), start=3) == straight == 3
    fresh = EarlyStopping("loss", patience=2)  # without the state it would not stop there
    assert run(fresh, len(sequence), start=3) != straight


def test_best_weights_after_a_resume_come_from_epochs_after_it(caplog):
    model = make_model()
    state = {"wait": 0, "best": 1.0, "best_epoch": 1, "stopped_epoch": 0}

    def resume(losses):
        stopper = EarlyStopping("loss", patience=5, restore_best_weights=True)
        stopper.load_state_dict(state)
        stopper.trainer = types.SimpleNamespace(
            model=model, stop_training=False, metrics=[], run_info=tfloop.callbacks.RunInfo()
        )
        stopper.on_fit_start({})
        snapshots = []
        for epoch, loss in enumerate(losses, start=2):
            model.layers[0].kernel.assign_add(tf.ones_like(model.layers[0].kernel))
            snapshots.append(weights_of(model))
            stopper.on_epoch_end(epoch, {"loss": loss})
        stopper.on_fit_end({})
        return snapshots

    snapshots = resume([2.0, 0.5, 0.7])  # epoch 3 beats the restored best
    assert_weights_equal(weights_of(model), snapshots[1])
    snapshots = resume([2.0, 3.0])  # nothing beats it: keep the last weights and say why
    assert_weights_equal(weights_of(model), snapshots[-1])
    assert "came before the run was resumed" in caplog.text


@pytest.mark.parametrize(
    "make",
    [
        lambda: EarlyStopping("los"),
        lambda: ReduceLROnPlateau("los"),
    ],
)
def test_an_unknown_monitor_key_names_the_keys_the_logs_have(make):
    trainer = trainer_for(make())
    with pytest.raises(ConfigError, match="monitor='los'") as error:
        trainer.fit(make_data(16), epochs=2, batch_size=8, verbose=0)
    # ReduceLROnPlateau adds the learning rate to the logs before it looks
    assert re.search("Available keys: accuracy, (learning_rate, )?loss\\.", str(error.value))


@pytest.mark.parametrize("make", [lambda: EarlyStopping(), lambda: ReduceLROnPlateau()])
def test_a_validation_monitor_without_validation_data_fails_before_training(make):
    trainer = trainer_for(make())
    with pytest.raises(ConfigError, match="validation_data"):
        trainer.fit(make_data(16), epochs=2, batch_size=8, verbose=0)
    assert int(trainer.optimizer.iterations) == 0


def test_a_validation_monitor_skips_epochs_without_validation():
    stopper = EarlyStopping("val_loss", patience=0, min_delta=10.0)
    trainer = trainer_for(stopper)
    x, y = make_data(16)
    history = trainer.fit(
        (x, y), epochs=6, batch_size=8, validation_data=(x, y), validation_freq=2, verbose=0
    )
    # validation at epochs 1 and 3; no improvement of 10 at epoch 3 stops there
    assert history.epoch == [0, 1, 2, 3] and stopper.stopped_epoch == 3


@pytest.mark.parametrize(
    "bad",
    [
        dict(patience=-1),
        dict(min_delta=-0.1),
        dict(mode="minimum"),
        dict(monitor=""),
        dict(start_from_epoch=1.5),
    ],
)
def test_early_stopping_rejects_bad_arguments_by_name(bad):
    name = next(iter(bad))
    with pytest.raises(ConfigError, match=name):
        EarlyStopping(**bad)


def test_auto_mode_follows_the_metric_direction_or_asks():
    stopper = EarlyStopping("val_accuracy", patience=0)
    trainer = trainer_for(stopper)
    x, y = make_data(16)
    trainer.fit((x, y), epochs=1, batch_size=8, validation_data=(x, y), verbose=0)
    assert stopper.monitor.direction() == "max"
    with pytest.raises(ConfigError, match="mode='min' or mode='max'"):
        trainer_for(Inject("score", [0, 0]), EarlyStopping("score")).fit(
            (x, y), epochs=2, batch_size=8, verbose=0
        )


# ------------------------------------------------------------------------ ReduceLROnPlateau


@settings(max_examples=60)
@given(
    sequence=values,
    patience=st.integers(0, 3),
    cooldown=st.integers(0, 2),
    factor=st.sampled_from([0.1, 0.5]),
    min_lr=st.sampled_from([0.0, 0.01, 0.3]),
    min_delta=st.sampled_from([0.0, 1.0]),
    mode=st.sampled_from(["min", "max"]),
)
def test_reduce_lr_on_plateau_matches_keras(
    sequence, patience, cooldown, factor, min_lr, min_delta, mode
):
    arguments = dict(
        monitor="score",
        factor=factor,
        patience=patience,
        mode=mode,
        min_delta=min_delta,
        cooldown=cooldown,
        min_lr=min_lr,
    )
    ours = ReduceLROnPlateau(**arguments)
    ours.trainer = fake_trainer()
    ours.on_fit_start({})
    theirs = keras.callbacks.ReduceLROnPlateau(**arguments)
    theirs.set_model(FakeKerasModel())
    theirs.on_train_begin({})
    for epoch, value in enumerate(sequence):
        ours_logs, their_logs = {"score": value}, {"score": value}
        ours.on_epoch_end(epoch, ours_logs)
        theirs.on_epoch_end(epoch, their_logs)
        assert ours_logs["learning_rate"] == their_logs["learning_rate"]
        assert float(ours.trainer.optimizer.learning_rate) == float(
            theirs.model.optimizer.learning_rate
        )
        assert (ours.wait, ours.cooldown_counter) == (theirs.wait, theirs.cooldown_counter)


def test_reduce_lr_on_plateau_lowers_the_trainers_learning_rate():
    reduce = ReduceLROnPlateau("score", factor=0.5, patience=1, mode="min")
    trainer = trainer_for(Inject("score", [1.0] * 4), reduce, optimizer=keras.optimizers.SGD(0.8))
    history = trainer.fit(make_data(16), epochs=4, batch_size=8, verbose=0)
    # each epoch logs the rate it ran with; reductions after epochs 1, 2 and 3
    assert history.history["learning_rate"] == pytest.approx([0.8, 0.8, 0.4, 0.2])
    assert float(trainer.optimizer.learning_rate) == pytest.approx(0.1)
    assert json.loads(json.dumps(reduce.state_dict())) == {
        "best": 1.0,
        "wait": 0,
        "cooldown_counter": 0,
    }


def test_reduce_lr_on_plateau_refuses_a_schedule_and_a_bad_factor():
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5)
    trainer = trainer_for(ReduceLROnPlateau("loss"), optimizer=keras.optimizers.SGD(schedule))
    with pytest.raises(ConfigError, match="float learning_rate"):
        trainer.fit(make_data(16), batch_size=8, verbose=0)
    with pytest.raises(ConfigError, match="factor"):
        ReduceLROnPlateau(factor=1.0)


# -------------------------------------------------------------------- learning-rate schedules


def test_learning_rate_scheduler_sets_each_epochs_rate():
    snapshots = []

    class Snapshot(tfloop.Callback):
        def on_epoch_end(self, epoch, logs):
            snapshots.append(weights_of(self.trainer.model))

    rates = [0.1, 0.0, 0.05]
    trainer = trainer_for(LearningRateScheduler(lambda epoch: rates[epoch]), Snapshot())
    history = trainer.fit(make_data(16), epochs=3, batch_size=8, verbose=0)
    assert history.history["learning_rate"] == pytest.approx(rates)
    assert_weights_equal(snapshots[1], snapshots[0])  # a zero rate in epoch 1: no change
    with pytest.raises(AssertionError):
        assert_weights_equal(snapshots[2], snapshots[1])


def test_learning_rate_scheduler_passes_the_current_rate_and_checks_the_result():
    scheduler = LearningRateScheduler(lambda epoch, lr: lr * 0.5)
    trainer = trainer_for(scheduler, optimizer=keras.optimizers.SGD(0.4))
    history = trainer.fit(make_data(16), epochs=2, batch_size=8, verbose=0)
    assert history.history["learning_rate"] == pytest.approx([0.2, 0.1])
    with pytest.raises(ConfigError, match="must return a float"):
        trainer_for(LearningRateScheduler(lambda epoch: "fast")).fit(
            make_data(16), batch_size=8, verbose=0
        )
    with pytest.raises(ConfigError, match="schedule"):
        LearningRateScheduler(lambda a, b, c: 0.1)


@pytest.mark.parametrize("install", ["optimizer", "callback"])
def test_a_keras_schedule_steps_with_updates_not_micro_batches(install):
    # The rate drops to zero after 3 updates: with accumulation, 6 micro-batches.
    x, y = make_data(64)

    def run(accumulate, batch_size):
        schedule = keras.optimizers.schedules.PiecewiseConstantDecay([2], [0.5, 0.0])
        optimizer = keras.optimizers.SGD(schedule if install == "optimizer" else 0.5)
        callbacks = [] if install == "optimizer" else [LearningRateScheduler(schedule)]
        trainer = trainer_for(
            *callbacks, optimizer=optimizer, accumulate_steps=accumulate, steps_per_execution=8
        )
        trainer.fit((x, y), epochs=1, batch_size=batch_size, shuffle=False, verbose=0)
        return weights_of(trainer.model)

    accumulated = run(accumulate=2, batch_size=8)
    assert_weights_equal(accumulated, run(accumulate=1, batch_size=16), rtol=1e-5, atol=1e-6)
    with pytest.raises(AssertionError):
        assert_weights_equal(accumulated, run(accumulate=1, batch_size=8), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ CSV / JSONL


def read_csv(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def test_csv_logger_writes_a_row_per_epoch_and_grows_columns(tmp_path):
    path = tmp_path / "logs" / "run.csv"
    trainer = trainer_for(CSVLogger(path))
    x, y = make_data(16)
    history = trainer.fit(
        (x, y), epochs=4, batch_size=8, validation_data=(x, y), validation_freq=2, verbose=0
    )
    rows = read_csv(path)
    assert list(rows[0]) == ["epoch", "accuracy", "loss", "val_accuracy", "val_loss"]
    assert [row["epoch"] for row in rows] == ["0", "1", "2", "3"]
    assert [float(row["loss"]) for row in rows] == history.history["loss"]
    assert [row["val_loss"] for row in rows][::2] == ["", ""]
    assert [float(row["val_loss"]) for row in rows[1::2]] == history.history["val_loss"]


def test_csv_logger_resumes_without_duplicate_rows(tmp_path):
    path = tmp_path / "run.csv"
    logger = CSVLogger(path)
    for epoch in range(2):
        logger.on_epoch_end(epoch, {"loss": 1.0 / (epoch + 1)})
    state = json.loads(json.dumps(logger.state_dict()))
    logger.on_epoch_end(2, {"loss": 0.3})  # written after the checkpoint, then the job died
    with open(path, "a") as file:
        file.write("3,0.2")  # and a partial line
    resumed = CSVLogger(path)
    resumed.load_state_dict(state)
    resumed.on_epoch_end(2, {"loss": 0.25})
    resumed.on_fit_end({})
    assert [(r["epoch"], r["loss"]) for r in read_csv(path)] == [
        ("0", "1.0"),
        ("1", "0.5"),
        ("2", "0.25"),
    ]


def read_jsonl(path):
    with open(path) as file:
        return [json.loads(line) for line in file]


def test_jsonl_logger_writes_epoch_and_step_records(tmp_path):
    path = tmp_path / "run.jsonl"
    trainer = trainer_for(JSONLLogger(path, every_n_steps=4), steps_per_execution=3)
    x, y = make_data(80)  # 10 steps per epoch: executions end at steps 3, 6, 9, 10
    history = trainer.fit((x, y), epochs=2, batch_size=8, validation_data=(x, y), verbose=0)
    records = read_jsonl(path)
    steps = [(r["epoch"], r["step"], r["batch"]) for r in records if r["event"] == "step"]
    # the first execution reaching each multiple of 4 updates: 6 (4), 9 (8), 13 (12), 16, 20
    assert steps == [(0, 6, 5), (0, 9, 8), (1, 13, 2), (1, 16, 5), (1, 20, 9)]
    epochs = [r for r in records if r["event"] == "epoch"]
    assert [r["step"] for r in epochs] == [10, 20]
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        assert [r[key] for r in epochs] == history.history[key]
    trainer.evaluate((x, y), batch_size=8)
    assert read_jsonl(path)[-1]["event"] == "evaluate"


@given(
    checkpoint_after=st.integers(0, 5),
    written_after=st.integers(0, 3),
    partial=st.sampled_from(["", '{"event": "ep', "\n"]),
)
def test_a_resumed_jsonl_log_has_each_epoch_once(
    tmp_path, checkpoint_after, written_after, partial
):
    path = tmp_path / f"run-{checkpoint_after}-{written_after}-{len(partial)}.jsonl"
    first = JSONLLogger(path)
    state = first.state_dict()
    for epoch in range(checkpoint_after + written_after):
        first.on_epoch_end(epoch, {"loss": float(epoch)})
        if epoch + 1 == checkpoint_after:
            state = json.loads(json.dumps(first.state_dict()))
    first.on_fit_end({})
    with open(path, "a") as file:
        file.write(partial)
    resumed = JSONLLogger(path)
    resumed.load_state_dict(state)
    for epoch in range(checkpoint_after, 8):
        resumed.on_epoch_end(epoch, {"loss": float(epoch)})
    resumed.on_fit_end({})
    assert [r["epoch"] for r in read_jsonl(path)] == list(range(8))


def test_jsonl_logger_writes_non_finite_values_as_null_and_appends_whole_lines(tmp_path):
    path = tmp_path / "run.jsonl"
    path.write_text('{"event": "epoch", "epoch": 0, "loss": 1.0}\n{"event": "ep')
    logger = JSONLLogger(path, append=True)
    logger.on_epoch_end(1, {"loss": float("nan"), "accuracy": float("inf")})
    logger.on_fit_end({})
    records = read_jsonl(path)
    assert [r["epoch"] for r in records] == [0, 1]
    assert records[1]["loss"] is None and records[1]["accuracy"] is None


# --------------------------------------------------------------------------------- TensorBoard


def read_scalars(directory):
    scalars = {}
    for path in sorted(directory.iterdir()):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append(
                    (event.step, float(tf.make_ndarray(value.tensor)))
                )
    return scalars


def test_tensorboard_writes_scalars_learning_rate_and_throughput(tmp_path):
    pytest.importorskip("tensorboard")
    board = TensorBoard(tmp_path, update_freq=2)
    trainer = trainer_for(board, steps_per_execution=2, optimizer=keras.optimizers.SGD(0.1))
    x, y = make_data(32)
    history = trainer.fit((x, y), epochs=2, batch_size=8, validation_data=(x, y), verbose=0)
    train = read_scalars(tmp_path / "train")
    validation = read_scalars(tmp_path / "validation")
    assert [step for step, _ in train["epoch_loss"]] == [0, 1]
    assert [v for _, v in train["epoch_loss"]] == pytest.approx(history.history["loss"])
    assert [v for _, v in validation["epoch_loss"]] == pytest.approx(history.history["val_loss"])
    assert [v for _, v in train["epoch_learning_rate"]] == pytest.approx([0.1, 0.1])
    assert all(v > 0 for _, v in train["epoch_steps_per_second"])
    assert all(v > 0 for _, v in train["epoch_samples_per_second"])
    assert [step for step, _ in train["batch_loss"]] == [2, 4, 6, 8]


def test_tensorboard_without_the_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard -> ImportError
    with pytest.raises(ConfigError, match=r"tfloop\[tensorboard\]"):
        TensorBoard("logs")


# ------------------------------------------------------------------------- non-finite values


class NaNTrainer(tfloop.Trainer):
    """The loss is NaN for batches whose first x value is negative."""

    def compute_loss(self, batch, training):
        loss = super().compute_loss(batch, training)
        return tf.where(batch[0][0, 0] < 0, tf.constant(float("nan")), loss)


class NaNGradientTrainer(tfloop.Trainer):
    """A finite loss whose gradient for the first kernel is NaN on marked batches."""

    def compute_loss(self, batch, training):
        loss = super().compute_loss(batch, training)
        kernel = self.model.layers[0].kernel[0, 0]
        fine = tf.cast(batch[0][0, 0] >= 0, tf.float32)
        # On marked batches d/dk sqrt((k * 0)^2) is inf * 0 = NaN; the value added is always 0.
        term = tf.sqrt(tf.square(kernel * fine))
        return loss + (term - tf.stop_gradient(term))


def nan_data(bad_batches, n=40, batch_size=4):
    x, y = make_data(n)
    x[:, 0] = np.abs(x[:, 0])
    for batch in bad_batches:
        x[batch * batch_size, 0] = -1.0
    return x, y


@pytest.mark.parametrize("k", [1, 3])
def test_non_finite_guard_raise_names_the_step_and_the_loss(k):
    trainer = NaNTrainer(
        make_model(),
        "sgd",
        "categorical_crossentropy",
        steps_per_execution=k,
        jit_compile=False,
        callbacks=[NonFiniteGuard("raise")],
    )
    with pytest.raises(NonFiniteError, match="non-finite loss at step 1") as error:
        trainer.fit(nan_data([1, 6]), batch_size=4, shuffle=False, verbose=0)
    assert (error.value.step, error.value.tensor) == (1, "loss")
    assert all(np.isfinite(w).all() for w in weights_of(trainer.model))
    # batch 0 was applied, batch 1 dropped; with k=3 batch 2 ran too, then fit raised
    assert int(trainer.optimizer.iterations) == {1: 1, 3: 2}[k]


def test_non_finite_guard_raise_names_the_gradient():
    trainer = NaNGradientTrainer(
        make_model(),
        "sgd",
        "categorical_crossentropy",
        steps_per_execution=4,
        jit_compile=False,
        callbacks=[NonFiniteGuard("raise")],
    )
    with pytest.raises(NonFiniteError) as error:
        trainer.fit(nan_data([5]), batch_size=4, shuffle=False, verbose=0)
    kernel = trainer.model.layers[0].kernel.path
    assert (error.value.step, error.value.tensor) == (5, f"gradient of {kernel}")
    assert all(np.isfinite(w).all() for w in weights_of(trainer.model))


@pytest.mark.parametrize("k", [1, 4])
def test_non_finite_guard_skip_drops_exactly_the_bad_updates(k, caplog):
    x, y = nan_data([2, 6])
    trainer = NaNTrainer(
        make_model(),
        "sgd",
        "categorical_crossentropy",
        steps_per_execution=k,
        jit_compile=False,
        callbacks=[guard := NonFiniteGuard("skip")],
    )
    history = trainer.fit((x, y), batch_size=4, shuffle=False, verbose=0)
    assert guard.skipped == 2 and history.history["non_finite_steps"] == [2.0]
    assert int(trainer.optimizer.iterations) == 8
    assert "skipped an update with non-finite loss at step 2" in caplog.text
    # the same as training without the two bad batches
    keep = np.ones(len(x), bool)
    keep[8:12] = keep[24:28] = False
    reference = tfloop.Trainer(make_model(), "sgd", "categorical_crossentropy", jit_compile=False)
    reference.fit((x[keep], y[keep]), batch_size=4, shuffle=False, verbose=0)
    assert_weights_equal(weights_of(trainer.model), weights_of(reference.model))


def test_non_finite_guard_ignore_checks_nothing():
    trainer = NaNTrainer(
        make_model(),
        "sgd",
        "categorical_crossentropy",
        steps_per_execution=3,
        jit_compile=False,
        callbacks=[NonFiniteGuard("ignore")],
    )
    history = trainer.fit(nan_data([2]), batch_size=4, shuffle=False, verbose=0)
    # a NaN chosen by tf.where has a zero gradient, so the weights stay finite; the mean loss
    # is NaN, and nothing is counted
    assert math.isnan(history.history["loss"][0]) and "non_finite_steps" not in history.history
    assert all(np.isfinite(w).all() for w in weights_of(trainer.model))
    assert int(trainer.optimizer.iterations) == 10


def test_terminate_on_nan_stops_at_the_execution_and_keeps_weights_finite(caplog):
    terminate = TerminateOnNaN()
    trainer = NaNGradientTrainer(
        make_model(),
        "sgd",
        "categorical_crossentropy",
        steps_per_execution=2,
        jit_compile=False,
        callbacks=[terminate],
    )
    history = trainer.fit(nan_data([2]), epochs=3, batch_size=4, shuffle=False, verbose=0)
    assert int(trainer.optimizer.iterations) == 3 and len(history.epoch) == 1
    assert all(np.isfinite(w).all() for w in weights_of(trainer.model))
    assert "terminating training" in caplog.text
    with pytest.raises(NonFiniteError):
        NaNTrainer(
            make_model(),
            "sgd",
            "categorical_crossentropy",
            jit_compile=False,
            callbacks=[TerminateOnNaN(raise_error=True)],
        ).fit(nan_data([1]), batch_size=4, shuffle=False, verbose=0)


def test_non_finite_policies_are_checked():
    with pytest.raises(ConfigError, match="policy"):
        NonFiniteGuard("warn")
    # The policy is part of what the step traces: the conflict is found at construction.
    with pytest.raises(ConfigError, match="different non-finite policies"):
        trainer_for(NonFiniteGuard("raise"), NonFiniteGuard("ignore"))


# -------------------------------------------------------------------------------- Throughput


def test_throughput_reports_samples_and_steps_per_second():
    ticks = iter(range(100))
    seen = []

    class Record(tfloop.Callback):
        def on_train_batch_end(self, batch, logs):
            seen.append((logs["samples_per_second"], logs["steps_per_second"]))

    throughput = Throughput(clock=lambda: float(next(ticks)))  # one second per event
    trainer = trainer_for(throughput, Record(), steps_per_execution=2, accumulate_steps=2)
    history = trainer.fit(make_data(36), epochs=1, batch_size=8, verbose=0)
    # 5 micro-batches (8, 8, 8, 8, 4 examples) in executions of 2, 2, 1; 3 updates
    assert seen == [(16.0, 1.0), (16.0, 1.0), (4.0, 1.0)]
    assert history.history["samples_per_second"] == [36 / 3]
    assert history.history["steps_per_second"] == [3 / 3]


# ------------------------------------------------------------------------------ Keras adapter


def test_keras_callbacks_run_unchanged(tmp_path):
    x, y = make_data(32)
    events = []
    keras_callbacks = [
        keras.callbacks.LambdaCallback(
            on_train_begin=lambda logs: events.append("train_begin"),
            on_epoch_begin=lambda epoch, logs: events.append(f"epoch_begin {epoch}"),
            on_train_batch_end=lambda batch, logs: events.append(f"batch {batch}"),
            on_epoch_end=lambda epoch, logs: events.append(f"epoch_end {epoch}"),
            on_train_end=lambda logs: events.append("train_end"),
        ),
        keras.callbacks.CSVLogger(str(tmp_path / "keras.csv")),
        keras.callbacks.ReduceLROnPlateau("val_accuracy", factor=0.5, patience=0, min_delta=1.0),
        keras.callbacks.EarlyStopping("val_loss", patience=1, min_delta=10.0),
    ]
    trainer = trainer_for(
        KerasCallbacks(keras_callbacks), steps_per_execution=3, optimizer=keras.optimizers.SGD(0.4)
    )
    history = trainer.fit((x, y), epochs=5, batch_size=8, validation_data=(x, y), verbose=0)
    assert history.epoch == [0, 1]  # EarlyStopping: no improvement of 10 in epoch 1
    assert events == [
        "train_begin",
        "epoch_begin 0",
        "batch 2",
        "batch 3",
        "epoch_end 0",
        "epoch_begin 1",
        "batch 2",
        "batch 3",
        "epoch_end 1",
        "train_end",
    ]
    rows = read_csv(tmp_path / "keras.csv")
    assert [float(row["loss"]) for row in rows] == pytest.approx(history.history["loss"])
    assert float(trainer.optimizer.learning_rate) == pytest.approx(0.2)  # halved after epoch 1


@pytest.mark.parametrize(
    "name",
    [
        "LearningRateScheduler",
        "ModelCheckpoint",
        "History",
        "ProgbarLogger",
        "SwapEMAWeights",
    ],
)
def test_more_keras_callbacks_run_through_the_adapter(name, tmp_path, capsys):
    make = {
        "LearningRateScheduler": lambda: keras.callbacks.LearningRateScheduler(
            lambda epoch, lr: 0.5**epoch
        ),
        "ModelCheckpoint": lambda: keras.callbacks.ModelCheckpoint(
            str(tmp_path / "model-{epoch}.weights.h5"), save_weights_only=True
        ),
        "History": keras.callbacks.History,
        "ProgbarLogger": keras.callbacks.ProgbarLogger,
        "SwapEMAWeights": lambda: keras.callbacks.SwapEMAWeights(swap_on_epoch=True),
    }
    callback = make[name]()
    optimizer = keras.optimizers.SGD(0.1, use_ema=name == "SwapEMAWeights")
    trainer = trainer_for(KerasCallbacks([callback]), optimizer=optimizer, steps_per_execution=2)
    trainer.fit(make_data(16), epochs=2, batch_size=8, verbose=0)
    if name == "LearningRateScheduler":
        assert float(trainer.optimizer.learning_rate) == 0.5
    if name == "ModelCheckpoint":
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            "model-1.weights.h5",
            "model-2.weights.h5",
        ]
    if name == "History":
        assert callback.epoch == [0, 1] and len(callback.history["loss"]) == 2
    if name == "ProgbarLogger":
        assert "loss:" in capsys.readouterr().out


def test_keras_early_stopping_matches_ours_on_the_same_run():
    x, y = make_data(48)

    def run(callback):
        trainer = trainer_for(callback, optimizer=keras.optimizers.SGD(0.3))
        history = trainer.fit(
            (x, y),
            epochs=8,
            batch_size=8,
            validation_data=(x[:16], y[:16]),
            shuffle=False,
            verbose=0,
        )
        return history.epoch, weights_of(trainer.model)

    arguments = dict(monitor="val_loss", patience=1, min_delta=0.01, restore_best_weights=True)
    ours_epochs, ours_weights = run(EarlyStopping(**arguments))
    keras_epochs, keras_weights = run(KerasCallbacks([keras.callbacks.EarlyStopping(**arguments)]))
    assert ours_epochs == keras_epochs
    assert_weights_equal(ours_weights, keras_weights)


def test_keras_terminate_on_nan_stops_training():
    trainer = NaNTrainer(
        make_model(),
        "sgd",
        "categorical_crossentropy",
        steps_per_execution=2,
        jit_compile=False,
        callbacks=[KerasCallbacks([keras.callbacks.TerminateOnNaN()])],
    )
    history = trainer.fit(nan_data([2]), epochs=3, batch_size=4, shuffle=False, verbose=0)
    assert int(trainer.optimizer.iterations) == 4 and len(history.epoch) == 1


def test_keras_callback_counters_resume_after_on_train_begin():
    stopper = keras.callbacks.EarlyStopping("loss", patience=3)
    adapter = KerasCallbacks([stopper])
    adapter.load_state_dict(
        {"callbacks": [{"wait": 2, "stopped_epoch": 0, "best": 0.5, "best_epoch": 1}]}
    )
    trainer = trainer_for(adapter)
    trainer.fit(make_data(8), epochs=1, batch_size=8, verbose=0)
    # the restored counters survived on_train_begin's reset; epoch 0 did not beat 0.5
    assert stopper.best == 0.5 and stopper.wait == 3
    assert json.loads(json.dumps(adapter.state_dict())) == {
        "callbacks": [{"wait": 3, "stopped_epoch": 0, "best": 0.5, "best_epoch": 1}],
    }


def test_keras_callbacks_given_directly_run_through_the_adapter():
    stop = keras.callbacks.EarlyStopping(monitor="loss", min_delta=100.0)
    trainer = trainer_for(stop)
    assert isinstance(trainer.callbacks[0], KerasCallbacks)
    history = trainer.fit(make_data(16), epochs=5, batch_size=8, verbose=0)
    assert len(history.history["loss"]) == 2  # Keras's EarlyStopping stopped it
    with pytest.raises(ConfigError, match=r"not a keras\.callbacks\.Callback"):
        KerasCallbacks([EarlyStopping()])


# ------------------------------------------------------------------------------ progress bar


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_without_a_terminal_writes_plain_periodic_lines():
    out = io.StringIO()
    trainer = trainer_for(ProgressBar(stream=out, interval=0.0), steps_per_execution=2)
    trainer.fit(make_data(40), epochs=2, batch_size=8, verbose=0)
    lines = out.getvalue().splitlines()
    assert [line.split(" - ")[:2] for line in lines if "step " in line] == [
        [f"epoch {e}/2", f"step {s}/5"] for e in (1, 2) for s in (2, 4, 5)
    ]
    assert sum(line.startswith("epoch ") and "loss:" in line for line in lines) == 8
    assert not any(ord(char) < 32 and char != "\n" for char in out.getvalue())


def test_progress_on_a_terminal_draws_a_live_bar():
    out = FakeTerminal()
    trainer = trainer_for(ProgressBar(stream=out), steps_per_execution=2)
    trainer.fit(make_data(40), epochs=1, batch_size=8, verbose=0)
    text = out.getvalue()
    assert "\r" in text and "5/5" in text and "loss:" in text and "step/s" in text


# ------------------------------------------------------------------------------------ plots


def test_history_plot_and_the_plot_command_write_pngs(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from tfloop.cli import main

    x, y = make_data(16)
    log = tmp_path / "run.jsonl"
    trainer = trainer_for(JSONLLogger(log))
    history = trainer.fit(
        (x, y), epochs=3, batch_size=8, validation_data=(x, y), validation_freq=2, verbose=0
    )
    png = history.plot(tmp_path / "history.png")
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert tfloop.History.from_jsonl(log).history == history.history
    assert main(["plot", str(log), "--keys", "loss,val_loss"]) == 0
    assert (tmp_path / "run.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["plot", str(log), "--keys", "los"]) == 1
    assert "available keys: accuracy, loss, val_accuracy, val_loss" in capsys.readouterr().err


# ------------------------------------------------------------------------ resume, end to end


class Killed(Exception):
    pass


class DieAfterEpoch(tfloop.Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs):
        if epoch == self.epoch:
            raise Killed


def test_a_killed_and_resumed_run_logs_and_stops_like_a_straight_one(tmp_path):
    if not hasattr(tfloop, "Checkpointer"):
        pytest.skip("this version has no Checkpointer")
    x, y = make_data(40)

    def run(directory, die_after=-1):
        callbacks = [
            JSONLLogger(directory / "run.jsonl", every_n_steps=2),
            CSVLogger(directory / "run.csv"),
            EarlyStopping("loss", patience=2, min_delta=0.012),
            DieAfterEpoch(die_after),
        ]
        # saves at updates 4, 8, 12, ...: the kill after epoch 2 (update 15) loses 3 updates
        checkpoint = tfloop.Checkpointer(directory / "ckpt", every_n_steps=4, every_epoch=False)
        trainer = trainer_for(
            *callbacks,
            optimizer=keras.optimizers.SGD(0.05),
            metrics=(),
            steps_per_execution=2,
            checkpoint=checkpoint,
            seed=0,
        )
        trainer.fit((x, y), epochs=12, batch_size=8, verbose=0)
        return callbacks[2]

    with pytest.raises(Killed):
        run(tmp_path / "resumed", die_after=2)
    resumed = run(tmp_path / "resumed")
    straight = run(tmp_path / "straight")
    assert resumed.state_dict() == straight.state_dict()
    assert 2 < resumed.stopped_epoch == straight.stopped_epoch < 11  # stopped early, after the kill

    def records(directory):
        return [
            {k: v for k, v in r.items() if k != "time"} for r in read_jsonl(directory / "run.jsonl")
        ]

    assert records(tmp_path / "resumed") == records(tmp_path / "straight")
    assert read_csv(tmp_path / "resumed" / "run.csv") == read_csv(tmp_path / "straight" / "run.csv")
