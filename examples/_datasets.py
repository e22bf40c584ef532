"""Handwritten-digit data sources shared by the examples.

Every ``load_*`` function returns ``(x_train, y_train), (x_test, y_test)`` with images
as float32 arrays of shape ``[N, 28, 28]`` scaled to ``[0, 1]`` and labels as int64
arrays of shape ``[N]``, so the examples can switch sources with one flag.

- ``load_digits``: scikit-learn's 1,797 real 8x8 handwritten digits, upsampled to
  28x28. It ships inside scikit-learn, so it works offline.
- ``load_keras_mnist``: ``keras.datasets.mnist.load_data()`` (downloads once).
- ``load_tfds_mnist``: ``tensorflow_datasets`` MNIST (downloads and prepares once);
  ``tfds_mnist_split`` gives the same data as an unbatched ``tf.data.Dataset``.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

Split = tuple[np.ndarray, np.ndarray]

IMAGE_SIZE = 28
NUM_CLASSES = 10


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> tuple[Split, Split]:
    """scikit-learn's 8x8 digits, bilinearly upsampled to 28x28, stratified split."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    digits = sklearn_digits()
    # Pixel intensities in this dataset are counts from 0 to 16, not bytes.
    images = digits.images.astype(np.float32)[..., np.newaxis] / 16.0
    upsampled = tf.image.resize(images, (IMAGE_SIZE, IMAGE_SIZE), method="bilinear")
    x = np.clip(upsampled.numpy()[..., 0], 0.0, 1.0)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, stratify=y, random_state=seed
    )
    return (x_train, y_train), (x_test, y_test)


def load_keras_mnist() -> tuple[Split, Split]:
    """MNIST through ``keras.datasets.mnist.load_data()``."""
    import keras

    (x_train, y_train), (x_test, y_test) = keras.datasets.mnist.load_data()
    return _scale_bytes(x_train, y_train), _scale_bytes(x_test, y_test)


def tfds_mnist_split(split: str) -> tf.data.Dataset:
    """One MNIST split from TensorFlow Datasets as unbatched ``(image, label)`` pairs."""
    import tensorflow_datasets as tfds

    dataset = tfds.load("mnist", split=split, as_supervised=True)
    return dataset.map(_scale_tfds_example, num_parallel_calls=tf.data.AUTOTUNE)


def load_tfds_mnist() -> tuple[Split, Split]:
    """MNIST from TensorFlow Datasets, materialised as arrays."""
    return _to_arrays(tfds_mnist_split("train")), _to_arrays(tfds_mnist_split("test"))


def _scale_bytes(images: np.ndarray, labels: np.ndarray) -> Split:
    return images.astype(np.float32) / 255.0, labels.astype(np.int64)


def _scale_tfds_example(image: tf.Tensor, label: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    # TFDS images carry a trailing channel axis; the examples use [28, 28] like Keras.
    image = tf.cast(tf.squeeze(image, axis=-1), tf.float32) / 255.0
    return image, tf.cast(label, tf.int64)


def _to_arrays(dataset: tf.data.Dataset) -> Split:
    images, labels = [], []
    for image_batch, label_batch in dataset.batch(4096).as_numpy_iterator():
        images.append(image_batch)
        labels.append(label_batch)
    return np.concatenate(images), np.concatenate(labels)
