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
    assert trainer._loop("train").jit  # XLA really ran
    assert_weights_equal(plain, compiled, rtol=1e-4, atol=1e-5)


def test_tail_traces_once_and_is_cached_across_epochs():
    x, y = make_data(103)  # 103 = 12 full batches of 8 + a partial batch of 7
    trainer, _, _ = train(x, y, steps=5, jit=False, batch_size=8, epochs=4)
    # one trace for the full superbatch (the 2-step tail is padded into it), one for the
    # partial batch; none more in later epochs
    assert trainer._loop("train").tracing_count == 2


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
