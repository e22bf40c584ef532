"""Batched ``tf.data`` datasets as superbatches."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import tensorflow as tf

from tfloop.data._mixed import MixedSteps
from tfloop.data._source import DataSource, Piece, StepStream, pad_steps
from tfloop.data._stacking import ShapeStacker, with_step_sizes
from tfloop.errors import DataError

__all__ = ["DatasetSource", "check_element_spec", "superbatches"]

Nested = Any
DEFAULT_BATCH_SIZE = 32


class DatasetSource(DataSource):
    def __init__(self, dataset: tf.data.Dataset, steps_per_execution: int, argument: str) -> None:
        self.dataset = dataset
        self.argument = argument
        self.steps_per_execution = steps_per_execution
        cardinality = int(dataset.cardinality())
        if cardinality == 0:
            raise DataError(f"{argument} is an empty tf.data.Dataset (0 batches).")
        self.infinite = cardinality == tf.data.INFINITE_CARDINALITY
        self.steps_per_epoch = cardinality if cardinality > 0 else None
        check_element_spec(dataset.element_spec, argument)
        leaves = tf.nest.flatten(dataset.element_spec)
        static_batch = {leaf.shape[0] for leaf in leaves}
        self.batch_size = static_batch.pop() if len(static_batch) == 1 else None
        # tf.data draws a new shuffle seed (reshuffle_each_iteration) for every iterator made
        # from a dataset, in order; restoring an iterator's state sets that sequence to where
        # it was at the save, plus one. Counting the draws lets a resumed run put the sequence
        # exactly where an uninterrupted run has it (see Checkpointer).
        self._iterators_made = 0
        self.uniform = self.batch_size is not None and all(
            leaf.shape.is_fully_defined() for leaf in leaves
        )
        bytes_per_example = sum(
            leaf.dtype.size * int(np.prod([d or 1 for d in leaf.shape[1:]])) for leaf in leaves
        )
        self.bytes_per_batch = bytes_per_example * (self.batch_size or DEFAULT_BATCH_SIZE)
        # Per-worker input: makes every worker cut its superbatches alike (data/_lockstep.py).
        self.synchronize: Callable[[Iterator[list[Piece]]], Iterator[list[Piece]]] | None = None
        self._stacker = ShapeStacker(dataset.element_spec)  # lasts across epochs, as traces do
        self._stacks_by_k: dict[int, tf.data.Dataset] = {}

    def example_batch(self) -> Nested:
        return tf.nest.map_structure(
            lambda spec: tf.zeros([d if d is not None else 1 for d in spec.shape], spec.dtype),
            self.dataset.element_spec,
        )

    @property
    def seeds_drawn(self) -> int:
        return self._iterators_made

    def draw_seeds_until(self, count: int) -> None:
        """Makes (and drops) iterators until ``count`` shuffle seeds have been drawn."""
        while self._iterators_made < count:
            iter(self.dataset)
            self._iterators_made += 1

    def restored_seeds(self) -> None:
        """Records the seed that restoring an iterator's state draws."""
        self._iterators_made += 1

    def _stacks(self, k: int) -> tf.data.Dataset:
        """The padded stacks of ``k`` batches and their sizes; made once per ``k`` (building
        the dataset traces its map function)."""
        stacks = self._stacks_by_k.get(k)
        if stacks is None:
            stacks = with_step_sizes(self.dataset).padded_batch(k).prefetch(2)
            self._stacks_by_k[k] = stacks
        return stacks

    def stream(self, epoch: int, start_step: int = 0) -> StepStream:
        k = self.steps_per_execution
        self._iterators_made += 1
        if self.uniform:
            iterator, groups = superbatches(self.dataset, k, uniform=True)
        else:
            # Batches may differ in shape (the last, partial batch; bucketed sequence lengths):
            # stacked padded, with each step's sizes; see _stacking.py.
            stacker = self._stacker
            iterator = iter(self._stacks(k))
            groups = (stacker.pieces(data, sizes, k) for data, sizes in iterator)
        if self.synchronize is not None:
            groups = self.synchronize(plain_runs(groups, k))
        stream = StepStream(groups, k, iterator)
        stream.seeds_at_creation = self._iterators_made
        if start_step:
            # Without a saved iterator state the only way back is to skip batches; exact for a
            # deterministic pipeline, approximate for one that reshuffles per iterator.
            skipped = 0
            while skipped < start_step:
                chunk = stream.next_chunk(start_step - skipped)
                if chunk is None:
                    break
                skipped += chunk[2] - chunk[1]
        return stream


def check_element_spec(spec: Nested, argument: str) -> None:
    """A DataError unless every leaf of ``spec`` is a batched, dense ``tf.TensorSpec``."""
    for leaf in tf.nest.flatten(spec):
        if not isinstance(leaf, tf.TensorSpec):
            raise DataError(
                f"{argument} yields a {type(leaf).__name__}; tfloop takes dense "
                "tensors. Pad ragged or sparse features (e.g. .padded_batch) first."
            )
        if leaf.shape.rank == 0:
            raise DataError(
                f"{argument} yields scalars, so it looks unbatched; call "
                ".batch(batch_size) on the dataset before passing it."
            )


def superbatches(
    dataset: tf.data.Dataset, k: int, uniform: bool, stacker: ShapeStacker | None = None
) -> tuple[Any, Iterator[list[Piece]]]:
    """A new iterator over ``dataset`` stacked ``k`` batches at a time, and the pieces cut from
    each of its elements (``uniform``: every batch has the same, static shape). Batches of
    several shapes are stacked padded, with each step's sizes, and cut by ``stacker`` (which
    keeps what it has seen across calls: see _stacking.py)."""
    if uniform:
        iterator = iter(dataset.batch(k).prefetch(2))
        return iterator, ([pad_steps(data, k)] for data in iterator)
    stacker = stacker if stacker is not None else ShapeStacker(dataset.element_spec)
    iterator = iter(with_step_sizes(dataset).padded_batch(k).prefetch(2))
    return iterator, (stacker.pieces(data, sizes, k) for data, sizes in iterator)


def plain_runs(groups: Iterator[list[Piece]], k: int) -> Iterator[list[Piece]]:
    """``groups`` with each superbatch of several shapes cut into runs of one shape (for the
    paths that compare or split runs on the host: workers in lockstep)."""
    for pieces in groups:
        plain: list[Piece] = []
        for piece in pieces:
            if isinstance(piece.data, MixedSteps):
                runs = piece.data.runs(0, piece.steps)
                plain.extend(pad_steps(run, k) for _, _, run in runs)
            else:
                plain.append(piece)
        yield plain
