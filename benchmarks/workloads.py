"""The benchmark workloads of BENCHMARKS.md: model, data, contenders and target figures.

Adding a workload means adding one entry to ``WORKLOADS``; everything else (contenders,
timing, report) is generic.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import keras
import numpy as np
import tensorflow as tf
from real_models import (
    future_values,
    lstm_flops,
    lstm_layers,
    review_labels,
    review_tokens,
    timeseries_pipeline,
    transformer_layers,
    weather_series,
)

PEAK = "matmul-peak"
"""Name of the pseudo-contender that measures the matmul peak in the same run."""
SHAPES = "distinct batch shapes"
"""Denominator of a ``kind="traces"`` ratio: the batch shapes of one epoch of the pipeline."""


@dataclass(frozen=True)
class Ratio:
    """A same-run figure of the targets table: ``numerator`` over ``denominator``.

    ``kind="throughput"`` compares FLOP/s. Every contender of a workload does the same work
    per example, so for two contenders that is their ratio of samples/s; with
    ``denominator=PEAK`` it is the model FLOP utilisation against the matmul peak measured in
    the same run. ``kind="warmup"`` compares warm-up overheads (first epoch minus the median
    steady epoch), ``kind="first-epoch"`` the first epochs' seconds (the whole first epoch,
    ``fit``'s set-up included) and ``kind="rss"`` peak resident memory (``--rss``). ``kind="traces"`` divides
    the number of times the numerator's compiled function was traced by ``SHAPES``, the number
    of distinct batch shapes in an epoch of the workload's pipeline.
    """

    numerator: str
    denominator: str
    target: float | None = None
    """Bound from BENCHMARKS.md; None for figures reported for information only."""
    kind: Literal["throughput", "warmup", "first-epoch", "rss", "traces"] = "throughput"
    at_most: bool = False
    """The target is an upper bound (lower bound otherwise)."""

    @property
    def label(self) -> str:
        """Human-readable name of the figure."""
        if self.denominator == PEAK:
            return f"{self.numerator} model FLOP/s / matmul peak"
        if self.kind == "traces":
            return f"traces of {self.numerator} / {SHAPES} per epoch"
        prefix = {
            "throughput": "",
            "warmup": "warm-up overhead ",
            "first-epoch": "first epoch ",
            "rss": "peak RSS ",
        }[self.kind]
        return f"{prefix}{self.numerator} / {self.denominator}"

    @property
    def target_text(self) -> str:
        """The target as written in BENCHMARKS.md, or "-"."""
        if self.target is None:
            return "-"
        return f"{'≤' if self.at_most else '≥'} {self.target:g}"

    def met(self, value: float) -> bool | None:
        """Whether ``value`` meets the target (None when there is no target)."""
        if self.target is None:
            return None
        return value <= self.target if self.at_most else value >= self.target


Pipeline = Callable[[np.ndarray, np.ndarray, int], tf.data.Dataset]
"""``(x, y, batch_size)`` -> the batched ``tf.data`` pipeline every dataset contender is fed."""


def cached_pipeline(x: np.ndarray, y: np.ndarray, batch_size: int) -> tf.data.Dataset:
    """``from_tensor_slices((x, y)).batch(B).cache().prefetch(AUTOTUNE)``: the usual input.

    ``batch`` keeps a last, partial batch, so the batch dimension is unknown (None) in the
    element spec.
    """
    return (
        tf.data.Dataset.from_tensor_slices((x, y))
        .batch(batch_size)
        .cache()
        .prefetch(tf.data.AUTOTUNE)
    )


@dataclass(frozen=True)
class Workload:
    """One model + data set + optimizer, and the figures the suite reports for it."""

    name: str
    description: str
    input_shape: tuple[int, ...]
    build_layers: Callable[[], list[keras.layers.Layer]]
    make_targets: Callable[[np.ndarray], np.ndarray]
    loss: str
    metrics: tuple[str, ...]
    hand_metrics: tuple[str, ...]
    """Metric names a hand loop instantiates (``"accuracy"`` resolved for the loss)."""
    optimizer: str
    batch_size: int
    num_samples: int
    contenders: tuple[str, ...]
    ratios: tuple[Ratio, ...]
    peak_matmul: tuple[int, int, int] | None = None
    """(m, k, n) of the XLA-compiled matmul whose throughput is the same-run peak."""
    accumulate_steps: int = 1
    pipeline: Pipeline = cached_pipeline
    """Builds the ``tf.data`` pipeline of the dataset contenders (keras-tuned, hand loops)."""
    tfloop_on_pipeline: bool = False
    """tfloop-default and tfloop-best are fed ``pipeline`` (``fit(dataset)``), not the arrays."""
    remainder: int = 0
    """Examples in a last, partial batch (``num_samples % batch_size``); 0: whole batches."""
    mixed_shapes: bool = False
    """The pipeline's batches have more than one shape (a partial batch, buckets): the
    superbatch hand loop stacks only batches of the same shape (``tf.data`` cannot stack the
    others)."""
    input_dtype: str = "float32"
    make_inputs: Callable[[np.random.Generator, int], np.ndarray] | None = None
    """``(rng, num_samples)`` -> inputs; None: float32 in [0, 1) of ``input_shape``."""
    arrays: bool = True
    """The examples exist as arrays ``x``, ``y`` (one row per example); False: only as the
    pipeline (``lstm``: windows cut from one series by a Keras utility), which every
    contender is fed, keras-default included."""

    def __post_init__(self) -> None:
        if self.num_samples % self.batch_size != self.remainder:
            raise ValueError(
                f"{self.name}: num_samples must be whole batches plus remainder={self.remainder}"
            )

    def build_model(self, seed: int) -> keras.Model:
        """A fresh model; the same ``seed`` gives the same initial weights."""
        keras.utils.set_random_seed(seed)
        inputs = keras.Input(self.input_shape, dtype=self.input_dtype)
        return keras.Sequential([inputs, *self.build_layers()])

    def make_data(self, num_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Synthetic inputs (float32 in [0, 1) unless the workload makes its own) and targets
        a fixed random teacher can learn."""
        rng = np.random.default_rng(seed)
        if self.make_inputs is None:
            x = rng.random((num_samples, *self.input_shape), dtype=np.float32)
        else:
            x = self.make_inputs(rng, num_samples)
        return x, self.make_targets(x)

    def train_flops_per_example(self) -> float:
        """Model FLOPs of one training example: 3 x the forward matmul/conv FLOPs.

        Forward: 2·in·out per Dense layer and 2·kh·kw·cin·cout·oh·ow per Conv2D layer (one
        multiply-add = 2 FLOPs); biases, activations, pooling, loss and the optimizer update
        are not counted. Backward costs twice the forward (input and weight gradients).
        """
        model = self.build_model(seed=0)
        return 3.0 * sum(_forward_flops(layer) for layer in model.layers)


def _forward_flops(layer: keras.layers.Layer) -> float:
    """Forward FLOPs of one example through ``layer`` (0 for layers without a matmul)."""
    own = getattr(layer, "forward_flops", None)
    if own is not None:  # a layer of this file that counts its own (the Transformer's)
        return float(own())
    if isinstance(layer, keras.layers.LSTM):
        return lstm_flops(layer)
    if isinstance(layer, keras.layers.Dense):
        fan_in, units = layer.kernel.shape
        return float(2 * fan_in * units)
    if isinstance(layer, keras.layers.Conv2D):
        kh, kw, cin, cout = layer.kernel.shape
        _, oh, ow, _ = layer.output.shape
        return float(2 * kh * kw * cin * cout * oh * ow)
    return 0.0


def _teacher_classes(num_classes: int) -> Callable[[np.ndarray], np.ndarray]:
    """One-hot labels from a fixed random linear teacher, so the loss visibly falls."""

    def targets(x: np.ndarray) -> np.ndarray:
        flat = x.reshape(len(x), -1)
        weights = np.random.default_rng(1).standard_normal((flat.shape[1], num_classes))
        labels = np.argmax((flat - 0.5) @ weights, axis=1)
        one_hot: np.ndarray = np.eye(num_classes, dtype=np.float32)[labels]
        return one_hot

    return targets


def _teacher_line(x: np.ndarray) -> np.ndarray:
    """Regression targets y = 3x + 2 plus a little noise."""
    noise = np.random.default_rng(1).normal(0.0, 0.1, x.shape)
    return (3.0 * x + 2.0 + noise).astype(np.float32)


def _mlp_layers() -> list[keras.layers.Layer]:
    return [
        keras.layers.Flatten(),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ]


def _wide_mlp_layers() -> list[keras.layers.Layer]:
    return [
        keras.layers.Dense(2048, activation="relu"),
        keras.layers.Dense(2048, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ]


def _cnn_layers() -> list[keras.layers.Layer]:
    return [
        keras.layers.Conv2D(32, 3, activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(64, 3, activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(10, activation="softmax"),
    ]


def _linear_layers() -> list[keras.layers.Layer]:
    return [keras.layers.Dense(1)]


# --- tfrecord: a TFRecord file of tf.train.Example, parsed every epoch -----------------------

_FEATURES = {
    "x": tf.io.FixedLenFeature([784], tf.float32),
    "label": tf.io.FixedLenFeature([], tf.int64),
}


def _write_tfrecord(x: np.ndarray, y: np.ndarray) -> Path:
    """Write (x, class of y) as tf.train.Example records to a file removed at exit."""
    directory = Path(tempfile.mkdtemp(prefix="tfloop-bench-tfrecord-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    path = directory / "data.tfrecord"
    with tf.io.TFRecordWriter(str(path)) as writer:
        for features, label in zip(x, np.argmax(y, axis=1), strict=True):
            floats = tf.train.FloatList(value=features.tolist())  # tolist: 3x faster
            feature = {
                "x": tf.train.Feature(float_list=floats),
                "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
            }
            example = tf.train.Example(features=tf.train.Features(feature=feature))
            writer.write(example.SerializeToString())
    return path


def _parse_examples(serialized: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """A batch of serialized examples -> (x [B, 784], one-hot y [B, 10])."""
    features = tf.io.parse_example(serialized, _FEATURES)
    return features["x"], tf.one_hot(features["label"], 10)


def tfrecord_pipeline(x: np.ndarray, y: np.ndarray, batch_size: int) -> tf.data.Dataset:
    """``TFRecordDataset(file).batch(B).map(parse_example)``: the records are parsed every epoch.

    The file is written once per process (into a temporary directory). The map runs with
    ``num_parallel_calls=AUTOTUNE`` (in order), as the tf.data guide advises; no cache.
    """
    return (
        tf.data.TFRecordDataset(str(_write_tfrecord(x, y)))
        .batch(batch_size)
        .map(_parse_examples, num_parallel_calls=tf.data.AUTOTUNE)
        .prefetch(tf.data.AUTOTUNE)
    )


# --- text: token sequences of 8-128 tokens, bucketed by length -------------------------------

VOCABULARY = 5_000
MIN_LENGTH, MAX_LENGTH = 8, 128
BUCKET_BOUNDARIES = (17, 33, 65, 129)
"""Buckets of lengths [8, 16], [17, 32], [33, 64], [65, 128], each padded to its longest
length (``pad_to_bucket_boundary=True``): 16, 32, 64 or 128 tokens."""


def _token_sequences(rng: np.random.Generator, num_samples: int) -> np.ndarray:
    """Token ids in [1, 5000) of random lengths 8..128, right-padded with 0 to 128."""
    lengths = rng.integers(MIN_LENGTH, MAX_LENGTH + 1, num_samples)
    tokens = rng.integers(1, VOCABULARY, (num_samples, MAX_LENGTH), dtype=np.int32)
    tokens[np.arange(MAX_LENGTH) >= lengths[:, None]] = 0
    return tokens


def _teacher_tokens(x: np.ndarray) -> np.ndarray:
    """One-hot labels: argmax of the mean of a fixed random per-token score vector."""
    table = np.random.default_rng(1).standard_normal((VOCABULARY, 10))
    table[0] = 0.0  # padding
    scores = np.zeros((len(x), 10))
    for position in range(x.shape[1]):
        scores += table[x[:, position]]
    scores /= np.count_nonzero(x, axis=1)[:, None]
    one_hot: np.ndarray = np.eye(10, dtype=np.float32)[np.argmax(scores, axis=1)]
    return one_hot


def bucketed_pipeline(x: np.ndarray, y: np.ndarray, batch_size: int) -> tf.data.Dataset:
    """Sequences from a ragged tensor -> ``bucket_by_sequence_length`` -> cache -> prefetch.

    Batches are padded to their bucket's boundary, so an epoch has four full-batch shapes
    plus each bucket's last, partial batch.
    """
    sequences = tf.RaggedTensor.from_tensor(x, padding=0)
    return (
        tf.data.Dataset.from_tensor_slices((sequences, y))
        # Slices of a ragged tensor come out as ragged specs of rank 1, which padded_batch
        # refuses; the identity map turns them into dense [length] tensors.
        .map(lambda tokens, label: (tokens, label))
        .bucket_by_sequence_length(
            lambda tokens, _: tf.shape(tokens)[0],
            bucket_boundaries=list(BUCKET_BOUNDARIES),
            bucket_batch_sizes=[batch_size] * (len(BUCKET_BOUNDARIES) + 1),
            pad_to_bucket_boundary=True,
        )
        .cache()
        .prefetch(tf.data.AUTOTUNE)
    )


def _text_layers() -> list[keras.layers.Layer]:
    return [
        keras.layers.Embedding(VOCABULARY, 64, mask_zero=True),
        keras.layers.GlobalAveragePooling1D(),  # the mean over the real tokens (masked)
        keras.layers.Dense(10, activation="softmax"),
    ]


def _classifier(**fields: Any) -> Workload:
    """A 10-class workload: Adam, categorical cross-entropy and accuracy."""
    fields.setdefault("make_targets", _teacher_classes(10))
    return Workload(
        loss="categorical_crossentropy",
        metrics=("accuracy",),
        hand_metrics=("categorical_accuracy",),
        optimizer="adam",
        **fields,
    )


_BEST = Ratio("tfloop-default", "tfloop-best", 0.95)
_PIPELINE_CONTENDERS = (
    "keras-tuned",
    "hand-loop-K64",
    "hand-loop-K256",
    "hand-loop-K128-bg",
    "tfloop-default",
    "tfloop-best",
)
_BACKGROUND_RELEASE = Ratio("tfloop-default", "hand-loop-K128-bg")
"""Information: against a hand loop that, like tfloop, releases each epoch's exhausted
iterator on another thread (released on the training thread, it held the plain hand loop for
~0.2 s per epoch on the shared machine)."""

_REAL_MODEL_CONTENDERS = ("keras-default", "keras-tuned", "tfloop-default")
_REAL_MODEL_RATIOS = (
    Ratio("tfloop-default", "keras-tuned", 1.0),
    Ratio("tfloop-default", "keras-default"),
    Ratio("tfloop-default", "keras-default", 1.2, kind="first-epoch", at_most=True),
    Ratio("tfloop-default", "keras-tuned", kind="first-epoch", at_most=True),
    Ratio("tfloop-default", "keras-tuned", kind="warmup", at_most=True),
    Ratio("tfloop-default", "keras-default", kind="warmup", at_most=True),
)
"""The real models' figures: steady throughput (target 1.0 against keras-tuned, goal 1.3),
the first epoch (target 1.2 against keras-default's) and the warm-up overhead."""

WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        _classifier(
            name="mlp",
            description="Flatten → Dense(128, relu) → Dense(10, softmax), 784 inputs, Adam, batch 32",
            input_shape=(784,),
            build_layers=_mlp_layers,
            batch_size=32,
            num_samples=60_000,
            peak_matmul=(32, 784, 128),
            contenders=(
                "keras-default",
                "keras-tuned",
                "hand-loop-iter",
                "hand-loop-K64",
                "hand-loop-K256",
                "tfloop-default",
                "tfloop-default-ds",
                "tfloop-ckpt100",
                "tfloop-val1000",
                "tfloop-best",
            ),
            ratios=(
                Ratio("tfloop-default", "keras-tuned", 2.5),
                Ratio("tfloop-default", "keras-default", 8.0),
                Ratio("tfloop-default", "hand-loop", 0.95),
                _BEST,
                Ratio("tfloop-default", PEAK, 0.75),
                Ratio("hand-loop", "keras-tuned"),
                Ratio("hand-loop", PEAK),
                Ratio("tfloop-ckpt100", "tfloop-default", 0.95),
                Ratio("tfloop-val1000", "tfloop-default"),
                Ratio("tfloop-default", "keras-tuned", 1.1, kind="warmup", at_most=True),
                Ratio("tfloop-default", "keras-default", 1.05, kind="rss", at_most=True),
            ),
        ),
        _classifier(
            name="mlp-accum",
            description="the mlp workload with accumulate_steps=4 (micro-batch 32 x 4)",
            input_shape=(784,),
            build_layers=_mlp_layers,
            batch_size=32,
            num_samples=60_000,
            accumulate_steps=4,
            contenders=("keras-accum", "tfloop-noaccum", "tfloop-default", "tfloop-best"),
            ratios=(
                Ratio("tfloop-default", "tfloop-noaccum", 0.95),
                Ratio("tfloop-default", "keras-accum", 2.5),
                _BEST,
            ),
        ),
        _classifier(
            name="wide-mlp",
            description="1024 → Dense(2048, relu) → Dense(2048, relu) → Dense(10, softmax), batch 256",
            input_shape=(1024,),
            build_layers=_wide_mlp_layers,
            batch_size=256,
            num_samples=59_904,
            peak_matmul=(256, 2048, 2048),
            contenders=("keras-tuned", "hand-loop-K64", "tfloop-default", "tfloop-best"),
            ratios=(
                Ratio("tfloop-default", "keras-tuned", 1.0),
                _BEST,
                Ratio("tfloop-default", PEAK),
            ),
        ),
        _classifier(
            name="cnn",
            description="Conv(32) → pool → Conv(64) → pool → Dense(10) on 28x28x1, batch 64",
            input_shape=(28, 28, 1),
            build_layers=_cnn_layers,
            batch_size=64,
            num_samples=59_968,
            contenders=(
                "keras-default",
                "keras-tuned",
                "hand-loop-K64",
                "tfloop-default",
                "tfloop-best",
            ),
            ratios=(Ratio("tfloop-default", "keras-tuned"), _BEST),
        ),
        Workload(
            name="linear",
            description="W·x + b on one feature, SGD, mean squared error, batch 4",
            input_shape=(1,),
            build_layers=_linear_layers,
            make_targets=_teacher_line,
            loss="mean_squared_error",
            metrics=(),
            hand_metrics=(),
            optimizer="sgd",
            batch_size=4,
            num_samples=20_000,
            contenders=(
                "keras-default",
                "keras-tuned",
                "hand-loop-K256",
                "tfloop-default",
                "tfloop-best",
            ),
            ratios=(Ratio("tfloop-default", "keras-tuned"), _BEST),
        ),
        _classifier(
            name="mlp-ds",
            description="the mlp fed from_tensor_slices((x, y)).batch(32).cache().prefetch(): "
            "batch dimension unknown, last batch partial (16)",
            input_shape=(784,),
            build_layers=_mlp_layers,
            batch_size=32,
            num_samples=60_016,
            remainder=16,
            mixed_shapes=True,
            tfloop_on_pipeline=True,
            contenders=_PIPELINE_CONTENDERS,
            ratios=(
                Ratio("tfloop-default", "hand-loop", 0.95),
                _BEST,
                Ratio("tfloop-default", "keras-tuned"),
                Ratio("hand-loop", "keras-tuned"),
                _BACKGROUND_RELEASE,
            ),
        ),
        _classifier(
            name="tfrecord",
            description="the mlp fed TFRecordDataset(file).batch(32).map(parse_example)"
            ".prefetch(): tf.train.Example records parsed every epoch, no cache",
            input_shape=(784,),
            build_layers=_mlp_layers,
            batch_size=32,
            num_samples=60_000,
            pipeline=tfrecord_pipeline,
            tfloop_on_pipeline=True,
            contenders=_PIPELINE_CONTENDERS,
            ratios=(
                Ratio("tfloop-default", "hand-loop", 0.95),
                Ratio("tfloop-default", "keras-tuned", 1.5),
                _BEST,
                Ratio("hand-loop", "keras-tuned"),
                _BACKGROUND_RELEASE,
            ),
        ),
        _classifier(
            name="text",
            description="Embedding(5000, 64, mask_zero) → GlobalAveragePooling1D → Dense(10, "
            "softmax), sequences of 8-128 tokens, bucket_by_sequence_length (padded to 16, 32, "
            "64, 128), batch 32",
            input_shape=(None,),
            input_dtype="int32",
            build_layers=_text_layers,
            make_inputs=_token_sequences,
            make_targets=_teacher_tokens,
            batch_size=32,
            num_samples=60_000,
            pipeline=bucketed_pipeline,
            mixed_shapes=True,
            tfloop_on_pipeline=True,
            contenders=(
                "keras-tuned",
                "hand-loop-step",
                "hand-loop-K64",
                "tfloop-default",
                "tfloop-best",
            ),
            ratios=(
                Ratio("tfloop-default", "keras-tuned", 1.5),
                Ratio("tfloop-default", SHAPES, 1.0, kind="traces", at_most=True),
                _BEST,
                Ratio("tfloop-default", "hand-loop-step"),
                Ratio("tfloop-default", "hand-loop"),
                Ratio("hand-loop-step", "keras-tuned"),
                Ratio("hand-loop", "keras-tuned"),
            ),
        ),
        Workload(
            name="transformer",
            description="keras-io text classification with a Transformer block "
            "(TokenAndPositionEmbedding, MultiHeadAttention(2 heads, key_dim 32), Dropout, "
            "LayerNormalization, Dense(32) feed-forward, pooling, Dense(20), Dense(2, softmax)), "
            "200 tokens of a 20,000-word vocabulary, Adam, batch 32",
            input_shape=(200,),
            input_dtype="int32",
            build_layers=transformer_layers,
            make_inputs=review_tokens,
            make_targets=review_labels,
            loss="sparse_categorical_crossentropy",
            metrics=("accuracy",),
            hand_metrics=("sparse_categorical_accuracy",),
            optimizer="adam",
            batch_size=32,
            num_samples=6_400,
            contenders=_REAL_MODEL_CONTENDERS,
            ratios=_REAL_MODEL_RATIOS,
        ),
        Workload(
            name="lstm",
            description="keras-io weather forecasting: timeseries_dataset_from_array over a "
            "synthetic series (7 features, windows of 120 rows taken every 6th, batch 256, "
            "target a future value) -> LSTM(32) -> Dense(1), Adam, mse",
            input_shape=(120, 7),
            build_layers=lstm_layers,
            make_inputs=weather_series,
            make_targets=future_values,
            loss="mean_squared_error",
            metrics=(),
            hand_metrics=(),
            optimizer="adam",
            batch_size=256,
            num_samples=20_480,
            pipeline=timeseries_pipeline,
            tfloop_on_pipeline=True,
            arrays=False,
            contenders=_REAL_MODEL_CONTENDERS,
            ratios=_REAL_MODEL_RATIOS,
        ),
    )
}
