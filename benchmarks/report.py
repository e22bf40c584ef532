"""Turns a workload run into figures: per-contender statistics, target ratios, Markdown, PNG.

Ratios between contenders are paired by repetition (both epochs ran back to back in the same
repetition), and the median, min and max over repetitions are reported.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from contenders import ALIASES
from suite import WorkloadRun, format_config
from workloads import PEAK, SHAPES, Ratio

RssResults = dict[str, dict[str, Any]]
"""Per contender: the JSON measurement of its ``--rss`` child process (or an "error")."""


@dataclass(frozen=True)
class Spread:
    """Median, min and max of some repeated measurement."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values))


@dataclass(frozen=True)
class ContenderRow:
    """Steady-state statistics of one contender."""

    name: str
    config: str
    samples_per_s: Spread
    flops_per_s: Spread
    warmup_s: float | None
    warmup_overhead_s: float | None
    """First epoch minus the median steady epoch: tracing and compiling."""
    first_epoch_loss: float | None
    """Same for contenders fed the same batches in the same order: a correctness check."""


@dataclass(frozen=True)
class Figure:
    """One ratio of the targets table, as measured in this run."""

    ratio: Ratio
    value: Spread | None
    note: str = ""

    @property
    def met(self) -> bool | None:
        """Whether the median meets the target (None: no target or not measured)."""
        return None if self.value is None else self.ratio.met(self.value.median)

    def as_json(self) -> dict[str, Any]:
        """The figure as a JSON-ready dict."""
        value = {} if self.value is None else asdict(self.value)
        return {
            "figure": self.ratio.label,
            "target": self.ratio.target_text,
            "met": self.met,
            "note": self.note,
        } | value


def contender_rows(run: WorkloadRun) -> dict[str, ContenderRow]:
    """Statistics of every contender that finished at least one repetition."""
    rows = {}
    for name, prepared in run.prepared.items():
        steady = [r for r in run.records if r.contender == name and r.phase == "steady"]
        if not steady:
            continue
        warmup = next((r for r in run.records if r.contender == name and r.phase == "warmup"), None)
        median_epoch = statistics.median(r.seconds for r in steady)
        rows[name] = ContenderRow(
            name=name,
            config=format_config(prepared.config),
            samples_per_s=Spread.of([r.samples_per_s for r in steady]),
            flops_per_s=Spread.of([r.flops_per_s for r in steady]),
            warmup_s=warmup.seconds if warmup else None,
            warmup_overhead_s=warmup.seconds - median_epoch if warmup else None,
            first_epoch_loss=warmup.loss if warmup else None,
        )
    return rows


def resolve(name: str, rows: dict[str, ContenderRow]) -> str | None:
    """The contender a figure's name stands for: itself, or an alias's fastest member."""
    members = [m for m in ALIASES.get(name, (name,)) if m in rows]
    return max(members, key=lambda m: rows[m].samples_per_s.median, default=None)


def _paired(run: WorkloadRun, numerator: str, denominator: str) -> Spread | None:
    """Spread over repetitions of numerator FLOP/s / denominator FLOP/s in the same repetition."""
    by_rep: dict[str, dict[int | None, float]] = {numerator: {}, denominator: {}}
    for record in run.records:
        if record.phase == "steady" and record.contender in by_rep:
            by_rep[record.contender][record.rep] = record.flops_per_s
    reps = by_rep[numerator].keys() & by_rep[denominator].keys()
    if not reps:
        return None
    return Spread.of([by_rep[numerator][r] / by_rep[denominator][r] for r in reps])


def _single(value: float | None, base: float | None) -> Spread | None:
    if value is None or not base:
        return None
    return Spread(value / base, value / base, value / base)


def _value(
    ratio: Ratio,
    numerator: str,
    denominator: str,
    run: WorkloadRun,
    rows: dict[str, ContenderRow],
    rss: RssResults,
) -> Spread | None:
    """The ratio's value for two resolved contender names."""
    if ratio.kind == "throughput":
        return _paired(run, numerator, denominator)
    if ratio.kind == "warmup" and not rss:
        return _single(rows[numerator].warmup_overhead_s, rows[denominator].warmup_overhead_s)
    if ratio.kind == "first-epoch" and not rss:
        return _single(rows[numerator].warmup_s, rows[denominator].warmup_s)
    key = {"warmup": "warmup_overhead_s", "first-epoch": "warmup_s"}.get(ratio.kind, "peak_rss_mb")
    return _single(*(rss.get(name, {}).get(key) for name in (numerator, denominator)))


def figure(
    ratio: Ratio, run: WorkloadRun, rows: dict[str, ContenderRow], rss: RssResults
) -> Figure:
    """Measure ``ratio`` in this run (value None, with a note, when it cannot be)."""
    if ratio.kind == "rss" and not rss:
        return Figure(ratio, None, "not measured (run with --rss)")
    if ratio.kind == "traces":
        return _traces_figure(ratio, run, rows)
    resolved = [(name, resolve(name, rows)) for name in (ratio.numerator, ratio.denominator)]
    missing = [name for name, found in resolved if found is None]
    numerator, denominator = (found for _, found in resolved)
    if numerator is None or denominator is None:
        return Figure(ratio, None, f"no result for {', '.join(missing)}")
    notes = [f"{name} = {found}" for name, found in resolved if found != name]
    if ratio.kind in ("warmup", "first-epoch"):
        notes.append("cold, separate processes" if rss else "in-process (cold with --rss)")
    note = "; ".join(notes)
    return Figure(ratio, _value(ratio, numerator, denominator, run, rows, rss), note)


def _traces_figure(ratio: Ratio, run: WorkloadRun, rows: dict[str, ContenderRow]) -> Figure:
    """Traces of the numerator's compiled function / distinct batch shapes of an epoch."""
    assert ratio.denominator == SHAPES
    name = resolve(ratio.numerator, rows)
    count = None if name is None else run.traces.get(name)
    shapes = len(run.batch_shapes)
    if count is None:
        return Figure(ratio, None, f"no trace count for {ratio.numerator}")
    note = f"{count} traces, {shapes} shapes"
    if name != ratio.numerator:
        note = f"{ratio.numerator} = {name}; {note}"
    return Figure(ratio, _single(float(count), float(shapes)), note)


def figures(run: WorkloadRun, rss: RssResults) -> list[Figure]:
    """Every ratio of the workload, measured in this run."""
    rows = contender_rows(run)
    return [figure(ratio, run, rows, rss) for ratio in run.workload.ratios]


# --- Markdown --------------------------------------------------------------------------------


def _spread_text(spread: Spread, scale: float = 1.0, digits: int = 0) -> list[str]:
    return [f"{v / scale:,.{digits}f}" for v in (spread.median, spread.low, spread.high)]


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def _contenders_table(rows: dict[str, ContenderRow]) -> str:
    header = [
        "contender",
        "config",
        "samples/s median",
        "min",
        "max",
        "GFLOP/s",
        "warm-up s",
        "first-epoch loss",
    ]
    body = [
        [
            row.name,
            row.config,
            *_spread_text(row.samples_per_s),
            f"{row.flops_per_s.median / 1e9:.1f}",
            "-" if row.warmup_s is None else f"{row.warmup_s:.1f}",
            "-" if row.first_epoch_loss is None else f"{row.first_epoch_loss:.4f}",
        ]
        for name, row in rows.items()
        if name != PEAK
    ]
    return _table(header, body)


def _figures_table(figs: list[Figure]) -> str:
    header = ["figure (same run)", "median", "min", "max", "target", "met", "note"]
    body = []
    for fig in figs:
        values = ["n/a"] * 3 if fig.value is None else _spread_text(fig.value, digits=2)
        met = {None: "-", True: "yes", False: "**no**"}[fig.met]
        body.append([fig.ratio.label, *values, fig.ratio.target_text, met, fig.note])
    return _table(header, body)


def _search_table(run: WorkloadRun) -> str:
    """The tuning pass: each configuration's fastest search epoch; the winner in bold."""
    body = []
    for name, prepared in run.prepared.items():
        best: dict[str, float] = {}
        for r in run.records:
            if r.contender == name and r.phase == "search":
                key = format_config(r.config)
                best[key] = max(best.get(key, 0.0), r.samples_per_s)
        winner = format_config(prepared.config)
        for config, rate in best.items():
            mark = "**" if config == winner else ""
            body.append([name, f"{mark}{config}{mark}", f"{rate:,.0f}"])
    return _table(["contender", "config", "fastest search epoch, samples/s"], body) if body else ""


def _rss_table(rss: RssResults) -> str:
    body = []
    for name, result in rss.items():
        if "error" in result:
            body.append([name, "failed", "", "", "", result["error"]])
            continue
        first = result["first_step_s"]
        body.append(
            [
                name,
                f"{result['peak_rss_mb']:.0f}",
                f"{result['data_rss_mb']:.0f}",
                "-" if first is None else f"{first:.2f}",
                f"{result['warmup_s']:.2f}",
                f"{result['warmup_overhead_s']:.2f}",
            ]
        )
    header = [
        "contender",
        "peak RSS MB",
        "RSS after data MB",
        "first step s",
        "first epoch s",
        "warm-up overhead s",
    ]
    return _table(header, body)


def _shape_text(shape: tuple[tuple[int, ...], ...]) -> str:
    """``((32, 16), (32, 10))`` -> ``32x16, 32x10``."""
    return ", ".join("x".join(str(d) for d in leaf) for leaf in shape)


def _traces_text(run: WorkloadRun) -> str:
    """The pipeline's batch shapes and how often each contender's function was traced."""
    shapes = sorted(run.batch_shapes.items(), key=lambda item: item[0][0][::-1])
    listed = "; ".join(f"{_shape_text(shape)} ({count:,})" for shape, count in shapes)
    traces = ", ".join(f"{name} {count}" for name, count in run.traces.items()) or "none read"
    return (
        f"Batch shapes in one epoch, counted from the pipeline: {len(shapes)} distinct in "
        f"{sum(run.batch_shapes.values()):,} batches ({listed}). Traces of each contender's "
        f"compiled function after the last repetition: {traces} (the superbatch hand loop "
        "compiles once per superbatch shape; Keras does not say)."
    )


def markdown(
    run: WorkloadRun, figs: list[Figure], rss: RssResults, reps: int, chart: str | None
) -> str:
    """The Markdown report of one workload."""
    workload = run.workload
    rows = contender_rows(run)
    parts = [
        f"## `{workload.name}`: {workload.description}",
        f"{run.num_samples:,} samples per epoch; R = {reps} interleaved repetitions of one steady "
        "epoch per contender; median, min and max over repetitions.",
        _contenders_table(rows),
    ]
    if PEAK in rows:
        m, k, n = workload.peak_matmul or (0, 0, 0)
        peak = _spread_text(rows[PEAK].flops_per_s, scale=1e9, digits=1)
        parts.append(
            f"Matmul peak, XLA `while_loop` of [{m},{k}]x[{k},{n}] matmuls: "
            f"{peak[0]} GFLOP/s (min {peak[1]}, max {peak[2]})."
        )
    parts.append(_figures_table(figs))
    if run.batch_shapes:
        parts.append(_traces_text(run))
    if chart:
        parts.append(f"![{workload.name} ratios]({chart})")
    search = _search_table(run)
    if search:
        parts += ["Search pass (each configuration's fastest epoch; the winner in bold):", search]
    if rss:
        parts += [
            "Each contender alone in a fresh process (`--rss`): peak RSS (`VmHWM`), time from "
            "the first fit call to the end of the first compiled execution, first epoch, and "
            "warm-up overhead (first epoch minus second):",
            _rss_table(rss),
        ]
    if run.failures:
        parts.append("Failed: " + "; ".join(f"`{label}`" for label in run.failures))
    return "\n\n".join(parts) + "\n"


# --- Chart -----------------------------------------------------------------------------------


def chart(figs: list[Figure], title: str, path: Path) -> bool:
    """A horizontal bar chart of the measured ratios with min-max whiskers and targets.

    Returns False (and writes nothing) when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    shown = [f for f in figs if f.value is not None]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(shown) + 1.2))
    positions = range(len(shown))
    medians = [f.value.median for f in shown]  # type: ignore[union-attr]
    errors = [
        [f.value.median - f.value.low for f in shown],  # type: ignore[union-attr]
        [f.value.high - f.value.median for f in shown],  # type: ignore[union-attr]
    ]
    colors = [{True: "tab:green", False: "tab:red", None: "tab:gray"}[f.met] for f in shown]
    ax.barh(positions, medians, xerr=errors, color=colors, capsize=3)
    for y, f in zip(positions, shown, strict=True):
        if f.ratio.target is not None:
            ax.plot([f.ratio.target] * 2, [y - 0.4, y + 0.4], color="black", linewidth=2)
    ax.set_yticks(list(positions), [f.ratio.label for f in shown])
    ax.invert_yaxis()
    ax.set_xlabel("ratio (median, min-max whiskers; black tick = target)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
