"""A compiled multi-input, multi-output Keras model: tfloop against Keras ``fit``, same run.

The Keras functional API guide's ticket model (three inputs, two outputs, a loss dict,
``loss_weights``, per-output metrics), compiled once by the user and handed to
``tfloop.Trainer(model)`` as it is. Contenders, interleaved epoch by epoch in one process
(BENCHMARKS.md protocol): ``keras-tuned`` (the fastest of ``steps_per_execution`` in
{1, 16, 64} x ``jit_compile`` in {False, True}, fed the same cached ``tf.data`` pipeline) and
``tfloop-default`` (``Trainer(model).fit(x, y, ...)`` on the arrays). Prints samples/s and the
ratio per round with its median, min and max.

    python benchmarks/multi_output.py [--reps 5] [--samples 40000] [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf

import tfloop

BATCH = 64


def build(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    title = keras.Input((12,), name="title", dtype="int32")
    body = keras.Input((48,), name="body", dtype="int32")
    tags = keras.Input((12,), name="tags")
    embed = keras.layers.Embedding(2000, 32)
    pooled = keras.layers.GlobalAveragePooling1D()
    features = keras.layers.concatenate([pooled(embed(title)), pooled(embed(body)), tags])
    hidden = keras.layers.Dense(64, activation="relu")(features)
    priority = keras.layers.Dense(1, name="priority")(hidden)
    department = keras.layers.Dense(4, name="department")(hidden)
    model = keras.Model(
        {"title": title, "body": body, "tags": tags},
        {"priority": priority, "department": department},
    )
    return model


def compile_options() -> dict[str, Any]:
    return {
        "optimizer": "adam",
        "loss": {
            "priority": keras.losses.BinaryCrossentropy(from_logits=True),
            "department": keras.losses.CategoricalCrossentropy(from_logits=True),
        },
        "loss_weights": {"priority": 1.0, "department": 0.2},
        "metrics": {"priority": ["mae"], "department": ["accuracy"]},
    }


def data(n: int, seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    x = {
        "title": rng.integers(0, 2000, (n, 12)).astype("int32"),
        "body": rng.integers(0, 2000, (n, 48)).astype("int32"),
        "tags": rng.integers(0, 2, (n, 12)).astype("float32"),
    }
    y = {
        "priority": rng.random((n, 1)).astype("float32"),
        "department": keras.utils.to_categorical(rng.integers(0, 4, n), 4).astype("float32"),
    }
    return x, y


class Driver:
    """Runs one multi-epoch ``fit`` in a thread, parked at each epoch end until released."""

    def __init__(self, start_fit: Any) -> None:
        self._go = threading.Semaphore(0)
        self._done = threading.Semaphore(0)
        self._clock = 0.0
        self._thread = threading.Thread(target=start_fit, args=(self._epoch_end,), daemon=True)
        self._thread.start()

    def _epoch_end(self) -> None:
        self._done.release()
        self._go.acquire()

    def first(self) -> float:
        start = time.perf_counter()
        self._done.acquire()
        return time.perf_counter() - start

    def epoch(self) -> float:
        start = time.perf_counter()
        self._go.release()
        self._done.acquire()
        return time.perf_counter() - start


def keras_driver(x: Any, y: Any, epochs: int, spe: int, jit: bool) -> Driver:
    model = build()
    model.compile(steps_per_execution=spe, jit_compile=jit, **compile_options())
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH).cache().prefetch(-1)

    class End(keras.callbacks.Callback):
        def __init__(self, end: Any) -> None:
            super().__init__()
            self.end = end

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            self.end()

    return Driver(lambda end: model.fit(dataset, epochs=epochs, verbose=0, callbacks=[End(end)]))


def tfloop_driver(x: Any, y: Any, epochs: int) -> Driver:
    model = build()
    model.compile(**compile_options())  # the user's compiled model, as it is

    class End(tfloop.Callback):
        def __init__(self, end: Any) -> None:
            self.end = end

        def on_epoch_end(self, epoch: int, logs: Any) -> None:
            self.end()

    def start(end: Any) -> None:
        trainer = tfloop.Trainer(model, callbacks=[End(end)])
        trainer.fit(x, y, batch_size=BATCH, epochs=epochs, verbose=0)

    return Driver(start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--samples", type=int, default=40_000)
    parser.add_argument("--quick", action="store_true", help="a smoke run; measures nothing")
    args = parser.parse_args()
    reps, samples = (1, 1_024) if args.quick else (args.reps, args.samples)
    samples -= samples % BATCH
    x, y = data(samples)
    epochs = reps + 3
    best, best_rate = None, 0.0
    configs = [(1, False)] if args.quick else [(s, j) for s in (1, 16, 64) for j in (False, True)]
    for spe, jit in configs:  # the search pass: the fastest Keras configuration goes on
        driver = keras_driver(x, y, epochs, spe, jit)
        driver.first()
        rate = samples / min(driver.epoch(), driver.epoch())
        print(f"keras spe={spe} jit={jit}: {rate:,.0f} samples/s")
        if rate > best_rate:
            best, best_rate = (driver, spe, jit), rate
    assert best is not None
    keras_tuned, spe, jit = best
    tfloop_default = tfloop_driver(x, y, epochs)
    print(f"tfloop warm-up {tfloop_default.first():.2f} s")
    ratios = []
    for rep in range(reps):
        order = [("keras", keras_tuned), ("tfloop", tfloop_default)]
        if rep % 2:
            order.reverse()
        rates = {name: samples / driver.epoch() for name, driver in order}
        ratios.append(rates["tfloop"] / rates["keras"])
        print(
            f"rep {rep + 1}: keras-tuned (spe={spe}, jit={jit}) {rates['keras']:,.0f}, "
            f"tfloop-default {rates['tfloop']:,.0f} samples/s, ratio {ratios[-1]:.2f}"
        )
    print(
        f"tfloop-default / keras-tuned: median {statistics.median(ratios):.2f} "
        f"[{min(ratios):.2f}, {max(ratios):.2f}] over {reps} interleaved rounds"
    )


if __name__ == "__main__":
    main()
