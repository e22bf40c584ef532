"""The compiled loops and the update rule alone, without a Trainer.

``_loops`` builds K-step functions from callables and ``_update`` turns gradients into updates;
each is checked here against a plain eager reference.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given
from hypothesis import strategies as st

import tfloop
from tfloop._loops import CompiledLoop, LoopSpec
from tfloop._update import UpdateRule

# ------------------------------------------------------------------------------ UpdateRule


def _grad(w: tf.Variable, x: np.ndarray) -> tf.Tensor:
    """The gradient of mean((x @ w)^2) / 2 at w."""
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(tf.convert_to_tensor(x) @ w)) / 2.0
    return tape.gradient(loss, w)


@given(sizes=st.lists(st.integers(1, 5), min_size=1, max_size=4), seed=st.integers(0, 5))
def test_a_closed_window_is_the_update_of_the_micro_batches_concatenated(sizes, seed):
    rng = np.random.default_rng(seed)
    parts = [rng.normal(size=(n, 3)).astype("float32") for n in sizes]
    start = rng.normal(size=(3, 1)).astype("float32")

    windowed = tf.Variable(start)
    rule = UpdateRule(keras.optimizers.SGD(0.1), accumulate_steps=len(sizes))
    rule.build([windowed])
    for part in parts:
        rule.apply_gradients([_grad(windowed, part)], weight=float(len(part)))
    if rule.uses_window:  # one micro-batch per update applies at once
        rule.close(flush=None)

    whole = tf.Variable(start)
    keras.optimizers.SGD(0.1).apply_gradients([(_grad(whole, np.concatenate(parts)), whole)])
    np.testing.assert_allclose(windowed.numpy(), whole.numpy(), rtol=1e-5, atol=1e-6)
    assert int(rule.optimizer.iterations) == 1


def test_a_partial_window_waits_is_applied_on_flush_or_dropped_with_drop_remainder():
    for drop, moves in ((False, True), (True, False)):
        w = tf.Variable([[1.0], [2.0], [3.0]])
        rule = UpdateRule(keras.optimizers.SGD(0.1), accumulate_steps=3, drop_remainder=drop)
        rule.build([w])
        rule.apply_gradients([tf.ones((3, 1))], weight=2.0)
        rule.close(flush=tf.constant(False))
        assert w.numpy()[0, 0] == 1.0  # one micro-batch of three: the window stays open
        rule.close(flush=tf.constant(True))
        assert (w.numpy()[0, 0] != 1.0) == moves
        assert int(rule.accumulator.count) == 0


@pytest.mark.parametrize("accumulate", [1, 2])
def test_non_finite_micro_batches_are_dropped_and_counted(accumulate):
    w = tf.Variable([1.0, 2.0])
    rule = UpdateRule(keras.optimizers.SGD(1.0), accumulate_steps=accumulate, non_finite="skip")
    rule.build([w])
    rule.apply_gradients([tf.constant([np.nan, 1.0])], weight=1.0, loss=tf.constant(1.0))
    if accumulate > 1:
        rule.close(flush=tf.constant(True))
    np.testing.assert_array_equal(w.numpy(), [1.0, 2.0])
    assert int(rule.non_finite_steps) == 1
    assert int(rule.first_non_finite_step) == 0
    assert rule.variable_name(int(rule.first_non_finite_tensor)).startswith("gradient of")
    rule.apply_gradients([tf.constant([1.0, 1.0])], weight=1.0, loss=tf.constant(np.inf))
    assert int(rule.non_finite_steps) == 2 and int(rule.first_non_finite_step) == 0


def test_clipping_acts_on_the_accumulated_gradient():
    w = tf.Variable([0.0, 0.0])
    rule = UpdateRule(keras.optimizers.SGD(1.0), accumulate_steps=2, clip_global_norm=1.0)
    rule.build([w])
    rule.apply_gradients([tf.constant([3.0, 0.0])], weight=1.0)
    rule.apply_gradients([tf.constant([3.0, 4.0])], weight=1.0)  # mean (3, 2): norm sqrt(13)
    rule.close(flush=None)
    expected = -np.array([3.0, 2.0]) / np.sqrt(13.0)
    np.testing.assert_allclose(w.numpy(), expected, rtol=1e-6)


# ------------------------------------------------------------------------------ CompiledLoop


def _superbatch(k: int, batch: int, seed: int = 0) -> tf.Tensor:
    return tf.constant(np.random.default_rng(seed).normal(size=(k, batch, 3)).astype("float32"))


@pytest.mark.parametrize("jit", [False, True])
def test_a_test_loop_runs_exactly_the_steps_asked_and_reuses_its_trace(jit):
    seen = tf.Variable(0.0)

    def step(batch):
        seen.assign_add(tf.reduce_sum(batch))

    loop = CompiledLoop(LoopSpec("test", step, lambda: {"seen": seen.read_value()}, jit=jit))
    data = _superbatch(6, 4)
    expected = 0.0
    for start, stop in ((0, 6), (2, 5), (5, 6)):
        results, logs = loop(data, start, stop)
        expected += float(tf.reduce_sum(data[start:stop]))
        np.testing.assert_allclose(float(results["seen"]), expected, rtol=1e-5)
        assert logs == {}
    assert loop.tracing_count == 1


def test_a_step_that_returns_a_dict_logs_the_last_steps_values():
    def step(batch):
        return {"first": batch[0, 0]}

    loop = CompiledLoop(LoopSpec("test", step, dict, returns_logs=True, jit=False))
    data = _superbatch(4, 2)
    _, logs = loop(data, 0, 3)
    assert float(logs["first"]) == float(data[2, 0, 0])


@pytest.mark.parametrize(("jit", "unroll"), [(False, False), (True, False), (True, True)])
@given(start=st.integers(0, 7), length=st.integers(1, 8), k=st.integers(2, 4))
def test_a_windowed_train_loop_equals_the_same_steps_run_one_by_one(jit, unroll, start, length, k):
    stop = min(8, start + length)
    data = _superbatch(8, 3, seed=start)
    init = np.ones((3, 1), "float32")

    def build() -> tuple[tf.Variable, UpdateRule]:
        w = tf.Variable(init)
        rule = UpdateRule(keras.optimizers.Adam(0.1), accumulate_steps=k)
        rule.build([w])
        return w, rule

    fused_w, fused = build()

    def step(batch):
        fused.apply_gradients([_grad(fused_w, batch)], weight=3.0)

    spec = LoopSpec("train", step, lambda: {}, window=fused, unroll=unroll, jit=jit)
    CompiledLoop(spec)(data, start, stop, stop - 1)  # the last step ends the "epoch"

    eager_w, eager = build()
    for i in range(start, stop):
        eager.apply_gradients([_grad(eager_w, data[i].numpy())], weight=3.0)
        eager.close(flush=tf.constant(i == stop - 1))
    np.testing.assert_allclose(fused_w.numpy(), eager_w.numpy(), rtol=1e-5, atol=1e-6)
    assert int(fused.optimizer.iterations) == int(eager.optimizer.iterations)


def test_a_predict_loop_returns_the_outputs_of_the_steps_run():
    loop = CompiledLoop(LoopSpec("predict", lambda batch: batch * 2.0, jit=True))
    data = _superbatch(5, 2)
    outputs = loop.predict([(data, 1, 4), (data, 0, 1)])
    expected = np.concatenate([data[1:4].numpy().reshape(-1, 3), data[0].numpy()]) * 2.0
    np.testing.assert_allclose(outputs, expected)


def test_a_step_xla_cannot_compile_falls_back_without_it_when_allowed(caplog):
    def step(batch):
        # String ops have no XLA kernel on CPU.
        return {"n": tf.strings.length(tf.strings.as_string(batch[0, 0]))}

    strict = CompiledLoop(LoopSpec("test", step, dict, returns_logs=True, jit=True))
    with pytest.raises(tfloop.errors.ConfigError, match="jit_compile='auto'"):
        strict(_superbatch(2, 2), 0, 2)
    tolerant = CompiledLoop(
        LoopSpec("test", step, dict, returns_logs=True, jit=True, jit_fallback=True)
    )
    _, logs = tolerant(_superbatch(2, 2), 0, 2)
    assert int(logs["n"]) > 0 and tolerant.jit is False
    assert "XLA could not compile" in caplog.text
