"""In-memory arrays as superbatches: tfloop owns batching and a seeded per-epoch shuffle."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tfloop.data._cache import TENSORS, TensorCache
from tfloop.data._source import DataSource, Piece, StepStream, shuffled_order, unpack_batch
from tfloop.errors import DataError

__all__ = ["ArraySource", "EpochPipeline", "check_lengths", "standardize_arrays"]

Nested = Any


def standardize_arrays(data: Any, argument: str) -> Nested:
    if isinstance(data, list):
        data = tuple(data)
    if isinstance(data, tuple):
        # (x, None) and (x, y, None) mean "no y" / "no sample weight", as in Keras.
        while data and data[-1] is None:
            data = data[:-1]
        if not data:
            raise DataError(f"{argument} is empty: pass (x, y) arrays.")

    def to_tensor(leaf: Any) -> tf.Tensor:
        if isinstance(leaf, tf.Tensor):
            tensor = leaf
        else:
            array = np.asarray(leaf)
            if array.dtype == object:
                raise DataError(
                    f"{argument} holds an array of Python objects (dtype=object); convert it "
                    "to a numeric array first (for ragged data, pad it or use a tf.data.Dataset)."
                )
            tensor = TENSORS.convert(array)
        if tensor.dtype.is_floating and tensor.dtype != keras.config.floatx():
            # Keras casts float64 input to floatx too; it halves memory and matches the model.
            tensor = tf.cast(tensor, keras.config.floatx())
        return tensor

    def fix_lists(node: Any) -> Any:
        if isinstance(node, list):
            return tuple(fix_lists(n) for n in node)
        if isinstance(node, tuple):
            return tuple(fix_lists(n) for n in node)
        if isinstance(node, dict):
            return {k: fix_lists(v) for k, v in node.items()}
        return node

    arrays = tf.nest.map_structure(to_tensor, fix_lists(data))
    check_lengths(arrays, argument)
    return arrays


def check_lengths(arrays: Nested, argument: str) -> None:
    """A DataError unless every array (tensor or NumPy) of ``arrays`` has the same, non-zero
    number of examples along its first axis."""
    named = _named_leaves(arrays)
    for name, tensor in named:
        if len(tensor.shape) == 0:
            hint = (
                " A list of lists is read as one input per inner list: pass np.asarray(...) "
                "to make it one array of examples."
                if name.count("[") > 1
                else ""
            )
            raise DataError(
                f"{argument}: {name} is a scalar; every array needs a leading example axis." + hint
            )
    lengths = {name: int(tensor.shape[0]) for name, tensor in named}
    if len(set(lengths.values())) > 1:
        listed = ", ".join(f"{name} has {n}" for name, n in lengths.items())
        raise DataError(
            f"{argument}: arrays have different numbers of examples ({listed}); pass arrays "
            "of the same length along the first axis."
        )
    if next(iter(lengths.values())) == 0:
        raise DataError(f"{argument} is empty (0 examples); pass at least one example.")


def _named_leaves(data: Nested) -> list[tuple[str, Any]]:
    parts = unpack_batch(data)
    names = ("x", "y", "sample_weight")
    named: list[tuple[str, Any]] = []
    for name, part in zip(names, parts, strict=False):
        if part is None:
            continue
        for path, leaf in _flatten_with_paths(part):
            named.append((name + path, leaf))
    return named


def _flatten_with_paths(node: Any, path: str = "") -> list[tuple[str, Any]]:
    if isinstance(node, dict):
        return [kv for k in sorted(node) for kv in _flatten_with_paths(node[k], f"{path}[{k!r}]")]
    if isinstance(node, (tuple, list)):
        return [kv for i, n in enumerate(node) for kv in _flatten_with_paths(n, f"{path}[{i}]")]
    return [(path, node)]


class ArraySource(DataSource):
    """NumPy arrays or tensors, batched by tfloop and shuffled by ``(seed, epoch)``."""

    indexed = True

    def __init__(
        self,
        arrays: Nested,
        batch_size: int,
        steps_per_execution: int,
        shuffle: bool,
        seed: int,
        argument: str,
        pipelines: dict[Any, EpochPipeline] | None = None,
    ) -> None:
        self.arrays = arrays
        self.num_examples = int(tf.nest.flatten(arrays)[0].shape[0])
        self.examples_per_batch = min(batch_size, self.num_examples)
        self.batch_size = self.examples_per_batch
        self.steps_per_epoch = math.ceil(self.num_examples / self.examples_per_batch)
        self.steps_per_execution = steps_per_execution
        self.shuffle = shuffle
        self.seed = seed
        self.argument = argument
        self.bytes_per_batch = self.examples_per_batch * sum(
            t.dtype.size * int(np.prod(t.shape[1:])) for t in tf.nest.flatten(arrays)
        )
        # from_tensors keeps one reference to the arrays; a captured constant would be copied
        # into the dataset graph (and hit the 2 GB graph limit for large arrays).
        self._arrays_dataset = tf.data.Dataset.from_tensors(arrays).repeat()
        # Whole epochs come from an EpochPipeline, per (K, seed, shuffle): kept across epochs,
        # and across calls for cached arrays (see TensorCache).
        self._pipelines = {} if pipelines is None else pipelines

    def example_batch(self) -> Nested:
        return tf.nest.map_structure(lambda t: t[: self.examples_per_batch], self.arrays)

    def reseed(self, seed: int) -> None:
        self.seed = seed

    def order(self, epoch: int) -> tf.Tensor:
        """The example order of ``epoch``: a permutation seeded by ``(seed, epoch)``."""
        return shuffled_order(self.num_examples, self.seed, epoch, self.shuffle)

    def stream(self, epoch: int, start_step: int = 0) -> StepStream:
        # A whole epoch comes from the long-lived pipeline; a resumed one is made on its own.
        pieces = self._pieces(epoch, start_step) if start_step else self._pipeline().epoch(epoch)
        return StepStream(([piece] for piece in pieces), self.steps_per_execution)

    def _pipeline(self) -> EpochPipeline:
        key = (self.steps_per_execution, self.examples_per_batch, self.shuffle, self.seed)
        with PIPELINES_LOCK:
            pipeline = self._pipelines.get(key)
            if pipeline is None:
                while len(self._pipelines) >= TensorCache.MAX_PIPELINES:
                    self._pipelines.pop(next(iter(self._pipelines)))
                pipeline = self._pipelines[key] = EpochPipeline(self)
        return pipeline

    def _pieces(self, epoch: int, start_step: int) -> Iterator[Piece]:
        k, b, n = self.steps_per_execution, self.examples_per_batch, self.num_examples
        order = self.order(epoch)
        full_batches, partial = divmod(n, b)
        first = min(start_step, full_batches)
        full_pieces, rest = divmod(full_batches - first, k)
        begin = first * b

        rows: list[tf.Tensor] = []
        steps: list[int] = []
        if full_pieces:
            region = order[begin : begin + full_pieces * k * b]
            rows.append(tf.reshape(region, [full_pieces, k * b]))
            steps += [k] * full_pieces
        if rest:
            # Pad the index row with example 0: the padded steps are never run, and the piece
            # keeps the shape of a full superbatch, so it needs no trace of its own.
            tail = order[begin + full_pieces * k * b : full_batches * b]
            rows.append(tf.pad(tail, [[0, (k - rest) * b]])[None])
            steps.append(rest)
        dataset: tf.data.Dataset | None = None
        if rows:
            dataset = self._gather(tf.concat(rows, 0), [k, b])
        if partial and start_step <= full_batches:
            # The partial batch has a shape of its own: one more trace, of [K, partial].
            indices = tf.pad(order[full_batches * b :], [[0, (k - 1) * partial]])[None]
            last = self._gather(indices, [k, partial])
            dataset = last if dataset is None else dataset.concatenate(last)
            steps.append(1)
        if dataset is None:
            return
        dataset = dataset.prefetch(2).with_options(array_pipeline_options())
        for data, count in zip(dataset, steps, strict=False):
            yield Piece(data, count)

    def _gather(self, index_rows: tf.Tensor, leading: list[int]) -> tf.data.Dataset:
        # Plain graph code with no Python control flow: nothing for autograph to convert (and
        # it would warn, as this is called from a generator).
        @tf.autograph.experimental.do_not_convert  # type: ignore[untyped-decorator]
        def gather(indices: tf.Tensor, arrays: Nested) -> Nested:
            return tf.nest.map_structure(
                lambda t: tf.reshape(tf.gather(t, indices), leading + t.shape[1:].as_list()),
                arrays,
            )

        indices = tf.data.Dataset.from_tensor_slices(index_rows)
        # One gather per superbatch takes a few percent of the time its K steps take, so a
        # sequential map, run ahead by the prefetch, keeps up; parallel calls only compete with
        # the training steps for the cores.
        return tf.data.Dataset.zip((indices, self._arrays_dataset)).map(gather)


class EpochPipeline:
    """One ``tf.data`` pipeline that makes the pieces of every epoch, from a given epoch on.

    It yields exactly what ``ArraySource._pieces(epoch, 0)`` does, epoch after epoch: the same
    ``(seed, epoch)`` shuffle, the same index rows and gathers. Built and started once, it saves
    each epoch the pipeline's construction, the tracing of its functions and the start of its
    iterator (about 20 ms), and the next epoch's first superbatch is prefetched while the last
    one trains. A stream that reads a whole epoch hands the iterator back, positioned at the
    next epoch; a stream for any other epoch, or one started while the iterator is out (a
    stream left unfinished, a second stream at once), gets a new iterator, so every stream sees
    exactly the pieces of its own epoch.
    """

    def __init__(self, source: ArraySource) -> None:
        self.steps_per_execution = source.steps_per_execution
        self.examples_per_batch = source.examples_per_batch
        self.num_examples = source.num_examples
        self.shuffle = source.shuffle
        self.seed = source.seed
        self._arrays_dataset = source._arrays_dataset
        self._lock = threading.Lock()
        self._parked: tuple[int, Any] | None = None  # (the epoch it starts, the iterator)
        k, b, n = self.steps_per_execution, self.examples_per_batch, self.num_examples
        full_batches, self._partial = divmod(n, b)
        self._full_pieces, self._rest = divmod(full_batches, k)
        self.steps = [k] * self._full_pieces + [self._rest] * bool(self._rest)
        self.steps += [1] * bool(self._partial)

    def epoch(self, epoch: int) -> Iterator[Piece]:
        """The pieces of one whole epoch."""
        with self._lock:
            parked, self._parked = self._parked, None
        if parked is not None and (parked[0] == epoch or not self.shuffle):
            iterator = parked[1]
        else:
            iterator = iter(self._dataset(epoch))
        last = len(self.steps) - 1
        for index, count in enumerate(self.steps):
            data = next(iterator)
            if index == last:
                with self._lock:
                    self._parked = (epoch + 1, iterator)
            yield Piece(data, count)

    def _dataset(self, first_epoch: int) -> tf.data.Dataset:
        k, b, n = self.steps_per_execution, self.examples_per_batch, self.num_examples
        full_pieces, rest, partial = self._full_pieces, self._rest, self._partial
        full_batches = full_pieces * k + rest
        seed, shuffle = self.seed, self.shuffle

        @tf.autograph.experimental.do_not_convert  # type: ignore[untyped-decorator]
        def index_rows(epoch: tf.Tensor) -> tf.data.Dataset:
            # The same index rows as ArraySource._pieces(epoch, 0), one per piece.
            order = tf.range(n, dtype=tf.int64)
            if shuffle:
                seeds = tf.stack([tf.constant(seed, tf.int64), epoch])
                order = tf.random.experimental.stateless_shuffle(order, seed=seeds)
            rows = []
            if full_pieces:
                region = order[: full_pieces * k * b]
                rows.append(tf.data.Dataset.from_tensor_slices(tf.reshape(region, [-1, k * b])))
            if rest:
                tail = order[full_pieces * k * b : full_batches * b]
                rows.append(tf.data.Dataset.from_tensors(tf.pad(tail, [[0, (k - rest) * b]])))
            if partial:
                last = tf.pad(order[full_batches * b :], [[0, (k - 1) * partial]])
                rows.append(tf.data.Dataset.from_tensors(last))
            dataset = rows[0]
            for more in rows[1:]:
                dataset = dataset.concatenate(more)
            return dataset

        @tf.autograph.experimental.do_not_convert  # type: ignore[untyped-decorator]
        def gather(indices: tf.Tensor, arrays: Nested) -> Nested:
            return tf.nest.map_structure(
                lambda t: tf.reshape(tf.gather(t, indices), [k, -1, *t.shape[1:].as_list()]),
                arrays,
            )

        epochs = tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max)
        indices = epochs.flat_map(index_rows)
        dataset = tf.data.Dataset.zip((indices, self._arrays_dataset)).map(gather)
        return dataset.prefetch(2).with_options(array_pipeline_options())


PIPELINES_LOCK = threading.Lock()


def array_pipeline_options() -> tf.data.Options:
    """Options for the pipeline tfloop builds over in-memory arrays (made once per epoch).

    The pipeline is already what tf.data's static rewrites and autotuning would make of it,
    and both cost time on every epoch: the rewrites serialize the dataset graph, copying the
    whole arrays (tens of ms per 100 MB), and an autotuned iterator could stall for about
    half a second when it is destroyed at the end of the epoch.
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    options.experimental_optimization.apply_default_optimizations = False
    return options
