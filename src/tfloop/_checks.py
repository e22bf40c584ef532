"""The dry run: the model and the loss run once, eagerly, on one batch, before any tracing.

A shape or dtype that does not fit surfaces here as a :class:`~tfloop.errors.DataError` naming
the argument and the fix, not as a graph stack trace from inside the compiled loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import tensorflow as tf

from tfloop._labels import check_sparse_labels, ignored_classes
from tfloop._model_steps import check_has_call, defines_call
from tfloop._snapshot import unchanged
from tfloop._validate import describe_tensors, first_line
from tfloop.data import unpack_batch
from tfloop.errors import ConfigError, DataError

__all__ = [
    "DryRun",
    "batch_signature",
    "check_can_train",
    "check_gradients",
    "check_loss",
    "check_model_accepts",
    "check_scalar_loss",
    "check_target_shapes",
]

Nested = Any


def check_can_train(
    loss: Any, trainable_variables: list[Any], *, overrides_loss: bool, overrides_step: bool
) -> None:
    """A ConfigError if ``fit`` has no loss to minimise or no variable to train."""
    if loss is None and not (overrides_loss or overrides_step):
        raise ConfigError(
            "loss is None: pass Trainer(loss=...) (e.g. 'mse') or override compute_loss."
        )
    if not trainable_variables and not overrides_step:
        raise ConfigError(
            "model has no trainable variables, so there is nothing to train; build the "
            "model (or unfreeze its layers) before fit."
        )


class DryRun:
    """The dry run of each new input signature (structure, shapes, dtypes) against a model
    and loss: a second ``fit``, or one ``fit`` per epoch, does not repeat it.

    It changes nothing (:func:`~tfloop._snapshot.unchanged`): what it could move is put back
    after it: the global random generators, the model's non-trainable variables (among them its
    seed generators and BatchNormalization statistics), the metrics' totals and the optimizer's
    step. A metric the dry run built (Keras builds compiled metrics at their first update)
    starts empty.
    """

    def __init__(
        self,
        model: Any,
        compiled: Any,
        predict_step: Callable[[Nested], Nested],
        compute_loss: Callable[..., Any],
        metrics: Callable[[], list[Any]],
        optimizer: Any,
    ) -> None:
        self.model = model
        self.compiled = compiled  # the Trainer's LossAndMetrics
        self.predict_step = predict_step
        self.compute_loss = compute_loss
        self.metrics = metrics
        self.optimizer = optimizer
        self.outputs: Nested = None  # the specs of the model's outputs, once it ran
        self._validated: set[Any] = set()

    def check(
        self, batch: Nested, *, overrides_loss: bool, checks_loss: bool, argument: str = "data"
    ) -> None:
        """Runs the model (and resolves the metrics) and the loss on ``batch``; everything it
        moved is put back afterwards."""
        model, compiled = self.model, self.compiled
        signature = (id(model), id(compiled.loss), *batch_signature(batch))
        if signature in self._validated:
            return
        _, y, _ = unpack_batch(batch)
        built = {id(metric) for metric in self.metrics() if getattr(metric, "built", True)}
        try:
            with unchanged(self._kept(built)):
                self._run(batch, y, overrides_loss, checks_loss, argument)
        finally:
            for metric in self.metrics():
                if id(metric) not in built:
                    metric.reset_state()
        self._validated.add(signature)

    def kept_variables(self) -> list[Any]:
        """What a check of the model may move (see the class docstring)."""
        return self._kept({id(metric) for metric in self.metrics()})

    def _kept(self, built_metrics: set[int]) -> list[Any]:
        model = self.model
        if isinstance(getattr(model, "non_trainable_variables", None), list):
            variables = list(model.non_trainable_variables)
        else:  # a tf.Module
            variables = [v for v in getattr(model, "variables", ()) if not v.trainable]
        for metric in self.metrics():
            if id(metric) in built_metrics:
                variables.extend(metric.variables)
        step = getattr(self.optimizer, "iterations", None)
        return variables if step is None else [*variables, step]

    def _run(
        self, batch: Nested, y: Nested, overrides_loss: bool, checks_loss: bool, argument: str
    ) -> None:
        model, compiled = self.model, self.compiled
        if not overrides_loss or compiled.specs:
            y_pred = check_model_accepts(self.predict_step, batch, model, argument)
            self.outputs = tf.nest.map_structure(tf.TensorSpec.from_tensor, y_pred)
            check_target_shapes(y, y_pred, argument)
            check_sparse_labels(y, y_pred, argument, ignored_classes(compiled.loss))
            compiled.build(y, y_pred)
        if y is None and not overrides_loss and checks_loss:
            raise DataError(
                f"{argument} has no targets: pass (x, y) or a dataset of (x, y) tuples "
                "(or override compute_loss for a loss without targets)."
            )
        if checks_loss:
            check_loss(self.compute_loss, batch, argument)


def check_model_accepts(
    predict_step: Callable[[Nested], Nested], batch: Nested, model: Any, argument: str = "data"
) -> Nested:
    """Runs ``predict_step(batch)`` eagerly; a failure is a DataError about ``x``."""
    x, _, _ = unpack_batch(batch)
    if not callable(model):
        raise ConfigError(
            f"model: a {type(model).__name__} has no __call__, so tfloop cannot run it on x; "
            "give it a __call__, or override predict_step and compute_loss in a Trainer "
            "subclass."
        )
    try:
        return predict_step(batch)
    except (ConfigError, DataError):
        raise
    except Exception as error:
        if not defines_call(model):  # a Keras model without call(): not the data's fault
            check_has_call(model, "the step that ran")
        raise DataError(
            f"{argument}: the model cannot take x {describe_tensors(x)}{_expected_input(model)}: "
            f"{first_line(error, 400)}. Reshape or cast x to the model's input, or change the "
            "model's Input. If the data is an unbatched dataset, call .batch(batch_size) on it."
        ) from error


def check_loss(compute_loss: Callable[..., Any], batch: Nested, argument: str = "data") -> None:
    """Runs ``compute_loss(batch, training=False)`` eagerly; a failure is a DataError about
    ``y`` (tfloop's own errors pass through)."""
    _, y, _ = unpack_batch(batch)
    try:
        loss = compute_loss(batch, training=False)
    except (ConfigError, DataError):
        raise
    except Exception as error:
        _, _, weights = unpack_batch(batch)
        if weights is not None and _mismatched_weights(weights, y):
            raise DataError(
                f"{argument}: the sample weights {describe_tensors(weights)} do not fit y "
                f"{describe_tensors(y)}: {first_line(error, 300)}. Give one weight per "
                "example (shape (batch,)), or per time step ((batch, steps))."
            ) from error
        raise DataError(
            f"{argument}: the loss cannot be computed for y {describe_tensors(y)}: "
            f"{first_line(error, 400)}. Check that y matches the model's output and the loss "
            "(e.g. one-hot labels for categorical_crossentropy, integer labels for "
            "sparse_categorical_crossentropy)."
        ) from error
    check_scalar_loss(loss)


def check_target_shapes(y: Nested, y_pred: Nested, argument: str = "data") -> None:
    """A DataError when a target is wider than the output it is compared with.

    A loss compares ``y`` and the output element by element, broadcasting where a dimension is
    1: targets of shape ``(n, 5)`` against an output of ``(n, 1)`` would compare every target
    column with the one output silently. (The other way, ``(n, 1)`` labels for ``(n, C)``
    outputs, is how sparse labels look, and is left to the loss.)
    """
    if y is None or y_pred is None:
        return
    try:
        tf.nest.assert_same_structure(y, y_pred)
    except (ValueError, TypeError):
        return  # a loss dict or a custom structure: the loss matches them
    for target, output in zip(tf.nest.flatten(y), tf.nest.flatten(y_pred), strict=True):
        target_shape, output_shape = tuple(target.shape), tuple(output.shape)
        if len(target_shape) != len(output_shape):
            continue
        if any(
            t is not None and t > 1 and o == 1
            for t, o in zip(target_shape[1:], output_shape[1:], strict=True)
        ):
            raise DataError(
                f"{argument}: y has shape {target_shape} but the model's output has "
                f"{output_shape}; the loss would broadcast the output over y's extra values. "
                "Give y the output's shape (or the model an output of y's)."
            )


def _mismatched_weights(weights: Nested, y: Nested) -> bool:
    """Whether sample weights cannot go with ``y``: another batch size, or not one weight per
    example (``(batch,)`` or ``(batch, 1)``) or per time step (``y``'s shape without its last
    dimension)."""

    def mismatched(weight: Any, target: Any) -> bool:
        w, t = tuple(weight.shape), tuple(target.shape)
        if not w or not t:
            return False
        return w[0] != t[0] or (w[1:] not in ((), (1,)) and w[1:] != t[1:-1])

    pairs = zip(tf.nest.flatten(weights), tf.nest.flatten(y), strict=False)
    return any(mismatched(weight, target) for weight, target in pairs)


def check_scalar_loss(loss: Any, method: str = "compute_loss") -> None:
    """A ConfigError unless ``loss`` is a scalar tensor: the mean loss of the batch.

    A vector of per-example losses would make the gradient their *sum*, so each update
    would be batch-size times too large while the logged loss looked normal.
    """
    if loss is None or not tf.is_tensor(loss):
        raise ConfigError(
            f"{method} returned {loss!r}; it must return the batch's mean loss as a scalar "
            "tensor (e.g. tf.reduce_mean(per_example_losses))."
        )
    if loss.shape.rank != 0:
        raise ConfigError(
            f"{method} returned a tensor of shape {loss.shape}; it must return the batch's "
            "*mean* loss, a scalar: reduce it with tf.reduce_mean (a vector's gradient is "
            "the sum over the batch, so every update would be batch-size times too large)."
        )


def check_gradients(gradients: list[Any], variables: list[Any], method: str) -> None:
    """A ConfigError (at trace time) when no gradient reaches a trainable variable."""
    if variables and all(g is None for g in gradients):
        raise ConfigError(
            f"the loss of {method} does not depend on any trainable variable (every gradient "
            "is None): compute it from the model's outputs, inside the GradientTape."
        )


def batch_signature(batch: Nested) -> tuple[Any, ...]:
    """The structure, shapes and dtypes of a batch: a dry run is not repeated for the same."""
    return (
        repr(tf.nest.map_structure(lambda _: 0, batch)),
        tuple((tuple(t.shape), t.dtype.name) for t in tf.nest.flatten(batch)),
    )


def _expected_input(model: Any) -> str:
    try:
        shape = model.input_shape
    except (AttributeError, ValueError, RuntimeError):
        return ""
    return f" (the model expects {shape})"
