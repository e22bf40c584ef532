"""A corpus of bad inputs and faults: each gets a clear tfloop error, early, naming the argument
and the fix; no weight changes and no checkpoint is lost. Cases that could hang run in a
subprocess with a timeout."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_weights_equal, make_data, make_model, mirrored, weights_of
from hypothesis import given, settings
from hypothesis import strategies as st

import tfloop
from tfloop._labels import LabelRangeCheck
from tfloop._logs import LABEL_ERRORS
from tfloop.errors import ConfigError, DataError


def assert_untouched(trainer: tfloop.Trainer, before: list[np.ndarray]) -> None:
    for old, new in zip(before, weights_of(trainer.model), strict=True):
        np.testing.assert_array_equal(old, new)
    assert int(trainer.optimizer.iterations) == 0


class PerExampleLoss(tfloop.Trainer):
    def compute_loss(self, batch, training):
        x, y = batch
        return tf.reduce_sum(tf.square(self.model(x, training=training) - y), axis=-1)


class NoneLoss(tfloop.Trainer):
    def compute_loss(self, batch, training):
        return None


class DetachedLoss(tfloop.Trainer):
    def compute_loss(self, batch, training):
        x, _ = batch
        return tf.reduce_mean(x)  # does not depend on the weights


@pytest.mark.parametrize(
    ("trainer_class", "words"),
    [
        (PerExampleLoss, ["compute_loss", "shape", "tf.reduce_mean"]),
        (NoneLoss, ["compute_loss", "None", "scalar"]),
        (DetachedLoss, ["compute_loss", "trainable variable"]),
    ],
    ids=["per-example-vector", "none", "not-connected"],
)
def test_a_compute_loss_override_that_does_not_return_the_mean_loss_is_named(trainer_class, words):
    trainer = trainer_class(make_model(), "sgd")
    before = weights_of(trainer.model)
    with pytest.raises(ConfigError) as info:
        trainer.fit(make_data(16), batch_size=8, verbose=0)
    for word in words:
        assert word in str(info.value)
    assert_untouched(trainer, before)


@pytest.mark.parametrize(
    ("arguments", "words"),
    [
        ({"clip_global_norm": float("inf")}, ["clip_global_norm", "finite"]),
        ({"callbacks": None}, None),
        ({"callbacks": tfloop.callbacks.Throughput()}, None),
        ({"seed": np.int64(3)}, None),
    ],
    ids=["clip-inf", "callbacks-none", "one-callback", "numpy-seed"],
)
def test_constructor_arguments(arguments, words):
    if words is None:
        tfloop.Trainer(make_model(), "sgd", "categorical_crossentropy", **arguments)
        return
    with pytest.raises(ConfigError) as info:
        tfloop.Trainer(make_model(), "sgd", "categorical_crossentropy", **arguments)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize(
    ("arguments", "words"),
    [
        ({"verbose": "x"}, ["verbose"]),
        ({"shuffle": "batch"}, ["shuffle"]),
        ({"initial_epoch": 5, "epochs": 2}, ["initial_epoch", "epochs"]),
    ],
    ids=["verbose", "shuffle-batch", "initial-epoch-past-epochs"],
)
def test_fit_arguments_that_would_be_misread_are_named(arguments, words):
    trainer = tfloop.Trainer(make_model(), "sgd", "categorical_crossentropy")
    before = weights_of(trainer.model)
    with pytest.raises(ConfigError) as info:
        trainer.fit(make_data(16), batch_size=8, **arguments)
    for word in words:
        assert word in str(info.value)
    assert_untouched(trainer, before)


def test_binary_crossentropy_takes_labels_of_rank_one_as_keras_does():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, activation="sigmoid")])
    x = np.random.default_rng(0).random((16, 3)).astype("float32")
    y = (x[:, 0] > 0.5).astype("float32")  # shape (16,)
    history = tfloop.Trainer(model, "sgd", "binary_crossentropy").fit(x, y, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_targets_wider_than_the_output_are_not_silently_broadcast():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    trainer = tfloop.Trainer(model, "sgd", "mse")
    before = weights_of(model)
    with pytest.raises(DataError, match=r"y has shape \(8, 5\).*output has \(8, 1\)"):
        trainer.fit(np.ones((16, 3)), np.ones((16, 5)), batch_size=8, verbose=0)
    assert_untouched(trainer, before)


@pytest.mark.parametrize(
    ("position", "shuffle"),
    [(3, False), (50, False), (50, True)],  # in the first batch, far from it, anywhere
)
def test_an_out_of_range_sparse_label_anywhere_in_the_arrays_is_named_before_training(
    position, shuffle
):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4)])
    trainer = tfloop.Trainer(model, "sgd", "sparse_categorical_crossentropy", jit_compile=True)
    labels = np.arange(64) % 4
    labels[position] = 7
    before = weights_of(model)
    with pytest.raises(DataError, match=r"\[0, 4\).*holds 7"):
        trainer.fit(np.ones((64, 3), "float32"), labels, batch_size=8, shuffle=shuffle, verbose=0)
    assert_untouched(trainer, before)


def _bad_label_pipeline(bad_positions, n=64, batch=8):
    labels = np.arange(n) % 4
    labels[list(bad_positions)] = 7
    x = np.random.default_rng(0).random((n, 3)).astype("float32")
    return tf.data.Dataset.from_tensor_slices((x, labels)).batch(batch)


def _classifier(strategy=None, **options):
    keras.utils.set_random_seed(0)
    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    with scope:
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4)])
        return tfloop.Trainer(
            model, "sgd", "sparse_categorical_crossentropy", strategy=strategy, **options
        )


@pytest.mark.parametrize(
    ("position", "jit", "message"),
    [
        (3, True, r"\[0, 4\).*holds 7"),  # in the dry run's batch: checked before training
        (50, False, r"outside its output's classes \(label 7 is not in \[0, 4\)\)"),
        (50, True, r"1 integer label lies outside their output's classes"),  # XLA: counted
    ],
)
def test_an_out_of_range_sparse_label_in_a_pipeline_is_a_data_error(position, jit, message):
    trainer = _classifier(jit_compile=jit)
    with pytest.raises(DataError, match=message):
        trainer.fit(_bad_label_pipeline([position]), verbose=0)


@pytest.fixture
def op_determinism():
    from tensorflow.python.framework import config

    enabled = config.is_op_determinism_enabled()
    config.enable_op_determinism()
    yield
    if not enabled:
        config.disable_op_determinism()


def test_under_op_determinism_a_bad_label_without_xla_is_named_too(op_determinism):
    # Deterministic ops compute the loss with a gather, which words the error its own way.
    trainer = _classifier(jit_compile=False)
    with pytest.raises(DataError, match=r"classes \(label 7 is not in \[0, 4\)\)"):
        trainer.fit(_bad_label_pipeline([50]), verbose=0)


@settings(max_examples=8, deadline=None)
@given(
    bad=st.sets(st.integers(8, 63), min_size=1, max_size=6),
    k=st.sampled_from([1, 3, 8]),
    accumulate=st.sampled_from([1, 2]),
)
def test_under_xla_the_execution_that_meets_bad_labels_stops_fit_counting_them(bad, k, accumulate):
    trainer = _classifier(jit_compile=True, steps_per_execution=k, accumulate_steps=accumulate)
    first = min(bad) // 8  # the batch of the first bad label; batch 0 is good
    start = first // k * k  # the first step of the execution that meets it
    expected = sum(1 for p in bad if start * 8 <= p < (start + k) * 8)
    with pytest.raises(DataError, match=rf"\b{expected} integer labels? lie"):
        trainer.fit(_bad_label_pipeline(bad), verbose=0)


def test_a_bad_label_in_validation_data_is_a_data_error_under_xla():
    trainer = _classifier(jit_compile=True)
    with pytest.raises(DataError, match="1 integer label lies outside"):
        trainer.fit(_bad_label_pipeline([]), validation_data=_bad_label_pipeline([40]), verbose=0)
    with pytest.raises(DataError, match="1 integer label lies outside"):
        trainer.evaluate(_bad_label_pipeline([40]))
    assert trainer.evaluate(_bad_label_pipeline([]))["loss"] > 0  # the count starts afresh


def test_bad_labels_are_counted_on_every_replica_of_a_strategy():
    # XLA on CPU cannot reach a second logical CPU's variables, so the count is driven here
    # as the compiled step drives it, replica by replica (tfloop's XLA is on for GPUs/TPUs).
    strategy = mirrored()
    check = LabelRangeCheck(strategy)
    check.enable(True)
    shares = [tf.constant([7, 0, 3, -1]), tf.constant([0, 4, 1, 2])]  # 2 bad, then 1
    labels = strategy.experimental_distribute_values_from_function(
        lambda context: shares[context.replica_id_in_sync_group]
    )

    @tf.function
    def step(labels):
        strategy.run(lambda y: check.count(y, tf.zeros((4, 4))), args=(labels,))
        return check.results()

    with pytest.raises(DataError, match="3 integer labels lie outside"):
        check.check(step(labels))
    check.reset()
    assert int(check.results()[LABEL_ERRORS]) == 0


def test_a_step_without_class_index_labels_adds_nothing_to_the_results():
    check = LabelRangeCheck()
    check.enable(True)
    tf.function(check.count)(tf.ones((3, 4)), tf.zeros((3, 4)))  # one-hot: nothing to count
    assert check.results() == {}
    tf.function(check.count)(tf.constant([0, 7, 1]), tf.zeros((3, 4)))
    assert int(check.results()[LABEL_ERRORS]) == 1


def test_good_labels_under_xla_train_as_without_the_count(tmp_path):
    logs = []
    for jit in (True, False):
        trainer = _classifier(jit_compile=jit, steps_per_execution=4)
        history = trainer.fit(_bad_label_pipeline([]), epochs=2, verbose=0)
        logs.append((history.history, weights_of(trainer.model)))
    assert sorted(logs[0][0]) == ["loss"]  # the count is never a log
    np.testing.assert_allclose(logs[0][0]["loss"], logs[1][0]["loss"], rtol=1e-5)
    assert_weights_equal(logs[0][1], logs[1][1], rtol=1e-5, atol=1e-6)


def test_an_unbuilt_model_trains_evaluates_and_predicts_alike():
    model = keras.Sequential([keras.layers.Dense(4, activation="relu"), keras.layers.Dense(1)])
    trainer = tfloop.Trainer(model, "sgd", "mse", seed=0)
    x, y = np.ones((16, 3), "float32"), np.ones((16, 1), "float32")
    history = trainer.fit(x, y, batch_size=8, verbose=0)
    assert model.built and np.isfinite(history.history["loss"][0])
    assert trainer.predict(x).shape == (16, 1)


# ------------------------------------------------ a corrupt newest checkpoint: exact fallback

JOB = Path(__file__).with_name("resume_job.py")


def run_job(directory, out, *args, expect=0):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(
        [sys.executable, str(JOB), str(directory), str(out), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert done.returncode == expect, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("straight")
    run_job(root / "run", root / "out.npz", "--data", "dataset", "--every-n-steps", "1")
    return np.load(root / "out.npz")


@pytest.mark.slow
@pytest.mark.parametrize("after", [10, 11, 12, 13, 24, 25, 26])  # 13 micro-batches per epoch
def test_falling_back_from_a_corrupt_newest_checkpoint_resumes_exactly(
    tmp_path, straight_run, after
):
    """A reshuffling dataset, Dropout, accumulate_steps=2 and a checkpoint every update: the
    newest checkpoint's data file is truncated after a kill; the rerun warns, falls back to the
    previous checkpoint and still finishes exactly as a straight run."""
    directory, out = tmp_path / "run", tmp_path / "out.npz"
    args = ("--data", "dataset", "--every-n-steps", "1")
    run_job(directory, out, *args, "--kill-after", str(after), expect=-signal.SIGKILL)
    newest = tf.train.latest_checkpoint(str(directory))
    data_file = Path(f"{newest}.data-00000-of-00001")
    data_file.write_bytes(data_file.read_bytes()[: data_file.stat().st_size // 2])
    done = run_job(directory, out, *args)
    assert "cannot be restored" in done.stderr
    resumed = np.load(out)
    assert resumed.files == straight_run.files
    for key in straight_run.files:
        np.testing.assert_array_equal(resumed[key], straight_run[key], err_msg=key)


def test_validation_data_is_checked_before_training_and_named():
    trainer = tfloop.Trainer(make_model(), "sgd", "categorical_crossentropy")
    before = weights_of(trainer.model)
    x, y = make_data(16)
    with pytest.raises(DataError, match="validation_data: the model cannot take x"):
        trainer.fit(x, y, batch_size=8, validation_data=(np.ones((4, 7)), y[:4]), verbose=0)
    assert_untouched(trainer, before)


def test_jit_compile_true_with_an_op_xla_cannot_compile_says_what_to_pass():
    class StringOp(tfloop.Trainer):
        def compute_loss(self, batch, training):
            loss = super().compute_loss(batch, training)
            tf.strings.as_string(loss)  # no XLA kernel
            return loss

    trainer = StringOp(make_model(), "sgd", "categorical_crossentropy", jit_compile=True)
    with pytest.raises(ConfigError, match=r"jit_compile='auto'.*jit_compile=False"):
        trainer.fit(make_data(16), batch_size=8, verbose=0)


@pytest.mark.parametrize("returned", [0.5, tf.ones(3)], ids=["float", "tensor"])
def test_a_step_that_returns_no_dict_is_named(returned):
    class Returns(tfloop.Trainer):
        def train_step(self, batch):
            super().train_step(batch)
            return returned

    trainer = Returns(make_model(), "sgd", "categorical_crossentropy")
    with pytest.raises(ConfigError, match=r"train_step returned a .*dict"):
        trainer.fit(make_data(16), batch_size=8, verbose=0)


def test_a_module_without_call_is_named_not_blamed_on_x():
    class Weights(tf.Module):
        def __init__(self):
            super().__init__()
            self.w = tf.Variable([[1.0]])

    trainer = tfloop.Trainer(Weights(), "sgd", "mse")
    with pytest.raises(ConfigError, match="no __call__"):
        trainer.fit(np.ones((8, 1), "float32"), np.ones((8, 1), "float32"), verbose=0)


def test_sample_weights_of_the_wrong_shape_in_a_dataset_are_named():
    x, y = make_data(16)
    weights = np.ones((16, 4), "float32")  # one per class, not per example
    data = tf.data.Dataset.from_tensor_slices((x, y, weights)).batch(8)
    trainer = tfloop.Trainer(make_model(), "sgd", "categorical_crossentropy")
    with pytest.raises(DataError, match="sample weights"):
        trainer.fit(data, verbose=0)


def test_a_list_of_lists_gets_a_hint_to_make_it_an_array():
    trainer = tfloop.Trainer(make_model(), "sgd", "categorical_crossentropy")
    with pytest.raises(DataError, match=r"np\.asarray"):
        trainer.fit([[0.0] * 5] * 4, np.ones((4, 3)), verbose=0)


# ------------------------------------------------------------------- checkpoints and exports


class NaNFrom(tfloop.Trainer):
    """The loss turns NaN from update ``start`` on (no non-finite policy: it reaches the
    weights)."""

    start = 6

    def compute_loss(self, batch, training):
        loss = super().compute_loss(batch, training)
        late = self.optimizer.iterations >= self.start
        return loss * tf.where(late, float("nan"), 1.0)  # NaN gradients too


def test_non_finite_weights_never_replace_the_last_finite_checkpoint(tmp_path, caplog):
    checkpointer = tfloop.Checkpointer(tmp_path, every_n_steps=2, max_to_keep=2)
    trainer = NaNFrom(make_model(), "sgd", "categorical_crossentropy", checkpoint=checkpointer)
    trainer.fit(make_data(64), batch_size=4, epochs=2, verbose=0)
    assert not np.isfinite(weights_of(trainer.model)[0]).all()
    latest = tf.train.latest_checkpoint(str(tmp_path))
    assert latest.endswith("ckpt-6")  # the update that made the weights NaN is not saved
    reader = tf.train.load_checkpoint(latest)
    for name in reader.get_variable_to_dtype_map():
        if name.startswith("model/") and "VARIABLE_VALUE" in name:
            assert np.isfinite(reader.get_tensor(name)).all(), name
    assert "NaN or Inf; no checkpoint is saved" in caplog.text


def test_a_checkpoint_of_another_optimizer_is_not_restored_silently(tmp_path):
    data = make_data(16)
    tfloop.Trainer(make_model(), "adam", "categorical_crossentropy", checkpoint=tmp_path).fit(
        data, batch_size=8, verbose=0
    )
    other = tfloop.Trainer(make_model(), "sgd", "categorical_crossentropy", checkpoint=tmp_path)
    before = weights_of(other.model)
    with pytest.raises(tfloop.errors.CheckpointError, match="holds a Adam as its optimizer"):
        other.fit(data, batch_size=8, epochs=2, verbose=0)
    assert_untouched(other, before)
    assert len(list(tmp_path.glob("ckpt-*.index"))) == 1  # nothing lost


def test_resuming_with_another_batch_size_is_named(tmp_path):
    checkpointer = tfloop.Checkpointer(tmp_path, every_n_steps=1)
    first = tfloop.Trainer(make_model(), "sgd", "categorical_crossentropy", checkpoint=checkpointer)
    first.fit(make_data(32), batch_size=8, epochs=1, max_steps=2, verbose=0)
    again = tfloop.Trainer(make_model(), "sgd", "categorical_crossentropy", checkpoint=tmp_path)
    with pytest.raises(tfloop.errors.CheckpointError, match=r"batch_size=8.*batch_size=16"):
        again.fit(make_data(32), batch_size=16, epochs=1, verbose=0)


@pytest.mark.parametrize("kind", ["savedmodel-over-a-file", "keras-file-over-a-directory"])
def test_export_onto_something_else_is_named_and_keeps_it(tmp_path, kind):
    trainer = tfloop.Trainer(make_model(), "sgd", "categorical_crossentropy")
    if kind == "savedmodel-over-a-file":
        path = tmp_path / "model"
        path.write_text("keep me")
    else:
        path = tmp_path / "model.keras"
        path.mkdir()
    with pytest.raises(ConfigError, match="export path"):
        trainer.export(path)
    assert path.exists() and (path.is_dir() or path.read_text() == "keep me")
    assert trainer.export(tmp_path / "new" / "dir" / "model.keras").endswith("model.keras")
