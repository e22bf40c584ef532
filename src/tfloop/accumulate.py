"""Exact gradient accumulation.

A window of micro-batches ``i = 1..k``, each with gradient ``g_i`` of its *mean* loss and weight
``w_i`` (its number of examples, or the sum of its sample weights), gives one update with

.. math::  g = \\frac{\\sum_i w_i g_i}{\\sum_i w_i}

which is exactly the gradient of the mean loss of one batch made of the ``k`` micro-batches
concatenated. Dividing by ``k`` instead (the common shortcut) is only right when all micro-batches
have the same size, and is wrong for the last, partial window of an epoch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import keras
import tensorflow as tf

from tfloop import _validate
from tfloop._distribute import ON_READ, reset_on_read
from tfloop.errors import ConfigError

__all__ = ["AccumulatorState", "GradientAccumulator", "clip_gradients", "validate_steps"]

_ONLY_FIRST = tf.VariableAggregation.ONLY_FIRST_REPLICA


class AccumulatorState(NamedTuple):
    """An accumulator's state as tensors: a loop carries it instead of writing the variables.

    ``sums`` holds ``sum(w_i * g_i)`` per variable, ``total_weight`` ``sum(w_i)`` (float64) and
    ``count`` the micro-batches in the window (int64).
    """

    sums: list[Any]
    total_weight: Any
    count: Any


class _Registers:
    """Holds the staged state while a compiled loop is traced (see ``GradientAccumulator.stage``)."""

    state: AccumulatorState | None = None


def validate_steps(steps: object, name: str = "steps") -> int:
    """``steps`` as an int >= 1 (micro-batches per update), or a ConfigError naming ``name``."""
    return _validate.count(
        steps, name, minimum=1, hint=f" Use {name}=1 to update after every batch."
    )


def clip_gradients(gradients: list[Any], clip_global_norm: float | None, optimizer: Any) -> Any:
    """Clips ``gradients`` to a global norm, measured on the *unscaled* gradient.

    A ``LossScaleOptimizer`` receives gradients still multiplied by its loss scale and divides
    them itself; the limit is scaled the same way, so the clip acts on the true gradient.
    """
    if clip_global_norm is None:
        return gradients
    limit: Any = clip_global_norm
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        limit = clip_global_norm * tf.cast(optimizer.dynamic_scale, tf.float32)
    clipped, _ = tf.clip_by_global_norm(gradients, limit)
    return clipped


class GradientAccumulator(tf.Module):  # type: ignore[misc]
    """Sums weighted gradients over a window of micro-batches and applies their exact mean.

    State lives in non-trainable ``tf.Variable`` s, so it works inside any ``tf.function``
    (XLA included) and is saved by ``tf.train.Checkpoint``: a run resumed mid-window is exact.

    Under a ``tf.distribute`` strategy (created inside ``strategy.scope()``), the sums are
    on-read variables: each replica calls ``accumulate`` with its own share of the batch in
    replica context, and ``apply`` (called in cross-replica context) reads the *global* sums, so
    the update is divided by the global example count and clipped after the reduction.

    Args:
        variables: the trainable variables the gradients belong to (same order as the gradients).
        steps: micro-batches per update (``k``); ``ready`` turns true when ``k`` are accumulated.
        name: name of the module.

    Examples:
        >>> import tensorflow as tf, keras, tfloop
        >>> w = tf.Variable([1.0])
        >>> acc = tfloop.GradientAccumulator([w], steps=2)
        >>> acc.accumulate([tf.constant([1.0])], weight=1)
        >>> acc.accumulate([tf.constant([4.0])], weight=3)
        >>> bool(acc.ready), float(acc.mean_gradients()[0][0])
        (True, 3.25)
        >>> acc.apply(keras.optimizers.SGD(learning_rate=1.0))
        >>> float(w[0]), int(acc.count)
        (-2.25, 0)
    """

    def __init__(self, variables: Sequence[Any], steps: int = 1, name: str | None = None) -> None:
        super().__init__(name=name or "gradient_accumulator")
        self.steps = validate_steps(steps)
        self._variables = list(variables)
        if not self._variables:
            raise ConfigError(
                "variables is empty: there is nothing to accumulate gradients for. Pass the "
                "model's trainable_variables (and check that the model has trainable weights)."
            )
        # Under a strategy each replica keeps its own sums; reading them across replicas sums.
        distributed = tf.distribute.has_strategy()
        summed: dict[str, Any] = {}
        first: dict[str, Any] = {}
        if distributed:
            summed = {"synchronization": ON_READ, "aggregation": tf.VariableAggregation.SUM}
            first = {"synchronization": ON_READ, "aggregation": _ONLY_FIRST}
        with tf.init_scope(), tf.name_scope(self.name):
            self._sums = [
                tf.Variable(
                    tf.zeros(tuple(v.shape), dtype=v.dtype),
                    trainable=False,
                    name="gradient_sum",
                    **summed,
                )
                for v in self._variables
            ]
            # float64 keeps the running total exact for any realistic example count.
            self.total_weight = tf.Variable(
                tf.constant(0.0, tf.float64), trainable=False, name="total_weight", **summed
            )
            self.count = tf.Variable(
                tf.constant(0, tf.int64), trainable=False, name="micro_batches", **first
            )
        # Not a tuple attribute: tf.Module would wrap it for checkpoint tracking.
        self._registers = _Registers()

    # --------------------------------------------------------------------- staging protocol
    # Writing the sum variables every micro-batch costs more than the micro-batch itself on a
    # small model (each write is a full read-modify-write of the buffers, and XLA cannot fuse
    # across it). A compiled loop therefore reads the state once per execution
    # (``read_state``), carries it as while-loop variables, and writes it back once at the end
    # (``write_state``): checkpoints, taken between executions, still see the exact mid-window
    # state. Between ``stage(state)`` and ``unstage()`` (at trace time) ``accumulate``,
    # ``apply``, ``apply_where``, ``reset`` and ``reset_where`` act on the carried state
    # instead of the variables; ``unstage`` returns the state after those calls. A loop whose
    # calls never leave a window open starts from ``empty_state`` and writes nothing back.

    def read_state(self) -> AccumulatorState:
        """The state as tensors, read from the variables (at the start of an execution)."""
        return AccumulatorState(
            [total.read_value() for total in self._sums],
            self.total_weight.read_value(),
            self.count.read_value(),
        )

    def empty_state(self) -> AccumulatorState:
        """The state of an empty window, as tensors (reads no variable)."""
        return AccumulatorState(
            [tf.zeros(total.shape, total.dtype) for total in self._sums],
            tf.constant(0.0, tf.float64),
            tf.constant(0, tf.int64),
        )

    def stage(self, state: AccumulatorState) -> None:
        """From now on (at trace time) the accumulator's operations act on ``state``."""
        self._registers.state = AccumulatorState(*state)

    def unstage(self) -> AccumulatorState:
        """The staged state after the calls since :meth:`stage`; the variables are used again."""
        state = self._registers.state
        if state is None:
            raise RuntimeError("GradientAccumulator.unstage() called without stage().")
        self._registers.state = None
        return state

    def write_state(self, state: AccumulatorState) -> None:
        """Writes ``state`` back to the variables (at the end of an execution)."""
        sums, total_weight, count = state
        for variable, value in zip(self._sums, sums, strict=True):
            variable.assign(value)
        self.total_weight.assign(total_weight)
        self.count.assign(count)

    def _state(self) -> AccumulatorState:
        if self._registers.state is not None:
            return self._registers.state
        return AccumulatorState(list(self._sums), self.total_weight, self.count)

    # ----------------------------------------------------------------------------------- API

    @property
    def ready(self) -> tf.Tensor:
        """A bool tensor: ``steps`` micro-batches have been accumulated."""
        return self._state()[2] >= self.steps

    def accumulate(self, gradients: Sequence[Any], weight: Any, keep: Any = None) -> None:
        """Adds ``weight * g`` for each gradient ``g`` (``None`` gradients are skipped).

        ``gradients`` are of the micro-batch's *mean* loss; ``weight`` is its number of examples
        (or the sum of its sample weights, if the mean was taken over that sum). ``keep``, a
        bool tensor, drops the micro-batch when false without any control flow (under a
        strategy a replica's ``tf.cond`` must not hold a synchronization point); dropped
        gradients may be NaN or Inf, they never reach the sums.
        """
        if len(gradients) != len(self._variables):
            raise ConfigError(
                f"gradients has {len(gradients)} entries but the accumulator tracks "
                f"{len(self._variables)} variables; pass one gradient per variable, in order."
            )
        weight = tf.convert_to_tensor(weight)
        if keep is not None:
            weight = tf.where(keep, weight, tf.zeros_like(weight))
        added_count: Any = 1 if keep is None else tf.cast(keep, tf.int64)
        additions: list[Any] = []
        for total, grad in zip(self._sums, gradients, strict=True):
            if grad is None:
                additions.append(None)
                continue
            grad = tf.convert_to_tensor(grad)  # densifies IndexedSlices
            added = grad * tf.cast(weight, total.dtype)
            if keep is not None:
                added = tf.where(keep, added, tf.zeros_like(added))
            additions.append(added)
        if self._registers.state is not None:
            sums, total_weight, count = self._registers.state
            self._registers.state = AccumulatorState(
                [s if a is None else s + a for s, a in zip(sums, additions, strict=True)],
                total_weight + tf.cast(weight, tf.float64),
                count + added_count,
            )
            return
        for total, added in zip(self._sums, additions, strict=True):
            if added is not None:
                total.assign_add(added)
        self.total_weight.assign_add(tf.cast(weight, tf.float64))
        self.count.assign_add(added_count)

    def mean_gradients(self) -> list[tf.Tensor]:
        """``sum(w_i * g_i) / sum(w_i)`` for each variable (zeros if the window is empty)."""
        sums, total_weight, _ = self._state()
        return [tf.math.divide_no_nan(total, tf.cast(total_weight, total.dtype)) for total in sums]

    def apply(self, optimizer: Any, clip_global_norm: float | None = None) -> None:
        """Applies the mean gradient with ``optimizer``, then resets the window.

        ``clip_global_norm`` clips the *accumulated* gradient (after any cross-replica reduction),
        never the micro-batch gradients. A window whose total weight is zero (only empty
        micro-batches) is a documented no-op: no update, ``optimizer.iterations`` unchanged.
        """
        self.apply_where(None, optimizer, clip_global_norm)

    def apply_where(self, pred: Any, optimizer: Any, clip_global_norm: float | None = None) -> None:
        """``apply`` if the bool tensor ``pred`` is true (always if ``None``), one ``tf.cond``."""

        def update() -> tf.Tensor:
            gradients = clip_gradients(self.mean_gradients(), clip_global_norm, optimizer)
            optimizer.apply_gradients(zip(gradients, self._variables, strict=False))
            return tf.constant(True)

        take = self._state()[1] > 0
        if pred is not None:
            take = tf.logical_and(pred, take)
        tf.cond(take, update, lambda: tf.constant(False))
        self.reset_where(pred)

    def reset(self) -> None:
        """Empties the window (every replica's share of it, under a strategy)."""
        self.reset_where(None)

    def reset_where(self, pred: Any) -> None:
        """``reset`` if the bool tensor ``pred`` is true (always if ``None``)."""
        if self._registers.state is not None:
            self._registers.state = AccumulatorState(
                *tf.nest.map_structure(
                    lambda t: (
                        tf.zeros_like(t) if pred is None else tf.where(pred, tf.zeros_like(t), t)
                    ),
                    tuple(self._registers.state),
                )
            )
            return

        def reset() -> tf.Tensor:
            for total in self._sums:
                reset_on_read(total, tf.zeros(total.shape, total.dtype))
            reset_on_read(self.total_weight, tf.constant(0.0, tf.float64))
            reset_on_read(self.count, tf.constant(0, tf.int64))
            return tf.constant(True)

        if pred is None:
            reset()
        else:
            tf.cond(pred, reset, lambda: tf.constant(False))
