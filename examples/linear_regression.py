"""Linear regression with a plain ``tf.Module`` and a custom ``compute_loss``.

The classic GradientTape + Adam example, on tfloop: the model is not a Keras model
but a ``tf.Module`` owning two ``tf.Variable`` (W and b), and a ``Trainer`` subclass
supplies the loss (mean squared error). tfloop does the rest: batching, seeded
shuffling, the tape, the optimizer update and the compiled multi-step loop.

The data are synthetic and seeded: ``y = 2 x + noise`` with ``x ~ U(-1, 1)`` and
Gaussian noise of standard deviation 0.05. Training recovers W and b to within
``TOLERANCE`` (0.02) of the true values 2 and 0.

    python examples/linear_regression.py --epochs 20
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf

import tfloop

TRUE_W = 2.0
TRUE_B = 0.0
TOLERANCE = 0.02


class Linear(tf.Module):
    """``y = W x + b`` for scalar features."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.W = tf.Variable(tf.random.stateless_normal([], seed=[seed, 0]), name="W")
        self.b = tf.Variable(0.0, name="b")

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        return self.W * x + self.b


class MeanSquaredErrorTrainer(tfloop.Trainer):
    """A Trainer whose loss is the mean squared error of a callable model."""

    def compute_loss(self, batch: tuple[tf.Tensor, ...], training: bool) -> tf.Tensor:
        x, y = batch[0], batch[1]
        return tf.reduce_mean(tf.square(self.model(x) - y))


def make_data(num_examples: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Samples ``y = TRUE_W * x + TRUE_B + noise`` as float32 arrays of shape ``[N]``."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.0, 1.0, size=num_examples).astype(np.float32)
    y = (TRUE_W * x + TRUE_B + rng.normal(0.0, noise, size=num_examples)).astype(np.float32)
    return x, y


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-examples", type=int, default=1000)
    parser.add_argument("--noise", type=float, default=0.05, help="std of the Gaussian noise")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", type=int, default=0, choices=(0, 1))
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    x, y = make_data(args.num_examples, args.noise, args.seed)
    trainer = MeanSquaredErrorTrainer(
        Linear(args.seed),
        optimizer=keras.optimizers.Adam(learning_rate=args.learning_rate),
        seed=args.seed,
    )
    history = trainer.fit(
        (x, y), epochs=args.epochs, batch_size=args.batch_size, verbose=args.verbose
    )
    result = {
        "W": float(trainer.model.W.numpy()),
        "b": float(trainer.model.b.numpy()),
        "loss": float(history.history["loss"][-1]),
    }
    print(f"W = {result['W']:.4f} (true {TRUE_W}), b = {result['b']:.4f} (true {TRUE_B})")
    print(f"final training loss (MSE) = {result['loss']:.5f}")
    return result


if __name__ == "__main__":
    main()
