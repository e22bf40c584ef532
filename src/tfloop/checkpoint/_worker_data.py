"""Each worker's own input position, under per-worker input (``MultiWorkerMirroredStrategy``).

With per-worker input every worker reads its own shard, so the chief's checkpoint cannot hold
the other workers' ``tf.data`` iterators. Each worker (the chief too) writes its iterator state
and the batches it had pulled but not run yet into ``<directory>/workers/<task>/ckpt-<step>``
*before* the chief writes the checkpoint (the workers agree on the step in between, a
collective), so every checkpoint the chief's index lists has the workers' data next to it. A
resume restores the chief's checkpoint and, on each worker, its own data of the same step.

Everything else about the position (epoch, batch, shuffle seeds, how many leftover batches and
their structure) is the same on every worker, because the workers cut their superbatches alike
(``tfloop/data/_lockstep.py``): it stays in the chief's metadata.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from tfloop import _distribute, _validate
from tfloop.checkpoint._metadata import CORRUPT_ERRORS
from tfloop.errors import CheckpointError
from tfloop.io import files

__all__ = ["WorkerData", "agree_on_step", "unsaveable"]


class WorkerData:
    """The iterator state and leftover batches of this worker, one checkpoint per save.

    Keeps one more checkpoint than the chief (``max_to_keep + 1``): a worker writes its data
    before the chief writes its checkpoint, so a cluster killed in between still finds, on
    every worker, the data of the chief's latest checkpoint.
    """

    def __init__(self, directory: str, max_to_keep: int) -> None:
        self.directory = directory
        self._holder = tf.Module(name="worker_data")
        self._leftover = tf.Variable(
            tf.constant([], tf.string), shape=tf.TensorShape([None]), trainable=False
        )
        self._checkpoint = tf.train.Checkpoint(data=self._holder, leftover=self._leftover)
        self._manager = tf.train.CheckpointManager(
            self._checkpoint, directory, max_to_keep=max_to_keep + 1
        )

    def _attach(self, iterator: Any) -> None:
        if iterator is not None:
            if getattr(self._holder, "iterator", None) is not iterator:
                self._holder.iterator = iterator
        elif hasattr(self._holder, "iterator"):
            del self._holder.iterator

    def save(self, step: int, iterator: Any, leftover: tf.Tensor) -> str:
        """Writes ``iterator`` (None: an exhausted one, not saved) and the encoded leftover
        batches as the data of update ``step``; returns the path."""
        self._attach(iterator)
        self._leftover.assign(leftover)
        return str(self._manager.save(checkpoint_number=step))

    def restore(self, step: int, iterator: Any) -> np.ndarray:
        """Restores the data of update ``step`` into ``iterator`` (None: not saved); returns
        the encoded leftover batches."""
        path = files.join(self.directory, f"ckpt-{step}")
        if not files.exists(path + ".index"):
            raise CheckpointError(
                f"this worker has no input position for update {step} ({path!r} does not "
                "exist), though the chief's checkpoint has one. Every worker writes its own "
                "under <directory>/workers/: give every worker the same checkpoint directory, "
                "on storage all of them read and write."
            )
        self._attach(iterator)
        try:
            self._checkpoint.restore(path).assert_existing_objects_matched()
        except (AssertionError, *CORRUPT_ERRORS) as error:
            raise CheckpointError(
                f"this worker's input position {path!r} could not be restored "
                f"({type(error).__name__}: {_validate.first_line(error)})."
            ) from error
        return np.asarray(self._leftover.numpy())


def agree_on_step(strategy: Any, step: int) -> None:
    """Waits until every worker wrote its input position for ``step`` (a collective)."""
    steps = sorted(set(_distribute.gather_from_replicas(strategy, step)))
    if len(steps) > 1:
        raise CheckpointError(
            f"the workers saved at different updates ({steps}); restart every worker with "
            "the same command to resume from the latest checkpoint."
        )


def unsaveable(reason: str) -> str:
    """The message for an input whose iterator cannot be saved (the ``tf.data`` service)."""
    return (
        f"the input's iterator cannot be saved: {reason}. Pass Checkpointer(..., "
        "save_iterator=False): checkpoints then record how many batches were trained on, and a "
        "resume skips that many (exact when the input yields the same batches in the same "
        "order each time it is read)."
    )
