"""Training control: validation every n updates, step and time budgets, keep-best checkpoints,
export on best, the profiler, and continuous evaluation of checkpoints."""

from __future__ import annotations

import datetime
import functools
import json
import os
import shutil
from pathlib import Path
from typing import ClassVar

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_weights_equal, make_data, make_model, weights_of

import tfloop
import tfloop.trainer
from tfloop._fit_args import plan_fit
from tfloop.callbacks import CSVLogger, ExportBest, JSONLLogger, Profiler
from tfloop.errors import CheckpointError, ConfigError

X, Y = make_data(56)  # 7 batches of 8
VALIDATION = make_data(24, seed=1)


class Crash(RuntimeError):
    """Raised by ``CrashAt``: a run that dies mid-training."""


class CrashAt(tfloop.Callback):
    """Raises ``Crash`` at the first execution that reaches update ``step``."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, batch, logs):
        if logs["step"] >= self.step:
            raise Crash


def make_trainer(*, k=3, accumulate=1, callbacks=(), checkpoint=None, cls=tfloop.Trainer):
    return cls(
        make_model(),
        "adam",
        "categorical_crossentropy",
        ["accuracy"],
        steps_per_execution=k,
        accumulate_steps=accumulate,
        callbacks=list(callbacks),
        checkpoint=checkpoint,
        jit_compile=False,
        seed=0,
    )


def fit(trainer, epochs=2, **kwargs):
    return trainer.fit((X, Y), epochs=epochs, batch_size=8, verbose=0, **kwargs)


def validation_values(record):
    return {key: value for key, value in record.items() if key.startswith("val_")}


def checkpoint_steps(directory):
    return sorted(
        int(p.name[len("ckpt-") : -len(".index")]) for p in directory.glob("ckpt-*.index")
    )


# ---------------------------------------------------------------------- validation every n


@pytest.mark.parametrize(("k", "accumulate", "every"), [(4, 1, 3), (3, 2, 2), (2, 1, 7)])
def test_validations_land_on_exact_update_counts_and_equal_a_run_stopped_there(
    k, accumulate, every
):
    trainer = make_trainer(k=k, accumulate=accumulate)
    history = fit(trainer, validation_data=VALIDATION, validation_every_n_steps=every)
    total = int(trainer.optimizer.iterations)
    per_epoch = -(-7 // accumulate)
    assert [r["step"] for r in history.evaluations] == list(range(every, total + 1, every))
    assert [r["epoch"] for r in history.evaluations] == [
        (r["step"] - 1) // per_epoch for r in history.evaluations
    ]
    # The validations do not disturb training: the epoch logs (whose running metrics share
    # the metric objects with validation) and the weights are those of a run without them.
    plain = make_trainer(k=k, accumulate=accumulate)
    assert fit(plain, validation_data=VALIDATION).history == history.history
    assert_weights_equal(weights_of(plain.model), weights_of(trainer.model))
    for record in history.evaluations[:2]:
        stopped = make_trainer(k=k, accumulate=accumulate)
        fit(stopped, max_steps=record["step"])
        # (a budget spent exactly at the end of the last epoch did not cut the run short)
        assert stopped.stop_reason == ("max_steps" if record["step"] < total else "epochs")
        assert int(stopped.optimizer.iterations) == record["step"]
        logs = stopped.evaluate(VALIDATION, batch_size=8)
        assert {f"val_{name}": value for name, value in logs.items()} == validation_values(record)


def test_validation_results_reach_callbacks_and_loggers_at_their_step(tmp_path):
    seen = []

    class Record(tfloop.Callback):
        def on_eval_end(self, logs):
            info = self.trainer.run_info
            seen.append((int(logs["step"]), info.step_validation, sorted(logs)))

    jsonl, csv_path = tmp_path / "run.jsonl", tmp_path / "run.csv"
    trainer = make_trainer(k=2, callbacks=[Record(), JSONLLogger(jsonl), CSVLogger(csv_path)])
    history = fit(trainer, validation_data=VALIDATION, validation_every_n_steps=4)
    # updates 4, 8 and 12 mid-epoch; the epoch ends at 7 and 14 validate as validation_freq says
    assert seen == [
        (4, True, ["accuracy", "loss", "step"]),
        (7, False, ["accuracy", "loss", "step"]),
        (8, True, ["accuracy", "loss", "step"]),
        (12, True, ["accuracy", "loss", "step"]),
        (14, False, ["accuracy", "loss", "step"]),
    ]
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    validations = [r for r in records if r["event"] == "validation"]
    assert [(r["step"], r["epoch"]) for r in validations] == [(4, 0), (8, 1), (12, 1)]
    for record, evaluation in zip(validations, history.evaluations, strict=True):
        assert validation_values(record) == validation_values(evaluation)
    assert [r["event"] for r in records].count("epoch") == 2
    rows = csv_path.read_text().splitlines()
    assert rows[0] == "epoch,step,val_accuracy,val_loss,accuracy,loss"  # in order of appearance
    assert [row.split(",")[:2] for row in rows[1:]] == [
        ["0", "4"],
        ["0", "7"],
        ["1", "8"],
        ["1", "12"],
        ["1", "14"],
    ]


def test_throughput_leaves_mid_epoch_validations_out():
    clock = Clock()

    class Advance(tfloop.Callback):  # a second per update, a hundred per validation
        def on_fit_start(self, logs):
            self.step = 0

        def on_train_batch_end(self, batch, logs):
            clock.now += logs["step"] - self.step
            self.step = int(logs["step"])

        def on_eval_end(self, logs):  # before Throughput's on_eval_end: during the pass
            clock.now += 100.0

    def rates(**kwargs):
        callbacks = [Advance(), tfloop.callbacks.Throughput(clock=clock)]
        history = fit(make_trainer(k=2, callbacks=callbacks), validation_data=VALIDATION, **kwargs)
        return history.history["steps_per_second"]

    assert rates(validation_every_n_steps=3) == rates() == [1.0, 1.0]


def test_tensorboard_writes_each_validation_at_its_step(tmp_path):
    pytest.importorskip("tensorboard")
    board = tfloop.callbacks.TensorBoard(tmp_path, throughput=False)
    history = fit(
        make_trainer(k=2, callbacks=[board]),
        validation_data=VALIDATION,
        validation_every_n_steps=5,
    )
    loss = [
        (event.step, float(tf.make_ndarray(value.tensor)))
        for path in sorted((tmp_path / "validation").iterdir())
        for event in tf.compat.v1.train.summary_iterator(str(path))
        for value in event.summary.value
        if value.tag == "evaluation_loss_vs_iterations"
    ]
    assert [step for step, _ in loss] == [r["step"] for r in history.evaluations] == [5, 10]
    assert [v for _, v in loss] == pytest.approx([r["val_loss"] for r in history.evaluations])


# ------------------------------------------------------------------------------- budgets


def test_max_steps_is_exact_and_counted_across_resumes(tmp_path):
    def run(directory, **kwargs):
        trainer = make_trainer(checkpoint=tfloop.Checkpointer(directory))
        history = fit(trainer, epochs=3, **kwargs)
        return trainer, history

    straight, straight_history = run(tmp_path / "straight")
    first, _ = run(tmp_path / "run", max_steps=10)  # 7 updates an epoch: mid-epoch 1
    assert first.stop_reason == "max_steps" and int(first.optimizer.iterations) == 10
    assert Path(tf.train.latest_checkpoint(str(tmp_path / "run"))).name == "ckpt-10"
    again, again_history = run(tmp_path / "run", max_steps=10)  # already there
    assert again.stop_reason == "max_steps" and int(again.optimizer.iterations) == 10
    assert again_history.epoch == [0]  # the run's History, restored from the checkpoint
    assert again_history.history["loss"] == straight_history.history["loss"][:1]
    second, _ = run(tmp_path / "run", max_steps=17)
    assert int(second.optimizer.iterations) == 17
    last, last_history = run(tmp_path / "run")
    assert last.stop_reason == "epochs" and int(last.optimizer.iterations) == 21
    assert last_history.history == straight_history.history
    assert_weights_equal(weights_of(straight.model), weights_of(last.model))


class Clock:
    """A clock the test moves: ``Tick`` advances it by ten seconds per execution."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class Tick(tfloop.Callback):
    def __init__(self, clock):
        self.clock = clock

    def on_train_batch_end(self, batch, logs):
        self.clock.now += 10.0


def test_max_time_stops_at_the_first_execution_boundary_after_the_budget(tmp_path, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(tfloop.trainer, "plan_fit", functools.partial(plan_fit, clock=clock))

    def run(max_time):
        checkpointer = tfloop.Checkpointer(tmp_path, every_epoch=False)
        trainer = make_trainer(k=2, callbacks=[Tick(clock)], checkpoint=checkpointer)
        fit(trainer, epochs=3, max_time=max_time)
        return trainer

    first = run(25)  # boundaries at +10, +20, +30 s: the third is the first past the budget
    assert first.stop_reason == "max_time" and int(first.optimizer.iterations) == 6
    assert checkpoint_steps(tmp_path) == [6]  # saved at the stop
    # The budget is the run's (kept in the checkpoint): 30 s spent, 5 left: one execution.
    second = run(datetime.timedelta(seconds=35))
    assert second.stop_reason == "max_time" and int(second.optimizer.iterations) == 7
    third = run(1000)
    assert third.stop_reason == "epochs" and int(third.optimizer.iterations) == 21


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"validation_every_n_steps": 0, "validation_data": VALIDATION}, "validation_every"),
        ({"validation_every_n_steps": 5}, "validation_data"),
        ({"max_steps": 0}, "max_steps"),
        ({"max_time": -1}, "max_time"),
        ({"max_time": datetime.timedelta(0)}, "max_time"),
        ({"max_time": "1h"}, "max_time"),
    ],
)
def test_bad_control_arguments_are_named_before_training(kwargs, name):
    trainer = make_trainer()
    with pytest.raises(ConfigError, match=name):
        fit(trainer, **kwargs)
    assert int(trainer.optimizer.iterations) == 0


# ---------------------------------------------------------------------------- keep-best

# The monitored value, scripted by update count: the validation at update s reports SCORES[s].
SCORES = {2: 5.0, 4: 3.0, 6: 4.0, 7: 1.5, 8: 6.0, 10: 2.0, 12: 2.0, 14: 7.0}


class Scripted(tfloop.Trainer):
    scores: ClassVar[dict[int, float]] = SCORES

    def test_step(self, batch):
        super().test_step(batch)
        table = tf.constant([self.scores.get(step, 9.0) for step in range(32)])
        return {"score": tf.gather(table, self.optimizer.iterations)}


class WeightsAt(tfloop.Callback):
    """The model's weights at the end of each execution, by update count."""

    def __init__(self):
        self.weights = {}

    def on_train_batch_end(self, batch, logs):
        self.weights[int(logs["step"])] = weights_of(self.trainer.model)


def keep_best_run(directory, *callbacks):
    checkpointer = tfloop.Checkpointer(
        directory, max_to_keep=2, keep_best=3, monitor="val_score", mode="min"
    )
    trainer = make_trainer(k=2, callbacks=callbacks, checkpoint=checkpointer, cls=Scripted)
    fit(trainer, validation_data=VALIDATION, validation_every_n_steps=2)
    return trainer, checkpointer


def test_keep_best_keeps_exactly_the_best_and_the_newest_checkpoints(tmp_path):
    weights = WeightsAt()
    _, checkpointer = keep_best_run(tmp_path, weights)
    # saved at every validation (2, 4, ..., 14) and epoch end (7, 14): the newest two are 12
    # and 14; the best three 7 (1.5), 10 and 12 (2.0, the earlier first)
    assert checkpoint_steps(tmp_path) == [7, 10, 12, 14]
    assert checkpointer.best == str(tmp_path / "ckpt-7")
    assert checkpointer.best_checkpoints == [
        (str(tmp_path / f"ckpt-{step}"), SCORES[step]) for step in (7, 10, 12)
    ]
    assert [Path(p).name for p in checkpointer.checkpoints] == ["ckpt-12", "ckpt-14"]
    for step in (7, 10, 12):
        model = make_model(seed=1)
        tf.train.Checkpoint(model=model).read(str(tmp_path / f"ckpt-{step}")).expect_partial()
        assert_weights_equal(weights.weights[step], weights_of(model))


def test_keep_best_records_survive_a_crash(tmp_path):
    _, straight = keep_best_run(tmp_path / "straight")
    with pytest.raises(Crash):
        keep_best_run(tmp_path / "run", CrashAt(9))  # last checkpoint: update 8
    assert checkpoint_steps(tmp_path / "run") == [4, 6, 7, 8]
    _, resumed = keep_best_run(tmp_path / "run")
    assert checkpoint_steps(tmp_path / "run") == checkpoint_steps(tmp_path / "straight")
    assert [(Path(p).name, v) for p, v in resumed.best_checkpoints] == [
        (Path(p).name, v) for p, v in straight.best_checkpoints
    ]


def test_keep_best_with_a_key_the_logs_never_have_lists_the_keys(tmp_path):
    checkpointer = tfloop.Checkpointer(tmp_path, keep_best=2, monitor="val_acc")
    with pytest.raises(ConfigError, match=r"val_acc.*val_accuracy, val_loss"):
        fit(make_trainer(checkpoint=checkpointer), validation_data=VALIDATION)


def test_keep_best_on_a_validation_key_without_validation_fails_before_training(tmp_path):
    trainer = make_trainer(checkpoint=tfloop.Checkpointer(tmp_path, keep_best=2))
    with pytest.raises(ConfigError, match="val_loss"):
        fit(trainer)
    assert int(trainer.optimizer.iterations) == 0


# --------------------------------------------------------------------------- export best


class EpochWeights(tfloop.Callback):
    def __init__(self):
        self.weights = []

    def on_epoch_end(self, epoch, logs):
        self.weights.append(weights_of(self.trainer.model))


@pytest.mark.parametrize("name", ["best.keras", "best_saved_model"])
def test_export_best_holds_the_best_epochs_weights(tmp_path, name):
    path = tmp_path / name
    export = ExportBest(path, monitor="val_score", mode="min")
    epochs = EpochWeights()
    trainer = make_trainer(k=4, callbacks=[export, epochs], cls=Scripted)
    # epoch ends at updates 7, 14, 21, 28: scores 1.5, 7.0, 9.0, 9.0
    fit(trainer, epochs=4, validation_data=VALIDATION)
    assert (export.best, export.best_epoch, export.best_step) == (1.5, 0, 7)
    if name.endswith(".keras"):
        assert_weights_equal(weights_of(keras.models.load_model(path)), epochs.weights[0])
    else:
        trainer.model.set_weights(epochs.weights[0])
        loaded = tf.saved_model.load(str(path))
        expected = trainer.model(X).numpy()
        np.testing.assert_allclose(loaded.serve(tf.constant(X)).numpy(), expected, rtol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no temporary left


def test_export_best_judges_validations_every_n_steps_too(tmp_path):
    class BestMidEpoch(Scripted):
        scores: ClassVar[dict[int, float]] = {4: 1.0}

    export = ExportBest(tmp_path / "best.keras", monitor="val_score", mode="min")
    weights = WeightsAt()
    trainer = make_trainer(k=2, callbacks=[export, weights], cls=BestMidEpoch)
    fit(trainer, validation_data=VALIDATION, validation_every_n_steps=2)
    assert (export.best, export.best_epoch, export.best_step) == (1.0, 0, 4)
    assert_weights_equal(weights_of(keras.models.load_model(export.path)), weights.weights[4])


@pytest.mark.parametrize("name", ["model.keras", "saved_model"])
def test_an_export_that_fails_leaves_the_previous_one_whole(tmp_path, monkeypatch, name):
    trainer = make_trainer()
    path = tmp_path / name
    trainer.export(path)
    first = trainer.predict(X)
    fit(trainer, epochs=1)
    trainer.export(path)  # replaces the first
    second = trainer.predict(X)

    def half_written(self, filepath, *args, **kwargs):
        target = Path(filepath)
        if target.suffix == ".keras":
            target.write_bytes(b"partial")
        else:
            target.mkdir()
            (target / "partial").write_text("x")
        raise OSError("disk full")

    monkeypatch.setattr(keras.Model, "save", half_written)
    monkeypatch.setattr(keras.Model, "export", half_written)
    with pytest.raises(OSError, match="disk full"):
        trainer.export(path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]
    if name.endswith(".keras"):
        reloaded = keras.models.load_model(path)(X).numpy()
    else:
        loaded = tf.saved_model.load(str(path))
        reloaded = loaded.serve(tf.constant(X)).numpy()
    np.testing.assert_allclose(reloaded, second, rtol=1e-5, atol=1e-6)
    assert not np.allclose(first, second)


# ------------------------------------------------------------------------------- profiler


def test_the_profiler_traces_the_chosen_executions(tmp_path):
    profiler = Profiler(tmp_path, executions=(2, 3))
    fit(make_trainer(k=2, callbacks=[profiler]), epochs=1)  # 4 executions
    assert profiler.traced == [2, 3]
    assert list(tmp_path.glob("plugins/profile/*/*.xplane.pb"))


@pytest.mark.parametrize("executions", [0, (3, 2), (1, 2, 3), "2"])
def test_bad_profiler_executions_are_named(tmp_path, executions):
    with pytest.raises(ConfigError, match="executions"):
        Profiler(tmp_path, executions=executions)


# ------------------------------------------------------------------- evaluate_checkpoints


def test_evaluate_checkpoints_yields_each_checkpoint_once_in_order(tmp_path):
    checkpointer = tfloop.Checkpointer(tmp_path, every_n_steps=3, max_to_keep=20)
    trainer = make_trainer(checkpoint=checkpointer)
    fit(trainer, epochs=1)  # saves at updates 3, 6 and 7 (the epoch end)
    evaluator = make_trainer()
    results = tfloop.evaluate_checkpoints(evaluator, tmp_path, VALIDATION, timeout=0)
    assert [next(results)[0], next(results)[0]] == [3, 6]
    fit(trainer, epochs=3)  # new checkpoints while the evaluator is between two of them
    seen = [step for step, _ in results]
    assert seen == [7, 9, 12, 14, 15, 18, 21]
    assert int(evaluator.optimizer.iterations) == 21
    final = tfloop.evaluate_checkpoints(evaluator, tmp_path, VALIDATION, timeout=0)
    *_, (step, logs) = final
    assert step == 21 and logs == trainer.evaluate(VALIDATION)


def test_evaluate_checkpoints_reads_only_complete_checkpoints_of_the_directory(tmp_path):
    fit(make_trainer(checkpoint=tfloop.Checkpointer(tmp_path, every_epoch=True)), epochs=2)
    # files of a save in progress (not in the index yet), and another worker's private copy
    for suffix in (".index", ".data-00000-of-00001"):
        shutil.copy(tmp_path / f"ckpt-14{suffix}", tmp_path / f"ckpt-99{suffix}")
    worker = tmp_path / ".tfloop-worker-1"
    worker.mkdir()
    for path in tmp_path.glob("ckpt-14*"):
        shutil.copy(path, worker / path.name.replace("14", "50"))
    (worker / "checkpoint").write_text('model_checkpoint_path: "ckpt-50"\n')
    results = tfloop.evaluate_checkpoints(make_trainer(), tmp_path, VALIDATION, timeout=0)
    steps = [step for step, _ in results]
    assert steps == [7, 14]


def test_evaluate_checkpoints_of_another_model_raise(tmp_path):
    fit(make_trainer(checkpoint=tfloop.Checkpointer(tmp_path)), epochs=1)
    other = tfloop.Trainer(make_model(classes=4), "adam", "categorical_crossentropy")
    with pytest.raises(CheckpointError, match="model"):
        next(tfloop.evaluate_checkpoints(other, tmp_path, VALIDATION, timeout=0))


def test_the_evaluate_checkpoints_command_runs_a_scripts_evaluation(tmp_path, capsys):
    fit(make_trainer(checkpoint=tfloop.Checkpointer(tmp_path / "run")), epochs=2)
    script = tmp_path / "job.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "import tfloop\n"
        "from conftest import make_data, make_model\n"
        "def evaluation():\n"
        "    trainer = tfloop.Trainer(make_model(), 'adam', 'categorical_crossentropy')\n"
        "    return trainer, make_data(24, seed=1)\n"
        "if __name__ == '__main__':\n"
        "    raise SystemExit('the training part must not run')\n"
    )
    from tfloop.cli import main

    assert main(["evaluate-checkpoints", str(script), str(tmp_path / "run"), "--timeout", "0"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["step"] for line in lines] == [7, 14]
    assert main(["evaluate-checkpoints", f"{script}:missing", str(tmp_path / "run")]) == 1
    assert "missing" in capsys.readouterr().err


# ------------------------------------------------------------------------ exact resume


def control_run(directory, *callbacks, **kwargs):
    checkpointer = tfloop.Checkpointer(directory, every_n_steps=5, keep_best=2)
    trainer = make_trainer(
        k=2, callbacks=[JSONLLogger(directory / "run.jsonl"), *callbacks], checkpoint=checkpointer
    )
    history = fit(
        trainer, epochs=3, validation_data=VALIDATION, validation_every_n_steps=3, **kwargs
    )
    return trainer, history


def jsonl_records(path):
    return [
        {k: v for k, v in json.loads(line).items() if k != "time"}
        for line in Path(path).read_text().splitlines()
    ]


@pytest.mark.parametrize("stop", ["max_steps", "crash"])
def test_a_run_stopped_after_a_mid_epoch_validation_resumes_exactly(tmp_path, stop):
    straight, straight_history = control_run(tmp_path / "straight")
    directory = tmp_path / "run"
    if stop == "max_steps":
        stopped, _ = control_run(directory, max_steps=10)  # validated at 9, mid-epoch 1
        assert stopped.stop_reason == "max_steps"
    else:
        with pytest.raises(Crash):
            control_run(directory, CrashAt(12))  # dies at 12, before its validation
    resumed, history = control_run(directory)
    assert history.history == straight_history.history
    assert history.evaluations == straight_history.evaluations
    assert [r["step"] for r in history.evaluations] == [3, 6, 9, 12, 15, 18, 21]
    assert jsonl_records(directory / "run.jsonl") == jsonl_records(
        tmp_path / "straight" / "run.jsonl"
    )
    assert_weights_equal(weights_of(straight.model), weights_of(resumed.model))
    assert [(Path(p).name, v) for p, v in resumed.checkpoint.best_checkpoints] == [
        (Path(p).name, v) for p, v in straight.checkpoint.best_checkpoints
    ]
    assert os.path.exists(resumed.checkpoint.best + ".index")
