"""Per-worker input in lockstep: every worker cuts its superbatches alike.

Under ``MultiWorkerMirroredStrategy`` with per-worker input each worker reads its own shard, so
its batches can differ from the other workers' in number and in shape (a ragged last batch, a
bucketed length, a file shorter than the others). But every compiled call holds collectives
(each step's gradient all-reduce), and workers that make different calls, or calls of different
step counts, hang or silently mix their reductions. So before each superbatch the workers
exchange a small row of ints (one all-gather, a few milliseconds on a local network):

    [read ok, steps in this superbatch, fingerprint of the first batch, run starts (K flags)]

and every worker cuts its superbatch at the union of all workers' run starts (where a batch's
shape changes), so all of them make the same calls with the same step counts.

Uneven shards (a worker out of batches while another still has some: files of different
sizes, a shard one batch shorter) go on in step: a worker with fewer steps than the others in a
superbatch adds *empty* steps (batches of 0 examples), cut where its real steps end, until
every worker is out. An empty step weighs nothing: the update divides the gradients' weighted
sum by the global example count, metrics add sums and counts, so training and evaluation are
those of one device on the global batches the workers' batches make together.

The same row detects, on every worker at once (so no worker is left waiting in a collective):

- a worker whose shard cannot be read (FILE sharding with fewer files than workers, ...);
- overlapping shards: every worker read the same first batch (a dataset function that ignores
  its ``InputContext``).
"""

from __future__ import annotations

import functools
import itertools
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from tfloop import _distribute
from tfloop._validate import first_line
from tfloop.data._datasets import DatasetSource
from tfloop.data._source import Piece, pad_steps
from tfloop.errors import DataError

__all__ = ["empty_steps", "lockstep", "per_worker_source"]

Nested = Any
Exchange = Callable[[Sequence[int]], np.ndarray]
EmptySteps = Callable[[int], Piece]  # n steps of empty batches, as a piece of K steps

_OK, _STEPS, _FINGERPRINT, _CUTS = 0, 1, 2, 3  # the columns of a worker's row


def per_worker_source(
    dataset: tf.data.Dataset, argument: str, strategy: tf.distribute.Strategy, infinite: bool
) -> DatasetSource:
    """A source of this worker's batches (its share of each global batch), in lockstep with the
    other workers. ``infinite``: whether the user's dataset repeats forever (its cardinality
    is lost in the per-worker rewrite)."""
    source = DatasetSource(dataset, 1, argument)
    source.per_worker = True
    source.infinite = infinite
    # Workers may hold different numbers of batches; K must not depend on it (it sets how
    # superbatches are cut, which every worker must do alike).
    source.steps_per_epoch = None
    layout = _distribute.input_layout(strategy)
    exchange = functools.partial(_distribute.all_gather, strategy)

    def synchronize(groups: Iterator[list[Piece]]) -> Iterator[list[Piece]]:
        k = source.steps_per_execution
        empty = empty_steps(dataset.element_spec, k)
        return lockstep(groups, k, exchange, layout, argument, empty)

    source.synchronize = synchronize
    return source


def empty_steps(spec: Nested, k: int) -> EmptySteps:
    """Makes ``n`` steps of empty batches of ``spec`` (0 examples; a dimension the spec leaves
    unknown has size 1), padded to ``K`` steps."""

    def make(steps: int) -> Piece:
        def zeros(leaf: tf.TensorSpec) -> tf.Tensor:
            return tf.zeros([steps, 0, *(d or 1 for d in leaf.shape[1:])], leaf.dtype)

        return pad_steps(tf.nest.map_structure(zeros, spec), k)

    return make


def lockstep(
    groups: Iterator[list[Piece]],
    k: int,
    exchange: Exchange,
    layout: _distribute.InputLayout,
    argument: str = "data",
    empty: EmptySteps | None = None,
) -> Iterator[list[Piece]]:
    """``groups`` (the pieces of one superbatch at a time), cut alike on every worker.

    ``exchange(row)`` gathers every replica's row (a collective); ``layout`` says how many
    replicas each worker has, to name workers in errors; ``empty(n)`` makes the ``n`` empty
    steps a worker adds when the others hold more (None: uneven shards are a DataError).
    """
    first = True
    while True:
        error: tf.errors.OpError | None = None
        try:
            local = next(groups)
        except StopIteration:
            local = []
        except tf.errors.OpError as raised:  # this worker's shard cannot be read
            local, error = [], raised
        row = _row(local, k, fingerprint=first)
        row[_OK] = int(error is None)
        table = exchange(row)
        _check(table, error, first, layout, argument, uneven=empty is not None)
        steps = table[:, _STEPS]
        most = int(steps.max())
        if most == 0:
            return
        first = False
        starts = table[:, _CUTS:].max(axis=0)
        for count in steps.tolist():  # where each worker's real steps end: a run start
            if 0 < count < most:
                starts[count] = 1
        mine = int(row[_STEPS])
        if mine < most:
            assert empty is not None  # else _check raised
            local = [*local, empty(most - mine)]
        yield _cut(local, starts, k)


def _row(local: list[Piece], k: int, fingerprint: bool) -> list[int]:
    starts = [0] * k
    position = 0
    for piece in local[:-1]:
        position += piece.steps
        starts[position] = 1
    steps = position + (local[-1].steps if local else 0)
    mark = _fingerprint(local[0].data) if fingerprint and local else 0
    return [1, steps, mark, *starts]


def _fingerprint(data: Nested) -> int:
    """A checksum of the first batch of a superbatch (0 for an empty batch: not compared)."""
    leaves = [leaf[0].numpy() for leaf in tf.nest.flatten(data)]
    if not leaves or leaves[0].size == 0:
        return 0
    checksum = 0
    for leaf in leaves:
        checksum = zlib.crc32(np.ascontiguousarray(leaf).tobytes(), checksum)
    return checksum + 1


def _workers(rows: np.ndarray, layout: _distribute.InputLayout) -> str:
    """The workers owning ``rows`` (replica rows, ``local_replicas`` per worker)."""
    return ", ".join(str(w) for w in sorted({int(r) // layout.local_replicas for r in rows}))


def _check(
    table: np.ndarray,
    error: tf.errors.OpError | None,
    first: bool,
    layout: _distribute.InputLayout,
    argument: str,
    uneven: bool = True,
) -> None:
    """Raises the same DataError on every worker when the shards cannot go on in lockstep
    (``uneven``: whether uneven shards can, with empty steps)."""
    failed = np.flatnonzero(table[:, _OK] == 0)
    if error is not None:
        raise DataError(
            f"{argument}: reading this worker's shard failed ({first_line(error)}). With "
            "file-based auto-sharding every worker needs files of its own: give the dataset at "
            "least as many files as workers, or shard by data "
            "(tf.data.experimental.AutoShardPolicy.DATA)."
        ) from error
    if failed.size:
        raise DataError(
            f"{argument}: worker(s) {_workers(failed, layout)} could not read their shard (see "
            "their log); every worker stops."
        )
    steps = table[:, _STEPS]
    if not uneven and steps.min() != steps.max():
        short = np.flatnonzero(steps == steps.min())
        raise DataError(
            f"{argument}: the workers' shards are uneven: worker(s) {_workers(short, layout)} "
            f"ran out of batches {int(steps.max() - steps.min())} step(s) before the others. "
            "Every worker must yield the same number of batches per pass (together they make "
            "each global batch). Give every worker the same number of examples (files of equal "
            "size, as many as a multiple of the workers), or repeat the dataset and pass "
            "steps_per_epoch, or shard by data (tf.data.experimental.AutoShardPolicy.DATA)."
        )
    marks = table[:, _FINGERPRINT]
    if first and layout.workers > 1 and marks.min() > 0 and marks.min() == marks.max():
        raise DataError(
            f"{argument}: every worker read the same first batch, so the workers' shards "
            "overlap (each would train on the same examples). A dataset function must shard by "
            "its InputContext: dataset.shard(context.num_input_pipelines, "
            "context.input_pipeline_id)."
        )


def _cut(local: list[Piece], starts: np.ndarray, k: int) -> list[Piece]:
    """``local`` cut at every run start of ``starts`` (the union over the workers)."""
    pieces = []
    offset = 0
    for piece in local:
        cuts = [0] + [c - offset for c in range(offset + 1, offset + piece.steps) if starts[c]]
        cuts.append(piece.steps)
        for start, stop in itertools.pairwise(cuts):
            if start == 0:
                pieces.append(Piece(piece.data, stop))  # the first run needs no copy
            else:
                run = tf.nest.map_structure(lambda t: t[start:stop], piece.data)  # noqa: B023
                pieces.append(pad_steps(run, k))
        offset += piece.steps
    return pieces
