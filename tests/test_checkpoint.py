"""Checkpoints: exact resume after a kill, preemption, and no silent loss or fresh start."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_weights_equal, make_data, make_model, weights_of

import tfloop
from tfloop.checkpoint._background import BackgroundWrite
from tfloop.errors import CheckpointError, ConfigError

JOB = Path(__file__).with_name("resume_job.py")


class Crash(RuntimeError):
    """Raised by ``CrashAt``: a run that dies mid-training."""


class CrashAt(tfloop.Callback):
    """Raises ``Crash`` at the first execution that reaches update ``step``."""

    def __init__(self, step):
        super().__init__()
        self.step = step

    def on_train_batch_end(self, batch, logs):
        if logs["step"] >= self.step:
            raise Crash


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


@pytest.mark.slow
def test_killed_inside_a_background_write_resumes_from_the_previous_checkpoint(
    tmp_path, references
):
    directory, out = tmp_path / "run", tmp_path / "out.npz"
    # every 3 updates: checkpoint 6 has all its files when the process dies, but no index entry
    run_job(directory, out, "--data", "dataset", "--kill-in-write", "6", expect=-signal.SIGKILL)
    assert Path(tf.train.latest_checkpoint(str(directory))).name == "ckpt-3"
    run_job(directory, out, "--data", "dataset")
    assert_same_npz(references["dataset"], out)


@pytest.mark.slow
@pytest.mark.parametrize("data", ["arrays", "dataset"])
def test_sync_and_async_saves_write_identical_checkpoints(tmp_path, data):
    # Separate processes, so that the layer names written into the object graph are the same.
    for mode in ("async", "sync"):
        flags = ["--sync-save"] if mode == "sync" else []
        run_job(tmp_path / mode, tmp_path / f"{mode}.npz", "--data", data, *flags)
    names = sorted(p.name for p in (tmp_path / "sync").glob("ckpt-*"))
    assert names == sorted(p.name for p in (tmp_path / "async").glob("ckpt-*"))
    assert len(names) == 6  # 3 checkpoints kept, an index and a data file each
    # A tf.data iterator's state holds its prefetch buffers, which hold as many elements as
    # the prefetch thread got to make: that differs from run to run, sync or not, and a
    # restore replays the same batches either way. The metadata records the run's wall-clock
    # time (max_time is a budget across resumes). Every other tensor is identical.
    for prefix in sorted({name.split(".")[0] for name in names}):
        sync = tf.train.load_checkpoint(str(tmp_path / "sync" / prefix))
        background = tf.train.load_checkpoint(str(tmp_path / "async" / prefix))
        dtypes = sync.get_variable_to_dtype_map()
        assert dtypes == background.get_variable_to_dtype_map()
        for key, dtype in dtypes.items():
            if dtype == tf.variant:
                assert data == "dataset", key  # only an iterator's state is a variant
                continue
            left, right = np.asarray(sync.get_tensor(key)), np.asarray(background.get_tensor(key))
            if key.startswith("metadata"):
                assert _without_time(left) == _without_time(right), key
            elif left.dtype == object:  # strings
                assert left.tolist() == right.tolist(), key
            else:
                assert left.tobytes() == right.tobytes(), key
    assert_same_npz(tmp_path / "async.npz", tmp_path / "sync.npz")


def _without_time(metadata: np.ndarray) -> dict:
    """A checkpoint's metadata without the wall-clock time the run had spent."""
    record = json.loads(metadata.item())
    record.pop("seconds_spent", None)
    return record


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
    (tmp_path / "ckpt-9.index.tempstate123").write_text("x")
    fit(tmp_path, epochs=1)
    assert not list(tmp_path.glob("*_temp*")) and not list(tmp_path.glob("*.tempstate*"))


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
        run(tmp_path / "resumed", [CrashAt(10)])  # last save: update 8, mid-epoch 1
    resumed = run(tmp_path / "resumed")
    assert int(resumed.optimizer.iterations) == 21
    assert_weights_equal(weights_of(straight.model), weights_of(resumed.model))


# --------------------------------------------------------------------------- background writes


def slow_writes(monkeypatch, seconds=0.3):
    """Makes every background write start late, so training runs on while it is pending."""
    run = BackgroundWrite._run

    def late(self, *args):
        time.sleep(seconds)
        run(self, *args)

    monkeypatch.setattr(BackgroundWrite, "_run", late)


def checkpoint_values(path):
    reader = tf.train.load_checkpoint(str(path))
    return {
        key: reader.get_tensor(key)
        for key in reader.get_variable_to_shape_map()
        if key.startswith("model/") or key.startswith("optimizer/")
    }


def test_a_background_write_saves_the_state_of_the_save_step(tmp_path, monkeypatch):
    slow_writes(monkeypatch)
    x, y = make_data(48)
    at_step = {}

    class Remember(tfloop.Callback):  # runs before the save, at the same boundary
        def on_train_batch_end(self, batch, logs):
            at_step[int(logs["step"])] = [v.numpy().copy() for v in self.trainer.model.weights]

    model = make_model()
    checkpointer = tfloop.Checkpointer(tmp_path, every_n_steps=2, max_to_keep=10)
    trainer = tfloop.Trainer(
        model,
        "adam",
        "categorical_crossentropy",
        steps_per_execution=2,
        callbacks=[Remember()],
        checkpoint=checkpointer,
    )
    trainer.fit((x, y), epochs=2, batch_size=8, verbose=0)  # 12 updates, a save every 2
    for step in (2, 4, 6, 8, 10, 12):
        restored = make_model()  # freshly initialised: only a real restore makes them equal
        tf.train.Checkpoint(model=restored).read(str(tmp_path / f"ckpt-{step}")).expect_partial()
        assert_weights_equal(at_step[step], [v.numpy() for v in restored.weights])
    # training went on while the writes were pending: the early saves hold older weights
    assert not np.array_equal(at_step[2][0], model.weights[0].numpy())


def test_fit_returns_only_after_the_background_write_is_complete(tmp_path, monkeypatch):
    slow_writes(monkeypatch)
    trainer = fit(tmp_path, epochs=1, every_epoch=False)  # saves at updates 2, 4 and 6
    assert not trainer.checkpoint.writing
    assert Path(tf.train.latest_checkpoint(str(tmp_path))).name == "ckpt-6"
    assert (tmp_path / "ckpt-6.index").exists() and not list(tmp_path.glob("*_temp*"))


def test_fit_that_raises_still_completes_the_pending_write(tmp_path, monkeypatch):
    slow_writes(monkeypatch)

    checkpointer = tfloop.Checkpointer(tmp_path, every_n_steps=2, every_epoch=False)
    trainer = tfloop.Trainer(
        make_model(),
        "adam",
        "categorical_crossentropy",
        steps_per_execution=1,
        callbacks=[CrashAt(3)],
        checkpoint=checkpointer,
    )
    with pytest.raises(Crash):
        trainer.fit(make_data(48), epochs=1, batch_size=8, verbose=0)
    assert not checkpointer.writing
    assert Path(tf.train.latest_checkpoint(str(tmp_path))).name == "ckpt-2"


class BlockSave(tfloop.Callback):
    """Makes the save of checkpoint ``step`` fail for real: a directory where its data file goes
    (made once training has started, so the step's earlier checkpoints are not affected)."""

    def __init__(self, directory, step):
        self.blocker = Path(directory) / f"ckpt-{step}.data-00000-of-00001"

    def on_epoch_start(self, epoch, logs):
        if epoch == 0:
            self.blocker.mkdir()


def test_a_failed_background_write_raises(tmp_path):
    trainer = tfloop.Trainer(
        make_model(),
        "adam",
        "categorical_crossentropy",
        callbacks=[BlockSave(tmp_path, 6)],  # the last save of the fit
        checkpoint=tfloop.Checkpointer(tmp_path, every_n_steps=2, every_epoch=False),
    )
    with pytest.raises(CheckpointError, match=r"ckpt-6.*[Ii]s a directory") as raised:
        trainer.fit(make_data(48), epochs=1, batch_size=8, verbose=0)
    assert isinstance(raised.value.__cause__, tf.errors.OpError)
    assert Path(tf.train.latest_checkpoint(str(tmp_path))).name == "ckpt-4"


@pytest.mark.parametrize("async_save", [True, False])
def test_a_failed_write_raises_at_the_next_save(tmp_path, async_save):
    trainer = tfloop.Trainer(
        make_model(),
        "adam",
        "categorical_crossentropy",
        steps_per_execution=1,
        callbacks=[BlockSave(tmp_path, 2)],
        checkpoint=tfloop.Checkpointer(
            tmp_path, every_n_steps=2, every_epoch=False, async_save=async_save
        ),
    )
    with pytest.raises(CheckpointError if async_save else tf.errors.OpError, match="ckpt-2"):
        trainer.fit(make_data(48), epochs=1, batch_size=8, verbose=0)
    # a background write fails the save after it (at update 4), a synchronous one its own
    assert int(trainer.optimizer.iterations) == (4 if async_save else 2)
    assert tf.train.latest_checkpoint(str(tmp_path)) is None


def test_async_save_false_writes_before_training_goes_on(tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(BackgroundWrite, "submit", lambda *args: started.append(args))
    trainer = fit(tmp_path, epochs=1, every_epoch=False, async_save=False)
    assert started == []
    assert Path(tf.train.latest_checkpoint(str(tmp_path))).name == "ckpt-6"
    assert trainer.checkpoint.async_save is False


def test_a_callback_with_on_checkpoint_sees_a_complete_checkpoint(tmp_path, monkeypatch):
    slow_writes(monkeypatch)
    seen = []

    class Check(tfloop.Callback):
        def on_checkpoint(self, path, logs):
            seen.append(tf.train.latest_checkpoint(str(tmp_path)) == path)

    checkpointer = tfloop.Checkpointer(tmp_path, every_n_steps=2, every_epoch=False)
    trainer = tfloop.Trainer(
        make_model(),
        "adam",
        "categorical_crossentropy",
        callbacks=[Check()],
        checkpoint=checkpointer,
    )
    trainer.fit(make_data(48), epochs=1, batch_size=8, verbose=0)
    assert seen == [True, True, True]


# ------------------------------------------------------------------------------ compiled writes


def checkpoint_tensors(prefix):
    """Every tensor of a checkpoint (a tf.data iterator's state as its dtype only)."""
    reader = tf.train.load_checkpoint(str(prefix))
    return {
        key: dtype if dtype == tf.variant else np.asarray(reader.get_tensor(key))
        for key, dtype in reader.get_variable_to_dtype_map().items()
    }


def assert_same_tensors(left, right):
    assert sorted(left) == sorted(right)
    for key, value in left.items():
        if isinstance(value, np.ndarray):
            assert value.dtype == right[key].dtype and value.shape == right[key].shape, key
            assert value.tolist() == right[key].tolist(), key  # NaN-free; strings too
        else:
            assert value == right[key], key


class SaveTheManagersWay(tfloop.Callback):
    """At every checkpoint, saves the same state again with ``CheckpointManager.save``."""

    def __init__(self, directory):
        self.directory = str(directory)
        self.pairs = []

    def on_checkpoint(self, path, logs):
        checkpointer = self.trainer.checkpoint
        checkpoint = checkpointer._checkpoint
        checkpoint.save_counter.assign_sub(1)  # the manager counts this save once more
        # tfloop passes its metadata and leftover batches to the write, not through the
        # variables the manager saves
        reader = tf.train.load_checkpoint(path)
        for name in ("metadata", "leftover"):
            value = reader.get_tensor(f"{name}/.ATTRIBUTES/VARIABLE_VALUE")
            getattr(checkpointer, f"_{name}").assign(value)
        manager = tf.train.CheckpointManager(checkpoint, self.directory, max_to_keep=None)
        step = int(path.rsplit("-", 1)[1])
        self.pairs.append((path, manager.save(checkpoint_number=step)))


@pytest.mark.parametrize("data", ["arrays", "dataset"])
@pytest.mark.parametrize("async_save", [True, False])
def test_compiled_writes_are_the_managers_own_checkpoints(tmp_path, data, async_save):
    x, y = make_data(60)
    source = (x, y)
    if data == "dataset":
        source = tf.data.Dataset.from_tensor_slices(source).shuffle(60, seed=3).batch(4)
    slow = SaveTheManagersWay(tmp_path / "slow")
    checkpointer = tfloop.Checkpointer(
        tmp_path / "fast", every_n_steps=2, max_to_keep=20, async_save=async_save
    )
    trainer = tfloop.Trainer(
        make_model(dropout=0.2),
        "adam",
        "categorical_crossentropy",
        ["accuracy"],
        accumulate_steps=2,
        steps_per_execution=3,
        callbacks=[slow],
        checkpoint=checkpointer,
        seed=0,
    )
    batch_size = None if data == "dataset" else 4
    trainer.fit(source, epochs=2, batch_size=batch_size, verbose=0)  # 15 micro-batches an epoch
    assert checkpointer.writer is not None and checkpointer.writer.compiled
    # 8 updates an epoch (the last window is partial); the epoch end saves update 8 again
    assert [Path(fast).name for fast, _ in slow.pairs] == [
        f"ckpt-{step}" for step in (2, 4, 6, 8, 8, 10, 12, 14, 16, 16)
    ]
    for fast, managers in slow.pairs:
        assert Path(fast).name == Path(managers).name
        assert_same_tensors(checkpoint_tensors(fast), checkpoint_tensors(managers))
        if data == "arrays":  # no iterator state, whose prefetch buffers may differ
            for suffix in (".index", ".data-00000-of-00001"):
                assert Path(fast + suffix).read_bytes() == Path(managers + suffix).read_bytes()
    keys = checkpoint_tensors(slow.pairs[0][0])
    assert any(key.startswith("accumulator/") for key in keys)
    assert any(key.startswith("seed_generators/") for key in keys)
    assert any(key.startswith("data/iterator/") for key in keys) == (data == "dataset")
    assert tf.train.list_variables(slow.pairs[-1][0]) == tf.train.list_variables(slow.pairs[-1][1])


def test_a_dataset_iterator_is_saved_by_the_compiled_write(tmp_path, monkeypatch):
    manager_saves = []
    original = tf.train.CheckpointManager.save

    def counted(self, *args, **kwargs):
        manager_saves.append(args)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(tf.train.CheckpointManager, "save", counted)
    x, y = make_data(48)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(48, seed=1).batch(8)
    checkpointer = tfloop.Checkpointer(tmp_path, every_n_steps=2, every_epoch=False)
    trainer = tfloop.Trainer(
        make_model(),
        "adam",
        "categorical_crossentropy",
        steps_per_execution=1,
        checkpoint=checkpointer,
    )
    trainer.fit(dataset, epochs=1, verbose=0)  # 6 batches: saves at updates 2, 4 and 6
    assert manager_saves == [] and checkpointer.writer.compiled
    keys = dict(tf.train.list_variables(str(tmp_path / "ckpt-2")))
    assert "data/iterator/.ATTRIBUTES/ITERATOR_STATE" in keys


def managers_way(monkeypatch):
    """Makes every save TF's own ``CheckpointManager.save`` (fed the snapshot when async)."""
    monkeypatch.setattr(tfloop.checkpoint.FastWriter, "_compile", lambda *args: False)


def index_state(directory):
    state = tf.train.get_checkpoint_state(str(directory))
    return state.model_checkpoint_path, list(state.all_model_checkpoint_paths)


@pytest.mark.parametrize("async_save", [True, False])
def test_compiled_writes_keep_max_to_keep_and_the_index_as_the_manager(
    tmp_path, monkeypatch, async_save
):
    def run(directory):
        checkpointer = tfloop.Checkpointer(
            directory, every_n_steps=1, max_to_keep=3, async_save=async_save
        )
        fit(directory, epochs=3, checkpointer=checkpointer)  # 18 saves, the last one twice
        return checkpointer

    fast = run(tmp_path / "fast")
    managers_way(monkeypatch)
    slow = run(tmp_path / "slow")
    assert fast.writer.compiled and not slow.writer.compiled
    expected = [str(tmp_path / "fast" / f"ckpt-{step}") for step in (16, 17, 18)]
    assert index_state(tmp_path / "fast") == (expected[-1], expected)
    assert fast.checkpoints == expected
    assert tf.train.latest_checkpoint(str(tmp_path / "fast")) == expected[-1]
    names = sorted(path.name for path in (tmp_path / "fast").iterdir())
    assert names == sorted(path.name for path in (tmp_path / "slow").iterdir())
    assert names == sorted(
        ["checkpoint"]
        + [f"ckpt-{s}{x}" for s in (16, 17, 18) for x in (".index", ".data-00000-of-00001")]
    )
    fast_index = (tmp_path / "fast" / "checkpoint").read_text().replace("fast", "slow")
    timestamps = re.compile(r"\n(all_model_checkpoint_timestamps|last_preserved_timestamp):.*")
    assert timestamps.sub("", fast_index) == timestamps.sub(
        "", (tmp_path / "slow" / "checkpoint").read_text()
    )


def test_a_resume_from_compiled_writes_is_exact_with_a_dataset(tmp_path):
    x, y = make_data(60)

    def run(directory, callbacks=()):
        # A new dataset for every run, as a new process has (one dataset object draws a new
        # shuffle seed for every iterator made from it), made after make_model sets the seed.
        model = make_model(dropout=0.2)
        dataset = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(60, seed=3).batch(4)
        trainer = tfloop.Trainer(
            model,
            "adam",
            "categorical_crossentropy",
            ["accuracy"],
            accumulate_steps=2,
            steps_per_execution=3,
            callbacks=list(callbacks),
            checkpoint=tfloop.Checkpointer(directory, every_n_steps=3, every_epoch=False),
            seed=0,
        )
        trainer.fit(dataset, epochs=3, verbose=0)
        return trainer

    straight = run(tmp_path / "straight")
    with pytest.raises(Crash):
        run(tmp_path / "resumed", [CrashAt(11)])
    # the last checkpoint is mid-epoch 1, with the iterator's state and leftover batches
    assert Path(tf.train.latest_checkpoint(str(tmp_path / "resumed"))).name == "ckpt-9"
    assert any(
        name.startswith("data/iterator/")
        for name, _ in tf.train.list_variables(str(tmp_path / "resumed" / "ckpt-9"))
    )
    resumed = run(tmp_path / "resumed")
    assert int(resumed.optimizer.iterations) == int(straight.optimizer.iterations) == 24
    assert_weights_equal(weights_of(straight.model), weights_of(resumed.model))
    for left, right in zip(straight.optimizer.variables, resumed.optimizer.variables, strict=True):
        np.testing.assert_array_equal(np.asarray(left), np.asarray(right))


@pytest.mark.parametrize("async_save", [True, False])
def test_state_added_after_a_save_is_in_the_next_checkpoint(tmp_path, async_save):
    class AddState(tfloop.Callback):
        def on_train_batch_end(self, batch, logs):
            if logs["step"] == 3:
                self.trainer.checkpoint._checkpoint.extra = tf.Variable([7.0, 8.0])

    trainer = tfloop.Trainer(
        make_model(),
        "adam",
        "categorical_crossentropy",
        steps_per_execution=1,
        callbacks=[AddState()],
        checkpoint=tfloop.Checkpointer(
            tmp_path, every_n_steps=2, every_epoch=False, max_to_keep=5, async_save=async_save
        ),
    )
    trainer.fit(make_data(48), epochs=1, batch_size=8, verbose=0)  # saves at 2, 4 and 6
    key = "extra/.ATTRIBUTES/VARIABLE_VALUE"
    assert key not in dict(tf.train.list_variables(str(tmp_path / "ckpt-2")))
    for step in (4, 6):
        reader = tf.train.load_checkpoint(str(tmp_path / f"ckpt-{step}"))
        np.testing.assert_array_equal(reader.get_tensor(key), [7.0, 8.0])


@pytest.mark.slow
def test_a_killed_run_with_mid_epoch_validation_and_keep_best_resumes_exactly(tmp_path):
    # 13 micro-batches an epoch, 7 updates: killed 6 micro-batches into epoch 1 (update 10),
    # after the validation at update 8 and before the one at 12
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    run_job(reference, reference / "out.npz", "--control")
    run_job(killed, killed / "out.npz", "--control", "--kill-after", "19", expect=-signal.SIGKILL)
    run_job(killed, killed / "out.npz", "--control")
    assert_same_npz(reference / "out.npz", killed / "out.npz")
    straight = json.loads((reference / "out.json").read_text())
    resumed = json.loads((killed / "out.json").read_text())
    assert [r["step"] for r in straight["evaluations"]] == [4, 8, 12, 16, 20]
    assert len(straight["best"]) == 2
    assert resumed == straight  # History, evaluations, kept checkpoints, the JSONL records
