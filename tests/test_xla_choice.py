"""jit_compile="auto": one reproducible choice per model, made before its first execution from
its layers and devices (``_xla.py``), logged once with its reason."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_weights_equal, make_data, make_model, weights_of

import tfloop
from tfloop import _xla

CPU_ONLY = pytest.mark.skipif(
    bool(tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU")),
    reason="the CPU rule",
)


class Block(keras.layers.Layer):
    """Attention nested inside a user's own layer (as in a Transformer block)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.attention = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)
        self.dropout = keras.layers.Dropout(0.5)

    def call(self, x, training=None):
        return x + self.dropout(self.attention(x, x), training=training)


def attention_model(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((6, 4)),
            Block(),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )


def sequence_data(n: int = 32):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 6, 4)).astype("float32")
    y = keras.utils.to_categorical(rng.integers(0, 3, n), 3).astype("float32")
    return x, y


def functional(layer: keras.layers.Layer, shape: tuple[int, ...]) -> keras.Model:
    inputs = keras.Input(shape)
    return keras.Model(inputs, layer(inputs))


@pytest.mark.parametrize(
    ("model", "jit", "reason"),
    [
        (make_model, True, "no layer of the model"),
        (lambda: make_model(dropout=0.5), False, "draw random numbers (Dropout)"),
        (lambda: functional(keras.layers.LSTM(3), (5, 2)), True, "no layer of the model"),
        (
            lambda: functional(keras.layers.LSTM(3, dropout=0.2), (5, 2)),
            False,
            "draw random numbers (LSTMCell)",
        ),
        (
            lambda: functional(keras.layers.GaussianNoise(0.1), (3,)),
            False,
            "draw random numbers (GaussianNoise)",
        ),
        (
            lambda: keras.Sequential([keras.Input((4,)), keras.layers.Embedding(10, 2)]),
            True,
            "no layer of the model",
        ),
        (lambda: functional(keras.layers.Conv1D(2, 3), (6, 1)), False, "convolution layers"),
        (attention_model, False, "attention layers (MultiHeadAttention)"),
        (lambda: tf.Module(), True, "not a Keras model"),
    ],
    ids=[
        "dense",
        "dense-dropout",
        "lstm",
        "lstm-dropout",
        "noise",
        "embedding",
        "conv",
        "nested-attention",
        "module",
    ],
)
def test_auto_rule_on_a_cpu(model, jit, reason):
    chosen, why = _xla.auto_jit_compile(model(), accelerators=False)
    assert chosen is jit
    assert reason in why


def test_auto_keeps_xla_on_an_accelerator_whatever_the_layers():
    for model in (attention_model(), functional(keras.layers.Conv1D(2, 3), (6, 1))):
        assert _xla.auto_jit_compile(model, accelerators=True) == (
            True,
            "TensorFlow sees a GPU or a TPU",
        )


@CPU_ONLY
def test_auto_choice_is_logged_once_per_model_with_its_reason(caplog):
    x, y = sequence_data()
    caplog.set_level("INFO", logger="tfloop")
    trainer = tfloop.Trainer(attention_model(), "adam", "categorical_crossentropy", seed=0)
    trainer.fit(x, y, epochs=2, batch_size=8, verbose=0)
    trainer.evaluate((x, y), batch_size=8)
    trainer.predict(x, batch_size=8)
    assert [trainer._engine.loop(kind).jit for kind in ("train", "test", "predict")] == [False] * 3
    assert caplog.text.count("jit_compile='auto' runs without XLA: the model has") == 1
    assert "draw random numbers (Dropout)" in caplog.text
    assert "attention layers (MultiHeadAttention)" in caplog.text
    assert "Pass jit_compile=True to use XLA anyway" in caplog.text

    caplog.clear()
    dense = tfloop.Trainer(make_model(), "sgd", "categorical_crossentropy")
    dense.fit(make_data(16)[0], make_data(16)[1], epochs=2, batch_size=8, verbose=0)
    dense.evaluate(make_data(16), batch_size=8)
    assert dense._engine.loop("train").jit is True
    assert caplog.text.count("jit_compile='auto' compiles the steps with XLA") == 1
    assert "Pass jit_compile=False" in caplog.text


def test_an_explicit_jit_compile_is_neither_ruled_nor_logged(caplog):
    caplog.set_level("INFO", logger="tfloop")
    for jit in (True, False):
        trainer = tfloop.Trainer(
            attention_model(), "adam", "categorical_crossentropy", jit_compile=jit
        )
        assert trainer._engine.loop("train").jit is jit
    assert "jit_compile='auto'" not in caplog.text


@CPU_ONLY
@pytest.mark.parametrize(
    ("build", "data", "expected"),
    [
        (attention_model, sequence_data, False),
        (lambda: make_model(dropout=0.5), lambda: make_data(48), False),
    ],
    ids=["attention", "dense-dropout"],
)
def test_auto_trains_exactly_as_its_choice_from_the_first_execution(build, data, expected):
    # Dropout draws other numbers under XLA than in the plain graph: a run under "auto" equals
    # the run with its choice passed explicitly only if "auto" chose once, before the first
    # execution, and never switched (which would also change which random numbers are drawn).
    x, y = data()
    runs = {}
    for jit in ("auto", expected, not expected):
        trainer = tfloop.Trainer(
            build(),
            "adam",
            "categorical_crossentropy",
            jit_compile=jit,
            steps_per_execution=2,
            seed=3,
        )
        trainer.fit(x, y, epochs=2, batch_size=8, verbose=0)
        runs[jit] = weights_of(trainer.model)
    assert_weights_equal(runs["auto"], runs[expected])
    differences = [
        np.max(np.abs(a - b)) for a, b in zip(runs["auto"], runs[not expected], strict=True)
    ]
    assert max(differences) > 1e-4  # the other choice draws other Dropout masks


@CPU_ONLY
def test_auto_trains_a_model_without_random_ops_exactly_as_with_xla():
    x, y = make_data(48)
    runs = []
    for jit in ("auto", True):
        trainer = tfloop.Trainer(
            make_model(), "adam", "categorical_crossentropy", jit_compile=jit, seed=3
        )
        trainer.fit(x, y, epochs=2, batch_size=8, verbose=0)
        runs.append(weights_of(trainer.model))
    assert_weights_equal(*runs)
