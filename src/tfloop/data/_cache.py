"""Tensors of read-only NumPy arrays, converted once and reused by every later call."""

from __future__ import annotations

import dataclasses
import threading
import weakref
from typing import TYPE_CHECKING, Any

import keras
import numpy as np
import tensorflow as tf

if TYPE_CHECKING:
    from tfloop.data._arrays import EpochPipeline

__all__ = ["TENSORS", "TensorCache"]

Nested = Any


class TensorCache:
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
    (see :class:`EpochPipeline`), so a later call with the same arrays reuses them as well.
    """

    MAX_PIPELINES = 2  # per cached array: a fit's training and validation pipelines, say

    def __init__(self) -> None:
        self._entries: dict[int, CacheEntry] = {}
        self._by_tensor: dict[int, CacheEntry] = {}
        # Reentrant: a garbage collection inside a locked region may run a weakref callback.
        self._lock = threading.RLock()

    def convert(self, array: np.ndarray) -> tf.Tensor:
        """``tf.convert_to_tensor(array)``, from the cache when the array cannot change."""
        if not is_immutable(array):
            return tf.convert_to_tensor(array)
        signature = array_signature(array)
        with self._lock:
            entry = self._entries.get(id(array))
            if entry is not None and entry.ref() is array and entry.signature == signature:
                return entry.tensor
        tensor = tf.convert_to_tensor(array)
        key = id(array)
        ref = weakref.ref(array, lambda r: self._drop(key, r))
        with self._lock:
            self._drop_locked(key, None)
            entry = CacheEntry(ref, signature, tensor)
            self._entries[key] = entry
            self._by_tensor[id(tensor)] = entry
        return tensor

    def pipelines_for(self, arrays: Nested) -> dict[Any, EpochPipeline]:
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
class CacheEntry:
    ref: weakref.ref[np.ndarray]
    signature: tuple[Any, ...]
    tensor: tf.Tensor
    pipelines: dict[Any, dict[Any, EpochPipeline]] = dataclasses.field(default_factory=dict)


def is_immutable(array: np.ndarray) -> bool:
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


def array_signature(array: np.ndarray) -> tuple[Any, ...]:
    return (array.ctypes.data, array.shape, array.strides, array.dtype.str)


TENSORS = TensorCache()
