"""Turns user input into *superbatches* for the compiled loop.

The compiled loop takes ``K`` batches per call, stacked along a new leading "step" axis, so one
iterator call feeds ``K`` steps. This module makes those superbatches from

* in-memory NumPy arrays or tensors (a tuple ``(x, y)`` / ``(x, y, sample_weight)``, dicts
  allowed inside): tfloop owns batching, a seeded per-epoch shuffle and prefetch;
* a batched ``tf.data.Dataset`` (``tfds.load(..., as_supervised=True).batch(n)`` included).

Every piece handed to the loop has exactly ``K`` step slots, of which the first ``steps`` are
real. The tail of an epoch (fewer than ``K`` batches left) is padded up to ``K`` so that it reuses
the compiled function of the full superbatch; only a batch with a different shape (the last,
partial batch) gets a trace of its own, cached across epochs.

Examples:
    >>> import numpy as np
    >>> from tfloop.data import adapt
    >>> source = adapt((np.zeros((100, 3)), np.zeros(100)), batch_size=32,
    ...                steps_per_execution=2, shuffle=False, seed=0)
    >>> source.steps_per_epoch
    4
    >>> [(tuple(p.data[0].shape), p.steps) for p in source.epoch(0)]
    [((2, 32, 3), 2), ((2, 32, 3), 1), ((2, 4, 3), 1)]
    >>> stream = source.stream(0, start_step=3)  # resume at the fourth batch
    >>> stream.peek_batch()[0].shape
    TensorShape([4, 3])
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tfloop.errors import ConfigError, DataError

logger = logging.getLogger("tfloop")

__all__ = ["DataSource", "Piece", "StepStream", "adapt", "batch_size_of", "unpack_batch"]

Nested = Any
DEFAULT_BATCH_SIZE = 32


@dataclasses.dataclass(frozen=True)
class Piece:
    """A superbatch: nested tensors shaped ``[K, batch, ...]``, of which ``steps`` are real."""

    data: Nested
    steps: int


def unpack_batch(batch: Nested) -> tuple[Nested, Nested, Nested]:
    """Splits one batch into ``(x, y, sample_weight)``; missing parts are ``None``.

    A tuple of 1, 2 or 3 elements is ``(x,)``, ``(x, y)`` or ``(x, y, sample_weight)``; anything
    else is ``x`` alone (as in Keras).

    Examples:
        >>> unpack_batch((1, 2))
        (1, 2, None)
    """
    if isinstance(batch, tuple) and 1 <= len(batch) <= 3:
        return (*batch, *(None,) * (3 - len(batch)))
    return batch, None, None


def batch_size_of(batch: Nested) -> tf.Tensor:
    """The number of examples in ``batch`` (first dimension of its first tensor), as float32."""
    first = tf.nest.flatten(batch)[0]
    return tf.cast(tf.shape(first)[0], tf.float32)


class StepStream:
    """Hands out runs of consecutive steps from a stream of pieces.

    ``next_chunk(limit)`` returns ``(data, start, stop)``: run steps ``start..stop-1`` of
    ``data``, at most ``limit`` of them. A piece can be consumed over several chunks, so a step
    budget (``steps_per_epoch``, a checkpoint every n updates) lands exactly without reslicing.

    ``groups`` yields the pieces cut from one iterator element at a time; ``iterator`` is that
    ``tf.data`` iterator (saved in checkpoints), or ``None`` when the position is a batch index.
    """

    def __init__(
        self,
        groups: Iterator[list[Piece]],
        steps_per_execution: int,
        iterator: Any = None,
    ) -> None:
        self._groups = groups
        self._queue: collections.deque[Piece] = collections.deque()
        self._offset = 0
        self.steps_per_execution = steps_per_execution
        self.iterator = iterator
        self.exhausted = False
        self.seeds_at_creation = 0  # shuffle seeds drawn from the dataset once it was made

    def _current(self) -> Piece | None:
        while not self._queue or self._offset >= self._queue[0].steps:
            if self._queue:
                self._queue.popleft()
                self._offset = 0
                continue
            try:
                self._queue.extend(next(self._groups))
            except StopIteration:
                self.exhausted = True
                return None
        return self._queue[0]

    def has_next(self) -> bool:
        """Whether another step is left (pulls the next piece if needed)."""
        return self._current() is not None

    def peek_batch(self) -> Nested | None:
        """The next batch, without consuming it (``None`` if the stream is empty)."""
        piece = self._current()
        if piece is None:
            return None
        return tf.nest.map_structure(lambda t: t[self._offset], piece.data)

    def next_chunk(self, limit: int) -> tuple[Nested, int, int] | None:
        piece = self._current()
        if piece is None:
            return None
        start = self._offset
        stop = min(piece.steps, start + max(1, limit))
        self._offset = stop
        return piece.data, start, stop

    def leftover(self) -> list[Nested]:
        """The steps already pulled from the iterator but not run yet, unpadded.

        A checkpoint saves them next to the iterator state, so a resume continues at exactly
        the next step even when a save lands in the middle of a superbatch.
        """
        runs = []
        for index, piece in enumerate(self._queue):
            first = self._offset if index == 0 else 0
            if first < piece.steps:
                runs.append(tf.nest.map_structure(lambda t: t[first : piece.steps], piece.data))  # noqa: B023
        return runs

    def finish(self) -> None:
        """Marks the underlying iterator as used up (its remaining steps come from a restore)."""
        self._groups = iter(())

    def restore_leftover(self, runs: list[Nested]) -> None:
        """Puts saved :meth:`leftover` runs back in front of the stream."""
        self._queue.clear()
        self._offset = 0
        self._queue.extend(_pad_steps(run, self.steps_per_execution) for run in runs)


class DataSource:
    """What the Trainer needs from its input: the epochs' pieces and their step counts."""

    steps_per_epoch: int | None  # batches in one pass over the data; None if unknown or infinite
    batch_size: int | None
    steps_per_execution: int
    infinite: bool = False

    bytes_per_batch: int

    @property
    def seeds_drawn(self) -> int:
        """Iterators made so far from a dataset (each drew a shuffle seed); arrays need none."""
        return 0

    def example_batch(self) -> Nested:
        """A batch with the data's structure, shapes and dtypes, made without an iterator."""
        raise NotImplementedError

    def draw_seeds_until(self, count: int) -> None:
        """Advances a dataset's shuffle-seed sequence (no-op for arrays)."""

    def restored_seeds(self) -> None:
        """Accounts for the seed a restore draws (no-op for arrays)."""

    def stream(self, epoch: int, start_step: int = 0) -> StepStream:
        """The steps of one pass over the data, from ``start_step`` on (``epoch`` seeds the
        shuffle of arrays)."""
        raise NotImplementedError

    def epoch(self, epoch: int) -> Iterator[Piece]:
        """The pieces of one whole pass over the data."""
        stream = self.stream(epoch)
        while stream.has_next():
            yield stream._queue.popleft()


def adapt(
    data: Any,
    *,
    batch_size: int | None = None,
    steps_per_execution: int = 64,
    shuffle: bool = True,
    seed: int = 0,
    argument: str = "data",
) -> DataSource:
    """Validates ``data`` and wraps it in a :class:`DataSource` (see the module docstring)."""
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
    ):
        raise ConfigError(f"batch_size must be an int >= 1, got {batch_size!r}.")
    if isinstance(data, tf.data.Dataset):
        if batch_size is not None:
            raise ConfigError(
                f"batch_size={batch_size} was given with a tf.data.Dataset as {argument}; a "
                "dataset is batched by its own .batch(n). Drop batch_size, or pass arrays."
            )
        return _DatasetSource(data, steps_per_execution, argument)
    if data is None:
        raise DataError(f"{argument} is None: pass (x, y) arrays or a batched tf.data.Dataset.")
    arrays = _standardize_arrays(data, argument)
    return _ArraySource(
        arrays,
        batch_size or DEFAULT_BATCH_SIZE,
        steps_per_execution,
        shuffle,
        seed,
        argument,
        pipelines=_TENSORS.pipelines_for(arrays),
    )


# --------------------------------------------------------------------------- in-memory arrays


def _standardize_arrays(data: Any, argument: str) -> Nested:
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
            tensor = _TENSORS.convert(array)
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
    _check_lengths(arrays, argument)
    return arrays


def _check_lengths(arrays: Nested, argument: str) -> None:
    named = _named_leaves(arrays)
    for name, tensor in named:
        if tensor.shape.rank == 0:
            raise DataError(
                f"{argument}: {name} is a scalar; every array needs a leading example axis."
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


class _TensorCache:
    """The tensors of read-only NumPy arrays, converted once and reused by every later call.

    Converting an array to a tensor copies it: tens to hundreds of milliseconds per 100 MB, paid
    on every ``fit`` / ``evaluate`` call. An array that cannot change is converted once instead,
    and kept while the array is alive: one that is read-only (``flags.writeable`` False, and so
    is every array it is a view of), C-contiguous and already of the dtype tfloop would give it
    (floats in ``keras.config.floatx()``). The entry is keyed on the array's identity and
    checked against its memory address, shape, strides and dtype, so a new array that reuses a
    freed array's id is never mistaken for it; it is dropped when the array is garbage-collected.
    Writable arrays are converted on every call, as they may have changed in place. (A view that
    was made writable before its base was made read-only can still change it; such an array
    must be passed writable.)

    The entry of an input's first array also keeps the epoch pipelines made over those tensors
    (see :class:`_EpochPipeline`), so a later call with the same arrays reuses them as well.
    """

    MAX_PIPELINES = 2  # per cached array: a fit's training and validation pipelines, say

    def __init__(self) -> None:
        self._entries: dict[int, _CacheEntry] = {}
        self._by_tensor: dict[int, _CacheEntry] = {}
        # Reentrant: a garbage collection inside a locked region may run a weakref callback.
        self._lock = threading.RLock()

    def convert(self, array: np.ndarray) -> tf.Tensor:
        """``tf.convert_to_tensor(array)``, from the cache when the array cannot change."""
        if not _is_immutable(array):
            return tf.convert_to_tensor(array)
        signature = _array_signature(array)
        with self._lock:
            entry = self._entries.get(id(array))
            if entry is not None and entry.ref() is array and entry.signature == signature:
                return entry.tensor
        tensor = tf.convert_to_tensor(array)
        key = id(array)
        ref = weakref.ref(array, lambda r: self._drop(key, r))
        with self._lock:
            self._drop_locked(key, None)
            entry = _CacheEntry(ref, signature, tensor)
            self._entries[key] = entry
            self._by_tensor[id(tensor)] = entry
        return tensor

    def pipelines_for(self, arrays: Nested) -> dict[Any, _EpochPipeline]:
        """Where the epoch pipelines over ``arrays`` are kept: shared across calls when every
        tensor came from this cache, else a new dict (reused across the epochs of one call)."""
        leaves = tf.nest.flatten(arrays)
        with self._lock:
            entries = [self._by_tensor.get(id(t)) for t in leaves]
            if any(e is None or e.tensor is not t for e, t in zip(entries, leaves, strict=True)):
                return {}
            first = entries[0]
            assert first is not None
            key = (tf.nest.map_structure(lambda _: None, arrays), tuple(id(t) for t in leaves))
            if key not in first.pipelines:
                while len(first.pipelines) >= self.MAX_PIPELINES:
                    first.pipelines.pop(next(iter(first.pipelines)))
                first.pipelines[key] = {}
            return first.pipelines[key]

    def _drop(self, key: int, ref: weakref.ref[np.ndarray]) -> None:
        with self._lock:
            self._drop_locked(key, ref)

    def _drop_locked(self, key: int, ref: weakref.ref[np.ndarray] | None) -> None:
        entry = self._entries.get(key)
        if entry is not None and (ref is None or entry.ref is ref):
            del self._entries[key]
            self._by_tensor.pop(id(entry.tensor), None)

    def clear(self) -> None:
        """Forgets every cached tensor and pipeline."""
        with self._lock:
            self._entries.clear()
            self._by_tensor.clear()

    def __len__(self) -> int:
        return len(self._entries)


@dataclasses.dataclass
class _CacheEntry:
    ref: weakref.ref[np.ndarray]
    signature: tuple[Any, ...]
    tensor: tf.Tensor
    pipelines: dict[Any, dict[Any, _EpochPipeline]] = dataclasses.field(default_factory=dict)


def _is_immutable(array: np.ndarray) -> bool:
    """Read-only all the way down its bases, C-contiguous, and of its final dtype."""
    if not array.flags.c_contiguous:
        return False
    if array.dtype.kind == "f" and array.dtype != np.dtype(keras.config.floatx()):
        return False
    if array.dtype.kind not in "biuf":
        return False
    node: Any = array
    while isinstance(node, np.ndarray):
        if node.flags.writeable:
            return False
        node = node.base
    if node is None:
        return True
    try:  # the memory's owner (bytes, an mmap, ...) must be read-only too
        return bool(memoryview(node).readonly)
    except TypeError:
        return False


def _array_signature(array: np.ndarray) -> tuple[Any, ...]:
    return (array.ctypes.data, array.shape, array.strides, array.dtype.str)


_TENSORS = _TensorCache()


class _ArraySource(DataSource):
    def __init__(
        self,
        arrays: Nested,
        batch_size: int,
        steps_per_execution: int,
        shuffle: bool,
        seed: int,
        argument: str,
        pipelines: dict[Any, _EpochPipeline] | None = None,
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
        # Whole epochs come from an _EpochPipeline, per (K, seed, shuffle): kept across epochs,
        # and across calls for cached arrays (see _TensorCache).
        self._pipelines = {} if pipelines is None else pipelines

    def example_batch(self) -> Nested:
        return tf.nest.map_structure(lambda t: t[: self.examples_per_batch], self.arrays)

    def order(self, epoch: int) -> tf.Tensor:
        """The example order of ``epoch``: a permutation seeded by ``(seed, epoch)``."""
        indices = tf.range(self.num_examples, dtype=tf.int64)
        if not self.shuffle:
            return indices
        return tf.random.experimental.stateless_shuffle(
            indices, seed=tf.constant([self.seed, epoch], tf.int64)
        )

    def stream(self, epoch: int, start_step: int = 0) -> StepStream:
        # A whole epoch comes from the long-lived pipeline; a resumed one is made on its own.
        pieces = self._pieces(epoch, start_step) if start_step else self._pipeline().epoch(epoch)
        return StepStream(([piece] for piece in pieces), self.steps_per_execution)

    def _pipeline(self) -> _EpochPipeline:
        key = (self.steps_per_execution, self.examples_per_batch, self.shuffle, self.seed)
        with _PIPELINES_LOCK:
            pipeline = self._pipelines.get(key)
            if pipeline is None:
                while len(self._pipelines) >= _TensorCache.MAX_PIPELINES:
                    self._pipelines.pop(next(iter(self._pipelines)))
                pipeline = self._pipelines[key] = _EpochPipeline(self)
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
        dataset = dataset.prefetch(2).with_options(_array_pipeline_options())
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


class _EpochPipeline:
    """One ``tf.data`` pipeline that makes the pieces of every epoch, from a given epoch on.

    It yields exactly what ``_ArraySource._pieces(epoch, 0)`` does, epoch after epoch: the same
    ``(seed, epoch)`` shuffle, the same index rows and gathers. Built and started once, it saves
    each epoch the pipeline's construction, the tracing of its functions and the start of its
    iterator (about 20 ms), and the next epoch's first superbatch is prefetched while the last
    one trains. A stream that reads a whole epoch hands the iterator back, positioned at the
    next epoch; a stream for any other epoch, or one started while the iterator is out (a
    stream left unfinished, a second stream at once), gets a new iterator, so every stream sees
    exactly the pieces of its own epoch.
    """

    def __init__(self, source: _ArraySource) -> None:
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
            # The same index rows as _ArraySource._pieces(epoch, 0), one per piece.
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
        return dataset.prefetch(2).with_options(_array_pipeline_options())


_PIPELINES_LOCK = threading.Lock()


def _array_pipeline_options() -> tf.data.Options:
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


# ----------------------------------------------------------------------------- tf.data input


class _DatasetSource(DataSource):
    def __init__(self, dataset: tf.data.Dataset, steps_per_execution: int, argument: str) -> None:
        self.dataset = dataset
        self.argument = argument
        self.steps_per_execution = steps_per_execution
        cardinality = int(dataset.cardinality())
        if cardinality == 0:
            raise DataError(f"{argument} is an empty tf.data.Dataset (0 batches).")
        self.infinite = cardinality == tf.data.INFINITE_CARDINALITY
        self.steps_per_epoch = cardinality if cardinality > 0 else None
        self._check_element_spec()
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

    def _check_element_spec(self) -> None:
        for leaf in tf.nest.flatten(self.dataset.element_spec):
            if not isinstance(leaf, tf.TensorSpec):
                raise DataError(
                    f"{self.argument} yields a {type(leaf).__name__}; tfloop takes dense "
                    "tensors. Pad ragged or sparse features (e.g. .padded_batch) first."
                )
            if leaf.shape.rank == 0:
                raise DataError(
                    f"{self.argument} yields scalars, so it looks unbatched; call "
                    ".batch(batch_size) on the dataset before passing it."
                )

    def stream(self, epoch: int, start_step: int = 0) -> StepStream:
        k = self.steps_per_execution
        self._iterators_made += 1
        if self.uniform:
            iterator = iter(self.dataset.batch(k).prefetch(2))
            groups: Iterator[list[Piece]] = ([_pad_steps(data, k)] for data in iterator)
        else:
            # Batches may differ in shape (the last, partial batch; bucketed sequence lengths).
            # Stack them padded, with each step's true shapes, and cut runs of equal shape back
            # out on the host: once per superbatch, not per step.
            def with_shapes(*element: Any) -> Any:
                element = element[0] if len(element) == 1 else element
                shapes = tuple(tf.shape(t) for t in tf.nest.flatten(element))
                return element, shapes

            iterator = iter(self.dataset.map(with_shapes).padded_batch(k).prefetch(2))
            groups = (_split_runs(data, shapes, k) for data, shapes in iterator)
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


def _split_runs(data: Nested, shapes: Any, k: int) -> list[Piece]:
    rows = np.concatenate([s.numpy() for s in shapes], axis=1)  # one row of shapes per step
    pieces = []
    start = 0
    while start < len(rows):
        stop = start + 1
        while stop < len(rows) and np.array_equal(rows[stop], rows[start]):
            stop += 1
        run = _slice_run(data, start, stop, [s[start].numpy() for s in shapes])
        pieces.append(_pad_steps(run, k))
        start = stop
    return pieces


def _slice_run(data: Nested, start: int, stop: int, shapes: list[np.ndarray]) -> Nested:
    leaves = tf.nest.flatten(data)
    cut = [
        leaf[start:stop][tuple([slice(None)] + [slice(0, int(d)) for d in shape])]
        for leaf, shape in zip(leaves, shapes, strict=False)
    ]
    return tf.nest.pack_sequence_as(data, cut)


def _pad_steps(data: Nested, k: int) -> Piece:
    steps = int(tf.nest.flatten(data)[0].shape[0])
    if steps == k:
        return Piece(data, steps)
    padded = tf.nest.map_structure(
        lambda t: tf.pad(t, [[0, k - steps]] + [[0, 0]] * (t.shape.rank - 1)), data
    )
    return Piece(padded, steps)
