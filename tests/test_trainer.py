"""The Trainer's contract: reference equivalence, subclassing, callbacks, logs, data options."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_weights_equal, make_data, make_model, weights_of
from hypothesis import given
from hypothesis import strategies as st

import tfloop


def reference_training(model, optimizer, x, y, batch_size, sample_weight=None, epochs=1):
    """The hand-written GradientTape loop the Trainer must reproduce."""
    loss_fn = keras.losses.CategoricalCrossentropy()
    optimizer.build(model.trainable_variables)

    @tf.function
    def step(xb, yb, wb):
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True), sample_weight=wb)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=False))

    for _ in range(epochs):
        for start in range(0, len(x), batch_size):
            end = start + batch_size
            wb = None if sample_weight is None else sample_weight[start:end]
            step(x[start:end], y[start:end], wb)


@given(
    n=st.integers(10, 60),
    batch_size=st.integers(2, 16),
    optimizer=st.sampled_from(["sgd", "adam"]),
    weighted=st.booleans(),
)
def test_fit_equals_a_hand_written_gradient_tape_loop(n, batch_size, optimizer, weighted):
    x, y = make_data(n)
    sample_weight = np.random.default_rng(1).uniform(0.1, 2.0, n).astype("float32")
    data = (x, y, sample_weight) if weighted else (x, y)
    model = make_model()
    tfloop.Trainer(model, optimizer, "categorical_crossentropy", jit_compile=False).fit(
        data, epochs=2, batch_size=batch_size, shuffle=False, verbose=0
    )
    reference = make_model()
    reference_training(
        reference,
        keras.optimizers.get(optimizer),
        x,
        y,
        batch_size,
        sample_weight if weighted else None,
        epochs=2,
    )
    assert_weights_equal(weights_of(model), weights_of(reference), rtol=1e-5, atol=1e-6)


class Linear(tf.Module):
    def __init__(self):
        super().__init__()
        self.w = tf.Variable(0.0)
        self.b = tf.Variable(0.0)

    def __call__(self, x):
        return self.w * x + self.b


class LinearTrainer(tfloop.Trainer):
    def compute_loss(self, batch, training):
        x, y = batch
        return tf.reduce_mean(tf.square(self.model(x) - y))


def test_a_plain_tf_module_trains_through_a_compute_loss_override():
    x = np.linspace(-1, 1, 200).astype("float32")
    y = 2 * x + 0.5
    module = Linear()
    trainer = LinearTrainer(module, keras.optimizers.Adam(0.1), seed=0)
    history = trainer.fit((x, y), epochs=60, batch_size=20, verbose=0)
    assert abs(float(module.w) - 2.0) < 0.02 and abs(float(module.b) - 0.5) < 0.02
    assert history.history["loss"][-1] < history.history["loss"][0]
    np.testing.assert_allclose(trainer.predict(x[:5]), module(x[:5]).numpy(), rtol=1e-6)


class TwoLossTrainer(tfloop.Trainer):
    """A subclass that overrides train_step and returns extra logs."""

    def train_step(self, batch):
        x, y = batch
        with tf.GradientTape() as tape:
            y_pred = self.model(x, training=True)
            loss = self.loss(y, y_pred)
        grads = tape.gradient(loss, self.trainable_variables)
        self.apply_gradients(grads)
        self.loss_tracker.update_state(loss)
        return {"grad_norm": tf.linalg.global_norm(grads)}


@pytest.mark.parametrize("jit", [False, True])
def test_an_overridden_train_step_keeps_the_fused_loop_and_adds_its_logs(jit):
    x, y = make_data(64)
    seen = []

    class Record(tfloop.Callback):
        def on_train_batch_end(self, batch, logs):
            seen.append((batch, dict(logs)))

    trainer = TwoLossTrainer(
        make_model(),
        "sgd",
        "categorical_crossentropy",
        steps_per_execution=4,
        jit_compile=jit,
        callbacks=[Record()],
    )
    history = trainer.fit((x, y), epochs=2, batch_size=8, verbose=0)
    assert [batch for batch, _ in seen] == [3, 7, 3, 7]  # one event per execution of 4 steps
    assert all(logs["grad_norm"] > 0 for _, logs in seen)
    assert [logs["step"] for _, logs in seen] == [4, 8, 12, 16]
    assert history.history["grad_norm"] == [seen[1][1]["grad_norm"], seen[3][1]["grad_norm"]]
    assert trainer.tracing_count("train") == 1


def test_events_come_in_order_and_history_matches_epoch_logs():
    x, y = make_data(40)
    events = []

    class Record(tfloop.Callback):
        def on_fit_start(self, logs):
            events.append("fit_start")

        def on_epoch_start(self, epoch, logs):
            events.append(f"epoch_start {epoch}")

        def on_train_batch_end(self, batch, logs):
            events.append(f"batch {batch}")

        def on_eval_start(self, logs):
            events.append("eval_start")

        def on_eval_end(self, logs):
            events.append("eval_end")

        def on_epoch_end(self, epoch, logs):
            events.append(f"epoch_end {epoch} {sorted(logs)}")

        def on_fit_end(self, logs):
            events.append("fit_end")

    trainer = tfloop.Trainer(
        make_model(),
        "adam",
        "categorical_crossentropy",
        ["accuracy"],
        steps_per_execution=3,
        callbacks=[Record()],
    )
    history = trainer.fit(
        (x, y), epochs=3, batch_size=10, validation_data=(x, y), validation_freq=2, verbose=0
    )
    keys = ["accuracy", "loss"]
    val_keys = sorted([*keys, "val_accuracy", "val_loss"])
    assert events == [
        "fit_start",
        "epoch_start 0",
        "batch 2",
        "batch 3",
        f"epoch_end 0 {keys}",
        "epoch_start 1",
        "batch 2",
        "batch 3",
        "eval_start",
        "eval_end",
        f"epoch_end 1 {val_keys}",
        "epoch_start 2",
        "batch 2",
        "batch 3",
        f"epoch_end 2 {keys}",
        "fit_end",
    ]
    assert len(history.history["loss"]) == 3 and len(history.history["val_loss"]) == 1
    assert history.epoch == [0, 1, 2]


def test_stop_training_from_a_callback_stops_at_the_execution_boundary():
    class StopAfterFirstExecution(tfloop.Callback):
        def on_train_batch_end(self, batch, logs):
            self.trainer.stop_training = True

    trainer = tfloop.Trainer(
        make_model(),
        "sgd",
        "categorical_crossentropy",
        steps_per_execution=2,
        callbacks=[StopAfterFirstExecution()],
    )
    history = trainer.fit(make_data(40), epochs=5, batch_size=4, verbose=0)
    assert int(trainer.optimizer.iterations) == 2
    assert len(history.history["loss"]) == 1


def test_epoch_logs_are_exact_means_over_the_epoch():
    x, y = make_data(50)
    model = make_model()
    trainer = tfloop.Trainer(
        model,
        keras.optimizers.SGD(0.0),
        "categorical_crossentropy",
        ["accuracy"],
        steps_per_execution=4,
    )
    history = trainer.fit((x, y), epochs=1, batch_size=8, verbose=0)
    # with a zero learning rate the weights never move, so the epoch mean is the full-data mean
    expected = keras.losses.CategoricalCrossentropy()(y, model(x)).numpy()
    np.testing.assert_allclose(history.history["loss"][0], expected, rtol=1e-5)
    accuracy = np.mean(np.argmax(model(x), 1) == np.argmax(y, 1))
    np.testing.assert_allclose(history.history["accuracy"][0], accuracy, rtol=1e-6)


def test_steps_per_epoch_runs_one_iterator_across_epochs():
    x, y = make_data(100)
    seen = []

    class Record(tfloop.Callback):
        def on_epoch_end(self, epoch, logs):
            seen.append(int(self.trainer.optimizer.iterations))

    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(10).repeat()
    trainer = tfloop.Trainer(
        make_model(), "sgd", "categorical_crossentropy", steps_per_execution=4, callbacks=[Record()]
    )
    trainer.fit(dataset, epochs=3, steps_per_epoch=6, verbose=0)
    assert seen == [6, 12, 18]


def test_a_finite_dataset_that_runs_out_stops_training_with_a_warning(caplog):
    dataset = tf.data.Dataset.from_tensor_slices(make_data(30)).batch(10)
    trainer = tfloop.Trainer(make_model(), "sgd", "categorical_crossentropy")
    history = trainer.fit(dataset, epochs=3, steps_per_epoch=2, verbose=0)
    assert int(trainer.optimizer.iterations) == 3
    assert len(history.history["loss"]) == 2
    assert "ran out" in caplog.text


def test_shuffle_is_seeded_per_epoch_and_reproducible():
    x, y = make_data(64)

    def run(seed):
        model = make_model(dropout=0.3)
        tfloop.Trainer(model, "sgd", "categorical_crossentropy", seed=seed).fit(
            (x, y), epochs=2, batch_size=8, verbose=0
        )
        return weights_of(model)

    assert_weights_equal(run(3), run(3))
    with pytest.raises(AssertionError):
        assert_weights_equal(run(3), run(4))


def test_each_epoch_sees_every_example_once_in_a_new_order():
    from tfloop.data import adapt

    x = np.arange(50, dtype="float32")[:, None]
    source = adapt((x, x), batch_size=7, steps_per_execution=3, shuffle=True, seed=0)
    orders = []
    for epoch in range(2):
        seen = []
        for piece in source.epoch(epoch):
            seen.extend(piece.data[0][: piece.steps].numpy().reshape(-1).tolist())
        orders.append(seen)
        assert sorted(seen) == list(range(50))
    assert orders[0] != orders[1]


def test_jit_auto_falls_back_when_xla_cannot_compile(caplog):
    class HostLoss(tfloop.Trainer):
        def compute_loss(self, batch, training):
            x, y = batch
            y_pred = self.model(x, training=training)
            # a string op: XLA has no kernel for it
            tf.strings.as_string(tf.reduce_sum(y_pred))
            return tf.reduce_mean(keras.losses.categorical_crossentropy(y, y_pred))

    trainer = HostLoss(make_model(), "sgd")
    trainer.fit(make_data(20), epochs=1, batch_size=5, verbose=0)
    assert trainer._engine.loop("train").jit is False
    assert "XLA could not compile" in caplog.text
    assert int(trainer.optimizer.iterations) == 4


def test_predict_returns_nested_outputs_of_a_multi_output_model():
    inputs = keras.Input((5,))
    model = keras.Model(
        inputs, {"a": keras.layers.Dense(2)(inputs), "b": keras.layers.Dense(1)(inputs)}
    )
    x, _ = make_data(23)
    out = tfloop.Trainer(model, steps_per_execution=2).predict(x, batch_size=4)
    assert out["a"].shape == (23, 2) and out["b"].shape == (23, 1)
    np.testing.assert_allclose(out["a"], model(x)["a"].numpy(), rtol=1e-5, atol=1e-6)


def test_verbose_progress_prints_plain_epoch_lines(capsys):
    trainer = tfloop.Trainer(make_model(), "sgd", "categorical_crossentropy", ["accuracy"])
    trainer.fit(make_data(20), epochs=2, batch_size=5, verbose=1)
    out = capsys.readouterr().out
    assert "epoch 1/2" in out and "epoch 2/2" in out and "accuracy:" in out
    assert "\r" not in out and "\x1b" not in out


class NaNAfter(tfloop.Trainer):
    """The loss turns NaN for every batch whose first x value is negative."""

    def compute_loss(self, batch, training):
        loss = super().compute_loss(batch, training)
        x = batch[0]
        return tf.where(x[0, 0] < 0, tf.constant(float("nan")), loss)


@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_non_finite_gradients_are_dropped_in_graph_and_counted(policy):
    x, y = make_data(40)
    x[:, 0] = np.abs(x[:, 0])
    x[[8, 24], 0] = -1.0  # batches 2 and 6 (of 4 examples) give NaN
    trainer = NaNAfter(
        make_model(), "sgd", "categorical_crossentropy", steps_per_execution=3, non_finite=policy
    )
    history = trainer.fit((x, y), epochs=1, batch_size=4, shuffle=False, verbose=0)
    assert all(np.isfinite(w).all() for w in weights_of(trainer.model))
    assert int(trainer.optimizer.iterations) == 8
    assert trainer.first_non_finite_step == 2
    assert trainer.non_finite_steps == 2
    assert np.isfinite(history.history["loss"][0])


def conv_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((6, 6, 1)),
            keras.layers.Conv2D(2, 3, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )


@pytest.mark.skipif(bool(tf.config.list_logical_devices("GPU")), reason="a CPU-only rule")
def test_jit_auto_runs_convolutions_on_a_cpu_without_xla_and_true_still_uses_it(caplog):
    rng = np.random.default_rng(0)
    x = rng.random((16, 6, 6, 1), dtype=np.float32)
    y = keras.utils.to_categorical(rng.integers(0, 3, 16), 3).astype("float32")
    caplog.set_level("INFO", logger="tfloop")
    auto = tfloop.Trainer(conv_model(), "sgd", "categorical_crossentropy")
    auto.fit((x, y), epochs=2, batch_size=8, verbose=0)
    auto.evaluate((x, y), batch_size=8)
    assert auto._engine.loop("train").jit is False
    assert auto._engine.loop("test").jit is False
    assert caplog.text.count("runs without XLA: the model has convolution layers (Conv2D)") == 1
    forced = tfloop.Trainer(conv_model(), "sgd", "categorical_crossentropy", jit_compile=True)
    forced.fit((x, y), epochs=1, batch_size=8, verbose=0)
    assert forced._engine.loop("train").jit is True
    # a model without convolutions keeps XLA under "auto"
    assert tfloop.Trainer(make_model(), "sgd", "mse")._engine.loop("train").jit is True


def test_user_code_keeps_autograph_python_control_flow_on_tensors():
    # tfloop's own code is not converted by AutoGraph (warm-up), but what users write is: a
    # Python `if`/`while` on tensors in an overridden compute_loss, a loss function and a
    # tf.Module's __call__ all trace as tf.cond / tf.while_loop.
    class Gate(tf.Module):
        def __init__(self):
            super().__init__()
            self.w = tf.Variable(tf.ones([5, 3]) * 0.1)

        def __call__(self, x):
            y = tf.matmul(x, self.w)
            if tf.reduce_sum(y) > 1e9:  # never: but a Python bool of a tensor needs AutoGraph
                y = y * 0.0
            return y

    def loss_fn(y_true, y_pred):
        loss = tf.reduce_mean(tf.square(y_true - y_pred), axis=-1)
        if tf.reduce_any(loss < 0):
            loss = -loss
        return loss

    class Clipped(tfloop.Trainer):
        def compute_loss(self, batch, training):
            loss = super().compute_loss(batch, training)
            scale, i = tf.constant(1.0), tf.constant(0)
            while i < 2:
                scale = scale * 1.0
                i += 1
            return loss * scale

    x, y = make_data(24)
    for jit in (False, True):
        model = Gate()
        trainer = Clipped(model, keras.optimizers.SGD(0.1), loss_fn, jit_compile=jit, seed=0)
        history = trainer.fit((x, y), epochs=3, batch_size=8, verbose=0)
        assert history.history["loss"][-1] < history.history["loss"][0]
        assert trainer.evaluate((x, y), batch_size=8, verbose=0)["loss"] > 0
        assert trainer.predict(x, batch_size=8).shape == (24, 3)


def test_tfloop_own_code_is_not_converted_by_autograph():
    from tensorflow.python.autograph.impl import conversion

    assert conversion.is_allowlisted(tfloop.Trainer.train_step)
    assert conversion.is_allowlisted(tfloop.GradientAccumulator.accumulate)


@pytest.mark.parametrize(
    ("features", "batch_size", "expected_steps"),
    [(1, 4, 1024), (784, 32, 128), (191, 64, 256), (784, 64, 64)],
)
def test_auto_steps_per_execution_grows_for_small_batches(features, batch_size, expected_steps):
    # From 64 steps, "auto" doubles K up to 1024 while the superbatch stays under 16 MiB.
    n = 2048 * batch_size
    x = np.zeros((n, features), "float32")
    y = np.zeros((n, 1), "float32")
    ends = []

    class Record(tfloop.Callback):
        def on_train_batch_end(self, batch, logs):
            ends.append(batch)

    model = keras.Sequential([keras.Input((features,)), keras.layers.Dense(1)])
    trainer = tfloop.Trainer(model, "sgd", "mse", jit_compile=False, callbacks=[Record()])
    trainer.fit((x, y), batch_size=batch_size, verbose=0)
    assert ends[0] + 1 == expected_steps
    assert len(ends) == 2048 // expected_steps
