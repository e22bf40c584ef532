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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import tensorflow as tf

from tfloop.errors import _first_line

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


def _batch_spec(superbatch: Nested) -> Nested:
    return tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape[1:], t.dtype), superbatch)


def _output_spec(step: StepFunction, superbatch: Nested) -> Nested:
    """The structure a step method returns, found by tracing it once (nothing is run)."""
    concrete = tf.function(step).get_concrete_function(_batch_spec(superbatch))
    return tf.nest.map_structure(
        lambda t: tf.TensorSpec(t.shape, t.dtype), concrete.structured_outputs
    )


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
        self.jit = bool(jit_compile) if not self.auto else True
        self._function: Any = None

    def _build(self) -> Any:
        builders = {"train": _train_function, "test": _test_function, "predict": _predict_function}
        return builders[self.kind](self.trainer, self.jit)

    def __call__(self, superbatch: Nested, start: int, stop: int, *extra: Any) -> Any:
        if self._function is None:
            self._function = self._build()
        bounds = (tf.constant(start, tf.int32), tf.constant(stop, tf.int32))
        extra = tuple(tf.constant(e, tf.int32) for e in extra)
        try:
            return self._function(superbatch, *bounds, *extra)
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
            return self._function(superbatch, *bounds, *extra)

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
    def train_steps(data: Nested, start: tf.Tensor, stop: tf.Tensor, flush_at: tf.Tensor) -> Any:
        step_spec = _step_logs_spec(trainer, "train_step", data)
        step_logs = _zeros(step_spec, "train_step") if step_spec is not None else {}
        for i in tf.range(start, stop):
            batch = tf.nest.map_structure(lambda t: t[i], data)  # noqa: B023
            with _window_end(trainer, tf.equal(i, flush_at)):
                outputs = trainer.train_step(batch)
            if step_spec is not None:
                step_logs = outputs
        return trainer._results(), step_logs

    return tf.function(train_steps, jit_compile=jit)


def _test_function(trainer: Trainer, jit: bool) -> Any:
    def test_steps(data: Nested, start: tf.Tensor, stop: tf.Tensor) -> Any:
        step_spec = _step_logs_spec(trainer, "test_step", data)
        step_logs = _zeros(step_spec, "test_step") if step_spec is not None else {}
        for i in tf.range(start, stop):
            outputs = trainer.test_step(tf.nest.map_structure(lambda t: t[i], data))  # noqa: B023
            if step_spec is not None:
                step_logs = outputs
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
        for i in tf.range(start, stop):
            outputs = trainer.predict_step(tf.nest.map_structure(lambda t: t[i], data))  # noqa: B023
            buffers = tf.nest.map_structure(
                lambda buffer, out: tf.tensor_scatter_nd_update(buffer, [[i]], out[None]),  # noqa: B023
                buffers,
                outputs,
            )
        return buffers

    return tf.function(predict_steps, jit_compile=jit)


@contextmanager
def _window_end(trainer: Trainer, flag: tf.Tensor) -> Iterator[None]:
    """Tells ``apply_gradients`` (at trace time) that this step closes the epoch's last window."""
    trainer._closes_window = flag
    try:
        yield
    finally:
        trainer._closes_window = None
