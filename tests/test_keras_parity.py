"""A model.fit user's compile/fit code carries over: same losses, log keys and weights.

Every comparison runs Keras and tfloop on the same batches (shuffle off, no XLA, one step per
Keras execution) from the same initial weights.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_weights_equal, weights_of

import tfloop

RTOL = 1e-5


def ticket_model(seed: int = 0) -> keras.Model:
    """The functional API guide's multi-input, multi-output model, shrunk: a regularizer on
    one head, dict inputs and outputs."""
    keras.utils.set_random_seed(seed)
    title = keras.Input((6,), name="title", dtype="int32")
    body = keras.Input((10,), name="body", dtype="int32")
    tags = keras.Input((4,), name="tags")
    embed = keras.layers.Embedding(40, 4)
    pooled = keras.layers.GlobalAveragePooling1D()
    features = keras.layers.concatenate([pooled(embed(title)), pooled(embed(body)), tags])
    priority = keras.layers.Dense(1, name="priority")(features)
    department = keras.layers.Dense(
        3, name="department", kernel_regularizer=keras.regularizers.L2(1e-2)
    )(features)
    return keras.Model(
        {"title": title, "body": body, "tags": tags},
        {"priority": priority, "department": department},
    )


def ticket_data(n: int = 90, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = {
        "title": rng.integers(0, 40, (n, 6)).astype("int32"),
        "body": rng.integers(0, 40, (n, 10)).astype("int32"),
        "tags": rng.integers(0, 2, (n, 4)).astype("float32"),
    }
    y = {
        "priority": rng.random((n, 1)).astype("float32"),
        "department": keras.utils.to_categorical(rng.integers(0, 3, n), 3).astype("float32"),
    }
    return x, y


def compile_arguments() -> dict:
    return {
        "loss": {
            "priority": keras.losses.BinaryCrossentropy(from_logits=True),
            "department": keras.losses.CategoricalCrossentropy(from_logits=True),
        },
        "loss_weights": {"priority": 1.0, "department": 0.2},
        "metrics": {"priority": ["mae"], "department": ["accuracy"]},
    }


def assert_logs_close(keras_history: dict, tfloop_history: dict) -> None:
    assert set(keras_history) == set(tfloop_history)
    for key, values in keras_history.items():
        np.testing.assert_allclose(tfloop_history[key], values, rtol=RTOL, atol=1e-7, err_msg=key)


def keras_fit(x, y, **fit_options):
    model = ticket_model()
    model.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        jit_compile=False,
        steps_per_execution=1,
        **compile_arguments(),
    )
    history = model.fit(x, y, batch_size=16, shuffle=False, verbose=0, **fit_options)
    return model, history.history


@pytest.mark.parametrize("compiled", [False, True], ids=["arguments", "compiled-model"])
def test_a_multi_output_model_trains_as_model_fit_does(compiled):
    x, y = ticket_data()
    validation = ticket_data(37, seed=1)
    reference, expected = keras_fit(x, y, epochs=2, validation_data=validation)

    model = ticket_model()
    optimizer = keras.optimizers.SGD(0.05, momentum=0.9)
    if compiled:
        model.compile(optimizer=optimizer, **compile_arguments())
        trainer = tfloop.Trainer(model, jit_compile=False)
    else:
        trainer = tfloop.Trainer(model, optimizer, jit_compile=False, **compile_arguments())
    history = trainer.fit(
        x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, validation_data=validation
    )
    assert {"loss", "priority_loss", "department_loss", "priority_mae"} <= set(history.history)
    assert "val_department_accuracy" in history.history
    assert_logs_close(expected, history.history)
    assert_weights_equal(weights_of(reference), weights_of(model), rtol=RTOL, atol=1e-6)


def test_evaluate_and_predict_take_keras_forms_and_agree_with_keras():
    x, y = ticket_data()
    reference, _ = keras_fit(x, y, epochs=1)
    model = ticket_model()
    model.set_weights(reference.get_weights())
    model.compile(**compile_arguments())
    trainer = tfloop.Trainer(model, jit_compile=False)
    expected = reference.evaluate(x, y, batch_size=16, verbose=0, return_dict=True)
    results = trainer.evaluate(x, y, batch_size=16)
    assert set(results) == set(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(results[key], value, rtol=RTOL, err_msg=key)
    listed = trainer.evaluate(x, y, batch_size=16, return_dict=False)
    assert listed[0] == pytest.approx(results["loss"])
    predicted = trainer.predict(x, batch_size=16)
    np.testing.assert_allclose(
        predicted["department"], reference.predict(x, verbose=0)["department"], rtol=RTOL
    )


def test_train_on_batch_ten_times_equals_keras():
    x, y = ticket_data(160)
    reference = ticket_model()
    reference.compile(optimizer=keras.optimizers.Adam(0.01), **compile_arguments())
    model = ticket_model()
    trainer = tfloop.Trainer(model, keras.optimizers.Adam(0.01), **compile_arguments())
    for start in range(0, 160, 16):
        xb = {k: v[start : start + 16] for k, v in x.items()}
        yb = {k: v[start : start + 16] for k, v in y.items()}
        expected = reference.train_on_batch(xb, yb, return_dict=True)
        logs = trainer.train_on_batch(xb, yb)
        assert set(logs) == set(expected)
        for key, value in expected.items():
            np.testing.assert_allclose(logs[key], value, rtol=1e-4, err_msg=key)
    assert_weights_equal(weights_of(reference), weights_of(model), rtol=1e-4, atol=1e-6)
    assert trainer.tracing_count("train") == 1  # every call reused the same compiled step
    tested = trainer.test_on_batch(xb, yb)
    assert tested["loss"] == pytest.approx(
        reference.test_on_batch(xb, yb, return_dict=True)["loss"], rel=1e-4
    )
    np.testing.assert_allclose(
        trainer.predict_on_batch(xb)["priority"],
        reference.predict_on_batch(xb)["priority"],
        rtol=1e-4,
    )


def test_the_articles_fit_call_runs_unchanged():
    x = np.random.default_rng(0).random((64, 8)).astype("float32")
    y = keras.utils.to_categorical(np.arange(64) % 4, 4)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, activation="softmax")])
    model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
    history = tfloop.Trainer(model).fit(x, y, epochs=2, batch_size=32, verbose=0)
    assert sorted(history.history) == ["accuracy", "loss"]
    with pytest.raises(tfloop.errors.ConfigError, match="epochs"):
        tfloop.Trainer(model).fit((x, y), 3, verbose=0)  # the old fit(data, epochs) order


def test_run_eagerly_gives_the_graph_runs_updates_and_runs_python_in_the_step():
    seen = []

    class Debug(tfloop.Trainer):
        def train_step(self, batch):
            seen.append(float(batch[0]["tags"].numpy()[0, 0]))  # .numpy() works only eagerly
            return super().train_step(batch)

    x, y = ticket_data(40)
    results = []
    for trainer_class, eager in ((tfloop.Trainer, False), (Debug, True)):
        model = ticket_model()
        trainer = trainer_class(
            model,
            "adam",
            run_eagerly=eager,
            jit_compile=False,
            accumulate_steps=2,
            **compile_arguments(),
        )
        trainer.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        results.append(weights_of(model))
    assert len(seen) == 10  # 5 batches, 2 epochs
    assert_weights_equal(results[0], results[1], rtol=1e-5, atol=1e-7)


def test_an_override_logs_what_it_returns_and_no_unmeasured_loss():
    class TwoLosses(tfloop.Trainer):
        def train_step(self, batch):
            x, y = batch
            with tf.GradientTape() as tape:
                error = tf.reduce_mean(tf.square(self.model(x, training=True) - y))
            gradients = tape.gradient(error, self.trainable_variables)
            self.optimizer.apply_gradients(zip(gradients, self.trainable_variables, strict=True))
            return {"d_loss": error, "g_loss": 2.0 * error}

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    x = np.ones((32, 3), "float32")
    history = TwoLosses(model, "sgd").fit(x, np.ones((32, 1)), epochs=2, verbose=0)
    assert sorted(history.history) == ["d_loss", "g_loss"]


@pytest.mark.slow
def test_an_infinite_validation_set_is_an_error_before_training_not_a_hang():
    script = textwrap.dedent(
        """
        import numpy as np, keras, tensorflow as tf, tfloop
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        x, y = np.ones((8, 2), "float32"), np.ones((8, 1), "float32")
        forever = tf.data.Dataset.from_tensor_slices((x, y)).batch(4).repeat()
        trainer = tfloop.Trainer(model, "sgd", "mse")
        try:
            trainer.fit(x, y, epochs=2, validation_data=forever, verbose=0)
        except tfloop.errors.DataError as error:
            assert "validation_steps" in str(error), error
            assert int(trainer.optimizer.iterations) == 0
            print("raised")
        history = trainer.fit(x, y, epochs=1, validation_data=forever, validation_steps=2,
                              verbose=0)
        print("ran", sorted(history.history))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "raised" in done.stdout and "val_loss" in done.stdout


def imbalanced(n: int = 120, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype("float32")
    labels = (rng.random(n) < 0.15).astype("int64")  # about 15% positives
    return x, keras.utils.to_categorical(labels, 2).astype("float32")


def small_classifier(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(6, activation="tanh"), keras.layers.Dense(2)]
    )


@pytest.mark.parametrize(
    "fit_options",
    [{"class_weight": {0: 0.6, 1: 4.0}}, {"validation_split": 0.25}],
    ids=["class-weight", "validation-split"],
)
def test_class_weight_and_validation_split_train_as_model_fit_does(fit_options):
    x, y = imbalanced()
    compile_options = {
        "loss": keras.losses.CategoricalCrossentropy(from_logits=True),
        "metrics": ["accuracy"],
    }
    reference = small_classifier()
    reference.compile(optimizer=keras.optimizers.SGD(0.1), jit_compile=False, **compile_options)
    expected = reference.fit(
        x, y, batch_size=16, epochs=3, shuffle=False, verbose=0, **fit_options
    ).history
    model = small_classifier()
    trainer = tfloop.Trainer(model, keras.optimizers.SGD(0.1), jit_compile=False, **compile_options)
    history = trainer.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0, **fit_options)
    assert_logs_close(expected, history.history)
    assert_weights_equal(weights_of(reference), weights_of(model), rtol=RTOL, atol=1e-6)


def test_labels_a_loss_ignores_are_no_error_and_train_as_model_fit_does():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = rng.integers(0, 2, 64)
    y[::5] = -1  # padding, which the loss ignores: not a label out of range
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=-1)
    reference = small_classifier()
    reference.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss, jit_compile=False)
    expected = reference.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0).history
    model = small_classifier()
    trainer = tfloop.Trainer(model, keras.optimizers.SGD(0.1), loss=loss, jit_compile=False)
    history = trainer.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    assert_logs_close(expected, history.history)
    assert_weights_equal(weights_of(reference), weights_of(model), rtol=RTOL, atol=1e-6)
    # Under XLA, from a pipeline: the in-graph count leaves them out too.
    compiled = tfloop.Trainer(
        small_classifier(), keras.optimizers.SGD(0.1), loss=loss, jit_compile=True
    )
    pipeline = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    compiled_history = compiled.fit(pipeline, epochs=2, verbose=0)
    np.testing.assert_allclose(compiled_history.history["loss"], expected["loss"], rtol=1e-4)
