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

Saves go through ``tf.train.CheckpointManager``: the data files are written first and the
``checkpoint`` index last, atomically, so a save killed halfway is never taken for a checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tensorflow as tf
from google.protobuf import text_format
from tensorflow.python.training.checkpoint_state_pb2 import CheckpointState

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

    Example:
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
        self.preempted = False
        self.last_saved: str | None = None
        self.saved_iterator = False  # whether the last save included a tf.data iterator
        self._trainer: Trainer | None = None
        self._checkpoint: tf.train.Checkpoint | None = None
        self._manager: tf.train.CheckpointManager | None = None
        self._last_save_time = time.monotonic()
        self._last_position: tuple[int, int, int] | None = None
        self._previous_handlers: dict[int, Any] = {}

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
        """Deletes the leftovers of a save that was killed halfway (``*_temp*``)."""
        removed = []
        for path in self.directory.glob("*_temp*"):
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
            return  # a later fit call of the same trainer: same objects, same checkpoint
        self._trainer = trainer
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
            self._checkpoint, str(self.directory), max_to_keep=self.max_to_keep
        )

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
        """Writes a checkpoint of the current state at ``(epoch, batch)``; returns its path."""
        assert self._trainer is not None and self._manager is not None
        step = int(self._trainer.optimizer.iterations)
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
        if hasattr(self._data, "iterator"):
            del self._data.iterator
        self.saved_iterator = False
        leaves: list[tf.Tensor] = []
        if stream is not None and stream.iterator is not None and self.save_iterator:
            # An exhausted iterator is not saved: restoring one disturbs the shuffle seeds of
            # the iterators made after it. "Exhausted" plus the leftover batches says it all.
            if stream.exhausted:
                metadata["exhausted"] = True
            else:
                self._data.iterator = stream.iterator
                self.saved_iterator = True
            metadata["iterator"] = True
            runs = stream.leftover()
            for run in runs:
                leaves.extend(tf.io.serialize_tensor(t) for t in tf.nest.flatten(run))
            if runs:
                metadata["leftover_runs"] = len(runs)
                metadata["leftover_dtypes"] = [t.dtype.name for t in tf.nest.flatten(runs[0])]
                metadata["leftover_structure"] = json.dumps(_structure(runs[0]))
        self._leftover.assign(tf.stack(leaves) if leaves else tf.constant([], tf.string))
        self._metadata.assign(json.dumps(metadata))
        path: str = self._manager.save(checkpoint_number=step)
        self._last_save_time = time.monotonic()
        self._last_position = (epoch, batch, step)
        self.last_saved = path
        return path

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
