"""Log keys and the helpers that turn the compiled loop's results into host logs.

The logs a callback sees are plain ``{name: float}`` dicts. Besides the metrics they may hold
the counters ``step`` (optimizer updates so far) and ``batch`` (index of the last micro-batch
an execution ran), and ``non_finite_steps`` under a non-finite policy. The loop's results also
carry the open accumulation window (``WINDOW``), which is state, never a log.

Examples:
    >>> floats({"loss": np.float32(0.5), "step": np.int64(3)})
    {'loss': 0.5, 'step': 3.0}
    >>> format_logs({"loss": 0.25, "step": 3.0, "batch": 2.0})
    'loss: 0.2500'
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

__all__ = [
    "BATCH",
    "COUNTERS",
    "NON_FINITE_STEPS",
    "STEP",
    "WINDOW",
    "floats",
    "format_logs",
    "without",
]

STEP = "step"
BATCH = "batch"
NON_FINITE_STEPS = "non_finite_steps"
WINDOW = "_window"
"""Micro-batches in the open accumulation window: loop state handed to the controller."""

COUNTERS = (STEP, BATCH)
"""Counters in batch logs: not metrics, not curves."""


def floats(values: Mapping[str, Any]) -> dict[str, float]:
    """Each value as a float; a step method's non-scalar value logs its mean."""
    return {name: float(np.asarray(value).mean()) for name, value in values.items()}


def without(logs: Mapping[str, Any], names: Iterable[str]) -> dict[str, Any]:
    """``logs`` without the keys in ``names``."""
    drop = set(names)
    return {name: value for name, value in logs.items() if name not in drop}


def format_logs(logs: Mapping[str, float]) -> str:
    """``"loss: 0.1234 - accuracy: 0.9500"``, skipping the ``step`` and ``batch`` counters."""
    return " - ".join(f"{name}: {value:.4f}" for name, value in without(logs, COUNTERS).items())
