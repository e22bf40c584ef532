"""Checkpointer: what is saved, when, how it is restored, and preemption.

A checkpoint holds everything a run needs to continue *exactly* where it stopped: the model, the
optimizer (slots and update counter), the metrics' running state, the gradient accumulator's
window, every Keras seed generator (Dropout), the non-finite counters, the epoch and the batch
within it, the data position, and the state of the Trainer's callbacks. A run killed at any step
and started again with the same call finishes with bit-identical weights (CPU, deterministic
ops) and sees the data in the same order.

The data position is a batch index for in-memory arrays (their order is a function of the seed
and the epoch). For a ``tf.data`` dataset it is the iterator's own state plus the few batches
already pulled into the current superbatch but not run yet.

Saves are those of ``tf.train.CheckpointManager``: the data files are written first and the
``checkpoint`` index last, atomically, so a save killed halfway is never taken for a checkpoint.

By default the files are written in a background thread while training goes on. At the save the
training thread takes a snapshot of every saved tensor (variable reads, which TF keeps immutable
by copy-on-write, and the serialized iterator state) and hands it to the writer through the
checkpoint's object map, the hook TF's own async checkpointing uses. So the checkpoint holds the
state of the exact update the save was due at, and its files are the same bytes a synchronous
save writes. TF's built-in async mode cannot be used: Keras 3 variables create a new
``tf.Variable`` on every copy, which its copy function (a ``tf.function``) refuses on the second
save.

``CheckpointManager.save`` spends about 10 ms of Python on every save (walking the object graph,
building a saver, running its ops one by one): at many saves a second that competes with
training for the GIL and the cores. So the first save of a set of saved objects runs TF's own
gather once, which gives every tensor's checkpoint key and the serialized object graph, and
traces one function with the ops TF's saver runs; the saves after it call that function with
the snapshot and do the manager's bookkeeping (the ``checkpoint`` index, ``max_to_keep``). The
files are the same bytes. Every save walks the saved objects first (a fraction of a millisecond)
and plans again if they changed; what cannot be planned so (registered savers, Python state,
sliced variables) is the manager's save of the snapshot, and a preemption or a tf.distribute
save the manager's own.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import json
import logging
import os
import queue
import shutil
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import keras
import tensorflow as tf
from google.protobuf import text_format
from tensorflow.python.checkpoint import functional_saver, saveable_compat
from tensorflow.python.checkpoint import util as checkpoint_util
from tensorflow.python.ops import gen_io_ops, resource_variable_ops
from tensorflow.python.saved_model import registration
from tensorflow.python.trackable import base as trackable_base
from tensorflow.python.trackable import python_state
from tensorflow.python.training.checkpoint_state_pb2 import CheckpointState
from tensorflow.python.training.saving import saveable_object, saveable_object_util
from tensorflow.python.util import object_identity

from tfloop import _distribute
from tfloop.errors import CheckpointError, ConfigError, _first_line

if TYPE_CHECKING:
    from tfloop.data import StepStream
    from tfloop.trainer import Trainer

__all__ = ["Checkpointer"]

logger = logging.getLogger("tfloop")

_FORMAT_VERSION = 1
# What TF raises for a truncated or altered checkpoint file; IndexError and ValueError come
# from its readers on some kinds of garbage.
_CORRUPT_ERRORS = (tf.errors.OpError, IndexError, ValueError, KeyError, json.JSONDecodeError)


class Checkpointer:
    """Saves training state periodically and restores it when ``fit`` starts.

    Args:
        directory: where checkpoints go (created if needed; must be writable).
        every_n_steps: save every n optimizer updates (landing exactly on the update).
        every_n_seconds: save at the first execution boundary after n seconds since the last save.
        every_epoch: save at the end of every epoch (after validation and callbacks).
        max_to_keep: how many checkpoints to keep.
        restore: ``"latest"`` resumes from the newest valid checkpoint in ``directory``; a path
            (``directory/ckpt-300``) restores that one; ``None`` starts fresh.
        save_iterator: save the ``tf.data`` iterator state. A large shuffle buffer is part of
            that state and makes checkpoints big; with ``False`` a resume skips to the right
            batch by count instead, which is exact only for a deterministic pipeline.
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

    Examples:
        >>> import tempfile, numpy as np, keras, tfloop
        >>> directory = tempfile.mkdtemp()
        >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        >>> trainer = tfloop.Trainer(model, "sgd", "mse",
        ...                          checkpoint=tfloop.Checkpointer(directory, every_n_steps=2))
        >>> _ = trainer.fit((np.ones((8, 2)), np.ones((8, 1))), epochs=1, batch_size=2, verbose=0)
        >>> sorted(p.name for p in Path(directory).glob("ckpt-*.index"))
        ['ckpt-2.index', 'ckpt-4.index']
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
    ) -> None:
        self.directory = Path(directory)
        self.every_n_steps = _positive_int_or_none(every_n_steps, "every_n_steps")
        if every_n_seconds is not None and not (
            isinstance(every_n_seconds, (int, float)) and every_n_seconds > 0
        ):
            raise ConfigError(
                f"every_n_seconds must be a positive number or None, got {every_n_seconds!r}."
            )
        self.every_n_seconds = every_n_seconds
        self.every_epoch = bool(every_epoch)
        self.max_to_keep = _positive_int_or_none(max_to_keep, "max_to_keep") or 1
        self.restore = restore
        self.save_iterator = save_iterator
        self.preemption_signals = tuple(preemption_signals)
        self.exit_code = exit_code
        self.async_save = bool(async_save)
        self.preempted = False
        self.last_saved: str | None = None
        self.saved_iterator = False  # whether the last save included a tf.data iterator
        self._trainer: Trainer | None = None
        self._checkpoint: tf.train.Checkpoint | None = None
        self._manager: tf.train.CheckpointManager | None = None
        self._last_save_time = time.monotonic()
        self._last_position: tuple[int, int, int] | None = None
        self._previous_handlers: dict[int, Any] = {}
        self._writer: str | None = None  # the path of the background write in progress
        self._writer_thread = _WriterThread()
        self._write_error: BaseException | None = None
        self._writing: str | None = None  # the path the background write is making
        self._plan: tuple[list[_Edge], _Plan | None] | None = None  # (graph, plan) of last save
        self._reader: tuple[list[int], Any] | None = None  # (variable ids, batched read)
        self._writer_fn: tuple[Any, Any] | None = None  # (layout, traced write) of the last plan

    # ----------------------------------------------------------------------------- set up

    def check_writable(self) -> None:
        """Creates the directory and proves it writable; a CheckpointError names it if not."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            probe = self.directory / ".tfloop-write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as error:
            raise CheckpointError(
                f"checkpoint directory {str(self.directory)!r} is not writable ({error}); pass "
                "a directory you can write to, or checkpoint=None."
            ) from error

    def remove_temporary_files(self) -> list[Path]:
        """Deletes the leftovers of a save that was killed halfway.

        TF's saver writes into a ``<prefix>_temp/`` directory; ``SaveV2`` writes each file as
        ``<file>.tempstate<n>`` before renaming it.
        """
        removed = []
        leftovers = {*self.directory.glob("*_temp*"), *self.directory.glob("*.tempstate*")}
        for path in sorted(leftovers):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
        if removed:
            logger.warning(
                "tfloop: removed %d temporary file(s) of an interrupted save in %s",
                len(removed),
                self.directory,
            )
        return removed

    def _attach(self, trainer: Trainer) -> None:
        """Binds the trainer's state; called by the Trainer once it is built."""
        if self._trainer is trainer and self._checkpoint is not None:
            # A later fit call of the same trainer: same checkpoint, and the plan of the last
            # save stays while the saved objects are the same (every save checks).
            return
        self._trainer = trainer
        self._plan = None
        self._writer_fn = None  # it counts the saves in the save counter of the old checkpoint
        self._metadata = tf.Variable("", dtype=tf.string, trainable=False, name="metadata")
        self._leftover = tf.Variable(
            tf.constant([], tf.string), shape=tf.TensorShape([None]), trainable=False
        )
        self._data = tf.Module(name="data")
        metric_variables = [v for metric in trainer.metrics for v in metric.variables]
        self._checkpoint = tf.train.Checkpoint(
            model=trainer.model,
            optimizer=trainer.optimizer,
            metrics=metric_variables,
            seed_generators=trainer._seed_generator_states(),
            non_finite=[
                trainer._non_finite_steps,
                trainer._first_non_finite_step,
                trainer._first_non_finite_tensor,
            ],
            metadata=self._metadata,
            leftover=self._leftover,
            data=self._data,
        )
        if trainer._accumulator is not None:
            self._checkpoint.accumulator = trainer._accumulator
        self._manager = tf.train.CheckpointManager(
            self._checkpoint, str(self._write_directory()), max_to_keep=self.max_to_keep
        )
        # Made now, not by the first save: a background write must not add to the object graph.
        _ = self._checkpoint.save_counter

    def _write_directory(self) -> Path:
        """Where this process writes its checkpoints.

        Under ``MultiWorkerMirroredStrategy`` every worker takes part in a save (reading the
        metrics' on-read variables is a collective), but only the chief's files are the
        checkpoint: the other workers write theirs into a directory of their own, deleted
        after each save, as TF prescribes. Every worker restores from ``directory``, so it
        must be storage they all read (a shared file system or a bucket).
        """
        strategy = getattr(self._trainer, "strategy", None)
        if _distribute.is_chief(strategy):
            return self.directory
        return self.directory / f".tfloop-{_distribute.task_id()}"

    # ---------------------------------------------------------------------------- restore

    def candidates(self) -> list[str]:
        """Checkpoint paths to try, newest first (after ``restore`` is applied)."""
        if self.restore is None:
            return []
        if self.restore != "latest":
            return [str(self.restore)]
        index = self.directory / "checkpoint"
        state = None
        if index.exists():
            # TF logs a garbled index and carries on as if there were no checkpoints: that would
            # be a silent fresh start, so parse it here and stop instead.
            try:
                state = CheckpointState()
                text_format.Parse(index.read_text(), state)
            except (text_format.ParseError, UnicodeDecodeError, OSError) as error:
                raise CheckpointError(
                    f"the checkpoint index {str(index)!r} cannot be read ({_first_line(error)}). "
                    "Fix or delete that file (the ckpt-* files next to it may be intact), or "
                    "pass Checkpointer(restore=None) to start fresh."
                ) from error
        if state is None or not (state.model_checkpoint_path or state.all_model_checkpoint_paths):
            return []
        state = tf.train.get_checkpoint_state(str(self.directory))
        if state is None:
            return []
        # TF has already joined relative entries with the directory.
        paths = list(state.all_model_checkpoint_paths) or [state.model_checkpoint_path]
        return list(reversed(paths))

    def read_metadata(self, path: str) -> dict[str, Any]:
        """The JSON metadata of the checkpoint at ``path`` (reads the index, not the weights)."""
        reader = tf.train.load_checkpoint(path)
        raw = reader.get_tensor("metadata/.ATTRIBUTES/VARIABLE_VALUE")
        metadata: dict[str, Any] = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
        return metadata

    def restore_into(self, path: str, metadata: dict[str, Any], stream: StepStream | None) -> None:
        """Restores ``path`` into the trainer and ``stream`` (iterator state, leftover batches).

        Raises CheckpointError for a checkpoint of another model, and lets the errors of a
        corrupt file through for the caller to fall back to an older checkpoint.
        """
        assert self._checkpoint is not None
        if metadata.get("format") != _FORMAT_VERSION:
            raise ValueError(f"unknown checkpoint format {metadata.get('format')!r}")
        if (
            stream is not None
            and stream.iterator is not None
            and metadata.get("iterator")
            and not metadata.get("exhausted")
        ):
            self._data.iterator = stream.iterator
        elif hasattr(self._data, "iterator"):
            del self._data.iterator
        try:
            status = self._checkpoint.restore(path)
            status.assert_existing_objects_matched()
            status.expect_partial()
        except (ValueError, AssertionError) as error:
            if isinstance(error, AssertionError) or "incompatible" in str(error).lower():
                raise CheckpointError(
                    f"checkpoint {path!r} was written for a different model or trainer "
                    f"({_first_line(error)}). Use another checkpoint directory for this model, "
                    "or pass Checkpointer(restore=None) to start fresh."
                ) from error
            raise
        if stream is not None and metadata.get("iterator"):
            if metadata.get("exhausted"):
                stream.finish()
            stream.restore_leftover(self._decode_leftover(metadata))
        self._last_position = (metadata["epoch"], metadata["batch"], metadata["step"])

    def _decode_leftover(self, metadata: dict[str, Any]) -> list[Any]:
        if not metadata.get("leftover_runs"):
            return []
        dtypes = [tf.as_dtype(d) for d in metadata["leftover_dtypes"]]
        structure = json.loads(metadata["leftover_structure"])
        flat = self._leftover.numpy()
        runs = []
        per_run = len(dtypes)
        for index in range(metadata["leftover_runs"]):
            leaves = [
                tf.io.parse_tensor(flat[index * per_run + j], dtypes[j]) for j in range(per_run)
            ]
            runs.append(_unflatten(structure, leaves))
        return runs

    # ------------------------------------------------------------------------------- save

    def steps_until_save(self, step: int) -> int | None:
        """Updates until the next ``every_n_steps`` save, from update count ``step``."""
        if self.every_n_steps is None:
            return None
        return self.every_n_steps - step % self.every_n_steps

    def due(self, step: int, last_step: int) -> bool:
        """Whether a periodic save is due after an execution that ended at update ``step``."""
        if self.preempted:
            return True
        if self.every_n_steps is not None and step // self.every_n_steps > (
            last_step // self.every_n_steps
        ):
            return True
        return (
            self.every_n_seconds is not None
            and time.monotonic() - self._last_save_time >= self.every_n_seconds
        )

    def save(
        self,
        epoch: int,
        batch: int,
        stream: StepStream | None,
        callbacks_state: dict[str, Any],
        data_seed: int,
        window: int = 0,
        seeds_drawn: int = 0,
        stream_seeds: int | None = None,
    ) -> str | None:
        """Saves a checkpoint of the current state at ``(epoch, batch)``; returns its path.

        With ``async_save`` the files may still be being written when this returns (see
        :meth:`wait`); the state saved is the state at this call either way.
        """
        assert self._trainer is not None and self._manager is not None
        self.wait()
        step = int(self._trainer.optimizer.iterations.numpy())
        if self._last_position == (epoch, batch, step):
            return None  # this exact state is already saved
        metadata: dict[str, Any] = {
            "format": _FORMAT_VERSION,
            "epoch": epoch,
            "batch": batch,
            "step": step,
            "data_seed": data_seed,
            "window": window,
            "seeds_drawn": seeds_drawn,
            "stream_seeds": stream_seeds,
            "callbacks": callbacks_state,
            "iterator": False,
            "leftover_runs": 0,
        }
        self._attach_iterator(stream)
        leaves: list[tf.Tensor] = []
        if stream is not None and stream.iterator is not None and self.save_iterator:
            if stream.exhausted:
                metadata["exhausted"] = True
            metadata["iterator"] = True
            runs = stream.leftover()
            for run in runs:
                leaves.extend(tf.io.serialize_tensor(t) for t in tf.nest.flatten(run))
            if runs:
                metadata["leftover_runs"] = len(runs)
                metadata["leftover_dtypes"] = [t.dtype.name for t in tf.nest.flatten(runs[0])]
                metadata["leftover_structure"] = json.dumps(_structure(runs[0]))
        leftover = tf.stack(leaves) if leaves else _no_leftover()
        encoded = tf.constant(json.dumps(metadata))
        # A preemption save is the manager's own: the last save of the process takes the
        # well-trodden path. So is every save under a tf.distribute strategy: reading on-read
        # variables is a cross-replica reduction, which must not run on another thread.
        snapshot = None
        if not self.preempted and getattr(self._trainer, "strategy", None) is None:
            snapshot = self._snapshot(encoded, leftover, compiled_only=not self.async_save)
        path = self._path(step)
        if snapshot is None:
            self._leftover.assign(leftover)
            self._metadata.assign(encoded)
            path = self._manager.save(checkpoint_number=step)
            if self._manager.directory != str(self.directory):  # a worker's copy, not needed
                shutil.rmtree(self._manager.directory, ignore_errors=True)
                path = str(self.directory / os.path.basename(path))  # the chief's
        elif self.async_save:
            self._writing = self._writer = path
            self._writer_thread.submit(self._write, snapshot, step)
        else:
            self._save_files(snapshot, step)
        self._last_save_time = time.monotonic()
        self._last_position = (epoch, batch, step)
        self.last_saved = path
        return path

    def _attach_iterator(self, stream: StepStream | None) -> None:
        """Puts the ``tf.data`` iterator of ``stream`` into the saved state, or takes it out.

        An exhausted iterator is not saved: restoring one disturbs the shuffle seeds of the
        iterators made after it. "Exhausted" plus the leftover batches says it all.
        """
        saves = (
            stream is not None
            and stream.iterator is not None
            and self.save_iterator
            and not stream.exhausted
        )
        self.saved_iterator = saves
        if saves:
            assert stream is not None
            if getattr(self._data, "iterator", None) is not stream.iterator:
                self._data.iterator = stream.iterator
        elif hasattr(self._data, "iterator"):
            del self._data.iterator

    def wait(self, *, raise_error: bool = True) -> None:
        """Blocks until a background write is complete; raises CheckpointError if it failed.

        With ``raise_error=False`` a failure is logged instead (for a ``fit`` that is already
        raising another error).
        """
        if self._writer is not None:
            self._writer_thread.join()
            self._writer = None
        error, path = self._write_error, self._writing
        self._write_error = self._writing = None
        if error is None:
            return
        message = (
            f"writing checkpoint {path!r} failed ({type(error).__name__}: {_first_line(error)}); "
            f"the checkpoints listed in {str(self.directory / 'checkpoint')!r} are intact."
        )
        if not raise_error:
            logger.error("tfloop: %s", message)
            return
        raise CheckpointError(message) from error

    def _path(self, step: int) -> str:
        """The prefix of checkpoint ``step``, as the manager names it."""
        assert self._manager is not None
        return f"{self._manager._prefix}-{step}"

    def _current_plan(self) -> _Plan | None:
        """The plan of the saved objects as they are now.

        The saved objects are walked every time (a fraction of a millisecond), and the plan made
        again whenever they changed: an object added since the last save (a new ``tf.data``
        iterator, a lazily built layer) is in this checkpoint, never silently left out. None
        when an object cannot be frozen (legacy saveables, Python state) or TF lacks the
        object-map hook.
        """
        assert self._checkpoint is not None
        saver = getattr(self._checkpoint, "_saver", None)
        view = getattr(saver, "_graph_view", None)
        if view is None or not hasattr(saver, "_object_map"):
            return None
        objects, edges = _walk(view)
        if self._plan is None or not _same_edges(self._plan[0], edges):
            self._plan = (edges, self._make_plan(objects))
        return self._plan[1]

    def _snapshot(
        self,
        metadata: tf.Tensor,
        leftover: tf.Tensor,
        *,
        compiled_only: bool = False,
    ) -> _Snapshot | _SnapshotMap | None:
        """Freezes the tensors of every saved object now, for a write that comes later.

        ``metadata`` and ``leftover`` are the values of the checkpoint's own two variables,
        passed as tensors instead of assigned (two eager ops less per save).

        Returns a :class:`_Snapshot` for the plan's compiled write, or a :class:`_SnapshotMap`
        for TF's own save of the frozen objects when the plan could not be compiled (or, with
        ``compiled_only``, None then). None also when there is no plan (see
        :meth:`_current_plan`); that checkpoint is then the manager's synchronous save.
        """
        plan = self._current_plan()
        if plan is None or (compiled_only and plan.compiled is False):
            return None
        values = list(plan.read())
        values[plan.metadata] = metadata
        values[plan.leftover] = leftover
        frozen = []
        for obj in plan.others:
            stand_in = _freeze(obj)
            if stand_in is None or stand_in is _CANNOT_FREEZE:
                return None
            frozen.append(stand_in)
        layout = []
        for stand_in in frozen:
            leaves = _leaves(stand_in._tensors)
            layout.append([name for name, _ in leaves])
            values.extend(tensor for _, tensor in leaves)
        if plan.compiled is None:  # the plan's first save: trace its write
            plan.layout = layout
            plan.compiled = self._compile(plan, values, _stand_ins(plan, values, frozen))
        if plan.compiled and layout == plan.layout:
            return _Snapshot(plan, values)
        if compiled_only:
            return None
        return _stand_ins(plan, values, frozen)

    def _make_plan(self, objects: list[Any]) -> _Plan | None:
        """Sorts the saved objects once: plain variables are read in one call per save."""
        assert self._checkpoint is not None
        counter = self._checkpoint.save_counter  # the writer's own: it counts the write
        plan = _Plan()
        for obj in objects:
            if obj is counter:
                plan.unchanged.append(obj)
                continue
            variable = _plain_variable(obj)
            if variable is not None:
                plan.variables.append((obj, checkpoint_util.get_full_name(obj)))
                plan.sources.append(variable)
                continue
            frozen = _freeze(obj)
            if frozen is _CANNOT_FREEZE:
                return None
            (plan.unchanged if frozen is None else plan.others).append(obj)
        positions = {id(variable): index for index, variable in enumerate(plan.sources)}
        plan.metadata = positions[id(self._metadata)]
        plan.leftover = positions[id(self._leftover)]
        key = [id(v) for v in plan.sources]
        if self._reader is None or self._reader[0] != key:
            sources = list(plan.sources)
            read = tf.function(lambda: [v.read_value() for v in sources])
            # Called as its trace, with no arguments: tf.function's dispatch would add a tenth
            # of a millisecond to every save.
            concrete = read.get_concrete_function()
            self._reader = (key, lambda: concrete._call_flat([], concrete.captured_inputs))
        plan.read = self._reader[1]
        return plan

    def _compile(self, plan: _Plan, values: list[Any], stand_ins: _SnapshotMap) -> bool:
        """Traces the plan's write: TF's own save of the saved objects, minus its Python work.

        ``CheckpointManager.save`` walks the object graph, asks every object for its tensors,
        builds a saver and runs its ops one by one, at every save (about 10 ms here). All of
        that depends only on which objects are saved, so it is done once, on the first snapshot
        of the plan: TF's own gather gives every saved tensor's checkpoint key and the
        serialized object graph, and each tensor is traced back to the snapshot value it is.
        A save then runs one function with the same ops TF's saver runs (``SaveV2`` into the
        temporary shard, ``MergeV2Checkpoints`` into the checkpoint), so the files are the
        same bytes. Returns False, and the plan's saves take TF's way, for anything this does
        not reproduce: registered savers, Python state, sliced tensors, several shards.
        """
        assert self._checkpoint is not None
        saver = self._checkpoint._saver
        saver._object_map = stand_ins
        try:
            serialized, feeds, registered, graph = saver._gather_serialized_tensors(None)
        finally:
            saver._object_map = None
        if feeds or registered:
            return False
        counter = self._checkpoint.save_counter
        positions = {id(value): index for index, value in enumerate(values)}
        sources: dict[str, int] = {}
        for trackable, tensors in serialized.items():
            for key, tensor in tensors.items():
                if trackable is None and key == trackable_base.OBJECT_GRAPH_PROTO_KEY:
                    sources[key] = _GRAPH
                elif trackable is counter:
                    sources[key] = _COUNTER
                else:
                    index = positions.get(id(tensor), -1)
                    if index < 0 or values[index] is not tensor:
                        return False  # a dict of slices, or a tensor made by the gather
                    sources[key] = index
        # The saver TF's gather feeds decides which shard each tensor goes to, and in which
        # order (the order of the data file).
        multi_device = functional_saver.MultiDeviceSaver(serialized)
        shards = [
            (task, shard)
            for task, task_shards in multi_device._get_shards_by_task(None)
            for shard in task_shards
        ]
        if len(shards) != 1:
            return False
        task, shard = shards[0]
        names: list[str] = []
        feed: list[int] = []
        for key, slices in shard.items():
            for spec, tensor in slices.items():
                if tensor is None:
                    continue  # recorded in the object graph, no value saved (as TF does)
                if spec or hasattr(tensor, "_wrapped_name") or key not in sources:
                    return False
                names.append(key)
                feed.append(sources[key])
        device = task.to_string()
        write_key = (tuple(names), tuple(feed), tuple(v.dtype for v in values), device)
        if self._writer_fn is None or self._writer_fn[0] != write_key:
            self._writer_fn = (write_key, _traced_write(counter, names, feed, values, device))
        plan.write = self._writer_fn[1]
        with tf.device("/cpu:0"):
            plan.graph = tf.constant(graph.SerializeToString(), dtype=tf.string)
        return True

    def _write(self, snapshot: _Snapshot | _SnapshotMap, step: int) -> None:
        """The background write; an error is kept for :meth:`wait` to raise."""
        try:
            self._save_files(snapshot, step)
        except BaseException as error:  # kept for wait() to raise on the training thread
            self._write_error = error

    def _save_files(self, snapshot: _Snapshot | _SnapshotMap, step: int) -> None:
        """Writes checkpoint ``step`` from a snapshot; the ``checkpoint`` index last."""
        assert self._checkpoint is not None and self._manager is not None
        if isinstance(snapshot, _SnapshotMap):
            # The manager's usual save, fed the snapshot's tensors through the object map.
            saver = self._checkpoint._saver
            saver._object_map = snapshot
            try:
                self._manager.save(checkpoint_number=step)
            finally:
                saver._object_map = None
            return
        path = self._path(step)
        write = snapshot.plan.write
        inputs = [tf.constant(path), *snapshot.values, snapshot.plan.graph]
        try:
            # The concrete function's flat call: binding some 40 arguments the public way
            # costs more than the rest of the call.
            write._call_flat(inputs, write.captured_inputs)
        except tf.errors.OpError as error:
            raise _eager_message(error) from error
        self._record(path)

    def _record(self, path: str) -> None:
        """The manager's bookkeeping after a save, as ``CheckpointManager.save`` does it.

        The new checkpoint goes into the ``checkpoint`` index and the ones beyond
        ``max_to_keep`` are deleted: ``manager.checkpoints``, ``tf.train.latest_checkpoint``
        and a later ``manager.save`` see what they would after the manager's own save. The
        manager writes the index twice, before and after deleting; this writes it once, already
        without the checkpoints it deletes next, so the index never names a deleted checkpoint.
        """
        manager = self._manager
        assert manager is not None and not manager._keep_checkpoint_every_n_hours
        timestamp = time.time()
        manager._maybe_delete.pop(path, None)  # a checkpoint saved again goes to the end
        manager._maybe_delete[path] = timestamp
        manager._latest_checkpoint = path
        expired = []
        while len(manager._maybe_delete) > manager._max_to_keep:
            expired.append(manager._maybe_delete.popitem(last=False)[0])
        manager._record_state()
        for prefix in expired:
            _delete_checkpoint_files(prefix)

    # ------------------------------------------------------------------------- preemption

    def install_signal_handlers(self) -> None:
        """Makes the preemption signals set a flag instead of killing the process."""
        self.preempted = False
        if not self.preemption_signals:
            return
        import threading

        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum: int, frame: Any) -> None:
            logger.warning("tfloop: got signal %d; saving at the next step boundary", signum)
            self.preempted = True

        for signum in self.preemption_signals:
            self._previous_handlers[signum] = signal.signal(signum, handler)

    def uninstall_signal_handlers(self) -> None:
        for signum, previous in self._previous_handlers.items():
            signal.signal(signum, previous)
        self._previous_handlers.clear()


class _WriterThread:
    """One long-lived background thread that runs the submitted writes in order.

    Starting a thread per save cost about half a millisecond of the training thread (the GIL
    handed back and forth). The thread ends after a second without work, so an idle
    Checkpointer holds no thread, and it holds no reference to the Checkpointer between jobs.
    """

    IDLE_SECONDS = 1.0

    def __init__(self) -> None:
        self._jobs: queue.Queue[tuple[Any, tuple[Any, ...]]] = queue.Queue()
        self._lock = threading.Lock()
        self._alive = False

    def submit(self, fn: Any, *args: Any) -> None:
        with self._lock:
            self._jobs.put((fn, args))
            if not self._alive:
                self._alive = True
                threading.Thread(
                    target=self._run, name="tfloop-checkpoint-writer", daemon=True
                ).start()

    def join(self) -> None:
        """Blocks until every submitted job has run."""
        self._jobs.join()

    def _run(self) -> None:
        while True:
            try:
                fn, args = self._jobs.get(timeout=self.IDLE_SECONDS)
            except queue.Empty:
                with self._lock:
                    if self._jobs.empty():
                        self._alive = False
                        return
                continue
            try:
                fn(*args)  # _write keeps its own errors for wait() to raise
            finally:
                del fn, args
                self._jobs.task_done()


class _SnapshotMap(object_identity.ObjectIdentityDictionary):  # type: ignore[misc]
    """Each saved object -> its frozen stand-in (or itself when it saves no tensors).

    TF's saver looks every object of the graph up here (``get``) while it writes. An object
    that was not there at the snapshot would be written with its live value, so it stops the
    write with an error instead, before any file is made.
    """

    def get(self, key: Any, default: Any = None) -> Any:
        if key not in self:
            raise CheckpointError(
                f"an object ({type(key).__name__}) was added to the saved state during a "
                "background checkpoint write; pass Checkpointer(async_save=False) if the model "
                "or optimizer gains state while training."
            )
        return self[key]


class _Plan:
    """The saved objects, sorted by how a snapshot freezes them, and their compiled write."""

    def __init__(self) -> None:
        self.unchanged: list[Any] = []  # save no tensors (containers), or the save counter
        self.variables: list[tuple[Any, str]] = []  # plain variables and their full names
        self.sources: list[tf.Variable] = []  # the tf.Variable behind each of those
        self.others: list[Any] = []  # frozen through their own _serialize_to_tensors
        self.read: Any = None  # a tf.function reading all of ``sources`` at once
        self.compiled: bool | None = None  # whether ``write`` does the saves (None: not tried)
        self.layout: list[list[tuple[str, ...]]] = []  # the tensor names of each of ``others``
        self.write: Any = None  # (path, snapshot values + [graph]) -> writes the files
        self.graph: Any = None  # the serialized object graph: it only depends on the objects
        # the positions in ``sources`` of the checkpoint's metadata and leftover batches
        self.metadata = self.leftover = -1


class _Snapshot:
    """The saved tensors at a save, in the order the plan's compiled write takes them.

    The values of ``plan.variables`` (one batched read), then the tensors of each of
    ``plan.others`` in ``plan.layout`` order.
    """

    def __init__(self, plan: _Plan, values: list[Any]) -> None:
        self.plan = plan
        self.values = values


def _stand_ins(plan: _Plan, values: list[Any], frozen: list[Any]) -> _SnapshotMap:
    """The object map that makes TF's saver write ``values`` in place of the live objects."""
    snapshot = _SnapshotMap()
    for obj in plan.unchanged:
        snapshot[obj] = obj
    count = len(plan.variables)
    for (obj, full_name), value in zip(plan.variables, values[:count], strict=True):
        snapshot[obj] = _FrozenVariable({_VARIABLE_VALUE: value}, full_name)
    for obj, stand_in in zip(plan.others, frozen, strict=True):
        snapshot[obj] = stand_in
    return snapshot


_Edge = tuple[int, str, Any]  # (index of the parent in the walk, name, child)


def _walk(view: Any) -> tuple[list[Any], list[_Edge]]:
    """The saved objects in the order TF's saver visits them, and every edge between them.

    The breadth-first walk of ``ObjectGraphView.breadth_first_traversal``, which also names
    each object by the first path that reaches it: two walks with the same edges have the
    same objects, checkpoint keys and object graph.
    """
    root = view.root
    objects = [root]
    seen = {id(root)}
    edges: list[_Edge] = []
    index = 0
    while index < len(objects):
        for name, child in _children(view, objects[index], index == 0).items():
            edges.append((index, name, child))
            if id(child) not in seen:
                seen.add(id(child))
                objects.append(child)
        index += 1
    return objects, edges


def _children(view: Any, obj: Any, root: bool) -> dict[str, Any]:
    """``view.children(obj)``, asked of ``obj`` directly when that gives the same.

    The view also initializes the object's tracking (two attribute sets, slow on Keras
    layers), converts children that are not Trackables, and adds the root's attached
    dependencies (the save counter): the walk of every save takes half the time without.
    """
    if root or not hasattr(obj, "_self_unconditional_checkpoint_dependencies"):
        return dict(view.children(obj))
    children: dict[str, Any] = obj._trackable_children(trackable_base.SaveType.CHECKPOINT)
    if all(isinstance(child, trackable_base.Trackable) for child in children.values()):
        return children
    return dict(view.children(obj))


def _same_edges(old: list[_Edge], new: list[_Edge]) -> bool:
    """Whether two walks saw the same graph (objects compared by identity, never ``==``)."""
    return len(old) == len(new) and all(
        a[0] == b[0] and a[1] == b[1] and a[2] is b[2] for a, b in zip(old, new, strict=True)
    )


def _leaves(
    tensors: dict[str, Any], path: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], Any]]:
    """The tensors of a frozen object's (nested) dict, each with its path of names."""
    leaves = []
    for name, value in tensors.items():
        if isinstance(value, dict):
            leaves.extend(_leaves(value, (*path, name)))
        else:
            leaves.append(((*path, name), value))
    return leaves


_COUNTER = -2  # in a compiled write's feed: the save counter, counted in the write
_GRAPH = -1  # the serialized object graph, the last input of a compiled write


def _traced_write(
    counter: tf.Variable, names: list[str], feed: list[int], values: list[Any], device: str
) -> Any:
    """A concrete function writing one checkpoint: the ``SaveV2`` that TF's saver runs.

    It takes the checkpoint's path and the snapshot values (with the object graph last) and
    counts the save in ``counter``, as ``CheckpointManager.save`` does, saving the new count.
    ``names[i]`` is written from input ``feed[i]``. Shapes are left open, so the leftover
    batches or a different iterator state do not trace it again.

    TF's saver writes a shard into a temporary directory and merges it into the checkpoint
    (``MergeV2Checkpoints``); with one shard the merge only renames the data file and copies
    the index, so this writes the checkpoint's own files directly: the same bytes, a third of
    a millisecond less. ``SaveV2`` writes each file under a temporary name and renames it when
    complete, so a save killed halfway leaves ``*.tempstate*`` files, never a partial one.
    """
    signature = (
        tf.TensorSpec((), tf.string),
        [tf.TensorSpec(None, value.dtype) for value in values] + [tf.TensorSpec((), tf.string)],
    )

    def write(prefix: tf.Tensor, inputs: list[tf.Tensor]) -> tf.Tensor:
        count = counter.assign_add(1, read_value=True)
        with tf.device("/device:CPU:0"):
            count = tf.identity(count)
        tensors = [count if source == _COUNTER else inputs[source] for source in feed]
        with tf.device(device):
            saved = gen_io_ops.save_v2(prefix, names, [""] * len(names), tensors)
        # An output that needs the save: tf.function's automatic control dependencies do
        # not keep this SaveV2 on their own (the function would run without writing).
        with tf.control_dependencies([saved]):
            return tf.identity(prefix)

    return tf.function(write, input_signature=signature, autograph=False).get_concrete_function()


def _plain_variable(obj: Any) -> tf.Variable | None:
    """The ResourceVariable behind ``obj`` if it saves just that variable's value."""
    if isinstance(obj, keras.Variable):
        obj = obj.value
    if type(obj) in (
        resource_variable_ops.ResourceVariable,
        resource_variable_ops.UninitializedVariable,
    ):
        return obj
    return None


class _Frozen(trackable_base.Trackable):  # type: ignore[misc]
    """Stands in for a saved object in a background write: the tensors it had at the save."""

    def __init__(self, tensors: dict[str, Any], full_name: str) -> None:
        self._tensors = tensors
        self._shared_name = full_name  # written to the object graph, as for the original

    def _serialize_to_tensors(self) -> dict[str, Any]:
        return self._tensors


class _FrozenVariable(_Frozen):
    """A frozen variable: TF writes a variable's name into the object graph, so this one too."""

    _should_act_as_resource_variable = True
    _save_slice_info = None


_CANNOT_FREEZE = object()


@functools.cache
def _no_leftover() -> tf.Tensor:
    """The leftover batches when there are none (made once, not at every save)."""
    return tf.constant([], tf.string)


_VARIABLE_VALUE = trackable_base.VARIABLE_VALUE_KEY


def _freeze(obj: Any) -> Any:
    """A frozen copy of what ``obj`` saves; None if it saves nothing; or _CANNOT_FREEZE."""
    if isinstance(obj, python_state.PythonState) or registration.get_registered_saver_name(obj):
        return _CANNOT_FREEZE
    if not saveable_object_util.trackable_has_serialize_to_tensor(obj):
        # Legacy SaveableObjects are read when written: they cannot be frozen.
        return _CANNOT_FREEZE if obj._gather_saveables_for_checkpoint() else None
    tensors = _frozen_values(obj._serialize_to_tensors())
    if tensors is _CANNOT_FREEZE:
        return _CANNOT_FREEZE
    kind = _FrozenVariable if resource_variable_ops.is_resource_variable(obj) else _Frozen
    frozen = kind(tensors, checkpoint_util.get_full_name(obj))
    legacy_name = saveable_compat.get_saveable_name(obj)
    if legacy_name:
        # The name its tensors are saved under (a tf.data iterator's is "ITERATOR"): the
        # stand-in's tensors must get the same checkpoint keys.
        saveable_compat.legacy_saveable_name(legacy_name)(frozen)
    return frozen


def _frozen_values(values: dict[str, Any]) -> Any:
    """Evaluates what ``_serialize_to_tensors`` returned into tensors that will not change.

    A variable read is immutable: TF copies a variable's buffer before updating it while a
    read of it is alive (copy-on-write), so later training steps do not reach the snapshot.
    """
    frozen: dict[str, Any] = {}
    for name, value in values.items():
        if isinstance(value, dict):
            value = _frozen_values(value)
        elif isinstance(value, saveable_object.SaveSpec):
            value = None if value.slice_spec else value.tensor  # a Callable reads the variable
        elif isinstance(value, tf.Variable) or resource_variable_ops.is_resource_variable(value):
            value = value.read_value()
        if value is _CANNOT_FREEZE or not (isinstance(value, dict) or tf.is_tensor(value)):
            return _CANNOT_FREEZE
        frozen[name] = value
    return frozen


def _eager_message(error: tf.errors.OpError) -> tf.errors.OpError:
    """``error`` of the compiled write, with the message the eager op would give.

    An op failing in a tf.function says "Graph execution error:" first, then where the op was
    traced, then what went wrong ("...ckpt-6.data-00000-of-00001...; Is a directory"): the
    error a failed write raises quotes its first line, so that line has to be the cause.
    """
    lines = error.message.splitlines()
    marker = next((i for i, line in enumerate(lines) if line.startswith("Detected at node")), -1)
    body = []
    for line in lines[marker + 1 :] if marker >= 0 else []:
        if line.lstrip().startswith("[[{{node"):
            break
        if line.strip() and not line.startswith(" "):  # the trace's lines are indented
            body.append(line)
    if not body:
        return error
    try:
        return type(error)(error.node_def, error.op, "\n".join(body))
    except TypeError:  # a class that wants more arguments: keep the error as it is
        return error


def _delete_checkpoint_files(prefix: str) -> None:
    """Deletes the files of checkpoint ``prefix`` (``CheckpointManager``'s sweep of one).

    The files are named, not found by TF's pattern match, which lists the directory on a
    thread pool (a millisecond); only a checkpoint of several shards needs a listing.
    """
    data = [f"{prefix}.data-00000-of-00001"]
    if not os.path.exists(data[0]):
        data = glob.glob(f"{glob.escape(prefix)}.data-?????-of-?????")
    for name in [f"{prefix}.index", *data]:
        with contextlib.suppress(FileNotFoundError):  # deleted by someone else
            os.remove(name)


def _positive_int_or_none(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be an int >= 1 or None, got {value!r}.")
    return value


def _structure(nested: Any) -> Any:
    """A JSON description of a nest of tensors (tuples, lists, dicts), leaves as ``null``."""
    if isinstance(nested, dict):
        return {"dict": {k: _structure(v) for k, v in nested.items()}}
    if isinstance(nested, (tuple, list)):
        return {"tuple": [_structure(v) for v in nested]}
    return None


def _unflatten(structure: Any, leaves: list[Any]) -> Any:
    def build(node: Any) -> Any:
        if node is None:
            return leaves.pop(0)
        if "dict" in node:
            return {k: build(v) for k, v in sorted(node["dict"].items())}
        return tuple(build(v) for v in node["tuple"])

    leaves = list(leaves)
    return build(structure)
