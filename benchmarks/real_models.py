"""The real Keras models of BENCHMARKS.md: their layers, synthetic data and input pipelines.

``transformer``: keras-io's text classification with a Transformer block (the layers are
written here, same architecture): token and position embeddings, one Transformer block
(two-head self-attention, Dropout, LayerNormalization, a Dense(32, relu) -> Dense(32)
feed-forward), GlobalAveragePooling1D, Dropout(0.1), Dense(20, relu), Dropout(0.1),
Dense(2, softmax); int sequences of 200 tokens over a vocabulary of 20,000.

``lstm``: keras-io's weather forecasting set-up on a synthetic series: 7 features, windows of
120 steps taken every 6th row (``sampling_rate=6``) by ``keras.utils.timeseries_dataset_from_array``
in batches of 256, the target a future value of one feature; LSTM(32) -> Dense(1), mse.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf

# --- transformer ---------------------------------------------------------------------------

VOCABULARY_SIZE = 20_000
SEQUENCE_LENGTH = 200
EMBED_DIM = 32
NUM_HEADS = 2
FEED_FORWARD_DIM = 32


class TokenAndPositionEmbedding(keras.layers.Layer):  # type: ignore[misc]
    """A token's embedding plus its position's: two ``Embedding`` tables, summed."""

    def __init__(self, length: int, vocabulary: int, dim: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tokens = keras.layers.Embedding(vocabulary, dim)
        self.positions = keras.layers.Embedding(length, dim)

    def call(self, token_ids: Any) -> Any:
        where = keras.ops.arange(keras.ops.shape(token_ids)[-1])
        return self.tokens(token_ids) + self.positions(where)

    def forward_flops(self) -> float:
        return 0.0  # lookups and one add


class TransformerBlock(keras.layers.Layer):  # type: ignore[misc]
    """Self-attention and a feed-forward net, each followed by Dropout, a residual add and
    LayerNormalization (post-norm, as in keras-io's example)."""

    def __init__(self, dim: int, heads: int, hidden: int, rate: float = 0.1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.dim, self.heads, self.hidden = dim, heads, hidden
        self.attention = keras.layers.MultiHeadAttention(num_heads=heads, key_dim=dim)
        self.feed_forward = keras.Sequential(
            [keras.layers.Dense(hidden, activation="relu"), keras.layers.Dense(dim)]
        )
        self.norm_attention = keras.layers.LayerNormalization(epsilon=1e-6)
        self.norm_feed_forward = keras.layers.LayerNormalization(epsilon=1e-6)
        self.drop_attention = keras.layers.Dropout(rate)
        self.drop_feed_forward = keras.layers.Dropout(rate)

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        attended = self.drop_attention(self.attention(inputs, inputs), training=training)
        inputs = self.norm_attention(inputs + attended)
        transformed = self.drop_feed_forward(self.feed_forward(inputs), training=training)
        return self.norm_feed_forward(inputs + transformed)

    def forward_flops(self) -> float:
        """Per sequence: the Q, K, V and output projections, the scores and their use, and
        the feed-forward net (2 FLOPs per multiply-add)."""
        n, d, inner = SEQUENCE_LENGTH, self.dim, self.heads * self.dim
        projections = 4 * 2 * n * d * inner
        attention = 2 * 2 * n * n * inner
        feed_forward = 2 * 2 * n * d * self.hidden
        return float(projections + attention + feed_forward)


def transformer_layers() -> list[keras.layers.Layer]:
    return [
        TokenAndPositionEmbedding(SEQUENCE_LENGTH, VOCABULARY_SIZE, EMBED_DIM),
        TransformerBlock(EMBED_DIM, NUM_HEADS, FEED_FORWARD_DIM),
        keras.layers.GlobalAveragePooling1D(),
        keras.layers.Dropout(0.1),
        keras.layers.Dense(20, activation="relu"),
        keras.layers.Dropout(0.1),
        keras.layers.Dense(2, activation="softmax"),
    ]


def review_tokens(rng: np.random.Generator, num_samples: int) -> np.ndarray:
    """Token ids in [1, 20000), ``SEQUENCE_LENGTH`` of them per sample, Zipf-distributed
    (frequent words are frequent, as in IMDB reviews)."""
    ranks = rng.zipf(1.3, (num_samples, SEQUENCE_LENGTH))
    return np.minimum(ranks, VOCABULARY_SIZE - 1).astype(np.int32)


def review_labels(x: np.ndarray) -> np.ndarray:
    """Class 0 or 1: the sign of the mean of a fixed random score per token (learnable by
    the embeddings and the pooling)."""
    table = np.random.default_rng(1).standard_normal(VOCABULARY_SIZE)
    scores = table[x].mean(axis=1)
    labels: np.ndarray = (scores > np.median(scores)).astype(np.int32)
    return labels


# --- lstm ----------------------------------------------------------------------------------

FEATURES = 7
WINDOW = 120
SAMPLING_RATE = 6
FUTURE = 72
"""Rows between a window's last row and its target (12 hours of 10-minute rows)."""
SPAN = (WINDOW - 1) * SAMPLING_RATE + 1
"""Rows one window covers."""


def weather_series(rng: np.random.Generator, num_windows: int) -> np.ndarray:
    """A standardized series of 7 features with a daily cycle, slow drifts and noise; long
    enough for ``num_windows`` windows and their targets."""
    rows = num_windows + SPAN - 1 + FUTURE
    t = np.arange(rows)[:, None]
    day = 144  # 10-minute rows
    phases = rng.uniform(0, 2 * np.pi, FEATURES)
    cycle = np.sin(2 * np.pi * t / day + phases)
    drift = np.cumsum(rng.normal(0, 0.02, (rows, FEATURES)), axis=0)
    series = cycle + drift + rng.normal(0, 0.1, (rows, FEATURES))
    series = (series - series.mean(axis=0)) / series.std(axis=0)
    return series.astype(np.float32)


def future_values(series: np.ndarray) -> np.ndarray:
    """Target of the window starting at row i: feature 1, ``FUTURE`` rows after its end."""
    return series[SPAN - 1 + FUTURE :, 1:2].copy()


def timeseries_pipeline(
    series: np.ndarray, targets: np.ndarray, batch_size: int
) -> tf.data.Dataset:
    """``keras.utils.timeseries_dataset_from_array`` over the series: every contender is fed
    this dataset (as keras-io's example feeds ``model.fit``)."""
    dataset: tf.data.Dataset = keras.utils.timeseries_dataset_from_array(
        series[:-FUTURE],
        targets,
        sequence_length=WINDOW,
        sampling_rate=SAMPLING_RATE,
        batch_size=batch_size,
    )
    return dataset


def lstm_layers() -> list[keras.layers.Layer]:
    return [keras.layers.LSTM(32), keras.layers.Dense(1)]


def lstm_flops(layer: keras.layers.Layer) -> float:
    """Forward FLOPs of one sequence through an LSTM: 4 gates, input and recurrent kernels,
    per time step."""
    fan_in, gates = layer.cell.kernel.shape
    units = layer.cell.units
    return float(WINDOW * 2 * (fan_in + units) * gates)
