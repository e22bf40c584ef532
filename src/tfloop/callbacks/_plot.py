"""Draws loss and metric curves to a PNG with matplotlib (the ``plot`` extra)."""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Sequence
from typing import Any

from tfloop.errors import ConfigError
from tfloop.io import checks, files

__all__ = ["Record", "plot_curves", "read_epoch_records"]

# Keys that are counters or rates rather than curves worth a panel of their own by default.
_NOT_CURVES = ("epoch", "step", "batch", "time", "event", "non_finite_steps")


Record = tuple[int, dict[str, float]]  # (epoch, that epoch's logs)


def read_epoch_records(path: str | os.PathLike[str]) -> list[Record]:
    """``(epoch, logs)`` from the ``"epoch"`` records of a JSONLLogger file, by epoch.

    A run restarted without a checkpointed offset may have written an epoch twice; the last
    record of an epoch wins. ``null`` (NaN/Inf when written) reads back as NaN.
    """
    by_epoch: dict[int, dict[str, float]] = {}
    text = files.read_text(checks.check_scheme(path, "the JSONL log"))
    for number, line in enumerate(text.splitlines(keepends=True), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if not line.endswith("\n"):
                break  # a partial last line of a killed run
            raise ConfigError(f"{path}: line {number} is not JSON ({error.msg}).") from error
        if isinstance(record, dict) and record.get("event") == "epoch":
            by_epoch[int(record["epoch"])] = {
                key: _number(value)
                for key, value in record.items()
                if key not in _NOT_CURVES and (value is None or _is_number(value))
            }
    return sorted(by_epoch.items())


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(value: Any) -> float:
    return float(value) if _is_number(value) else math.nan


def plot_curves(
    records: Sequence[Record],
    path: str | os.PathLike[str],
    keys: Sequence[str] | None = None,
    title: str | None = None,
) -> str:
    """Writes one panel per quantity (``loss``, ``accuracy``, ...), with its training and
    ``val_`` curves together, to the PNG ``path``; returns the path."""
    out = checks.check_scheme(path, "the plot's path")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ConfigError(
            "plotting needs matplotlib: pip install 'tfloop[plot]' (or pip install matplotlib)."
        ) from error
    available = sorted({key for _, logs in records for key in logs})
    names = list(keys) if keys is not None else [k for k in available if k not in _NOT_CURVES]
    unknown = [name for name in names if name not in available]
    if unknown or not names:
        raise ConfigError(
            f"keys: {', '.join(unknown) or '(nothing to plot)'} not in the history; "
            f"available keys: {', '.join(available) or '(none)'}."
        )
    panels: dict[str, list[str]] = {}
    for name in names:
        panels.setdefault(name.removeprefix("val_"), []).append(name)
    figure = Figure(figsize=(4.5 * len(panels), 3.4), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (panel, members) in zip(axes, panels.items(), strict=True):
        for name in sorted(members, key=lambda n: n.startswith("val_")):
            # Epochs are 1-based on the axis, as in the progress lines.
            points = [(epoch + 1, logs[name]) for epoch, logs in records if name in logs]
            label = "validation" if name.startswith("val_") else "training"
            ax.plot(*zip(*points, strict=True), marker=".", label=label)
        ax.set_title(panel)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        figure.suptitle(title)
    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=100)
    files.makedirs(files.split(out)[0])
    files.publish(out, image.getvalue())
    return out
