"""The benchmark workloads of BENCHMARKS.md: model, data, contenders and target figures.

Adding a workload means adding one entry to ``WORKLOADS``; everything else (contenders,
timing, report) is generic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import keras
import numpy as np

PEAK = "matmul-peak"
"""Name of the pseudo-contender that measures the matmul peak in the same run."""


@dataclass(frozen=True)
class Ratio:
    """A same-run figure of the targets table: ``numerator`` over ``denominator``.

    ``kind="throughput"`` compares FLOP/s. Every contender of a workload does the same work
    per example, so for two contenders that is their ratio of samples/s; with
    ``denominator=PEAK`` it is the model FLOP utilisation against the matmul peak measured in
    the same run. ``kind="warmup"`` compares warm-up overheads (first epoch minus the median
    steady epoch) and ``kind="rss"`` peak resident memory (``--rss``).
    """

    numerator: str
    denominator: str
    target: float | None = None
    """Bound from BENCHMARKS.md; None for figures reported for information only."""
    kind: Literal["throughput", "warmup", "rss"] = "throughput"
    at_most: bool = False
    """The target is an upper bound (lower bound otherwise)."""

    @property
    def label(self) -> str:
        """Human-readable name of the figure."""
        if self.denominator == PEAK:
            return f"{self.numerator} model FLOP/s / matmul peak"
        prefix = {"throughput": "", "warmup": "warm-up overhead ", "rss": "peak RSS "}[self.kind]
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

    def __post_init__(self) -> None:
        if self.num_samples % self.batch_size:
            raise ValueError(f"{self.name}: num_samples must be a multiple of batch_size")

    def build_model(self, seed: int) -> keras.Model:
        """A fresh model; the same ``seed`` gives the same initial weights."""
        keras.utils.set_random_seed(seed)
        return keras.Sequential([keras.Input(self.input_shape), *self.build_layers()])

    def make_data(self, num_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Synthetic float32 inputs in [0, 1) and targets a fixed random teacher can learn."""
        rng = np.random.default_rng(seed)
        x = rng.random((num_samples, *self.input_shape), dtype=np.float32)
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


def _classifier(**fields: Any) -> Workload:
    """A 10-class workload: Adam, categorical cross-entropy and accuracy."""
    return Workload(
        loss="categorical_crossentropy",
        metrics=("accuracy",),
        hand_metrics=("categorical_accuracy",),
        optimizer="adam",
        make_targets=_teacher_classes(10),
        **fields,
    )


_BEST = Ratio("tfloop-default", "tfloop-best", 0.95)

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
    )
}
