"""What ``jit_compile="auto"`` chooses for a Keras model trained without a strategy.

The choice is a rule on the model's layers and the devices TensorFlow sees, made once, before
the model's first compiled execution: the same model on the same machine always gets the same
choice, so a run is reproducible (XLA draws other random numbers than the plain graph for
Dropout and ``keras.random.SeedGenerator``, in Keras too, so a choice made from timings, or
changed mid-run, would change a run's numbers). It is logged once per model, at INFO, with its
reason.

On a GPU or a TPU, XLA. On a CPU, XLA except for three kinds of layer, measured on this
project's workloads (``benchmarks/xla_choice.py``, table in docs/execution.md), 2 CPU cores:

- convolutions (``Conv*``, ``SeparableConv*``, ``DepthwiseConv*``, ``ConvLSTM*``): XLA's CPU
  convolutions are far slower than TensorFlow's own (oneDNN) kernels: the ``cnn`` workload
  trained at 93-163 samples/s with XLA against 5,500-8,800 without;
- layers that draw random numbers in training (a layer owning a ``keras.random.SeedGenerator``
  with a nonzero rate: ``Dropout``, ``SpatialDropout*``, ``GaussianNoise``, an RNN's
  ``dropout``, random augmentation layers): under XLA on a CPU, TensorFlow's stateless random
  ops (Keras draws its Dropout masks with them) generate about 1.5 us per number, 100x the
  plain graph's cost: 32 x 200 x 32 numbers took 310-630 ms against 2-11 ms, and the ``mlp``
  with a Dropout(0.2) trained at 2,900-4,900 samples/s with XLA against 11,400-14,200 without
  (without the Dropout XLA was 3x faster);
- attention (``MultiHeadAttention``, ``GroupedQueryAttention``, ``Attention``,
  ``AdditiveAttention``): its work is a few large matmuls and a softmax, which TensorFlow's
  kernels run as fast as XLA's or faster, while XLA takes 3-8 s to compile one small block
  (the ``transformer`` workload: XLA 0.3-0.44x the plain graph per epoch, 20-50 s of compiling).

Every other model compiles with XLA, whose gain on small layers is large (``mlp`` about 2x,
``linear`` 20-50x, ``lstm`` 1.3-1.6x per epoch) and whose compile time is seconds. Embeddings keep
XLA: under XLA an ``Embedding``'s gradient is a scatter-add into a dense zero table, where
TensorFlow alone passes ``IndexedSlices``; but Keras's Adam densifies those anyway (its moments
update every row), and with SGD XLA turns the update into an in-place scatter on the rows used
(measured per step, batch of 32 x 64 tokens, 64 steps per call: XLA 4.0x faster with Adam and
6.4x with SGD at 5,000 rows, 1.7x and 86x at 500,000).
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

import keras
import tensorflow as tf

__all__ = ["ATTENTION", "CONVOLUTIONS", "auto_jit_compile", "draws_random_numbers", "log_choice"]

logger = logging.getLogger("tfloop")


def _layer_classes(*names: str) -> tuple[type, ...]:
    return tuple(getattr(keras.layers, name) for name in names if hasattr(keras.layers, name))


CONVOLUTIONS = _layer_classes(
    "Conv1D",
    "Conv2D",
    "Conv3D",
    "Conv1DTranspose",
    "Conv2DTranspose",
    "Conv3DTranspose",
    "SeparableConv1D",
    "SeparableConv2D",
    "DepthwiseConv1D",
    "DepthwiseConv2D",
    "ConvLSTM1D",
    "ConvLSTM2D",
    "ConvLSTM3D",
)
"""Layers XLA runs far slower than TensorFlow's own kernels on a CPU."""

ATTENTION = _layer_classes(
    "MultiHeadAttention", "GroupedQueryAttention", "Attention", "AdditiveAttention"
)
"""Layers XLA speeds up little on a CPU and compiles slowly."""

_LOGGED: weakref.WeakSet[Any] = weakref.WeakSet()


def auto_jit_compile(model: Any, accelerators: bool | None = None) -> tuple[bool, str]:
    """XLA on or off for ``model`` under ``jit_compile="auto"`` (no strategy), and why.

    ``accelerators``: whether TensorFlow sees a GPU or a TPU (None: ask it).

    Examples:
        >>> import keras
        >>> dense = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        >>> auto_jit_compile(dense, accelerators=False)[0]
        True
        >>> attention = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)
        >>> inputs = keras.Input((8, 4))
        >>> model = keras.Model(inputs, attention(inputs, inputs))
        >>> jit, reason = auto_jit_compile(model, accelerators=False)
        >>> jit, reason.split(",")[0]
        (False, 'the model has attention layers (MultiHeadAttention)')
    """
    if accelerators is None:
        accelerators = bool(
            tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU")
        )
    if accelerators:
        return True, "TensorFlow sees a GPU or a TPU"
    if not isinstance(model, keras.Model):
        return True, "the model is not a Keras model (no layer XLA is known to be slow for)"
    layers = list(model._flatten_layers(include_self=False))
    slow = []
    convolutions = _names(layers, CONVOLUTIONS)
    if convolutions:
        slow.append(f"convolution layers ({convolutions}), much slower under XLA")
    random = _names([layer for layer in layers if draws_random_numbers(layer)], (object,))
    if random:
        slow.append(
            f"layers that draw random numbers ({random}), whose random numbers XLA generates "
            "about 100x slower"
        )
    attention = _names(layers, ATTENTION)
    if attention:
        slow.append(f"attention layers ({attention}), no faster under XLA and slow to compile")
    if slow:
        return False, f"the model has {'; '.join(slow)} on a CPU"
    return True, (
        "no layer of the model is one XLA is slow for on a CPU (convolution, random, attention)"
    )


def draws_random_numbers(layer: Any) -> bool:
    """Whether a layer draws random numbers in training: it owns a Keras seed generator and
    its rate (``rate``, ``dropout``, ``recurrent_dropout``), if it has one, is not zero."""
    if not getattr(layer, "_seed_generators", None):
        return False
    rates = [
        value
        for value in (
            getattr(layer, name, None) for name in ("rate", "dropout", "recurrent_dropout")
        )
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    ]
    return not rates or any(rate > 0 for rate in rates)


def _names(layers: list[Any], kinds: tuple[type, ...]) -> str:
    if not kinds:
        return ""
    return ", ".join(sorted({type(layer).__name__ for layer in layers if isinstance(layer, kinds)}))


def log_choice(model: Any, jit: bool, reason: str) -> None:
    """Logs the ``"auto"`` choice for ``model`` once (at INFO)."""
    try:
        if model in _LOGGED:
            return
        _LOGGED.add(model)
    except TypeError:  # not weakly referenceable: log every time
        pass
    if jit:
        logger.info(
            "tfloop: jit_compile='auto' compiles the steps with XLA: %s. Pass "
            "jit_compile=False to run the plain graph.",
            reason,
        )
    else:
        logger.info(
            "tfloop: jit_compile='auto' runs without XLA: %s. Pass jit_compile=True to use "
            "XLA anyway.",
            reason,
        )
