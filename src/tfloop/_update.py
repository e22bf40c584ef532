"""UpdateRule: how a step's gradients become an optimizer update.

One object owns everything between ``tape.gradient`` and the weights: applying with the
optimizer, clipping to a global norm, the accumulation window (``accumulate_steps``), the
non-finite policy and its counters, and the variants under a ``tf.distribute`` strategy.

The rule decides at construction what it traces; nothing changes it later. Without a strategy:

- no accumulation: ``apply_gradients`` clips and applies (inside a ``tf.cond`` on finiteness
  under a non-finite policy);
- accumulation: ``apply_gradients`` adds ``weight * g`` to the window; the compiled loop closes
  the window (:meth:`UpdateRule.close`) once it is full, or partial at the end of an epoch.

Under a strategy each replica calls ``apply_gradients`` in replica context with its share of
the batch. Without a window it hands the optimizer ``n_r / N * g_r``, which the optimizer's
all-reduce sums into the global-batch gradient. A window (accumulation, a non-finite policy or
loss scaling: each decides in a ``tf.cond`` whether to update, which only cross-replica context
may hold) adds the share to on-read accumulators, and the loop closes it in cross-replica
context, where they read as global sums: the update is divided by the global example count and
clipped *after* the cross-replica reduction.

The non-finite counters are variables (on-read under a strategy, every replica writing the
same all-reduced value), updated with arithmetic instead of control flow, so a replica step
records a dropped micro-batch itself: nothing is handed from the replica step to the loop.

Under ``ParameterServerStrategy`` nothing is replicated in sync: each worker runs its steps
(one replica) in closures, asynchronously. The rule then acts as without a strategy, with the
window in loop registers only (each closure starts and ends with an empty window, see
``_loops.py``), and applies updates through ``strategy.run`` (Keras's optimizer needs replica
context there). Non-finite policies and loss scaling, which skip updates inside a branch, are
not supported under it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import keras
import tensorflow as tf

from tfloop import _distribute
from tfloop._distribute import ON_READ
from tfloop._logs import NON_FINITE_STEPS, STEP, WINDOW
from tfloop.accumulate import AccumulatorState, GradientAccumulator, clip_gradients
from tfloop.errors import ConfigError

__all__ = ["NON_FINITE_POLICIES", "NonFinitePolicy", "UpdateRule", "validate_non_finite"]

NonFinitePolicy = Literal["ignore", "skip", "raise"]
NON_FINITE_POLICIES: tuple[NonFinitePolicy, ...] = ("ignore", "skip", "raise")


def validate_non_finite(policy: Any) -> NonFinitePolicy:
    if policy not in NON_FINITE_POLICIES:
        raise ConfigError(
            f"non_finite must be 'ignore', 'skip' or 'raise', got {policy!r}. 'skip' drops "
            "updates with a NaN or Inf loss or gradient; 'raise' drops them and stops fit."
        )
    return policy  # type: ignore[no-any-return]


class UpdateRule:
    """Applies gradients of a step's mean loss: clipped, accumulated, guarded, distributed.

    Args:
        optimizer: the Keras optimizer.
        accumulate_steps: micro-batches per update (a window); 1 applies every step.
        clip_global_norm: clip the (accumulated, globally reduced) gradient to this norm.
        non_finite: ``"ignore"`` applies whatever comes; ``"skip"`` and ``"raise"`` drop a
            micro-batch whose loss or gradients hold a NaN or Inf, in-graph, and count it.
        drop_remainder: discard the partial last window of an epoch instead of applying it.
        strategy: the ``tf.distribute.Strategy``, or None.

    Examples:
        >>> import keras, tensorflow as tf
        >>> w = tf.Variable([1.0])
        >>> rule = UpdateRule(keras.optimizers.SGD(1.0), accumulate_steps=2)
        >>> rule.build([w])
        >>> rule.apply_gradients([tf.constant([1.0])], weight=1.0)
        >>> rule.apply_gradients([tf.constant([4.0])], weight=3.0)
        >>> rule.close(flush=None)
        >>> float(w[0])
        -2.25
    """

    def __init__(
        self,
        optimizer: Any,
        *,
        accumulate_steps: int = 1,
        clip_global_norm: float | None = None,
        non_finite: NonFinitePolicy = "ignore",
        drop_remainder: bool = False,
        strategy: tf.distribute.Strategy | None = None,
    ) -> None:
        self.optimizer = optimizer
        self.accumulate_steps = accumulate_steps
        self.clip_global_norm = clip_global_norm
        self.non_finite = validate_non_finite(non_finite)
        self.drop_remainder = drop_remainder
        self.strategy = strategy
        self.replicated = _distribute.is_replicated(strategy)
        if _distribute.is_parameter_server(strategy):
            _check_asynchronous(optimizer, self.non_finite)
            _count_atomically(optimizer)
        self.variables: list[Any] = []
        self.accumulator: GradientAccumulator | None = None
        with self._scope():
            on_read: dict[str, Any] = {}
            if self.replicated:
                only_first = tf.VariableAggregation.ONLY_FIRST_REPLICA
                on_read = {"synchronization": ON_READ, "aggregation": only_first}

            def counter(name: str, start: int) -> tf.Variable:
                value = tf.constant(start, tf.int64)
                return tf.Variable(value, trainable=False, name=name, **on_read)

            # Dropped micro-batches; the update at which the first was dropped (-1: none);
            # what was non-finite then: 0 = the loss, i >= 1 = the gradient of variable i - 1.
            self.non_finite_steps = counter("non_finite_steps", 0)
            self.first_non_finite_step = counter("first_non_finite_step", -1)
            self.first_non_finite_tensor = counter("first_non_finite_tensor", -1)

    def _scope(self) -> Any:
        return _distribute.scope(self.strategy)

    @property
    def uses_window(self) -> bool:
        """Whether updates go through the accumulation window (see the module docstring)."""
        if self.accumulate_steps > 1:
            return True
        return self.replicated and (
            self.non_finite != "ignore"
            or isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer)
        )

    @property
    def guards(self) -> bool:
        """Whether non-finite micro-batches are dropped (and counted)."""
        return self.non_finite != "ignore"

    def build(self, variables: Sequence[Any]) -> None:
        """Builds the optimizer's slots and the window for ``variables`` (once)."""
        if self.variables:
            return
        self.variables = list(variables)
        with self._scope():
            if not getattr(self.optimizer, "built", False):
                self.optimizer.build(self.variables)
            if self.uses_window:
                self.accumulator = GradientAccumulator(self.variables, self.accumulate_steps)

    def checkpoint_objects(self) -> dict[str, Any]:
        """What a checkpoint needs to continue exactly: the window and the counters."""
        objects: dict[str, Any] = {
            "non_finite": [
                self.non_finite_steps,
                self.first_non_finite_step,
                self.first_non_finite_tensor,
            ]
        }
        if self.accumulator is not None:
            objects["accumulator"] = self.accumulator
        return objects

    # ----------------------------------------------------------------------- inside a step

    def apply_gradients(
        self, gradients: Sequence[Any], weight: Any = 1.0, loss: Any = None
    ) -> None:
        """Applies (or accumulates) ``gradients`` of a mean loss over ``weight`` examples."""
        gradients = list(gradients)
        if self.replicated and not self.uses_window:
            self._apply_share(gradients, weight)
            return
        keep = None
        if self.guards:
            keep, bad = _non_finite_flags(gradients, loss)
            if self.replicated:
                # A micro-batch dropped on any replica is dropped on every replica.
                context = tf.distribute.get_replica_context()
                bad = context.all_reduce(tf.distribute.ReduceOp.SUM, bad)
                keep = tf.reduce_all(tf.equal(bad, 0.0))
            self._count_dropped(keep, bad)
        if self.accumulator is not None:
            self.accumulator.accumulate(gradients, weight, keep)
            return
        if keep is None:
            self._apply_now(gradients)
            return

        def apply() -> tf.Tensor:
            self._apply_now(gradients)
            return tf.constant(True)

        tf.cond(keep, apply, lambda: tf.constant(False))

    def mask_non_finite(self, loss: Any, weight: Any) -> tuple[Any, Any]:
        """``(loss, weight)``, zeroed under a policy when the loss is not finite, so a dropped
        micro-batch does not count in the epoch's mean loss either."""
        if not self.guards:
            return loss, weight
        finite = tf.math.is_finite(loss)
        return (
            tf.where(finite, loss, tf.zeros_like(loss)),
            tf.where(finite, weight, tf.zeros_like(weight)),
        )

    def _apply_now(self, gradients: list[Any]) -> None:
        gradients = clip_gradients(gradients, self.clip_global_norm, self.optimizer)
        self.optimizer.apply_gradients(zip(gradients, self.variables, strict=False))

    def _apply_share(self, gradients: list[Any], weight: Any) -> None:
        """Under a strategy, one update per batch: each replica hands the optimizer its share
        ``n_r / N * g_r`` and the optimizer's all-reduce sums the shares into the global-batch
        gradient. Clipping uses the norm of that sum (one more all-reduce), never a share's."""
        context = tf.distribute.get_replica_context()
        weight = tf.cast(weight, tf.float32)
        total = context.all_reduce(tf.distribute.ReduceOp.SUM, weight)
        fraction = tf.math.divide_no_nan(weight, total)
        shares = [None if g is None else tf.convert_to_tensor(g) * fraction for g in gradients]
        if self.clip_global_norm is not None:
            present = [g for g in shares if g is not None]
            summed = context.all_reduce(tf.distribute.ReduceOp.SUM, present)
            norm = tf.linalg.global_norm(summed)
            factor = tf.minimum(1.0, tf.math.divide_no_nan(self.clip_global_norm, norm))
            shares = [None if g is None else g * tf.cast(factor, g.dtype) for g in shares]
        self.optimizer.apply_gradients(zip(shares, self.variables, strict=False))

    def _count_dropped(self, kept: tf.Tensor, bad: tf.Tensor) -> None:
        """Counts a dropped micro-batch (``bad[j] > 0``: tensor ``j``, the loss then each
        gradient, was not finite) with arithmetic, no control flow."""
        dropped = tf.logical_not(kept)
        first = self.first_non_finite_step
        is_first = tf.logical_and(dropped, first < 0)
        step = tf.cast(self.optimizer.iterations, tf.int64)
        which = tf.argmax(tf.cast(bad > 0, tf.int32), output_type=tf.int64)
        first.assign(tf.where(is_first, step, first))
        tensor = self.first_non_finite_tensor
        tensor.assign(tf.where(is_first, which, tensor))
        self.non_finite_steps.assign_add(tf.cast(dropped, tf.int64))

    # ------------------------------------------------- the window, for the compiled loop

    @property
    def steps(self) -> int:
        """Micro-batches per update."""
        return self.accumulate_steps

    def read_state(self) -> AccumulatorState:
        assert self.accumulator is not None
        return self.accumulator.read_state()

    def empty_state(self) -> AccumulatorState:
        assert self.accumulator is not None
        return self.accumulator.empty_state()

    def write_state(self, state: AccumulatorState) -> None:
        assert self.accumulator is not None
        self.accumulator.write_state(state)

    def stage(self, state: AccumulatorState) -> None:
        assert self.accumulator is not None
        self.accumulator.stage(state)

    def unstage(self) -> AccumulatorState:
        assert self.accumulator is not None
        return self.accumulator.unstage()

    def count(self, state: AccumulatorState) -> tf.Tensor:
        """Micro-batches in the window of ``state``."""
        return state.count

    def close(self, flush: tf.Tensor | None) -> None:
        """Applies the window if it is full, or partial where ``flush`` is true (the end of an
        epoch; then discarded instead with ``drop_remainder``). Under a strategy this runs in
        cross-replica context, where the accumulators read as global sums."""
        accumulator = self.accumulator
        assert accumulator is not None
        ready = accumulator.ready
        drops = None
        if flush is None:
            closes = ready
        elif self.drop_remainder:
            closes = ready
            drops = tf.logical_and(flush, tf.logical_not(ready))
        else:
            closes = tf.logical_or(ready, flush)
        optimizer = self.optimizer
        if _distribute.is_parameter_server(self.strategy):
            optimizer = _InReplica(optimizer, self.strategy)
        accumulator.apply_where(closes, optimizer, self.clip_global_norm)
        if drops is not None:
            accumulator.reset_where(drops)

    def results(self) -> dict[str, tf.Tensor]:
        """The rule's own entries of a loop's results: the update count, the window and the
        drop count."""
        results = {STEP: tf.identity(self.optimizer.iterations)}
        if self.accumulator is not None:
            results[WINDOW] = tf.identity(self.accumulator.count)
        if self.guards:
            results[NON_FINITE_STEPS] = tf.identity(self.non_finite_steps)
        return results

    def variable_name(self, index: int) -> str:
        """What ``first_non_finite_tensor`` = ``index`` names (see the counters)."""
        if index == 0:
            return "loss"
        if 1 <= index <= len(self.variables):
            chosen = self.variables[index - 1]
            return f"gradient of {getattr(chosen, 'path', None) or chosen.name}"
        return "loss or gradients"


class _InReplica:
    """An optimizer whose ``apply_gradients`` runs in replica context (``strategy.run``).

    Under ``ParameterServerStrategy`` a closure's loop is in cross-replica context, where
    Keras's optimizer finds no replica context to ``merge_call`` from.
    """

    def __init__(self, optimizer: Any, strategy: tf.distribute.Strategy) -> None:
        self.optimizer = optimizer
        self.strategy = strategy

    def apply_gradients(self, pairs: Any) -> None:
        gradients, variables = zip(*pairs, strict=True)

        def apply(*values: tf.Tensor) -> None:
            # Copied inside the replica, so they are placed on its device: the optimizer's
            # all-reduce sends them there.
            local = [tf.identity(value) for value in values]
            self.optimizer.apply_gradients(zip(local, variables, strict=True))

        self.strategy.run(apply, args=tuple(gradients))


def _check_asynchronous(optimizer: Any, non_finite: str) -> None:
    """What ``ParameterServerStrategy`` does not support, as ConfigErrors at construction."""
    if non_finite != "ignore":
        raise ConfigError(
            f"non_finite={non_finite!r} is not supported under ParameterServerStrategy (its "
            "workers update asynchronously, so a dropped update cannot be agreed on). Use "
            "non_finite='ignore' and clip_global_norm against spikes."
        )
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        raise ConfigError(
            "optimizer: a LossScaleOptimizer is not supported under ParameterServerStrategy "
            "(it skips updates inside a branch, which needs synchronous replicas). Train in "
            "mixed_bfloat16, which needs no loss scaling, or in float32."
        )


def _count_atomically(optimizer: Any) -> None:
    """Makes the optimizer's update count one atomic add (under ``ParameterServerStrategy``).

    Keras 3 counts an update with ``iterations.assign_add(1)``, which a Keras variable runs as
    a read and an assign: closures applying updates on several workers at once lose counts
    (measured, 2 workers: 87 of 128 updates counted). The ``tf.Variable`` under it adds
    atomically, in one op on its parameter server; the optimizer's counter calls that one.
    """
    iterations = optimizer.iterations
    if not isinstance(iterations, keras.Variable):
        return  # not Keras 3's counter variable (Keras's own accumulation gives a tensor)
    variable: Any = iterations.value

    def assign_add(value: Any) -> Any:
        return variable.assign_add(tf.cast(value, variable.dtype))

    iterations.assign_add = assign_add


def _non_finite_flags(gradients: list[Any], loss: Any) -> tuple[tf.Tensor, tf.Tensor]:
    """Whether the micro-batch is finite, and per tensor (loss, then gradients) whether it is
    not (1.0). The loss is checked too: a NaN picked by ``tf.where`` has a finite (zero)
    gradient."""
    bad = tf.stack(
        [
            tf.cast(tf.logical_not(tf.reduce_all(tf.math.is_finite(t))), tf.float32)
            if t is not None
            else tf.constant(0.0)
            for t in [loss, *gradients]
        ]
    )
    return tf.reduce_all(tf.equal(bad, 0.0)), bad
