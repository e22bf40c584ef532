"""``keras.utils.PyDataset`` input, read through Keras's own adapter in tfloop's order.

Keras's ``PyDatasetAdapter`` honours the dataset's ``workers``, ``use_multiprocessing`` and
``max_queue_size`` (its ``OrderedEnqueuer``: a thread or process pool that returns batches in
order) and calls ``on_epoch_begin`` / ``on_epoch_end``. What it does not give is a reproducible,
resumable order: it shuffles with Python's unseeded ``random``. So tfloop hands it a view of the
dataset, :class:`BatchOrder`, whose batch ``j`` is the dataset's batch ``order[j]``: the
permutation seeded by ``(seed, epoch)`` (as for arrays), from the batch a resume starts at. The
adapter itself never shuffles.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from typing import Any

import keras
import numpy as np
from keras.src.trainers.data_adapters.py_dataset_adapter import PyDatasetAdapter

from tfloop.data._host import SPEC_BATCHES, HostSource
from tfloop.data._source import StepStream, shuffled_order
from tfloop.errors import DataError

__all__ = ["BatchOrder", "PyDatasetSource"]

Nested = Any


class BatchOrder(keras.utils.PyDataset):  # type: ignore[misc]
    """The batches of ``dataset`` in a given order: batch ``j`` is ``dataset[order[j]]``, or
    ``dataset[start + j]`` for an infinite one (``order`` None). It has the dataset's workers,
    multiprocessing and queue settings, and passes the epoch events on to it.

    It is a plain object of the dataset and an index array, so ``use_multiprocessing`` works
    as it does for the dataset itself.
    """

    def __init__(self, dataset: Any, order: np.ndarray | None, start: int = 0) -> None:
        super().__init__(
            workers=dataset.workers,
            use_multiprocessing=dataset.use_multiprocessing,
            max_queue_size=dataset.max_queue_size,
        )
        self.dataset = dataset
        self.order = order
        self.start = start

    @property
    def num_batches(self) -> int | None:
        return None if self.order is None else len(self.order)

    def __getitem__(self, index: int) -> Nested:
        if self.order is None:
            return self.dataset[self.start + index]
        return self.dataset[int(self.order[index])]

    def on_epoch_begin(self) -> None:
        self.dataset.on_epoch_begin()

    def on_epoch_end(self) -> None:
        self.dataset.on_epoch_end()


class PyDatasetSource(HostSource):
    """A ``keras.utils.PyDataset``: finite ones are indexed (a position is a batch index, the
    order a permutation seeded by ``(seed, epoch)``); infinite ones (``num_batches`` None) are
    read from batch 0 on, never shuffled, as in Keras."""

    def __init__(
        self,
        dataset: Any,
        *,
        shuffle: bool,
        seed: int,
        steps: int | None,
        argument: str,
        class_weight: dict[int, float] | None,
    ) -> None:
        try:
            count = dataset.num_batches
        except NotImplementedError as error:
            raise DataError(
                f"{argument} is a PyDataset without a length; define __len__ (the number of "
                "batches) or a num_batches property (None for an infinite one)."
            ) from error
        self.dataset = dataset
        self.shuffle, self.seed = shuffle, seed
        self.infinite = count is None
        self.indexed = not self.infinite
        self.steps_per_epoch = None if count is None else int(count)
        if self.steps_per_epoch == 0:
            raise DataError(f"{argument} is an empty PyDataset (0 batches); pass data.")
        # Batches one pass reads: a pass that will stop early reads no further (for a finite
        # dataset), and an infinite one has an epoch every `steps` batches.
        self.epoch_steps = steps if self.infinite else min(count, steps or count)
        # Keras calls on_epoch_end once before the first epoch (EpochIterator.reset()).
        dataset.on_epoch_end()
        peek = SPEC_BATCHES if self.infinite else min(SPEC_BATCHES, count)
        super().__init__([dataset[i] for i in range(peek)], argument, class_weight)
        self._pass: EpochPass | None = None

    def reseed(self, seed: int) -> None:
        self.seed = seed

    def order(self, epoch: int) -> np.ndarray:
        """The batch order of ``epoch``: a permutation seeded by ``(seed, epoch)``."""
        assert self.steps_per_epoch is not None
        order = shuffled_order(self.steps_per_epoch, self.seed, epoch, self.shuffle)
        return np.asarray(order)

    def stream(self, epoch: int, start_step: int = 0) -> StepStream:
        # A pass left unfinished (a stop, a fit interrupted) ends here, before the next begins:
        # its epoch ends, and its workers stop.
        if self._pass is not None:
            self._pass.close()
        if self.infinite:
            view = BatchOrder(self.dataset, None, start_step)
        else:
            view = BatchOrder(self.dataset, self.order(epoch)[start_step : self.epoch_steps])
        self._pass = EpochPass(view, start_step, self.epoch_steps if self.infinite else None)
        stream = super().stream(epoch, start_step)
        # The caller dropping the stream ends the pass too (a fit that stopped mid-epoch).
        weakref.finalize(stream, self._pass.close)
        return stream

    def close(self) -> None:
        if self._pass is not None:
            self._pass.close()

    def batches(self, epoch: int, start_step: int) -> Iterator[Nested]:
        assert self._pass is not None
        return self._pass.batches()


class EpochPass:
    """One read of a PyDataset through Keras's adapter: its workers and its epoch events.

    ``on_epoch_begin`` is called before the first batch is read and ``on_epoch_end`` after
    the last one was (for an infinite dataset: every ``epoch_length`` batches, counted from
    ``position``), or when the pass is closed early. The adapter is new for every pass, so
    batches a stopped pass had queued never leak into the next one.
    """

    def __init__(self, view: BatchOrder, position: int, epoch_length: int | None) -> None:
        self.view = view
        self.adapter = PyDatasetAdapter(view, shuffle=False)
        self.position = position
        self.epoch_length = epoch_length
        self._lock = threading.Lock()
        self._open = self._closed = False

    def batches(self) -> Iterator[Nested]:
        with self._lock:
            if self._closed:
                return
            self.adapter.on_epoch_begin()
            self._open = True
        try:
            if self.view.num_batches == 0:
                return  # a resume at the end of an epoch (the enqueuer would wait forever)
            for batch in self.adapter.get_numpy_iterator():
                yield batch
                self.position += 1
                if self.epoch_length and self.position % self.epoch_length == 0:
                    with self._lock:
                        if self._closed:
                            return
                        self.adapter.on_epoch_end()
                        self.adapter.on_epoch_begin()
        finally:
            self.close()

    def close(self) -> None:
        """Ends the pass: stops its workers and calls ``on_epoch_end`` if an epoch is open."""
        with self._lock:
            if self._open:
                self.adapter.on_epoch_end()
            self._open = False
            self._closed = True
