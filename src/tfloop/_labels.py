"""Integer labels outside their output's classes: a DataError, not silent NaN weights.

TensorFlow's sparse cross-entropy kernel checks that each label lies in ``[0, classes)``, but
not under XLA: there an out-of-range label gives a NaN loss (from logits) or counts as no class,
and training goes on. tfloop checks in-memory arrays on the host before training
(:func:`check_sparse_labels`, every label), and under XLA counts the labels of each step in the
compiled loop (:class:`LabelRangeCheck`), so a pipeline's bad label stops ``fit`` with a
DataError at the end of the execution that met it, before anything is saved.

A label is a class index of the output it goes with when it is an integer tensor of the
output's rank minus one (or of its rank with a last dimension of 1) and the output has a
static number of classes above 1. A label equal to a loss's ``ignore_class`` (Keras's
``SparseCategoricalCrossentropy(ignore_class=-1)``, for padding) is never out of range.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import tensorflow as tf

from tfloop import _distribute
from tfloop._logs import LABEL_ERRORS
from tfloop.errors import DataError

__all__ = ["LabelRangeCheck", "check_sparse_labels", "class_indices", "ignored_classes"]

Nested = Any


def class_indices(y: Nested, outputs: Nested) -> Iterator[tuple[Any, int]]:
    """Each ``(label, classes)`` of ``y`` whose label is a class index of its output.

    ``outputs`` are the model's outputs (tensors or specs) in ``y``'s structure; other
    structures (a loss dict matched by name, say) are left to the loss.
    """
    if y is None or outputs is None:
        return
    try:
        tf.nest.assert_same_structure(y, outputs)
    except (ValueError, TypeError):
        return
    for label, output in zip(tf.nest.flatten(y), tf.nest.flatten(outputs), strict=True):
        if isinstance(label, (tf.SparseTensor, tf.RaggedTensor)) or not hasattr(label, "dtype"):
            continue
        label_shape, out_shape = tf.TensorShape(label.shape), tf.TensorShape(output.shape)
        rank, out_rank = label_shape.rank, out_shape.rank
        if not tf.as_dtype(label.dtype).is_integer or not out_rank or rank is None:
            continue
        if out_shape[-1] in (None, 1):
            continue
        if rank == out_rank - 1 or (rank == out_rank and label_shape[-1] == 1):
            yield label, int(out_shape[-1])


def ignored_classes(loss: Any) -> frozenset[int]:
    """The ``ignore_class`` values of the losses in ``loss`` (a Keras compiled loss, a loss,
    or a structure of them); labels equal to one are left out of the range checks.

    Examples:
        >>> import keras
        >>> ignored_classes(keras.losses.SparseCategoricalCrossentropy(ignore_class=-1))
        frozenset({-1})
        >>> ignored_classes({"a": "mse", "b": keras.losses.SparseCategoricalCrossentropy()})
        frozenset()
    """
    found = set()
    for leaf in tf.nest.flatten(getattr(loss, "_user_loss", loss)):
        value = getattr(leaf, "ignore_class", None)
        keywords = getattr(leaf, "_fn_kwargs", None)
        if value is None and isinstance(keywords, dict):
            value = keywords.get("ignore_class")
        if isinstance(value, int) and not isinstance(value, bool):
            found.add(value)
    return frozenset(found)


def check_sparse_labels(
    y: Nested, outputs: Nested, argument: str = "x", ignored: frozenset[int] = frozenset()
) -> None:
    """A DataError for integer labels outside ``[0, classes)`` of the output they go with
    (``ignored`` labels aside).

    Checked over all of the arrays before training: one out-of-range label anywhere gives NaN
    weights under XLA (TensorFlow's kernels check the range only without it).
    """
    for label, classes in class_indices(y, outputs):
        values = tf.reshape(label, [-1])
        for ignore in ignored:
            values = tf.boolean_mask(values, values != ignore)
        if tf.size(values) == 0:
            continue
        low, high = int(tf.reduce_min(values)), int(tf.reduce_max(values))
        if low < 0 or high >= classes:
            bad = low if low < 0 else high
            raise DataError(
                f"{argument}: the integer labels y must lie in [0, {classes}) for an output of "
                f"{classes} classes, but y holds {bad}. Fix the labels (or the number of "
                "output units)."
            )


class LabelRangeCheck:
    """Counts, inside the compiled step, the labels outside their output's classes.

    On only under XLA (:meth:`enable`; without it TensorFlow's kernel raises, and the loop
    names the label) and not under ParameterServerStrategy. The count is a variable the
    loop's results carry (:meth:`results`), reset with the metrics; :meth:`check` raises on
    the host when it is above 0.

    Examples:
        >>> check = LabelRangeCheck()
        >>> check.enable(True)
        >>> count = tf.function(check.count)  # as in the compiled step (eagerly: nothing)
        >>> count(tf.constant([0, 3, 7]), tf.zeros((3, 4)))  # 7 is not in [0, 4)
        >>> int(check.results()[LABEL_ERRORS])
        1
        >>> try:
        ...     check.check(check.results())
        ... except DataError as error:
        ...     print(str(error)[:63])
        data: 1 integer label lies outside their output's classes [0, c
    """

    def __init__(self, strategy: tf.distribute.Strategy | None = None) -> None:
        self.enabled = False
        self.counting = False  # a traced step counts labels (so the results carry the count)
        self.ignored: frozenset[int] = frozenset()
        self.errors: tf.Variable | None = None
        if _distribute.is_parameter_server(strategy):
            return
        on_read: dict[str, Any] = {}
        if _distribute.is_replicated(strategy):
            on_read = {
                "synchronization": tf.VariableSynchronization.ON_READ,
                "aggregation": tf.VariableAggregation.SUM,  # each replica counts its share
            }
        with _distribute.scope(strategy):
            self.errors = tf.Variable(
                tf.constant(0, tf.int64), trainable=False, name="label_errors", **on_read
            )

    def enable(self, on: bool, ignored: frozenset[int] = frozenset()) -> None:
        """Whether the steps traced from now on count (XLA on), and the labels they leave
        out (the losses' ``ignore_class``)."""
        self.enabled = on and self.errors is not None
        self.ignored = ignored

    def count(self, y: Nested, y_pred: Nested) -> None:
        """Adds the labels of ``y`` outside their output's classes (in-graph, no branch)."""
        if not self.enabled or self.errors is None or tf.executing_eagerly():
            return  # an eager step (the dry run) runs TensorFlow's own check
        counts = []
        for label, classes in class_indices(y, y_pred):
            bad = (label < 0) | (label >= classes)
            for ignore in self.ignored:
                bad &= label != ignore
            counts.append(tf.reduce_sum(tf.cast(bad, tf.int64)))
        if counts:
            self.errors.assign_add(tf.add_n(counts))
            self.counting = True

    def results(self) -> dict[str, tf.Tensor]:
        """The count, for the loop's results: nothing when off, or when no traced step had
        class-index labels to count (a loop traces its results after its steps), so a model
        without them reads nothing more per execution."""
        if not self.enabled or not self.counting or self.errors is None:
            return {}
        return {LABEL_ERRORS: tf.identity(self.errors)}

    def reset(self) -> None:
        if self.errors is not None:
            self.errors.assign(0)

    def check(self, results: Mapping[str, Any]) -> None:
        """A DataError when the results of an execution count labels out of range."""
        count = results.get(LABEL_ERRORS)
        if count is None or int(count) == 0:
            return
        n = int(count)
        what = f"{n} integer labels lie" if n > 1 else "1 integer label lies"
        raise DataError(
            f"data: {what} outside their output's classes [0, classes) in this execution's "
            "batches. Under XLA TensorFlow does not check this range, and such a label trains "
            "as no class or makes the loss NaN. Fix the labels (or the number of output "
            "units). In training, this execution's updates reached the weights in memory, but "
            "nothing was saved after them: checkpoints written before are intact."
        )
