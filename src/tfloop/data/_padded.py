"""A superbatch stacked padded in the input pipeline, each step cut back to its size in-graph.

Under ``ParameterServerStrategy`` every worker stacks its own batches, ``K`` per closure, inside
its ``tf.data`` pipeline: no host sees the batches, so the shapes cannot be sorted out on a
host as :class:`~tfloop.data._stacking.ShapeStacker` does. A dataset whose batches may differ
in shape (``.batch(n)`` before ``.repeat()``: a partial batch each pass; ``padded_batch``) is
stacked with ``padded_batch(K)``, each batch paired with the sizes of its unknown dimensions
(:func:`~tfloop.data._stacking.with_step_sizes`), and the loop cuts step ``i`` back to those
sizes (:meth:`PaddedSteps.step`). Its shape is then dynamic where the element spec is unknown,
which a graph without XLA (the closures') runs as it is: every step sees exactly its batch, no
padding, so a partial batch weighs what its examples weigh.

Examples:
    >>> import tensorflow as tf
    >>> stack = tf.reshape(tf.range(12.0), [2, 3, 2])  # 2 steps padded to batches of 3 rows
    >>> steps = PaddedSteps(stack, tf.constant([[3], [1]]), dimensions=((0, 0),))
    >>> steps.step(0).shape, steps.step(1).numpy().tolist()
    (TensorShape([3, 2]), [[6.0, 7.0]])
"""

from __future__ import annotations

import dataclasses
from typing import Any

import tensorflow as tf

__all__ = ["PaddedSteps"]

Nested = Any


@dataclasses.dataclass(frozen=True)
class PaddedSteps:
    """Steps stacked padded, and each step's sizes of its unknown dimensions.

    ``data``: nested tensors ``[K, *padded]``; ``sizes``: ``[K, len(dimensions)]`` int32, the
    sizes of step ``i`` in ``dimensions``, the ``(leaf, axis)`` of every dimension the element
    spec leaves unknown (in ``tf.nest.flatten`` order; axis 0 is the batch dimension).
    """

    data: Nested
    sizes: tf.Tensor
    dimensions: tuple[tuple[int, int], ...]

    def step(self, i: Any) -> Nested:
        """Step ``i``, cut to its own sizes (a tensor ``i`` when traced)."""
        leaves = [leaf[i] for leaf in tf.nest.flatten(self.data)]
        row = self.sizes[i]
        for index, leaf in enumerate(leaves):
            axes = [
                (column, axis)
                for column, (owner, axis) in enumerate(self.dimensions)
                if owner == index
            ]
            if axes:
                size: list[Any] = [-1] * leaf.shape.rank
                for column, axis in axes:
                    size[axis] = row[column]
                leaves[index] = tf.slice(leaf, [0] * leaf.shape.rank, tf.stack(size))
        return tf.nest.pack_sequence_as(self.data, leaves)

    def spec(self) -> Nested:
        """The spec of one step's batch (its unknown dimensions unknown)."""
        flat = tf.nest.flatten(self.data)
        shapes = [list(leaf.shape[1:]) for leaf in flat]
        for leaf, axis in self.dimensions:
            shapes[leaf][axis] = None
        return tf.nest.pack_sequence_as(
            self.data,
            [tf.TensorSpec(shape, leaf.dtype) for leaf, shape in zip(flat, shapes, strict=True)],
        )
