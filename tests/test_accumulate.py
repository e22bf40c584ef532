"""Exact accumulation: k micro-batches make the update of their concatenation."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_weights_equal, make_data, make_model, weights_of
from hypothesis import given
from hypothesis import strategies as st

import tfloop
from tfloop.errors import ConfigError


def fit(data, *, batch_size, accumulate, optimizer, clip=None, epochs=2, steps="auto", jit=False):
    model = make_model()
    trainer = tfloop.Trainer(
        model,
        keras.optimizers.get(optimizer),
        "categorical_crossentropy",
        accumulate_steps=accumulate,
        clip_global_norm=clip,
        steps_per_execution=steps,
        jit_compile=jit,
    )
    trainer.fit(data, epochs=epochs, batch_size=batch_size, shuffle=False, verbose=0)
    return trainer, weights_of(model)


@given(
    n=st.integers(8, 80),
    micro=st.integers(1, 9),
    k=st.integers(1, 8),
    optimizer=st.sampled_from(["sgd", "adam"]),
    weighted=st.booleans(),
    clip=st.sampled_from([None, 0.05]),
    fused=st.sampled_from([(False, "auto"), (True, 1), (True, 5), (True, "auto")]),
)
def test_accumulated_update_equals_big_batch_update(n, micro, k, optimizer, weighted, clip, fused):
    # Under XLA whole windows are unrolled; steps_per_execution 1 and 5 cut windows into
    # pieces the loop runs step by step, "auto" runs the whole epoch in one execution.
    jit, steps = fused
    x, y = make_data(n)
    weights = np.random.default_rng(n).uniform(0.1, 3.0, n).astype("float32")
    data = (x, y, weights) if weighted else (x, y)
    accumulated, got = fit(
        data, batch_size=micro, accumulate=k, optimizer=optimizer, clip=clip, jit=jit, steps=steps
    )
    _, expected = fit(data, batch_size=micro * k, accumulate=1, optimizer=optimizer, clip=clip)
    assert_weights_equal(got, expected, rtol=1e-5, atol=1e-6)
    micro_batches = -(-n // micro)
    assert int(accumulated.optimizer.iterations) == 2 * -(-micro_batches // k)


def test_accumulation_with_xla_and_fusion_matches_unfused():
    x, y = make_data(77)
    _, fused = fit((x, y), batch_size=4, accumulate=3, optimizer="adam", steps=5, jit=True)
    _, plain = fit((x, y), batch_size=4, accumulate=3, optimizer="adam", steps=1, jit=False)
    assert_weights_equal(fused, plain, rtol=1e-4, atol=1e-6)


def test_unequal_micro_batches_are_weighted_by_their_size():
    x, y = make_data(17)
    sizes = [3, 7, 2, 5]  # one window of 4 micro-batches of unequal size
    starts = np.cumsum([0, *sizes[:-1]])
    batches = [(x[s : s + m], y[s : s + m]) for s, m in zip(starts, sizes, strict=False)]
    dataset = tf.data.Dataset.from_generator(
        lambda: iter(batches),
        output_signature=(tf.TensorSpec([None, 5]), tf.TensorSpec([None, 3])),
    )
    trainer, got = fit(dataset, batch_size=None, accumulate=4, optimizer="sgd", epochs=1)
    _, expected = fit((x, y), batch_size=17, accumulate=1, optimizer="sgd", epochs=1)
    assert_weights_equal(got, expected, rtol=1e-5, atol=1e-7)
    assert int(trainer.optimizer.iterations) == 1


def test_learning_rate_schedules_count_updates_not_micro_batches():
    x, y = make_data(48)
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([1], [0.5, 0.0])
    model = make_model()
    trainer = tfloop.Trainer(
        model, keras.optimizers.SGD(schedule), "categorical_crossentropy", accumulate_steps=4
    )
    trainer.fit((x, y), epochs=1, batch_size=4, shuffle=False, verbose=0)  # 12 micro, 3 updates
    assert int(trainer.optimizer.iterations) == 3
    # the reference: updates 0 and 1 use lr 0.5, update 2 uses lr 0 (a no-op)
    reference = make_model()
    reference_trainer = tfloop.Trainer(
        reference, keras.optimizers.SGD(0.5), "categorical_crossentropy"
    )
    reference_trainer.fit((x[:32], y[:32]), epochs=1, batch_size=16, shuffle=False, verbose=0)
    assert_weights_equal(weights_of(model), weights_of(reference), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("jit", [False, True])
def test_gradient_accumulator_inside_a_compiled_function(jit):
    variable = tf.Variable([0.0, 0.0])
    accumulator = tfloop.GradientAccumulator([variable], steps=3)
    optimizer = keras.optimizers.SGD(1.0)
    optimizer.build([variable])
    grads = tf.constant([[1.0, 2.0], [3.0, -1.0], [0.5, 0.5]])
    weights = tf.constant([2.0, 1.0, 5.0])

    @tf.function(jit_compile=jit)
    def run():
        for i in tf.range(3):
            accumulator.accumulate([grads[i]], weights[i])
        ready = accumulator.ready
        accumulator.apply(optimizer)
        return ready

    assert bool(run())
    expected = -(tf.reduce_sum(grads * weights[:, None], 0) / tf.reduce_sum(weights)).numpy()
    np.testing.assert_allclose(variable.numpy(), expected, rtol=1e-6)
    assert int(accumulator.count) == 0 and float(accumulator.total_weight) == 0.0


def test_a_window_of_zero_weight_is_a_no_op_not_nan():
    variable = tf.Variable([1.0])
    accumulator = tfloop.GradientAccumulator([variable], steps=1)
    optimizer = keras.optimizers.Adam(0.1)
    optimizer.build([variable])
    accumulator.accumulate([tf.constant([5.0])], weight=0)
    accumulator.apply(optimizer)
    assert variable.numpy().tolist() == [1.0]
    assert int(optimizer.iterations) == 0


@pytest.mark.parametrize("steps", [0, -1, 1.5, True, "2"])
def test_bad_steps_are_rejected(steps):
    with pytest.raises(ConfigError, match="steps"):
        tfloop.GradientAccumulator([tf.Variable(1.0)], steps=steps)


def test_no_variables_is_rejected():
    with pytest.raises(ConfigError, match="variables is empty"):
        tfloop.GradientAccumulator([], steps=2)


def test_mixed_float16_with_loss_scaling_and_accumulation():
    x, y = make_data(64)
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = make_model()
    finally:
        keras.mixed_precision.set_global_policy("float32")
    # a huge initial scale overflows float16: those windows are skipped, the scale shrinks
    optimizer = keras.optimizers.LossScaleOptimizer(
        keras.optimizers.Adam(0.01), initial_scale=2.0**24
    )
    trainer = tfloop.Trainer(model, optimizer, "categorical_crossentropy", accumulate_steps=2)
    history = trainer.fit((x, y), epochs=6, batch_size=8, verbose=0)
    windows = 6 * 4
    assert 0 < int(optimizer.iterations) < windows  # overflowing windows did not count
    assert float(optimizer.dynamic_scale) < 2.0**24
    assert all(v.dtype == "float32" for v in model.trainable_variables)
    assert all(np.isfinite(w).all() for w in weights_of(model))
    assert history.history["loss"][-1] < history.history["loss"][0]


@pytest.mark.parametrize("accumulate_steps", [1, 3])
def test_clipping_acts_on_the_unscaled_gradient_under_loss_scaling(accumulate_steps):
    # A LossScaleOptimizer gets gradients multiplied by its scale; clipping them to the
    # user's limit as they are would shrink every update by that scale.
    x, y = make_data(48)
    results = []
    for scaled in (False, True):
        model = make_model()
        optimizer = keras.optimizers.SGD(0.5)
        if scaled:
            optimizer = keras.optimizers.LossScaleOptimizer(
                optimizer, initial_scale=1024.0, dynamic_growth_steps=10**6
            )
        trainer = tfloop.Trainer(
            model,
            optimizer,
            "categorical_crossentropy",
            accumulate_steps=accumulate_steps,
            clip_global_norm=0.01,
            seed=0,
        )
        trainer.fit((x, y), epochs=2, batch_size=8, verbose=0)
        results.append(weights_of(model))
    assert_weights_equal(results[1], results[0], rtol=1e-5, atol=1e-7)


@given(n=st.integers(8, 60), micro=st.integers(1, 7), k=st.integers(2, 5))
def test_drop_remainder_discards_the_partial_last_window(n, micro, k):
    x, y = make_data(n)
    micro_batches = -(-n // micro)
    full_windows = micro_batches // k
    model = make_model()
    trainer = tfloop.Trainer(
        model,
        keras.optimizers.get("sgd"),
        "categorical_crossentropy",
        accumulate_steps=k,
        drop_remainder=True,
        jit_compile=False,
    )
    trainer.fit((x, y), epochs=2, batch_size=micro, shuffle=False, verbose=0)
    assert int(trainer.optimizer.iterations) == 2 * full_windows
    # The same as big batches over the examples of the full windows only.
    kept = n if micro_batches % k == 0 else full_windows * k * micro
    if kept == 0:
        assert_weights_equal(weights_of(model), weights_of(make_model()))
        return
    _, expected = fit((x[:kept], y[:kept]), batch_size=micro * k, accumulate=1, optimizer="sgd")
    assert_weights_equal(weights_of(model), expected, rtol=1e-5, atol=1e-6)


def test_drop_remainder_must_be_a_bool():
    with pytest.raises(ConfigError, match="drop_remainder must be True or False"):
        tfloop.Trainer(make_model(), "sgd", "mse", accumulate_steps=2, drop_remainder="yes")


@pytest.mark.parametrize("jit", [False, True])
@given(
    bad=st.sets(st.integers(0, 9), max_size=3), k=st.integers(2, 4), steps=st.sampled_from([1, 3])
)
def test_a_non_finite_micro_batch_is_dropped_and_the_window_waits_for_k_good_ones(
    jit, bad, k, steps
):
    # 10 micro-batches of 4; the marked ones have a NaN loss. A dropped micro-batch does not
    # count: the update is the same as accumulating over the good micro-batches only.
    x, y = make_data(40)
    x[:, 0] = np.abs(x[:, 0])
    for index in bad:
        x[index * 4, 0] = -1.0

    class NaNTrainer(tfloop.Trainer):
        def compute_loss(self, batch, training):
            loss = super().compute_loss(batch, training)
            return tf.where(batch[0][0, 0] < 0, tf.constant(float("nan")), loss)

    trainer = NaNTrainer(
        make_model(),
        "adam",
        "categorical_crossentropy",
        accumulate_steps=k,
        steps_per_execution=steps,
        jit_compile=jit,
        callbacks=[guard := tfloop.callbacks.NonFiniteGuard("skip")],
    )
    trainer.fit((x, y), batch_size=4, shuffle=False, verbose=0)
    good = np.ones(40, bool)
    for index in bad:
        good[index * 4 : index * 4 + 4] = False
    reference, expected = fit(
        (x[good], y[good]), batch_size=4, accumulate=k, optimizer="adam", epochs=1
    )
    assert_weights_equal(weights_of(trainer.model), expected, rtol=1e-5, atol=1e-6)
    assert guard.skipped == len(bad)
    assert int(trainer.optimizer.iterations) == int(reference.optimizer.iterations)


@given(n=st.integers(8, 60), half=st.integers(1, 4), k=st.integers(1, 4))
def test_a_step_that_applies_gradients_twice_fills_the_window_twice_as_fast(n, half, k):
    # Each step splits its batch in two and hands both halves to apply_gradients: with
    # accumulate_steps=2k, an update is made of k steps, the same as k whole batches.
    class HalvesTrainer(tfloop.Trainer):
        def train_step(self, batch):
            x, y = batch
            size = tf.shape(x)[0] // 2
            for part in (slice(None, size), slice(size, None)):
                with tf.GradientTape() as tape:
                    loss = self.compute_loss((x[part], y[part]), training=True)
                grads = tape.gradient(loss, self.trainable_variables)
                self.apply_gradients(grads, weight=tf.shape(x[part])[0], loss=loss)

    x, y = make_data(n)
    model = make_model()
    trainer = HalvesTrainer(
        model, "sgd", "categorical_crossentropy", accumulate_steps=2 * k, jit_compile=False
    )
    trainer.fit((x, y), epochs=2, batch_size=2 * half, shuffle=False, verbose=0)
    _, expected = fit((x, y), batch_size=2 * half * k, accumulate=1, optimizer="sgd")
    assert_weights_equal(weights_of(model), expected, rtol=1e-5, atol=1e-6)
