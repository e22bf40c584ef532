"""Every tfloop writer on ``ram://`` (TensorFlow's in-memory filesystem, standing in for a bucket):
it writes there what it writes on local disk, nothing lands on local disk, and a run stopped
mid-way resumes from ``ram://`` exactly. ``ram://`` lives in this process only, so a "kill" here
is an exception raised at an update, or a ``max_steps`` stop, then the same call again."""

from __future__ import annotations

import json
import os
import uuid

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_weights_equal, make_data, make_model, weights_of

import tfloop
from tfloop.callbacks import CSVLogger, ExportBest, JSONLLogger, Profiler, TensorBoard
from tfloop.io import files

X, Y = make_data(56)  # 7 batches of 8
VALIDATION = make_data(24, seed=1)


@pytest.fixture
def ram():
    root = f"ram://{uuid.uuid4().hex}"
    files.makedirs(root)
    yield root
    files.rmtree(root)


@pytest.fixture
def cwd(tmp_path, monkeypatch):
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


class Crash(RuntimeError):
    pass


class CrashAt(tfloop.Callback):
    """Raises ``Crash`` at the first execution that reaches update ``step``."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, batch, logs):
        if logs["step"] >= self.step:
            raise Crash


def make_trainer(callbacks=(), checkpoint=None):
    return tfloop.Trainer(
        make_model(dropout=0.2),
        "adam",
        "categorical_crossentropy",
        ["accuracy"],
        steps_per_execution=3,
        callbacks=list(callbacks),
        checkpoint=checkpoint,
        jit_compile=False,
        seed=0,
    )


def dataset():
    # A new dataset per run, as a new process has; its iterator state goes into checkpoints.
    return tf.data.Dataset.from_tensor_slices((X, Y)).shuffle(56, seed=3).batch(8)


def writers(root):
    return {
        "jsonl": JSONLLogger(files.join(root, "logs", "run.jsonl"), every_n_steps=2),
        "csv": CSVLogger(files.join(root, "logs", "run.csv")),
        "board": TensorBoard(files.join(root, "board"), update_freq=4),
        "profiler": Profiler(files.join(root, "profile"), executions=(2, 2)),
        "best_file": ExportBest(files.join(root, "best.keras")),
        "best_dir": ExportBest(files.join(root, "best_model")),
    }


def run(root, *extra, epochs=3, **fit_options):
    callbacks = writers(root)
    checkpointer = tfloop.Checkpointer(
        files.join(root, "ck"), every_n_steps=4, max_to_keep=2, keep_best=1
    )
    trainer = make_trainer([*callbacks.values(), *extra], checkpointer)
    history = trainer.fit(
        dataset(), epochs=epochs, validation_data=VALIDATION, verbose=0, **fit_options
    )
    return trainer, history


def jsonl_records(path):
    lines = files.read_text(path).splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "time"} for line in lines]


def scalars(directory):
    """(run, tag, step, value) of TensorBoard's event files; the throughput (timings) left out."""
    found = []
    for path in files.glob(files.join(directory, "*", "events.out.tfevents.*")):
        run_name = files.split(files.split(path)[0])[1]
        for record in tf.data.TFRecordDataset(path):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                if not any(timing in value.tag for timing in ("per_second", "input_wait")):
                    number = float(tf.make_ndarray(value.tensor))
                    found.append((run_name, value.tag, event.step, number))
    return sorted(found)


def predictions(path):
    if path.endswith(".keras"):
        return keras.models.load_model(path)(X[:4]).numpy()
    loaded = tf.saved_model.load(path)
    return loaded.serve(tf.constant(X[:4])).numpy()


@pytest.mark.slow
def test_every_writer_writes_to_ram_what_it_writes_to_local_disk(tmp_path, ram, cwd):
    local_root = str(tmp_path / "local")
    local, local_history = run(local_root)
    remote, remote_history = run(ram)
    assert os.listdir(cwd) == []  # nothing of the ram:// run landed on local disk
    assert files.listdir(ram) == sorted(os.listdir(local_root))  # no probe, no temporary
    assert_weights_equal(weights_of(local.model), weights_of(remote.model))
    assert remote_history.history == local_history.history
    # checkpoints, their index and the keep-best record
    assert files.listdir(files.join(ram, "ck")) == sorted(os.listdir(tmp_path / "local" / "ck"))
    state = tf.train.get_checkpoint_state(files.join(ram, "ck"))
    assert state.model_checkpoint_path == files.join(ram, "ck", "ckpt-21")
    assert remote.checkpoint.best == files.join(ram, "ck", files.split(local.checkpoint.best)[1])
    # logs
    for name in ("run.jsonl", "run.csv"):
        assert files.read_text(files.join(ram, "logs", name)).count("\n") > 3
    assert jsonl_records(files.join(ram, "logs", "run.jsonl")) == jsonl_records(
        os.path.join(local_root, "logs", "run.jsonl")
    )
    assert files.read_text(files.join(ram, "logs", "run.csv")) == files.read_text(
        os.path.join(local_root, "logs", "run.csv")
    )
    remote_scalars = scalars(files.join(ram, "board"))
    assert remote_scalars and remote_scalars == scalars(os.path.join(local_root, "board"))
    assert files.glob(files.join(ram, "profile", "plugins", "profile", "*", "*.xplane.pb"))
    # exports of the best epoch
    for name in ("best.keras", "best_model"):
        np.testing.assert_array_equal(
            predictions(files.join(ram, name)), predictions(os.path.join(local_root, name))
        )


@pytest.mark.parametrize("name", ["model.keras", "model"])
def test_an_export_to_ram_replaces_the_previous_one_whole(ram, cwd, name):
    trainer = make_trainer()
    path = files.join(ram, "exports", name)
    assert trainer.export(path) == path
    first = predictions(path)
    trainer.fit((X, Y), batch_size=8, verbose=0)
    trainer.export(path)  # replaces the first
    np.testing.assert_allclose(predictions(path), trainer.predict(X[:4]), rtol=1e-5, atol=1e-6)
    assert not np.allclose(first, predictions(path))
    assert files.listdir(files.join(ram, "exports")) == [name]
    assert os.listdir(cwd) == []


def test_checkpoints_on_ram_are_evaluated_from_there_by_the_function_and_the_command(
    ram, tmp_path, cwd, capsys
):
    directory = files.join(ram, "ck")
    trainer = make_trainer(checkpoint=tfloop.Checkpointer(directory, every_n_steps=3))
    history = trainer.fit((X, Y), batch_size=8, epochs=2, verbose=0)
    evaluator = make_trainer()
    seen = list(tfloop.evaluate_checkpoints(evaluator, directory, VALIDATION, timeout=0))
    assert [step for step, _ in seen] == [9, 12, 14]
    assert seen[-1][1] == trainer.evaluate(VALIDATION)

    script = tmp_path / "job.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
        "import tfloop\n"
        "from conftest import make_data, make_model\n"
        "def evaluation():\n"
        "    trainer = tfloop.Trainer(make_model(dropout=0.2), 'adam', "
        "'categorical_crossentropy', ['accuracy'])\n"
        "    return trainer, make_data(24, seed=1)\n"
    )
    from tfloop.cli import main

    assert main(["evaluate-checkpoints", str(script), directory, "--timeout", "0"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["step"] for line in lines] == [9, 12, 14]

    log = files.join(ram, "logs", "run.jsonl")
    logger = JSONLLogger(log)
    for epoch, logs in enumerate(history.history["loss"]):
        logger.on_epoch_end(epoch, {"loss": logs})
    logger.on_fit_end({})
    pytest.importorskip("matplotlib")
    assert main(["plot", log]) == 0
    assert capsys.readouterr().out.strip() == files.join(ram, "logs", "run.png")
    assert files.read_bytes(files.join(ram, "logs", "run.png"))[:4] == b"\x89PNG"
    assert tfloop.History.from_jsonl(log).history == {"loss": history.history["loss"]}
    assert os.listdir(cwd) == []


# ----------------------------------------------------------------------- exact resume


def resumable(root, *extra, **fit_options):
    """A run whose every piece of state lives under ``root``: checkpoints (keep-best, the
    iterator's position), the JSONL and CSV logs (rolled back on resume), ExportBest."""
    callbacks = [
        JSONLLogger(files.join(root, "run.jsonl"), every_n_steps=2),
        CSVLogger(files.join(root, "run.csv")),
        ExportBest(files.join(root, "best.keras")),
        *extra,
    ]
    checkpointer = tfloop.Checkpointer(root, every_n_steps=4, max_to_keep=2, keep_best=1)
    trainer = make_trainer(callbacks, checkpointer)
    history = trainer.fit(
        dataset(),
        epochs=3,
        validation_data=VALIDATION,
        validation_every_n_steps=5,
        verbose=0,
        **fit_options,
    )
    return trainer, history, callbacks[2]


@pytest.mark.parametrize(
    ("stop", "appends"), [("crash", True), ("max_steps", True), ("crash", False)]
)
def test_a_run_stopped_midway_resumes_from_ram_exactly(ram, cwd, monkeypatch, stop, appends):
    # appends=False: logs written as on an object store, whole at each flush
    monkeypatch.setattr(files, "appends_in_place", lambda path: appends)
    straight_root, resumed_root = files.join(ram, "straight"), files.join(ram, "resumed")
    straight, straight_history, straight_best = resumable(straight_root)
    if stop == "crash":
        with pytest.raises(Crash):
            resumable(resumed_root, CrashAt(11))
    else:
        resumable(resumed_root, max_steps=11)
    assert files.exists(files.join(resumed_root, "checkpoint"))
    resumed, resumed_history, resumed_best = resumable(resumed_root)
    assert int(resumed.optimizer.iterations) == int(straight.optimizer.iterations) == 21
    assert_weights_equal(weights_of(straight.model), weights_of(resumed.model))
    for left, right in zip(straight.optimizer.variables, resumed.optimizer.variables, strict=True):
        np.testing.assert_array_equal(np.asarray(left), np.asarray(right))
    assert resumed_history.history == straight_history.history
    assert resumed_history.evaluations == straight_history.evaluations
    assert jsonl_records(files.join(resumed_root, "run.jsonl")) == jsonl_records(
        files.join(straight_root, "run.jsonl")
    )
    assert files.read_text(files.join(resumed_root, "run.csv")) == files.read_text(
        files.join(straight_root, "run.csv")
    )
    assert files.split(resumed.checkpoint.best)[1] == files.split(straight.checkpoint.best)[1]
    assert (resumed_best.best, resumed_best.best_step) == (
        straight_best.best,
        straight_best.best_step,
    )
    assert os.listdir(cwd) == []
