"""The pieces a compiled loop is made of: what a loop is (LoopSpec), the window protocol,
and how one step runs, locally or on every replica of a strategy (StepRunner)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Literal, Protocol

import numpy as np
import tensorflow as tf

from tfloop import _distribute
from tfloop._autograph import user_code
from tfloop.data._mixed import MixedSteps
from tfloop.data._padded import PaddedSteps
from tfloop.errors import ConfigError

__all__ = [
    "Kind",
    "LoopSpec",
    "StepRunner",
    "UpdateWindow",
    "checked_step",
    "eager_predict",
    "loggable",
    "zeros",
]

Nested = Any
Kind = Literal["train", "test", "predict"]


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
    fresh_window: bool = False  # each call starts with an empty window (see _loops.py)
    eager: bool = False  # run the steps eagerly, in Python (a debugging mode)
    check: Callable[[dict[str, Any]], None] | None = None  # of each execution's results, host
    # The superbatch comes as (padded stack, sizes): steps of these (leaf, axis) dimensions are
    # cut to their sizes in-graph (ParameterServerStrategy; see data/_padded.py).
    step_sizes: tuple[tuple[int, int], ...] | None = None


def step_batch(data: Nested, i: tf.Tensor) -> Nested:
    """Step ``i`` of a (plain) superbatch."""
    return tf.nest.map_structure(lambda t: t[i], data)


def batch_spec(data: Nested) -> Nested:
    """The spec of one batch of a superbatch (of its first shape, for MixedSteps)."""
    if isinstance(data, PaddedSteps):
        return data.spec()
    if isinstance(data, MixedSteps):
        return tf.nest.pack_sequence_as(
            data.data,
            [
                tf.TensorSpec(shape, leaf.dtype)
                for leaf, shape in zip(tf.nest.flatten(data.data), data.shapes[0], strict=True)
            ],
        )
    return tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape[1:], t.dtype), data)


def specs(outputs: Nested, what: str = "the step") -> Nested | None:
    """The specs of what a step returned (None: nothing to log)."""
    if outputs is None:  # a step that returns nothing adds nothing to the logs
        return None
    if what != "predict_step":
        outputs = loggable(outputs, what)
    return tf.nest.map_structure(lambda value: tf.TensorSpec(value.shape, value.dtype), outputs)


def loggable(outputs: Any, what: str) -> Any:
    """A train or test step's return value as logs: a dict (nested dicts allowed, as a
    ``CompileMetrics`` result is) of numeric tensors of static shape, Python numbers made
    tensors. Anything else is a ConfigError naming its key, raised while the loop is traced,
    before any update.

    Examples:
        >>> sorted(loggable({"loss": 0.5, "m": {"mae": tf.constant(1.0)}}, "train_step"))
        ['loss', 'm']
        >>> loggable({"loss": "high"}, "train_step")
        Traceback (most recent call last):
        ...
        tfloop.errors.ConfigError: train_step returned 'high' under 'loss', which cannot be logged; a step method returns None or a dict of numbers (scalar tensors, or metric results) by name.
    """
    if outputs is None:
        return None
    if not isinstance(outputs, Mapping):
        raise ConfigError(
            f"{what} returned a {type(outputs).__name__}; a step method returns None or a dict "
            "of tensors ({'name': value}), which are logged under those names."
        )

    def convert(path: str, value: Any) -> Any:
        if isinstance(value, (bool, int, float, np.number)):
            return tf.constant(value)
        numeric = tf.is_tensor(value) and (
            value.dtype.is_floating or value.dtype.is_integer or value.dtype.is_bool
        )
        if not numeric:
            raise ConfigError(
                f"{what} returned {value!r} under {path!r}, which cannot be logged; a step "
                "method returns None or a dict of numbers (scalar tensors, or metric results) "
                "by name."
            )
        if not value.shape.is_fully_defined():
            raise ConfigError(
                f"{what} returned a tensor of shape {value.shape} under {path!r}; the values a "
                "step method returns must have a static shape (return scalars, or track "
                "values with a metric)."
            )
        return value

    def walk(path: str, value: Any) -> Any:
        if isinstance(value, Mapping):
            return {key: walk(f"{path}/{key}" if path else str(key), v) for key, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(walk(f"{path}/{i}", v) for i, v in enumerate(value))
        return convert(path, value)

    return walk("", outputs)


def zeros(spec: Nested | None, what: str) -> Nested:
    """Zeros of ``spec``: the logs a loop starts from (an empty dict for none)."""
    if spec is None:
        return {}

    return tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype), spec)


def checked_step(spec: LoopSpec) -> Callable[[Nested], Any]:
    """The loop's step: user code converted by AutoGraph (see _autograph.py), its return value
    checked as logs (:func:`loggable`) for a train or test step."""
    step = spec.step
    if spec.kind == "predict":
        return lambda batch: user_code(step)(batch)
    what = f"{spec.kind}_step"
    return lambda batch: loggable(user_code(step)(batch), what)


class Staging(Protocol):
    """The part of an ``UpdateWindow`` a staged step uses."""

    def stage(self, state: Any) -> None: ...

    def unstage(self) -> Any: ...


class StepRunner:
    """Runs step ``i`` of a superbatch: directly, by shape, or on every replica of a strategy.

    ``output_spec(data)`` traces the step once (nothing runs) to find the structure it
    returns, inside the traced loop: each new superbatch shape sees its own batch shape.
    A :class:`~tfloop.data._mixed.MixedSteps` superbatch of batches of several shapes is
    dispatched by ``MixedSteps.dispatch`` to code that sees the step at its own static shape;
    it only comes without a strategy (the loop runs it by runs of one shape otherwise).
    """

    def __init__(self, spec: LoopSpec, jit: bool, shapes: Any = None) -> None:
        self.spec = spec
        self.strategy = spec.strategy
        self.shapes = shapes
        self.step = checked_step(spec)
        step = self.step

        def replica_step(data: Nested, i: tf.Tensor) -> Any:
            if isinstance(data, MixedSteps):
                return data.dispatch(i, step)
            if isinstance(data, PaddedSteps):
                return step(data.step(i))
            return step(step_batch(data, i))

        # Without a strategy the whole loop is one XLA program; under one, each replica's step.
        self._replica_step = (
            tf.function(replica_step, jit_compile=True)
            if jit and self.strategy is not None
            else replica_step
        )

    def superbatch(self, data: Nested) -> Nested:
        """What the loop's function was called with, as the superbatch to run: ``data``, or
        with ``shapes`` (a function for MixedSteps of those shapes) ``(data, which)`` as
        MixedSteps (a function's arguments are tensors, so the shapes come with the function);
        with the spec's ``step_sizes``, ``(stack, sizes)`` as PaddedSteps.
        """
        if self.spec.step_sizes is not None:
            stack, sizes = data
            return PaddedSteps(stack, sizes, self.spec.step_sizes)
        if self.shapes is None:
            return data
        stack, which = data
        return MixedSteps(stack, which, self.shapes)

    def output_spec(self, data: Nested) -> Nested | None:
        strategy = self.strategy

        step = self.step
        if strategy is None:
            batch = batch_spec(data)
            concrete = tf.function(step).get_concrete_function(batch)
            return specs(concrete.structured_outputs, f"{self.spec.kind}_step")

        def one_replica(batch: Nested) -> Nested:
            # Traced inside strategy.run: the step updates on-read variables, which only
            # replica context allows.
            return _distribute.first_local(strategy, strategy.run(step, args=(batch,)))

        local = _distribute.first_local(strategy, data)
        batch = batch_spec(local)
        concrete = tf.function(one_replica).get_concrete_function(batch)
        return specs(concrete.structured_outputs, f"{self.spec.kind}_step")

    def first_local(self, data: Nested) -> Nested:
        """The first local replica's share of ``data`` (a strategy's per-replica values)."""
        assert self.strategy is not None
        return _distribute.first_local(self.strategy, data)

    def logs_spec(self, data: Nested) -> Nested | None:
        """The structure of the step's logs, traced; None when they are not kept (eagerly,
        what a step returns is kept as it comes)."""
        if self.spec.eager or not self.spec.returns_logs:
            return None
        return self.output_spec(data)

    def keeps(self, logs_spec: Nested | None, outputs: Any) -> bool:
        """Whether ``outputs`` of a step become the loop's step logs."""
        if self.spec.eager:
            return self.spec.returns_logs and outputs is not None
        return logs_spec is not None

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

    def run_staged(self, data: Nested, i: tf.Tensor, window: Staging, state: Any) -> Any:
        """Step ``i`` with ``state`` staged in ``window``: ``(outputs, state after it)``.

        For MixedSteps the staging happens inside the code run for each shape: the state the
        step leaves is a value there, and must leave it as one of that code's outputs.
        """
        if not isinstance(data, MixedSteps):
            window.stage(state)
            outputs = self.run(data, i)
            return outputs, window.unstage()
        step = self.step
        nothing: list[bool] = []

        def staged(batch: Nested) -> Any:
            window.stage(state)
            outputs = step(batch)
            if outputs is None:
                nothing.append(True)
                outputs = tf.constant(0)
            return outputs, window.unstage()

        outputs, state = data.dispatch(i, staged)
        return (None if nothing else outputs), state

    def predict(self, data: Nested, i: tf.Tensor) -> Any:
        """Step ``i``'s outputs; under a strategy, every replica's, concatenated in the order
        the superbatch was split in (gathered across workers too)."""
        strategy = self.strategy
        if strategy is None:
            return self._replica_step(data, i)
        outputs = strategy.run(self._replica_step, args=(data, i))
        return tf.nest.map_structure(lambda v: strategy.gather(v, axis=0), outputs)


def eager_predict(runner: StepRunner, data: Nested, start: int, stop: int) -> Nested:
    """The predict loop run eagerly: the outputs of steps ``start..stop-1`` in ``[K, ...]``
    buffers (other rows zero), as the compiled loop returns them."""
    local = data if runner.strategy is None else runner.first_local(data)
    steps = int(tf.nest.flatten(local)[0].shape[0])
    outputs = [runner.predict(data, tf.constant(i)) for i in range(start, stop)]

    def stack(*rows: tf.Tensor) -> tf.Tensor:
        stacked = tf.stack(rows)
        padding = [[start, steps - stop]] + [[0, 0]] * (stacked.shape.rank - 1)
        return tf.pad(stacked, padding)

    return tf.nest.map_structure(stack, *outputs)
