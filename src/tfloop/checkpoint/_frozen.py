"""Frozen stand-ins for saved objects, and the walk of a checkpoint's object graph.

A background write must save the state of the exact update the save was due at, while training
goes on. So at the save every saved object is replaced, through the checkpoint's object map (the
hook TF's own async checkpointing uses), by a stand-in holding the tensors it had then: variable
reads, which TF keeps immutable by copy-on-write, and serialized iterator states.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf
from tensorflow.python.checkpoint import saveable_compat
from tensorflow.python.checkpoint import util as checkpoint_util
from tensorflow.python.ops import resource_variable_ops
from tensorflow.python.saved_model import registration
from tensorflow.python.trackable import base as trackable_base
from tensorflow.python.trackable import python_state
from tensorflow.python.training.saving import saveable_object, saveable_object_util
from tensorflow.python.util import object_identity

from tfloop.errors import CheckpointError

__all__ = [
    "CANNOT_FREEZE",
    "VARIABLE_VALUE",
    "Edge",
    "Frozen",
    "FrozenVariable",
    "SnapshotMap",
    "freeze",
    "leaves",
    "plain_variable",
    "same_edges",
    "walk",
]


class SnapshotMap(object_identity.ObjectIdentityDictionary):  # type: ignore[misc]
    """Each saved object -> its frozen stand-in (or itself when it saves no tensors).

    TF's saver looks every object of the graph up here (``get``) while it writes. An object
    that was not there at the snapshot would be written with its live value, so it stops the
    write with an error instead, before any file is made.
    """

    def get(self, key: Any, default: Any = None) -> Any:
        if key not in self:
            raise CheckpointError(
                f"an object ({type(key).__name__}) was added to the saved state during a "
                "background checkpoint write; pass Checkpointer(async_save=False) if the model "
                "or optimizer gains state while training."
            )
        return self[key]


Edge = tuple[int, str, Any]  # (index of the parent in the walk, name, child)


def walk(view: Any) -> tuple[list[Any], list[Edge]]:
    """The saved objects in the order TF's saver visits them, and every edge between them.

    The breadth-first walk of ``ObjectGraphView.breadth_first_traversal``, which also names
    each object by the first path that reaches it: two walks with the same edges have the
    same objects, checkpoint keys and object graph.
    """
    root = view.root
    objects = [root]
    seen = {id(root)}
    edges: list[Edge] = []
    index = 0
    while index < len(objects):
        for name, child in children(view, objects[index], index == 0).items():
            edges.append((index, name, child))
            if id(child) not in seen:
                seen.add(id(child))
                objects.append(child)
        index += 1
    return objects, edges


def children(view: Any, obj: Any, root: bool) -> dict[str, Any]:
    """``view.children(obj)``, asked of ``obj`` directly when that gives the same.

    The view also initializes the object's tracking (two attribute sets, slow on Keras
    layers), converts children that are not Trackables, and adds the root's attached
    dependencies (the save counter): the walk of every save takes half the time without.
    """
    if root or not hasattr(obj, "_self_unconditional_checkpoint_dependencies"):
        return dict(view.children(obj))
    children: dict[str, Any] = obj._trackable_children(trackable_base.SaveType.CHECKPOINT)
    if all(isinstance(child, trackable_base.Trackable) for child in children.values()):
        return children
    return dict(view.children(obj))


def same_edges(old: list[Edge], new: list[Edge]) -> bool:
    """Whether two walks saw the same graph (objects compared by identity, never ``==``)."""
    return len(old) == len(new) and all(
        a[0] == b[0] and a[1] == b[1] and a[2] is b[2] for a, b in zip(old, new, strict=True)
    )


def leaves(
    tensors: dict[str, Any], path: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], Any]]:
    """The tensors of a frozen object's (nested) dict, each with its path of names."""
    found: list[tuple[tuple[str, ...], Any]] = []
    for name, value in tensors.items():
        if isinstance(value, dict):
            found.extend(leaves(value, (*path, name)))
        else:
            found.append(((*path, name), value))
    return found


def plain_variable(obj: Any) -> tf.Variable | None:
    """The ResourceVariable behind ``obj`` if it saves just that variable's value."""
    if isinstance(obj, keras.Variable):
        obj = obj.value
    if type(obj) in (
        resource_variable_ops.ResourceVariable,
        resource_variable_ops.UninitializedVariable,
    ):
        return obj
    return None


class Frozen(trackable_base.Trackable):  # type: ignore[misc]
    """Stands in for a saved object in a background write: the tensors it had at the save."""

    def __init__(self, tensors: dict[str, Any], full_name: str) -> None:
        self._tensors = tensors
        self._shared_name = full_name  # written to the object graph, as for the original

    def _serialize_to_tensors(self) -> dict[str, Any]:
        return self._tensors


class FrozenVariable(Frozen):
    """A frozen variable: TF writes a variable's name into the object graph, so this one too."""

    _should_act_as_resource_variable = True
    _save_slice_info = None


CANNOT_FREEZE = object()
"""What ``freeze`` returns for an object whose state cannot be frozen."""


VARIABLE_VALUE = trackable_base.VARIABLE_VALUE_KEY


def freeze(obj: Any) -> Any:
    """A frozen copy of what ``obj`` saves; None if it saves nothing; or CANNOT_FREEZE."""
    if isinstance(obj, python_state.PythonState) or registration.get_registered_saver_name(obj):
        return CANNOT_FREEZE
    if not saveable_object_util.trackable_has_serialize_to_tensor(obj):
        # Legacy SaveableObjects are read when written: they cannot be frozen.
        return CANNOT_FREEZE if obj._gather_saveables_for_checkpoint() else None
    tensors = frozen_values(obj._serialize_to_tensors())
    if tensors is CANNOT_FREEZE:
        return CANNOT_FREEZE
    kind = FrozenVariable if resource_variable_ops.is_resource_variable(obj) else Frozen
    frozen = kind(tensors, checkpoint_util.get_full_name(obj))
    legacy_name = saveable_compat.get_saveable_name(obj)
    if legacy_name:
        # The name its tensors are saved under (a tf.data iterator's is "ITERATOR"): the
        # stand-in's tensors must get the same checkpoint keys.
        saveable_compat.legacy_saveable_name(legacy_name)(frozen)
    return frozen


def frozen_values(values: dict[str, Any]) -> Any:
    """Evaluates what ``_serialize_to_tensors`` returned into tensors that will not change.

    A variable read is immutable: TF copies a variable's buffer before updating it while a
    read of it is alive (copy-on-write), so later training steps do not reach the snapshot.
    """
    frozen: dict[str, Any] = {}
    for name, value in values.items():
        if isinstance(value, dict):
            value = frozen_values(value)
        elif isinstance(value, saveable_object.SaveSpec):
            value = None if value.slice_spec else value.tensor  # a Callable reads the variable
        elif isinstance(value, tf.Variable) or resource_variable_ops.is_resource_variable(value):
            value = value.read_value()
        if value is CANNOT_FREEZE or not (isinstance(value, dict) or tf.is_tensor(value)):
            return CANNOT_FREEZE
        frozen[name] = value
    return frozen
