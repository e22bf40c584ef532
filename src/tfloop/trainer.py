"""The Trainer: ``fit`` / ``evaluate`` / ``predict`` and the step methods a subclass overrides.

Read top to bottom, this is the story of a step: ``train_step`` records ``compute_loss`` on a
tape and hands the gradients to ``apply_gradients``, which applies them at once or accumulates
them for ``accumulate_steps`` micro-batches. ``fit`` validates everything on the host first, then
feeds the compiled loop (``_loops.py``) superbatches of ``steps_per_execution`` batches
(``data.py``), so one Python call and one iterator call run many steps.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import keras
import numpy as np
import tensorflow as tf

from tfloop import _distribute
from tfloop import data as data_lib
from tfloop._autograph import user_code
from tfloop._config import (
    _resolve_checkpoint,
    _resolve_loss,
    _resolve_metric,
    _resolve_optimizer,
    _validate_callbacks,
    _validate_clip,
    _validate_count,
    _validate_jit_compile,
    _validate_metric_specs,
    _validate_steps_per_execution,
)
from tfloop._fit_loop import FitLoop, FitPlan
from tfloop._loops import CompiledLoop
from tfloop.accumulate import GradientAccumulator, _validate_steps, clip_gradients
from tfloop.callbacks import Callback, CallbackList, History, ProgressBar
from tfloop.errors import ConfigError, DataError, _first_line

__all__ = ["Trainer"]

logger = logging.getLogger("tfloop")

Nested = Any
# Superbatches are kept under this size; with the default batch of 32 MNIST-sized examples the
# cap allows far more than the chosen number of steps, so it only binds for large inputs.
SUPERBATCH_MEMORY_CAP = 64 * 2**20
AUTO_STEPS_PER_EXECUTION = 64
# Small batches make steps so cheap that the host's ~0.5 ms per execution counts: "auto" doubles
# K from 64 up to AUTO_STEPS_MAX while the superbatch stays under SMALL_SUPERBATCH. The linear
# workload (batch 4) ran ~11x faster at 1024 than at 64, the mlp (batch 32 x 784) 5% faster at
# 128; a larger superbatch costs memory (and cache) for little more.
SMALL_SUPERBATCH = 16 * 2**20
AUTO_STEPS_MAX = 1024


class Trainer:
    """Trains a Keras model (or a ``tf.Module``) with a compiled, fused multi-step loop.

    Args:
        model: a ``keras.Model``, or any ``tf.Module`` owning ``tf.Variable`` s (then override
            ``compute_loss``).
        optimizer: a Keras optimizer or its name (``"adam"``, ``"sgd"``, ...).
        loss: a Keras loss, its name, or ``callable(y_true, y_pred)`` returning per-example or
            mean losses. Not needed when ``compute_loss`` is overridden.
        metrics: Keras metrics or their names (``"accuracy"`` picks the right accuracy for the
            loss and label shapes, as in Keras).
        accumulate_steps: micro-batches per optimizer update; the update is the exact mean
            gradient of the window, weighted by example count (see ``GradientAccumulator``).
        drop_remainder: with ``accumulate_steps > 1``, discard the partial last window of each
            epoch (fewer than ``accumulate_steps`` micro-batches) instead of applying it with
            its own total. Its examples still count in the epoch's loss and metrics.
        steps_per_execution: batches run per compiled call; ``"auto"`` picks a fast value from
            the steps per epoch and the size of a batch (64, up to 1024 for small batches).
        jit_compile: XLA on (``True``), off (``False``), or ``"auto"``: on, falling back to the
            plain graph with a logged reason if XLA cannot compile the step.
        clip_global_norm: clip the (accumulated) gradient to this global norm before applying.
        callbacks: ``tfloop.Callback`` s.
        checkpoint: a directory (checkpoints every epoch, resume from the latest) or a
            ``tfloop.Checkpointer``; ``None`` saves nothing.
        strategy: a ``tf.distribute.Strategy`` (``MirroredStrategy``,
            ``MultiWorkerMirroredStrategy``, ``TPUStrategy``, ...). Create the model (and an
            optimizer instance, if you pass one) inside ``strategy.scope()``. Batches are
            *global*: each step's batch is split across the replicas. ``None`` runs on the
            default device.
        seed: makes shuffling, dropout and the initialisation of an unbuilt model reproducible.

    Examples:
        >>> import numpy as np, keras, tfloop
        >>> x = np.random.default_rng(0).normal(size=(256, 4)).astype("float32")
        >>> y = x @ np.array([[1.0], [-2.0], [0.5], [3.0]], dtype="float32")
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        >>> trainer = tfloop.Trainer(model, keras.optimizers.SGD(0.1), "mse", seed=0)
        >>> history = trainer.fit((x, y), epochs=20, verbose=0)
        >>> history.history["loss"][-1] < 1e-3
        True
    """

    def __init__(
        self,
        model: Any,
        optimizer: str | keras.optimizers.Optimizer = "adam",
        loss: Any = None,
        metrics: Sequence[Any] = (),
        *,
        accumulate_steps: int = 1,
        drop_remainder: bool = False,
        steps_per_execution: int | Literal["auto"] = "auto",
        jit_compile: bool | Literal["auto"] = "auto",
        clip_global_norm: float | None = None,
        callbacks: Iterable[Callback] = (),
        checkpoint: Any = None,
        strategy: tf.distribute.Strategy | None = None,
        seed: int | None = None,
    ) -> None:
        if not hasattr(model, "trainable_variables"):
            raise ConfigError(
                f"model must be a keras.Model or a tf.Module owning tf.Variables, got "
                f"{type(model).__name__}."
            )
        self.strategy = _distribute.validate(strategy)
        self.model = model
        with self._scope():
            self.optimizer = _resolve_optimizer(optimizer)
        if self.strategy is not None:
            _distribute.check_created_in_scope(self.strategy, model, self.optimizer)
        self.loss = _resolve_loss(loss)
        self._metric_specs = _validate_metric_specs(metrics)
        self.accumulate_steps = _validate_steps(accumulate_steps, "accumulate_steps")
        if not isinstance(drop_remainder, bool):
            raise ConfigError(f"drop_remainder must be True or False, got {drop_remainder!r}.")
        self.drop_remainder = drop_remainder
        self.steps_per_execution = _validate_steps_per_execution(steps_per_execution)
        self.jit_compile = _validate_jit_compile(jit_compile)
        self.clip_global_norm = _validate_clip(clip_global_norm)
        self.callbacks = _validate_callbacks(callbacks)
        self.checkpoint = _resolve_checkpoint(checkpoint)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ConfigError(f"seed must be an int or None, got {seed!r}.")
        self.seed = seed
        self._data_seed = seed if seed is not None else random.SystemRandom().randrange(2**31)

        self.stop_training = False
        self.preempted = False  # set by fit when a preemption signal made it save and return
        with self._scope():
            self.loss_tracker = keras.metrics.Mean(name="loss")
            self.compiled_metrics: list[keras.metrics.Metric] = []
            self._accumulator: GradientAccumulator | None = None
            # What to do with NaN/Inf gradients: "ignore" (apply them), "skip" or "raise" (drop
            # the update in-graph; NonFiniteGuard raises on the host). Read when tracing.
            self.non_finite: Literal["ignore", "skip", "raise"] = "ignore"
            self._non_finite_steps = tf.Variable(
                tf.constant(0, tf.int64), trainable=False, name="non_finite_steps"
            )
            self._first_non_finite_step = tf.Variable(
                tf.constant(-1, tf.int64), trainable=False, name="first_non_finite_step"
            )
            # What was non-finite at that step: 0 = the loss, i >= 1 = the gradient of
            # trainable_variables[i - 1] (-1: none yet). NonFiniteGuard names it in its error.
            self._first_non_finite_tensor = tf.Variable(
                tf.constant(-1, tf.int64), trainable=False, name="first_non_finite_tensor"
            )
        # Under a strategy: whether the micro-batch just accumulated was kept, and which of
        # its tensors were non-finite (set while tracing the replica step).
        self._step_kept: tf.Tensor | None = None
        self._step_bad: tf.Tensor | None = None
        self._loops: dict[str, CompiledLoop] = {}
        # Input signatures already checked against the model and loss by _build's dry run.
        self._validated_inputs: set[Any] = set()
        self._built_metrics = False
        self._built_training = False
        self._in_fit = False
        self._epochs: int | None = None
        self._steps_per_epoch: int | None = None
        self._validation_freq: int | None = None  # None: this fit has no validation_data
        self._current_epoch = 0

    def _scope(self) -> Any:
        """The strategy's scope (variables created in it are distributed), or a no-op."""
        return self.strategy.scope() if self.strategy is not None else contextlib.nullcontext()

    # ------------------------------------------------------------------ the step, top to bottom

    @property
    def trainable_variables(self) -> list[Any]:
        """The variables the optimizer updates."""
        return list(self.model.trainable_variables)

    @property
    def metrics(self) -> list[keras.metrics.Metric]:
        """The loss tracker followed by the compiled metrics; their results are the logs."""
        return [self.loss_tracker, *self.compiled_metrics]

    def compute_loss(self, batch: Nested, training: bool) -> tf.Tensor:
        """Returns the scalar mean loss of ``batch`` and updates the compiled metrics.

        ``batch`` is one element of the input as given: ``(x, y)``, ``(x, y, sample_weight)``
        or ``x``. Override it for a custom loss; call ``self.update_metrics(y, y_pred,
        sample_weight)`` in the override if you want the compiled metrics. The returned value
        must be the *mean* over the batch's examples: accumulation weights it by example count.
        """
        x, y, sample_weight = data_lib.unpack_batch(batch)
        if self.loss is None:
            raise ConfigError(
                "loss is None: pass Trainer(loss=...) or override compute_loss in a subclass."
            )
        y_pred = self._call_model(x, training)
        loss = self.loss(y, y_pred, sample_weight=sample_weight)
        if loss.shape.rank == 1 and loss.shape[0] == 0:
            # A replica's share of a batch smaller than the replica count is empty; Keras
            # returns its per-example losses (none) instead of a mean. It has weight zero; the
            # sum keeps it connected to the weights, so its gradients are zeros, not None,
            # and every replica takes part in the same all-reduce.
            loss = tf.reduce_sum(loss)
        replicas = _distribute.replicas(self.strategy)
        if replicas > 1:
            # Keras losses divide by the number of replicas under a strategy; tfloop weights
            # each replica's mean by its example count instead (exact for uneven splits).
            loss = loss * tf.cast(replicas, loss.dtype)
        extra = getattr(self.model, "losses", None)
        if extra:
            loss = loss + tf.add_n([tf.cast(term, loss.dtype) for term in extra])
        user_code(self.update_metrics)(y, y_pred, sample_weight)
        return loss

    def update_metrics(self, y: Nested, y_pred: Nested, sample_weight: Nested = None) -> None:
        """Updates every compiled metric with one batch."""
        for metric in self.compiled_metrics:
            metric.update_state(y, y_pred, sample_weight=sample_weight)

    def train_step(self, batch: Nested) -> dict[str, tf.Tensor] | None:
        """One micro-batch: loss on a tape, gradients, then ``apply_gradients``.

        Runs inside the compiled loop. An override may return a dict of scalar tensors; the
        values of the last step of each execution are added to the logs.
        """
        with tf.GradientTape() as tape:
            loss = user_code(self.compute_loss)(batch, training=True)
            # Mixed precision: a LossScaleOptimizer scales the loss here and unscales the
            # (accumulated) gradient when it applies it, skipping the update on overflow.
            scaled_loss = self.optimizer.scale_loss(loss)
        gradients = tape.gradient(scaled_loss, self.trainable_variables)
        examples = data_lib.batch_size_of(batch)
        user_code(self.apply_gradients)(gradients, weight=examples, loss=loss)
        if self.non_finite != "ignore":
            # A dropped step does not count in the epoch's mean loss either.
            finite = tf.math.is_finite(loss)
            loss = tf.where(finite, loss, tf.zeros_like(loss))
            examples = tf.where(finite, examples, tf.zeros_like(examples))
        self.loss_tracker.update_state(loss, sample_weight=examples)
        return None

    def apply_gradients(
        self, gradients: Sequence[Any], weight: Any = 1.0, loss: Any = None
    ) -> None:
        """Applies ``gradients`` (of a mean loss), or accumulates them when ``accumulate_steps > 1``.

        With accumulation the update happens when the window is full or the epoch ends; the
        partial last window is divided by its own total weight, never by ``accumulate_steps``.
        Under a non-finite policy other than ``"ignore"`` (see ``NonFiniteGuard``), gradients
        with a NaN or Inf (or a non-finite ``loss``, if given) are dropped in-graph, so they
        never reach the weights.
        """
        gradients = list(gradients)
        accumulator = self._accumulator
        if self.strategy is not None:
            if self._uses_window():
                self._accumulate_replica(gradients, weight, loss)
            else:
                self._update_replica(gradients, weight)
            return
        if accumulator is None:
            self._unless_non_finite(gradients, loss, lambda: self._update(gradients))
            return
        # The compiled loop closes the window (applies the update) once it is full.
        keep = None
        if self.non_finite != "ignore":
            keep, bad = self._non_finite_flags(gradients, loss)
            self._record_dropped(keep, bad)
        accumulator.accumulate(gradients, weight, keep)

    def _close_window(self, epoch_end: tf.Tensor | None) -> None:
        """Applies the accumulated window if it is full, or partial at the end of the epoch
        (then discarded instead with ``drop_remainder``). Under a strategy this runs in
        cross-replica context, where the accumulators read as global sums."""
        accumulator = self._accumulator
        assert accumulator is not None
        ready = accumulator.ready
        if epoch_end is None:
            closes, drops = ready, None
        elif self.drop_remainder:
            closes = ready
            drops = tf.logical_and(epoch_end, tf.logical_not(ready))
        else:
            closes, drops = tf.logical_or(ready, epoch_end), None
        accumulator._apply_where(closes, self.optimizer, self.clip_global_norm)
        if drops is not None:
            accumulator._reset_where(drops)

    def _uses_window(self) -> bool:
        """Under a strategy: whether updates go through the on-read accumulator.

        Needed for accumulation, for a non-finite policy, and for loss scaling: each decides
        in a ``tf.cond`` whether to update, which only cross-replica context may hold.
        """
        return (
            self.accumulate_steps > 1
            or self.non_finite != "ignore"
            or isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer)
        )

    def _update_replica(self, gradients: list[Any], weight: Any) -> None:
        """Under a strategy, one update per batch: each replica hands the optimizer its share
        ``n_r / N * g_r`` and the optimizer's all-reduce sums the shares into the global-batch
        gradient. Clipping uses the norm of that sum (one more all-reduce), never a share's."""
        context = tf.distribute.get_replica_context()
        weight = tf.cast(weight, tf.float32)
        total = context.all_reduce(tf.distribute.ReduceOp.SUM, weight)
        fraction = tf.math.divide_no_nan(weight, total)
        shares = [None if g is None else tf.convert_to_tensor(g) * fraction for g in gradients]
        if self.clip_global_norm is not None:
            present = [g for g in shares if g is not None]
            summed = context.all_reduce(tf.distribute.ReduceOp.SUM, present)
            norm = tf.linalg.global_norm(summed)
            factor = tf.minimum(1.0, tf.math.divide_no_nan(self.clip_global_norm, norm))
            shares = [None if g is None else g * tf.cast(factor, g.dtype) for g in shares]
        self.optimizer.apply_gradients(zip(shares, self.trainable_variables, strict=False))

    def _accumulate_replica(self, gradients: list[Any], weight: Any, loss: Any) -> None:
        """Under a strategy: adds this replica's share; the loop applies the window.

        The update happens in cross-replica context (``_close_window``), where the global sums
        are read, so nothing here synchronizes inside control flow. A non-finite micro-batch
        on any replica is dropped on every replica (one all-reduce of the flags, no ``cond``).
        """
        accumulator = self._accumulator
        assert accumulator is not None
        keep = None
        if self.non_finite != "ignore":
            _, local_bad = self._non_finite_flags(gradients, loss)
            context = tf.distribute.get_replica_context()
            bad = context.all_reduce(tf.distribute.ReduceOp.SUM, local_bad)
            keep = tf.reduce_all(tf.equal(bad, 0.0))
            self._step_kept, self._step_bad = keep, bad
        accumulator.accumulate(gradients, weight, keep)

    def _record_dropped(self, kept: tf.Tensor, bad: tf.Tensor) -> None:
        """The non-finite bookkeeping of a dropped micro-batch (``bad[j] > 0``: tensor ``j``,
        the loss then each gradient, was not finite). Cross-replica context under a strategy."""

        def skip() -> tf.Tensor:
            step = tf.cast(self.optimizer.iterations, tf.int64)
            first = self._first_non_finite_step
            is_first = first < 0
            first.assign(tf.where(is_first, step, first))
            which = tf.argmax(tf.cast(bad > 0, tf.int32), output_type=tf.int64)
            self._first_non_finite_tensor.assign(
                tf.where(is_first, which, self._first_non_finite_tensor)
            )
            self._non_finite_steps.assign_add(1)
            return tf.constant(False)

        tf.cond(kept, lambda: tf.constant(True), skip)

    @staticmethod
    def _non_finite_flags(gradients: list[Any], loss: Any) -> tuple[tf.Tensor, tf.Tensor]:
        """Whether the micro-batch is finite, and per tensor (loss, then gradients) whether
        it is not (1.0). The loss is checked too: a NaN picked by tf.where has a finite (zero)
        gradient."""
        bad = tf.stack(
            [
                tf.cast(tf.logical_not(tf.reduce_all(tf.math.is_finite(t))), tf.float32)
                if t is not None
                else tf.constant(0.0)
                for t in [loss, *gradients]
            ]
        )
        return tf.reduce_all(tf.equal(bad, 0.0)), bad

    def _update(self, gradients: list[Any]) -> None:
        gradients = clip_gradients(gradients, self.clip_global_norm, self.optimizer)
        self.optimizer.apply_gradients(zip(gradients, self.trainable_variables, strict=False))

    def _unless_non_finite(self, gradients: list[Any], loss: Any, action: Any) -> None:
        if self.non_finite == "ignore":
            action()
            return
        finite, bad = self._non_finite_flags(gradients, loss)

        def run() -> tf.Tensor:
            action()
            return tf.constant(True)

        tf.cond(finite, run, lambda: tf.constant(False))
        self._record_dropped(finite, bad)

    @property
    def first_non_finite_step(self) -> int:
        """The update step at which the first non-finite gradient was dropped (-1: none yet)."""
        return int(self._first_non_finite_step.numpy())

    def test_step(self, batch: Nested) -> dict[str, tf.Tensor] | None:
        """One evaluation batch: loss and metrics, no update."""
        loss = user_code(self.compute_loss)(batch, training=False)
        self.loss_tracker.update_state(loss, sample_weight=data_lib.batch_size_of(batch))
        return None

    def predict_step(self, batch: Nested) -> Nested:
        """The model's outputs for one batch (the ``x`` part of it)."""
        x, _, _ = data_lib.unpack_batch(batch)
        return self._call_model(x, training=False)

    def _call_model(self, x: Nested, training: bool) -> Nested:
        # Keras layers take a training flag (Dropout, BatchNorm); a plain tf.Module may not.
        if isinstance(self.model, keras.layers.Layer):
            return self.model(x, training=training)
        return user_code(self.model)(x)

    def _results(self) -> dict[str, tf.Tensor]:
        logs = {metric.name: metric.result() for metric in self.metrics}
        logs["step"] = tf.identity(self.optimizer.iterations)
        if self._accumulator is not None:
            logs["_window"] = tf.identity(self._accumulator.count)
        if self.non_finite != "ignore":
            logs["non_finite_steps"] = tf.identity(self._non_finite_steps)
        return logs

    # ------------------------------------------------------------------------------ the API

    def fit(
        self,
        data: Any,
        epochs: int = 1,
        steps_per_epoch: int | None = None,
        validation_data: Any = None,
        validation_freq: int = 1,
        initial_epoch: int | None = None,
        *,
        batch_size: int | None = None,
        shuffle: bool = True,
        verbose: int = 1,
    ) -> History:
        """Trains for ``epochs`` epochs and returns the :class:`History` of epoch logs.

        Args:
            data: ``(x, y)`` or ``(x, y, sample_weight)`` arrays (tfloop batches them, with a
                seeded shuffle each epoch), or a batched ``tf.data.Dataset``.
            epochs: the epoch to stop at (as in Keras, counted from 0 including
                ``initial_epoch``).
            steps_per_epoch: batches per epoch; required for an infinite dataset. With a
                dataset, one iterator then runs across epochs.
            validation_data: evaluated after every ``validation_freq``-th epoch; its results
                appear as ``val_<name>``.
            initial_epoch: the epoch to start from (default 0).
            batch_size: batch size for arrays (default 32); not allowed with a dataset.
            shuffle: shuffle arrays each epoch (seeded by ``seed`` and the epoch number).
            verbose: 1 shows progress (a bar on a terminal, plain lines otherwise); 0 is silent.
        """
        epochs = _validate_count(epochs, "epochs", minimum=1)
        if steps_per_epoch is not None:
            steps_per_epoch = _validate_count(steps_per_epoch, "steps_per_epoch", minimum=1)
        validation_freq = _validate_count(validation_freq, "validation_freq", minimum=1)
        initial_epoch = _validate_count(initial_epoch or 0, "initial_epoch", minimum=0)
        source = data_lib.adapt(
            data, batch_size=batch_size, shuffle=shuffle, seed=self._data_seed, argument="data"
        )
        if source.infinite and steps_per_epoch is None:
            raise DataError(
                "data is an infinite dataset (it repeats forever); pass steps_per_epoch=... "
                "to say how many batches make an epoch."
            )
        if (
            isinstance(source, data_lib._ArraySource)
            and steps_per_epoch is not None
            and steps_per_epoch > (source.steps_per_epoch or 0)
        ):
            raise ConfigError(
                f"steps_per_epoch={steps_per_epoch} is more than the "
                f"{source.steps_per_epoch} batches the arrays hold; lower it or leave it "
                "None (one pass over the arrays per epoch)."
            )
        validation = None
        if validation_data is not None:
            validation = data_lib.adapt(
                validation_data, batch_size=batch_size, shuffle=False, argument="validation_data"
            )
        self._check_can_train()

        epoch_steps = steps_per_epoch or source.steps_per_epoch
        source.steps_per_execution = self._resolve_steps_per_execution(source, epoch_steps)
        if validation is not None:
            validation.steps_per_execution = self._resolve_steps_per_execution(
                validation, validation.steps_per_epoch
            )
        plan = FitPlan(
            source=source,
            validation=validation,
            epochs=epochs,
            initial_epoch=initial_epoch,
            steps_per_epoch=steps_per_epoch,
            validation_freq=validation_freq,
            # One iterator across epochs when the user sets the epoch length of a dataset, so
            # an infinite or long dataset is not restarted every epoch (as in Keras).
            persistent=steps_per_epoch is not None
            and not isinstance(source, data_lib._ArraySource),
            verbose=verbose,
        )
        history = History()
        extra: list[Callback] = [history]
        if verbose:
            extra.append(ProgressBar())
        callbacks = CallbackList([*self.callbacks, *extra], trainer=self)
        self.stop_training = False
        self.preempted = False
        loop = FitLoop(self, plan, callbacks)
        self._in_fit, self._epochs, self._steps_per_epoch = True, epochs, epoch_steps
        self._validation_freq = validation_freq if validation is not None else None
        try:
            loop.start()
            loop.run()
        finally:
            self._in_fit = False
        return history

    def evaluate(
        self,
        data: Any,
        steps: int | None = None,
        *,
        batch_size: int | None = None,
        verbose: int = 0,
    ) -> dict[str, float]:
        """Returns the loss and metrics over ``data`` (all of it, or its first ``steps`` batches).

        Examples:
            >>> import numpy as np, keras, tfloop
            >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
            >>> trainer = tfloop.Trainer(model, loss="mse", metrics=["mae"])
            >>> sorted(trainer.evaluate((np.ones((10, 2)), np.ones((10, 1)))))
            ['loss', 'mae']
        """
        if steps is not None:
            steps = _validate_count(steps, "steps", minimum=1)
        source = data_lib.adapt(data, batch_size=batch_size, shuffle=False, argument="data")
        self._check_steps_for_infinite(source, steps)
        callbacks = CallbackList(
            [*self.callbacks, *([ProgressBar()] if verbose else [])], trainer=self
        )
        source.steps_per_execution = self._resolve_steps_per_execution(
            source, steps or source.steps_per_epoch
        )
        return self._evaluate(source, steps, callbacks)

    def predict(self, data: Any, steps: int | None = None, *, batch_size: int | None = None) -> Any:
        """Returns the model's outputs for ``data`` as NumPy (nested like the outputs).

        ``data`` is ``x`` arrays, ``(x, ...)`` tuples or a batched dataset; only ``x`` is used.

        Examples:
            >>> import numpy as np, keras, tfloop
            >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
            >>> tfloop.Trainer(model).predict(np.ones((5, 3))).shape
            (5, 2)
        """
        if steps is not None:
            steps = _validate_count(steps, "steps", minimum=1)
        source = data_lib.adapt(data, batch_size=batch_size, shuffle=False, argument="data")
        self._check_steps_for_infinite(source, steps)
        source.steps_per_execution = self._resolve_steps_per_execution(
            source, steps or source.steps_per_epoch
        )
        stream = source.stream(0)
        first = stream.peek_batch()
        if first is None:
            raise DataError("data yielded no batches; pass a non-empty dataset.")
        with self._scope():
            self._check_model_accepts(first)
        callbacks = CallbackList(self.callbacks, trainer=self)
        callbacks.on_predict_start({})
        loop = self._loop("predict")
        outputs: list[Any] = []
        for chunk_data, start, stop in _chunks(stream, source.steps_per_execution, steps):
            stacked = loop(chunk_data, start, stop)
            outputs.append(
                tf.nest.map_structure(
                    lambda t: np.reshape(t[start:stop].numpy(), (-1, *t.shape[2:])),  # noqa: B023
                    stacked,
                )
            )
        callbacks.on_predict_end({})
        return tf.nest.map_structure(lambda *parts: np.concatenate(parts), *outputs)

    def export(self, path: str | os.PathLike[str]) -> str:
        """Saves the model for inference without tfloop; returns the path written.

        A path ending in ``.keras`` gets a Keras model file (``keras.models.load_model``);
        any other path a SavedModel directory (``tf.saved_model.load``), which a plain
        ``tf.Module`` is always exported to.
        """
        path = os.fspath(path)
        if isinstance(self.model, keras.Model):
            if path.endswith(".keras"):
                self.model.save(path)
            else:
                self.model.export(path, format="tf_saved_model", verbose=False)
            return path
        if path.endswith(".keras"):
            raise ConfigError(
                f"export path {path!r} asks for a .keras file, but the model is a "
                f"{type(self.model).__name__}, not a keras.Model; pass a directory path."
            )
        tf.saved_model.save(self.model, path)
        return path

    # ------------------------------------------------------------------------- host-side loop

    def _evaluate(
        self, source: data_lib.DataSource, steps: int | None, callbacks: CallbackList
    ) -> dict[str, float]:
        stream = source.stream(0)
        first = stream.peek_batch()
        if first is None:
            raise DataError("data yielded no batches; pass a non-empty dataset.")
        with self._scope():
            self._build(first, training=False)
        loop = self._loop("test")
        for metric in self.metrics:
            metric.reset_state()
        callbacks.on_eval_start({})
        logs: dict[str, float] = {}
        for piece, start, stop in _chunks(stream, source.steps_per_execution, steps):
            results, step_logs = loop(piece, start, stop)
            logs = _to_floats(results, step_logs)
        for internal in ("step", "_window", "non_finite_steps"):
            logs.pop(internal, None)
        callbacks.on_eval_end(logs)
        return logs

    def _loop(self, kind: str) -> CompiledLoop:
        # The non-finite policy is baked into the trace, so it is part of the cache key.
        key = f"{kind}/{self.non_finite}" if kind == "train" else kind
        if key not in self._loops:
            self._loops[key] = CompiledLoop(self, kind, self.jit_compile)
        return self._loops[key]

    # ------------------------------------------------------------------- checks and building

    def _check_can_train(self) -> None:
        overrides_loss = type(self).compute_loss is not Trainer.compute_loss
        overrides_step = type(self).train_step is not Trainer.train_step
        if self.loss is None and not (overrides_loss or overrides_step):
            raise ConfigError(
                "loss is None: pass Trainer(loss=...) (e.g. 'mse') or override compute_loss."
            )
        if not self.trainable_variables and not overrides_step:
            raise ConfigError(
                "model has no trainable variables, so there is nothing to train; build the "
                "model (or unfreeze its layers) before fit."
            )

    def _check_steps_for_infinite(self, source: data_lib.DataSource, steps: int | None) -> None:
        if source.infinite and steps is None:
            raise DataError(
                "data is an infinite dataset; pass steps=... to say how many batches to use."
            )

    def _resolve_steps_per_execution(
        self, source: data_lib.DataSource, epoch_steps: int | None
    ) -> int:
        if self.steps_per_execution != "auto":
            return int(self.steps_per_execution)
        steps = AUTO_STEPS_PER_EXECUTION
        batch_bytes = max(1, source.bytes_per_batch)
        while steps < AUTO_STEPS_MAX and 2 * steps * batch_bytes <= SMALL_SUPERBATCH:
            steps *= 2
        if epoch_steps is not None:
            steps = min(steps, epoch_steps)
        return max(1, min(steps, SUPERBATCH_MEMORY_CAP // max(1, source.bytes_per_batch)))

    def _check_model_accepts(self, batch: Nested) -> Nested:
        """Runs the model once, eagerly, on one batch; turns a failure into a DataError."""
        x, _, _ = data_lib.unpack_batch(batch)
        self._maybe_seed_unbuilt_model()
        try:
            return self.predict_step(batch)
        except Exception as error:
            expected = _expected_input(self.model)
            raise DataError(
                f"data: the model cannot take x {_describe(x)}{expected}: {_first_line(error, 400)}. "
                "Reshape or cast x to the model's input, or change the model's Input. If the "
                "data is an unbatched dataset, call .batch(batch_size) on it."
            ) from error

    def _build(self, batch: Nested, training: bool) -> None:
        """Creates everything the compiled loop needs, checking the data against the model.

        Runs the model and the loss once, eagerly, on one batch, so a shape or dtype mismatch
        surfaces here as a DataError that names the argument, not as a graph stack trace.
        That dry run is skipped for a batch of the structure, shapes and dtypes already checked
        against this model and loss (a second ``fit``, one ``fit`` per epoch).
        """
        overrides_loss = type(self).compute_loss is not Trainer.compute_loss
        step = "train_step" if training else "test_step"
        # A step override that never calls the default compute_loss (loss=None) has no loss
        # to check here; its own code runs when the loop is traced.
        checks_loss = (
            overrides_loss
            or self.loss is not None
            or (getattr(type(self), step) is getattr(Trainer, step))
        )
        _, y, _ = data_lib.unpack_batch(batch)
        signature = (
            id(self.model),
            id(self.loss),
            repr(tf.nest.map_structure(lambda _: 0, batch)),
            tuple((tuple(t.shape), t.dtype.name) for t in tf.nest.flatten(batch)),
        )
        validated = self._validated_inputs
        if signature in validated:
            for metric in self.metrics:
                metric.reset_state()  # as after the dry run
        else:
            if not overrides_loss or self._metric_specs:
                y_pred = self._check_model_accepts(batch)
                if not self._built_metrics:
                    self.compiled_metrics = [
                        _resolve_metric(spec, self.loss, y, y_pred) for spec in self._metric_specs
                    ]
                    self._built_metrics = True
            if y is None and not overrides_loss and checks_loss:
                raise DataError(
                    "data has no targets: pass (x, y) or a dataset of (x, y) tuples (or "
                    "override compute_loss for a loss without targets)."
                )
            try:
                if checks_loss:
                    self.compute_loss(batch, training=False)
            except (ConfigError, DataError):
                raise
            except Exception as error:
                raise DataError(
                    f"data: the loss cannot be computed for y {_describe(y)}: "
                    f"{_first_line(error, 400)}. Check that y matches the model's output and the "
                    "loss (e.g. one-hot labels for categorical_crossentropy, integer labels for "
                    "sparse_categorical_crossentropy)."
                ) from error
            finally:
                for metric in self.metrics:
                    metric.reset_state()
            validated.add(signature)
        if training and not self._built_training:
            variables = self.trainable_variables
            if not getattr(self.optimizer, "built", False):
                self.optimizer.build(variables)
            # Under a strategy every update goes through the accumulator (see _distribute.py).
            if self.accumulate_steps > 1 or self.strategy is not None:
                self._accumulator = GradientAccumulator(variables, self.accumulate_steps)
            self._reseed_dropout()
            self._built_training = True

    def _maybe_seed_unbuilt_model(self) -> None:
        if self.seed is not None and not getattr(self.model, "built", True):
            keras.utils.set_random_seed(self.seed)

    def _seed_generator_states(self) -> list[Any]:
        """The state variables of every Keras seed generator in the model (Dropout, noise)."""
        if not isinstance(self.model, keras.Model):
            return []
        return [
            generator.state
            for layer in self.model._flatten_layers(include_self=True)
            for generator in getattr(layer, "_seed_generators", [])
        ]

    def _reseed_dropout(self) -> None:
        """Gives every Keras seed generator (Dropout, noise layers) a state derived from seed."""
        if self.seed is None:
            return
        for index, state in enumerate(self._seed_generator_states()):
            state.assign(tf.constant([self.seed, index], dtype=state.dtype))


# ------------------------------------------------------------------------------ helpers


def _chunks(
    stream: data_lib.StepStream, limit: int, steps: int | None
) -> Iterable[tuple[Nested, int, int]]:
    done = 0
    while steps is None or done < steps:
        chunk = stream.next_chunk(limit if steps is None else min(limit, steps - done))
        if chunk is None:
            return
        done += chunk[2] - chunk[1]
        yield chunk


def _to_floats(results: dict[str, Any], step_logs: dict[str, Any] | None) -> dict[str, float]:
    logs = {name: float(value) for name, value in results.items()}
    for name, value in (step_logs or {}).items():
        logs[name] = float(np.asarray(value).mean())
    return logs


def _describe(value: Nested) -> str:
    if value is None:
        return "(none)"
    parts = [f"{tuple(t.shape)} {t.dtype.name}" for t in tf.nest.flatten(value)]
    return "of shape/dtype " + ", ".join(parts)


def _expected_input(model: Any) -> str:
    try:
        shape = model.input_shape
    except (AttributeError, ValueError, RuntimeError):
        return ""
    return f" (the model expects {shape})"
