"""What a checkpoint says about the run besides its variables: position, state, leftover batches.

The metadata is one JSON string variable in the checkpoint (read without loading any weight),
holding the format version, the update count, the data :class:`~tfloop.data.Position` and the
run's host state (the shuffle seed, the open accumulation window, the callbacks' state). The
batches already pulled from a ``tf.data`` iterator but not run yet are serialized tensors in a
second variable, so a resume continues at exactly the next step even when a save lands in the
middle of a superbatch.

Examples:
    >>> import tensorflow as tf
    >>> runs = [(tf.zeros([2, 3]), tf.ones([2]))]
    >>> fields, tensor = encode_leftover(runs)
    >>> decoded = decode_leftover(fields, tensor.numpy())
    >>> [tuple(t.shape) for t in decoded[0]]
    [(2, 3), (2,)]
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any

import tensorflow as tf

from tfloop.data import Position

__all__ = [
    "CORRUPT_ERRORS",
    "FORMAT_VERSION",
    "decode_leftover",
    "encode_leftover",
    "position_of",
]

FORMAT_VERSION = 1

# What TF raises for a truncated or altered checkpoint file; IndexError and ValueError come
# from its readers on some kinds of garbage.
CORRUPT_ERRORS = (tf.errors.OpError, IndexError, ValueError, KeyError, json.JSONDecodeError)

_POSITION_FIELDS = tuple(field.name for field in dataclasses.fields(Position))


def position_of(metadata: dict[str, Any]) -> Position:
    """The data position a checkpoint's metadata records."""
    return Position(**{name: metadata[name] for name in _POSITION_FIELDS if name in metadata})


def encode_leftover(runs: list[Any]) -> tuple[dict[str, Any], tf.Tensor]:
    """The metadata fields and the string tensor that save ``runs`` (nests of tensors)."""
    if not runs:
        return {"leftover_runs": 0}, _no_leftover()
    leaves = [tf.io.serialize_tensor(t) for run in runs for t in tf.nest.flatten(run)]
    fields = {
        "leftover_runs": len(runs),
        "leftover_dtypes": [t.dtype.name for t in tf.nest.flatten(runs[0])],
        "leftover_structure": json.dumps(_structure(runs[0])),
    }
    return fields, tf.stack(leaves)


def decode_leftover(metadata: dict[str, Any], flat: Any) -> list[Any]:
    """The runs :func:`encode_leftover` saved, from the metadata and the saved strings."""
    if not metadata.get("leftover_runs"):
        return []
    dtypes = [tf.as_dtype(d) for d in metadata["leftover_dtypes"]]
    structure = json.loads(metadata["leftover_structure"])
    per_run = len(dtypes)
    runs = []
    for index in range(metadata["leftover_runs"]):
        leaves = [tf.io.parse_tensor(flat[index * per_run + j], dtypes[j]) for j in range(per_run)]
        runs.append(_unflatten(structure, leaves))
    return runs


@functools.cache
def _no_leftover() -> tf.Tensor:
    """The leftover batches when there are none (made once, not at every save)."""
    return tf.constant([], tf.string)


def _structure(nested: Any) -> Any:
    """A JSON description of a nest of tensors (tuples, lists, dicts), leaves as ``null``."""
    if isinstance(nested, dict):
        return {"dict": {k: _structure(v) for k, v in nested.items()}}
    if isinstance(nested, (tuple, list)):
        return {"tuple": [_structure(v) for v in nested]}
    return None


def _unflatten(structure: Any, leaves: list[Any]) -> Any:
    def build(node: Any) -> Any:
        if node is None:
            return leaves.pop(0)
        if "dict" in node:
            return {k: build(v) for k, v in sorted(node["dict"].items())}
        return tuple(build(v) for v in node["tuple"])

    leaves = list(leaves)
    return build(structure)
