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
    "INTERNAL",
    "LABEL_ERRORS",
    "LOSS_COUNT",
    "NON_FINITE_STEPS",
    "STEP",
    "WINDOW",
    "as_list",
    "flatten",
    "floats",
    "format_logs",
    "metric_results",
    "without",
]

STEP = "step"
BATCH = "batch"
NON_FINITE_STEPS = "non_finite_steps"
WINDOW = "_window"
"""Micro-batches in the open accumulation window: loop state handed to the controller."""

COUNTERS = (STEP, BATCH)
"""Counters in batch logs: not metrics, not curves."""

LOSS_COUNT = "_loss_count"
"""What the ``loss`` tracker counted: a ``loss`` nothing measured (a ``train_step`` override
that returns its own values) is left out of the logs."""

LABEL_ERRORS = "_label_errors"
"""Labels outside their output's classes this epoch, counted under XLA (``_labels.py``)."""

INTERNAL = (STEP, WINDOW, NON_FINITE_STEPS)
"""What a loop's results carry besides the metrics."""


def metric_results(metrics: Iterable[Any]) -> dict[str, Any]:
    """Each metric's result by name; a metric whose result is a dict (Keras's compiled
    metrics: ``<output>_<metric>``) adds its entries. A metric not built yet (a compiled
    metric nothing updated) has no result."""
    results: dict[str, Any] = {}
    for metric in metrics:
        if not getattr(metric, "built", True):
            continue
        result = metric.result()
        if isinstance(result, dict):
            results.update(result)
        else:
            results[metric.name] = result
    return results


def as_list(logs: Mapping[str, float]) -> Any:
    """Keras's ``return_dict=False`` form: the loss, then the per-output losses (in their
    order), then the other values in sorted order; the loss alone if there is nothing else.

    Examples:
        >>> as_list({"loss": 1.0, "b_loss": 0.5, "a_loss": 0.5, "a_mae": 0.1, "a_acc": 0.9})
        [1.0, 0.5, 0.5, 0.9, 0.1]
    """
    losses = [key for key in logs if key == "loss" or key.endswith("_loss")]
    losses.sort(key=lambda key: key != "loss")
    others = sorted(key for key in logs if key not in losses)
    values = [logs[key] for key in [*losses, *others]]
    return values[0] if len(values) == 1 else values


def flatten(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with each nested dict's entries in its place, as Keras's ``pythonify_logs``
    flattens logs: a ``{m.name: m.result() for m in metrics}`` whose ``CompileMetrics`` gives
    ``{"compile_metrics": {"mae": ...}}`` logs ``mae``. Sorted by key; a later key wins.

    Examples:
        >>> flatten({"loss": 1.0, "compile_metrics": {"mae": 0.5, "mse": 0.25}})
        {'mae': 0.5, 'mse': 0.25, 'loss': 1.0}
    """
    flat: dict[str, Any] = {}
    for name in sorted(values):
        value = values[name]
        if isinstance(value, Mapping):
            flat.update(flatten(value))
        else:
            flat[name] = value
    return flat


def floats(values: Mapping[str, Any]) -> dict[str, float]:
    """Each value as a float (a step method's non-scalar value logs its mean), in sorted key
    order, as Keras gives logs to callbacks (nested dicts flattened, :func:`flatten`);
    ``loss`` only if something measured it."""
    values = flatten(values)
    logs = {name: float(np.asarray(values[name]).mean()) for name in sorted(values)}
    if logs.pop(LOSS_COUNT, 1.0) == 0.0:
        logs.pop("loss", None)
    logs.pop(LABEL_ERRORS, None)
    return logs


def without(logs: Mapping[str, Any], names: Iterable[str]) -> dict[str, Any]:
    """``logs`` without the keys in ``names``."""
    drop = set(names)
    return {name: value for name, value in logs.items() if name not in drop}


def format_logs(logs: Mapping[str, float]) -> str:
    """``"loss: 0.1234 - accuracy: 0.9500"``, skipping the ``step`` and ``batch`` counters."""
    return " - ".join(f"{name}: {value:.4f}" for name, value in without(logs, COUNTERS).items())
