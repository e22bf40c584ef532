"""Keras models that own their steps train under ``Trainer(model)`` as under ``model.fit``.

Each model of ``keras_examples.py`` (keras-io's patterns, unchanged model code) is trained by
``model.fit`` and by ``tfloop.Trainer(model)`` from the same initial weights and seed-generator
states, on the same batches (shuffle off), with the same jit setting; per-epoch logs (keys and
values), weights, ``evaluate`` and ``predict`` must agree.
"""

from __future__ import annotations

import keras
import keras_examples as ex
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_weights_equal, weights_of

import tfloop
from tfloop.errors import ConfigError

RTOL, ATOL = 1e-6, 1e-6


def twins(build, seed: int = 0):
    """Two models built alike from the same seed (initial weights and seed generators)."""
    models = []
    for _ in range(2):
        keras.utils.set_random_seed(seed)
        models.append(build())
    return models


def assert_history_equal(expected: dict, actual: dict) -> None:
    assert set(actual) == set(expected)
    for key, values in expected.items():
        np.testing.assert_allclose(actual[key], values, rtol=RTOL, atol=ATOL, err_msg=key)


def assert_results_equal(expected, actual) -> None:
    if isinstance(expected, dict):
        assert set(actual) == set(expected)
        for key, value in expected.items():
            np.testing.assert_allclose(actual[key], value, rtol=RTOL, atol=ATOL, err_msg=key)
    else:
        np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL)


def fit_both(build, compile_model, data, *, jit: bool = False, **fit_options):
    """``model.fit`` and ``Trainer(model).fit`` on twins; returns (reference, model, their
    histories)."""
    reference, model = twins(build)
    for m in (reference, model):
        compile_model(m, jit)
    expected = reference.fit(*data, shuffle=False, verbose=0, **fit_options).history
    history = tfloop.Trainer(model).fit(*data, shuffle=False, verbose=0, **fit_options).history
    return reference, model, expected, history


def guide_compile(model, jit):
    model.compile(optimizer="adam", loss="mse", metrics=["mae"], jit_compile=jit)


@pytest.mark.parametrize("jit", [False, True], ids=["graph", "xla"])
def test_the_guides_first_model_trains_as_model_fit_does(jit):
    x, y = ex.regression_data()
    reference, model, expected, history = fit_both(
        lambda: ex.GuideModel(*ex.dense_inputs()),
        guide_compile,
        (x, y),
        jit=jit,
        epochs=3,
        batch_size=16,
        validation_data=ex.regression_data(40, seed=1),
    )
    assert set(history) == {"loss", "mae", "val_loss", "val_mae"}
    assert_history_equal(expected, history)
    assert_weights_equal(weights_of(reference), weights_of(model), rtol=RTOL, atol=ATOL)
    trainer = tfloop.Trainer(model)
    assert_results_equal(
        reference.evaluate(x, y, batch_size=16, verbose=0, return_dict=True),
        trainer.evaluate(x, y, batch_size=16),
    )
    assert_results_equal(reference.predict(x, verbose=0), trainer.predict(x))


def test_the_guides_lower_level_model_logs_its_own_trackers():
    x, y = ex.regression_data()
    reference, model, expected, history = fit_both(
        lambda: ex.LowLevelModel(*ex.dense_inputs()),
        lambda m, jit: m.compile(optimizer="adam", jit_compile=jit),
        (x, y),
        epochs=3,
        batch_size=16,
    )
    assert set(history) == {"loss", "mae"}
    assert min(history["loss"]) > 0  # the model's tracker, updated by its own step
    assert_history_equal(expected, history)
    assert_weights_equal(weights_of(reference), weights_of(model), rtol=RTOL, atol=ATOL)


def test_the_guides_weighted_model_takes_sample_and_class_weights():
    x, y = ex.regression_data()
    sample_weight = np.random.default_rng(3).random((len(x), 1)).astype("float32")
    reference, model, expected, history = fit_both(
        lambda: ex.WeightedModel(*ex.dense_inputs()),
        guide_compile,
        (x, y),
        epochs=2,
        batch_size=16,
        sample_weight=sample_weight,
    )
    assert_history_equal(expected, history)
    assert_weights_equal(weights_of(reference), weights_of(model), rtol=RTOL, atol=ATOL)


def test_the_guides_model_with_its_own_test_step_evaluates_as_keras():
    x, y = ex.regression_data()
    reference, model = twins(lambda: ex.EvaluatingModel(*ex.dense_inputs()))
    for m in (reference, model):
        m.compile(loss="mse", metrics=["mae"], jit_compile=False)
    expected = reference.evaluate(x, y, batch_size=16, verbose=0, return_dict=True)
    trainer = tfloop.Trainer(model)
    assert_results_equal(expected, trainer.evaluate(x, y, batch_size=16))
    # Trained with Keras's own train_step, validated with the model's test_step.
    options = {"epochs": 2, "batch_size": 16, "validation_data": (x[:40], y[:40])}
    history = trainer.fit(x, y, shuffle=False, verbose=0, **options).history
    expected = reference.fit(x, y, shuffle=False, verbose=0, **options).history
    assert_history_equal(expected, history)


def vae_compile(model, jit):
    model.compile(optimizer=keras.optimizers.Adam(), jit_compile=jit)


def test_the_vae_without_call_trains_as_model_fit_does():
    digits = ex.images(64, (12, 12, 1))
    reference, model, expected, history = fit_both(
        lambda: ex.VAE(*ex.vae_parts()), vae_compile, (digits,), epochs=3, batch_size=16
    )
    # The step returns other keys than its trackers' names: the last step's values are logged.
    assert set(history) == {"loss", "reconstruction_loss", "kl_loss"}
    assert_history_equal(expected, history)
    assert_weights_equal(weights_of(reference), weights_of(model), rtol=RTOL, atol=ATOL)
    trainer = tfloop.Trainer(model)
    for call in (lambda: trainer.evaluate(digits), lambda: trainer.predict(digits)):
        with pytest.raises(ConfigError, match=r"VAE defines no call\(\)"):
            call()


def gan_compile(model, jit):
    model.compile(
        d_optimizer=keras.optimizers.Adam(learning_rate=0.0003),
        g_optimizer=keras.optimizers.Adam(learning_rate=0.0003),
        loss_fn=keras.losses.BinaryCrossentropy(from_logits=True),
        jit_compile=jit,
    )


@pytest.mark.parametrize("jit", [False, True], ids=["graph", "xla"])
def test_the_gan_with_two_optimizers_trains_as_model_fit_does(jit):
    real = ex.images(96, (6, 6, 1))
    dataset = tf.data.Dataset.from_tensor_slices(real).batch(16)
    reference, model, expected, history = fit_both(
        lambda: ex.GAN(*ex.gan_parts(), latent_dim=4), gan_compile, (dataset,), jit=jit, epochs=3
    )
    assert set(history) == {"d_loss", "g_loss"}
    assert_history_equal(expected, history)
    assert_weights_equal(weights_of(reference), weights_of(model), rtol=RTOL, atol=ATOL)


def test_a_gan_counts_its_steps_as_updates_though_its_own_optimizer_never_moves():
    real = ex.images(96, (6, 6, 1))
    model = ex.GAN(*ex.gan_parts(), latent_dim=4)
    gan_compile(model, False)
    trainer = tfloop.Trainer(model, steps_per_execution=4)
    trainer.fit(real, batch_size=16, epochs=2, max_steps=9, verbose=0)
    assert trainer.update_count == 9 and trainer.stop_reason == "max_steps"
    assert int(model.d_optimizer.iterations) == 9 == int(model.g_optimizer.iterations)


def test_the_siamese_model_with_its_own_test_step_trains_and_validates_as_keras():
    train, validation = ex.triplets(64), ex.triplets(24, seed=1)
    reference, model, expected, history = fit_both(
        lambda: ex.SiameseModel(ex.siamese_network()),
        lambda m, jit: m.compile(optimizer=keras.optimizers.Adam(0.001), jit_compile=jit),
        (train,),
        epochs=3,
        validation_data=validation,
    )
    assert set(history) == {"loss", "val_loss"}
    assert_history_equal(expected, history)
    assert_weights_equal(weights_of(reference), weights_of(model), rtol=RTOL, atol=ATOL)
    trainer = tfloop.Trainer(model)
    assert_results_equal(
        reference.evaluate(validation, verbose=0, return_dict=True), trainer.evaluate(validation)
    )
    # Keras's predict_step takes x from (x, y, sample_weight): the triplet goes in as one x.
    inputs = validation.map(lambda anchor, positive, negative: ((anchor, positive, negative),))
    expected_distances = reference.predict(inputs, verbose=0)
    distances = trainer.predict(inputs)
    for want, got in zip(expected_distances, distances, strict=True):
        assert_results_equal(want, got)
