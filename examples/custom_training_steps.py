"""Subclassing ``tfloop.Trainer``: a custom loss, and a GAN-style step with two optimizers.

This is the code of the "Subclassing the Trainer" tutorial (``docs/subclassing.md``), which
includes it piece by piece; the test suite runs it.

1. ``LassoTrainer`` overrides ``compute_loss``: mean squared error plus an L1 penalty on the
   weights, a loss that needs the model and not only ``(y_true, y_pred)``. On synthetic data
   where 3 of 10 features matter, it drives the 7 others' weights to about zero.
2. ``GANTrainer`` overrides ``train_step``: one discriminator update and one generator update
   per batch, each with its own optimizer. On a 1-D toy problem the generator learns to draw
   samples from N(3, 0.5) out of Gaussian noise.

Both steps still run inside tfloop's fused, compiled loop.

    python examples/custom_training_steps.py
    python examples/custom_training_steps.py --part gan --epochs 30
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

import tfloop

TRUE_WEIGHTS = np.array([3.0, -2.0, 1.5, 0, 0, 0, 0, 0, 0, 0], dtype=np.float32)
REAL_MEAN = 3.0
REAL_STDDEV = 0.5


# --8<-- [start:lasso]
class LassoTrainer(tfloop.Trainer):
    """Mean squared error plus ``l1`` times the sum of the absolute weights."""

    def __init__(self, model: keras.Model, optimizer: Any = "adam", *, l1: float, **kwargs: Any):
        super().__init__(model, optimizer, metrics=["mae"], **kwargs)
        self.l1 = l1

    def compute_loss(self, batch: Any, training: bool) -> tf.Tensor:
        x, y = batch
        y_pred = self.model(x, training=training)
        mean_squared_error = tf.reduce_mean(tf.square(y - y_pred))
        penalty = tf.add_n([tf.reduce_sum(tf.abs(w)) for w in self.model.trainable_weights])
        # The default compute_loss updates the compiled metrics ("mae"); an override does it.
        self.update_metrics(y, y_pred)
        return mean_squared_error + self.l1 * penalty


# --8<-- [end:lasso]


def make_regression_data(num_examples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``y = x @ TRUE_WEIGHTS + noise``; only the first three of ten features matter."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num_examples, TRUE_WEIGHTS.size)).astype(np.float32)
    noise = rng.normal(0.0, 0.1, size=num_examples).astype(np.float32)
    return x, (x @ TRUE_WEIGHTS + noise)[:, None]


def train_lasso(epochs: int = 20, l1: float = 0.05, seed: int = 0) -> dict[str, Any]:
    # --8<-- [start:lasso-fit]
    x, y = make_regression_data(2048, seed)
    model = keras.Sequential([keras.Input((10,)), keras.layers.Dense(1, use_bias=False)])
    trainer = LassoTrainer(model, keras.optimizers.Adam(0.05), l1=l1, seed=seed)
    history = trainer.fit((x, y), epochs=epochs, batch_size=64, verbose=0)
    weights = model.get_weights()[0][:, 0]
    print("weights:", np.round(weights, 2))  # about [2.97, -1.98, 1.48, 0, 0, 0, 0, 0, 0, 0]
    # --8<-- [end:lasso-fit]
    print(f"final loss {history.history['loss'][-1]:.4f}, mae {history.history['mae'][-1]:.4f}")
    return {"weights": weights, "history": history.history}


# --8<-- [start:gan-model]
class GAN(keras.Model):
    """A generator, a discriminator, and the noise the generator starts from."""

    def __init__(self, latent_dim: int = 4, seed: int = 0) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.generator = keras.Sequential(
            [
                keras.Input((latent_dim,)),
                keras.layers.Dense(16, activation="relu"),
                keras.layers.Dense(1),
            ],
            name="generator",
        )
        self.discriminator = keras.Sequential(
            [keras.Input((1,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)],
            name="discriminator",
        )
        # A seed generator owned by the model: tfloop seeds it and checkpoints its state.
        self.noise = keras.random.SeedGenerator(seed)

    def sample(self, num_samples: Any, training: bool = False) -> tf.Tensor:
        z = keras.random.normal((num_samples, self.latent_dim), seed=self.noise)
        return self.generator(z, training=training)

    def call(self, x: tf.Tensor, training: bool = False) -> tf.Tensor:
        """The discriminator's logit that ``x`` is real (what ``evaluate`` and ``predict`` see)."""
        return self.discriminator(x, training=training)


# --8<-- [end:gan-model]


# --8<-- [start:gan-trainer]
class GANTrainer(tfloop.Trainer):
    """One discriminator update and one generator update per batch of real samples."""

    def __init__(
        self,
        gan: GAN,
        generator_optimizer: keras.optimizers.Optimizer,
        discriminator_optimizer: keras.optimizers.Optimizer,
        **kwargs: Any,
    ) -> None:
        # self.optimizer is the generator's: optimizer.iterations (the logs' "step", what
        # schedules and Checkpointer(every_n_steps=...) count) counts generator updates.
        super().__init__(gan, generator_optimizer, **kwargs)
        # Kept on the model so that a Checkpointer, which saves the model, saves it too.
        gan.discriminator_optimizer = discriminator_optimizer
        # Optimizers create their variables when built: that must happen before fit traces the
        # step, and each optimizer only gets slots for the variables it updates.
        generator_optimizer.build(gan.generator.trainable_variables)
        discriminator_optimizer.build(gan.discriminator.trainable_variables)
        self.cross_entropy = keras.losses.BinaryCrossentropy(from_logits=True)
        self.generator_loss = keras.metrics.Mean(name="generator_loss")

    @property
    def metrics(self) -> list[keras.metrics.Metric]:
        # Everything in this list is logged per epoch, reset each epoch and checkpointed.
        return [*super().metrics, self.generator_loss]

    def compute_loss(self, batch: Any, training: bool) -> tf.Tensor:
        """The discriminator's loss: real samples labelled 1, generated ones 0."""
        real, _, _ = keras.utils.unpack_x_y_sample_weight(batch)
        real_logits = self.model.discriminator(real, training=training)
        fake = self.model.sample(tf.shape(real)[0])
        fake_logits = self.model.discriminator(fake, training=training)
        return self.cross_entropy(tf.ones_like(real_logits), real_logits) + self.cross_entropy(
            tf.zeros_like(fake_logits), fake_logits
        )

    def train_step(self, batch: Any) -> dict[str, tf.Tensor]:
        gan = self.model
        real, _, _ = keras.utils.unpack_x_y_sample_weight(batch)

        with tf.GradientTape() as tape:
            discriminator_loss = self.compute_loss(batch, training=True)
        variables = gan.discriminator.trainable_variables
        gradients = tape.gradient(discriminator_loss, variables)
        gan.discriminator_optimizer.apply_gradients(zip(gradients, variables, strict=True))

        with tf.GradientTape() as tape:
            fake = gan.sample(tf.shape(real)[0], training=True)
            fake_logits = gan.discriminator(fake)
            # The generator wins when the discriminator calls its samples real.
            generator_loss = self.cross_entropy(tf.ones_like(fake_logits), fake_logits)
        variables = gan.generator.trainable_variables
        gradients = tape.gradient(generator_loss, variables)
        self.optimizer.apply_gradients(zip(gradients, variables, strict=True))

        # "loss" in the logs is the discriminator's; "generator_loss" is the generator's.
        self.loss_tracker.update_state(discriminator_loss)
        self.generator_loss.update_state(generator_loss)
        # Returned values join the logs: those of the last step of each compiled execution.
        return {"generated_mean": tf.reduce_mean(fake)}


# --8<-- [end:gan-trainer]


def train_gan(epochs: int = 20, seed: int = 0) -> dict[str, Any]:
    # --8<-- [start:gan-fit]
    keras.utils.set_random_seed(seed)
    real = np.random.default_rng(seed).normal(REAL_MEAN, REAL_STDDEV, size=(4096, 1))
    gan = GAN(seed=seed)
    trainer = GANTrainer(
        gan,
        generator_optimizer=keras.optimizers.Adam(1e-2, beta_1=0.5),
        discriminator_optimizer=keras.optimizers.Adam(1e-2, beta_1=0.5),
        seed=seed,
    )
    history = trainer.fit(real.astype("float32"), epochs=epochs, batch_size=64, verbose=0)
    samples = gan.sample(10_000).numpy()
    print(f"generated mean {samples.mean():.2f} (real {REAL_MEAN}), std {samples.std():.2f}")
    # --8<-- [end:gan-fit]
    print(
        f"final discriminator loss {history.history['loss'][-1]:.3f}, "
        f"generator loss {history.history['generator_loss'][-1]:.3f}"
    )
    return {
        "samples": samples,
        "history": history.history,
        "generator_updates": int(trainer.optimizer.iterations),
        "discriminator_updates": int(gan.discriminator_optimizer.iterations),
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("lasso", "gan", "both"), default="both")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    results: dict[str, Any] = {}
    if args.part in ("lasso", "both"):
        results["lasso"] = train_lasso(args.epochs, seed=args.seed)
    if args.part in ("gan", "both"):
        results["gan"] = train_gan(args.epochs, seed=args.seed)
    return results


if __name__ == "__main__":
    main()
