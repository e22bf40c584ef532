"""The Trainer: ``fit`` / ``evaluate`` / ``predict`` and the step methods a subclass overrides.

Read top to bottom, this is the story of a step: ``train_step`` records ``compute_loss`` on a
tape and hands the gradients to ``apply_gradients``, whose :class:`~tfloop._update.UpdateRule`
applies them at once or accumulates them for ``accumulate_steps`` micro-batches. ``fit``
validates everything on the host first, then hands the controller (``_controller.py``) the
compiled loop (``_loops.py``) and the superbatches of ``steps_per_execution`` batches
(``data``), so one Python call and one iterator call run many steps.
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import keras
import tensorflow as tf

from tfloop import _checks, _config, _coordinator, _distribute, _seeds, _validate
from tfloop import data as data_lib
from tfloop._autograph import user_code
from tfloop._compile import LossAndMetrics
from tfloop._controller import FitHooks, run_evaluation
from tfloop._export import export_model
from tfloop._fit_args import plan_fit
from tfloop._loops import CompiledLoop, LoopSpec
from tfloop._update import NonFinitePolicy, UpdateRule
from tfloop.accumulate import validate_steps
from tfloop.callbacks import Callback, CallbackList, History, ProgressBar, RunInfo
from tfloop.errors import ConfigError

__all__ = ["Trainer"]

Nested = Any


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
        non_finite: what an update with a NaN or Inf loss or gradient does: ``"ignore"``
            (applied as it is, the fastest), ``"skip"`` (dropped in-graph and counted in
            ``non_finite_steps``) or ``"raise"`` (dropped, and ``fit`` raises). A
            ``NonFiniteGuard`` in ``callbacks`` sets it and adds its messages.
        callbacks: ``tfloop.Callback`` s.
        checkpoint: a directory (checkpoints every epoch, resume from the latest) or a
            ``tfloop.Checkpointer``; ``None`` saves nothing.
        strategy: a ``tf.distribute.Strategy`` (Mirrored, MultiWorkerMirrored, ParameterServer,
            TPU). Create the model (and an optimizer instance, if you pass one) inside
            ``strategy.scope()``. Batches are *global*: each step's batch is split across the
            replicas. ``None`` runs on the default device.
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
        non_finite: NonFinitePolicy = "ignore",
        callbacks: Iterable[Callback] | Callback | None = (),
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
            self.optimizer = _config.resolve_optimizer(optimizer)
        if self.strategy is not None:
            _distribute.check_created_in_scope(self.strategy, model, self.optimizer)
        self.accumulate_steps = validate_steps(accumulate_steps, "accumulate_steps")
        self.drop_remainder = _validate.boolean(drop_remainder, "drop_remainder")
        self.steps_per_execution = _config.validate_steps_per_execution(steps_per_execution)
        self.jit_compile = _config.validate_jit_compile(jit_compile)
        self.clip_global_norm = _validate.optional_number(clip_global_norm, "clip_global_norm")
        self.callbacks = _config.validate_callbacks(callbacks)
        self.checkpoint = _config.resolve_checkpoint(checkpoint)
        if seed is not None:
            seed = _validate.count(seed, "seed")
        self.seed = seed
        self._data_seed = seed if seed is not None else random.SystemRandom().randrange(2**31)
        self._update = UpdateRule(
            self.optimizer,
            accumulate_steps=self.accumulate_steps,
            clip_global_norm=self.clip_global_norm,
            non_finite=_config.resolve_non_finite(non_finite, self.callbacks),
            drop_remainder=self.drop_remainder,
            strategy=self.strategy,
        )

        self.stop_training = False
        self.preempted = False  # set by fit when a preemption signal made it save and return
        self.stop_reason: str | None = None  # why the last fit returned
        self.run_info = RunInfo()
        with self._scope():
            self._compiled = LossAndMetrics(loss, metrics)
        self._loops: dict[str, CompiledLoop] = {}
        self._dry_run = _checks.DryRun(
            model,
            self._compiled,
            self.predict_step,
            self.compute_loss,
            self._reset_metrics,
            self.seed,
        )
        self._built_training = False

    def _scope(self) -> Any:
        return _distribute.scope(self.strategy)

    # ------------------------------------------------------------------ the step, top to bottom

    @property
    def trainable_variables(self) -> list[Any]:
        """The variables the optimizer updates."""
        return list(self.model.trainable_variables)

    @property
    def loss(self) -> Any:
        """The loss function (a ``keras.losses.Loss``), or None."""
        return self._compiled.loss

    @property
    def loss_tracker(self) -> keras.metrics.Metric:
        """The running mean of the loss, weighted by examples: ``logs["loss"]``."""
        return self._compiled.loss_tracker

    @property
    def compiled_metrics(self) -> list[keras.metrics.Metric]:
        """The metrics given to the Trainer, resolved at the first batch."""
        return self._compiled.compiled_metrics

    @property
    def metrics(self) -> list[keras.metrics.Metric]:
        """The loss tracker followed by the compiled metrics; their results are the logs."""
        return self._compiled.metrics

    @property
    def non_finite(self) -> NonFinitePolicy:
        """The non-finite policy (``Trainer(non_finite=...)``; fixed at construction)."""
        return self._update.non_finite

    def compute_loss(self, batch: Nested, training: bool) -> tf.Tensor:
        """Returns the scalar mean loss of ``batch`` and updates the compiled metrics.

        ``batch`` is one element of the input as given: ``(x, y)``, ``(x, y, sample_weight)``
        or ``x``. Override it for a custom loss; call ``self.update_metrics(y, y_pred,
        sample_weight)`` in the override if you want the compiled metrics. The returned value
        must be the *mean* over the batch's examples: accumulation weights it by example count.
        """
        x, y, sample_weight = data_lib.unpack_batch(batch)
        y_pred = self._call_model(x, training)
        # Keras losses divide by the number of replicas under a strategy; tfloop weights each
        # replica's mean by its example count instead (exact for uneven splits), so it
        # multiplies that back. The model's own losses (regularizers) are added.
        loss = self._compiled.loss_value(
            y,
            y_pred,
            sample_weight,
            replicas=_distribute.replicas(self.strategy),
            extra=getattr(self.model, "losses", None),
        )
        user_code(self.update_metrics)(y, y_pred, sample_weight)
        return loss

    def update_metrics(self, y: Nested, y_pred: Nested, sample_weight: Nested = None) -> None:
        """Updates every compiled metric with one batch."""
        self._compiled.update(y, y_pred, sample_weight)

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
        # A dropped micro-batch does not count in the epoch's mean loss either.
        loss, examples = self._update.mask_non_finite(loss, examples)
        self.loss_tracker.update_state(loss, sample_weight=examples)
        return None

    def apply_gradients(
        self, gradients: Sequence[Any], weight: Any = 1.0, loss: Any = None
    ) -> None:
        """Applies ``gradients`` (of a mean loss), or accumulates them when ``accumulate_steps > 1``.

        With accumulation the update happens when the window is full or the epoch ends; the
        partial last window is divided by its own total weight, never by ``accumulate_steps``.
        Under a non-finite policy other than ``"ignore"``, gradients with a NaN or Inf (or a
        non-finite ``loss``, if given) are dropped in-graph, so they never reach the weights.
        """
        self._update.apply_gradients(gradients, weight, loss)

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

    def _metric_results(self) -> dict[str, tf.Tensor]:
        # self.metrics, not the compiled ones: a subclass may add its own metrics there.
        return {metric.name: metric.result() for metric in self.metrics}

    def _results(self) -> dict[str, tf.Tensor]:
        return {**self._metric_results(), **self._update.results()}

    def _reset_metrics(self) -> None:
        for metric in self.metrics:
            metric.reset_state()

    # --------------------------------------------------------------------- what callbacks see

    @property
    def non_finite_steps(self) -> int:
        """Micro-batches dropped so far for a NaN or Inf (under ``non_finite`` "skip"/"raise")."""
        return _distribute.read_int(self._update.non_finite_steps)

    @property
    def first_non_finite_step(self) -> int:
        """The update step at which the first non-finite gradient was dropped (-1: none yet)."""
        return _distribute.read_int(self._update.first_non_finite_step)

    @property
    def first_non_finite_tensor(self) -> str:
        """What was non-finite then: ``"loss"`` or ``"gradient of <variable>"``."""
        return self._update.variable_name(
            _distribute.read_int(self._update.first_non_finite_tensor)
        )

    def checkpoint_objects(self) -> dict[str, Any]:
        """What a checkpoint saves of this trainer (its data position is the controller's)."""
        return {
            "model": self.model,
            "optimizer": self.optimizer,
            "metrics": [v for metric in self.metrics for v in metric.variables],
            "seed_generators": _seeds.seed_generator_states(self.model),
            **self._update.checkpoint_objects(),
        }

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
            data: ``(x, y)`` or ``(x, y, sample_weight)`` arrays (batched by tfloop, shuffled
                by seed each epoch), a batched ``tf.data.Dataset`` or a dataset function.
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
        plan = plan_fit(
            data,
            epochs=epochs,
            steps_per_epoch=steps_per_epoch,
            validation_data=validation_data,
            validation_freq=validation_freq,
            initial_epoch=initial_epoch,
            batch_size=batch_size,
            shuffle=shuffle,
            verbose=verbose,
            steps_per_execution=self.steps_per_execution,
            data_seed=self._data_seed,
            strategy=self.strategy,
        )
        _checks.check_can_train(
            self.loss,
            self.trainable_variables,
            overrides_loss=_overrides(self, "compute_loss"),
            overrides_step=_overrides(self, "train_step"),
        )
        self.stop_training = False
        controller = _coordinator.controller_for(self._fit_hooks(), plan, self.checkpoint)
        self.run_info = controller.info
        try:
            return controller.fit(self, self.callbacks)
        finally:
            self._data_seed = controller.data_seed
            self.preempted = controller.preempted
            self.stop_reason = controller.stop_reason

    def _fit_hooks(self) -> FitHooks:
        return FitHooks(
            build=lambda batch: self._build(batch, training=True),
            train_loop=lambda: self._loop("train"),
            evaluate=lambda source, callbacks: self._evaluate(source, None, callbacks),
            results=self._results,
            reset_metrics=self._reset_metrics,
            checkpoint_objects=self.checkpoint_objects,
            micro_batches_per_update=self.accumulate_steps,
            strategy=self.strategy,
            scope=self._scope,
        )

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
        steps = _validate.optional_count(steps, "steps")
        source = self._adapt_for_inference(data, steps, batch_size)
        callbacks = CallbackList(
            [*self.callbacks, *([ProgressBar()] if verbose else [])], trainer=self
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
        steps = _validate.optional_count(steps, "steps")
        source = self._adapt_for_inference(data, steps, batch_size)
        stream = source.stream(0)
        _seeds.seed_unbuilt_model(self.model, self.seed)
        with self._scope():
            _checks.check_model_accepts(self.predict_step, stream.first_batch(), self.model)
        callbacks = CallbackList(self.callbacks, trainer=self)
        callbacks.on_predict_start({})
        outputs = self._loop("predict").predict(stream.chunks(source.steps_per_execution, steps))
        callbacks.on_predict_end({})
        return outputs

    def export(self, path: str | os.PathLike[str]) -> str:
        """Saves the model for inference without tfloop; returns the path written.

        A path ending in ``.keras`` gets a Keras model file (``keras.models.load_model``);
        any other path a SavedModel directory (``tf.saved_model.load``), which a plain
        ``tf.Module`` is always exported to.
        """
        return export_model(self.model, path)

    # ------------------------------------------------------------------------- host-side loop

    def _adapt_for_inference(
        self, data: Any, steps: int | None, batch_size: int | None
    ) -> data_lib.DataSource:
        return data_lib.adapt(
            data,
            batch_size=batch_size,
            steps_per_execution=self.steps_per_execution,
            steps=steps,
            shuffle=False,
        )

    def _evaluate(
        self, source: data_lib.DataSource, steps: int | None, callbacks: CallbackList
    ) -> dict[str, float]:
        stream = source.stream(0)
        with self._scope():
            self._build(stream.first_batch(), training=False)  # resets the metrics
        chunks = stream.chunks(source.steps_per_execution, steps)
        return run_evaluation(self._loop("test"), chunks, callbacks)

    def _loop(self, kind: Literal["train", "test", "predict"]) -> CompiledLoop:
        if kind not in self._loops:
            self._loops[kind] = CompiledLoop(self._loop_spec(kind))
        return self._loops[kind]

    def _loop_spec(self, kind: Literal["train", "test", "predict"]) -> LoopSpec:
        """What the loop of ``kind`` is made of; what only the Trainer knows is decided here:
        which step methods a subclass overrides, and whether XLA is on."""
        jit, fallback = _config.jit_choice(self.jit_compile, self.model, self.strategy)
        returns_logs = _overrides(self, f"{kind}_step")
        if kind == "train":
            # A step adds exactly one micro-batch (may unroll): tfloop's train_step, unguarded.
            overridden = returns_logs or _overrides(self, "apply_gradients")
            window = self._update if self._update.accumulator is not None else None
            unroll = not (overridden or self._update.guards)
            spec = LoopSpec(kind, self.train_step, self._results, returns_logs, window, unroll)
        else:
            step = self.predict_step if kind == "predict" else self.test_step
            spec = LoopSpec(kind, step, None if kind == "predict" else self._metric_results)
            spec = dataclasses.replace(spec, returns_logs=returns_logs)
        return dataclasses.replace(spec, strategy=self.strategy, jit=jit, jit_fallback=fallback)

    # ------------------------------------------------------------------- checks and building

    def _build(self, batch: Nested, training: bool) -> None:
        """Creates everything the compiled loop needs, checking the data against the model
        with a dry run (``_checks.py``) for each new input signature."""
        overrides_loss = _overrides(self, "compute_loss")
        step = "train_step" if training else "test_step"
        self._dry_run.check(
            batch,
            overrides_loss=overrides_loss,
            # A step override that never calls the default compute_loss (loss=None) has no
            # loss to check here; its own code runs when the loop is traced.
            checks_loss=overrides_loss or self.loss is not None or not _overrides(self, step),
        )
        if training and not self._built_training:
            self._update.build(self.trainable_variables)
            _seeds.reseed_generators(self.model, self.seed)
            self._built_training = True


# ------------------------------------------------------------------------------ helpers


def _overrides(trainer: Trainer, method: str) -> bool:
    """Whether ``trainer``'s class overrides the Trainer's ``method``."""
    return getattr(type(trainer), method) is not getattr(Trainer, method)
