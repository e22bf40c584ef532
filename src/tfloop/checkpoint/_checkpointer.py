"""Checkpointer: when to save, what, how it is restored, and preemption.

A checkpoint holds everything a run needs to continue *exactly* where it stopped: the objects
the trainer hands over (model, optimizer, metrics, the accumulation window, seed generators,
the non-finite counters), the data position, and the run's host state (epoch, batch within it,
shuffle seed, callbacks' state; see ``_metadata.py``). A run killed at any step and started
again with the same call finishes with bit-identical weights (CPU, deterministic ops) and sees
the data in the same order.

The data position is a batch index for in-memory arrays (their order is a function of the seed
and the epoch). For a ``tf.data`` dataset it is the iterator's own state plus the few batches
already pulled into the current superbatch but not run yet; with per-worker input each worker
keeps its own (``_worker_data.py``).

Files are those of ``tf.train.CheckpointManager``: the data files first and the ``checkpoint``
index last, atomically, so a save killed halfway is never taken for a checkpoint. They are
written by a :class:`~tfloop.checkpoint._fastsave.FastWriter`, by default in a background
thread while training goes on, from a snapshot taken on the training thread at the exact
update the save was due at.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
from collections.abc import Mapping, Sequence
from typing import Any

import tensorflow as tf

from tfloop import _distribute, _validate
from tfloop._cadence import EveryNSeconds, EveryNSteps
from tfloop.checkpoint._background import BackgroundWrite
from tfloop.checkpoint._best import BestCheckpoints
from tfloop.checkpoint._directory import check_writable, remove_temporary_files, same_objects
from tfloop.checkpoint._fastsave import FastWriter
from tfloop.checkpoint._guards import FiniteWeights, check_kinds, kinds
from tfloop.checkpoint._metadata import (
    CORRUPT_ERRORS,
    FORMAT_VERSION,
    decode_leftover,
    encode_leftover,
    position_of,
)
from tfloop.checkpoint._preemption import PreemptionSignals
from tfloop.checkpoint._restore import find_candidates, latest_readable, read_metadata
from tfloop.checkpoint._worker_data import WorkerData, agree_on_step, unsaveable
from tfloop.data import DataSource, Position, StepStream
from tfloop.errors import CheckpointError, ConfigError
from tfloop.io import checks, files

__all__ = ["Checkpointer"]

logger = logging.getLogger("tfloop")


class Checkpointer:
    """Saves training state periodically and restores it when ``fit`` starts.

    Args:
        directory: where checkpoints go (created if needed; must be writable): a local path
            or a URL of any filesystem TensorFlow has (``gs://bucket/run``, ``ram://run``; see
            ``docs/cloud-storage.md``). A scheme TensorFlow has no filesystem for is a
            ConfigError here; at the start of ``fit`` a probe file is written and removed, so a
            permission or credentials problem stops ``fit`` before it trains.
        every_n_steps: save every n optimizer updates (landing exactly on the update).
        every_n_seconds: save at the first execution boundary after n seconds since the last save.
        every_epoch: save at the end of every epoch (after validation and callbacks).
        max_to_keep: how many checkpoints to keep.
        restore: ``"latest"`` resumes from the newest valid checkpoint in ``directory``; a path
            (``directory/ckpt-300``) restores that one; ``None`` starts fresh.
        save_iterator: save the ``tf.data`` iterator state. A large shuffle buffer is part of
            that state and makes checkpoints big; with ``False`` a resume skips to the right
            batch by count instead, which is exact only for a deterministic pipeline. An input
            whose iterator cannot be saved (the ``tf.data`` service) needs ``False``: ``fit``
            says so with a CheckpointError before it trains.
        preemption_signals: signals that make ``fit`` save at the next execution boundary and
            return (``trainer.preempted`` is then ``True``). Installed only in the main thread.
        exit_code: if set, the process exits with this code after a preemption save (143 is
            the usual code for SIGTERM).
        async_save: write the checkpoint files in a background thread while training goes
            on (the default). The saved state is still that of the exact update the save was
            due at: it is snapshotted on the training thread first. ``fit`` waits for the
            write before the next save, before it returns (or exits after a preemption) and
            when it raises; a failed write raises CheckpointError at the latest then. Saves
            are synchronous anyway for a preemption and when a callback defines
            ``on_checkpoint`` (which is promised a complete checkpoint), and under a
            ``tf.distribute`` strategy. ``False`` writes every checkpoint before training
            continues.
        keep_best: besides the newest ``max_to_keep``, keep the ``keep_best`` checkpoints with
            the best ``monitor`` value. A checkpoint is saved wherever that value is known
            (each epoch end; each validation of ``fit(validation_every_n_steps=...)`` for a
            ``val_*`` key); :attr:`best` is the best one's path. The records are in every
            checkpoint, so they survive a resume.
        monitor: the log key ``keep_best`` ranks by (a key the logs never have is a
            ConfigError listing the keys they have).
        mode: ``"min"``, ``"max"`` or ``"auto"`` (a loss goes down, a metric asks itself).

    Examples:
        >>> import os, tempfile, numpy as np, keras, tfloop
        >>> directory = tempfile.mkdtemp()
        >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        >>> trainer = tfloop.Trainer(model, "sgd", "mse",
        ...                          checkpoint=tfloop.Checkpointer(directory, every_n_steps=2))
        >>> _ = trainer.fit((np.ones((8, 2)), np.ones((8, 1))), epochs=1, batch_size=2, verbose=0)
        >>> sorted(name for name in os.listdir(directory) if name.endswith(".index"))
        ['ckpt-2.index', 'ckpt-4.index']
        >>> best = tfloop.Checkpointer(directory, keep_best=2, monitor="loss")
        >>> best.keep_best, best.best
        (2, None)
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        every_n_steps: int | None = None,
        every_n_seconds: float | None = None,
        every_epoch: bool = True,
        max_to_keep: int = 3,
        restore: str | os.PathLike[str] | None = "latest",
        *,
        save_iterator: bool = True,
        preemption_signals: Sequence[int] = (signal.SIGTERM,),
        exit_code: int | None = None,
        async_save: bool = True,
        keep_best: int = 0,
        monitor: str = "val_loss",
        mode: str = "auto",
    ) -> None:
        self.directory = checks.check_scheme(directory, "Checkpointer directory")
        self.every_n_steps = _validate.optional_count(every_n_steps, "every_n_steps")
        self.every_n_seconds = _validate.optional_number(every_n_seconds, "every_n_seconds")
        self.every_epoch = _validate.boolean(every_epoch, "every_epoch")
        self.max_to_keep = _validate.optional_count(max_to_keep, "max_to_keep") or 1
        if restore is not None and not isinstance(restore, (str, os.PathLike)):
            raise ConfigError(
                f"restore must be 'latest', a checkpoint path or None, got {restore!r}."
            )
        self.restore = (
            None if restore is None else checks.check_scheme(restore, "Checkpointer restore")
        )
        self.save_iterator = _validate.boolean(save_iterator, "save_iterator")
        self.preemption_signals = tuple(preemption_signals)
        self.exit_code = exit_code
        self.async_save = _validate.boolean(async_save, "async_save")
        self.keep_best = _validate.count(keep_best, "keep_best", owner="Checkpointer")
        self._best = BestCheckpoints(self.keep_best, monitor, mode)
        self.last_saved: str | None = None
        self.saved_iterator = False  # whether the last save included a tf.data iterator
        self._signals = PreemptionSignals(self.preemption_signals)
        self._every_steps = EveryNSteps(self.every_n_steps) if self.every_n_steps else None
        self._every_seconds = (
            EveryNSeconds(self.every_n_seconds) if self.every_n_seconds is not None else None
        )
        self._objects: dict[str, Any] | None = None
        self._strategy: tf.distribute.Strategy | None = None
        self._checkpoint: tf.train.Checkpoint | None = None
        self._manager: tf.train.CheckpointManager | None = None
        self._writer: FastWriter | None = None
        self._last_position: tuple[int, int, int] | None = None
        self._worker_data: WorkerData | None = None
        self._background = BackgroundWrite(files.join(self.directory, "checkpoint"), _explain)

    # ----------------------------------------------------------------------------- set up

    @property
    def preempted(self) -> bool:
        """Whether a preemption signal arrived during this ``fit``."""
        return self._signals.received

    @property
    def writer(self) -> FastWriter | None:
        """The writer of the bound objects (None before ``fit`` binds them)."""
        return self._writer

    @property
    def checkpoints(self) -> list[str]:
        """The checkpoints this process wrote and keeps, oldest first (``max_to_keep``)."""
        return [] if self._manager is None else list(self._manager.checkpoints)

    @property
    def best(self) -> str | None:
        """The path of the best checkpoint by ``monitor`` (None: none yet, or no keep-best)."""
        step = self._best.best_step
        return None if step is None else files.join(self.directory, f"ckpt-{step}")

    @property
    def best_checkpoints(self) -> list[tuple[str, float]]:
        """The ``keep_best`` checkpoints and their monitored values, best first."""
        return [(files.join(self.directory, f"ckpt-{s}"), v) for s, v in self._best.records]

    @property
    def writing(self) -> bool:
        """Whether a background write may still be running (see :meth:`wait`)."""
        return self._background.pending is not None

    def check_writable(self) -> None:
        """Creates the directory and proves it writable; a CheckpointError names it if not."""
        check_writable(self.directory)

    def check_input(self, source: DataSource) -> None:
        """A CheckpointError, before anything trains, if ``save_iterator`` is on and the input's
        iterator cannot be saved (the ``tf.data`` service)."""
        if self.save_iterator and source.unsaveable_iterator:
            raise CheckpointError(unsaveable(source.unsaveable_iterator))

    def remove_temporary_files(self) -> list[str]:
        """Deletes the leftovers of a save that was killed halfway (see ``_directory.py``)."""
        return remove_temporary_files(self.directory)

    def bind(
        self, objects: Mapping[str, Any], strategy: tf.distribute.Strategy | None = None
    ) -> None:
        """Saves ``objects`` (name -> trackable, or a list of them) from now on.

        A later ``fit`` of the same trainer binds the same objects: the checkpoint, and the
        writer's plan of the last save, stay.
        """
        objects = dict(objects)
        if self._checkpoint is not None and same_objects(self._objects or {}, objects):
            return
        self._objects, self._strategy = objects, strategy
        self._metadata = tf.Variable("", dtype=tf.string, trainable=False, name="metadata")
        self._leftover = tf.Variable(
            tf.constant([], tf.string), shape=tf.TensorShape([None]), trainable=False
        )
        self._data = tf.Module(name="data")
        self._checkpoint = tf.train.Checkpoint(
            **objects, metadata=self._metadata, leftover=self._leftover, data=self._data
        )
        self._manager = tf.train.CheckpointManager(
            self._checkpoint, self._write_directory(), max_to_keep=self.max_to_keep
        )
        self._writer = FastWriter(
            self._checkpoint, self._manager, replaced=[self._metadata, self._leftover]
        )
        self._finite = FiniteWeights(objects.get("model"))
        self._kinds = kinds(objects)

    def _worker_directory(self) -> WorkerData:
        """This worker's own input positions (per-worker input; see ``_worker_data.py``)."""
        if self._worker_data is None:
            directory = files.join(self.directory, "workers", _distribute.task_id())
            self._worker_data = WorkerData(directory, self.max_to_keep)
        return self._worker_data

    def _write_directory(self) -> str:
        """Where this process writes its checkpoints.

        Under ``MultiWorkerMirroredStrategy`` every worker takes part in a save (reading the
        metrics' on-read variables is a collective), but only the chief's files are the
        checkpoint: the other workers write theirs into a directory of their own, deleted
        after each save, as TF prescribes. Every worker restores from ``directory``, so it
        must be storage they all read (a shared file system or a bucket).
        """
        if _distribute.is_chief(self._strategy):
            return self.directory
        return files.join(self.directory, f".tfloop-{_distribute.task_id()}")

    def bind_monitor(self, trainer: Any) -> None:
        """At the start of ``fit``: checks ``monitor`` against the run (a ``TrainerView``)."""
        if self.keep_best:
            self._best.monitor.bind(trainer)

    def monitored(
        self, logs: Mapping[str, float], *, validation_only: bool = False
    ) -> float | None:
        """The ``keep_best`` value in ``logs``: a save there is a candidate (None: keep-best is
        off or the value is not there). ``validation_only``: the logs of a validation of
        ``validation_every_n_steps``, where only a ``val_*`` key is judged."""
        return self._best.value(logs, validation_only=validation_only)

    def _kept_paths(self) -> list[str]:
        assert self._writer is not None
        return [self._writer.path(step) for step in self._best.steps]

    # ---------------------------------------------------------------------------- restore

    def candidates(self) -> list[str]:
        """Checkpoint paths to try, newest first (after ``restore`` is applied)."""
        return find_candidates(self.directory, self.restore)

    def read_metadata(self, path: str) -> dict[str, Any]:
        """The JSON metadata of the checkpoint at ``path`` (reads the index, not the weights)."""
        return read_metadata(path)

    def latest_readable(self) -> tuple[str, dict[str, Any]] | None:
        """The newest checkpoint that reads in full, and its metadata (None: start fresh).

        A corrupt candidate is skipped with a warning before the run draws anything from its
        data, so falling back to an older checkpoint is as exact as resuming from it directly.
        """
        return latest_readable(self.directory, self.restore)

    def restore_into(self, path: str, metadata: dict[str, Any], stream: StepStream | None) -> None:
        """Restores ``path`` into the bound objects and ``stream`` (iterator state, leftover
        batches); a CheckpointError says why it cannot."""
        assert self._checkpoint is not None, "bind() first"
        position = position_of(metadata)
        check_kinds(path, metadata.get("kinds"), self._kinds)
        iterator = None if stream is None else stream.iterator
        own = position.per_worker and position.iterator  # in this worker's own data
        self._attach_iterator(iterator if position.restores_iterator and not own else None)
        try:
            status = self._checkpoint.restore(path)
            status.assert_existing_objects_matched()
            status.expect_partial()
        except (ValueError, AssertionError) as error:
            if isinstance(error, AssertionError) or "incompatible" in str(error).lower():
                raise CheckpointError(
                    f"checkpoint {path!r} was written for a different model or trainer "
                    f"({_validate.first_line(error)}). Use another checkpoint directory for "
                    "this model, or pass Checkpointer(restore=None) to start fresh."
                ) from error
            raise CheckpointError(
                f"checkpoint {path!r} could not be restored ({_validate.first_line(error)})."
            ) from error
        except CORRUPT_ERRORS as error:
            raise CheckpointError(
                f"checkpoint {path!r} could not be restored ({type(error).__name__}: "
                f"{_validate.first_line(error)}). Nothing was overwritten."
            ) from error
        if stream is not None and position.iterator:
            leftover = self._leftover.numpy()
            if own:
                saved = iterator if position.restores_iterator else None
                leftover = self._worker_directory().restore(int(metadata["step"]), saved)
            if position.exhausted:
                stream.finish()
            stream.restore_leftover(decode_leftover(metadata, leftover))
        self._last_position = (position.epoch, position.batch, int(metadata["step"]))
        assert self._writer is not None and self._manager is not None
        writer = self._writer
        self._best.load(
            metadata.get("best"), lambda step: files.exists(f"{writer.path(step)}.index")
        )
        writer.kept = [p for p in self._kept_paths() if p not in self._manager.checkpoints]

    # ------------------------------------------------------------------------------- save

    def steps_until_save(self, step: int) -> int | None:
        """Updates until the next ``every_n_steps`` save, from update count ``step``."""
        return None if self._every_steps is None else self._every_steps.until_next(step)

    def due(self, step: int, last_step: int) -> bool:
        """Whether a periodic save is due after an execution that ended at update ``step``."""
        if self.preempted:
            return True
        if self._every_steps is not None and self._every_steps.crossed(last_step, step):
            return True
        return self._every_seconds is not None and self._every_seconds.due()

    def save(
        self,
        step: int,
        position: Position,
        stream: StepStream | None,
        state: Mapping[str, Any],
        *,
        value: float | None = None,
    ) -> str | None:
        """Saves a checkpoint at update ``step`` and data ``position``; returns its path.

        ``stream`` is the stream being read (its iterator and leftover batches are saved);
        ``state`` is the run's JSON state (shuffle seed, window, callbacks). With
        ``async_save`` the files may still be being written when this returns (see
        :meth:`wait`); the state saved is the state at this call either way. Returns None
        when this exact state is already saved. ``value``: the :meth:`monitored` value at this
        save, a ``keep_best`` candidate.
        """
        assert self._manager is not None and self._writer is not None, "bind() first"
        self.wait()
        if value is not None:
            self._best.offer(step, value)
        if self._last_position == (position.epoch, position.batch, step):
            return None
        if not self._finite():
            logger.warning(
                "tfloop: the weights at update %d hold NaN or Inf; no checkpoint is saved, so "
                "the last finite one (%s) stays. Trainer(non_finite='skip') drops such updates.",
                step,
                self.last_saved,
            )
            return None
        iterator = None if stream is None or not self.save_iterator else stream.iterator
        runs: list[Any] = []
        if iterator is not None:
            assert stream is not None
            position = dataclasses.replace(position, iterator=True, exhausted=stream.exhausted)
            runs = stream.leftover()
        fields, leftover = encode_leftover(runs)
        if position.per_worker and iterator is not None:
            # Every worker writes its own iterator and leftover batches first; the rest of
            # the position is the same on every worker and goes into the chief's metadata.
            saved = None if position.exhausted else iterator
            self._worker_directory().save(step, saved, leftover)
            agree_on_step(self._strategy, step)
            iterator, leftover = None, encode_leftover([])[1]
        # An exhausted iterator is not saved: restoring one disturbs the shuffle seeds of the
        # iterators made after it. "Exhausted" plus the leftover batches says it all.
        self._attach_iterator(None if position.exhausted else iterator)
        metadata = {
            "format": FORMAT_VERSION,
            "step": step,
            **dataclasses.asdict(position),
            **state,
            **fields,
            "best": self._best.state(),
            "kinds": self._kinds,
        }
        encoded = tf.constant(json.dumps(metadata))
        # A preemption save is the manager's own: the last save of the process takes the
        # well-trodden path. So is every save under a tf.distribute strategy: reading on-read
        # variables is a cross-replica reduction, which must not run on another thread.
        snapshot = None
        path, keep = self._writer.path(step), self._kept_paths()
        try:
            if not self.preempted and self._strategy is None:
                snapshot = self._writer.snapshot(
                    [encoded, leftover], compiled_only=not self.async_save
                )
            if snapshot is None:
                self._leftover.assign(leftover)
                self._metadata.assign(encoded)
                path = self._writer.manager_save(step, keep)
            elif not self.async_save:
                self._writer.write(snapshot, step, keep)
        except tf.errors.UnimplementedError as error:
            raise CheckpointError(unsaveable(_validate.first_line(error))) from error
        if snapshot is None:
            if self._manager.directory != self.directory:  # a worker's copy, not needed
                files.rmtree(self._manager.directory)
                path = files.join(self.directory, files.split(path)[1])  # the chief's
        elif self.async_save:
            writer = self._writer
            self._background.submit(path, lambda: writer.write(snapshot, step, keep))
        if self._every_seconds is not None:
            self._every_seconds.reset()
        self._last_position = (position.epoch, position.batch, step)
        self.last_saved = path
        return path

    def _attach_iterator(self, iterator: Any) -> None:
        """Puts ``iterator`` into the saved state, or takes the one there out (None)."""
        self.saved_iterator = iterator is not None
        if iterator is not None:
            if getattr(self._data, "iterator", None) is not iterator:
                self._data.iterator = iterator
        elif hasattr(self._data, "iterator"):
            del self._data.iterator

    def wait(self, *, raise_error: bool = True) -> None:
        """Blocks until a background write is complete; raises CheckpointError if it failed.

        With ``raise_error=False`` a failure is logged instead (for a ``fit`` that is already
        raising another error).
        """
        self._background.wait(raise_error=raise_error)

    # ------------------------------------------------------------------------- preemption

    def install_signal_handlers(self) -> None:
        """Makes the preemption signals set :attr:`preempted` instead of killing the process."""
        self._signals.install()

    def uninstall_signal_handlers(self) -> None:
        self._signals.uninstall()


def _explain(error: BaseException) -> str | None:
    if isinstance(error, tf.errors.UnimplementedError):
        return unsaveable(_validate.first_line(error))
    return None
