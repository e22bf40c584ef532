"""Keras-form step code in a Trainer subclass, what a model's own step cannot combine with,
what a step may return, and a dry run that changes nothing."""

from __future__ import annotations

import keras
import keras_examples as ex
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_weights_equal, mirrored, weights_of
from test_keras_models import assert_history_equal, guide_compile, twins

import tfloop
from tfloop import _checks
from tfloop.errors import ConfigError

RTOL, ATOL = 1e-6, 1e-6


class GuideTrainer(tfloop.Trainer):
    """The guide's first train_step, moved into a Trainer subclass (``self.model(x)`` for
    ``self(x)``): Keras's ``compute_loss`` form and a loop over ``self.metrics``."""

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            y_pred = self.model(x, training=True)
            loss = self.compute_loss(y=y, y_pred=y_pred)
        trainable_vars = self.trainable_variables
        gradients = tape.gradient(loss, trainable_vars)
        self.optimizer.apply(gradients, trainable_vars)
        for metric in self.metrics:
            if metric.name == "loss":
                metric.update_state(loss)
            else:
                metric.update_state(y, y_pred)
        return {m.name: m.result() for m in self.metrics}


def plain_model() -> keras.Model:
    return keras.Model(*ex.dense_inputs())


def test_keras_form_step_code_in_a_trainer_subclass_trains_as_the_guides_model():
    x, y = ex.regression_data()
    (reference,) = twins(lambda: ex.GuideModel(*ex.dense_inputs()))[:1]
    guide_compile(reference, False)
    expected = reference.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0).history
    (model,) = twins(plain_model)[:1]
    guide_compile(model, False)
    trainer = GuideTrainer(model, jit_compile=False)
    history = trainer.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0).history
    assert_history_equal(expected, history)
    assert_weights_equal(weights_of(reference), weights_of(model), rtol=RTOL, atol=ATOL)


class KerasLoss(keras.Model):
    """Keras's documented hook: ``compute_loss`` overridden on the model."""

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        loss = super().compute_loss(x, y, y_pred, sample_weight, training)
        return loss + 0.01 * tf.reduce_mean(tf.square(y_pred))


class KerasLossTrainer(tfloop.Trainer):
    """The same override with Keras's signature, in a Trainer subclass."""

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        loss = super().compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight)
        return loss + 0.01 * tf.reduce_mean(tf.square(y_pred))


@pytest.mark.parametrize("where", ["model", "trainer"])
def test_a_keras_signature_compute_loss_override_trains_as_model_fit(where):
    x, y = ex.regression_data()
    reference, model = twins(lambda: KerasLoss(*ex.dense_inputs()))
    guide_compile(reference, False)
    expected = reference.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0).history
    if where == "trainer":
        model = plain_model()
        model.set_weights(twins(lambda: KerasLoss(*ex.dense_inputs()))[0].get_weights())
    guide_compile(model, False)
    trainer_class = KerasLossTrainer if where == "trainer" else tfloop.Trainer
    trainer = trainer_class(model, jit_compile=False)
    history = trainer.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0).history
    assert_history_equal(expected, history)
    assert_weights_equal(weights_of(reference), weights_of(model), rtol=RTOL, atol=ATOL)


class TrackedEndpoint(keras.layers.Layer):
    """A layer owning a tracker named like the loss (never updated by anyone)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.tracker = keras.metrics.Mean(name="loss")

    def call(self, inputs):
        return inputs


def test_trainer_metrics_never_hold_two_metrics_of_one_name():
    inputs = keras.Input((8,))
    model = keras.Model(inputs, keras.layers.Dense(1)(TrackedEndpoint()(inputs)))
    trainer = tfloop.Trainer(model, "sgd", "mse", ["mae"], jit_compile=False)
    x, y = ex.regression_data()
    history = trainer.fit(x, y, epochs=1, verbose=0).history
    names = [metric.name for metric in trainer.metrics]
    assert len(names) == len(set(names)) and names[0] == "loss"
    assert history["loss"][0] > 0  # the measured loss, not the idle namesake's 0.0


class ReturnsText(tfloop.Trainer):
    def train_step(self, batch):
        super().train_step(batch)
        return {"loss": self.loss_tracker.result(), "note": "text"}


class ReturnsTensor(keras.Model):
    def train_step(self, data):
        return tf.constant(1.0)


@pytest.mark.parametrize(
    ("make_trainer", "match"),
    [
        (lambda m: ReturnsText(m, "sgd", "mse"), "'text' under 'note'"),
        (lambda m: tfloop.Trainer(m), "train_step returned a [A-Za-z]*Tensor"),
    ],
    ids=["a-string-value", "a-model-step-returning-a-tensor"],
)
def test_a_step_whose_return_value_cannot_be_logged_is_named_before_any_update(make_trainer, match):
    model = ReturnsTensor(*ex.dense_inputs())
    model.compile(optimizer="sgd", loss="mse")
    before = weights_of(model)
    x, y = ex.regression_data()
    with pytest.raises(ConfigError, match=match):
        make_trainer(model).fit(x, y, epochs=1, verbose=0)
    assert_weights_equal(before, weights_of(model))


class NoCall(keras.Model):
    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(1)


def test_a_model_without_call_is_named_not_the_data():
    trainer = tfloop.Trainer(NoCall(), "sgd", "mse")
    x, y = ex.regression_data()
    with pytest.raises(ConfigError, match=r"NoCall defines no call\(\)"):
        trainer.fit(x, y, epochs=1, verbose=0)


@pytest.mark.parametrize(
    ("option", "match"),
    [
        ({"accumulate_steps": 2}, "accumulate_steps cannot act on GAN's own train_step"),
        ({"clip_global_norm": 1.0}, "global_clipnorm"),
        ({"non_finite": "skip"}, "non_finite cannot act"),
    ],
)
def test_what_a_models_own_step_cannot_combine_with_is_a_config_error(option, match):
    model = ex.GAN(*ex.gan_parts(), latent_dim=4)
    with pytest.raises(ConfigError, match=match):
        tfloop.Trainer(model, **option)


class NoisyLayer(keras.layers.Layer):
    """Draws from its own seed generator in every call, inference included (as the VAE's
    sampling layer does)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seed_generator = keras.random.SeedGenerator(7)

    def call(self, inputs):
        return inputs + 0.1 * keras.random.normal(tf.shape(inputs), seed=self.seed_generator)


def noisy_model() -> keras.Model:
    inputs = keras.Input((8,))
    hidden = NoisyLayer()(keras.layers.Dense(4)(inputs))
    hidden = keras.layers.BatchNormalization()(hidden, training=True)  # moves in any call
    return keras.Model(inputs, keras.layers.Dense(1)(hidden))


def test_training_after_the_dry_run_equals_model_fit_with_a_seed_generator_layer():
    x, y = ex.regression_data()
    reference, model = twins(noisy_model)
    for m in (reference, model):
        guide_compile(m, False)
    expected = reference.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0).history
    trainer = tfloop.Trainer(model, jit_compile=False)  # XLA draws other random numbers
    history = trainer.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    assert_history_equal(expected, history.history)
    assert_weights_equal(weights_of(reference), weights_of(model), rtol=RTOL, atol=ATOL)


def test_the_dry_run_leaves_every_state_it_could_move_as_it_found_it():
    model = noisy_model()
    model.compile(optimizer="adam", loss="mse", metrics=["mae"])
    trainer = tfloop.Trainer(model, jit_compile=False)
    x, y = ex.regression_data(16)
    trainer.fit(x, y, epochs=1, verbose=0)  # everything built, every metric holding a total
    keras.random.normal((1,))  # Keras's global seed generator exists
    # Set first: another test module may have turned op determinism on, under which
    # TensorFlow makes no global generator of its own.
    tf.random.set_global_generator(tf.random.Generator.from_seed(1))
    tf.random.get_global_generator().normal([1])
    watched = [
        *model.non_trainable_variables,
        *(v for metric in trainer.metrics for v in metric.variables),
        trainer.optimizer.iterations,
        tf.random.get_global_generator().state,
    ]
    before = [keras.ops.convert_to_numpy(v) for v in watched]
    dry_run = _checks.DryRun(
        model,
        trainer._compiled,
        trainer.predict_step,
        trainer.compute_loss,
        lambda: trainer.metrics,
        trainer.optimizer,
    )
    dry_run.check((x, y), overrides_loss=False, checks_loss=True)
    for variable, value in zip(watched, before, strict=True):
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(variable), value, err_msg=variable.name
        )


def test_a_model_that_owns_its_steps_resumes_exactly(tmp_path):
    x, y = ex.regression_data()

    def run(directory, **options):
        (model,) = twins(lambda: ex.LowLevelModel(*ex.dense_inputs()))[:1]
        model.compile(optimizer="adam", jit_compile=False)
        checkpoint = tfloop.Checkpointer(directory, every_n_steps=3)
        trainer = tfloop.Trainer(model, checkpoint=checkpoint, steps_per_execution=2)
        history = trainer.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0, **options)
        return model, trainer, history.history

    straight, _, expected = run(tmp_path / "straight")
    _, stopped, _ = run(tmp_path / "resumed", max_steps=8)
    assert stopped.update_count == 8
    resumed, trainer, history = run(tmp_path / "resumed")
    assert trainer.update_count == 18
    assert_history_equal(expected, history)
    assert_weights_equal(weights_of(straight), weights_of(resumed))


def test_a_models_own_step_runs_per_replica_as_model_fit_runs_it():
    strategy = mirrored()
    x, y = ex.regression_data()
    models = []
    for _ in range(2):
        with strategy.scope():
            keras.utils.set_random_seed(0)
            model = ex.GuideModel(*ex.dense_inputs())
            guide_compile(model, False)
        models.append(model)
    reference, model = models
    expected = reference.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0).history
    trainer = tfloop.Trainer(model, strategy=strategy)
    history = trainer.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0).history
    assert_history_equal(expected, history)
    assert_weights_equal(weights_of(reference), weights_of(model), rtol=RTOL, atol=ATOL)
