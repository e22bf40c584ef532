"""The engine room under the Trainer: compiled loops, building, evaluation, fit's hooks.

The Trainer tells the story of a step and offers the API; this module turns its step methods
(handed over as callables, with which of them a subclass overrides) into compiled loops, runs
the dry run before them, and drives evaluation and prediction. It imports no Trainer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any, Literal

import tensorflow as tf

from tfloop import _checks, _config, _distribute, _labels, _seeds, _validate
from tfloop import data as data_lib
from tfloop._controller import FitHooks
from tfloop._labels import LabelRangeCheck
from tfloop._logs import INTERNAL, LOSS_COUNT, STEP, floats, metric_results, without
from tfloop._loops import CompiledLoop, LoopSpec
from tfloop._model_steps import ModelSteps, check_has_call, keras_logs, model_overrides
from tfloop._snapshot import unchanged
from tfloop._update import UpdateRule
from tfloop.callbacks import CallbackList

__all__ = ["Engine", "StepMethods"]

Nested = Any
Kind = Literal["train", "test", "predict"]


@dataclasses.dataclass(frozen=True)
class StepMethods:
    """A Trainer's step methods (bound), and which of them its class overrides."""

    train_step: Callable[[Nested], Any]
    test_step: Callable[[Nested], Any]
    predict_step: Callable[[Nested], Any]
    compute_loss: Callable[..., Any]
    metrics: Callable[[], list[Any]]  # the Trainer's metrics (a subclass may add some)
    trainable_variables: Callable[[], list[Any]]
    checkpoint_objects: Callable[[], dict[str, Any]]
    overridden: frozenset[str]
    model_steps: ModelSteps | None = None  # a Keras model that owns its steps


class Engine:
    """Builds and runs the compiled loops of one Trainer."""

    def __init__(
        self,
        methods: StepMethods,
        *,
        model: Any,
        loss: Callable[[], Any],
        compiled: Any,
        update: UpdateRule,
        labels: LabelRangeCheck,
        options: _config.TrainerOptions,
    ) -> None:
        self.methods = methods
        self.labels = labels
        self.model = model
        self.loss = loss
        self.update = update
        self.options = options
        self.compiled = compiled
        self.loops: dict[Kind, CompiledLoop] = {}
        self.dry_run = _checks.DryRun(
            model,
            compiled,
            methods.predict_step,
            methods.compute_loss,
            methods.metrics,
            update.optimizer,
        )
        self.built_training = False

    def model_runs(self, kind: Kind) -> bool:
        """Whether the step of ``kind`` is the model's own (a Keras model that owns its steps,
        and no Trainer subclass override of that step)."""
        return (
            self.methods.model_steps is not None and f"{kind}_step" not in self.methods.overridden
        )

    def step(self, kind: Kind) -> Callable[[Nested], Any]:
        """The step of ``kind`` the loop runs: the model's own where it runs it, else the
        Trainer's (tfloop's, or a subclass's override)."""
        model_steps = self.methods.model_steps
        if model_steps is not None and self.model_runs(kind):
            return getattr(model_steps, f"{kind}_step")  # type: ignore[no-any-return]
        return getattr(self.methods, f"{kind}_step")  # type: ignore[no-any-return]

    @property
    def counts_model_steps(self) -> bool:
        """Whether updates are counted as the model's train steps (see ``_model_steps.py``)."""
        return self.model_runs("train")

    def check_model_step(self, kind: Kind) -> None:
        """Before the model's step of ``kind`` runs: Keras's default step calls the model."""
        if self.model_runs(kind) and f"{kind}_step" not in model_overrides(self.model):
            check_has_call(self.model, f"Keras's default {kind}_step")

    def scope(self) -> Any:
        return _distribute.scope(self.options.strategy)

    # ------------------------------------------------------------------------------ results

    def metric_results(self) -> dict[str, Any]:
        metrics = self.methods.metrics()
        results = metric_results(metrics)
        tracker = self.compiled.loss_tracker
        if any(metric is tracker for metric in metrics):
            results[LOSS_COUNT] = tf.identity(tracker.count)
        results.update(self.labels.results())
        return results

    def results(self) -> dict[str, Any]:
        results = {**self.metric_results(), **self.update.results()}
        if self.counts_model_steps:
            assert self.methods.model_steps is not None
            results[STEP] = self.methods.model_steps.update_count()
        return results

    def update_count(self) -> int:
        """Updates made so far (``Trainer.update_count``)."""
        model_steps = self.methods.model_steps
        if model_steps is not None and self.counts_model_steps:
            return _distribute.read_int(model_steps.steps_run)
        return _distribute.read_int(self.update.optimizer.iterations)

    def logs(self, results: Any, step_logs: Any) -> dict[str, float]:
        """An execution's logs from its results and its last step's return value: the step's
        values over the metrics' (a Trainer's own steps), or as ``model.fit`` chooses between
        them for a model's own steps (``_model_steps.keras_logs``)."""
        if self.methods.model_steps is not None:
            return keras_logs(results, step_logs)
        return floats({**results, **(step_logs or {})})

    def reset_metrics(self) -> None:
        for metric in self.methods.metrics():
            metric.reset_state()
        self.labels.reset()

    def checkpoint_objects(self, optimizer: Any, metrics: list[Any]) -> dict[str, Any]:
        """What a checkpoint saves of a Trainer: model, optimizer, metrics, seed generators,
        the update rule's window and counters, and a model's own train-step count."""
        objects = {
            "model": self.model,
            "optimizer": optimizer,
            "metrics": [v for metric in metrics for v in metric.variables],
            "seed_generators": _seeds.seed_generator_states(self.model),
            **self.update.checkpoint_objects(),
        }
        if self.methods.model_steps is not None:
            objects["model_train_steps"] = self.methods.model_steps.steps_run
        return objects

    # -------------------------------------------------------------------------------- loops

    def loop(self, kind: Kind) -> CompiledLoop:
        if kind not in self.loops:
            self.loops[kind] = CompiledLoop(self.loop_spec(kind))
        return self.loops[kind]

    def loop_spec(self, kind: Kind) -> LoopSpec:
        """What the loop of ``kind`` is made of: which step methods a subclass overrides, and
        whether XLA is on."""
        methods, options = self.methods, self.options
        jit, fallback = _config.jit_choice(
            options.jit_compile, self.model, options.strategy, model_step=self.model_runs(kind)
        )
        returns_logs = f"{kind}_step" in methods.overridden or self.model_runs(kind)
        step = self.step(kind)
        # Under XLA TensorFlow's kernels no longer check label ranges: the step counts them.
        self.labels.enable(jit and not options.run_eagerly, _labels.ignored_classes(self.loss()))
        check = self.labels.check if kind != "predict" else None
        if kind == "train":
            # A step adds exactly one micro-batch (may unroll): tfloop's train_step, unguarded.
            overridden = returns_logs or "apply_gradients" in methods.overridden
            window = self.update if self.update.accumulator is not None else None
            unroll = not (overridden or self.update.guards)
            spec = LoopSpec(kind, step, self.results, returns_logs, window, unroll)
        elif kind == "test":
            spec = LoopSpec(kind, step, self.metric_results, returns_logs)
        else:
            spec = LoopSpec(kind, step, returns_logs=returns_logs)
        return dataclasses.replace(
            spec,
            strategy=options.strategy,
            jit=jit,
            jit_fallback=fallback,
            eager=options.run_eagerly,
            check=check,
        )

    def build(self, batch: Nested, training: bool, argument: str = "data") -> None:
        """Creates everything the compiled loop needs, checking the data against the model
        with a dry run (``_checks.py``) for each new input signature."""
        overridden = self.methods.overridden
        overrides_loss = "compute_loss" in overridden
        kind: Kind = "train" if training else "test"
        step = f"{kind}_step"
        self.check_model_step(kind)
        with self.scope():
            if self.methods.model_steps is not None and self.model_runs(kind):
                self.methods.model_steps.build(batch)
            if not self.model_runs(kind):
                # A model's own step is its code, run as model.fit runs it (unchecked there).
                self.dry_run.check(
                    batch,
                    overrides_loss=overrides_loss,
                    # A step override that never calls the default compute_loss (loss=None)
                    # has no loss to check here; its own code runs when the loop is traced.
                    checks_loss=overrides_loss or self.loss() is not None or step not in overridden,
                    argument=argument,
                )
            if training and not self.built_training:
                if not self.counts_model_steps:  # the model's step applies its own optimizer
                    self.check_can_train()  # an unbuilt model has its variables only now
                    self.update.build(self.methods.trainable_variables())
                _seeds.reseed_generators(self.model, self.options.seed)
                self.built_training = True

    def check_input(self, source: data_lib.DataSource, argument: str) -> None:
        """Checks a whole input before training: validation data gets the dry run too, and
        the integer labels of in-memory arrays lie in their output's class range (all of them,
        not only those of the dry run's batch)."""
        if argument != "x":
            self.build(source.stream(0).first_batch(), training=False, argument=argument)
        arrays = getattr(source, "arrays", None)
        if source.indexed and arrays is not None:
            _, y, _ = data_lib.unpack_batch(arrays)
            ignored = _labels.ignored_classes(self.loss())
            _labels.check_sparse_labels(y, self.dry_run.outputs, argument, ignored)

    def check_can_train(self) -> None:
        if self.counts_model_steps:
            return
        overridden = self.methods.overridden
        _checks.check_can_train(
            self.loss(),
            self.methods.trainable_variables(),
            overrides_loss="compute_loss" in overridden,
            overrides_step="train_step" in overridden,
        )

    # ---------------------------------------------------------------------- running them

    def fit_hooks(self) -> FitHooks:
        return FitHooks(
            build=lambda batch: self.build(batch, training=True),
            check_data=self.check_input,
            train_loop=lambda: self.loop("train"),
            evaluate=self.evaluate,
            results=self.results,
            logs=self.logs,
            reset_metrics=self.reset_metrics,
            checkpoint_objects=self.methods.checkpoint_objects,
            update_count=self.update_count,
            micro_batches_per_update=self.options.accumulate_steps,
            strategy=self.options.strategy,
            scope=self.scope,
        )

    def adapt(
        self, data: Any, steps: Any, batch_size: Any, *, sharded: bool = False
    ) -> data_lib.DataSource:
        """``data`` for evaluate or predict: unshuffled, ``steps`` batches (None: all);
        ``sharded``: each worker of a ``MultiWorkerMirroredStrategy`` reads its shard."""
        strategy = _distribute.evaluation_shards(self.options.strategy) if sharded else None
        return data_lib.adapt(
            data,
            batch_size=batch_size,
            steps_per_execution=self.options.steps_per_execution,
            steps=_validate.optional_count(steps, "steps"),
            shuffle=False,
            strategy=strategy,
        )

    def evaluate(self, source: data_lib.DataSource, callbacks: CallbackList) -> dict[str, float]:
        """One evaluation pass over ``source`` (its first ``source.steps`` batches)."""
        stream = source.stream(0)
        self.build(stream.first_batch(), training=False)
        self.reset_metrics()
        chunks = stream.chunks(source.steps_per_execution, source.steps)
        return run_evaluation(
            self.loop("test"), chunks, callbacks, self.logs, per_worker=source.per_worker
        )

    def predict(self, source: data_lib.DataSource, callbacks: CallbackList) -> Any:
        stream = source.stream(0)
        self.check_model_step("predict")
        with self.scope(), unchanged(self.dry_run.kept_variables()):
            _checks.check_model_accepts(self.step("predict"), stream.first_batch(), self.model)
        callbacks.on_predict_start({})
        outputs = self.loop("predict").predict(
            stream.chunks(source.steps_per_execution, source.steps)
        )
        callbacks.on_predict_end({})
        return outputs

    def train_on_batch(self, source: data_lib.DataSource) -> dict[str, float]:
        """One train step on a source of one batch; its logs (the metrics reset first)."""
        batch = source.stream(0)
        self.build(batch.first_batch(), training=True)
        self.reset_metrics()
        chunk = batch.next_chunk(1)
        assert chunk is not None
        results, step_logs = self.loop("train")(*chunk, -1)
        return without(self.logs(results, step_logs), INTERNAL)


def run_evaluation(
    loop: Callable[..., Any],
    chunks: Iterable[tuple[Nested, int, int]],
    callbacks: CallbackList,
    make_logs: Callable[[Any, Any], dict[str, float]],
    per_worker: bool = False,
) -> dict[str, float]:
    """One evaluation pass: ``loop`` over ``chunks`` (``per_worker``: this worker's shard),
    with the eval events; returns the logs of the last execution (the running metrics, which
    sum over every replica's examples: those of the whole pass)."""
    callbacks.on_eval_start({})
    logs: dict[str, float] = {}
    for piece, start, stop in chunks:
        results, step_logs = loop(piece, start, stop, per_worker=per_worker)
        logs = make_logs(results, step_logs)
    callbacks.on_eval_end(logs)
    return logs
