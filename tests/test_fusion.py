"""Fusion changes nothing but speed: any steps_per_execution, XLA on or off, same updates."""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf
from conftest import assert_weights_equal, make_data, make_model, weights_of
from hypothesis import given
from hypothesis import strategies as st

import tfloop


def train(x, y, *, steps, jit, batch_size, epochs=2, accumulate=1, optimizer="adam", data=None):
    model = make_model()
    trainer = tfloop.Trainer(
        model,
        keras.optimizers.get(optimizer),
        "categorical_crossentropy",
        ["accuracy"],
        steps_per_execution=steps,
        jit_compile=jit,
        accumulate_steps=accumulate,
        seed=1,
    )
    history = trainer.fit(
        data if data is not None else (x, y),
        epochs=epochs,
        batch_size=None if data is not None else batch_size,
        verbose=0,
    )
    return trainer, weights_of(model), history.history


@given(
    n=st.integers(20, 90),
    batch_size=st.integers(3, 16),
    steps=st.sampled_from([7, 2, "auto"]),
    accumulate=st.sampled_from([1, 3]),
)
def test_any_steps_per_execution_gives_bit_identical_weights_without_xla(
    n, batch_size, steps, accumulate
):
    x, y = make_data(n)
    _, reference, ref_history = train(
        x, y, steps=1, jit=False, batch_size=batch_size, accumulate=accumulate
    )
    trainer, fused, history = train(
        x, y, steps=steps, jit=False, batch_size=batch_size, accumulate=accumulate
    )
    assert_weights_equal(reference, fused)
    assert history == ref_history
    expected_updates = 2 * math.ceil(math.ceil(n / batch_size) / accumulate)
    assert int(trainer.optimizer.iterations) == expected_updates


@given(n=st.integers(20, 90), batch_size=st.integers(3, 16), steps=st.sampled_from([1, 7]))
def test_xla_gives_the_same_weights_within_float_tolerance(n, batch_size, steps):
    x, y = make_data(n)
    _, plain, _ = train(x, y, steps=steps, jit=False, batch_size=batch_size)
    trainer, compiled, _ = train(x, y, steps=steps, jit=True, batch_size=batch_size)
    assert trainer._engine.loop("train").jit  # XLA really ran
    assert_weights_equal(plain, compiled, rtol=1e-4, atol=1e-5)


def test_tail_traces_once_and_is_cached_across_epochs():
    x, y = make_data(103)  # 103 = 12 full batches of 8 + a partial batch of 7
    trainer, _, _ = train(x, y, steps=5, jit=False, batch_size=8, epochs=4)
    # one trace for the full superbatch (the 2-step tail is padded into it), one for the
    # partial batch; none more in later epochs
    assert trainer.tracing_count("train") == 2


def test_dataset_input_with_a_dynamic_batch_dimension_equals_array_input():
    x, y = make_data(61)
    _, from_arrays, _ = train(x, y, steps=4, jit=False, batch_size=8)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)  # batch dim is None
    assert dataset.element_spec[0].shape[0] is None
    _, from_dataset, _ = train(
        None, None, steps=4, jit=False, batch_size=8, data=dataset.shuffle(1)
    )
    # shuffle(1) keeps the order; arrays are shuffled by tfloop, so compare unshuffled runs
    model = make_model()
    trainer = tfloop.Trainer(
        model, "adam", "categorical_crossentropy", steps_per_execution=4, jit_compile=False
    )
    trainer.fit((x, y), epochs=2, batch_size=8, shuffle=False, verbose=0)
    assert_weights_equal(weights_of(model), from_dataset)
    assert not np.allclose(from_arrays[0], from_dataset[0])  # shuffling did change the order


def test_static_batch_dataset_equals_dynamic_batch_dataset():
    x, y = make_data(64)
    static = tf.data.Dataset.from_tensor_slices((x, y)).batch(8, drop_remainder=True)
    dynamic = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    assert static.element_spec[0].shape[0] == 8
    _, a, _ = train(None, None, steps=3, jit=False, batch_size=None, data=static)
    _, b, _ = train(None, None, steps=3, jit=False, batch_size=None, data=dynamic)
    assert_weights_equal(a, b)


@given(n=st.integers(5, 70), batch_size=st.integers(2, 16), steps=st.sampled_from([1, 3, "auto"]))
def test_fused_evaluate_and_predict_equal_unfused(n, batch_size, steps):
    x, y = make_data(n)
    model = make_model()
    reference = tfloop.Trainer(
        model,
        loss="categorical_crossentropy",
        metrics=["accuracy"],
        steps_per_execution=1,
        jit_compile=False,
    )
    fused = tfloop.Trainer(
        model,
        loss="categorical_crossentropy",
        metrics=["accuracy"],
        steps_per_execution=steps,
        jit_compile=True,
    )
    expected = reference.evaluate((x, y), batch_size=batch_size)
    got = fused.evaluate((x, y), batch_size=batch_size)
    assert got.keys() == expected.keys() == {"loss", "accuracy"}
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-5)
    direct = model(x, training=False).numpy()
    np.testing.assert_allclose(reference.predict(x, batch_size=batch_size), direct, rtol=1e-5)
    np.testing.assert_allclose(
        fused.predict(x, batch_size=batch_size), direct, rtol=1e-5, atol=1e-6
    )


def test_fit_per_epoch_equals_one_multi_epoch_fit_and_reuses_read_only_arrays(monkeypatch):
    from tfloop import _checks
    from tfloop.data._cache import TENSORS

    x, y = make_data(61)
    whole, whole_weights, _ = train(x, y, steps=3, jit=False, batch_size=8, epochs=3)
    dry_runs = []
    original = _checks.check_model_accepts
    monkeypatch.setattr(
        _checks,
        "check_model_accepts",
        lambda *args: dry_runs.append(1) or original(*args),
    )
    for read_only in (False, True):
        xs, ys = x.copy(), y.copy()
        if read_only:
            xs.setflags(write=False)
            ys.setflags(write=False)
        model = make_model()
        trainer = tfloop.Trainer(
            model,
            "adam",
            "categorical_crossentropy",
            ["accuracy"],
            steps_per_execution=3,
            jit_compile=False,
            seed=1,
        )
        dry_runs.clear()
        for epoch in range(3):  # one fit per epoch: the shuffle order depends on (seed, epoch)
            trainer.fit((xs, ys), epochs=epoch + 1, initial_epoch=epoch, batch_size=8, verbose=0)
        assert_weights_equal(whole_weights, weights_of(model))
        assert len(dry_runs) == 1  # the same input signature is checked once per trainer
        tensor = TENSORS.convert(xs)
        assert (tensor is TENSORS.convert(xs)) is read_only
    assert int(whole.optimizer.iterations) == 3 * 8


def test_step_override_that_returns_nothing_adds_no_logs():
    class Quiet(tfloop.Trainer):
        def train_step(self, batch):
            super().train_step(batch)

        def test_step(self, batch):
            super().test_step(batch)

    x, y = make_data(40)
    model = make_model()
    before = weights_of(model)
    trainer = Quiet(model, "sgd", "categorical_crossentropy")
    history = trainer.fit((x, y), batch_size=8, verbose=0, validation_data=(x, y))
    assert set(history.history) == {"loss", "val_loss"}
    assert not np.array_equal(weights_of(model)[0], before[0])


def test_a_train_step_override_needs_no_loss():
    # A step that computes its own loss (loss=None, compute_loss not overridden) trains.
    class OwnLoss(tfloop.Trainer):
        def train_step(self, batch):
            x, y = batch
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(self.model(x, training=True) - y))
            grads = tape.gradient(loss, self.trainable_variables)
            self.apply_gradients(grads, weight=tf.cast(tf.shape(x)[0], tf.float32))
            return {"own_loss": loss}

    x, y = make_data(40)
    model = make_model()
    before = weights_of(model)
    history = OwnLoss(model, "sgd").fit((x, y), batch_size=8, epochs=2, verbose=0)
    assert len(history.history["own_loss"]) == 2
    assert not np.array_equal(weights_of(model)[0], before[0])
