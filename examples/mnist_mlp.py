"""A Keras MLP classifier for handwritten digits, trained with ``tfloop.Trainer``.

The model is the classic one: Flatten -> Dense(128, relu) -> Dense(10, softmax) on
28x28 images, Adam, categorical cross-entropy on one-hot labels, accuracy. It is a
plain ``keras.Model``; tfloop trains it in place of ``model.fit``, validates on the
test split every epoch, evaluates it, and the model is saved as ``model.keras``.
A checkpoint is written every epoch under ``<output-dir>/checkpoints``; running the
script again resumes from it (``--restart`` starts over).

Data sources (``--data``):

- ``digits`` (default, offline): scikit-learn's real 8x8 handwritten digits,
  bilinearly upsampled to 28x28 so the model is exactly 784-128-10; stratified
  80/20 split (1,437 train, 360 test). With the defaults (15 epochs, batch 32,
  seed 0) it reaches a test accuracy of 0.961 (346 of 360).
- ``keras``: MNIST from ``keras.datasets.mnist.load_data()`` (NumPy arrays).
- ``tfds``: MNIST from ``tensorflow_datasets``, fed to the Trainer as a batched
  ``tf.data.Dataset``.

    python examples/mnist_mlp.py
    python examples/mnist_mlp.py --data keras --epochs 5 --output-dir runs/mnist_keras
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from _datasets import (
    IMAGE_SIZE,
    NUM_CLASSES,
    load_digits,
    load_keras_mnist,
    load_tfds_mnist,
    tfds_mnist_split,
)

import tfloop

ARRAY_LOADERS = {"digits": load_digits, "keras": load_keras_mnist, "tfds": load_tfds_mnist}
MODEL_FILENAME = "model.keras"


def build_model() -> keras.Model:
    return keras.Sequential(
        [
            keras.Input(shape=(IMAGE_SIZE, IMAGE_SIZE)),
            keras.layers.Flatten(),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(NUM_CLASSES, activation="softmax"),
        ],
        name="mnist_mlp",
    )


def build_trainer(
    model: keras.Model, learning_rate: float, seed: int, checkpoints: Path, restart: bool
) -> tfloop.Trainer:
    # A checkpoint every epoch: run the script again after a kill and it resumes exactly.
    checkpointer = tfloop.Checkpointer(checkpoints, restore=None if restart else "latest")
    return tfloop.Trainer(
        model,
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss="categorical_crossentropy",
        metrics=["accuracy"],
        checkpoint=checkpointer,
        seed=seed,
    )


def one_hot_arrays(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return x, keras.utils.to_categorical(y, NUM_CLASSES).astype(np.float32)


def tfds_batches(split: str, batch_size: int, shuffle_seed: int | None) -> tf.data.Dataset:
    """A batched ``(image, one_hot_label)`` pipeline over one TFDS MNIST split."""
    dataset = tfds_mnist_split(split)
    if shuffle_seed is not None:
        dataset = dataset.shuffle(10_000, seed=shuffle_seed, reshuffle_each_iteration=True)
    dataset = dataset.batch(batch_size).map(
        lambda x, y: (x, tf.one_hot(y, NUM_CLASSES)), num_parallel_calls=tf.data.AUTOTUNE
    )
    return dataset.prefetch(tf.data.AUTOTUNE)


def load_data(source: str, batch_size: int, seed: int) -> tuple[Any, Any]:
    """Training and test data in the form tfloop accepts: arrays or a batched dataset."""
    if source == "tfds":
        return tfds_batches("train", batch_size, seed), tfds_batches("test", batch_size, None)
    (x_train, y_train), (x_test, y_test) = ARRAY_LOADERS[source]()
    return one_hot_arrays(x_train, y_train), one_hot_arrays(x_test, y_test)


def save_model(model: keras.Model, output_dir: Path) -> Path:
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / MODEL_FILENAME
    model.save(path)
    return path


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=sorted(ARRAY_LOADERS), default="digits")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", type=Path, default=Path("runs/mnist_mlp"))
    parser.add_argument("--verbose", type=int, default=1, choices=(0, 1))
    parser.add_argument(
        "--restart", action="store_true", help="ignore the checkpoints in --output-dir"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    keras.utils.set_random_seed(args.seed)
    train_data, test_data = load_data(args.data, args.batch_size, args.seed)
    # batch_size only applies to arrays; a tf.data pipeline comes batched already.
    batch_size = None if isinstance(train_data, tf.data.Dataset) else args.batch_size

    trainer = build_trainer(
        build_model(), args.learning_rate, args.seed, args.output_dir / "checkpoints", args.restart
    )
    trainer.fit(
        train_data,
        epochs=args.epochs,
        validation_data=test_data,
        batch_size=batch_size,
        verbose=args.verbose,
    )
    results = trainer.evaluate(test_data, batch_size=batch_size)
    model_path = save_model(trainer.model, args.output_dir)
    print(f"test loss {results['loss']:.4f}, test accuracy {results['accuracy']:.4f}")
    print(f"saved the trained model to {model_path}")
    return results


if __name__ == "__main__":
    main()
