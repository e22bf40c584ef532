"""``fit``'s arguments, validated and turned into a :class:`FitPlan` before anything runs.

``fit`` takes Keras's arguments with Keras's meaning (docs/coming-from-keras.md): ``x`` and
``y`` (or ``x`` alone: a dataset, a PyDataset, a generator, an ``(x, y)`` tuple),
``validation_split`` (the last fraction of the arrays, before shuffling), ``class_weight``,
``sample_weight``, ``validation_steps``, ``validation_batch_size``, ``validation_freq`` (an
int, or the list of 1-based epochs to validate after).
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import numbers
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from tfloop import _distribute, _validate
from tfloop import data as data_lib
from tfloop.data import DataSource
from tfloop.errors import ConfigError

__all__ = ["Duration", "FitPlan", "as_data", "plan_fit"]

Duration = float | datetime.timedelta
"""A time budget: seconds, or a ``datetime.timedelta``."""


@dataclasses.dataclass
class FitPlan:
    """The validated arguments of one ``fit`` call."""

    source: DataSource
    validation: DataSource | None
    epochs: int
    initial_epoch: int
    steps_per_epoch: int | None  # as the user gave it
    validation_freq: int | Sequence[int]  # every n-th epoch, or these 1-based epochs
    verbose: int
    data_seed: int  # the array shuffle's seed (a resume restores the run's own)
    validation_every_n_steps: int | None = None
    max_steps: int | None = None  # updates in total, counted across resumes
    max_time: float | None = None  # seconds of the run, counted across resumes
    clock: Callable[[], float] = time.monotonic  # what max_time is measured with

    @property
    def persistent(self) -> bool:
        """One iterator across epochs: a dataset with ``steps_per_epoch`` is not restarted
        every epoch (as in Keras), so an infinite or long dataset goes on where it was."""
        return self.steps_per_epoch is not None and not self.source.indexed

    def validates_after(self, epoch: int) -> bool:
        """Whether the (0-based) ``epoch`` ends with a validation pass."""
        if self.validation is None:
            return False
        if isinstance(self.validation_freq, int):
            return (epoch + 1) % self.validation_freq == 0
        return epoch + 1 in self.validation_freq


def as_data(x: Any, y: Any = None, sample_weight: Any = None, argument: str = "x") -> Any:
    """One input from Keras's ``x, y, sample_weight``: ``(x, y[, sample_weight])`` for arrays,
    ``x`` itself for a dataset, a PyDataset, a generator or an ``(x, y)`` tuple."""
    if isinstance(y, (bool, int, float)) and not isinstance(y, np.ndarray):
        raise ConfigError(
            f"y={y!r} is not an array of targets. fit, evaluate and predict take Keras's order, "
            "fit(x, y, batch_size, epochs, ...): pass epochs=... (and the others) by name, or "
            "pass the data as one (x, y) tuple."
        )
    if y is None and sample_weight is None:
        return x
    if data_lib.is_batched_input(x):
        raise ConfigError(
            f"y or sample_weight was given with a {type(x).__name__} as {argument}; such an "
            "input yields (x, y[, sample_weight]) batches itself. Drop y and sample_weight."
        )
    return (x, y) if sample_weight is None else (x, y, sample_weight)


def plan_fit(
    steps_per_execution: int | str,
    data_seed: int,
    *,
    x: Any,
    y: Any,
    batch_size: Any,
    epochs: Any,
    verbose: Any,
    validation_split: Any,
    validation_data: Any,
    shuffle: Any,
    class_weight: Any,
    sample_weight: Any,
    initial_epoch: Any,
    steps_per_epoch: Any,
    validation_steps: Any,
    validation_batch_size: Any,
    validation_freq: Any,
    validation_every_n_steps: Any = None,
    max_steps: Any = None,
    max_time: Any = None,
    clock: Callable[[], float] = time.monotonic,
    strategy: Any = None,
) -> FitPlan:
    """Checks every argument of ``fit`` and adapts its inputs; raises before anything runs.

    Under ``strategy`` each worker reads its own shard of ``x``, and under
    ``MultiWorkerMirroredStrategy`` of the validation data too (under any other strategy it is
    read whole, by the one worker or the coordinator).
    """
    epochs = _validate.count(epochs, "epochs", minimum=1)
    initial_epoch = _validate.count(initial_epoch or 0, "initial_epoch", minimum=0)
    if initial_epoch > epochs:
        raise ConfigError(
            f"initial_epoch={initial_epoch} is past epochs={epochs}: epochs is the epoch to "
            "stop at, counted from 0 (as in Keras), so nothing would train. Raise epochs."
        )
    steps_per_epoch = _validate.optional_count(steps_per_epoch, "steps_per_epoch")
    validation_freq = _validation_freq(validation_freq)
    every = _validate.optional_count(validation_every_n_steps, "validation_every_n_steps")
    max_steps = _validate.optional_count(max_steps, "max_steps")
    seconds = _seconds(max_time)
    verbose = _verbose(verbose)
    shuffle = _validate.boolean(shuffle, "shuffle")
    data = as_data(x, y, sample_weight)
    validation_split = _validate.number(validation_split, "validation_split")
    if validation_split:
        split = data_lib.split_for_validation(data, validation_split)
        data = split[0]
        if validation_data is None:
            validation_data = split[1]
    source = data_lib.adapt(
        data,
        batch_size=batch_size,
        steps_per_execution=steps_per_execution,
        steps=steps_per_epoch,
        steps_argument="steps_per_epoch",
        shuffle=shuffle,
        seed=data_seed,
        argument="x",
        class_weight=class_weight,
        strategy=strategy,
        # A generator read once cannot give several epochs: say so before training.
        passes=1 if steps_per_epoch else epochs - initial_epoch,
    )
    if source.indexed and (steps_per_epoch or 0) > (source.steps_per_epoch or 0):
        raise ConfigError(
            f"steps_per_epoch={steps_per_epoch} is more than the "
            f"{source.steps_per_epoch} batches the input holds; lower it or leave it "
            "None (one pass over the input per epoch)."
        )
    validation = None
    if validation_data is not None:
        if data_lib.is_arrays(validation_data):
            validation_batch_size = validation_batch_size or batch_size
        validation = data_lib.adapt(
            validation_data,
            batch_size=validation_batch_size,
            steps_per_execution=steps_per_execution,
            steps=_validate.optional_count(validation_steps, "validation_steps"),
            steps_argument="validation_steps",
            shuffle=False,
            argument="validation_data",
            strategy=_distribute.evaluation_shards(strategy),
            # Validation every n updates reads it again and again.
            passes=2 if every else max(1, _validations(validation_freq, initial_epoch, epochs)),
        )
    if every is not None and validation is None:
        raise ConfigError(
            f"validation_every_n_steps={every} needs validation data to evaluate; pass "
            "validation_data=... (or validation_split) to fit, or drop validation_every_n_steps."
        )
    return FitPlan(
        source=source,
        validation=validation,
        epochs=epochs,
        initial_epoch=initial_epoch,
        steps_per_epoch=steps_per_epoch,
        validation_freq=validation_freq,
        verbose=verbose,
        data_seed=data_seed,
        validation_every_n_steps=every,
        max_steps=max_steps,
        max_time=seconds,
        clock=clock,
    )


def _seconds(max_time: Any) -> float | None:
    """``max_time`` in seconds: a positive number of seconds or a ``timedelta``, or None."""
    if isinstance(max_time, datetime.timedelta):
        seconds = max_time.total_seconds()
        if seconds > 0:
            return seconds
    elif max_time is None:
        return None
    elif isinstance(max_time, numbers.Real) and not isinstance(max_time, bool):
        seconds = float(max_time)
        if math.isfinite(seconds) and seconds > 0:
            return seconds
    raise ConfigError(
        f"max_time must be a positive number of seconds or a datetime.timedelta, got {max_time!r}."
    )


def _validations(freq: int | tuple[int, ...], initial_epoch: int, epochs: int) -> int:
    """How many validation passes a fit of epochs ``initial_epoch..epochs-1`` makes."""
    if isinstance(freq, int):
        return sum(1 for epoch in range(initial_epoch, epochs) if (epoch + 1) % freq == 0)
    return sum(1 for epoch in range(initial_epoch, epochs) if epoch + 1 in freq)


def _validation_freq(value: Any) -> int | tuple[int, ...]:
    if isinstance(value, (list, tuple, set)):
        epochs = tuple(sorted(_validate.count(v, "validation_freq", minimum=1) for v in value))
        if not epochs:
            raise ConfigError("validation_freq is an empty list; pass 1-based epochs, or an int.")
        return epochs
    return _validate.count(value, "validation_freq", minimum=1)


def _verbose(value: Any) -> int:
    if value == "auto":
        return 1
    if not isinstance(value, (int, np.integer)) or value not in (0, 1, 2):
        raise ConfigError(
            f"verbose must be 0 (silent), 1 (progress), 2 (one line per epoch) or 'auto', got "
            f"{value!r}."
        )
    return int(value)
