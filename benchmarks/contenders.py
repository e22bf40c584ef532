"""The contenders of BENCHMARKS.md.

A contender turns a ``Setup`` (workload, data, seed) and one configuration into an
``EpochFn``: a function that trains one more epoch on the contender's own model and returns
the epoch's mean loss. Contenders with several configurations are tuned by a search pass
(see ``suite.prepare``). The hand loops are written plainly here, without tfloop.

Keras and tfloop train the way a user runs them: one ``fit`` call for all epochs. That call runs
in a worker thread (``FitDriver``) whose epoch-end callback parks it until the suite asks for
the next epoch, so contenders still interleave epoch by epoch. An epoch's time runs from the
moment it is released to its epoch-end callback: everything between two epoch ends, with the
``fit`` call's own setup in the first epoch (the warm-up), as in a real multi-epoch run.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import queue
import threading
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
"""Trains one more epoch, returns its mean loss. It may have a ``traces()`` method: how many
times its compiled function was traced so far (None when unknown); see ``traces_of``."""
BatchShape = tuple[tuple[int, ...], ...]
"""The shapes of one batch's tensors, flattened."""


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
    """The workload's pipeline, shared; by default
    ``from_tensor_slices((x, y)).batch(B).cache().prefetch(AUTOTUNE)``."""
    probe: FirstStepProbe | None = None
    """Set only when measuring time to first step (it adds a batch hook to the Keras loops)."""

    def __post_init__(self) -> None:
        self.dataset = self.workload.pipeline(self.x, self.y, self.workload.batch_size)

    @property
    def num_batches(self) -> int:
        """Batches (= steps) per epoch: the pipeline's cardinality, or counted when unknown."""
        cardinality = int(self.dataset.cardinality())
        return cardinality if cardinality > 0 else sum(self.batch_shapes.values())

    @functools.cached_property
    def batch_shapes(self) -> collections.Counter[BatchShape]:
        """How many batches of each shape one epoch of the pipeline has (one pass over it)."""
        return collections.Counter(
            tuple(tuple(t.shape) for t in tf.nest.flatten(batch)) for batch in self.dataset
        )


@dataclass(frozen=True)
class Contender:
    """A named way of training: a builder and the configurations it is tuned over."""

    name: str
    build: Callable[[Setup, Config], EpochFn]
    configs: tuple[Config, ...] = ({},)
    flops_per_sample: Callable[[Workload], float] = Workload.train_flops_per_example


# --- One fit call, one epoch at a time --------------------------------------------------------

MANY_EPOCHS = 1_000_000
"""The ``epochs`` of a driven fit: it runs until the suite closes it."""

EpochEnd = Callable[[Any], bool]
"""Called by a fit's epoch-end callback with the epoch's logs; True asks the fit to stop."""


class FitDriver:
    """Runs one multi-epoch ``fit`` in a worker thread and hands it out one epoch per call.

    ``start_fit(epoch_end)`` runs the fit (``epochs=MANY_EPOCHS``) with a callback that calls
    ``epoch_end(logs)`` at every epoch end and stops training when it returns True. The driver
    is the contender's ``EpochFn``: calling it lets the fit run one more epoch and returns that
    epoch's loss. ``close()`` stops the fit and waits for its thread.
    """

    def __init__(self, start_fit: Callable[[EpochEnd], Any]) -> None:
        self._start_fit = start_fit
        self._go = threading.Semaphore(0)
        self._events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._closing = False
        self.traces: Callable[[], int | None] = lambda: None

    def __call__(self) -> float | None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="fit", daemon=True)
            self._thread.start()
        elif self._thread.is_alive():
            self._go.release()
        else:
            raise RuntimeError("the fit call has already ended")
        kind, value = self._events.get()
        if kind == "error":
            raise value
        if kind == "ended":
            raise RuntimeError("the fit call ended before the epoch did")
        return value  # type: ignore[no-any-return]

    def _epoch_end(self, logs: Any) -> bool:
        loss = (logs or {}).get("loss")
        self._events.put(("epoch", None if loss is None else float(loss)))
        self._go.acquire()
        return self._closing

    def _run(self) -> None:
        try:
            self._start_fit(self._epoch_end)
        except BaseException as error:  # handed to the caller of the epoch
            self._events.put(("error", error))
        else:
            self._events.put(("ended", None))

    def close(self) -> None:
        """Stop the fit at its current epoch end and wait for the thread."""
        if self._thread is not None and self._thread.is_alive():
            self._closing = True
            self._go.release()
            self._thread.join(timeout=120)


def close_epoch_fn(epoch: EpochFn) -> None:
    """Release what a contender's ``EpochFn`` holds (a driven fit's thread), if anything."""
    close = getattr(epoch, "close", None)
    if close is not None:
        close()


def traces_of(epoch: EpochFn) -> int | None:
    """How many times the contender's compiled train function was traced, if it says."""
    traces = getattr(epoch, "traces", None)
    return None if traces is None else traces()


def _with_traces(epoch: EpochFn, function: Any) -> EpochFn:
    """Give a hand loop's ``epoch`` a ``traces()`` method reading ``function``'s count."""
    epoch.traces = function.experimental_get_tracing_count  # type: ignore[attr-defined]
    return epoch


# --- Keras model.fit -------------------------------------------------------------------------


class _KerasEpochEnd(keras.callbacks.Callback):  # type: ignore[misc]
    def __init__(self, epoch_end: EpochEnd) -> None:
        super().__init__()
        self.epoch_end = epoch_end

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        if self.epoch_end(logs):
            self.model.stop_training = True


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
    """``model.fit(x, y, batch_size=B, epochs=...)`` on the NumPy arrays, nothing tuned; a
    workload without arrays (``lstm``) feeds its pipeline, as its users do."""
    if not setup.workload.arrays:
        return keras_on_dataset(setup, config)
    model = _keras_compiled(setup, config)
    callbacks = _keras_callbacks(setup.probe)

    def start_fit(epoch_end: EpochEnd) -> None:
        model.fit(
            setup.x,
            setup.y,
            batch_size=setup.workload.batch_size,
            epochs=MANY_EPOCHS,
            verbose=0,
            callbacks=[*callbacks, _KerasEpochEnd(epoch_end)],
        )

    return FitDriver(start_fit)


def keras_on_dataset(setup: Setup, config: Config) -> EpochFn:
    """``model.fit(dataset, epochs=...)`` on the shared cached pipeline, compiled with ``config``."""
    model = _keras_compiled(setup, config)
    callbacks = _keras_callbacks(setup.probe)

    def start_fit(epoch_end: EpochEnd) -> None:
        model.fit(
            setup.dataset,
            epochs=MANY_EPOCHS,
            verbose=0,
            shuffle=False,
            callbacks=[*callbacks, _KerasEpochEnd(epoch_end)],
        )

    return FitDriver(start_fit)


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


def hand_loop_step(setup: Setup, config: Config) -> EpochFn:
    """A Python loop over the pipeline calling one ``tf.function`` step per batch, no XLA.

    The step's ``input_signature`` is the pipeline's element spec (unknown batch and sequence
    length), so batches of every shape share one trace.
    """
    hand = HandTrainer(setup)
    step = tf.function(hand.step, input_signature=list(setup.dataset.element_spec))

    def epoch() -> float:
        hand.reset_metrics()
        for x, y in setup.dataset:
            step(x, y)
            hand.execution_done()
        return hand.mean_loss()

    return _with_traces(epoch, step)


def _batch_shape_key(x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
    """An int64 key that differs between batches whose ``x`` shapes differ (dims < 2**16)."""
    shape = tf.shape(x, out_type=tf.int64)
    key = tf.constant(0, tf.int64)
    for axis in range(x.shape.rank):
        key = key * 65_536 + shape[axis]
    return key


def superbatches(setup: Setup, k: int) -> tf.data.Dataset:
    """``pipeline.batch(K)``: K batches stacked into one ``[K, B, ...]`` element.

    ``tf.data`` cannot stack batches of different shapes (``batch(K)`` fails with "Cannot
    batch tensors with different shapes"). Where only the last batch is partial (``mlp-ds``),
    the hand writer knows where it is: the full batches are stacked with ``take(n).batch(K)``
    and the partial one comes after, on its own (``skip(n)``). Where shapes interleave
    (``text``'s buckets), batches are first grouped by shape with ``group_by_window`` and each
    group is stacked K at a time; a group's last superbatch may be shorter. That changes the
    order of the batches (each shape's batches come together), not which batches an epoch
    trains on.
    """
    if not setup.workload.mixed_shapes:
        return setup.dataset.batch(k).prefetch(tf.data.AUTOTUNE)
    if setup.workload.remainder:
        full = setup.num_batches - 1
        head = setup.dataset.take(full).batch(k)
        tail = setup.dataset.skip(full).batch(k)
        return head.concatenate(tail).prefetch(tf.data.AUTOTUNE)
    grouped = setup.dataset.group_by_window(
        _batch_shape_key, lambda _, batches: batches.batch(k), window_size=k
    )
    return grouped.prefetch(tf.data.AUTOTUNE)


def hand_loop(setup: Setup, config: Config) -> EpochFn:
    """Superbatches of K batches per iterator call; all K steps in one XLA ``tf.while_loop``.

    ``xs[i]`` has the static shape of one batch. (Slicing a flat superbatch of K·B rows with
    ``xs[i * B:(i + 1) * B]`` gives XLA a dynamic shape padded to the whole superbatch, and the
    loop runs about K times slower; ``tf.slice`` with a static size does not have that problem.)
    One XLA compilation per distinct superbatch shape.
    """
    hand = HandTrainer(setup)
    stacked = superbatches(setup, config["K"])

    def superbatch_steps(xs: tf.Tensor, ys: tf.Tensor) -> None:
        for i in tf.range(tf.shape(xs)[0]):
            hand.step(xs[i], ys[i])

    run_superbatch = tf.function(superbatch_steps, jit_compile=True)
    background_release = bool(config.get("background_release"))

    def epoch() -> float:
        hand.reset_metrics()
        iterator = iter(stacked)
        for xs, ys in iterator:
            run_superbatch(xs, ys)
            hand.execution_done()
        if background_release:
            # Release the exhausted iterator on another thread, as tfloop does: released
            # here it can hold the loop until tf.data's autotuning thread wakes up.
            holder = [iterator]
            del iterator
            _RELEASER.submit(holder.clear)
        return hand.mean_loss()

    return _with_traces(epoch, run_superbatch)


_RELEASER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="release")


# --- tfloop ----------------------------------------------------------------------------------


def _tfloop_probe_callback(probe: FirstStepProbe) -> Any:
    """A tfloop callback that reports each execution's end to ``probe``."""
    import tfloop

    class FirstStep(tfloop.Callback):
        def on_train_batch_end(self, batch: int, logs: Any) -> None:
            probe.mark()

    return FirstStep()


def _tfloop_epoch_end_callback(epoch_end: EpochEnd) -> Any:
    """A tfloop callback that reports each epoch end to a ``FitDriver``."""
    import tfloop

    class EpochEndCallback(tfloop.Callback):
        def on_epoch_end(self, epoch: int, logs: Any) -> None:
            if epoch_end(logs) and self.trainer is not None:
                self.trainer.stop_training = True

    return EpochEndCallback()


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


def _tfloop_traces(trainer: Any) -> int | None:
    """Traces of tfloop's compiled train loop so far (``trainer.tracing_count("train")``, or
    ``trainer._loop("train").tracing_count`` in older versions); None when neither exists."""
    count = getattr(trainer, "tracing_count", None)
    if callable(count):
        count = count("train")
    if count is None:
        loop = getattr(trainer, "_loop", None)
        try:
            count = getattr(loop("train"), "tracing_count", None) if callable(loop) else None
        except Exception:
            return None
    return count if isinstance(count, int) else None


def _tfloop_driven(trainer: Any, data: Any, **fit_options: Any) -> EpochFn:
    """``trainer.fit(data, epochs=...)`` run by a ``FitDriver``."""

    def start_fit(epoch_end: EpochEnd) -> None:
        trainer.callbacks.append(_tfloop_epoch_end_callback(epoch_end))
        trainer.fit(data, epochs=MANY_EPOCHS, verbose=0, **fit_options)

    driver = FitDriver(start_fit)
    driver.traces = lambda: _tfloop_traces(trainer)
    return driver


def _tfloop_on_arrays(setup: Setup, config: Config, accumulate_steps: int) -> EpochFn:
    trainer = _tfloop_trainer(setup, config, accumulate_steps)
    return _tfloop_driven(trainer, (setup.x, setup.y), batch_size=setup.workload.batch_size)


def tfloop_default(setup: Setup, config: Config) -> EpochFn:
    """``Trainer(...).fit((x, y), batch_size=B)`` on the NumPy arrays, or ``fit(dataset)`` on
    the workload's pipeline when it is defined by one; ``config`` tunes it."""
    if setup.workload.tfloop_on_pipeline:
        return tfloop_default_ds(setup, config)
    return _tfloop_on_arrays(setup, config, setup.workload.accumulate_steps)


def tfloop_checkpoint(setup: Setup, config: Config) -> EpochFn:
    """tfloop-default with a checkpoint every 100 updates (the checkpoint-overhead figure)."""
    import tempfile

    import tfloop

    directory = tempfile.mkdtemp(prefix="tfloop-bench-")
    # restore=None: a new contender (a search candidate, a --rss child) starts fresh.
    checkpointer = tfloop.Checkpointer(
        directory, every_n_steps=100, every_epoch=False, restore=None
    )
    return _tfloop_on_arrays(setup, {**config, "checkpoint": checkpointer}, accumulate_steps=1)


VALIDATION_EVERY = 1_000
VALIDATION_SAMPLES = 1_024


def tfloop_validate(setup: Setup, config: Config) -> EpochFn:
    """tfloop-default validating every 1,000 updates (``validation_every_n_steps``) on a
    held-out slice of 32 batches. Its epoch time leaves out the validation passes themselves
    (from ``on_eval_start`` to ``on_eval_end``, reported as ``excluded_seconds``): the figure
    is the speed of the train steps between validations, cut executions included."""
    import tfloop

    class ValidationTime(tfloop.Callback):
        def __init__(self) -> None:
            self.total = 0.0
            self._start = 0.0

        def on_eval_start(self, logs: Any) -> None:
            self._start = time.perf_counter()

        def on_eval_end(self, logs: Any) -> None:
            self.total += time.perf_counter() - self._start

    timer = ValidationTime()
    trainer = _tfloop_trainer(setup, config, accumulate_steps=1)
    trainer.callbacks.append(timer)
    held_out = (setup.x[:VALIDATION_SAMPLES], setup.y[:VALIDATION_SAMPLES])
    driver = _tfloop_driven(
        trainer,
        (setup.x, setup.y),
        batch_size=setup.workload.batch_size,
        validation_data=held_out,
        validation_freq=MANY_EPOCHS,  # no epoch-end validation: only the one every 1,000
        validation_every_n_steps=VALIDATION_EVERY,
    )

    def excluded_seconds() -> float:
        total, timer.total = timer.total, 0.0
        return total

    driver.excluded_seconds = excluded_seconds  # type: ignore[attr-defined]
    return driver


def tfloop_noaccum(setup: Setup, config: Config) -> EpochFn:
    """tfloop-default without gradient accumulation (the mlp-accum baseline)."""
    return _tfloop_on_arrays(setup, config, accumulate_steps=1)


def tfloop_default_ds(setup: Setup, config: Config) -> EpochFn:
    """``Trainer(...).fit(dataset)`` on the workload's shared tf.data pipeline."""
    trainer = _tfloop_trainer(setup, config, setup.workload.accumulate_steps)
    return _tfloop_driven(trainer, setup.dataset)


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
# jit_compile="auto": XLA where it helps (it turns XLA off for convolutions on a CPU, where XLA
# runs them ~50x slower; forcing it would make the cnn search take hours).
TFLOOP_SEARCH: tuple[Config, ...] = tuple(
    {"steps_per_execution": k, "jit_compile": "auto"} for k in (16, 64, 128, 256, 1024)
)

CONTENDERS: dict[str, Contender] = {
    c.name: c
    for c in (
        Contender("keras-default", keras_default),
        Contender("keras-tuned", keras_on_dataset, KERAS_SEARCH),
        Contender("keras-accum", keras_on_dataset, KERAS_SEARCH),
        Contender("hand-loop-iter", hand_loop_iter),
        Contender("hand-loop-step", hand_loop_step),
        Contender("hand-loop-K64", hand_loop, ({"K": 64},)),
        Contender("hand-loop-K256", hand_loop, ({"K": 256},)),
        Contender("hand-loop-K128-bg", hand_loop, ({"K": 128, "background_release": True},)),
        Contender("tfloop-default", tfloop_default),
        Contender("tfloop-noaccum", tfloop_noaccum),
        Contender("tfloop-ckpt100", tfloop_checkpoint),
        Contender("tfloop-val1000", tfloop_validate),
        Contender("tfloop-default-ds", tfloop_default_ds),
        Contender("tfloop-best", tfloop_default, TFLOOP_SEARCH),
        Contender("tfloop-xla", tfloop_default, ({"jit_compile": True},)),
        Contender("tfloop-noxla", tfloop_default, ({"jit_compile": False},)),
        Contender(PEAK, matmul_peak, flops_per_sample=_peak_flops_per_sample),
    )
}
"""keras-accum is keras-tuned on a workload with ``accumulate_steps`` > 1."""

ALIASES: dict[str, tuple[str, ...]] = {"hand-loop": ("hand-loop-K64", "hand-loop-K256")}
"""Figures name "hand-loop": the faster (by median) of these contenders in the same run."""
