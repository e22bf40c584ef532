"""What a ``tf.data`` pipeline is made of, read from its Python objects before it runs.

tfloop needs a few facts about a user's dataset before it makes an iterator: whether it reads
files (auto-sharding then splits the files between workers), whether it shuffles without a seed
(workers would then take overlapping shares), and whether it reads from the ``tf.data`` service
(whose iterators cannot be saved). ``tf.data`` has no public API for this, so this module walks
the datasets a pipeline is built from (``Dataset._inputs()``) and the op types of the functions
they hold (``map``, ``interleave``, ``flat_map`` bodies). Every private TensorFlow name tfloop
uses for input lives here or in ``_sharding.py``, each behind a fallback; ``tests`` pin them.

A walk costs well under a millisecond: it never serializes the dataset graph (which copies
in-memory constants).

Examples:
    >>> import tensorflow as tf
    >>> plain = tf.data.Dataset.range(8).shuffle(8, seed=1).batch(2)
    >>> reads_files(plain), len(unseeded_shuffles(plain)), uses_data_service(plain)
    (False, 0, False)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import tensorflow as tf

__all__ = [
    "datasets_of",
    "op_types_of",
    "reads_files",
    "unseeded_shuffles",
    "unseeded_shuffles_before_shard",
    "uses_data_service",
]

# Datasets that read records from files (those tf.data's FILE auto-sharding looks for), as
# lower-case prefixes of their Python class names and op types (TFRecordDatasetV2, ...).
_FILE_READERS = (
    "tfrecorddataset",
    "textlinedataset",
    "fixedlengthrecorddataset",
    "csvdataset",
    "experimentalcsvdataset",
)


def datasets_of(dataset: tf.data.Dataset) -> Iterator[tf.data.Dataset]:
    """Every dataset ``dataset`` is built from, itself included (each once)."""
    seen: set[int] = set()
    stack = [dataset]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        try:
            stack.extend(current._inputs())
        except (AttributeError, NotImplementedError, TypeError):
            continue


def _function_graphs(dataset: tf.data.Dataset) -> Iterator[Any]:
    """The graphs of the functions a dataset holds (``StructuredFunctionWrapper.function``)."""
    for value in vars(dataset).values():
        graph = getattr(getattr(value, "function", None), "graph", None)
        if graph is not None and hasattr(graph, "get_operations"):
            yield graph


def op_types_of(dataset: tf.data.Dataset) -> set[str]:
    """The Python class names of a pipeline's datasets and the op types of their functions
    (nested functions included: ``interleave(tf.data.TFRecordDataset)`` reads inside one)."""
    found: set[str] = set()
    for current in datasets_of(dataset):
        found.add(type(current).__name__)
        for graph in _function_graphs(current):
            definition = graph.as_graph_def()
            found.update(node.op for node in definition.node)
            for function in definition.library.function:
                found.update(node.op for node in function.node_def)
    return found


def reads_files(dataset: tf.data.Dataset) -> bool:
    """Whether the pipeline reads records from files (TFRecord, text lines, fixed-length, CSV)."""
    return any(kind.lstrip("_").lower().startswith(_FILE_READERS) for kind in op_types_of(dataset))


def uses_data_service(dataset: tf.data.Dataset) -> bool:
    """Whether the pipeline reads from the ``tf.data`` service (``service.distribute``,
    ``from_dataset_id``), directly or inside an ``interleave`` / ``flat_map``.

    Examples:
        >>> import tensorflow as tf
        >>> uses_data_service(tf.data.Dataset.range(3).batch(2))
        False
    """
    return any("DataService" in kind for kind in op_types_of(dataset))


def _is_unseeded(shuffle: tf.data.Dataset) -> bool:
    # tf.random.get_seed(None) without a global seed gives (0, 0): a random seed per iterator.
    seeds = (getattr(shuffle, "_seed", None), getattr(shuffle, "_seed2", None))
    try:
        return all(seed is None or int(seed) == 0 for seed in seeds)
    except (TypeError, ValueError):
        return False


def unseeded_shuffles(dataset: tf.data.Dataset) -> list[tf.data.Dataset]:
    """The ``shuffle`` datasets of the pipeline that have no seed, neither their own nor a
    global one (``tf.random.set_seed``, which gives every worker running the same code the
    same seeds)."""
    return [
        current
        for current in datasets_of(dataset)
        if "Shuffle" in type(current).__name__ and _is_unseeded(current)
    ]


def unseeded_shuffles_before_shard(dataset: tf.data.Dataset) -> list[tf.data.Dataset]:
    """Unseeded shuffles upstream of a ``shard``: each worker shuffles differently before it
    takes its shard, so the shards overlap."""
    found: list[tf.data.Dataset] = []
    for current in datasets_of(dataset):
        if "Shard" in type(current).__name__:
            for upstream in current._inputs():
                found.extend(unseeded_shuffles(upstream))
    return found
