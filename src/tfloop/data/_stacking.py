"""Superbatches from a dataset whose batch shapes are not all known in advance.

A dataset's element spec leaves a dimension unknown (``None``) whenever batches may differ in
it: ``.batch(n)`` without ``drop_remainder`` (a last, partial batch), ``padded_batch`` and
``bucket_by_sequence_length`` (sequence lengths). Such batches are stacked ``K`` at a time with
``padded_batch(K)``, each carrying the sizes of its unknown dimensions (:func:`with_step_sizes`),
and :class:`ShapeStacker` turns each stack into the pieces the loop runs:

* every step has the same shape (the usual case: all full batches): the stack itself, as it
  came from ``tf.data``; nothing is copied;
* several shapes: one :class:`~tfloop.data._mixed.MixedSteps`, run as one execution that
  dispatches each step to its shape.

Each piece form is a trace of the compiled loop: a plain stack, one per batch shape; a mixed
one, one per tuple of shapes. The stacker chooses the form so that a source never makes more
traces than it has distinct batch shapes: a new trace happens only for a shape never seen
before (a uniform stack of a new shape is plain; a mixed stack with a new shape widens the
tuple to every shape seen so far). A stack runs with the shortest tuple made so far that holds
its shapes (each shape in the tuple costs a little at every step); stacks whose shapes were all
seen, but are in no one tuple, are cut into runs of one shape, each run in the form already
traced for it. Beyond :data:`MAX_SHAPES` shapes in one tuple new shapes are run plain, by runs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from tfloop.data._mixed import BatchShape, MixedSteps, fit_to
from tfloop.data._source import Piece, pad_steps

__all__ = ["MAX_SHAPES", "ShapeStacker", "unknown_dimensions", "with_step_sizes"]

Nested = Any
Row = tuple[int, ...]  # the sizes of a batch's unknown dimensions, in unknown_dimensions order

MAX_SHAPES = 16
"""The most batch shapes one compiled function dispatches over: each is a copy of the step,
traced and compiled, and a little work at every step (padded_batch without fixed shapes can
make a shape per batch)."""


def unknown_dimensions(spec: Nested) -> list[tuple[int, int]]:
    """``(leaf, axis)`` of every unknown dimension of an element spec, in flatten order."""
    return [
        (leaf, axis)
        for leaf, tensor_spec in enumerate(tf.nest.flatten(spec))
        for axis, size in enumerate(tensor_spec.shape)
        if size is None
    ]


def with_step_sizes(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """``dataset`` with each element paired with an int32 vector: the sizes of its unknown
    dimensions (the batch's shape, as far as the element spec does not say it).

    The map runs synchronously in the thread that pulls the element, its few ops inline: it
    does too little for a thread hand-off to pay. Measured (2 cores, 1,875 batches of 32): a
    plain ``map`` of it cost ~40 us per batch (map parallelization, the inter-op pool), the
    inline one ~8 us.
    """
    spec = dataset.element_spec
    dimensions = unknown_dimensions(spec)
    unpacked = isinstance(spec, tuple)  # Dataset.map passes a tuple element as arguments

    def with_sizes(*args: Any) -> Any:
        element = args if unpacked else args[0]
        leaves = tf.nest.flatten(element)
        return element, tf.stack([tf.shape(leaves[leaf])[axis] for leaf, axis in dimensions])

    sizes: Any = tf.autograph.experimental.do_not_convert(with_sizes)  # nothing to convert
    try:
        from tensorflow.python.data.ops import map_op

        return map_op._MapDataset(
            dataset, sizes, force_synchronous=True, use_inter_op_parallelism=False
        )
    except (ImportError, AttributeError, TypeError):  # a TensorFlow without that private class
        return dataset.map(sizes, deterministic=True)


class ShapeStacker:
    """Turns padded stacks and their step sizes into pieces (see the module docstring).

    One per data source: what it has seen (and so what the loop has traced) lasts across
    epochs.
    """

    def __init__(self, spec: Nested) -> None:
        self.spec = spec
        self.dimensions = unknown_dimensions(spec)
        self.plain: set[Row] = set()  # shapes run as plain stacks
        self.tuples: list[tuple[Row, ...]] = []  # the tuples mixed stacks dispatch over, sorted
        self.seen: set[Row] = set()

    def batch_shape(self, row: Row) -> BatchShape:
        """The full shape of each leaf of a batch whose unknown sizes are ``row``."""
        shapes = [list(leaf.shape) for leaf in tf.nest.flatten(self.spec)]
        for (leaf, axis), size in zip(self.dimensions, row, strict=True):
            shapes[leaf][axis] = size
        return tuple(tuple(int(size) for size in shape) for shape in shapes)

    def pieces(self, stack: Nested, sizes: tf.Tensor, k: int) -> list[Piece]:
        """The pieces of one stack of ``len(sizes)`` steps (``sizes``: one row per step)."""
        rows = sizes.numpy()
        if (rows == rows[0]).all():
            row = tuple(rows[0].tolist())
            if row in self.plain or row not in self.seen:
                self.plain.add(row)
                self.seen.add(row)
                return [pad_steps(stack, k)]
            return [self._mixed(stack, rows, k, self._covering({row}))]
        present = {tuple(row) for row in rows.tolist()}
        covering = self._covering(present)
        if covering is not None:
            return [self._mixed(stack, rows, k, covering)]
        widened = self.seen | present
        if present - self.seen and len(widened) <= MAX_SHAPES:
            self.tuples.append(tuple(sorted(widened)))
            self.seen = widened
            return [self._mixed(stack, rows, k, self.tuples[-1])]
        return self._runs(stack, rows, k)

    def _covering(self, present: set[Row]) -> Any:
        """The shortest tuple already made that holds every shape of ``present`` (None if
        there is none): each shape a step might have costs the loop a little at every step."""
        fitting = [shapes for shapes in self.tuples if present <= set(shapes)]
        return min(fitting, key=len) if fitting else None

    def _mixed(self, stack: Nested, rows: np.ndarray, k: int, rows_of: tuple[Row, ...]) -> Piece:
        """``stack`` as MixedSteps over the shapes ``rows_of`` (every row is one of them)."""
        shapes = tuple(self.batch_shape(row) for row in rows_of)
        # Per leaf, the largest size of each dimension among the shapes.
        bound = [
            tuple(max(sizes) for sizes in zip(*leaf, strict=True))
            for leaf in zip(*shapes, strict=True)
        ]
        leaves = [
            fit_to(leaf, (k, *leaf_bound))
            for leaf, leaf_bound in zip(tf.nest.flatten(stack), bound, strict=True)
        ]
        index = {row: position for position, row in enumerate(rows_of)}
        which = np.zeros(k, np.int32)
        which[: len(rows)] = [index[tuple(row)] for row in rows.tolist()]
        data = tf.nest.pack_sequence_as(stack, leaves)
        return Piece(MixedSteps(data, tf.constant(which), shapes), len(rows))

    def _runs(self, stack: Nested, rows: np.ndarray, k: int) -> list[Piece]:
        """Runs of one shape, each in the form already traced for it (or plain if new)."""
        pieces = []
        first = 0
        while first < len(rows):
            end = first + 1
            while end < len(rows) and (rows[end] == rows[first]).all():
                end += 1
            run = tf.nest.map_structure(lambda t: t[first:end], stack)  # noqa: B023
            row = tuple(rows[first].tolist())
            if row in self.plain or row not in self.seen:
                self.plain.add(row)
                self.seen.add(row)
                shape = self.batch_shape(row)
                cut = [
                    fit_to(leaf, (end - first, *size))
                    for leaf, size in zip(tf.nest.flatten(run), shape, strict=True)
                ]
                pieces.append(pad_steps(tf.nest.pack_sequence_as(stack, cut), k))
            else:
                pieces.append(self._mixed(run, rows[first:end], k, self._covering({row})))
            first = end
        return pieces
