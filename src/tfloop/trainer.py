"""The Trainer: ``fit`` / ``evaluate`` / ``predict`` and the step methods a subclass overrides.

Read top to bottom, this is the story of a step: ``train_step`` records ``compute_loss`` on a
tape and hands the gradients to ``apply_gradients``, whose :class:`~tfloop._update.UpdateRule`
applies them at once or accumulates them for ``accumulate_steps`` micro-batches. ``fit``
validates everything on the host first, then hands the controller (``_controller.py``) the
compiled loop (``_loops.py``) and the superbatches of ``steps_per_execution`` batches
(``data``), so one Python call and one iterator call run many steps.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Literal

import keras
import tensorflow as tf

from tfloop import _checks, _config, _coordinator, _distribute, _model_steps
from tfloop import data as data_lib
from tfloop._autograph import user_code
from tfloop._compile import compile_model
from tfloop._engine import Engine, StepMethods
from tfloop._export import export_model
from tfloop._fit_args import Duration, as_data, plan_fit
from tfloop._keras_form import keras_signature, loss_of
from tfloop._labels import LabelRangeCheck
from tfloop._logs import as_list
from tfloop._update import NonFinitePolicy, UpdateRule
from tfloop.callbacks import CallbackList, History, ProgressBar, RunInfo

__all__ = ["Trainer"]

Nested = Any
Kind = Literal["train", "test", "predict"]


class Trainer:
    """Trains a Keras model (or a ``tf.Module``) with a compiled, fused multi-step loop.

    A compiled Keras model brings its optimizer, loss, ``loss_weights``, metrics and
    ``weighted_metrics``; the arguments here replace those parts (``Model.compile`` accepts
    the same), and the model is compiled with the result.

    Args:
        model: a ``keras.Model`` (one that overrides ``train_step`` & co. runs its own steps),
            or a ``tf.Module`` owning ``tf.Variable`` s (with one ``loss``, or a subclass).
        optimizer: a Keras optimizer or its name; default: the compiled model's, else Adam.
        loss: a Keras loss, its name, ``callable(y_true, y_pred)``, or a dict / list of them
            per output, as in ``Model.compile``. Not needed when ``compute_loss`` is overridden.
        metrics: metrics or their names, or a dict / list of them per output, as in
            ``Model.compile`` (``"accuracy"`` picks the right accuracy for the shapes).
        loss_weights: the coefficient of each output's loss, as in ``Model.compile``.
        weighted_metrics: metrics weighted by ``sample_weight`` / ``class_weight``.
        accumulate_steps: micro-batches per optimizer update; the update is the exact mean
            gradient of the window, weighted by example count (see ``GradientAccumulator``).
        drop_remainder: with ``accumulate_steps > 1``, discard the partial last window of each
            epoch instead of applying it with its own total.
        steps_per_execution: batches run per compiled call; ``"auto"`` picks a fast value from
            the steps per epoch and the size of a batch (64, up to 1024 for small batches).
        jit_compile: XLA on, off, or ``"auto"``: XLA except on a CPU for convolution, random
            (Dropout) or attention layers, chosen once per model before its first execution and
            logged; the plain graph if XLA cannot compile. XLA draws other Dropout masks.
        run_eagerly: every step runs eagerly, in Python (a debugging mode; same results).
        clip_global_norm: clip the (accumulated) gradient to this global norm before applying.
        non_finite: an update with a NaN or Inf loss or gradient is ``"ignore"`` d (applied,
            the fastest), ``"skip"`` ped in-graph (counted in ``non_finite_steps``) or dropped
            and ``"raise"`` d by ``fit``. A ``NonFiniteGuard`` in ``callbacks`` sets it.
        callbacks: ``tfloop.Callback`` s (Keras callbacks are run through ``KerasCallbacks``).
        checkpoint: a directory (checkpoints every epoch, resume from the latest) or a
            ``tfloop.Checkpointer``; ``None`` saves nothing.
        strategy: a ``tf.distribute.Strategy``; create the model (and an optimizer instance)
            inside ``strategy.scope()``. Batches are *global*, split across the replicas.
        seed: makes the shuffle of arrays and Dropout reproducible. A model's initial weights
            are drawn when it is created: call ``keras.utils.set_random_seed(seed)`` before.

    Examples:
        >>> import numpy as np, keras, tfloop
        >>> x = np.random.default_rng(0).normal(size=(256, 4)).astype("float32")
        >>> y = x @ np.array([[1.0], [-2.0], [0.5], [3.0]], dtype="float32")
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        >>> trainer = tfloop.Trainer(model, keras.optimizers.SGD(0.1), "mse", seed=0)
        >>> history = trainer.fit(x, y, epochs=20, verbose=0)
        >>> history.history["loss"][-1] < 1e-3
        True
    """

    def __init__(
        self,
        model: Any,
        optimizer: str | keras.optimizers.Optimizer | None = None,
        loss: Any = None,
        metrics: Any = None,
        *,
        loss_weights: Any = None,
        weighted_metrics: Any = None,
        accumulate_steps: int = 1,
        drop_remainder: bool = False,
        steps_per_execution: int | Literal["auto"] = "auto",
        jit_compile: bool | Literal["auto"] = "auto",
        run_eagerly: bool = False,
        clip_global_norm: float | None = None,
        non_finite: NonFinitePolicy = "ignore",
        callbacks: Any = (),
        checkpoint: Any = None,
        strategy: tf.distribute.Strategy | None = None,
        seed: int | None = None,
    ) -> None:
        options = _config.options(
            model,
            accumulate_steps=accumulate_steps,
            drop_remainder=drop_remainder,
            steps_per_execution=steps_per_execution,
            jit_compile=jit_compile,
            run_eagerly=run_eagerly,
            clip_global_norm=clip_global_norm,
            non_finite=non_finite,
            callbacks=callbacks,
            checkpoint=checkpoint,
            strategy=strategy,
            seed=seed,
        )
        self.strategy = options.strategy
        self.accumulate_steps = options.accumulate_steps
        self.drop_remainder = options.drop_remainder
        self.steps_per_execution = options.steps_per_execution
        self.jit_compile = options.jit_compile
        self.run_eagerly = options.run_eagerly
        self.clip_global_norm = options.clip_global_norm
        self.callbacks = options.callbacks
        self.checkpoint = options.checkpoint
        self.seed = options.seed
        self.model = model
        # A Keras model that overrides train_step / test_step / predict_step / metrics owns its
        # steps: they run as model.fit runs them (a Trainer subclass's own step still wins).
        self._model_steps = _model_steps.for_model(
            model, options, runs_train_step=not _overrides(self, "train_step")
        )
        with _distribute.scope(self.strategy):
            self.optimizer, self._compiled = compile_model(
                model, optimizer, loss, metrics, loss_weights, weighted_metrics
            )
            self._update = UpdateRule(
                self.optimizer,
                accumulate_steps=options.accumulate_steps,
                clip_global_norm=options.clip_global_norm,
                non_finite=options.non_finite,
                drop_remainder=options.drop_remainder,
                strategy=self.strategy,
            )
        self._labels = LabelRangeCheck(self.strategy)
        if self.strategy is not None:
            _distribute.check_created_in_scope(self.strategy, model, self.optimizer)
        self._data_seed = options.data_seed
        self.stop_training = False
        self.preempted = False  # set by fit when a preemption signal made it save and return
        self.stop_reason: str | None = None  # why the last fit returned
        self.run_info = RunInfo(chief=_distribute.is_chief(self.strategy))
        overridden = frozenset(m for m in _OVERRIDABLE if _overrides(self, m))
        methods = StepMethods(
            self.train_step,
            self.test_step,
            self.predict_step,
            loss_of(
                self.compute_loss,
                self._call_model,
                self.update_metrics,
                keras_signature(type(self).compute_loss)
                if _overrides(self, "compute_loss")
                else None,
            ),
            lambda: self.metrics,
            lambda: self.trainable_variables,
            self.checkpoint_objects,
            overridden,
            model_steps=self._model_steps,
        )
        self._engine = Engine(
            methods,
            model=model,
            loss=lambda: self.loss,
            compiled=self._compiled,
            update=self._update,
            labels=self._labels,
            options=options,
        )

    # ------------------------------------------------------------------ the step, top to bottom

    @property
    def trainable_variables(self) -> list[Any]:
        """The variables the optimizer updates."""
        return list(self.model.trainable_variables)

    @property
    def loss(self) -> Any:
        """The loss (the compiled model's, or the ``tf.Module``'s function), or None."""
        return self._compiled.loss

    @property
    def loss_tracker(self) -> keras.metrics.Metric:
        """The running mean of the loss, weighted by examples: ``logs["loss"]``."""
        return self._compiled.loss_tracker

    @property
    def compiled_metrics(self) -> list[keras.metrics.Metric]:
        """The compiled metrics (and, for a Keras model, its per-output loss trackers)."""
        return list(self._compiled.compiled_metrics)

    @property
    def metrics(self) -> list[keras.metrics.Metric]:
        """The metrics whose results are the logs, reset at each epoch's start and before an
        evaluation: tfloop's ``loss`` tracker, the compiled metrics, the model's layers' own,
        no two of one name (docs/coming-from-keras.md); for a model that owns its steps, the
        model's ``metrics``, as ``model.fit`` reports them."""
        if self._model_steps is not None:
            return self._model_steps.metrics
        return list(self._compiled.metrics)

    @property
    def update_count(self) -> int:
        """Updates so far: ``optimizer.iterations``, or the train steps of a model that runs its
        own (a GAN's step applies two optimizers; the model's own may never move)."""
        return self._engine.update_count()

    @property
    def non_finite(self) -> NonFinitePolicy:
        """The non-finite policy (``Trainer(non_finite=...)``; fixed at construction)."""
        return self._update.non_finite

    def compute_loss(
        self,
        batch: Nested = None,
        training: bool = True,
        *,
        x: Nested = None,
        y: Nested = None,
        y_pred: Nested = None,
        sample_weight: Nested = None,
    ) -> tf.Tensor:
        """Returns the scalar mean loss of ``batch`` and updates the compiled metrics.

        ``batch`` is one element of the input as given: ``(x, y)``, ``(x, y, sample_weight)``
        or ``x``. Override it for a custom loss; call ``self.update_metrics(y, y_pred,
        sample_weight)`` in the override if you want the compiled metrics. The returned value
        must be the *mean* over the batch's examples: accumulation weights it by example count.
        Keras's form works too (``compute_loss(x=, y=, y_pred=, sample_weight=)``: the loss of
        given outputs, no metric updated), called or overridden (docs/subclassing.md).
        """
        extra = getattr(self.model, "losses", None)  # regularization and add_loss terms
        if y_pred is not None:  # Keras's form: the loss of outputs already computed
            return self._compiled.loss_value(x, y, y_pred, sample_weight, training, extra=extra)
        x, y, sample_weight = data_lib.unpack_batch(batch)
        if data_lib.static_batch_size(x) == 0:
            # A replica's share of a batch smaller than the replica count is empty. Its weight
            # is zero; a zero that depends on the weights gives zero gradients (not None), so
            # every replica takes part in the same all-reduce.
            return tf.add_n([tf.reduce_sum(v) * 0.0 for v in self.trainable_variables])
        y_pred = self._call_model(x, training)
        self._labels.count(y, y_pred)  # under XLA: labels outside their output's classes
        # Keras losses divide by the number of replicas under a strategy; tfloop weights each
        # replica's mean by its example count instead (exact for uneven splits), so it
        # multiplies that back.
        replicas = _distribute.replicas(self.strategy)
        loss = self._compiled.loss_value(
            x, y, y_pred, sample_weight, training, replicas=replicas, extra=extra
        )
        user_code(self.update_metrics)(y, y_pred, sample_weight, x=x)
        return loss

    def update_metrics(
        self, y: Nested, y_pred: Nested, sample_weight: Nested = None, x: Nested = None
    ) -> None:
        """Updates every compiled metric with one batch (``Model.compute_metrics``)."""
        self._compiled.update(x, y, y_pred, sample_weight)

    def train_step(self, batch: Nested) -> dict[str, tf.Tensor] | None:
        """One micro-batch: loss on a tape, gradients, then ``apply_gradients``.

        Runs inside the compiled loop. An override may return a dict of scalar tensors; the
        values of the last step of each execution are added to the logs, as returned.
        """
        with tf.GradientTape() as tape:
            loss = self._engine.methods.compute_loss(batch, training=True)
            _checks.check_scalar_loss(loss)
            # Mixed precision: a LossScaleOptimizer scales the loss here and unscales the
            # (accumulated) gradient when it applies it, skipping the update on overflow.
            scaled_loss = self.optimizer.scale_loss(loss)
        gradients = tape.gradient(scaled_loss, self.trainable_variables)
        _checks.check_gradients(gradients, self.trainable_variables, "compute_loss")
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
        loss = self._engine.methods.compute_loss(batch, training=False)
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
        index = _distribute.read_int(self._update.first_non_finite_tensor)
        return self._update.variable_name(index)

    def checkpoint_objects(self) -> dict[str, Any]:
        """What a checkpoint saves of this trainer (its data position is the controller's)."""
        return self._engine.checkpoint_objects(self.optimizer, self.metrics)

    # ------------------------------------------------------------------------------ the API

    def fit(
        self,
        x: Any = None,
        y: Any = None,
        batch_size: int | None = None,
        epochs: int = 1,
        verbose: int = 1,
        callbacks: Any = None,
        *,
        validation_split: float = 0.0,
        validation_data: Any = None,
        shuffle: bool = True,
        class_weight: Any = None,
        sample_weight: Any = None,
        initial_epoch: int | None = None,
        steps_per_epoch: int | None = None,
        validation_steps: int | None = None,
        validation_batch_size: int | None = None,
        validation_freq: int = 1,
        validation_every_n_steps: int | None = None,
        max_steps: int | None = None,
        max_time: Duration | None = None,
    ) -> History:
        """Trains for ``epochs`` epochs and returns the :class:`History` of epoch logs.

        Takes ``model.fit``'s arguments with their meaning (docs/coming-from-keras.md): arrays
        (batched by tfloop, shuffled by seed each epoch), a dataset, ``(x, y)``, a
        ``keras.utils.PyDataset``, a generator or a dataset function
        ``fn(tf.distribute.InputContext)``. ``epochs`` is the epoch to stop at (counted from 0);
        ``callbacks`` are added to the Trainer's for this call. Beyond Keras
        (docs/training-control.md): ``validation_every_n_steps`` validates every n updates,
        ``max_steps`` and ``max_time`` are budgets of the run, counted across resumes (a
        checkpoint records the time spent); a Checkpointer saves at the stop.
        """
        arguments = dict(locals())
        del arguments["self"], arguments["callbacks"]
        plan = plan_fit(
            self.steps_per_execution, self._data_seed, strategy=self.strategy, **arguments
        )
        if getattr(self.model, "built", True):
            self._engine.check_can_train()  # else after the first batch builds the model
        self.stop_training = False
        controller = _coordinator.controller_for(self._engine.fit_hooks(), plan, self.checkpoint)
        self.run_info = controller.info
        try:
            return controller.fit(self, [*self.callbacks, *_config.validate_callbacks(callbacks)])
        finally:
            self._data_seed = controller.data_seed
            self.preempted = controller.preempted
            self.stop_reason = controller.stop_reason

    def evaluate(
        self,
        x: Any = None,
        y: Any = None,
        batch_size: int | None = None,
        verbose: int = 0,
        sample_weight: Any = None,
        steps: int | None = None,
        callbacks: Any = None,
        return_dict: bool = True,
    ) -> Any:
        """Returns the loss and metrics over the data (all of it, or its first ``steps`` batches).

        A dict of the ``fit`` log keys (``return_dict=False``: Keras's list). Under a
        multi-worker strategy each worker reads its shard; the results are the whole data's.

        Examples:
            >>> import numpy as np, keras, tfloop
            >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
            >>> trainer = tfloop.Trainer(model, loss="mse", metrics=["mae"])
            >>> sorted(trainer.evaluate(np.ones((10, 2)), np.ones((10, 1))))
            ['loss', 'mae']
        """
        source = self._engine.adapt(as_data(x, y, sample_weight), steps, batch_size, sharded=True)
        extra = [*_config.validate_callbacks(callbacks), *([ProgressBar()] if verbose else [])]
        logs = self._engine.evaluate(source, CallbackList([*self.callbacks, *extra], self))
        return logs if return_dict else as_list(logs)

    def predict(
        self,
        x: Any,
        batch_size: int | None = None,
        verbose: int = 0,
        steps: int | None = None,
        callbacks: Any = None,
    ) -> Any:
        """Returns the model's outputs for ``x`` as NumPy (nested like the outputs).

        ``x`` is arrays, ``(x, ...)`` tuples or a batched dataset; only ``x`` is used.

        Examples:
            >>> import numpy as np, keras, tfloop
            >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
            >>> tfloop.Trainer(model).predict(np.ones((5, 3))).shape
            (5, 2)
        """
        source = self._engine.adapt(x, steps, batch_size)
        callbacks = CallbackList([*self.callbacks, *_config.validate_callbacks(callbacks)], self)
        return self._engine.predict(source, callbacks)

    def train_on_batch(
        self,
        x: Any,
        y: Any = None,
        sample_weight: Any = None,
        class_weight: Any = None,
        return_dict: bool = True,
    ) -> Any:
        """One update on one batch (a micro-batch under accumulation); returns its logs: the
        metrics of this batch alone, the loss of the forward pass before the update (Keras's)."""
        weights = {} if class_weight is None else {"class_weight": class_weight}
        batch = data_lib.one_batch(as_data(x, y, sample_weight), **weights)
        logs = self._engine.train_on_batch(batch)
        return logs if return_dict else as_list(logs)

    def test_on_batch(
        self, x: Any, y: Any = None, sample_weight: Any = None, return_dict: bool = True
    ) -> Any:
        """The loss and metrics of one batch, as ``evaluate`` computes them."""
        source = data_lib.one_batch(as_data(x, y, sample_weight))
        logs = self._engine.evaluate(source, CallbackList())
        return logs if return_dict else as_list(logs)

    def predict_on_batch(self, x: Any) -> Any:
        """The model's outputs for one batch of ``x``, as NumPy."""
        return self._engine.predict(data_lib.one_batch(x), CallbackList())

    def tracing_count(self, kind: Kind = "train") -> int:
        """How many times the compiled loop of ``kind`` ("train", "test", "predict") was
        traced: one per distinct superbatch shape (0 before it runs, and when eager)."""
        return int(self._engine.loop(kind).tracing_count)

    def export(self, path: str | os.PathLike[str]) -> str:
        """Saves the model for inference without tfloop; returns the path written.

        A path ending in ``.keras`` gets a Keras model file (``keras.models.load_model``);
        any other path a SavedModel directory (``tf.saved_model.load``), which a plain
        ``tf.Module`` is always exported to.
        """
        return export_model(self.model, path)


_OVERRIDABLE = ("compute_loss", "train_step", "test_step", "predict_step", "apply_gradients")


def _overrides(trainer: Trainer, method: str) -> bool:
    """Whether ``trainer``'s class overrides the Trainer's ``method``."""
    return getattr(type(trainer), method) is not getattr(Trainer, method)
