"""Which checkpoint a run resumes from: the candidates, their metadata, a full read of each."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import tensorflow as tf
from google.protobuf import text_format
from tensorflow.python.training.checkpoint_state_pb2 import CheckpointState

from tfloop import _validate
from tfloop.checkpoint._metadata import CORRUPT_ERRORS, FORMAT_VERSION
from tfloop.errors import CheckpointError
from tfloop.io import files

__all__ = [
    "checkpoint_number",
    "complete_checkpoints",
    "find_candidates",
    "latest_readable",
    "read_metadata",
]

logger = logging.getLogger("tfloop")


def find_candidates(directory: str, restore: str | os.PathLike[str] | None) -> list[str]:
    """Checkpoint paths to try, newest first (after ``restore`` is applied)."""
    if restore is None:
        return []
    if restore != "latest":
        path = os.fspath(restore)
        if not files.exists(path + ".index"):
            raise CheckpointError(
                f"restore={path!r} names no checkpoint ({path + '.index'!r} does not "
                "exist). Pass a checkpoint prefix such as 'dir/ckpt-300', "
                "restore='latest' or restore=None."
            )
        return [path]
    index = files.join(directory, "checkpoint")
    state = None
    if files.exists(index):
        # TF logs a garbled index and carries on as if there were no checkpoints: that would
        # be a silent fresh start, so parse it here and stop instead.
        try:
            state = CheckpointState()
            text_format.Parse(files.read_text(index), state)
        except (text_format.ParseError, UnicodeDecodeError, OSError) as error:
            raise CheckpointError(
                f"the checkpoint index {index!r} cannot be read "
                f"({_validate.first_line(error)}). Fix or delete that file (the ckpt-* "
                "files next to it may be intact), or pass Checkpointer(restore=None) to "
                "start fresh."
            ) from error
    if state is None or not (state.model_checkpoint_path or state.all_model_checkpoint_paths):
        return []
    state = tf.train.get_checkpoint_state(directory)
    if state is None:
        return []
    # TF has already joined relative entries with the directory.
    paths = list(state.all_model_checkpoint_paths) or [state.model_checkpoint_path]
    return list(reversed(paths))


def complete_checkpoints(directory: str | os.PathLike[str]) -> list[str]:
    """The complete checkpoints in ``directory``, oldest first (by the number in the name).

    Only what the ``checkpoint`` index names (it is written after a checkpoint's files are
    complete) and the keep-best checkpoints its newest one records: never a save in progress,
    nor the private copies other workers write into subdirectories.
    """
    directory = os.fspath(directory)
    paths = find_candidates(directory, "latest")  # newest first
    if paths:
        try:
            best = read_metadata(paths[0]).get("best") or []
        except CORRUPT_ERRORS:
            best = []  # not a tfloop checkpoint, or being replaced: the index is enough
        for step, _ in best:
            path = files.join(directory, f"ckpt-{step}")
            if files.exists(path + ".index"):
                paths.append(path)
    by_number = {checkpoint_number(path): path for path in reversed(paths)}
    return [by_number[number] for number in sorted(by_number)]


def checkpoint_number(path: str) -> int:
    """The ``n`` of ``.../ckpt-n`` (tfloop's checkpoints are numbered by update count)."""
    try:
        return int(path.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def read_metadata(path: str) -> dict[str, Any]:
    """The JSON metadata of the checkpoint at ``path`` (reads the index, not the weights)."""
    reader = _reader(path)
    raw = reader.get_tensor("metadata/.ATTRIBUTES/VARIABLE_VALUE")
    metadata: dict[str, Any] = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
    if metadata.get("format") != FORMAT_VERSION:
        raise ValueError(f"unknown checkpoint format {metadata.get('format')!r}")
    return metadata


def latest_readable(
    directory: str, restore: str | os.PathLike[str] | None
) -> tuple[str, dict[str, Any]] | None:
    """The newest checkpoint that reads in full, and its metadata (None: start fresh).

    Every tensor of a candidate is read (and checksummed) before it is chosen, and a corrupt
    one is skipped with a warning: the run settles which checkpoint it resumes from before
    it draws anything from the data, so falling back to an older checkpoint is as exact as
    resuming from it directly.
    """
    candidates = find_candidates(directory, restore)
    for path in candidates:
        try:
            metadata = read_metadata(path)
            _read_every_tensor(path)
        except CORRUPT_ERRORS as error:
            logger.warning(
                "tfloop: checkpoint %s cannot be restored (%s: %s); trying the previous one",
                path,
                type(error).__name__,
                _validate.first_line(error),
            )
            continue
        return path, metadata
    if candidates:
        raise CheckpointError(
            f"no checkpoint in {directory!r} could be read (tried "
            f"{', '.join(candidates)}). Nothing was overwritten. Move the directory away or "
            "pass Checkpointer(restore=None) to start fresh."
        )
    return None


def _read_every_tensor(path: str) -> None:
    """Reads every tensor of checkpoint ``path``, so a truncated or altered file fails here.

    A ``tf.data`` iterator's state reads as a variant, which the Python reader cannot
    convert: reaching that conversion means its bytes were read and parsed.
    """
    reader = _reader(path)
    for name in reader.get_variable_to_dtype_map():
        try:
            reader.get_tensor(name)
        except tf.errors.InternalError as error:
            if "not convertible to numpy" not in str(error):
                raise


def _reader(path: str) -> Any:
    """A reader of checkpoint ``path`` (a prefix). Not ``tf.train.load_checkpoint``, which
    takes a path that is a directory for the latest checkpoint in it: on ``ram://`` any prefix
    of a file's name is a directory."""
    return tf.compat.v1.train.NewCheckpointReader(path)
