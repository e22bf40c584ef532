"""A batched dataset under ``MultiWorkerMirroredStrategy``: each worker reads only its shard.

Keras and ``strategy.experimental_distribute_dataset`` auto-shard a dataset between workers;
tfloop calls the same TensorFlow rewrite, then keeps its own plain, checkpointable iterator.
For a dataset batched by the *global* batch size ``B``, on worker ``i`` of ``W``:

1. every batch is re-cut into ``W`` pieces of about ``B / W`` examples
   (``dataset.rebatch(batch_sizes_for_worker(B, W, 1, i))``, as TensorFlow does; a legacy
   rebatch when ``B`` cannot be read from the pipeline);
2. ``auto_shard_dataset(dataset, W, i)`` applies the dataset's ``AutoShardPolicy``:

   - ``FILE`` (``AUTO`` when the pipeline reads files): worker ``i`` reads files
     ``i, i + W, ...`` only, so it reads about ``1 / W`` of the data;
   - ``DATA`` (``AUTO`` otherwise): every worker runs the whole pipeline and keeps pieces
     ``i, i + W, ...``: the worker's share of every global batch, the same batches as on one
     device. It reads everything, but ships, splits and steps only its share. A shuffle must
     then have a seed (the same on every worker), or the shares overlap;
   - ``OFF``: no sharding; every worker reads the whole dataset and keeps its replicas' share
     of each global batch (tfloop's behaviour before per-worker input).

Either way each worker's batches are its share of the global batch: the global batch
semantics, exact accumulation and clipping are unchanged (``_lockstep.py`` keeps the workers'
calls in step). Turn sharding off with TensorFlow's own option::

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    dataset = dataset.with_options(options)

The rewrite's helpers are private TensorFlow API (stable since TF 2.4); if they are missing,
tfloop logs a warning and reads the whole dataset on every worker.
"""

from __future__ import annotations

import logging

import tensorflow as tf

from tfloop import _distribute
from tfloop.data._datasets import DatasetSource
from tfloop.data._lockstep import per_worker_source
from tfloop.data._pipeline import reads_files, unseeded_shuffles, uses_data_service
from tfloop.data._source import DataSource
from tfloop.errors import DataError

__all__ = ["dataset_source", "shard_for_worker", "unseeded_shards"]

logger = logging.getLogger("tfloop")

AutoShardPolicy = tf.data.experimental.AutoShardPolicy

SERVICE_REASON = (
    "{argument} reads from the tf.data service, whose iterators cannot be saved (TensorFlow: "
    "'SaveInternal is not yet supported')"
)


def dataset_source(
    dataset: tf.data.Dataset, argument: str, strategy: tf.distribute.Strategy | None
) -> DataSource:
    """The source of a batched dataset: this worker's shard under a multi-worker strategy."""
    service = uses_data_service(dataset)
    layout = _distribute.input_layout(strategy)
    source: DataSource
    if layout.workers > 1 and service:
        # The service decides which elements each worker gets (processing_mode, sharding
        # policy): every worker's batches are its own, as with a dataset function.
        source = per_worker_source(dataset, argument, strategy, _infinite(dataset))
    elif layout.workers > 1 and (worker := shard_for_worker(dataset, layout, argument)):
        source = per_worker_source(worker, argument, strategy, _infinite(dataset))
    else:
        source = DatasetSource(dataset, 1, argument)
    if service:
        source.unsaveable_iterator = SERVICE_REASON.format(argument=argument)
    return source


def _infinite(dataset: tf.data.Dataset) -> bool:
    return bool(int(dataset.cardinality()) == tf.data.INFINITE_CARDINALITY)


def unseeded_shards(argument: str, infinite: bool, where: str) -> None:
    """An unseeded shuffle that each worker runs before it takes its shard: every worker
    shuffles its own way, so the shards overlap. A DataError for a finite dataset (an epoch
    would not see each example once); for a dataset that repeats forever, where an epoch is
    ``steps_per_epoch`` steps anyway, a warning: each worker then samples the data on its own
    (TensorFlow's multi-worker tutorials' pipelines), as under ``ParameterServerStrategy``."""
    fix = (
        "Pass a seed: dataset.shuffle(buffer_size, seed=...) (the same on every worker), or "
        "shuffle after the shard (or shard by files, or turn auto-sharding off: "
        "tf.data.experimental.AutoShardPolicy.OFF)."
    )
    if not infinite:
        raise DataError(
            f"{argument} shuffles without a seed {where}. Under MultiWorkerMirroredStrategy "
            "each worker then shuffles differently before it takes its shard, so the workers' "
            f"shards overlap and an epoch misses some examples. {fix}"
        )
    logger.warning(
        "tfloop: %s shuffles without a seed %s, so each worker shuffles its own way: the "
        "workers' shards of this endless dataset overlap (each worker samples the data on its "
        "own) and a resume does not continue the same order. %s",
        argument,
        where,
        fix,
    )


def shard_for_worker(
    dataset: tf.data.Dataset, layout: _distribute.InputLayout, argument: str = "data"
) -> tf.data.Dataset | None:
    """This worker's share of every global batch of ``dataset`` (see the module docstring), or
    None when the dataset is read whole by every worker (``AutoShardPolicy.OFF``)."""
    policy = dataset.options().experimental_distribute.auto_shard_policy
    if policy == AutoShardPolicy.OFF:
        return None
    by_data = policy == AutoShardPolicy.DATA or (
        policy == AutoShardPolicy.AUTO and not reads_files(dataset)
    )
    if by_data and unseeded_shuffles(dataset):
        infinite = int(dataset.cardinality()) == tf.data.INFINITE_CARDINALITY
        unseeded_shards(argument, infinite, "and is sharded by data")
    try:
        from tensorflow.python.data.experimental.ops import distribute as data_distribute
        from tensorflow.python.distribute import input_ops

        workers, index = layout.workers, layout.index
        batch = int(data_distribute.compute_batch_size(dataset))
        if batch > 0:
            sizes = data_distribute.batch_sizes_for_worker(batch, workers, 1, index)
            rebatched = dataset.rebatch(sizes)
        else:
            rebatched = data_distribute._LegacyRebatchDataset(dataset, workers)
        sharded: tf.data.Dataset = input_ops.auto_shard_dataset(rebatched, workers, index, workers)
    except (ImportError, AttributeError) as error:  # the private helpers moved
        logger.warning(
            "tfloop: this TensorFlow has no dataset auto-sharding helpers (%s); every worker "
            "reads the whole of %s.",
            error,
            argument,
        )
        return None
    return sharded
