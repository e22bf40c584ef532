"""Bad input gets a clear error naming the argument and the fix, before any compiled work."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from conftest import make_data, make_model

import tfloop
from tfloop.errors import ConfigError, DataError, TfloopError


def trainer(**kwargs):
    kwargs.setdefault("loss", "categorical_crossentropy")
    return tfloop.Trainer(make_model(), **kwargs)


def assert_nothing_traced(t: tfloop.Trainer) -> None:
    assert all(t.tracing_count(kind) == 0 for kind in ("train", "test", "predict"))


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"optimizer": "adamm"}, ["optimizer='adamm'", "adam"]),
        ({"loss": "categorical_crossentropyy"}, ["loss=", "categorical_crossentropy"]),
        ({"metrics": ["acuracy"]}, ["metrics", "'acuracy'"]),
        ({"accumulate_steps": 0}, ["accumulate_steps", ">= 1"]),
        ({"accumulate_steps": 2.0}, ["accumulate_steps"]),
        ({"steps_per_execution": 0}, ["steps_per_execution"]),
        ({"jit_compile": "yes"}, ["jit_compile"]),
        ({"clip_global_norm": -1.0}, ["clip_global_norm"]),
        ({"callbacks": [object()]}, ["callbacks", "tfloop.Callback"]),
        ({"seed": "1"}, ["seed"]),
    ],
)
def test_bad_constructor_arguments_are_named(kwargs, words):
    with pytest.raises(ConfigError) as info:
        trainer(**kwargs)
    for word in words:
        assert word in str(info.value)


def test_a_model_without_variables_api_is_rejected():
    with pytest.raises(ConfigError, match="model must be"):
        tfloop.Trainer(lambda x: x, loss="mse")


def test_a_model_with_no_trainable_variables_is_rejected_at_fit():
    model = make_model()
    model.trainable = False
    t = tfloop.Trainer(model, loss="categorical_crossentropy")
    with pytest.raises(ConfigError, match="no trainable variables"):
        t.fit(make_data(10), verbose=0)


def test_missing_loss_is_named():
    t = tfloop.Trainer(make_model())
    with pytest.raises(ConfigError, match="loss is None"):
        t.fit(make_data(10), verbose=0)


@pytest.mark.parametrize(
    ("data", "error", "words"),
    [
        ((np.zeros((10, 5)), np.zeros((9, 3))), DataError, ["x has 10", "y has 9"]),
        ((np.zeros((0, 5)), np.zeros((0, 3))), DataError, ["empty"]),
        (None, DataError, ["x is None"]),
        ((np.zeros((10, 4)), np.zeros((10, 3))), DataError, ["model cannot take x", "(10, 4)"]),
        ((np.zeros((10, 5)), np.zeros((10, 7))), DataError, ["loss cannot be computed", "y"]),
        ((np.array(["a"] * 10), np.zeros((10, 3))), DataError, ["x"]),
        ((np.zeros((10, 5)),), DataError, ["no targets"]),
    ],
)
def test_bad_arrays_are_rejected_before_tracing(data, error, words):
    t = trainer()
    with pytest.raises(error) as info:
        t.fit(data, verbose=0)
    for word in words:
        assert word in str(info.value)
    assert_nothing_traced(t)


def test_unbatched_dataset_is_rejected():
    x, y = make_data(10)
    labels = np.argmax(y, axis=1)
    t = trainer(loss="sparse_categorical_crossentropy")
    with pytest.raises(DataError, match=r"unbatched.*\.batch"):
        t.fit(tf.data.Dataset.from_tensor_slices((x, labels)), verbose=0)
    with pytest.raises(DataError, match=r"\.batch\(batch_size\)"):
        t.fit(tf.data.Dataset.from_tensor_slices((x, y)), verbose=0)
    assert_nothing_traced(t)


def test_empty_and_infinite_datasets_are_rejected():
    x, y = make_data(10)
    empty = tf.data.Dataset.from_tensor_slices((x, y)).batch(4).take(0)
    with pytest.raises(DataError, match="empty"):
        trainer().fit(empty, verbose=0)
    filtered_empty = tf.data.Dataset.from_tensor_slices((x, y)).filter(lambda a, b: False).batch(4)
    with pytest.raises(DataError, match="no batches"):
        trainer().fit(filtered_empty, verbose=0)
    infinite = tf.data.Dataset.from_tensor_slices((x, y)).batch(4).repeat()
    with pytest.raises(DataError, match="steps_per_epoch"):
        trainer().fit(infinite, verbose=0)
    with pytest.raises(DataError, match="steps="):
        trainer().evaluate(infinite)


def test_batch_size_with_a_dataset_is_rejected():
    dataset = tf.data.Dataset.from_tensor_slices(make_data(10)).batch(4)
    with pytest.raises(ConfigError, match=r"batch_size=4 was given with a tf\.data\.Dataset"):
        trainer().fit(dataset, batch_size=4, verbose=0)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"epochs": 0}, "epochs"),
        ({"steps_per_epoch": 0}, "steps_per_epoch"),
        ({"validation_freq": 0}, "validation_freq"),
        ({"batch_size": 0}, "batch_size"),
        ({"steps_per_epoch": 100}, "steps_per_epoch"),
    ],
)
def test_bad_fit_arguments_are_named(kwargs, name):
    with pytest.raises(ConfigError, match=name):
        trainer().fit(make_data(10), verbose=0, **kwargs)


def test_every_error_is_a_tfloop_error():
    for error in (ConfigError, DataError, tfloop.errors.CheckpointError):
        assert issubclass(error, TfloopError)
