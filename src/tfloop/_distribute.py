"""Running the superbatch loop under a ``tf.distribute.Strategy``.

The layout, and why:

- The K-step loop stays in *cross-replica* context: ``for i in tf.range(K): strategy.run(step,
  (superbatch, i))``. A synchronization point (an all-reduce, ``optimizer.apply_gradients``)
  inside control flow in replica context is an error in TensorFlow, so nothing that
  synchronizes runs inside a replica's ``tf.cond``.
- Each superbatch ``[K, batch, ...]`` is pulled from the plain (checkpointable) iterator on the
  host and split along the *batch* dimension, never the step dimension: replica ``r`` of ``R``
  gets examples ``r * batch // R`` to ``(r + 1) * batch // R`` of every step, so a ragged
  batch splits as evenly as it can. Under ``MultiWorkerMirroredStrategy`` a worker's batches
  are usually its own share of the global batch (per-worker input, ``data/_sharding.py``),
  split among its local replicas; arrays (and datasets with auto-sharding off) are read whole
  by every worker (same seed), and each keeps its replicas' share.
- Every replica adds ``n_r * g_r`` (its example count times the gradient of its mean loss) to
  on-read accumulators; the update, applied in cross-replica context, reads their global sums,
  divides by the global example count and clips *after* that reduction. That is the exact
  gradient of the global batch, however unevenly it was split, with or without accumulation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from tfloop.errors import ConfigError

Nested = Any

# The on-read synchronization of accumulator state: each replica updates its own copy, a read
# in cross-replica context returns the aggregate.
ON_READ = tf.VariableSynchronization.ON_READ


def scope(strategy: tf.distribute.Strategy | None) -> Any:
    """The strategy's scope (variables created in it are distributed), or a no-op."""
    return strategy.scope() if strategy is not None else contextlib.nullcontext()


def read_int(variable: Any) -> int:
    """An integer variable's value (a distributed one reads as its aggregate)."""
    return int(np.asarray(tf.identity(variable)))


def replicas(strategy: tf.distribute.Strategy | None) -> int:
    """The number of replicas in sync (1 without a strategy)."""
    return 1 if strategy is None else int(strategy.num_replicas_in_sync)


def validate(strategy: Any) -> tf.distribute.Strategy | None:
    if strategy is None:
        return None
    if not isinstance(strategy, tf.distribute.Strategy):
        raise ConfigError(
            f"strategy must be a tf.distribute.Strategy (e.g. tf.distribute.MirroredStrategy()) "
            f"or None, got {type(strategy).__name__}."
        )
    if is_parameter_server(strategy) and int(strategy.num_replicas_in_sync) > 1:
        raise ConfigError(
            "strategy: a ParameterServerStrategy whose workers have several replicas (GPUs) is "
            "not supported: tfloop runs each worker's steps on one replica. Give each worker "
            "one device (e.g. CUDA_VISIBLE_DEVICES), or use MultiWorkerMirroredStrategy."
        )
    return strategy


def check_created_in_scope(strategy: tf.distribute.Strategy, model: Any, optimizer: Any) -> None:
    """Model and optimizer variables must belong to ``strategy``; say how to fix it if not."""
    outside = [
        v.name
        for v in list(getattr(model, "variables", []))
        if not strategy.extended.variable_created_in_scope(_tf_variable(v))
    ]
    if outside:
        raise ConfigError(
            f"model: {len(outside)} variable(s) (e.g. {outside[0]!r}) were created outside "
            "strategy.scope(). Build the model inside it: `with strategy.scope(): model = ...`."
        )
    owner = getattr(optimizer, "_distribution_strategy", None)
    if owner is not None and owner is not strategy:
        raise ConfigError(
            "optimizer was created outside strategy.scope(). Create it inside "
            "`with strategy.scope():`, or pass its name (e.g. optimizer='adam') and tfloop "
            "creates it there."
        )


def _tf_variable(variable: Any) -> Any:
    # Keras 3 variables wrap the tf.Variable the strategy created.
    return (
        getattr(variable, "value", variable) if not isinstance(variable, tf.Variable) else variable
    )


def split_superbatch(
    strategy: tf.distribute.Strategy, superbatch: Nested, per_worker: bool = False
) -> Any:
    """Gives each replica its share of every step's batch (axis 1 of ``[K, batch, ...]``).

    The batch is the global one (every worker holds it), or with ``per_worker`` this worker's
    share of it, divided among its local replicas.
    """
    count = int(strategy.num_replicas_in_sync)
    if per_worker:
        count = local_replicas(strategy)

    def share(context: tf.distribute.experimental.ValueContext) -> Nested:
        replica = context.replica_id_in_sync_group % count

        def cut(tensor: tf.Tensor) -> tf.Tensor:
            size = int(tensor.shape[1])
            return tensor[:, replica * size // count : (replica + 1) * size // count]

        return tf.nest.map_structure(cut, superbatch)

    return strategy.experimental_distribute_values_from_function(share)


def first_local(strategy: tf.distribute.Strategy, value: Nested) -> Nested:
    """The value of the first local replica (for values every replica agrees on)."""
    return tf.nest.map_structure(lambda v: strategy.experimental_local_results(v)[0], value)


def reset_on_read(variable: tf.Variable, value: Any) -> None:
    """Assigns ``value`` to every local copy of an on-read variable, in any context."""
    if tf.distribute.in_cross_replica_context() and hasattr(variable, "values"):
        for component in variable.values:
            component.assign(value)
    else:
        variable.assign(value)


def local_copies(variables: Any) -> list[tf.Variable]:
    """Every local copy of ``variables``: a distributed variable's per-replica components, a
    Keras variable's ``tf.Variable``. Reading and assigning each copy round-trips exactly
    (an on-read variable's aggregate would be divided among the replicas again on assign)."""
    copies: list[tf.Variable] = []
    for variable in variables:
        inner = _tf_variable(variable)
        components = getattr(inner, "values", None)
        copies.extend(components if isinstance(components, tuple) else [inner])
    return copies


def save_values(variables: Any) -> list[tuple[tf.Variable, tf.Tensor]]:
    """The current value of every local copy of ``variables``, for :func:`restore_values`."""
    return [(copy, copy.read_value()) for copy in local_copies(variables)]


def restore_values(saved: list[tuple[tf.Variable, tf.Tensor]]) -> None:
    """Puts back what :func:`save_values` read."""
    for copy, value in saved:
        copy.assign(value)


def uses_accelerators(strategy: tf.distribute.Strategy) -> bool:
    devices = getattr(strategy.extended, "worker_devices", ())
    return any(("GPU" in d.upper() or "TPU" in d.upper()) for d in devices)


def is_multi_worker(strategy: tf.distribute.Strategy | None) -> bool:
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def is_parameter_server(strategy: tf.distribute.Strategy | None) -> bool:
    """Whether ``strategy`` is a ``ParameterServerStrategy`` (asynchronous, via a coordinator)."""
    return isinstance(strategy, tf.distribute.ParameterServerStrategy)


def parameter_server_workers(strategy: tf.distribute.Strategy) -> int:
    """The workers of a ``ParameterServerStrategy`` cluster (TensorFlow keeps the count in a
    private attribute; 1 if it moves)."""
    return max(1, int(getattr(strategy.extended, "_num_workers", 1)))


def is_replicated(strategy: tf.distribute.Strategy | None) -> bool:
    """Whether replicas train in sync (every strategy but ``ParameterServerStrategy``)."""
    return strategy is not None and not is_parameter_server(strategy)


def loop_strategy(strategy: tf.distribute.Strategy | None, kind: str) -> Any:
    """The strategy a compiled loop of ``kind`` runs under.

    Under ``ParameterServerStrategy`` only training runs on the workers (in closures the
    coordinator schedules); evaluation and prediction run on the coordinator, which reads the
    variables from the parameter servers, as a loop without a strategy.
    """
    if is_parameter_server(strategy) and kind != "train":
        return None
    return strategy


def evaluation_shards(strategy: tf.distribute.Strategy | None) -> tf.distribute.Strategy | None:
    """The strategy whose workers each read a shard of evaluation data (``validation_data``,
    ``evaluate``): ``MultiWorkerMirroredStrategy``'s; None (every worker, or the coordinator,
    reads it whole) under any other."""
    return strategy if is_multi_worker(strategy) else None


def local_replicas(strategy: tf.distribute.Strategy) -> int:
    """The replicas of this worker (of this process)."""
    return max(1, len(getattr(strategy.extended, "worker_devices", ()) or ()))


@dataclasses.dataclass(frozen=True)
class InputLayout:
    """Where this process's input goes: ``workers`` input pipelines (this one ``index``), each
    feeding ``local_replicas`` of the ``replicas`` in sync."""

    workers: int = 1
    index: int = 0
    replicas: int = 1
    local_replicas: int = 1

    def input_context(self) -> tf.distribute.InputContext:
        """TensorFlow's ``InputContext`` for this pipeline (``distribute_datasets_from_function``)."""
        return tf.distribute.InputContext(self.workers, self.index, self.replicas)


def input_layout(strategy: tf.distribute.Strategy | None) -> InputLayout:
    """This process's :class:`InputLayout` under ``strategy``.

    Under ``MultiWorkerMirroredStrategy`` a pipeline per worker (the chief first, as TensorFlow
    numbers them); under any other strategy one pipeline feeding every replica.
    """
    if strategy is None or is_parameter_server(strategy):
        return InputLayout()
    replicas = int(strategy.num_replicas_in_sync)
    if not is_multi_worker(strategy):
        return InputLayout(replicas=replicas, local_replicas=replicas)
    resolver = strategy.cluster_resolver
    cluster = resolver.cluster_spec().as_dict() if resolver is not None else {}
    chiefs, workers = len(cluster.get("chief", [])), len(cluster.get("worker", []))
    if chiefs + workers <= 1:
        return InputLayout(replicas=replicas, local_replicas=replicas)
    kind, task = resolver.task_type, int(resolver.task_id or 0)
    index = 0 if kind == "chief" else chiefs + task
    return InputLayout(chiefs + workers, index, replicas, local_replicas(strategy))


_GATHERS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def all_gather(strategy: tf.distribute.Strategy, values: Sequence[int]) -> np.ndarray:
    """Every replica's ``values`` (ints), one row per replica of the cluster, as NumPy.

    A collective: every worker must call it, in the same order as its other collectives. The
    gather is one ``tf.function`` per strategy (traced once per row length): eager collectives
    would trace anew at every call.
    """
    gather = _GATHERS.get(strategy)
    if gather is None:

        def gather_rows(row: tf.Tensor) -> tf.Tensor:
            per_replica = strategy.run(lambda: tf.identity(row))
            return strategy.gather(per_replica, axis=0)

        gather = _GATHERS[strategy] = tf.function(gather_rows)
    return np.asarray(gather(tf.constant([list(values)], tf.int64)).numpy())


def gather_from_replicas(strategy: tf.distribute.Strategy, value: int) -> list[int]:
    """``value`` as every replica of the cluster has it (a collective: all workers call it)."""
    return [int(v) for v in all_gather(strategy, [value])[:, 0]]


def is_chief(strategy: tf.distribute.Strategy | None) -> bool:
    """Whether this process writes shared outputs (checkpoints, logs) for the cluster."""
    if not is_multi_worker(strategy):
        return True
    config = json.loads(os.environ.get("TF_CONFIG", "{}") or "{}")
    task = config.get("task", {})
    kind, index = task.get("type", "worker"), int(task.get("index", 0))
    if kind == "chief":
        return True
    return kind == "worker" and index == 0 and "chief" not in config.get("cluster", {})


def task_id() -> str:
    config = json.loads(os.environ.get("TF_CONFIG", "{}") or "{}")
    task = config.get("task", {})
    return f"{task.get('type', 'worker')}-{task.get('index', 0)}"
