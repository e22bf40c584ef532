"""NonFiniteGuard and TerminateOnNaN: what to do when the loss or a gradient is NaN or Inf."""

from __future__ import annotations

import logging
import math
from typing import Literal

from tfloop._logs import NON_FINITE_STEPS, STEP
from tfloop.callbacks.base import Callback, Logs, update_count
from tfloop.errors import ConfigError, NonFiniteError

__all__ = ["NonFiniteGuard", "TerminateOnNaN"]

logger = logging.getLogger("tfloop")

Policy = Literal["raise", "skip", "ignore"]
_POLICIES = ("raise", "skip", "ignore")
_ADVICE = (
    "Lower the learning rate, clip gradients with Trainer(clip_global_norm=...), check the data "
    "for NaN/Inf and for integer labels outside the output's classes (under XLA they give a "
    "NaN loss), or pass NonFiniteGuard('skip') to skip such updates."
)


class NonFiniteGuard(Callback):
    """Keeps NaN and Inf out of the weights: ``policy`` says what to do about them.

    - ``"raise"``: the update is dropped in-graph and ``fit`` raises
      :class:`tfloop.errors.NonFiniteError` after the execution that met it, naming the step
      and what was non-finite (the loss, or the gradient of which variable). The other steps
      of that execution (``steps_per_execution``) have run; the weights are finite.
    - ``"skip"``: such updates are dropped in-graph and training goes on; logs get
      ``non_finite_steps`` (the count so far) and the guard logs a warning the first time.
      A dropped micro-batch does not count in the epoch's mean loss.
    - ``"ignore"``: nothing is checked (the fastest; NaN gradients reach the weights).

    The check runs inside the compiled step (a ``tf.cond`` around the update), so it costs no
    host sync; the guard reads the count with the logs. The guard sets the Trainer's
    ``non_finite`` policy when the Trainer is made (``Trainer(non_finite=...)`` is the same
    without the guard's messages); use one guard per Trainer.

    Args:
        policy: ``"raise"``, ``"skip"`` or ``"ignore"``.

    Examples:
        >>> import keras, numpy as np, tfloop
        >>> model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
        >>> trainer = tfloop.Trainer(model, "sgd", "mse",
        ...                          callbacks=[tfloop.callbacks.NonFiniteGuard("raise")])
        >>> x = np.array([[1.0], [np.nan]], dtype="float32")
        >>> try:
        ...     trainer.fit((x, x), batch_size=1, shuffle=False, verbose=0)
        ... except tfloop.errors.NonFiniteError as error:
        ...     print(error.step, error.tensor)
        1 loss
    """

    def __init__(self, policy: str = "raise") -> None:
        if policy not in _POLICIES:
            raise ConfigError(
                f"NonFiniteGuard: policy must be 'raise', 'skip' or 'ignore', got {policy!r}."
            )
        self.policy: Policy = policy  # type: ignore[assignment]
        self.skipped = 0  # updates dropped during the current (or last) fit
        self._seen = 0
        self._last_step = 0

    @property
    def graph_policy(self) -> Policy:
        """The Trainer's ``non_finite`` policy this guard asks for (what the step does)."""
        return self.policy

    def on_fit_start(self, logs: Logs) -> None:
        trainer = self.trainer
        self.skipped = 0
        self._seen = trainer.non_finite_steps if trainer is not None else 0
        self._last_step = update_count(trainer) if trainer is not None else 0

    def on_train_batch_end(self, batch: int, logs: Logs) -> None:
        count = int(logs.get(NON_FINITE_STEPS, self._seen))
        step = int(logs.get(STEP, self._last_step))
        if count > self._seen:
            where, tensor = self._locate(step)
            first = self.skipped == 0
            self.skipped += count - self._seen
            self._seen = count
            self._on_non_finite(where, tensor, step, first)
        self._last_step = step

    def _locate(self, step: int) -> tuple[int | None, str]:
        """The step and tensor of the first drop, when it is the trainer's first ever."""
        trainer = self.trainer
        if trainer is None or self._seen != 0 or trainer.first_non_finite_step < 0:
            return None, "loss or gradients"
        return trainer.first_non_finite_step, trainer.first_non_finite_tensor

    def _describe(self, where: int | None, tensor: str, step: int) -> str:
        if where is not None:
            return f"non-finite {tensor} at step {where} (0-based update index)"
        return f"non-finite {tensor} between step {self._last_step} and step {step}"

    def _on_non_finite(self, where: int | None, tensor: str, step: int, first: bool) -> None:
        what = self._describe(where, tensor, step)
        if self.policy == "raise":
            raise NonFiniteError(
                f"{what}; the update was skipped, so the weights are finite. {_ADVICE}",
                step=where,
                tensor=tensor,
            )
        if self.policy == "skip" and first:
            logger.warning(
                "tfloop: skipped an update with %s; later ones are counted in "
                "logs['non_finite_steps'].",
                what,
            )


class TerminateOnNaN(NonFiniteGuard):
    """Stops training when the loss or a gradient becomes NaN or Inf (as Keras's does).

    Unlike Keras's, the offending update never reaches the weights: it is dropped in-graph, as
    with ``NonFiniteGuard("skip")``, and ``fit`` stops at the end of that execution. A NaN or Inf
    ``loss`` in the logs (from a ``train_step`` that does not pass its loss to
    ``apply_gradients``) stops it too.

    Args:
        raise_error: raise :class:`tfloop.errors.NonFiniteError` instead of stopping quietly.

    Examples:
        >>> import keras, numpy as np, tfloop
        >>> model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
        >>> trainer = tfloop.Trainer(model, "sgd", "mse", steps_per_execution=1,
        ...                          callbacks=[tfloop.callbacks.TerminateOnNaN()])
        >>> x = np.array([[1.0], [np.nan], [2.0]], dtype="float32")
        >>> _ = trainer.fit((x, x), epochs=3, batch_size=1, shuffle=False, verbose=0)
        >>> int(trainer.optimizer.iterations), bool(np.isfinite(model.get_weights()[0]).all())
        (1, True)
    """

    def __init__(self, raise_error: bool = False) -> None:
        super().__init__("raise" if raise_error else "skip")
        self.raise_error = bool(raise_error)

    @property
    def graph_policy(self) -> Policy:
        return "skip"

    def on_train_batch_end(self, batch: int, logs: Logs) -> None:
        super().on_train_batch_end(batch, logs)
        loss = logs.get("loss")
        trainer = self.trainer
        if loss is not None and not math.isfinite(loss) and trainer and not trainer.stop_training:
            self._on_non_finite(None, "loss", int(logs.get("step", 0)), True)

    def _describe(self, where: int | None, tensor: str, step: int) -> str:
        if where is None and tensor == "loss":
            return f"non-finite loss in the logs at step {step}"
        return super()._describe(where, tensor, step)

    def _on_non_finite(self, where: int | None, tensor: str, step: int, first: bool) -> None:
        if self.raise_error:
            super()._on_non_finite(where, tensor, step, first)
        logger.warning("tfloop: %s; terminating training.", self._describe(where, tensor, step))
        if self.trainer is not None:
            self.trainer.stop_training = True
