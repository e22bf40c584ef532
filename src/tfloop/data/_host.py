"""Batches made by Python code on the host: generators and other iterables of batches.

They reach the compiled loop as every input does, in superbatches: a ``tf.data`` dataset made
with ``from_generator`` (as Keras's adapters do) is stacked ``K`` batches at a time. The
iterator of such a dataset cannot be saved in a checkpoint (``PyFunc is stateful``), so these
inputs resume by batch count: the batches already trained are skipped (an index for a
PyDataset; a generator is read again from its start, which a new process gives).
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras.src.trainers.data_adapters import data_adapter_utils

from tfloop.data._datasets import check_element_spec, superbatches
from tfloop.data._source import DataSource, StepStream, unpack_batch
from tfloop.data._stacking import ShapeStacker
from tfloop.data._weights import check_single_output, class_weight_to_sample_weights
from tfloop.errors import ConfigError, DataError

__all__ = ["HostSource", "IterableSource"]

Nested = Any
logger = logging.getLogger("tfloop")

# Keras infers the element spec from the first two batches (NUM_BATCHES_FOR_TENSOR_SPEC): a
# dimension they disagree on is left unknown.
SPEC_BATCHES = data_adapter_utils.NUM_BATCHES_FOR_TENSOR_SPEC


class HostSource(DataSource):
    """Python batches as superbatches. A subclass says which raw batches a pass reads
    (:meth:`batches`); this class prepares them (standard tuples, NumPy, floats in
    ``floatx``, class weights) and stacks them."""

    def __init__(
        self, first_batches: list[Nested], argument: str, class_weight: dict[int, float] | None
    ) -> None:
        self.argument = argument
        self.class_weight = class_weight
        if not first_batches:
            raise DataError(f"{argument} yielded no batches; pass a non-empty input.")
        prepared = [self.prepare(batch) for batch in first_batches]
        self.spec = data_adapter_utils.get_tensor_spec(prepared)
        check_element_spec(self.spec, argument)
        self._stacker = ShapeStacker(self.spec)  # lasts across epochs, as traces do
        self.batch_size = None  # batches may differ (a partial last one)
        self.bytes_per_batch = sum(leaf.nbytes for leaf in tf.nest.flatten(prepared[0]))

    @property
    def resumes_by_count(self) -> bool:
        return True

    def batches(self, epoch: int, start_step: int) -> Iterator[Nested]:
        """The raw batches of ``epoch`` from its ``start_step``-th on."""
        raise NotImplementedError

    def prepare(self, batch: Nested) -> Nested:
        """One batch as tfloop feeds it: a tuple ``(x,)``, ``(x, y)`` or ``(x, y, sw)`` of NumPy
        arrays, floats in ``keras.config.floatx()`` (as for arrays), class weights added."""
        batch = standardize_batch(batch, self.argument)
        batch = tf.nest.map_structure(lambda leaf: to_numpy(leaf, self.argument), batch)
        if self.class_weight is not None:
            x, y, sample_weight = unpack_batch(batch)
            if sample_weight is not None:
                raise ConfigError(
                    f"class_weight was given but {self.argument} yields sample weights (x, y, "
                    "sample_weight); use one or the other."
                )
            check_single_output(y, self.argument)
            batch = (x, y, class_weight_to_sample_weights(y, self.class_weight))
        return batch

    def example_batch(self) -> Nested:
        return tf.nest.map_structure(
            lambda spec: tf.zeros([d if d is not None else 1 for d in spec.shape], spec.dtype),
            self.spec,
        )

    def stream(self, epoch: int, start_step: int = 0) -> StepStream:
        batches, prepare = self.batches(epoch, start_step), self.prepare

        def generate() -> Iterator[Nested]:
            for batch in batches:
                yield prepare(batch)

        dataset = tf.data.Dataset.from_generator(generate, output_signature=self.spec)
        _, groups = superbatches(
            dataset, self.steps_per_execution, uniform=False, stacker=self._stacker
        )
        # No iterator: its state holds a Python function call and cannot be saved.
        return StepStream(groups, self.steps_per_execution)


def standardize_batch(batch: Nested, argument: str) -> Nested:
    """A batch as a tuple ``(x,)``, ``(x, y)`` or ``(x, y, sample_weight)`` (a dict is ``x``);
    lists inside become tuples, as for arrays (``tf.data`` would stack a list)."""
    batch = lists_to_tuples(batch)
    if isinstance(batch, tuple):
        while batch and batch[-1] is None:  # (x, None): no targets, as in Keras
            batch = batch[:-1]
        if not 1 <= len(batch) <= 3:
            raise DataError(
                f"{argument} yielded a tuple of {len(batch)} elements; a batch is (x,), "
                "(x, y) or (x, y, sample_weight)."
            )
        return batch
    return (batch,)


def lists_to_tuples(node: Nested) -> Nested:
    if isinstance(node, (list, tuple)):
        return tuple(lists_to_tuples(n) for n in node)
    if isinstance(node, dict):
        return {key: lists_to_tuples(value) for key, value in node.items()}
    return node


def to_numpy(leaf: Any, argument: str) -> np.ndarray:
    array = np.asarray(leaf)
    if array.dtype == object:
        raise DataError(
            f"{argument} yielded an array of Python objects (dtype=object); yield numeric "
            "arrays (pad ragged data)."
        )
    if array.dtype.kind == "f" and array.dtype != keras.config.floatx():
        array = array.astype(keras.config.floatx())
    return array


class IterableSource(HostSource):
    """A generator, any other iterator, or an iterable of batches (a list of batch tuples, an
    object whose ``__iter__`` returns a new iterator each time).

    An iterable is read from a new iterator every epoch. An iterator can be read only once:
    several epochs need ``steps_per_epoch`` (one stream then runs across them), and resuming
    skips the batches already trained, reading them again from the start.
    """

    def __init__(
        self, data: Iterable[Nested], argument: str, class_weight: dict[int, float] | None
    ) -> None:
        self.data = data
        iterator = iter(data)
        self.one_shot = iterator is data
        first = list(itertools.islice(iterator, SPEC_BATCHES))
        self._iterator = iterator
        self._unread: collections.deque[Nested] = collections.deque(first)
        self._read = 0  # batches of the one-shot iterator handed to a stream so far
        self._lock = threading.Lock()
        super().__init__(first, argument, class_weight)
        length = getattr(data, "__len__", None)
        self.steps_per_epoch = None if self.one_shot or length is None else int(length())

    def batches(self, epoch: int, start_step: int) -> Iterator[Nested]:
        if start_step:
            what = "read again from its start" if not self.one_shot else "read on"
            logger.info(
                "tfloop: skipping %d batches of %s (%s) to resume", start_step, self.argument, what
            )
        if not self.one_shot:
            return itertools.islice(iter(self.data), start_step, None)
        with self._lock:
            if start_step < self._read:
                raise DataError(
                    f"{self.argument} is a generator (an iterator), which can be read only once, "
                    f"and it was already read past batch {start_step}; it cannot go back. Pass "
                    "a new generator (a new process does), or a re-iterable input: a list of "
                    "batches, an object whose __iter__ returns a new iterator, or a "
                    "keras.utils.PyDataset."
                )
        return self._read_on(start_step)

    def _read_on(self, start_step: int) -> Iterator[Nested]:
        while True:
            with self._lock:
                batch = self._unread.popleft() if self._unread else next(self._iterator, _END)
                if batch is _END:
                    return
                self._read += 1
                skip = self._read <= start_step
            if not skip:
                yield batch


_END = object()
