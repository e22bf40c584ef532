"""Superbatches and the stream of steps cut from them; the base of every input source."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import tensorflow as tf

from tfloop.data._mixed import MixedSteps
from tfloop.data._reaper import release_later
from tfloop.errors import DataError

__all__ = [
    "AUTO_STEPS_MAX",
    "AUTO_STEPS_PER_EXECUTION",
    "DataSource",
    "Piece",
    "Position",
    "StepStream",
    "batch_size_of",
    "choose_steps_per_execution",
    "pad_steps",
    "shuffled_order",
    "unpack_batch",
]

Nested = Any

# Superbatches are kept under this size; with the default batch of 32 MNIST-sized examples the
# cap allows far more than the chosen number of steps, so it only binds for large inputs.
SUPERBATCH_MEMORY_CAP = 64 * 2**20
AUTO_STEPS_PER_EXECUTION = 64
# Small batches make steps so cheap that the host's ~0.5 ms per execution counts: "auto" doubles
# K from 64 up to AUTO_STEPS_MAX while the superbatch stays under SMALL_SUPERBATCH. The linear
# workload (batch 4) ran ~11x faster at 1024 than at 64, the mlp (batch 32 x 784) 5% faster at
# 128; a larger superbatch costs memory (and cache) for little more.
SMALL_SUPERBATCH = 16 * 2**20
AUTO_STEPS_MAX = 1024


def choose_steps_per_execution(
    setting: int | str, bytes_per_batch: int, epoch_steps: int | None
) -> int:
    """``K``, the batches per compiled execution, for ``steps_per_execution=setting``.

    ``"auto"`` starts at 64 and doubles up to 1024 while the superbatch stays under 16 MiB,
    never past the steps of an epoch, and always under 64 MiB.

    Examples:
        >>> choose_steps_per_execution("auto", 32 * 784 * 4 + 32 * 40, None)
        128
        >>> choose_steps_per_execution("auto", 4 * 8, 20), choose_steps_per_execution(16, 1, 5)
        (20, 16)
    """
    if setting != "auto":
        return int(setting)
    steps = AUTO_STEPS_PER_EXECUTION
    batch_bytes = max(1, bytes_per_batch)
    while steps < AUTO_STEPS_MAX and 2 * steps * batch_bytes <= SMALL_SUPERBATCH:
        steps *= 2
    if epoch_steps is not None:
        steps = min(steps, epoch_steps)
    return max(1, min(steps, SUPERBATCH_MEMORY_CAP // batch_bytes))


def shuffled_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> tf.Tensor:
    """``range(n)`` in the order of ``epoch``: a permutation seeded by ``(seed, epoch)``, the same
    on every machine and in every process (``shuffle=False``: unchanged).

    Examples:
        >>> sorted(shuffled_order(5, seed=0, epoch=1).numpy().tolist())
        [0, 1, 2, 3, 4]
        >>> shuffled_order(4, 0, 0, shuffle=False).numpy().tolist()
        [0, 1, 2, 3]
    """
    indices = tf.range(n, dtype=tf.int64)
    if not shuffle:
        return indices
    return tf.random.experimental.stateless_shuffle(
        indices, seed=tf.constant([seed, epoch], tf.int64)
    )


@dataclasses.dataclass(frozen=True)
class Piece:
    """A superbatch: nested tensors shaped ``[K, batch, ...]``, of which ``steps`` are real;
    or a :class:`~tfloop.data._mixed.MixedSteps` when its batches differ in shape."""

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

    def __del__(self) -> None:
        # The iterator goes last on another thread: released here, it could stall training.
        with contextlib.suppress(Exception):  # at interpreter exit: nothing left to protect
            release_later(self.iterator, self._groups)

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
        if isinstance(piece.data, MixedSteps):
            return piece.data.step(self._offset)
        return tf.nest.map_structure(lambda t: t[self._offset], piece.data)

    def first_batch(self) -> Nested:
        """The next batch, without consuming it; a DataError if the stream has none."""
        batch = self.peek_batch()
        if batch is None:
            raise DataError("data yielded no batches; pass a non-empty dataset.")
        return batch

    def next_chunk(self, limit: int) -> tuple[Nested, int, int] | None:
        piece = self._current()
        if piece is None:
            return None
        start = self._offset
        stop = min(piece.steps, start + max(1, limit))
        self._offset = stop
        return piece.data, start, stop

    def chunks(self, limit: int, steps: int | None = None) -> Iterator[tuple[Nested, int, int]]:
        """``next_chunk(limit)`` until the stream ends or ``steps`` steps were handed out."""
        done = 0
        while steps is None or done < steps:
            chunk = self.next_chunk(limit if steps is None else min(limit, steps - done))
            if chunk is None:
                return
            done += chunk[2] - chunk[1]
            yield chunk

    def leftover(self) -> list[Nested]:
        """The steps already pulled from the iterator but not run yet, unpadded.

        A checkpoint saves them next to the iterator state, so a resume continues at exactly
        the next step even when a save lands in the middle of a superbatch.
        """
        runs: list[Nested] = []
        for index, piece in enumerate(self._queue):
            first = self._offset if index == 0 else 0
            if first >= piece.steps:
                continue
            if isinstance(piece.data, MixedSteps):
                runs.extend(run for _, _, run in piece.data.runs(first, piece.steps))
            else:
                runs.append(tf.nest.map_structure(lambda t: t[first : piece.steps], piece.data))  # noqa: B023
        return runs

    def pop_piece(self) -> Piece:
        """Takes the next whole piece off the stream (its remaining steps all count as run)."""
        self._current()
        self._offset = 0
        return self._queue.popleft()

    def finish(self) -> None:
        """Marks the underlying iterator as used up (its remaining steps come from a restore)."""
        self._groups = iter(())

    def restore_leftover(self, runs: list[Nested]) -> None:
        """Puts saved :meth:`leftover` runs back in front of the stream."""
        self._queue.clear()
        self._offset = 0
        self._queue.extend(pad_steps(run, self.steps_per_execution) for run in runs)


@dataclasses.dataclass(frozen=True)
class Position:
    """Where a run was in its input when a checkpoint was saved.

    ``epoch`` and ``batch`` (micro-batches done in it) locate the next step; ``iterator`` says
    whether the ``tf.data`` iterator's own state was saved (then it, plus the leftover batches,
    is the position), ``exhausted`` that it had run out (its remaining steps were all pulled).
    ``seeds_drawn`` and ``stream_seeds`` count the shuffle seeds a dataset had drawn, in all and
    when the current stream was made, so a resumed run draws the same ones (see
    :meth:`DataSource.resume`). ``per_worker``: each worker of a cluster reads its own shard, so
    each saves its own iterator state and leftover batches (the rest is the same on every
    worker).
    """

    epoch: int
    batch: int
    iterator: bool = False
    exhausted: bool = False
    seeds_drawn: int = 0
    stream_seeds: int | None = None
    per_worker: bool = False

    @property
    def restores_iterator(self) -> bool:
        """Whether resuming restores a saved iterator state (not skip by count)."""
        return self.iterator and not self.exhausted


class DataSource:
    """An input as the loops need it: streams of superbatches, their step counts, and the
    position API a checkpoint resumes with."""

    steps_per_epoch: int | None  # batches in one pass over the data; None if unknown or infinite
    batch_size: int | None
    steps_per_execution: int
    steps: int | None = None  # the batches the caller takes (None: all of them)
    infinite: bool = False
    indexed: bool = False
    """The position is a batch index into a finite input that tfloop orders itself by seed and
    epoch (in-memory arrays, a ``keras.utils.PyDataset``): one pass over the data per epoch
    whatever ``steps_per_epoch`` says."""
    per_worker: bool = False
    """Under ``MultiWorkerMirroredStrategy``: each batch is this worker's share of the global
    batch (split among its local replicas), not the global batch every worker holds."""
    unsaveable_iterator: str | None = None
    """Why a checkpoint cannot save this input's iterator (the ``tf.data`` service), or None."""

    bytes_per_batch: int

    @property
    def resumes_by_count(self) -> bool:
        """Whether a resume finds its place by counting batches: the streams have no iterator
        whose state a checkpoint could save (arrays and PyDatasets are indexed; a generator
        is run again from its start and the batches already trained are skipped).

        A ``tf.data`` dataset is the one input whose iterator state is saved instead.
        """
        return self.indexed

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

    def reseed(self, seed: int) -> None:
        """Uses ``seed`` for the shuffle from now on (arrays; a dataset shuffles itself)."""

    def close(self) -> None:
        """Ends what the last stream left running: a PyDataset's workers and its epoch (which
        gets its ``on_epoch_end``). Dropping the stream does the same; no-op for other inputs."""

    def stream(self, epoch: int, start_step: int = 0) -> StepStream:
        """The steps of one pass over the data, from ``start_step`` on (``epoch`` seeds the
        shuffle of arrays)."""
        raise NotImplementedError

    def epoch(self, epoch: int) -> Iterator[Piece]:
        """The pieces of one whole pass over the data."""
        stream = self.stream(epoch)
        while stream.has_next():
            yield stream.pop_piece()

    # ------------------------------------------------------------------ position and resume

    def first_stream(self, epoch: int) -> StepStream:
        """The stream a run that restores nothing starts with.

        One shuffle seed is drawn and dropped up front: a restore draws one more than an
        uninterrupted run, and this is the one a restored run leaves out (:meth:`resume`).
        """
        self.draw_seeds_until(1)
        return self.stream(epoch, 0)

    def resume(
        self, position: Position, *, persistent: bool, steps_per_epoch: int | None
    ) -> StepStream:
        """The stream to continue from ``position`` (then a checkpoint restores into it).

        Puts a dataset's shuffle-seed sequence where the uninterrupted run had it: restoring
        the iterator draws one seed and making it another; otherwise, draw up to where the
        stream was made (at an epoch end: where the next epoch's stream is made).
        ``persistent``: one iterator runs across epochs (a dataset with ``steps_per_epoch``):
        its saved state is the position, or without it skip by count from the start.
        """
        drawn, at_creation = position.seeds_drawn, position.stream_seeds
        if position.restores_iterator:
            self.draw_seeds_until(drawn - 2)
        else:
            self.draw_seeds_until(drawn if at_creation is None else at_creation - 1)
        if persistent:
            skip = position.epoch * (steps_per_epoch or 0) + position.batch
            stream = self.stream(0, 0 if position.iterator else skip)
        elif position.iterator:
            stream = self.stream(position.epoch, 0)
        else:
            stream = self.stream(position.epoch, position.batch)
        if position.restores_iterator:
            stream.has_next()  # pull now, so the restore resets what the pull consumed
        else:
            self.draw_seeds_until(drawn)
        return stream

    def restored(self, position: Position) -> None:
        """Called once a checkpoint at ``position`` was restored into the stream."""
        if position.restores_iterator:
            self.restored_seeds()

    def position(self, epoch: int, batch: int, stream: StepStream | None) -> Position:
        """The position to save: ``batch`` micro-batches done in ``epoch``, reading ``stream``."""
        return Position(
            epoch=epoch,
            batch=batch,
            seeds_drawn=self.seeds_drawn,
            stream_seeds=None if stream is None else stream.seeds_at_creation,
            per_worker=self.per_worker,
        )


def pad_steps(data: Nested, k: int) -> Piece:
    """``data`` (``[steps, batch, ...]``) padded with zero steps up to ``k``: a tail reuses the
    trace of a full superbatch; the padded steps are never run."""
    steps = int(tf.nest.flatten(data)[0].shape[0])
    if steps == k:
        return Piece(data, steps)
    padded = tf.nest.map_structure(
        lambda t: tf.pad(t, [[0, k - steps]] + [[0, 0]] * (t.shape.rank - 1)), data
    )
    return Piece(padded, steps)
