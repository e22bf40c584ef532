"""The host side of ``fit``: when to train, validate, save and stop (Orbit's controller).

The Trainer says what one step does; the :class:`Controller` decides when things happen between
compiled executions: it feeds the compiled loop chunks of steps, sizes each chunk so that a
checkpoint or a validation every n updates, ``max_steps`` or the end of an epoch lands exactly,
calls the callbacks, validates, saves, stops on a budget, and resumes from a checkpoint. It
knows no Trainer: it is built from :class:`FitHooks` (the step-level operations the Trainer
hands over), a ``FitPlan`` (the validated arguments), the callbacks and the checkpointer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from time import perf_counter
from typing import Any

import tensorflow as tf

from tfloop import _distribute
from tfloop._cadence import Deadline, EveryNSteps
from tfloop._fit_args import FitPlan
from tfloop._logs import BATCH, COUNTERS, STEP, WINDOW, without
from tfloop.callbacks import (
    Callback,
    CallbackList,
    History,
    ProgressBar,
    RunInfo,
    TrainerView,
)
from tfloop.checkpoint import Checkpointer, position_of
from tfloop.data import DataSource, StepStream
from tfloop.errors import CheckpointError, DataError

__all__ = ["Controller", "FitHooks", "StopReason"]

logger = logging.getLogger("tfloop")

Nested = Any
StopReason = str  # "epochs" | "max_steps" | "max_time" | "stop_training" | "preempted"


@dataclasses.dataclass
class FitHooks:
    """What the controller runs, handed over by the Trainer (Orbit's runner)."""

    build: Callable[[Nested], None]  # builds everything training needs, on one batch
    check_data: Callable[[DataSource, str], None]  # checks a whole input (its argument name)
    train_loop: Callable[[], Callable[..., Any]]  # the compiled train loop (after build)
    evaluate: Callable[[DataSource, CallbackList], dict[str, float]]  # a validation pass
    results: Callable[[], Mapping[str, Any]]  # metric results and counters, read eagerly
    # an execution's logs from its results and its last step's return value
    logs: Callable[[Mapping[str, Any], Any], dict[str, float]]
    reset_metrics: Callable[[], None]
    checkpoint_objects: Callable[[], Mapping[str, Any]]  # what a checkpoint saves
    update_count: Callable[[], int]  # updates so far (optimizer.iterations, or the model's)
    micro_batches_per_update: int = 1
    strategy: tf.distribute.Strategy | None = None
    scope: Callable[[], Any] = contextlib.nullcontext


class Controller:
    """Runs one ``fit`` call: builds, restores, trains epoch by epoch, validates, saves."""

    def __init__(self, hooks: FitHooks, plan: FitPlan, checkpointer: Checkpointer | None) -> None:
        self.hooks = hooks
        self.plan = plan
        self.checkpointer = checkpointer
        self.info = RunInfo(
            in_fit=True,
            epochs=plan.epochs,
            steps_per_epoch=plan.steps_per_epoch or plan.source.steps_per_epoch,
            validates=plan.validation is not None,
            epoch=plan.initial_epoch,
            validation_every_n_steps=plan.validation_every_n_steps,
            max_steps=plan.max_steps,
            chief=_distribute.is_chief(hooks.strategy),
        )
        self.callbacks = CallbackList()
        self.trainer: TrainerView | None = None  # its stop_training stops the run
        self.stateful: Sequence[Callback] = ()  # the callbacks a checkpoint saves the state of
        self.data_seed = plan.data_seed
        self.stop_reason: StopReason | None = None
        self.budget_spent: StopReason | None = None  # "max_steps" / "max_time" once reached
        self.preempted = False
        self.train: Callable[..., Any] | None = None
        self.stream: StepStream | None = None
        self.epoch = plan.initial_epoch
        self.batch = 0  # micro-batches done in the current epoch
        self.step = 0  # optimizer updates so far
        self.window = 0  # micro-batches in the open accumulation window
        self.history = History()
        every = plan.validation_every_n_steps
        self.every_validation = EveryNSteps(every) if every is not None else None
        # The run's time (spent before a resume too, from the checkpoint) and max_time.
        self.deadline = Deadline(plan.max_time or math.inf, plan.clock)
        self.last_validation: tuple[tuple[int, int, int], dict[str, float]] | None = None
        self.last_logs: dict[str, float] = {}

    def fit(self, trainer: TrainerView, callbacks: Sequence[Callback]) -> History:
        """The whole ``fit``: ``callbacks`` (plus a History, and a ProgressBar if verbose) see
        ``trainer``; returns the History."""
        # The run's time counts from here (build and restore included), plus a resumed run's.
        self.deadline = Deadline(self.plan.max_time or math.inf, self.plan.clock)
        history = self.history
        extra: list[Callback] = [history, *([ProgressBar()] if self.plan.verbose else [])]
        self.trainer = trainer
        self.callbacks = CallbackList([*callbacks, *extra], trainer=trainer)
        self.stateful = list(callbacks)
        try:
            self.start()
            self.run()
        finally:
            self.info.in_fit = False
            # A PyDataset's workers stop here, not when garbage collection gets to them.
            self.plan.source.close()
            if self.plan.validation is not None:
                self.plan.validation.close()
        return history

    # ------------------------------------------------------------------------- start

    def start(self) -> None:
        """Settles the checkpoint to resume from, makes the stream, builds and restores."""
        checkpointer, source = self.checkpointer, self.plan.source
        latest = None
        if checkpointer is not None:
            checkpointer.check_writable()
            checkpointer.check_input(source)
            checkpointer.remove_temporary_files()
            latest = checkpointer.latest_readable()
            self._check_workers_agree(latest)
            if latest is not None:
                self._check_resumable(latest[1], latest[0])
        # The stream to resume (or start) is made first and only once: the build below needs a
        # batch, and a dataset's shuffle order depends on how many iterators were made.
        if latest is not None:
            position = position_of(latest[1])
            self.data_seed = int(latest[1]["data_seed"])
            source.reseed(self.data_seed)
            self.stream = source.resume(
                position,
                persistent=self.plan.persistent,
                steps_per_epoch=self.plan.steps_per_epoch,
            )
        else:
            self.stream = source.first_stream(self.plan.initial_epoch)
        first = self.stream.peek_batch()
        if first is None and latest is not None:
            # Resuming at the very end of an epoch: nothing is left in this stream.
            first = source.example_batch()
        if first is None:
            raise DataError("data yielded no batches; pass a non-empty dataset.")
        with self.hooks.scope():
            self.hooks.build(first)
        self.hooks.check_data(source, "x")
        if self.plan.validation is not None:
            self.hooks.check_data(self.plan.validation, "validation_data")
        if checkpointer is not None:
            checkpointer.bind(self.hooks.checkpoint_objects(), self.hooks.strategy)
            checkpointer.bind_monitor(self.trainer)
            if latest is not None:
                path, metadata = latest
                checkpointer.restore_into(path, metadata, self.stream)
                source.restored(position_of(metadata))
                self._resume_from(metadata, path)
        self.step = self._updates()
        self.train = self.hooks.train_loop()

    def _check_workers_agree(self, latest: tuple[str, dict[str, Any]] | None) -> None:
        """Under ``MultiWorkerMirroredStrategy``: stops if the workers would restore different
        checkpoints (restoring is itself a collective, so this is checked first)."""
        strategy = self.hooks.strategy
        if not _distribute.is_multi_worker(strategy):
            return
        step = int(latest[1].get("step", -1)) if latest is not None else 0
        steps = sorted(set(_distribute.gather_from_replicas(strategy, step)))
        if len(steps) > 1:
            raise CheckpointError(
                f"the workers would restore different checkpoints (at updates {steps}). Give "
                "every worker the same checkpoint directory, on storage all of them read: only "
                "the chief writes there, and every worker restores from it."
            )

    def _check_resumable(self, metadata: dict[str, Any], path: str) -> None:
        """Before anything is restored: the checkpoint's position means the same here."""
        for name, now in (
            ("batch_size", self.plan.source.batch_size),
            ("steps_per_epoch", self.info.steps_per_epoch),
        ):
            then = metadata.get(name, now)
            if then != now:
                raise CheckpointError(
                    f"checkpoint {path} was written by a run with {name}={then}, this fit has "
                    f"{name}={now}: its position (epoch {metadata['epoch']}, batch "
                    f"{metadata['batch']}) would point at other examples. Resume with the same "
                    "arguments, or pass Checkpointer(restore=None) to start fresh."
                )

    def _resume_from(self, metadata: dict[str, Any], path: str) -> None:
        self.epoch = int(metadata["epoch"])
        self.batch = int(metadata["batch"])
        self.window = int(metadata.get("window", 0))
        self.deadline.before = float(metadata.get("seconds_spent", 0.0))
        saved = metadata.get("callbacks", {})
        if "history" in metadata:
            self.history.load_state_dict(metadata["history"])
        for key, callback in _keyed(self.stateful):
            if key in saved:
                callback.load_state_dict(saved[key])
        message = (
            f"tfloop: resuming from {path} at epoch {self.epoch + 1}, batch {self.batch} "
            f"(step {metadata['step']})"
        )
        logger.info(message)
        if self.plan.verbose:
            print(message, flush=True)

    # --------------------------------------------------------------------------- run

    def run(self) -> None:
        plan, checkpointer = self.plan, self.checkpointer
        if checkpointer is not None:
            checkpointer.install_signal_handlers()
        try:
            self.callbacks.on_fit_start({})
            self._check_budgets()  # a run resumed at its max_steps trains nothing
            while self.epoch < plan.epochs and not self._stopping():
                resumed = self.batch > 0
                if self.stream is None:
                    self.stream = plan.source.stream(self.epoch, 0)
                logs, complete = self._train_epoch(resumed)
                # A preemption or a spent budget stops mid-epoch without an epoch end: the
                # resumed run finishes the epoch (a stop_training does end it, as in Keras).
                spent = self.budget_spent is not None and not complete
                if self._stopping() and (self._preempted() or spent):
                    break
                self._end_epoch(logs)
                if self.epoch < plan.epochs:
                    self._check_budgets()
            if self.budget_spent is not None and checkpointer is not None:
                self._save(self.last_logs)  # the stop is a checkpoint (none twice)
            if checkpointer is not None:
                checkpointer.wait()  # the last checkpoint is complete before fit ends
            self.callbacks.on_fit_end({})
        finally:
            if checkpointer is not None:
                checkpointer.wait(raise_error=False)  # only left pending if fit is raising
                checkpointer.uninstall_signal_handlers()
        self.preempted = self._preempted()
        if self.preempted:
            self.stop_reason = "preempted"
        elif self.budget_spent is not None and self.epoch < plan.epochs:
            self.stop_reason = self.budget_spent  # the budget cut the run short
        elif self.trainer is not None and self.trainer.stop_training:
            self.stop_reason = "stop_training"
        else:
            self.stop_reason = "epochs"
        if self.preempted and checkpointer is not None and checkpointer.exit_code is not None:
            sys.exit(checkpointer.exit_code)

    def _updates(self) -> int:
        return self.hooks.update_count()

    def _stopping(self) -> bool:
        if self.budget_spent is not None:
            return True
        return self.trainer is not None and bool(self.trainer.stop_training)

    def _check_budgets(self) -> None:
        """Notes a spent ``max_steps`` or ``max_time`` (checked at execution boundaries)."""
        if self.budget_spent is not None:
            return
        if self.plan.max_steps is not None and self.step >= self.plan.max_steps:
            self.budget_spent = "max_steps"
        elif self.plan.max_time is not None and self._time_is_up():
            self.budget_spent = "max_time"

    def _time_is_up(self) -> bool:
        """Whether the run's ``max_time`` is spent. Under ``MultiWorkerMirroredStrategy`` the
        workers, each with its own clock, agree (a collective) so that all stop together."""
        expired = self.deadline.expired()
        strategy = self.hooks.strategy
        if _distribute.is_multi_worker(strategy):
            expired = any(_distribute.gather_from_replicas(strategy, int(expired)))
        return expired

    def _end_epoch(self, logs: dict[str, float]) -> None:
        """Validation (every ``validation_freq`` epochs), ``on_epoch_end``, the epoch's save."""
        plan, checkpointer, epoch = self.plan, self.checkpointer, self.epoch
        if plan.validation is not None and plan.validates_after(epoch):
            here = (self.epoch, self.batch, self.step)
            if self.last_validation is not None and self.last_validation[0] == here:
                results = self.last_validation[1]  # validated at this very update already
            else:
                results = self._validate(step_validation=False)
            logs.update({f"val_{name}": value for name, value in results.items()})
        self.callbacks.on_epoch_end(epoch, logs)
        self.epoch, self.batch = epoch + 1, 0
        if not plan.persistent:
            self.stream = None
        if checkpointer is not None:
            value = checkpointer.monitored(logs)
            if checkpointer.every_epoch or value is not None:
                self._save(logs, value)

    def _validate(self, *, step_validation: bool) -> dict[str, float]:
        """One validation pass, its eval events (``on_eval_end`` with ``step``); returns the
        results by their plain names. A validation of ``validation_every_n_steps`` happens
        mid-epoch: the training metrics' running state is put back after it."""
        assert self.plan.validation is not None and self.trainer is not None
        saved = _distribute.save_values(_metric_variables(self.trainer)) if step_validation else []
        self.info.step_validation = step_validation
        try:
            self.callbacks.on_eval_start({})
            results = self.hooks.evaluate(self.plan.validation, CallbackList())
            self.callbacks.on_eval_end({**results, STEP: float(self.step)})
        finally:
            self.info.step_validation = False
            _distribute.restore_values(saved)
        self.last_validation = ((self.epoch, self.batch, self.step), results)
        return results

    def _stop(self) -> None:
        assert self.trainer is not None
        self.trainer.stop_training = True

    def _preempted(self) -> bool:
        return self.checkpointer is not None and self.checkpointer.preempted

    def _train_epoch(self, resumed: bool) -> tuple[dict[str, float], bool]:
        """Trains the rest of the epoch; returns its logs and whether it ran to its end."""
        hooks, plan = self.hooks, self.plan
        assert self.stream is not None and self.train is not None
        stream, steps_per_epoch = self.stream, plan.steps_per_epoch
        if not resumed:
            hooks.reset_metrics()
        self.info.epoch = self.epoch
        self.info.input_seconds = 0.0
        self.callbacks.on_epoch_start(self.epoch, {})
        step_logs: Any = None  # what the last step returned
        ran, complete = 0, True
        while steps_per_epoch is None or self.batch < steps_per_epoch:
            waiting = perf_counter()  # the stream pulls from the iterator when it needs to
            chunk = stream.next_chunk(self._chunk_limit())
            if chunk is None:
                self.info.input_seconds += perf_counter() - waiting
                if steps_per_epoch is not None:
                    logger.warning(
                        "tfloop: data ran out after %d of steps_per_epoch=%d batches in epoch "
                        "%d; training stops. Use dataset.repeat() for more epochs.",
                        self.batch,
                        steps_per_epoch,
                        self.epoch,
                    )
                    self._stop()
                break
            piece, start, stop = chunk
            self.batch += stop - start
            ran += stop - start
            epoch_over = self.batch == steps_per_epoch or (
                steps_per_epoch is None and not stream.has_next()
            )
            self.info.input_seconds += perf_counter() - waiting
            # The step that ends the epoch also ends its accumulation window, however partial.
            flush_at = stop - 1 if epoch_over else -1
            per_worker = plan.source.per_worker
            # A step marker for the profiler's overview page (about a microsecond when off).
            with tf.profiler.experimental.Trace("train", step_num=self.step, _r=1):
                results, step_logs = self.train(piece, start, stop, flush_at, per_worker=per_worker)
            logs = hooks.logs(results, step_logs)
            last_step, self.step = self.step, int(logs[STEP])
            self.window = int(logs.pop(WINDOW, 0))
            logs[BATCH] = float(self.batch - 1)
            self.callbacks.on_train_batch_end(self.batch - 1, logs)
            self.last_logs = logs
            value = None
            if self.every_validation is not None and self.every_validation.crossed(
                last_step, self.step
            ):
                results = self._validate(step_validation=True)
                if self.checkpointer is not None:
                    value = self.checkpointer.monitored(
                        {f"val_{k}": v for k, v in results.items()}, validation_only=True
                    )
            checkpointer = self.checkpointer
            if checkpointer is not None and (
                checkpointer.due(self.step, last_step) or value is not None
            ):
                self._save(logs, value)
                if checkpointer.preempted:
                    self._stop()
            self._check_budgets()
            if self._stopping():
                complete = epoch_over
                break
        if ran == 0 and not resumed and self.batch == 0:
            raise DataError(f"data yielded no batches in epoch {self.epoch}.")
        logs = hooks.logs(without(hooks.results(), [WINDOW]), step_logs)
        return without(logs, COUNTERS), complete

    def _chunk_limit(self) -> int:
        plan = self.plan
        limit = plan.source.steps_per_execution
        if plan.steps_per_epoch is not None:
            limit = min(limit, plan.steps_per_epoch - self.batch)
        # Updates until something due at an exact update count: a save, a validation, the end.
        targets = [
            None if self.checkpointer is None else self.checkpointer.steps_until_save(self.step),
            None if self.every_validation is None else self.every_validation.until_next(self.step),
            None if plan.max_steps is None else plan.max_steps - self.step,
        ]
        updates = min((t for t in targets if t is not None), default=None)
        if updates is not None:
            # Land on the micro-batch that completes that update.
            micro_batches = updates * self.hooks.micro_batches_per_update - self.window
            limit = min(limit, max(1, micro_batches))
        return max(1, limit)

    def _save(self, logs: dict[str, float], value: float | None = None) -> None:
        checkpointer = self.checkpointer
        assert checkpointer is not None
        stream = self.stream if (self.plan.persistent or self.batch > 0) else None
        if stream is not None and stream.iterator is None:
            stream = None
        state = {
            # What the position means: another batch size would resume at other examples.
            "batch_size": self.plan.source.batch_size,
            "steps_per_epoch": self.info.steps_per_epoch,
            "data_seed": self.data_seed,
            "window": self.window,
            "seconds_spent": self.deadline.spent(),  # what max_time a resumed run has left
            "callbacks": {key: callback.state_dict() for key, callback in _keyed(self.stateful)},
            "history": self.history.state_dict(),
        }
        position = self.plan.source.position(self.epoch, self.batch, self.stream)
        path = checkpointer.save(self._updates(), position, stream, state, value=value)
        if path is not None:
            if any(_defines_on_checkpoint(callback) for callback in self.callbacks.callbacks):
                checkpointer.wait()  # on_checkpoint is promised a complete checkpoint
            self.callbacks.on_checkpoint(path, logs)


def _metric_variables(trainer: TrainerView) -> list[Any]:
    return [variable for metric in trainer.metrics for variable in metric.variables]


def _defines_on_checkpoint(callback: Any) -> bool:
    return type(callback).on_checkpoint is not Callback.on_checkpoint


def _keyed(callbacks: Sequence[Callback]) -> list[tuple[str, Callback]]:
    return [(f"{index}:{type(cb).__name__}", cb) for index, cb in enumerate(callbacks)]
