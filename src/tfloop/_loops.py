"""The compiled multi-step functions.

Each function takes one superbatch (nested tensors shaped ``[K, batch, ...]``) and the range of
steps ``start..stop-1`` to run, and runs them all inside one ``tf.function`` (XLA-compiled when
``jit_compile`` is on). Step bounds are tensors, so running part of a superbatch (a tail, a step
budget) reuses the same trace; only a new batch shape traces again.

Why a superbatch and not ``next(iterator)`` per step: the per-step iterator call, not the maths,
bounds the speed of a small model. One iterator call per ``K`` steps removes it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import tensorflow as tf

from tfloop import _distribute
from tfloop._config import _auto_jit_compile
from tfloop.errors import WorkerError, _first_line

if TYPE_CHECKING:
    from tfloop.trainer import Trainer

logger = logging.getLogger("tfloop")

Nested = Any
StepFunction = Callable[..., Any]

# Errors by which XLA says it cannot compile a graph (unsupported op, unknown shape, ...).
_XLA_ERRORS = (
    tf.errors.InvalidArgumentError,
    tf.errors.UnimplementedError,
    tf.errors.InternalError,
)


# What collectives raise when a peer worker dies (after TF's heartbeat timeout).
_PEER_ERRORS = (
    tf.errors.UnavailableError,
    tf.errors.DeadlineExceededError,
    tf.errors.CancelledError,
    tf.errors.AbortedError,
)


def _peer_reason(error: BaseException) -> str:
    """The line of a collective's error that says which task failed (TF buries it)."""
    for line in str(error).splitlines():
        if "unhealthy" in line or "aborted" in line.lower() or "Error reported" in line:
            return line.strip()[:300]
    return _first_line(error)


def _batch_spec(superbatch: Nested) -> Nested:
    return tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape[1:], t.dtype), superbatch)


def _output_spec(step: StepFunction, superbatch: Nested) -> Nested:
    """The structure a step method returns, found by tracing it once (nothing is run)."""
    concrete = tf.function(step).get_concrete_function(_batch_spec(superbatch))
    return _specs(concrete.structured_outputs)


def _specs(outputs: Nested) -> Nested | None:
    if outputs is None:  # a step method that returns nothing adds nothing to the logs
        return None
    return tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape, t.dtype), outputs)


def _zeros(spec: Nested, what: str) -> Nested:
    def zeros(s: tf.TensorSpec) -> tf.Tensor:
        if not s.shape.is_fully_defined():
            raise TypeError(
                f"{what} returned a tensor of shape {s.shape}; the values a step method returns "
                "must have a static shape (return scalars, or track values with a metric)."
            )
        return tf.zeros(s.shape, s.dtype)

    return tf.nest.map_structure(zeros, spec)


class CompiledLoop:
    """Builds and caches the multi-step ``tf.function`` of one kind: train, test or predict.

    With ``jit_compile="auto"`` the function is first compiled with XLA; if XLA cannot compile
    it, tfloop logs why once and falls back to the plain graph.
    """

    def __init__(self, trainer: Trainer, kind: str, jit_compile: bool | str) -> None:
        self.trainer = trainer
        self.kind = kind
        self.auto = jit_compile == "auto"
        self.jit = bool(jit_compile) if not self.auto else _auto_jit_compile(trainer.model)
        self._function: Any = None
        self._concrete: dict[Any, Any] = {}  # the function's traces, by flat input shapes

    def _build(self) -> Any:
        if self.trainer.strategy is not None:
            distributed = {
                "train": _distributed_train_function,
                "test": _distributed_test_function,
                "predict": _distributed_predict_function,
            }
            return distributed[self.kind](self.trainer, self._replica_jit())
        builders = {"train": _train_function, "test": _test_function, "predict": _predict_function}
        return builders[self.kind](self.trainer, self.jit)

    def _replica_jit(self) -> bool:
        # Under a strategy XLA compiles each replica's step (the loop itself holds the
        # cross-replica calls). "auto" turns it on for GPUs and TPUs only: XLA on CPU cannot
        # reach the variables of a second (logical) CPU device.
        strategy = self.trainer.strategy
        assert strategy is not None
        if self.auto:
            return _distribute.uses_accelerators(strategy)
        return self.jit

    def __call__(self, superbatch: Nested, start: int, stop: int, *extra: Any) -> Any:
        if self._function is None:
            self._function = self._build()
        bounds = (tf.constant(start, tf.int32), tf.constant(stop, tf.int32))
        extra = tuple(tf.constant(e, tf.int32) for e in extra)
        strategy = self.trainer.strategy
        if strategy is not None:
            if self.kind == "predict":
                # The global batch size, to lay out the gathered outputs.
                extra = (tf.constant(int(tf.nest.flatten(superbatch)[0].shape[1]), tf.int32),)
            # Called outside strategy.scope(): there, Keras's optimizer would ask for a
            # merge_call, which cross-replica context (where updates are applied) has not.
            try:
                return self._function(
                    _distribute.split_superbatch(strategy, superbatch), *bounds, *extra
                )
            except _PEER_ERRORS as error:
                if not _distribute.is_multi_worker(strategy):
                    raise
                raise WorkerError(
                    f"a worker of the cluster failed or stopped responding during the "
                    f"{self.kind} step ({type(error).__name__}: {_peer_reason(error)}). "
                    "Checkpoints already written are intact: restart every worker with the "
                    "same command to resume from the latest one."
                ) from error
        try:
            return self._call(superbatch, *bounds, *extra)
        except _XLA_ERRORS as error:
            if not (self.auto and self.jit):
                raise
            # XLA compiles the whole graph before running any of it, so a compile failure left
            # every variable untouched and the same superbatch can simply run again.
            reason = _first_line(error)
            logger.warning(
                "tfloop: XLA could not compile the %s step, running it without XLA "
                "(pass jit_compile=False to skip this attempt). Reason: %s",
                self.kind,
                reason,
            )
            self.jit = False
            self._function = self._build()
            self._concrete.clear()
            return self._call(superbatch, *bounds, *extra)

    def _call(self, superbatch: Nested, *args: tf.Tensor) -> Any:
        """Calls the function's trace for this superbatch's shapes directly.

        ``tf.function``'s own dispatch (binding and matching the nested arguments against its
        traces) cost about half of tfloop's ~1 ms of host time per execution; a trace looked up
        by the shapes and dtypes of the flat inputs, and called with them, skips it.
        """
        flat = tf.nest.flatten(superbatch)
        structure = repr(tf.nest.map_structure(lambda _: None, superbatch))
        key = (structure, len(args), *((t.dtype, tuple(t.shape)) for t in flat))
        concrete = self._concrete.get(key)
        if concrete is None:
            concrete = self._function.get_concrete_function(superbatch, *args)
            self._concrete[key] = concrete
        return concrete._call_flat([*flat, *args], concrete.captured_inputs)

    @property
    def tracing_count(self) -> int:
        """How many times the function was traced (one per distinct superbatch shape)."""
        if self._function is None:
            return 0
        return int(self._function.experimental_get_tracing_count())


def _step_logs_spec(trainer: Trainer, method: str, superbatch: Nested) -> Nested | None:
    """The spec of what an overridden step method returns (``None`` for tfloop's own)."""
    from tfloop.trainer import Trainer

    if getattr(type(trainer), method) is getattr(Trainer, method):
        return None
    return _output_spec(getattr(trainer, method), superbatch)


# Specs are found inside the traced functions: each new superbatch shape traces again and must
# see its own batch shape.


def _train_function(trainer: Trainer, jit: bool) -> Any:
    if trainer._accumulator is not None:
        return _accumulating_train_function(trainer, jit)

    def train_steps(data: Nested, start: tf.Tensor, stop: tf.Tensor, flush_at: tf.Tensor) -> Any:
        step_spec = _step_logs_spec(trainer, "train_step", data)
        step_logs = _zeros(step_spec, "train_step") if step_spec is not None else {}
        # A while loop, not `for i in tf.range(start, stop)`: XLA would take the trip count
        # as a compile-time constant and compile again for every new chunk length.
        i = start
        while i < stop:
            outputs = trainer.train_step(_step_batch(data, i))
            if step_spec is not None:
                step_logs = outputs
            i += 1
        return trainer._results(), step_logs

    return tf.function(train_steps, jit_compile=jit)


_UNROLL_MAX = 8
"""The largest window the accumulating loop unrolls (longer ones trace k copies of the step)."""


def _accumulating_train_function(trainer: Trainer, jit: bool) -> Any:
    """The train loop with ``accumulate_steps > 1``: one inner loop per window.

    The accumulator's sums are read once, carried through the loop as loop variables and
    written back once (see ``GradientAccumulator._stage``), and the window is closed (one
    ``tf.cond``) after its micro-batches, not tested after every one. When every step adds
    exactly one micro-batch (tfloop's own ``train_step``, no non-finite policy) a whole window
    is unrolled under XLA: its ``k`` steps are one straight block, with no loop between them.
    Measured on the mlp workload against no accumulation: variables written and a ``cond``
    at every step, 0.5x; a loop per window, 1.0-1.1x; unrolled windows, 1.5x (hand-written).
    """
    from tfloop.trainer import Trainer

    accumulator = trainer._accumulator
    assert accumulator is not None
    steps = accumulator.steps
    # Only under XLA: without it, TF's graph optimizer rewrites the unrolled sum (it factors
    # out the common micro-batch weight), which is not bit-identical to summing step by step,
    # and any steps_per_execution must give bit-identical weights without XLA.
    unrolls = (
        jit
        and steps <= _UNROLL_MAX
        and trainer.non_finite == "ignore"
        and type(trainer).train_step is Trainer.train_step
        and type(trainer).apply_gradients is Trainer.apply_gradients
    )

    def train_steps(data: Nested, start: tf.Tensor, stop: tf.Tensor, flush_at: tf.Tensor) -> Any:
        step_spec = _step_logs_spec(trainer, "train_step", data)
        step_logs = _zeros(step_spec, "train_step") if step_spec is not None else {}
        state = accumulator._load()
        i = start
        while i < stop:
            if unrolls:
                # Whole windows: the window is empty and its k micro-batches are all here.
                while state[2] == 0 and i + steps <= stop:
                    accumulator._stage(state)
                    for j in range(steps):
                        trainer.train_step(_step_batch(data, i + j))
                    accumulator.apply(trainer.optimizer, trainer.clip_global_norm)
                    state = accumulator._unstage()
                    i += steps
            # The micro-batches of one window (fewer if the chunk ends first); train_step's
            # apply_gradients adds each to the staged state.
            while i < stop and state[2] < steps:
                accumulator._stage(state)
                outputs = trainer.train_step(_step_batch(data, i))
                state = accumulator._unstage()
                if step_spec is not None:
                    step_logs = outputs
                i += 1
            accumulator._stage(state)
            trainer._close_window(tf.equal(i - 1, flush_at))
            state = accumulator._unstage()
        accumulator._store(state)
        return trainer._results(), step_logs

    return tf.function(train_steps, jit_compile=jit)


def _step_batch(data: Nested, i: tf.Tensor) -> Nested:
    """Step ``i`` of a superbatch."""
    return tf.nest.map_structure(lambda t: t[i], data)


def _test_function(trainer: Trainer, jit: bool) -> Any:
    def test_steps(data: Nested, start: tf.Tensor, stop: tf.Tensor) -> Any:
        step_spec = _step_logs_spec(trainer, "test_step", data)
        step_logs = _zeros(step_spec, "test_step") if step_spec is not None else {}
        # A while loop, not `for i in tf.range(start, stop)`: XLA would take the trip count
        # as a compile-time constant and compile again for every new chunk length.
        i = start
        while i < stop:
            outputs = trainer.test_step(_step_batch(data, i))
            if step_spec is not None:
                step_logs = outputs
            i += 1
        return trainer._results(), step_logs

    return tf.function(test_steps, jit_compile=jit)


def _predict_function(trainer: Trainer, jit: bool) -> Any:
    def predict_steps(data: Nested, start: tf.Tensor, stop: tf.Tensor) -> Nested:
        spec = _output_spec(trainer.predict_step, data)
        steps = int(tf.nest.flatten(data)[0].shape[0])
        # Preallocated [K, ...] buffers updated in place: XLA-friendly, unlike a TensorArray of
        # dynamic size. Rows outside start..stop-1 stay zero and are dropped by the caller.
        buffers = tf.nest.map_structure(
            lambda s: tf.zeros([steps, *s.shape.as_list()], s.dtype), spec
        )
        # A while loop, not `for i in tf.range(start, stop)`: XLA would take the trip count
        # as a compile-time constant and compile again for every new chunk length.
        i = start
        while i < stop:
            outputs = trainer.predict_step(_step_batch(data, i))
            buffers = tf.nest.map_structure(
                lambda buffer, out: tf.tensor_scatter_nd_update(buffer, [[i]], out[None]),  # noqa: B023
                buffers,
                outputs,
            )
            i += 1
        return buffers

    return tf.function(predict_steps, jit_compile=jit)


# ------------------------------------------------------------------ under a tf.distribute strategy
# The loop runs in cross-replica context and calls ``strategy.run`` once per step; see
# _distribute.py for why, and for how the superbatch is split.


def _replica_step(trainer: Trainer, method: str, jit: bool) -> Any:
    """One replica's step on step ``i`` of its share of the superbatch (XLA-compiled if jit)."""

    def replica_step(data: Nested, i: tf.Tensor) -> Any:
        return getattr(trainer, method)(_step_batch(data, i))

    return tf.function(replica_step, jit_compile=True) if jit else replica_step


def _local_spec(trainer: Trainer, method: str, data: Nested) -> Nested | None:
    """The spec of what an overridden step method returns on one replica (``None``: not
    overridden). Traced inside ``strategy.run``: the step updates on-read variables, which
    only replica context allows."""
    from tfloop.trainer import Trainer

    strategy = trainer.strategy
    assert strategy is not None
    if getattr(type(trainer), method) is getattr(Trainer, method):
        return None

    def one_replica(batch: Nested) -> Nested:
        outputs = strategy.run(getattr(trainer, method), args=(batch,))
        trainer._step_kept = trainer._step_bad = None
        return _distribute.first_local(strategy, outputs)

    local = _distribute.first_local(strategy, data)
    concrete = tf.function(one_replica).get_concrete_function(_batch_spec(local))
    return _specs(concrete.structured_outputs)


def _mean_over_replicas(trainer: Trainer, outputs: Nested) -> Nested:
    strategy = trainer.strategy
    assert strategy is not None
    return tf.nest.map_structure(
        lambda v: strategy.reduce(tf.distribute.ReduceOp.MEAN, v, axis=None), outputs
    )


def _distributed_train_function(trainer: Trainer, jit: bool) -> Any:
    strategy = trainer.strategy
    assert strategy is not None
    skips = trainer.non_finite != "ignore"

    def replica_step(data: Nested, i: tf.Tensor) -> Any:
        outputs = trainer.train_step(_step_batch(data, i))
        kept, bad = trainer._step_kept, trainer._step_bad
        trainer._step_kept = trainer._step_bad = None
        if skips:
            return outputs, (kept, bad)
        return outputs, None

    step = tf.function(replica_step, jit_compile=True) if jit else replica_step

    def train_steps(data: Nested, start: tf.Tensor, stop: tf.Tensor, flush_at: tf.Tensor) -> Any:
        step_spec = _local_spec(trainer, "train_step", data)
        step_logs = _zeros(step_spec, "train_step") if step_spec is not None else {}
        for i in tf.range(start, stop):
            outputs, flags = strategy.run(step, args=(data, i))
            if flags is not None:
                trainer._record_dropped(*_distribute.first_local(strategy, flags))
            if trainer._uses_window():
                trainer._close_window(tf.equal(i, flush_at))
            if step_spec is not None:
                step_logs = _mean_over_replicas(trainer, outputs)
        return trainer._results(), step_logs

    return tf.function(train_steps)


def _distributed_test_function(trainer: Trainer, jit: bool) -> Any:
    strategy = trainer.strategy
    assert strategy is not None

    step = _replica_step(trainer, "test_step", jit)

    def test_steps(data: Nested, start: tf.Tensor, stop: tf.Tensor) -> Any:
        step_spec = _local_spec(trainer, "test_step", data)
        step_logs = _zeros(step_spec, "test_step") if step_spec is not None else {}
        for i in tf.range(start, stop):
            outputs = strategy.run(step, args=(data, i))
            if step_spec is not None:
                step_logs = _mean_over_replicas(trainer, outputs)
        return trainer._results(), step_logs

    return tf.function(test_steps)


def _distributed_predict_function(trainer: Trainer, jit: bool) -> Any:
    strategy = trainer.strategy
    assert strategy is not None

    step = _replica_step(trainer, "predict_step", jit)

    def predict_steps(data: Nested, start: tf.Tensor, stop: tf.Tensor, batch: tf.Tensor) -> Nested:
        local = _distribute.first_local(strategy, data)
        spec = _output_spec(trainer.predict_step, local)
        steps = int(tf.nest.flatten(local)[0].shape[0])
        # Each step's outputs are the replicas' outputs concatenated in replica order (the
        # order the superbatch was split in), gathered across workers too.
        buffers = tf.nest.map_structure(
            lambda s: tf.zeros(tf.concat([[steps, batch], s.shape[1:]], 0), s.dtype), spec
        )
        for i in tf.range(start, stop):
            outputs = strategy.run(step, args=(data, i))
            gathered = tf.nest.map_structure(lambda v: strategy.gather(v, axis=0), outputs)
            buffers = tf.nest.map_structure(
                lambda buffer, out: tf.tensor_scatter_nd_update(buffer, [[i]], out[None]),  # noqa: B023
                buffers,
                gathered,
            )
        return buffers

    return tf.function(predict_steps)
