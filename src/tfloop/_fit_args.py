"""``fit``'s arguments, validated and turned into a :class:`FitPlan` before anything runs."""

from __future__ import annotations

import dataclasses
from typing import Any

from tfloop import _validate
from tfloop import data as data_lib
from tfloop.data import DataSource
from tfloop.errors import ConfigError

__all__ = ["FitPlan", "plan_fit"]


@dataclasses.dataclass
class FitPlan:
    """The validated arguments of one ``fit`` call."""

    source: DataSource
    validation: DataSource | None
    epochs: int
    initial_epoch: int
    steps_per_epoch: int | None  # as the user gave it
    validation_freq: int
    verbose: int
    data_seed: int  # the array shuffle's seed (a resume restores the run's own)

    @property
    def persistent(self) -> bool:
        """One iterator across epochs: a dataset with ``steps_per_epoch`` is not restarted
        every epoch (as in Keras), so an infinite or long dataset goes on where it was."""
        return self.steps_per_epoch is not None and not self.source.indexed


def plan_fit(
    data: Any,
    *,
    epochs: Any,
    steps_per_epoch: Any,
    validation_data: Any,
    validation_freq: Any,
    initial_epoch: Any,
    batch_size: Any,
    shuffle: Any,
    verbose: Any,
    steps_per_execution: int | str,
    data_seed: int,
    strategy: Any = None,
) -> FitPlan:
    """Checks every argument of ``fit`` and adapts its inputs; raises before anything runs.

    Under ``strategy`` each worker reads its own shard of ``data`` (validation data is read
    whole, on every worker or on the coordinator).
    """
    epochs = _validate.count(epochs, "epochs", minimum=1)
    steps_per_epoch = _validate.optional_count(steps_per_epoch, "steps_per_epoch")
    validation_freq = _validate.count(validation_freq, "validation_freq", minimum=1)
    initial_epoch = _validate.count(initial_epoch or 0, "initial_epoch", minimum=0)
    source = data_lib.adapt(
        data,
        batch_size=batch_size,
        steps_per_execution=steps_per_execution,
        steps=steps_per_epoch,
        steps_argument="steps_per_epoch",
        shuffle=shuffle,
        seed=data_seed,
        strategy=strategy,
    )
    if source.indexed and (steps_per_epoch or 0) > (source.steps_per_epoch or 0):
        raise ConfigError(
            f"steps_per_epoch={steps_per_epoch} is more than the "
            f"{source.steps_per_epoch} batches the arrays hold; lower it or leave it "
            "None (one pass over the arrays per epoch)."
        )
    validation = None
    if validation_data is not None:
        validation = data_lib.adapt(
            validation_data,
            batch_size=batch_size,
            steps_per_execution=steps_per_execution,
            steps_argument="validation_steps",
            shuffle=False,
            argument="validation_data",
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
    )
