"""A fast checkpoint writer for any ``tf.train.Checkpoint``: TF's files, minus TF's per-save Python.

``CheckpointManager.save`` spends about 10 ms of Python on every save (walking the object graph,
building a saver, running its ops one by one): at many saves a second that competes with
training for the GIL and the cores. So the first save of a set of saved objects runs TF's own
gather once, which gives every tensor's checkpoint key and the serialized object graph, and
traces one function with the ops TF's saver runs; the saves after it call that function with
a snapshot of the tensors and do the manager's bookkeeping (the ``checkpoint`` index,
``max_to_keep``). The files are the same bytes. Every save walks the saved objects first (a
fraction of a millisecond) and plans again if they changed; what cannot be planned so
(registered savers, Python state, sliced variables) is the manager's save of the snapshot.

The snapshot is taken on the caller's thread (variable reads, which TF keeps immutable by
copy-on-write, and frozen stand-ins for other objects, see ``_frozen.py``), so the write may
run later on another thread and still hold the state of the exact moment of the snapshot.

Examples:
    >>> import os, tempfile, tensorflow as tf
    >>> directory = tempfile.mkdtemp()
    >>> weights = tf.Variable([1.0, 2.0])
    >>> checkpoint = tf.train.Checkpoint(weights=weights)
    >>> manager = tf.train.CheckpointManager(checkpoint, directory, max_to_keep=2)
    >>> writer = FastWriter(checkpoint, manager)
    >>> snapshot = writer.snapshot()
    >>> _ = weights.assign([5.0, 6.0])  # after the snapshot: not in this checkpoint
    >>> writer.write(snapshot, step=1)
    >>> writer.compiled, os.path.basename(manager.latest_checkpoint)
    (True, 'ckpt-1')
    >>> tf.train.load_checkpoint(manager.latest_checkpoint).get_tensor(
    ...     "weights/.ATTRIBUTES/VARIABLE_VALUE").tolist()
    [1.0, 2.0]
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from typing import Any

import tensorflow as tf
from tensorflow.python.checkpoint import functional_saver
from tensorflow.python.checkpoint import util as checkpoint_util
from tensorflow.python.ops import gen_io_ops
from tensorflow.python.trackable import base as trackable_base

from tfloop.checkpoint._frozen import (
    CANNOT_FREEZE,
    VARIABLE_VALUE,
    Edge,
    FrozenVariable,
    SnapshotMap,
    freeze,
    leaves,
    plain_variable,
    same_edges,
    walk,
)
from tfloop.io import files

__all__ = ["FastWriter", "Snapshot", "delete_checkpoint_files"]


class FastWriter:
    """Snapshots and writes checkpoints of ``checkpoint`` into ``manager``'s directory.

    Args:
        checkpoint: the ``tf.train.Checkpoint`` to save.
        manager: its ``tf.train.CheckpointManager`` (directory, ``max_to_keep``, index).
        replaced: variables of ``checkpoint`` whose value each :meth:`snapshot` is given
            instead of reading it (values computed for this save: metadata, say).
    """

    def __init__(
        self,
        checkpoint: tf.train.Checkpoint,
        manager: tf.train.CheckpointManager,
        replaced: Sequence[tf.Variable] = (),
    ) -> None:
        self._checkpoint = checkpoint
        self._manager = manager
        self._replaced = list(replaced)
        self._plan: tuple[list[Edge], Plan | None] | None = None  # (graph, plan) of last save
        self._reader: tuple[list[int], Any] | None = None  # (variable ids, batched read)
        self._writer_fn: tuple[Any, Any] | None = None  # (layout, traced write) of the last plan
        # Checkpoints kept past max_to_keep (out of the index, still on disk): see write(keep=).
        self.kept: list[str] = []
        # Made now, not by the first save: a background write must not add to the object graph.
        _ = checkpoint.save_counter

    @property
    def compiled(self) -> bool | None:
        """Whether the saves of the current objects take the compiled write (None: no save
        yet; False: TF's own save of the snapshot)."""
        if self._plan is None or self._plan[1] is None:
            return None if self._plan is None else False
        return self._plan[1].compiled

    def path(self, step: int) -> str:
        """The prefix of checkpoint ``step``, as the manager names it."""
        return f"{self._manager._prefix}-{step}"

    def snapshot(
        self, values: Sequence[tf.Tensor] = (), *, compiled_only: bool = False
    ) -> Snapshot | SnapshotMap | None:
        """Freezes the tensors of every saved object now, for a write that comes later.

        ``values`` are the values of the ``replaced`` variables, passed as tensors instead of
        assigned (two eager ops less per save).

        Returns a :class:`Snapshot` for the plan's compiled write, or a ``SnapshotMap`` for
        TF's own save of the frozen objects when the plan could not be compiled (or, with
        ``compiled_only``, None then). None also when there is no plan (legacy saveables,
        Python state, a TF without the object-map hook): that checkpoint is then the
        manager's own synchronous save.
        """
        plan = self._current_plan()
        if plan is None or (compiled_only and plan.compiled is False):
            return None
        read = list(plan.read())
        for position, value in zip(plan.replaced, values, strict=True):
            read[position] = value
        frozen = []
        for obj in plan.others:
            stand_in = freeze(obj)
            if stand_in is None or stand_in is CANNOT_FREEZE:
                return None
            frozen.append(stand_in)
        layout = []
        for stand_in in frozen:
            named = leaves(stand_in._tensors)
            layout.append([name for name, _ in named])
            read.extend(tensor for _, tensor in named)
        if plan.compiled is None:  # the plan's first save: trace its write
            plan.layout = layout
            plan.compiled = self._compile(plan, read, stand_ins(plan, read, frozen))
        if plan.compiled and layout == plan.layout:
            return Snapshot(plan, read)
        if compiled_only:
            return None
        return stand_ins(plan, read, frozen)

    def write(
        self, snapshot: Snapshot | SnapshotMap, step: int, keep: Collection[str] = ()
    ) -> None:
        """Writes checkpoint ``step`` from a snapshot; the ``checkpoint`` index last.

        ``keep``: checkpoint prefixes not deleted when they fall out of ``max_to_keep``; they
        leave the index (as TF's ``keep_checkpoint_every_n_hours`` keeps one) and are held in
        :attr:`kept` until a later write no longer names them in ``keep``.
        """
        if isinstance(snapshot, SnapshotMap):
            # The manager's usual save, fed the snapshot's tensors through the object map.
            saver = self._checkpoint._saver
            saver._object_map = snapshot
            try:
                self.manager_save(step, keep)
            finally:
                saver._object_map = None
            return
        path = self.path(step)
        write = snapshot.plan.write
        inputs = [tf.constant(path), *snapshot.values, snapshot.plan.graph]
        try:
            # The concrete function's flat call: binding some 40 arguments the public way
            # costs more than the rest of the call.
            write._call_flat(inputs, write.captured_inputs)
        except tf.errors.OpError as error:
            raise eager_message(error) from error
        self._record(path, keep)

    def manager_save(self, step: int, keep: Collection[str] = ()) -> str:
        """``CheckpointManager.save`` of checkpoint ``step``, with :meth:`write`'s ``keep``."""
        manager = self._manager
        limit, manager._max_to_keep = manager._max_to_keep, None  # no sweep of its own
        try:
            path: str = manager.save(checkpoint_number=step)
        finally:
            manager._max_to_keep = limit
        self._sweep(self._expired(), keep)
        return path

    def _current_plan(self) -> Plan | None:
        """The plan of the saved objects as they are now.

        The saved objects are walked every time (a fraction of a millisecond), and the plan made
        again whenever they changed: an object added since the last save (a new ``tf.data``
        iterator, a lazily built layer) is in this checkpoint, never silently left out. None
        when an object cannot be frozen (legacy saveables, Python state) or TF lacks the
        object-map hook.
        """
        saver = getattr(self._checkpoint, "_saver", None)
        view = getattr(saver, "_graph_view", None)
        if view is None or not hasattr(saver, "_object_map"):
            return None
        objects, edges = walk(view)
        if self._plan is None or not same_edges(self._plan[0], edges):
            self._plan = (edges, self._make_plan(objects))
        return self._plan[1]

    def _make_plan(self, objects: list[Any]) -> Plan | None:
        """Sorts the saved objects once: plain variables are read in one call per save."""
        counter = self._checkpoint.save_counter  # the writer's own: it counts the write
        plan = Plan()
        for obj in objects:
            if obj is counter:
                plan.unchanged.append(obj)
                continue
            variable = plain_variable(obj)
            if variable is not None:
                plan.variables.append((obj, checkpoint_util.get_full_name(obj)))
                plan.sources.append(variable)
                continue
            frozen = freeze(obj)
            if frozen is CANNOT_FREEZE:
                return None
            (plan.unchanged if frozen is None else plan.others).append(obj)
        positions = {id(variable): index for index, variable in enumerate(plan.sources)}
        plan.replaced = [positions[id(variable)] for variable in self._replaced]
        key = [id(v) for v in plan.sources]
        if self._reader is None or self._reader[0] != key:
            sources = list(plan.sources)
            read = tf.function(lambda: [v.read_value() for v in sources])
            # Called as its trace, with no arguments: tf.function's dispatch would add a tenth
            # of a millisecond to every save.
            concrete = read.get_concrete_function()
            self._reader = (key, lambda: concrete._call_flat([], concrete.captured_inputs))
        plan.read = self._reader[1]
        return plan

    def _compile(self, plan: Plan, values: list[Any], stand_ins: SnapshotMap) -> bool:
        """Traces the plan's write: TF's own save of the saved objects, minus its Python work.

        ``CheckpointManager.save`` walks the object graph, asks every object for its tensors,
        builds a saver and runs its ops one by one, at every save (about 10 ms here). All of
        that depends only on which objects are saved, so it is done once, on the first snapshot
        of the plan: TF's own gather gives every saved tensor's checkpoint key and the
        serialized object graph, and each tensor is traced back to the snapshot value it is.
        A save then runs one function with the same ops TF's saver runs (``SaveV2`` into the
        temporary shard, ``MergeV2Checkpoints`` into the checkpoint), so the files are the
        same bytes. Returns False, and the plan's saves take TF's way, for anything this does
        not reproduce: registered savers, Python state, sliced tensors, several shards.
        """
        saver = self._checkpoint._saver
        saver._object_map = stand_ins
        try:
            serialized, feeds, registered, graph = saver._gather_serialized_tensors(None)
        finally:
            saver._object_map = None
        if feeds or registered:
            return False
        counter = self._checkpoint.save_counter
        positions = {id(value): index for index, value in enumerate(values)}
        sources: dict[str, int] = {}
        for trackable, tensors in serialized.items():
            for key, tensor in tensors.items():
                if trackable is None and key == trackable_base.OBJECT_GRAPH_PROTO_KEY:
                    sources[key] = GRAPH
                elif trackable is counter:
                    sources[key] = COUNTER
                else:
                    index = positions.get(id(tensor), -1)
                    if index < 0 or values[index] is not tensor:
                        return False  # a dict of slices, or a tensor made by the gather
                    sources[key] = index
        # The saver TF's gather feeds decides which shard each tensor goes to, and in which
        # order (the order of the data file).
        multi_device = functional_saver.MultiDeviceSaver(serialized)
        shards = [
            (task, shard)
            for task, task_shards in multi_device._get_shards_by_task(None)
            for shard in task_shards
        ]
        if len(shards) != 1:
            return False
        task, shard = shards[0]
        names: list[str] = []
        feed: list[int] = []
        for key, slices in shard.items():
            for spec, tensor in slices.items():
                if tensor is None:
                    continue  # recorded in the object graph, no value saved (as TF does)
                if spec or hasattr(tensor, "_wrapped_name") or key not in sources:
                    return False
                names.append(key)
                feed.append(sources[key])
        device = task.to_string()
        write_key = (tuple(names), tuple(feed), tuple(v.dtype for v in values), device)
        if self._writer_fn is None or self._writer_fn[0] != write_key:
            self._writer_fn = (write_key, traced_write(counter, names, feed, values, device))
        plan.write = self._writer_fn[1]
        with tf.device("/cpu:0"):
            plan.graph = tf.constant(graph.SerializeToString(), dtype=tf.string)
        return True

    def _record(self, path: str, keep: Collection[str] = ()) -> None:
        """The manager's bookkeeping after a save, as ``CheckpointManager.save`` does it.

        The new checkpoint goes into the ``checkpoint`` index and the ones beyond
        ``max_to_keep`` are deleted: ``manager.checkpoints``, ``tf.train.latest_checkpoint``
        and a later ``manager.save`` see what they would after the manager's own save. The
        manager writes the index twice, before and after deleting; this writes it once, already
        without the checkpoints it deletes next, so the index never names a deleted checkpoint.
        """
        manager = self._manager
        assert not manager._keep_checkpoint_every_n_hours
        timestamp = time.time()
        manager._maybe_delete.pop(path, None)  # a checkpoint saved again goes to the end
        manager._maybe_delete[path] = timestamp
        manager._latest_checkpoint = path
        self._sweep(self._expired(), keep)

    def _expired(self) -> list[str]:
        """Takes the checkpoints beyond ``max_to_keep`` out of the manager's list."""
        manager, expired = self._manager, []
        while manager._max_to_keep and len(manager._maybe_delete) > manager._max_to_keep:
            expired.append(manager._maybe_delete.popitem(last=False)[0])
        return expired

    def _sweep(self, expired: list[str], keep: Collection[str]) -> None:
        """Writes the index, then deletes the ``expired`` checkpoints and those :attr:`kept`
        ones that ``keep`` no longer names (a checkpoint in the index is never deleted)."""
        self._manager._record_state()
        listed = self._manager._maybe_delete
        candidates = list(dict.fromkeys([*self.kept, *expired]))
        self.kept = [p for p in candidates if p in keep and p not in listed]
        for prefix in candidates:
            if prefix not in keep and prefix not in listed:
                delete_checkpoint_files(prefix)


class Plan:
    """The saved objects, sorted by how a snapshot freezes them, and their compiled write."""

    def __init__(self) -> None:
        self.unchanged: list[Any] = []  # save no tensors (containers), or the save counter
        self.variables: list[tuple[Any, str]] = []  # plain variables and their full names
        self.sources: list[tf.Variable] = []  # the tf.Variable behind each of those
        self.others: list[Any] = []  # frozen through their own _serialize_to_tensors
        self.read: Any = None  # a tf.function reading all of ``sources`` at once
        self.compiled: bool | None = None  # whether ``write`` does the saves (None: not tried)
        self.layout: list[list[tuple[str, ...]]] = []  # the tensor names of each of ``others``
        self.write: Any = None  # (path, snapshot values + [graph]) -> writes the files
        self.graph: Any = None  # the serialized object graph: it only depends on the objects
        self.replaced: list[int] = []  # the positions in ``sources`` of the replaced variables


class Snapshot:
    """The saved tensors at a save, in the order the plan's compiled write takes them.

    The values of ``plan.variables`` (one batched read), then the tensors of each of
    ``plan.others`` in ``plan.layout`` order.
    """

    def __init__(self, plan: Plan, values: list[Any]) -> None:
        self.plan = plan
        self.values = values


def stand_ins(plan: Plan, values: list[Any], frozen: list[Any]) -> SnapshotMap:
    """The object map that makes TF's saver write ``values`` in place of the live objects."""
    snapshot = SnapshotMap()
    for obj in plan.unchanged:
        snapshot[obj] = obj
    count = len(plan.variables)
    for (obj, full_name), value in zip(plan.variables, values[:count], strict=True):
        snapshot[obj] = FrozenVariable({VARIABLE_VALUE: value}, full_name)
    for obj, stand_in in zip(plan.others, frozen, strict=True):
        snapshot[obj] = stand_in
    return snapshot


COUNTER = -2  # in a compiled write's feed: the save counter, counted in the write
GRAPH = -1  # the serialized object graph, the last input of a compiled write


def traced_write(
    counter: tf.Variable, names: list[str], feed: list[int], values: list[Any], device: str
) -> Any:
    """A concrete function writing one checkpoint: the ``SaveV2`` that TF's saver runs.

    It takes the checkpoint's path and the snapshot values (with the object graph last) and
    counts the save in ``counter``, as ``CheckpointManager.save`` does, saving the new count.
    ``names[i]`` is written from input ``feed[i]``. Shapes are left open, so the leftover
    batches or a different iterator state do not trace it again.

    TF's saver writes a shard into a temporary directory and merges it into the checkpoint
    (``MergeV2Checkpoints``); with one shard the merge only renames the data file and copies
    the index, so this writes the checkpoint's own files directly: the same bytes, a third of
    a millisecond less. ``SaveV2`` writes each file under a temporary name and renames it when
    complete, so a save killed halfway leaves ``*.tempstate*`` files, never a partial one.
    """
    signature = (
        tf.TensorSpec((), tf.string),
        [tf.TensorSpec(None, value.dtype) for value in values] + [tf.TensorSpec((), tf.string)],
    )

    def write(prefix: tf.Tensor, inputs: list[tf.Tensor]) -> tf.Tensor:
        count = counter.assign_add(1, read_value=True)
        with tf.device("/device:CPU:0"):
            count = tf.identity(count)
        tensors = [count if source == COUNTER else inputs[source] for source in feed]
        with tf.device(device):
            saved = gen_io_ops.save_v2(prefix, names, [""] * len(names), tensors)
        # An output that needs the save: tf.function's automatic control dependencies do
        # not keep this SaveV2 on their own (the function would run without writing).
        with tf.control_dependencies([saved]):
            return tf.identity(prefix)

    return tf.function(write, input_signature=signature, autograph=False).get_concrete_function()


def eager_message(error: tf.errors.OpError) -> tf.errors.OpError:
    """``error`` of the compiled write, with the message the eager op would give.

    An op failing in a tf.function says "Graph execution error:" first, then where the op was
    traced, then what went wrong ("...ckpt-6.data-00000-of-00001...; Is a directory"): the
    error a failed write raises quotes its first line, so that line has to be the cause.
    """
    lines = error.message.splitlines()
    marker = next((i for i, line in enumerate(lines) if line.startswith("Detected at node")), -1)
    body = []
    for line in lines[marker + 1 :] if marker >= 0 else []:
        if line.lstrip().startswith("[[{{node"):
            break
        if line.strip() and not line.startswith(" "):  # the trace's lines are indented
            body.append(line)
    if not body:
        return error
    try:
        return type(error)(error.node_def, error.op, "\n".join(body))
    except TypeError:  # a class that wants more arguments: keep the error as it is
        return error


def delete_checkpoint_files(prefix: str) -> None:
    """Deletes the files of checkpoint ``prefix`` (``CheckpointManager``'s sweep of one).

    The files are named, not found by TF's pattern match, which lists the directory on a
    thread pool (a millisecond); only a checkpoint of several shards needs a listing.
    """
    data = [f"{prefix}.data-00000-of-00001"]
    if not files.exists(data[0]):
        data = files.glob(f"{prefix}.data-?????-of-?????")
    for name in [f"{prefix}.index", *data]:
        files.remove(name)  # nothing if someone else deleted it
