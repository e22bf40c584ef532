"""Dataset functions: ``fn(tf.distribute.InputContext) -> tf.data.Dataset``.

TensorFlow's ``strategy.distribute_datasets_from_function`` convention: the function is called
once per input pipeline (a worker) with its ``InputContext`` and returns that pipeline's
dataset, batched *per replica* (``context.get_per_replica_batch_size(global_batch_size)``) and
sharded by the function itself (``dataset.shard(context.num_input_pipelines,
context.input_pipeline_id)``, or on files). tfloop calls it the same way:

- without a strategy, and for ``evaluate``, ``predict`` and validation data: once, with
  ``InputContext()`` (one pipeline, one replica): its batches are the global batches;
- under ``MirroredStrategy`` (one worker, ``R`` replicas): once, with ``InputContext(1, 0, R)``;
  every ``R`` consecutive batches make one step's global batch;
- under ``MultiWorkerMirroredStrategy``: on each worker ``i`` of ``W``, with
  ``InputContext(W, i, R)``; each worker's batches are its share of the global batch (its
  local replicas' batches, concatenated), kept in lockstep with the other workers';
- under ``ParameterServerStrategy``: traced once on the coordinator (with ``InputContext(1, 0,
  R)``) and run on every worker (``ClusterCoordinator.create_per_worker_dataset``): see
  :class:`CoordinatedSource`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import tensorflow as tf

from tfloop import _distribute
from tfloop.data._datasets import DatasetSource
from tfloop.data._lockstep import per_worker_source
from tfloop.data._pipeline import unseeded_shuffles_before_shard, uses_data_service
from tfloop.data._sharding import SERVICE_REASON, unseeded_shards
from tfloop.data._source import DataSource, StepStream
from tfloop.data._stacking import unknown_dimensions, with_step_sizes
from tfloop.errors import DataError

__all__ = ["CoordinatedSource", "call_dataset_function", "function_source"]

Nested = Any
DatasetFunction = Callable[[tf.distribute.InputContext], tf.data.Dataset]


def call_dataset_function(
    function: DatasetFunction, context: tf.distribute.InputContext, argument: str = "data"
) -> tf.data.Dataset:
    """``function(context)``, checked to be a ``tf.data.Dataset``."""
    try:
        dataset = function(context)
    except TypeError as error:
        if "argument" not in str(error):
            raise
        raise DataError(
            f"{argument} is a function, so tfloop calls it as a dataset function, with a "
            f"tf.distribute.InputContext, and that failed ({error}). Define it as "
            "`def dataset_fn(context): ...` returning a batched tf.data.Dataset."
        ) from error
    if not isinstance(dataset, tf.data.Dataset):
        raise DataError(
            f"{argument} is a function, so tfloop calls it as a dataset function (with a "
            f"tf.distribute.InputContext), but it returned a {type(dataset).__name__}, not a "
            "tf.data.Dataset."
        )
    return dataset


def function_source(
    function: DatasetFunction, argument: str, strategy: tf.distribute.Strategy | None
) -> DataSource:
    """The source of a dataset function under ``strategy`` (see the module docstring)."""
    if _distribute.is_parameter_server(strategy):
        return CoordinatedSource(function, strategy, argument)
    layout = _distribute.input_layout(strategy)
    dataset = call_dataset_function(function, layout.input_context(), argument)
    dataset = merge_replica_batches(dataset, layout.local_replicas, argument)
    source: DataSource
    if layout.workers > 1:
        infinite = int(dataset.cardinality()) == tf.data.INFINITE_CARDINALITY
        if unseeded_shuffles_before_shard(dataset):
            unseeded_shards(argument, infinite, "before it shards")
        source = per_worker_source(dataset, argument, strategy, infinite)
    else:
        source = DatasetSource(dataset, 1, argument)
    if uses_data_service(dataset):
        source.unsaveable_iterator = SERVICE_REASON.format(argument=argument)
    return source


def merge_replica_batches(
    dataset: tf.data.Dataset, replicas: int, argument: str
) -> tf.data.Dataset:
    """Per-replica batches, ``replicas`` consecutive ones concatenated: one step's batch.

    The step's batch is then split evenly among the replicas again, so replica ``r`` gets
    batch ``r`` when they are all full; a ragged last batch is spread over the replicas, which
    changes nothing in the (exact, weighted) update.
    """
    if replicas == 1:
        return dataset
    try:
        from tensorflow.python.data.experimental.ops import distribute as data_distribute

        size = int(data_distribute.compute_batch_size(dataset))
    except (ImportError, AttributeError):
        size = -1
    if size <= 0:
        raise DataError(
            f"{argument}: tfloop cannot tell the per-replica batch size of this dataset "
            f"function's batches, which it must concatenate {replicas} at a time (one per "
            "replica). End the pipeline with .batch(context.get_per_replica_batch_size(...))."
        )
    return dataset.rebatch(size * replicas)


class CoordinatedSource(DataSource):
    """A dataset function under ``ParameterServerStrategy``.

    Every worker builds the pipeline itself (the function is traced once on the coordinator,
    so every worker runs the same graph: there is no worker index to shard by; an unseeded
    shuffle, or the ``tf.data`` service with ``processing_mode="distributed_epoch"``, gives the
    workers different examples). tfloop repeats it and stacks ``K`` batches per closure in the
    worker's pipeline. Batches of a static shape are stacked as they are; batches whose shape
    the element spec leaves open (TensorFlow's tutorials' ``.batch(n)``, full or with a partial
    batch each pass; ``padded_batch``) are stacked padded, with their sizes, and each step is
    cut back to its own shape in the closure (``_padded.py``), so every batch trains as it
    is. The coordinator holds no stream: :meth:`worker_dataset` is what each worker reads.
    """

    infinite = True

    def __init__(
        self, function: DatasetFunction, strategy: tf.distribute.Strategy, argument: str
    ) -> None:
        self.function = function
        self.argument = argument
        self.context = tf.distribute.InputContext(1, 0, int(strategy.num_replicas_in_sync))
        # Made on the coordinator for its element spec only; it is never iterated here.
        self._spec = DatasetSource(
            call_dataset_function(function, self.context, argument), 1, argument
        )
        self.uniform = self._spec.uniform
        # The (leaf, axis) of each dimension a batch may vary in: cut to size in the closure.
        self.step_sizes = (
            None if self.uniform else tuple(unknown_dimensions(self._spec.dataset.element_spec))
        )
        self.batch_size = self._spec.batch_size
        self.steps_per_epoch = None
        self.steps_per_execution = 1
        self.bytes_per_batch = self._spec.bytes_per_batch

    def example_batch(self) -> Nested:
        return self._spec.example_batch()

    def stream(self, epoch: int, start_step: int = 0) -> StepStream:
        """An empty stream: under ``ParameterServerStrategy`` the workers read the data."""
        return StepStream(iter(()), self.steps_per_execution)

    def worker_dataset(self) -> tf.data.Dataset:
        """What each worker reads: the function's dataset, repeated, ``K`` batches at a time
        (call it inside ``ClusterCoordinator.create_per_worker_dataset``); with
        :attr:`step_sizes`, ``(padded stack, sizes)`` pairs."""
        dataset = call_dataset_function(self.function, self.context, self.argument).repeat()
        k = self.steps_per_execution
        if self.uniform:
            return dataset.batch(k, drop_remainder=True).prefetch(2)
        return with_step_sizes(dataset).padded_batch(k, drop_remainder=True).prefetch(2)
