"""Compiled K-step functions, built from callables.

A loop takes one superbatch (nested tensors shaped ``[K, batch, ...]``) and the range of steps
``start..stop-1`` to run, and runs them all inside one ``tf.function`` (XLA-compiled when
``jit`` is on). Step bounds are tensors, so running part of a superbatch (a tail, a step
budget) reuses the same trace; only a new batch shape traces again.

Why a superbatch and not ``next(iterator)`` per step: the per-step iterator call, not the maths,
bounds the speed of a small model. One iterator call per ``K`` steps removes it.

This module knows no Trainer. A loop is made of:

- ``step(batch)``: one step on one batch (a train, test or predict step);
- ``results()``: what the loop returns after its steps (metric results, counters);
- ``window``: for training, an optional :class:`UpdateWindow`, the accumulation window whose
  state the loop carries in registers and which it closes after each window's micro-batches;
- ``returns_logs``: whether the step's return value is logged (an override's dict);
- ``strategy``: under a ``tf.distribute`` strategy the loop stays in cross-replica context and
  calls ``strategy.run(step)`` once per step on each replica's share of the superbatch;
- ``fresh_window``: each call starts from an empty window and leaves none open, so the
  window's variables are neither read nor written (``ParameterServerStrategy``: concurrent
  closures on several workers would share them; see ``_coordinator.py``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable
from typing import Any, Literal, Protocol

import numpy as np
import tensorflow as tf

from tfloop import _distribute
from tfloop._autograph import user_code
from tfloop._validate import first_line
from tfloop.errors import WorkerError

__all__ = ["CompiledLoop", "LoopSpec", "UpdateWindow"]

logger = logging.getLogger("tfloop")

Nested = Any
Kind = Literal["train", "test", "predict"]

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

UNROLL_MAX = 8
"""The largest window a loop unrolls (longer ones trace k copies of the step)."""


class UpdateWindow(Protocol):
    """The accumulation window as the loop sees it (``tfloop._update.UpdateRule``).

    The loop reads the window's state once per execution, carries it through the loop
    (``stage`` before a step, ``unstage`` after it: the step's updates go to the carried
    state), closes the window after its micro-batches and writes the state back at the end.
    Under a strategy nothing is staged: replicas write on-read variables, and ``close`` runs
    in cross-replica context after every step.
    """

    @property
    def steps(self) -> int: ...

    def read_state(self) -> Any: ...

    def empty_state(self) -> Any: ...

    def write_state(self, state: Any) -> None: ...

    def stage(self, state: Any) -> None: ...

    def unstage(self) -> Any: ...

    def count(self, state: Any) -> tf.Tensor: ...

    def close(self, flush: tf.Tensor | None) -> None: ...


@dataclasses.dataclass(frozen=True)
class LoopSpec:
    """What a compiled loop is made of (see the module docstring)."""

    kind: Kind
    step: Callable[[Nested], Any]
    results: Callable[[], dict[str, Any]] | None = None
    returns_logs: bool = False
    window: UpdateWindow | None = None
    unroll: bool = False  # each step adds exactly one micro-batch: whole windows may unroll
    strategy: tf.distribute.Strategy | None = None
    jit: bool = True  # XLA for the loop (for each replica's step, under a strategy)
    jit_fallback: bool = False  # if XLA cannot compile, log why and run without it
    fresh_window: bool = False  # each call starts with an empty window (see the module doc)


class CompiledLoop:
    """Builds and caches the multi-step ``tf.function`` of a :class:`LoopSpec`.

    Called as ``loop(superbatch, start, stop)`` (training also takes ``flush_at``, the step
    that ends the epoch and so closes its window, or -1). With ``jit_fallback`` a loop that
    XLA cannot compile logs why, once, and runs without XLA. Under a strategy,
    ``per_worker=True`` says the superbatch is this worker's share of the global batches (to
    split among its local replicas), not the global batches themselves.
    """

    def __init__(self, spec: LoopSpec) -> None:
        # Under ParameterServerStrategy only training runs on the workers.
        strategy = _distribute.loop_strategy(spec.strategy, spec.kind)
        self.spec = spec if strategy is spec.strategy else dataclasses.replace(spec, strategy=None)
        self.jit = spec.jit
        self._function: Any = None
        self._concrete: dict[Any, Any] = {}  # the function's traces, by flat input shapes

    @property
    def kind(self) -> Kind:
        return self.spec.kind

    @property
    def function(self) -> Any:
        """The loop's ``tf.function`` of ``(superbatch, start, stop[, flush_at])``, built on
        first use; under a strategy it takes the replicas' shares (see ``__call__``)."""
        if self._function is None:
            self._function = _build(self.spec, self.jit)
        return self._function

    def __call__(
        self, superbatch: Nested, start: int, stop: int, *extra: int, per_worker: bool = False
    ) -> Any:
        if self._function is None:
            self._function = _build(self.spec, self.jit)
        bounds = (tf.constant(start, tf.int32), tf.constant(stop, tf.int32))
        extras = tuple(tf.constant(e, tf.int32) for e in extra)
        strategy = self.spec.strategy
        if strategy is not None:
            if self.kind == "predict":
                # The global batch size, to lay out the gathered outputs.
                extras = (tf.constant(int(tf.nest.flatten(superbatch)[0].shape[1]), tf.int32),)
            # Called outside strategy.scope(): there, Keras's optimizer would ask for a
            # merge_call, which cross-replica context (where updates are applied) has not.
            try:
                return self._function(
                    _distribute.split_superbatch(strategy, superbatch, per_worker),
                    *bounds,
                    *extras,
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
            return self._call(superbatch, *bounds, *extras)
        except _XLA_ERRORS as error:
            if not (self.spec.jit_fallback and self.jit):
                raise
            # XLA compiles the whole graph before running any of it, so a compile failure left
            # every variable untouched and the same superbatch can simply run again.
            logger.warning(
                "tfloop: XLA could not compile the %s step, running it without XLA "
                "(pass jit_compile=False to skip this attempt). Reason: %s",
                self.kind,
                first_line(error),
            )
            self.jit = False
            self._function = _build(self.spec, self.jit)
            self._concrete.clear()
            return self._call(superbatch, *bounds, *extras)

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

    def predict(self, chunks: Iterable[tuple[Nested, int, int]]) -> Nested:
        """Runs a predict loop over ``(superbatch, start, stop)`` chunks; returns the outputs
        of every step run, concatenated along the batch axis, as NumPy."""
        outputs: list[Any] = []
        for data, start, stop in chunks:
            stacked = self(data, start, stop)
            outputs.append(
                tf.nest.map_structure(
                    lambda t: np.reshape(t[start:stop].numpy(), (-1, *t.shape[2:])),  # noqa: B023
                    stacked,
                )
            )
        return tf.nest.map_structure(lambda *parts: np.concatenate(parts), *outputs)

    @property
    def tracing_count(self) -> int:
        """How many times the function was traced (one per distinct superbatch shape)."""
        if self._function is None:
            return 0
        return int(self._function.experimental_get_tracing_count())


def _peer_reason(error: BaseException) -> str:
    """The line of a collective's error that says which task failed (TF buries it)."""
    for line in str(error).splitlines():
        if "unhealthy" in line or "aborted" in line.lower() or "Error reported" in line:
            return line.strip()[:300]
    return first_line(error)


# ------------------------------------------------------------------------- building blocks


def _step_batch(data: Nested, i: tf.Tensor) -> Nested:
    """Step ``i`` of a superbatch."""
    return tf.nest.map_structure(lambda t: t[i], data)


def _specs(outputs: Nested) -> Nested | None:
    if outputs is None:  # a step that returns nothing adds nothing to the logs
        return None
    return tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape, t.dtype), outputs)


def _zeros(spec: Nested | None, what: str) -> Nested:
    """Zeros of ``spec``: the logs a loop starts from (an empty dict for none)."""
    if spec is None:
        return {}

    def zeros(s: tf.TensorSpec) -> tf.Tensor:
        if not s.shape.is_fully_defined():
            raise TypeError(
                f"{what} returned a tensor of shape {s.shape}; the values a step method returns "
                "must have a static shape (return scalars, or track values with a metric)."
            )
        return tf.zeros(s.shape, s.dtype)

    return tf.nest.map_structure(zeros, spec)


class _Runner:
    """Runs step ``i`` of a superbatch: directly, or on every replica of a strategy.

    ``output_spec(data)`` traces the step once (nothing runs) to find the structure it
    returns, inside the traced loop: each new superbatch shape sees its own batch shape.
    """

    def __init__(self, spec: LoopSpec, jit: bool) -> None:
        self.spec = spec
        self.strategy = spec.strategy
        step = spec.step

        def replica_step(data: Nested, i: tf.Tensor) -> Any:
            # A subclass's step is user code: AutoGraph converts it (see _autograph.py).
            return user_code(step)(_step_batch(data, i))

        # Without a strategy the whole loop is one XLA program; under one, each replica's step.
        self._replica_step = (
            tf.function(replica_step, jit_compile=True)
            if jit and self.strategy is not None
            else replica_step
        )

    def output_spec(self, data: Nested) -> Nested | None:
        strategy = self.strategy

        def step(batch: Nested) -> Any:
            return user_code(self.spec.step)(batch)

        if strategy is None:
            batch = tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape[1:], t.dtype), data)
            return _specs(tf.function(step).get_concrete_function(batch).structured_outputs)

        def one_replica(batch: Nested) -> Nested:
            # Traced inside strategy.run: the step updates on-read variables, which only
            # replica context allows.
            return _distribute.first_local(strategy, strategy.run(step, args=(batch,)))

        local = _distribute.first_local(strategy, data)
        batch = tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape[1:], t.dtype), local)
        return _specs(tf.function(one_replica).get_concrete_function(batch).structured_outputs)

    def first_local(self, data: Nested) -> Nested:
        """The first local replica's share of ``data`` (a strategy's per-replica values)."""
        assert self.strategy is not None
        return _distribute.first_local(self.strategy, data)

    def logs_spec(self, data: Nested) -> Nested | None:
        return self.output_spec(data) if self.spec.returns_logs else None

    def run(self, data: Nested, i: tf.Tensor) -> Any:
        """Step ``i``; under a strategy, its outputs averaged over the replicas."""
        strategy = self.strategy
        if strategy is None:
            return self._replica_step(data, i)
        outputs = strategy.run(self._replica_step, args=(data, i))
        if not self.spec.returns_logs:
            return None
        return tf.nest.map_structure(
            lambda v: strategy.reduce(tf.distribute.ReduceOp.MEAN, v, axis=None), outputs
        )

    def predict(self, data: Nested, i: tf.Tensor) -> Any:
        """Step ``i``'s outputs; under a strategy, every replica's, concatenated in the order
        the superbatch was split in (gathered across workers too)."""
        strategy = self.strategy
        if strategy is None:
            return self._replica_step(data, i)
        outputs = strategy.run(self._replica_step, args=(data, i))
        return tf.nest.map_structure(lambda v: strategy.gather(v, axis=0), outputs)


# ------------------------------------------------------------------------------- the loops
# The loop bodies below are converted by AutoGraph (tf.function converts the function it is
# given); the helpers they call are not, so all control flow is written in the bodies. Every
# loop is a `while`, never `for i in tf.range(start, stop)`: XLA would take the trip count as a
# compile-time constant and compile again for every new chunk length.


def _build(spec: LoopSpec, jit: bool) -> Any:
    runner = _Runner(spec, jit)
    loop_jit = jit and spec.strategy is None
    if spec.kind == "predict":
        return tf.function(_predict_body(runner), jit_compile=loop_jit)
    # Staged windows need a loop of their own; under a strategy the window is closed after
    # each step, in cross-replica context, without staging (except for a fresh window per
    # call, which lives in loop registers only).
    staged = spec.strategy is None or spec.fresh_window
    if spec.kind == "train" and spec.window is not None and staged:
        return tf.function(_windowed_body(runner, spec, loop_jit), jit_compile=loop_jit)
    return tf.function(_steps_body(runner, spec), jit_compile=loop_jit)


def _steps_body(runner: _Runner, spec: LoopSpec) -> Callable[..., Any]:
    """Test steps, and train steps without a staged window."""
    window, results = spec.window, spec.results
    assert results is not None
    what = f"{spec.kind}_step"

    def run_steps(data: Nested, start: tf.Tensor, stop: tf.Tensor, *flush: tf.Tensor) -> Any:
        logs_spec = runner.logs_spec(data)
        step_logs = _zeros(logs_spec, what)
        i = start
        while i < stop:
            outputs = runner.run(data, i)
            if window is not None:
                window.close(tf.equal(i, flush[0]))
            if logs_spec is not None:
                step_logs = outputs
            i += 1
        return results(), step_logs

    return run_steps


def _windowed_body(runner: _Runner, spec: LoopSpec, jit: bool) -> Callable[..., Any]:
    """Train steps with the window's state carried in loop registers, one inner loop per window.

    The window is closed (one ``tf.cond``) after its micro-batches, not tested after every one.
    When every step adds exactly one micro-batch (``unroll``) a whole window is unrolled under
    XLA: its ``k`` steps are one straight block, with no loop between them. Measured on the mlp
    workload against no accumulation: variables written and a ``cond`` at every step, 0.5x; a
    loop per window, 1.0-1.1x; unrolled windows, 1.5x (hand-written). Only under XLA: without
    it, TF's graph optimizer rewrites the unrolled sum (it factors out the common micro-batch
    weight), which is not bit-identical to summing step by step.
    """
    window, results = spec.window, spec.results
    assert window is not None and results is not None
    steps = window.steps
    unrolls = jit and spec.unroll and steps <= UNROLL_MAX

    def run_steps(data: Nested, start: tf.Tensor, stop: tf.Tensor, flush_at: tf.Tensor) -> Any:
        logs_spec = runner.logs_spec(data)
        step_logs = _zeros(logs_spec, "train_step")
        state = window.empty_state() if spec.fresh_window else window.read_state()
        i = start
        while i < stop:
            if unrolls:
                # Whole windows: the window is empty and its k micro-batches are all here.
                while window.count(state) == 0 and i + steps <= stop:
                    window.stage(state)
                    for j in range(steps):
                        runner.run(data, i + j)
                    window.close(None)
                    state = window.unstage()
                    i += steps
            # The micro-batches of one window (fewer if the chunk ends first).
            while i < stop and window.count(state) < steps:
                window.stage(state)
                outputs = runner.run(data, i)
                state = window.unstage()
                if logs_spec is not None:
                    step_logs = outputs
                i += 1
            window.stage(state)
            window.close(tf.equal(i - 1, flush_at))
            state = window.unstage()
        if not spec.fresh_window:
            window.write_state(state)
        return results(), step_logs

    return run_steps


def _predict_body(runner: _Runner) -> Callable[..., Any]:
    def predict_steps(data: Nested, start: tf.Tensor, stop: tf.Tensor, *batch: tf.Tensor) -> Any:
        spec = runner.output_spec(data)
        local = data if runner.strategy is None else runner.first_local(data)
        steps = int(tf.nest.flatten(local)[0].shape[0])
        if runner.strategy is None:
            buffers = tf.nest.map_structure(
                lambda s: tf.zeros([steps, *s.shape.as_list()], s.dtype), spec
            )
        else:
            # A replica's outputs hold its share of the batch; the gathered ones all of it.
            buffers = tf.nest.map_structure(
                lambda s: tf.zeros(tf.concat([[steps, batch[0]], s.shape[1:]], 0), s.dtype), spec
            )
        # Preallocated [K, ...] buffers updated in place: XLA-friendly, unlike a TensorArray of
        # dynamic size. Rows outside start..stop-1 stay zero and are dropped by the caller.
        i = start
        while i < stop:
            outputs = runner.predict(data, i)
            buffers = tf.nest.map_structure(
                lambda buffer, out: tf.tensor_scatter_nd_update(buffer, [[i]], out[None]),  # noqa: B023
                buffers,
                outputs,
            )
            i += 1
        return buffers

    return predict_steps
