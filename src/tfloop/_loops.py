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
import re
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import tensorflow as tf

from tfloop import _distribute
from tfloop._loop_parts import Kind, LoopSpec, StepRunner, UpdateWindow, eager_predict, zeros
from tfloop._validate import first_line
from tfloop.data._mixed import MixedSteps
from tfloop.errors import ConfigError, DataError, TfloopError, WorkerError

__all__ = ["UNROLL_MAX", "CompiledLoop", "Kind", "LoopSpec", "UpdateWindow"]

logger = logging.getLogger("tfloop")

Nested = Any

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

# How TensorFlow's sparse cross-entropy kernel reports a label out of range (not under XLA):
# its own message, or under op determinism that of the gather it is made of.
_LABEL_OUT_OF_RANGE = (
    (
        re.compile(
            r"Received a label value of (-?\d+) which is outside the valid range of "
            r"(\[\d+, \d+\))"
        ),
        "",
    ),
    (
        re.compile(r"indices\[[\d,]+\] = (-?\d+) is not in (\[\d+, \d+\))"),
        "SparseSoftmaxCrossEntropyWithLogits",  # not an Embedding's lookup, say
    ),
)

UNROLL_MAX = 8
"""The largest window a loop unrolls (longer ones trace k copies of the step)."""


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
        self._mixed: dict[Any, Any] = {}  # a function per tuple of shapes (MixedSteps)
        self._concrete: dict[Any, Any] = {}  # the functions' traces, by flat input shapes

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
        try:
            out = self._run(superbatch, start, stop, *extra, per_worker=per_worker)
        except TfloopError:
            raise
        except tf.errors.InvalidArgumentError as error:
            label = _label_out_of_range(str(error))
            if label is None:
                raise
            raise DataError(
                f"data: an integer label lies outside its output's classes ({label}). Fix the "
                "labels (or the number of output units)."
            ) from None
        except Exception as error:
            # A tfloop error raised while tracing a step (a check of what a step method
            # returned) reaches here wrapped by AutoGraph: raise it as it was.
            original = _tfloop_error(error)
            if original is None:
                raise
            raise original from None
        if self.spec.check is not None:
            self.spec.check(out[0])
        return out

    @property
    def dispatches_shapes(self) -> bool:
        """Whether a MixedSteps superbatch runs as one execution (else by runs of one shape):
        without a strategy (its split is along the batch axis), compiled, and not for
        predict (whose outputs differ in shape with the batch)."""
        return self.spec.strategy is None and not self.spec.eager and self.kind != "predict"

    def _run(
        self, superbatch: Nested, start: int, stop: int, *extra: int, per_worker: bool = False
    ) -> Any:
        if isinstance(superbatch, MixedSteps) and not self.dispatches_shapes:
            return self._run_by_runs(superbatch, start, stop, *extra, per_worker=per_worker)
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
        if self.spec.eager:
            return self._function(superbatch, *bounds, *extras)
        try:
            return self._call(superbatch, *bounds, *extras)
        except _XLA_ERRORS as error:
            if self.jit and not self.spec.jit_fallback and _cannot_compile(error):
                raise ConfigError(
                    f"jit_compile=True, but XLA cannot compile the {self.kind} step "
                    f"({first_line(error, 200)}). Pass jit_compile='auto' (XLA where it "
                    "compiles, the plain graph where not) or jit_compile=False."
                ) from error
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
            self._mixed.clear()
            self._concrete.clear()
            return self._call(superbatch, *bounds, *extras)

    def _run_by_runs(
        self, superbatch: MixedSteps, start: int, stop: int, *extra: int, per_worker: bool
    ) -> Any:
        """Steps ``start..stop-1`` of ``superbatch``, one execution per run of one shape (each
        run padded to K steps, so runs of a shape share a trace); ``flush_at`` (training)
        moves with its run. Returns what the last execution returned."""
        result = None
        for first, end, run in superbatch.runs(start, stop, padded=True):
            shifted = tuple(e - first if first <= e < end else -1 for e in extra)
            result = self._run(run, 0, end - first, *shifted, per_worker=per_worker)
        return result

    def _call(self, superbatch: Nested, *args: tf.Tensor) -> Any:
        """Calls the function's trace for this superbatch's shapes directly.

        ``tf.function``'s own dispatch (binding and matching the nested arguments against its
        traces) cost about half of tfloop's ~1 ms of host time per execution; a trace looked up
        by the shapes and dtypes of the flat inputs, and called with them, skips it.
        """
        shapes = None
        function, inputs = self._function, (superbatch,)
        if isinstance(superbatch, MixedSteps):
            shapes = superbatch.shapes
            function = self._mixed.get(shapes)
            if function is None:
                function = self._mixed[shapes] = _build(self.spec, self.jit, shapes)
            inputs = ((superbatch.data, superbatch.which),)
        flat = tf.nest.flatten(inputs)
        structure = repr(tf.nest.map_structure(lambda _: None, inputs))
        key = (shapes, structure, len(args), *((t.dtype, tuple(t.shape)) for t in flat))
        concrete = self._concrete.get(key)
        if concrete is None:
            concrete = function.get_concrete_function(*inputs, *args)
            self._concrete[key] = concrete
        return concrete._call_flat([*flat, *args], concrete.captured_inputs)

    def predict(self, chunks: Iterable[tuple[Nested, int, int]]) -> Nested:
        """Runs a predict loop over ``(superbatch, start, stop)`` chunks; returns the outputs
        of every step run, concatenated along the batch axis, as NumPy."""
        outputs: list[Any] = []
        for data, start, stop in _plain_chunks(chunks):
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
        """How many times the functions were traced: one per distinct superbatch shape, and
        one per tuple of batch shapes a MixedSteps superbatch dispatches over."""
        if self._function is None or self.spec.eager:
            return 0
        functions = [self._function, *self._mixed.values()]
        return sum(int(f.experimental_get_tracing_count()) for f in functions)


def _plain_chunks(
    chunks: Iterable[tuple[Nested, int, int]],
) -> Iterable[tuple[Nested, int, int]]:
    """``chunks`` with each MixedSteps chunk replaced by its runs of one shape."""
    for data, start, stop in chunks:
        if isinstance(data, MixedSteps):
            for first, end, run in data.runs(start, stop, padded=True):
                yield run, 0, end - first
        else:
            yield data, start, stop


def _tfloop_error(error: BaseException) -> TfloopError | None:
    """The tfloop error an exception wraps (AutoGraph keeps it as the context), if any."""
    seen = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, TfloopError):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


def _label_out_of_range(message: str) -> str | None:
    """``"label 7 is not in [0, 4)"`` when ``message`` is TensorFlow's about such a label.

    Examples:
        >>> _label_out_of_range("Received a label value of 7 which is outside the valid "
        ...                     "range of [0, 4).  Label values: 0 7")
        'label 7 is not in [0, 4)'
        >>> _label_out_of_range("indices[2] = 7 is not in [0, 4) [[node embedding/GatherV2]]")
        >>> _label_out_of_range("indices[2] = 7 is not in [0, 4) [[node "
        ...                     "loss/SparseSoftmaxCrossEntropyWithLogits/GatherV2]]")
        'label 7 is not in [0, 4)'
    """
    for pattern, node in _LABEL_OUT_OF_RANGE:
        found = pattern.search(message)
        if found is not None and node in message:
            return f"label {found.group(1)} is not in {found.group(2)}"
    return None


def _peer_reason(error: BaseException) -> str:
    """The line of a collective's error that says which task failed (TF buries it)."""
    for line in str(error).splitlines():
        if "unhealthy" in line or "aborted" in line.lower() or "Error reported" in line:
            return line.strip()[:300]
    return first_line(error)


def _cannot_compile(error: BaseException) -> bool:
    """Whether an error is XLA saying it cannot compile the graph (not a runtime error)."""
    text = str(error)
    return "Detected unsupported operations" in text or "XLA compilation" in text


# ------------------------------------------------------------------------------- the loops
# The loop bodies below are converted by AutoGraph (tf.function converts the function it is
# given); the helpers they call are not, so all control flow is written in the bodies. Every
# loop is a `while`, never `for i in tf.range(start, stop)`: XLA would take the trip count as a
# compile-time constant and compile again for every new chunk length.


def _build(spec: LoopSpec, jit: bool, shapes: Any = None) -> Any:
    """The loop's function; with ``shapes``, the one that takes a MixedSteps of those batch
    shapes as ``(data, which, ...)``."""
    if spec.eager:
        jit = False
    runner = StepRunner(spec, jit, shapes)
    loop_jit = jit and spec.strategy is None
    if spec.kind == "predict":
        body = _predict_body(runner)
    # Staged windows need a loop of their own; under a strategy the window is closed after
    # each step, in cross-replica context, without staging (except for a fresh window per
    # call, which lives in loop registers only).
    elif (
        spec.kind == "train"
        and spec.window is not None
        and (spec.strategy is None or spec.fresh_window)
    ):
        body = _windowed_body(runner, spec, loop_jit)
    else:
        body = _steps_body(runner, spec)
    return body if spec.eager else tf.function(body, jit_compile=loop_jit)


def _steps_body(runner: StepRunner, spec: LoopSpec) -> Callable[..., Any]:
    """Test steps, and train steps without a staged window."""
    window, results = spec.window, spec.results
    assert results is not None
    what = f"{spec.kind}_step"

    def run_steps(data: Nested, start: tf.Tensor, stop: tf.Tensor, *flush: tf.Tensor) -> Any:
        data = runner.superbatch(data)
        logs_spec = runner.logs_spec(data)
        step_logs = zeros(logs_spec, what)
        i = start
        while i < stop:
            outputs = runner.run(data, i)
            if window is not None:
                window.close(tf.equal(i, flush[0]))
            if runner.keeps(logs_spec, outputs):
                step_logs = outputs
            i += 1
        return results(), step_logs

    return run_steps


def _windowed_body(runner: StepRunner, spec: LoopSpec, jit: bool) -> Callable[..., Any]:
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
        data = runner.superbatch(data)
        logs_spec = runner.logs_spec(data)
        step_logs = zeros(logs_spec, "train_step")
        state = window.empty_state() if spec.fresh_window else window.read_state()
        # A MixedSteps step runs in a switch branch, which cannot be unrolled into a block.
        unrolled = unrolls and not isinstance(data, MixedSteps)
        i = start
        while i < stop:
            if unrolled:
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
                outputs, state = runner.run_staged(data, i, window, state)
                if runner.keeps(logs_spec, outputs):
                    step_logs = outputs
                i += 1
            window.stage(state)
            window.close(tf.equal(i - 1, flush_at))
            state = window.unstage()
        if not spec.fresh_window:
            window.write_state(state)
        return results(), step_logs

    return run_steps


def _predict_body(runner: StepRunner) -> Callable[..., Any]:
    def predict_steps(data: Nested, start: tf.Tensor, stop: tf.Tensor, *batch: tf.Tensor) -> Any:
        if runner.spec.eager:
            return eager_predict(runner, data, int(start), int(stop))
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
