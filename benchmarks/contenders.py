"""The contenders of BENCHMARKS.md.

A contender turns a ``Setup`` (workload, data, seed) and one configuration into an
``EpochFn``: a function that trains one more epoch on the contender's own model and returns
the epoch's mean loss. Contenders with several configurations are tuned by a search pass
(see ``suite.prepare``). The hand loops are written plainly here, without tfloop.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from workloads import PEAK, Workload

Config = dict[str, Any]
EpochFn = Callable[[], float | None]


class FirstStepProbe:
    """Records when the first compiled execution of a contender finishes."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.first_step: float | None = None

    def begin(self) -> None:
        """Start the clock (just before the first epoch)."""
        self.start = time.perf_counter()

    def mark(self) -> None:
        """Note that an execution finished; only the first one counts."""
        if self.first_step is None:
            self.first_step = time.perf_counter()

    @property
    def seconds(self) -> float | None:
        """Time from ``begin`` to the first finished execution, if both happened."""
        if self.start is None or self.first_step is None:
            return None
        return self.first_step - self.start


@dataclass
class Setup:
    """Everything a contender is built from; the same for every contender of a run."""

    workload: Workload
    x: np.ndarray
    y: np.ndarray
    seed: int
    dataset: tf.data.Dataset = field(init=False)
    """``from_tensor_slices((x, y)).batch(B).cache().prefetch(AUTOTUNE)``, shared."""
    probe: FirstStepProbe | None = None
    """Set only when measuring time to first step (it adds a batch hook to the Keras loops)."""

    def __post_init__(self) -> None:
        self.dataset = (
            tf.data.Dataset.from_tensor_slices((self.x, self.y))
            .batch(self.workload.batch_size)
            .cache()
            .prefetch(tf.data.AUTOTUNE)
        )

    @property
    def num_batches(self) -> int:
        """Batches (= steps) per epoch; the workloads use no partial batch."""
        return len(self.x) // self.workload.batch_size


@dataclass(frozen=True)
class Contender:
    """A named way of training: a builder and the configurations it is tuned over."""

    name: str
    build: Callable[[Setup, Config], EpochFn]
    configs: tuple[Config, ...] = ({},)
    flops_per_sample: Callable[[Workload], float] = Workload.train_flops_per_example


def _final_loss(history: Any) -> float | None:
    """The last epoch's loss of a Keras or tfloop History, if it has one."""
    losses = getattr(history, "history", {}).get("loss")
    return float(losses[-1]) if losses else None


# --- Keras model.fit -------------------------------------------------------------------------


def _keras_callbacks(probe: FirstStepProbe | None) -> list[keras.callbacks.Callback]:
    if probe is None:
        return []
    return [keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: probe.mark())]


def _keras_optimizer(workload: Workload) -> str | keras.optimizers.Optimizer:
    """The workload's optimizer; with Keras's own gradient accumulation when it asks for it."""
    if workload.accumulate_steps == 1:
        return workload.optimizer
    optimizer_class = type(keras.optimizers.get(workload.optimizer))
    return optimizer_class(gradient_accumulation_steps=workload.accumulate_steps)


def _keras_compiled(setup: Setup, config: Config) -> keras.Model:
    workload = setup.workload
    model = workload.build_model(setup.seed)
    model.compile(
        optimizer=_keras_optimizer(workload),
        loss=workload.loss,
        metrics=list(workload.metrics),
        **config,
    )
    return model


def keras_default(setup: Setup, config: Config) -> EpochFn:
    """``model.fit(x, y, batch_size=B)`` on the NumPy arrays, nothing tuned."""
    model = _keras_compiled(setup, config)
    callbacks = _keras_callbacks(setup.probe)

    def epoch() -> float | None:
        history = model.fit(
            setup.x,
            setup.y,
            batch_size=setup.workload.batch_size,
            epochs=1,
            verbose=0,
            callbacks=callbacks,
        )
        return _final_loss(history)

    return epoch


def keras_on_dataset(setup: Setup, config: Config) -> EpochFn:
    """``model.fit`` on the shared cached tf.data pipeline, compiled with ``config``."""
    model = _keras_compiled(setup, config)
    callbacks = _keras_callbacks(setup.probe)

    def epoch() -> float | None:
        history = model.fit(setup.dataset, epochs=1, verbose=0, shuffle=False, callbacks=callbacks)
        return _final_loss(history)

    return epoch


# --- Hand-written loops ----------------------------------------------------------------------


class HandTrainer:
    """Model, optimizer, loss and metrics of a hand-written loop, and its plain train step."""

    def __init__(self, setup: Setup) -> None:
        workload = setup.workload
        self.model = workload.build_model(setup.seed)
        self.optimizer = keras.optimizers.get(workload.optimizer)
        self.optimizer.build(self.model.trainable_variables)
        self.loss_fn = keras.losses.get(workload.loss)
        self.loss_mean = keras.metrics.Mean()
        self.metrics = [keras.metrics.get(name) for name in workload.hand_metrics]
        self.probe = setup.probe

    def step(self, x: tf.Tensor, y: tf.Tensor) -> None:
        """One optimizer update on the batch (x, y), metrics included."""
        variables = self.model.trainable_variables
        with tf.GradientTape() as tape:
            predictions = self.model(x, training=True)
            loss = tf.reduce_mean(self.loss_fn(y, predictions))
        gradients = tape.gradient(loss, variables)
        self.optimizer.apply_gradients(zip(gradients, variables, strict=True))
        self.loss_mean.update_state(loss)
        for metric in self.metrics:
            metric.update_state(y, predictions)

    def reset_metrics(self) -> None:
        """Start a new epoch's metrics."""
        for metric in (self.loss_mean, *self.metrics):
            metric.reset_state()

    def mean_loss(self) -> float:
        """The epoch's mean loss so far (waits for pending work)."""
        return float(self.loss_mean.result())

    def execution_done(self) -> None:
        """Tell the probe, if any, that a compiled execution finished."""
        if self.probe is not None and self.probe.first_step is None:
            self.mean_loss()
            self.probe.mark()


def hand_loop_iter(setup: Setup, config: Config) -> EpochFn:
    """One tf.function per epoch that calls ``next(iterator)`` each step; the step uses XLA."""
    hand = HandTrainer(setup)
    step = tf.function(hand.step, jit_compile=True)
    num_steps = setup.num_batches

    def epoch_steps(iterator: tf.data.Iterator) -> None:
        for _ in tf.range(num_steps):
            x, y = next(iterator)
            step(x, y)

    run_epoch = tf.function(epoch_steps)

    def epoch() -> float:
        hand.reset_metrics()
        run_epoch(iter(setup.dataset))
        hand.execution_done()
        return hand.mean_loss()

    return epoch


def hand_loop(setup: Setup, config: Config) -> EpochFn:
    """Superbatches of K batches per iterator call; all K steps in one XLA ``tf.while_loop``.

    ``xs[i]`` has the static shape of one batch. (Slicing a flat superbatch of K·B rows with
    ``xs[i * B:(i + 1) * B]`` gives XLA a dynamic shape padded to the whole superbatch, and the
    loop runs about K times slower; ``tf.slice`` with a static size does not have that problem.)
    """
    hand = HandTrainer(setup)
    superbatches = setup.dataset.batch(config["K"]).prefetch(tf.data.AUTOTUNE)

    def superbatch_steps(xs: tf.Tensor, ys: tf.Tensor) -> None:
        for i in tf.range(tf.shape(xs)[0]):
            hand.step(xs[i], ys[i])

    run_superbatch = tf.function(superbatch_steps, jit_compile=True)

    def epoch() -> float:
        hand.reset_metrics()
        for xs, ys in superbatches:
            run_superbatch(xs, ys)
            hand.execution_done()
        return hand.mean_loss()

    return epoch


# --- tfloop ----------------------------------------------------------------------------------


def _tfloop_probe_callback(probe: FirstStepProbe) -> Any:
    """A tfloop callback that reports each execution's end to ``probe``."""
    import tfloop

    class FirstStep(tfloop.Callback):
        def on_train_batch_end(self, batch: int, logs: Any) -> None:
            probe.mark()

    return FirstStep()


def _tfloop_trainer(setup: Setup, config: Config, accumulate_steps: int) -> Any:
    """A ``tfloop.Trainer`` with the workload's model, optimizer, loss and metrics."""
    import tfloop

    workload = setup.workload
    options = dict(config)
    if accumulate_steps != 1:
        options["accumulate_steps"] = accumulate_steps
    if setup.probe is not None:
        options["callbacks"] = [_tfloop_probe_callback(setup.probe)]
    model = workload.build_model(setup.seed)
    return tfloop.Trainer(
        model, workload.optimizer, workload.loss, list(workload.metrics), **options
    )


def _tfloop_on_arrays(setup: Setup, config: Config, accumulate_steps: int) -> EpochFn:
    trainer = _tfloop_trainer(setup, config, accumulate_steps)

    def epoch() -> float | None:
        history = trainer.fit(
            (setup.x, setup.y), epochs=1, batch_size=setup.workload.batch_size, verbose=0
        )
        return _final_loss(history)

    return epoch


def tfloop_default(setup: Setup, config: Config) -> EpochFn:
    """``Trainer(...).fit((x, y), batch_size=B)`` on the NumPy arrays; ``config`` tunes it."""
    return _tfloop_on_arrays(setup, config, setup.workload.accumulate_steps)


def tfloop_checkpoint(setup: Setup, config: Config) -> EpochFn:
    """tfloop-default with a checkpoint every 100 updates (the checkpoint-overhead figure)."""
    import tempfile

    import tfloop

    directory = tempfile.mkdtemp(prefix="tfloop-bench-")
    # restore=None: each timed epoch is a fresh fit call and must not resume from the last one.
    checkpointer = tfloop.Checkpointer(
        directory, every_n_steps=100, every_epoch=False, restore=None
    )
    return _tfloop_on_arrays(setup, {**config, "checkpoint": checkpointer}, accumulate_steps=1)


def tfloop_noaccum(setup: Setup, config: Config) -> EpochFn:
    """tfloop-default without gradient accumulation (the mlp-accum baseline)."""
    return _tfloop_on_arrays(setup, config, accumulate_steps=1)


def tfloop_default_ds(setup: Setup, config: Config) -> EpochFn:
    """``Trainer(...).fit(dataset)`` on the shared cached tf.data pipeline."""
    trainer = _tfloop_trainer(setup, config, setup.workload.accumulate_steps)

    def epoch() -> float | None:
        return _final_loss(trainer.fit(setup.dataset, epochs=1, verbose=0))

    return epoch


# --- Matmul peak -----------------------------------------------------------------------------

_PEAK_POOL = 16
"""Distinct left operands the peak loop cycles through (kept small: a compute peak)."""


def _peak_passes(workload: Workload) -> int:
    """Matmuls per sample, chosen so a peak "epoch" does about a training epoch's FLOPs."""
    assert workload.peak_matmul is not None
    _, k, n = workload.peak_matmul
    return max(1, round(workload.train_flops_per_example() / (2 * k * n)))


def _peak_flops_per_sample(workload: Workload) -> float:
    assert workload.peak_matmul is not None
    _, k, n = workload.peak_matmul
    return 2.0 * k * n * _peak_passes(workload)


def matmul_peak(setup: Setup, config: Config) -> EpochFn:
    """An XLA ``while_loop`` of [m, k] x [k, n] matmuls: the same-run FLOP/s ceiling."""
    workload = setup.workload
    assert workload.peak_matmul is not None
    m, k, n = workload.peak_matmul
    rng = np.random.default_rng(setup.seed)
    lhs = tf.constant(rng.random((_PEAK_POOL, m, k), dtype=np.float32))
    rhs = tf.constant(rng.random((k, n), dtype=np.float32))
    num_matmuls = tf.constant(len(setup.x) // m * _peak_passes(workload))

    def matmuls(count: tf.Tensor) -> tf.Tensor:
        # An explicit while_loop: this file may be run where autograph does not convert it.
        def body(i: tf.Tensor, total: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            return i + 1, total + tf.matmul(lhs[i % _PEAK_POOL], rhs)

        _, total = tf.while_loop(
            lambda i, _: i < count, body, (tf.constant(0, count.dtype), tf.zeros((m, n)))
        )
        return total

    run = tf.function(matmuls, jit_compile=True)

    def epoch() -> None:
        run(num_matmuls).numpy()

    return epoch


# --- Registry --------------------------------------------------------------------------------

KERAS_SEARCH: tuple[Config, ...] = tuple(
    {"steps_per_execution": k, "jit_compile": jit}
    for k in (1, 16, 64, 256)
    for jit in (False, True)
)
TFLOOP_SEARCH: tuple[Config, ...] = tuple(
    {"steps_per_execution": k, "jit_compile": True} for k in (16, 64, 128, 256)
)

CONTENDERS: dict[str, Contender] = {
    c.name: c
    for c in (
        Contender("keras-default", keras_default),
        Contender("keras-tuned", keras_on_dataset, KERAS_SEARCH),
        Contender("keras-accum", keras_on_dataset, KERAS_SEARCH),
        Contender("hand-loop-iter", hand_loop_iter),
        Contender("hand-loop-K64", hand_loop, ({"K": 64},)),
        Contender("hand-loop-K256", hand_loop, ({"K": 256},)),
        Contender("tfloop-default", tfloop_default),
        Contender("tfloop-noaccum", tfloop_noaccum),
        Contender("tfloop-ckpt100", tfloop_checkpoint),
        Contender("tfloop-default-ds", tfloop_default_ds),
        Contender("tfloop-best", tfloop_default, TFLOOP_SEARCH),
        Contender(PEAK, matmul_peak, flops_per_sample=_peak_flops_per_sample),
    )
}
"""keras-accum is keras-tuned on a workload with ``accumulate_steps`` > 1."""

ALIASES: dict[str, tuple[str, ...]] = {"hand-loop": ("hand-loop-K64", "hand-loop-K256")}
"""Figures name "hand-loop": the faster (by median) of these contenders in the same run."""
