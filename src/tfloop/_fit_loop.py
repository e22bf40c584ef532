"""The host side of ``fit``: when to train, validate, save and stop.

The Trainer says what one step does; this module decides when things happen between compiled
executions (Orbit calls it the controller): it feeds the compiled loop chunks of steps, sizes
each chunk so that a checkpoint every n updates or the end of an epoch lands exactly, calls the
callbacks, saves, and resumes from a checkpoint.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tfloop import _distribute
from tfloop import data as data_lib
from tfloop.callbacks import Callback, CallbackList
from tfloop.checkpoint import _CORRUPT_ERRORS, Checkpointer
from tfloop.errors import CheckpointError, DataError, _first_line

if TYPE_CHECKING:
    from tfloop._loops import CompiledLoop
    from tfloop.trainer import Trainer

logger = logging.getLogger("tfloop")

_INTERNAL_LOGS = ("step", "batch")


@dataclass
class FitPlan:
    """The validated arguments of one ``fit`` call."""

    source: data_lib.DataSource
    validation: data_lib.DataSource | None
    epochs: int
    initial_epoch: int
    steps_per_epoch: int | None  # as the user gave it
    validation_freq: int
    persistent: bool  # one iterator across epochs (a dataset with steps_per_epoch)
    verbose: int


class FitLoop:
    """Runs one ``fit`` call of ``trainer`` according to ``plan``."""

    def __init__(self, trainer: Trainer, plan: FitPlan, callbacks: CallbackList) -> None:
        self.trainer = trainer
        self.plan = plan
        self.callbacks = callbacks
        self.checkpointer: Checkpointer | None = trainer.checkpoint
        self.train: CompiledLoop | None = None
        self.stream: data_lib.StepStream | None = None
        self.epoch = plan.initial_epoch
        self.batch = 0  # micro-batches done in the current epoch
        self.step = 0  # optimizer updates so far
        self.window = 0  # micro-batches in the open accumulation window

    # ------------------------------------------------------------------------- start

    def start(self) -> None:
        """Prepares the data stream, builds the trainer and restores a checkpoint if any."""
        checkpointer = self.checkpointer
        candidates: list[tuple[str, dict[str, Any]]] = []
        if checkpointer is not None:
            checkpointer.check_writable()
            checkpointer.remove_temporary_files()
            candidates = self._readable(checkpointer)
            self._check_workers_agree(candidates)
        # The stream to resume (or start) is made first and only once: the build below needs a
        # batch, and a dataset's shuffle order depends on how many iterators were made.
        if candidates:
            self.stream = self._stream_for(candidates[0][1])
        else:
            # One shuffle seed is drawn and dropped up front: a restore draws one more than an
            # uninterrupted run, and this is the one a restored run leaves out (_stream_for).
            self.plan.source.draw_seeds_until(1)
            self.stream = self._stream(self.plan.initial_epoch, 0)
        first = self.stream.peek_batch()
        if first is None and candidates:
            # Resuming at the very end of an epoch: nothing is left in this stream.
            first = self.plan.source.example_batch()
        if first is None:
            raise DataError("data yielded no batches; pass a non-empty dataset.")
        with self.trainer._scope():
            self.trainer._build(first, training=True)
        if checkpointer is not None:
            checkpointer._attach(self.trainer)
            self._restore(checkpointer, candidates)
        self.step = int(self.trainer.optimizer.iterations.numpy())
        self.train = self.trainer._loop("train")

    def _check_workers_agree(self, candidates: list[tuple[str, dict[str, Any]]]) -> None:
        """Under ``MultiWorkerMirroredStrategy``: stops if the workers would restore different
        checkpoints (restoring is itself a collective, so this is checked first)."""
        strategy = self.trainer.strategy
        if not _distribute.is_multi_worker(strategy):
            return
        step = int(candidates[0][1].get("step", -1)) if candidates else 0
        steps = sorted(set(_distribute.gather_from_replicas(strategy, step)))
        if len(steps) > 1:
            raise CheckpointError(
                f"the workers would restore different checkpoints (at updates {steps}). Give "
                "every worker the same checkpoint directory, on storage all of them read: only "
                "the chief writes there, and every worker restores from it."
            )

    def _stream(self, epoch: int, start_step: int) -> data_lib.StepStream:
        return self.plan.source.stream(epoch, start_step)

    def _readable(self, checkpointer: Checkpointer) -> list[tuple[str, dict[str, Any]]]:
        readable = []
        for path in checkpointer.candidates():
            try:
                readable.append((path, checkpointer.read_metadata(path)))
            except _CORRUPT_ERRORS as error:
                _warn_corrupt(path, error)
        if not readable and checkpointer.candidates():
            raise CheckpointError(
                f"no checkpoint in {str(checkpointer.directory)!r} could be read. Nothing was "
                "overwritten. Move the directory away or pass Checkpointer(restore=None) to "
                "start fresh."
            )
        return readable

    def _restore(
        self, checkpointer: Checkpointer, candidates: list[tuple[str, dict[str, Any]]]
    ) -> None:
        failures: list[str] = []
        for index, (path, metadata) in enumerate(candidates):
            stream = self.stream if index == 0 else self._stream_for(metadata)
            try:
                checkpointer.restore_into(path, metadata, stream)
            except CheckpointError:
                raise
            except _CORRUPT_ERRORS as error:
                _warn_corrupt(path, error)
                failures.append(path)
                continue
            if metadata.get("iterator") and not metadata.get("exhausted"):
                self.plan.source.restored_seeds()
            self._resume_from(metadata, stream, path)
            return
        if failures:
            raise CheckpointError(
                f"no checkpoint in {str(checkpointer.directory)!r} could be restored (tried "
                f"{', '.join(failures)}). Nothing was overwritten. Move the directory away or "
                "pass Checkpointer(restore=None) to start fresh."
            )

    def _stream_for(self, metadata: dict[str, Any]) -> data_lib.StepStream:
        source = self.plan.source
        if isinstance(source, data_lib._ArraySource):
            source.seed = int(metadata["data_seed"])
        self.trainer._data_seed = int(metadata["data_seed"])
        restoring = bool(metadata.get("iterator")) and not metadata.get("exhausted")
        drawn, at_creation = int(metadata["seeds_drawn"]), metadata["stream_seeds"]
        # Put a dataset's shuffle-seed sequence where the uninterrupted run had it: restoring
        # the iterator below draws one seed and making it another; otherwise, draw up to where
        # the stream was made (at an epoch end: where the next epoch's stream is made).
        if restoring:
            source.draw_seeds_until(drawn - 2)
        else:
            source.draw_seeds_until(drawn if at_creation is None else at_creation - 1)
        if self.plan.persistent:
            # One iterator for the whole run: its saved state is the position; without it,
            # skip by count from the start.
            skip = metadata["epoch"] * (self.plan.steps_per_epoch or 0) + metadata["batch"]
            stream = self._stream(0, 0 if metadata.get("iterator") else skip)
        elif metadata.get("iterator"):
            stream = self._stream(metadata["epoch"], 0)
        else:
            stream = self._stream(metadata["epoch"], metadata["batch"])
        if restoring:
            stream.has_next()  # pull now, so the restore below resets what the pull consumed
        else:
            source.draw_seeds_until(drawn)
        return stream

    def _resume_from(
        self, metadata: dict[str, Any], stream: data_lib.StepStream | None, path: str
    ) -> None:
        self.stream = stream
        self.epoch = int(metadata["epoch"])
        self.batch = int(metadata["batch"])
        self.window = int(metadata.get("window", 0))
        for key, callback in _keyed(self.trainer.callbacks):
            if key in metadata.get("callbacks", {}):
                callback.load_state_dict(metadata["callbacks"][key])
        message = (
            f"tfloop: resuming from {path} at epoch {self.epoch + 1}, batch {self.batch} "
            f"(step {metadata['step']})"
        )
        logger.info(message)
        if self.plan.verbose:
            print(message, flush=True)

    # --------------------------------------------------------------------------- run

    def run(self) -> None:
        trainer, plan = self.trainer, self.plan
        checkpointer = self.checkpointer
        if checkpointer is not None:
            checkpointer.install_signal_handlers()
        try:
            self.callbacks.on_fit_start({})
            while self.epoch < plan.epochs and not trainer.stop_training:
                resumed = self.batch > 0
                if self.stream is None:
                    self.stream = self._stream(self.epoch, 0)
                logs = self._train_epoch(resumed)
                if trainer.stop_training and self._preempted():
                    break
                epoch = self.epoch
                if plan.validation is not None and (epoch + 1) % plan.validation_freq == 0:
                    results = trainer._evaluate(plan.validation, None, self.callbacks)
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
        if checkpointer is not None and checkpointer.preempted:
            trainer.preempted = True
            if checkpointer.exit_code is not None:
                sys.exit(checkpointer.exit_code)

    def _preempted(self) -> bool:
        return self.checkpointer is not None and self.checkpointer.preempted

    def _train_epoch(self, resumed: bool) -> dict[str, float]:
        trainer, plan = self.trainer, self.plan
        assert self.stream is not None and self.train is not None
        stream, steps_per_epoch = self.stream, plan.steps_per_epoch
        if not resumed:
            for metric in trainer.metrics:
                metric.reset_state()
        trainer._current_epoch = self.epoch
        self.callbacks.on_epoch_start(self.epoch, {})
        step_logs: dict[str, float] = {}
        ran = 0
        while steps_per_epoch is None or self.batch < steps_per_epoch:
            chunk = stream.next_chunk(self._chunk_limit())
            if chunk is None:
                if steps_per_epoch is not None:
                    logger.warning(
                        "tfloop: data ran out after %d of steps_per_epoch=%d batches in epoch "
                        "%d; training stops. Use dataset.repeat() for more epochs.",
                        self.batch,
                        steps_per_epoch,
                        self.epoch,
                    )
                    trainer.stop_training = True
                break
            piece, start, stop = chunk
            self.batch += stop - start
            ran += stop - start
            epoch_over = self.batch == steps_per_epoch or (
                steps_per_epoch is None and not stream.has_next()
            )
            # The step that ends the epoch also ends its accumulation window, however partial.
            flush_at = stop - 1 if epoch_over else -1
            results, raw_step_logs = self.train(piece, start, stop, flush_at)
            logs = _floats(results)
            step_logs = _floats(raw_step_logs or {})
            last_step, self.step = self.step, int(logs["step"])
            self.window = int(logs.pop("_window", 0))
            logs.update(step_logs)
            logs["batch"] = float(self.batch - 1)
            self.callbacks.on_train_batch_end(self.batch - 1, logs)
            checkpointer = self.checkpointer
            if checkpointer is not None and checkpointer.due(self.step, last_step):
                self._save(logs)
                if checkpointer.preempted:
                    trainer.stop_training = True
            if trainer.stop_training:
                break
        if ran == 0 and not resumed and self.batch == 0:
            raise DataError(f"data yielded no batches in epoch {self.epoch}.")
        logs = _floats(trainer._results())
        logs.pop("_window", None)
        logs.update(step_logs)
        return {name: value for name, value in logs.items() if name not in _INTERNAL_LOGS}

    def _chunk_limit(self) -> int:
        limit = self.plan.source.steps_per_execution
        if self.plan.steps_per_epoch is not None:
            limit = min(limit, self.plan.steps_per_epoch - self.batch)
        checkpointer = self.checkpointer
        if checkpointer is not None:
            updates = checkpointer.steps_until_save(self.step)
            if updates is not None:
                # Land on the micro-batch that completes the update a save is due at.
                micro_batches = updates * self.trainer.accumulate_steps - self.window
                limit = min(limit, max(1, micro_batches))
        return max(1, limit)

    def _save(self, logs: dict[str, float]) -> None:
        checkpointer = self.checkpointer
        assert checkpointer is not None
        stream = self.stream if (self.plan.persistent or self.batch > 0) else None
        if stream is not None and stream.iterator is None:
            stream = None
        path = checkpointer.save(
            self.epoch,
            self.batch,
            stream,
            {key: callback.state_dict() for key, callback in _keyed(self.trainer.callbacks)},
            self.trainer._data_seed,
            window=self.window,
            seeds_drawn=self.plan.source.seeds_drawn,
            stream_seeds=None if self.stream is None else self.stream.seeds_at_creation,
        )
        if path is not None:
            if any(_defines_on_checkpoint(callback) for callback in self.callbacks.callbacks):
                checkpointer.wait()  # on_checkpoint is promised a complete checkpoint
            self.callbacks.on_checkpoint(path, logs)


def _warn_corrupt(path: str, error: BaseException) -> None:
    message = _first_line(error)
    logger.warning(
        "tfloop: checkpoint %s cannot be restored (%s: %s); trying the previous one",
        path,
        type(error).__name__,
        message,
    )


def _defines_on_checkpoint(callback: Any) -> bool:
    return type(callback).on_checkpoint is not Callback.on_checkpoint


def _keyed(callbacks: Any) -> list[tuple[str, Any]]:
    return [(f"{index}:{type(cb).__name__}", cb) for index, cb in enumerate(callbacks)]


def _floats(values: dict[str, Any]) -> dict[str, float]:
    import numpy as np

    return {name: float(np.asarray(value).mean()) for name, value in values.items()}
