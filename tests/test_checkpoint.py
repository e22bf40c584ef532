"""Checkpoints: exact resume after a kill, preemption, and no silent loss or fresh start."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_weights_equal, make_data, make_model, weights_of

import tfloop
from tfloop.errors import CheckpointError, ConfigError

JOB = Path(__file__).with_name("resume_job.py")


def run_job(directory, out, *args, expect=0):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(
        [sys.executable, str(JOB), str(directory), str(out), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == expect, result.stderr[-3000:]
    return result


def assert_same_npz(a, b):
    left, right = np.load(a), np.load(b)
    assert left.files == right.files
    for key in left.files:
        np.testing.assert_array_equal(left[key], right[key], err_msg=key)


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    paths = {}
    for data in ("arrays", "dataset"):
        paths[data] = root / f"{data}.npz"
        run_job(root / data, paths[data], "--data", data)
    return paths


@pytest.mark.slow
@pytest.mark.parametrize(
    ("data", "signal_flag", "after", "code"),
    [
        ("arrays", "--kill-after", 11, -signal.SIGKILL),  # mid-epoch, mid-window
        ("arrays", "--kill-after", 30, -signal.SIGKILL),  # last epoch
        ("dataset", "--kill-after", 13, -signal.SIGKILL),  # restores a mid-epoch iterator
        ("dataset", "--kill-after", 22, -signal.SIGKILL),  # then new iterators reshuffle
        ("arrays", "--term-after", 9, 143),
        ("dataset", "--term-after", 14, 143),
    ],
)
def test_killed_run_resumes_bit_identically(tmp_path, references, data, signal_flag, after, code):
    directory, out = tmp_path / "run", tmp_path / "out.npz"
    run_job(directory, out, "--data", data, signal_flag, str(after), expect=code)
    assert not out.exists()
    assert list(directory.glob("ckpt-*.index")), "the killed run saved nothing"
    run_job(directory, out, "--data", data)
    assert_same_npz(references[data], out)


# ------------------------------------------------------------------------ in-process checks


def fit(directory, *, epochs=2, model=None, checkpointer=None, **kwargs):
    x, y = make_data(48)
    model = model or make_model()
    checkpointer = checkpointer or tfloop.Checkpointer(directory, every_n_steps=2, **kwargs)
    trainer = tfloop.Trainer(
        model, "adam", "categorical_crossentropy", checkpoint=checkpointer, seed=0
    )
    trainer.fit((x, y), epochs=epochs, batch_size=8, verbose=0)
    return trainer


def test_every_n_steps_saves_land_on_exact_updates_with_accumulation(tmp_path):
    x, y = make_data(48)
    seen = []

    class Record(tfloop.Callback):
        def on_checkpoint(self, path, logs):
            seen.append((Path(path).name, int(self.trainer.optimizer.iterations)))

    trainer = tfloop.Trainer(
        make_model(),
        "sgd",
        "categorical_crossentropy",
        accumulate_steps=3,
        steps_per_execution=4,
        callbacks=[Record()],
        checkpoint=tfloop.Checkpointer(
            tmp_path, every_n_steps=2, every_epoch=False, max_to_keep=10
        ),
    )
    trainer.fit((x, y), epochs=1, batch_size=4, verbose=0)  # 12 micro-batches, 4 updates
    assert seen == [("ckpt-2", 2), ("ckpt-4", 4)]


def test_resume_from_a_save_on_the_last_update_of_an_epoch(tmp_path):
    straight = fit(tmp_path / "a", epochs=2, every_epoch=False)
    first = fit(tmp_path / "b", epochs=1, every_epoch=False)  # 6 updates: saved at 6, epoch end
    assert int(first.optimizer.iterations) == 6
    resumed = fit(tmp_path / "b", epochs=2, every_epoch=False)
    assert_weights_equal(weights_of(straight.model), weights_of(resumed.model))


def test_leftover_temporary_files_are_removed_on_start(tmp_path):
    (tmp_path / "ckpt-9_temp").mkdir()
    (tmp_path / "ckpt-9_temp" / "part-00000-of-00001.data-00000-of-00001").write_text("x")
    fit(tmp_path, epochs=1)
    assert not list(tmp_path.glob("*_temp*"))


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    fit(tmp_path, epochs=1)  # saves at updates 2, 4, 6 (3 kept)
    latest = tf.train.latest_checkpoint(str(tmp_path))
    assert latest.endswith("ckpt-6")
    data_file = Path(latest + ".data-00000-of-00001")
    data_file.write_bytes(data_file.read_bytes()[: data_file.stat().st_size // 3])
    with caplog.at_level(logging.WARNING, logger="tfloop"):
        trainer = fit(tmp_path, epochs=1)
    assert "ckpt-6" in caplog.text and "trying the previous one" in caplog.text
    # resumed from update 4 and finished epoch 0: 6 updates in all, not 12 (no fresh start)
    assert int(trainer.optimizer.iterations) == 6


def test_all_checkpoints_corrupt_raises_instead_of_starting_fresh(tmp_path):
    fit(tmp_path, epochs=1)
    for data_file in tmp_path.glob("ckpt-*.data-*"):
        data_file.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"could be (read|restored)"):
        fit(tmp_path, epochs=1)


def test_garbled_index_file_raises(tmp_path):
    fit(tmp_path, epochs=1)
    (tmp_path / "checkpoint").write_text("model_checkpoint_path: {{{ not a proto")
    with pytest.raises(CheckpointError, match="checkpoint index"):
        fit(tmp_path, epochs=1)


def test_checkpoints_of_another_model_raise(tmp_path):
    fit(tmp_path, epochs=1)
    other = keras.Sequential([keras.Input((5,)), keras.layers.Dense(9), keras.layers.Dense(3)])
    with pytest.raises(CheckpointError, match="different model"):
        fit(tmp_path, epochs=1, model=other)


def test_unwritable_directory_fails_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    trainer = tfloop.Trainer(
        make_model(), "sgd", "categorical_crossentropy", checkpoint=blocker / "checkpoints"
    )
    with pytest.raises(CheckpointError, match="not writable"):
        trainer.fit(make_data(16), verbose=0)
    assert int(trainer.optimizer.iterations) == 0


def test_restore_none_starts_fresh_and_a_path_restores_that_checkpoint(tmp_path):
    fit(tmp_path, epochs=1)
    fresh = fit(tmp_path, epochs=1, checkpointer=tfloop.Checkpointer(tmp_path, restore=None))
    assert int(fresh.optimizer.iterations) == 6
    chosen = fit(
        tmp_path / "other",
        epochs=1,
        checkpointer=tfloop.Checkpointer(tmp_path / "other", restore=tmp_path / "ckpt-4"),
    )
    assert int(chosen.optimizer.iterations) == 6  # 4 restored + the 2 left in epoch 0


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"every_n_seconds": -1}, "every_n_seconds"),
        ({"max_to_keep": 0}, "max_to_keep"),
    ],
)
def test_bad_checkpointer_arguments_are_named(tmp_path, kwargs, name):
    with pytest.raises(ConfigError, match=name):
        tfloop.Checkpointer(tmp_path, **kwargs)


def test_bad_checkpoint_argument_is_named():
    with pytest.raises(ConfigError, match="checkpoint must be"):
        tfloop.Trainer(make_model(), checkpoint=3)


@pytest.mark.parametrize("suffix", ["model.keras", "saved_model"])
def test_export_is_usable_without_tfloop(tmp_path, suffix):
    x, y = make_data(20)
    trainer = tfloop.Trainer(make_model(), "adam", "categorical_crossentropy")
    trainer.fit((x, y), epochs=1, batch_size=5, verbose=0)
    path = trainer.export(tmp_path / suffix)
    expected = trainer.predict(x)
    if suffix.endswith(".keras"):
        reloaded = keras.models.load_model(path)(x).numpy()
    else:
        loaded = tf.saved_model.load(path)  # keep it alive: it owns the variables
        reloaded = loaded.serve(tf.constant(x)).numpy()
    np.testing.assert_allclose(reloaded, expected, rtol=1e-5, atol=1e-6)


def test_without_the_iterator_state_a_deterministic_dataset_resumes_by_count(tmp_path):
    x, y = make_data(56)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)

    class Crash(RuntimeError):
        pass

    class CrashAt(tfloop.Callback):
        def on_train_batch_end(self, batch, logs):
            if logs["step"] >= 10:
                raise Crash

    def run(directory, callbacks=()):
        model = make_model()
        checkpointer = tfloop.Checkpointer(directory, every_n_steps=4, save_iterator=False)
        trainer = tfloop.Trainer(
            model,
            "adam",
            "categorical_crossentropy",
            seed=0,
            steps_per_execution=3,
            callbacks=list(callbacks),
            checkpoint=checkpointer,
        )
        trainer.fit(dataset, epochs=3, verbose=0)
        return trainer

    straight = run(tmp_path / "straight")
    with pytest.raises(Crash):
        run(tmp_path / "resumed", [CrashAt()])  # last save: update 8, mid-epoch 1
    resumed = run(tmp_path / "resumed")
    assert int(resumed.optimizer.iterations) == 21
    assert_weights_equal(weights_of(straight.model), weights_of(resumed.model))
