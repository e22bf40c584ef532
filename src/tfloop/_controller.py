"""The host side of ``fit``: when to train, validate, save and stop (Orbit's controller).

The Trainer says what one step does; the :class:`Controller` decides when things happen between
compiled executions: it feeds the compiled loop chunks of steps, sizes each chunk so that a
checkpoint every n updates or the end of an epoch lands exactly, calls the callbacks, saves,
and resumes from a checkpoint. It knows no Trainer: it is built from :class:`FitHooks` (the
step-level operations the Trainer hands over), a ``FitPlan`` (the validated arguments),
the callbacks and the checkpointer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from time import perf_counter
from typing import Any

import tensorflow as tf

from tfloop import _distribute
from tfloop._fit_args import FitPlan
from tfloop._logs import BATCH, COUNTERS, STEP, WINDOW, floats, without
from tfloop.callbacks import (
    Callback,
    CallbackList,
    History,
    ProgressBar,
    RunInfo,
    TrainerView,
)
from tfloop.callbacks.base import update_count
from tfloop.checkpoint import Checkpointer, position_of
from tfloop.data import DataSource, StepStream
from tfloop.errors import CheckpointError, DataError

__all__ = ["Controller", "FitHooks", "StopReason", "run_evaluation"]

logger = logging.getLogger("tfloop")

Nested = Any
StopReason = str  # "epochs" | "stop_training" | "preempted"


@dataclasses.dataclass
class FitHooks:
    """What the controller runs, handed over by the Trainer (Orbit's runner)."""

    build: Callable[[Nested], None]  # builds everything training needs, on one batch
    train_loop: Callable[[], Callable[..., Any]]  # the compiled train loop (after build)
    evaluate: Callable[[DataSource, CallbackList], dict[str, float]]  # a validation pass
    results: Callable[[], Mapping[str, Any]]  # metric results and counters, read eagerly
    reset_metrics: Callable[[], None]
    checkpoint_objects: Callable[[], Mapping[str, Any]]  # what a checkpoint saves
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
        )
        self.callbacks = CallbackList()
        self.trainer: TrainerView | None = None  # its stop_training stops the run
        self.stateful: Sequence[Callback] = ()  # the callbacks a checkpoint saves the state of
        self.data_seed = plan.data_seed
        self.stop_reason: StopReason | None = None
        self.preempted = False
        self.train: Callable[..., Any] | None = None
        self.stream: StepStream | None = None
        self.epoch = plan.initial_epoch
        self.batch = 0  # micro-batches done in the current epoch
        self.step = 0  # optimizer updates so far
        self.window = 0  # micro-batches in the open accumulation window

    def fit(self, trainer: TrainerView, callbacks: Sequence[Callback]) -> History:
        """The whole ``fit``: ``callbacks`` (plus a History, and a ProgressBar if verbose) see
        ``trainer``; returns the History."""
        history = History()
        extra: list[Callback] = [history, *([ProgressBar()] if self.plan.verbose else [])]
        self.trainer = trainer
        self.callbacks = CallbackList([*callbacks, *extra], trainer=trainer)
        self.stateful = list(callbacks)
        try:
            self.start()
            self.run()
        finally:
            self.info.in_fit = False
        return history

    # ------------------------------------------------------------------------- start

    def start(self) -> None:
        """Settles the checkpoint to resume from, makes the stream, builds and restores."""
        checkpointer, source = self.checkpointer, self.plan.source
        latest = None
        if checkpointer is not None:
            checkpointer.check_writable()
            checkpointer.remove_temporary_files()
            latest = checkpointer.latest_readable()
            self._check_workers_agree(latest)
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
        if checkpointer is not None:
            checkpointer.bind(self.hooks.checkpoint_objects(), self.hooks.strategy)
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

    def _resume_from(self, metadata: dict[str, Any], path: str) -> None:
        self.epoch = int(metadata["epoch"])
        self.batch = int(metadata["batch"])
        self.window = int(metadata.get("window", 0))
        saved = metadata.get("callbacks", {})
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
        hooks, plan, checkpointer = self.hooks, self.plan, self.checkpointer
        if checkpointer is not None:
            checkpointer.install_signal_handlers()
        try:
            self.callbacks.on_fit_start({})
            while self.epoch < plan.epochs and not self._stopping():
                resumed = self.batch > 0
                if self.stream is None:
                    self.stream = plan.source.stream(self.epoch, 0)
                logs = self._train_epoch(resumed)
                if self._stopping() and self._preempted():
                    break
                epoch = self.epoch
                if plan.validation is not None and plan.validates_after(epoch):
                    results = hooks.evaluate(plan.validation, self.callbacks)
                    logs.update({f"val_{name}": value for name, value in results.items()})
                self.callbacks.on_epoch_end(epoch, logs)
                self.epoch, self.batch = epoch + 1, 0
                if not plan.persistent:
                    self.stream = None
                if checkpointer is not None and checkpointer.every_epoch:
                    self._save(logs)
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
        elif self._stopping():
            self.stop_reason = "stop_training"
        else:
            self.stop_reason = "epochs"
        if self.preempted and checkpointer is not None and checkpointer.exit_code is not None:
            sys.exit(checkpointer.exit_code)

    def _updates(self) -> int:
        assert self.trainer is not None
        return update_count(self.trainer)

    def _stopping(self) -> bool:
        return self.trainer is not None and bool(self.trainer.stop_training)

    def _stop(self) -> None:
        assert self.trainer is not None
        self.trainer.stop_training = True

    def _preempted(self) -> bool:
        return self.checkpointer is not None and self.checkpointer.preempted

    def _train_epoch(self, resumed: bool) -> dict[str, float]:
        hooks, plan = self.hooks, self.plan
        assert self.stream is not None and self.train is not None
        stream, steps_per_epoch = self.stream, plan.steps_per_epoch
        if not resumed:
            hooks.reset_metrics()
        self.info.epoch = self.epoch
        self.info.input_seconds = 0.0
        self.callbacks.on_epoch_start(self.epoch, {})
        step_logs: dict[str, float] = {}
        ran = 0
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
            results, raw_step_logs = self.train(piece, start, stop, flush_at)
            logs = floats(results)
            step_logs = floats(raw_step_logs or {})
            last_step, self.step = self.step, int(logs[STEP])
            self.window = int(logs.pop(WINDOW, 0))
            logs.update(step_logs)
            logs[BATCH] = float(self.batch - 1)
            self.callbacks.on_train_batch_end(self.batch - 1, logs)
            checkpointer = self.checkpointer
            if checkpointer is not None and checkpointer.due(self.step, last_step):
                self._save(logs)
                if checkpointer.preempted:
                    self._stop()
            if self._stopping():
                break
        if ran == 0 and not resumed and self.batch == 0:
            raise DataError(f"data yielded no batches in epoch {self.epoch}.")
        logs = floats(without(hooks.results(), [WINDOW]))
        logs.update(step_logs)
        return without(logs, COUNTERS)

    def _chunk_limit(self) -> int:
        limit = self.plan.source.steps_per_execution
        if self.plan.steps_per_epoch is not None:
            limit = min(limit, self.plan.steps_per_epoch - self.batch)
        checkpointer = self.checkpointer
        if checkpointer is not None:
            updates = checkpointer.steps_until_save(self.step)
            if updates is not None:
                # Land on the micro-batch that completes the update a save is due at.
                micro_batches = updates * self.hooks.micro_batches_per_update - self.window
                limit = min(limit, max(1, micro_batches))
        return max(1, limit)

    def _save(self, logs: dict[str, float]) -> None:
        checkpointer = self.checkpointer
        assert checkpointer is not None
        stream = self.stream if (self.plan.persistent or self.batch > 0) else None
        if stream is not None and stream.iterator is None:
            stream = None
        state = {
            "data_seed": self.data_seed,
            "window": self.window,
            "callbacks": {key: callback.state_dict() for key, callback in _keyed(self.stateful)},
        }
        position = self.plan.source.position(self.epoch, self.batch, self.stream)
        path = checkpointer.save(self._updates(), position, stream, state)
        if path is not None:
            if any(_defines_on_checkpoint(callback) for callback in self.callbacks.callbacks):
                checkpointer.wait()  # on_checkpoint is promised a complete checkpoint
            self.callbacks.on_checkpoint(path, logs)


def run_evaluation(
    loop: Callable[..., Any], chunks: Iterable[tuple[Nested, int, int]], callbacks: CallbackList
) -> dict[str, float]:
    """One evaluation pass: ``loop`` over ``chunks``, with the eval events; returns the logs
    of the last execution (the running metrics, so those of the whole pass)."""
    callbacks.on_eval_start({})
    logs: dict[str, float] = {}
    for piece, start, stop in chunks:
        results, step_logs = loop(piece, start, stop)
        logs = floats({**results, **(step_logs or {})})
    callbacks.on_eval_end(logs)
    return logs


def _defines_on_checkpoint(callback: Any) -> bool:
    return type(callback).on_checkpoint is not Callback.on_checkpoint


def _keyed(callbacks: Sequence[Callback]) -> list[tuple[str, Callback]]:
    return [(f"{index}:{type(cb).__name__}", cb) for index, cb in enumerate(callbacks)]
