"""Continuous evaluation of a run's checkpoints: a sidecar evaluator job.

A training job writes checkpoints; a second job, on other hardware, evaluates each of them as it
appears (Keras's ``SidecarEvaluator``, Orbit's continuous evaluation). The evaluator builds
the same Trainer (its loggers included), restores each checkpoint's model into it, and
evaluates: its ``JSONLLogger`` / ``TensorBoard`` then log every checkpoint at its step.

This sits beside the Trainer, not below it: it only needs the Trainer's public ``model``,
``optimizer`` and ``evaluate`` (the :class:`Evaluates` protocol).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from typing import Any, Protocol

import tensorflow as tf

from tfloop import _validate
from tfloop.checkpoint._metadata import CORRUPT_ERRORS
from tfloop.checkpoint._restore import checkpoint_number, complete_checkpoints, read_metadata
from tfloop.errors import CheckpointError
from tfloop.io import checks

__all__ = ["Evaluates", "evaluate_checkpoints"]

logger = logging.getLogger("tfloop")

READ_ATTEMPTS = 3
RETRY_SECONDS = 1.0


class Evaluates(Protocol):
    """What :func:`evaluate_checkpoints` uses of a ``tfloop.Trainer``."""

    model: Any
    optimizer: Any

    def evaluate(self, x: Any = None, *, steps: int | None = None, return_dict: bool = True) -> Any:
        """``Trainer.evaluate``."""


def evaluate_checkpoints(
    trainer: Evaluates,
    directory: str | os.PathLike[str],
    data: Any,
    *,
    steps: int | None = None,
    timeout: float | None = None,
) -> Iterator[tuple[int, dict[str, float]]]:
    """Evaluates every checkpoint of ``directory`` in order, then each new one as it appears.

    Yields ``(step, logs)``: the update count the checkpoint was saved at and
    ``trainer.evaluate(data, steps=steps)`` with its model (``data`` as ``evaluate``'s ``x``:
    arrays as ``(x, y)``, a dataset, ...). First the checkpoints already
    there, oldest first, then each one written after (TensorFlow's
    ``tf.train.checkpoints_iterator``), until ``timeout`` seconds pass without a new one
    (``None``: wait forever); ``directory`` may be a URL (``gs://...``). Only checkpoints the
    ``checkpoint`` index names are read (the index is written once a checkpoint's files are
    complete), plus the ``keep_best`` ones: never a save in progress, nor another worker's
    private copy. A checkpoint deleted by the
    training job's ``max_to_keep`` before it is read is skipped with a warning; each step is
    yielded once.

    ``trainer`` is a ``tfloop.Trainer`` made as the training job makes it (same model, loss
    and metrics); its callbacks see each evaluation (a ``JSONLLogger`` writes one
    ``"evaluate"`` record per checkpoint at its step). Its model's weights and its
    optimizer's ``iterations`` are those of the checkpoint evaluated last. On the command
    line: ``tfloop evaluate-checkpoints script.py DIRECTORY``.

    Raises:
        CheckpointError: a checkpoint of another model (the message names it).

    Examples:
        >>> import tempfile, numpy as np, keras, tfloop
        >>> directory = tempfile.mkdtemp()
        >>> data = (np.ones((8, 2)), np.ones((8, 1)))
        >>> def make_trainer(**kwargs):
        ...     model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        ...     return tfloop.Trainer(model, "sgd", "mse", **kwargs)
        >>> _ = make_trainer(checkpoint=directory).fit(data, epochs=2, batch_size=4, verbose=0)
        >>> [step for step, logs in tfloop.evaluate_checkpoints(make_trainer(), directory, data,
        ...                                                     timeout=0)]
        [2, 4]
    """
    steps = _validate.optional_count(steps, "steps", owner="evaluate_checkpoints")
    if timeout is not None:
        timeout = _validate.number(timeout, "timeout", owner="evaluate_checkpoints")
    directory = checks.check_scheme(directory, "evaluate_checkpoints directory")
    last = -1
    for _ in tf.train.checkpoints_iterator(directory, timeout=timeout):
        for path in complete_checkpoints(directory):
            number = checkpoint_number(path)
            if number <= last:
                continue
            last = number
            step = _restore_model(trainer, path)
            if step is not None:
                yield step, trainer.evaluate(data, steps=steps, return_dict=True)


def _restore_model(trainer: Evaluates, path: str) -> int | None:
    """Restores ``path``'s model into ``trainer``; returns its step (None: it is gone).

    The training job may write the same checkpoint again while it is read (a save at the last
    update of an epoch, then the epoch end's, at the same step): its files are then replaced
    one by one, and a read that mixes them fails; it is read again a moment later.
    """
    for attempt in range(READ_ATTEMPTS):
        try:
            try:
                step = int(read_metadata(path)["step"])
            except CORRUPT_ERRORS:  # a checkpoint tfloop did not write: its number is its step
                step = checkpoint_number(path)
            status = tf.train.Checkpoint(model=trainer.model).read(path)
            status.expect_partial()
            status.assert_existing_objects_matched()
            break
        except tf.errors.NotFoundError:
            logger.warning("tfloop: checkpoint %s was deleted before it could be evaluated", path)
            return None
        except (AssertionError, ValueError) as error:
            raise CheckpointError(
                f"checkpoint {path!r} does not hold this trainer's model "
                f"({_validate.first_line(error)}). Build the evaluator's Trainer as the "
                "training job builds its own."
            ) from error
        except tf.errors.OpError as error:
            if attempt == READ_ATTEMPTS - 1:
                raise CheckpointError(
                    f"checkpoint {path!r} could not be read ({_validate.first_line(error)})."
                ) from error
            time.sleep(RETRY_SECONDS)
    trainer.optimizer.iterations.assign(step)
    return step
