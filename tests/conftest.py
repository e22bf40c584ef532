"""Shared fixtures: tiny models and data, built the same way for every contender in a test."""

from __future__ import annotations

import functools
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, settings

# Two logical CPU devices, so MirroredStrategy really splits batches (test_distribute.py). This
# must happen before TensorFlow initializes its devices; ops still run on the first one.
_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
)

settings.register_profile(
    "tfloop",
    deadline=None,
    max_examples=8,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize=True,
)
settings.load_profile("tfloop")


@functools.lru_cache(maxsize=1)
def mirrored() -> tf.distribute.MirroredStrategy:
    """The session's MirroredStrategy over the two logical CPUs.

    One strategy for the whole session: strategies created in one process share collective
    instance keys, and TensorFlow rejects a key reused for a different kind of collective."""
    devices = [d.name for d in tf.config.list_logical_devices("CPU")][:2]
    assert len(devices) == 2, "conftest.py must configure two logical CPU devices"
    return tf.distribute.MirroredStrategy(devices)


def make_model(
    features: int = 5, classes: int = 3, seed: int = 0, dropout: float = 0.0
) -> keras.Model:
    """A small MLP with deterministic initial weights."""
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((features,)), keras.layers.Dense(8, activation="tanh")]
    if dropout:
        layers.append(keras.layers.Dropout(dropout))
    layers.append(keras.layers.Dense(classes, activation="softmax"))
    return keras.Sequential(layers)


def make_data(n: int, features: int = 5, classes: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype("float32")
    y = keras.utils.to_categorical(rng.integers(0, classes, n), classes).astype("float32")
    return x, y


def weights_of(model: keras.Model) -> list[np.ndarray]:
    return [np.array(w) for w in model.get_weights()]


def assert_weights_equal(a, b, rtol: float = 0.0, atol: float = 0.0) -> None:
    assert len(a) == len(b)
    for left, right in zip(a, b, strict=False):
        if rtol == 0 and atol == 0:
            np.testing.assert_array_equal(left, right)
        else:
            np.testing.assert_allclose(left, right, rtol=rtol, atol=atol)


@pytest.fixture
def data():
    return make_data(100)
