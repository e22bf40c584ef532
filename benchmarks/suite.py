"""Runs one workload: build and tune every contender, then time interleaved repetitions.

A contender that fails (tfloop not importable, an unsupported option, ...) is reported and
left out; it never stops the suite.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from contenders import (
    CONTENDERS,
    BatchShape,
    Config,
    Contender,
    EpochFn,
    FirstStepProbe,
    Setup,
    close_epoch_fn,
    traces_of,
)
from workloads import PEAK, Workload

Log = Callable[[str], None]


@dataclass(frozen=True)
class Record:
    """One timed epoch of one contender (one JSON record)."""

    workload: str
    contender: str
    config: Config
    phase: str
    """"warmup" (first epoch: tracing, compiling), "steady" (timed repetition), or, for a
    tuned contender's candidate configurations, "search-warmup" and "search"."""
    rep: int | None
    seconds: float
    samples: int
    samples_per_s: float
    flops_per_s: float
    loss: float | None
    excluded_seconds: float = 0.0
    """Time the contender left out of ``seconds`` (``EpochFn.excluded_seconds``): the
    validation passes of tfloop-val1000, whose figure is about the train steps between them."""


@dataclass
class Prepared:
    """A built contender with one configuration; after the search, the one that is timed."""

    contender: Contender
    config: Config
    epoch: EpochFn
    flops_per_sample: float


@dataclass
class WorkloadRun:
    """Everything measured for one workload in this run."""

    workload: Workload
    num_samples: int
    records: list[Record] = field(default_factory=list)
    prepared: dict[str, Prepared] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    traces: dict[str, int] = field(default_factory=dict)
    """Per contender that can tell: how often its compiled train function was traced, read
    after the last repetition (tfloop: its compiled loop; hand loops: their tf.function)."""
    batch_shapes: dict[BatchShape, int] = field(default_factory=dict)
    """Batches per shape in one epoch of the pipeline, counted (workloads with a traces
    figure only)."""


def format_config(config: Config) -> str:
    """``{"steps_per_execution": 64, "jit_compile": True}`` -> ``steps_per_execution=64 jit_compile=True``."""
    return " ".join(f"{key}={value}" for key, value in config.items()) or "-"


def _describe(error: BaseException) -> str:
    """One line naming the error, for the progress log and the JSON file."""
    return f"{type(error).__name__}: {error}".splitlines()[0]


class _Timer:
    """Times epochs of one workload run, records them and prints one line per epoch."""

    def __init__(self, run: WorkloadRun, log: Log) -> None:
        self.run = run
        self.log = log

    def epoch(self, candidate: Prepared, *, phase: str, rep: int | None = None) -> Record:
        """Run and time one epoch of ``candidate``."""
        start = time.perf_counter()
        loss = candidate.epoch()
        seconds = time.perf_counter() - start
        excluded_fn = getattr(candidate.epoch, "excluded_seconds", None)
        excluded = excluded_fn() if excluded_fn is not None else 0.0
        seconds -= excluded
        samples = self.run.num_samples
        record = Record(
            workload=self.run.workload.name,
            contender=candidate.contender.name,
            config=candidate.config,
            phase=phase,
            rep=rep,
            seconds=seconds,
            samples=samples,
            samples_per_s=samples / seconds,
            flops_per_s=samples * candidate.flops_per_sample / seconds,
            loss=loss,
            excluded_seconds=excluded,
        )
        self.run.records.append(record)
        self._print(record)
        return record

    def _print(self, record: Record) -> None:
        where = record.phase if record.rep is None else f"rep {record.rep}"
        loss = "" if record.loss is None else f", loss {record.loss:.4f}"
        self.log(
            f"[{record.workload}] {where:13} {record.contender:17} "
            f"{format_config(record.config):40} {record.samples_per_s:>9,.0f} samples/s "
            f"({record.seconds:.2f} s{loss})"
        )

    def failure(self, label: str, error: Exception) -> None:
        """Report a failed contender or configuration and keep its traceback."""
        self.log(f"[{self.run.workload.name}] FAILED {label}: {_describe(error)} (continuing)")
        self.run.failures[label] = traceback.format_exc()


def _warm_up(candidate: Prepared, timer: _Timer, search_epochs: int) -> float:
    """Run the first epoch; when searching, rank the candidate by its fastest next epochs."""
    if search_epochs == 0:
        timer.epoch(candidate, phase="warmup")
        return 0.0
    timer.epoch(candidate, phase="search-warmup")
    return max(timer.epoch(candidate, phase="search").samples_per_s for _ in range(search_epochs))


def _prepare(
    contender: Contender, setup: Setup, timer: _Timer, search_epochs: int
) -> Prepared | None:
    """Build and warm up every configuration of ``contender``; keep the fastest.

    With one configuration this is just the warm-up epoch. With several, each is warmed up and
    then timed for ``search_epochs`` epochs, and the fastest of those epochs ranks it. Returns
    None when every configuration fails.
    """
    flops = contender.flops_per_sample(setup.workload)
    epochs = search_epochs if len(contender.configs) > 1 else 0
    best: tuple[float, Prepared] | None = None
    for config in _useful_configs(contender.configs, setup):
        label = f"{contender.name} {format_config(config)}"
        candidate = None
        try:
            candidate = Prepared(contender, config, contender.build(setup, config), flops)
            rate = _warm_up(candidate, timer, epochs)
        except ImportError as error:  # e.g. tfloop not installed: no other config will do better
            timer.failure(label, error)
            return None
        except Exception as error:
            timer.failure(label, error)
            if candidate is not None:
                close_epoch_fn(candidate.epoch)
            continue
        if best is None or rate > best[0]:
            if best is not None:
                close_epoch_fn(best[1].epoch)
            best = (rate, candidate)
        else:
            close_epoch_fn(candidate.epoch)
    return None if best is None else best[1]


def _useful_configs(configs: tuple[Config, ...], setup: Setup) -> list[Config]:
    """``configs`` without the ``steps_per_execution`` values above the steps of an epoch
    (they run like the epoch's own count, over a superbatch padded to the larger size)."""
    steps = max(1, setup.num_batches)
    kept = [c for c in configs if int(c.get("steps_per_execution", 1)) <= steps]
    return kept or list(configs[:1])


def _promote_winner_warmup(run: WorkloadRun, winner: Prepared) -> None:
    """Report the search winner's first epoch as the contender's warm-up."""
    key = (winner.contender.name, "search-warmup", winner.config)
    run.records = [
        replace(r, phase="warmup") if (r.contender, r.phase, r.config) == key else r
        for r in run.records
    ]


def run_workload(
    workload: Workload,
    *,
    num_samples: int,
    reps: int,
    search_epochs: int,
    seed: int,
    log: Log,
    only: Sequence[str] | None = None,
) -> WorkloadRun:
    """Prepare every contender of ``workload`` (or those in ``only``), then time ``reps``
    interleaved repetitions."""
    run = WorkloadRun(workload, num_samples)
    timer = _Timer(run, log)
    x, y = workload.make_data(num_samples, seed)
    setup = Setup(workload, x, y, seed)
    if any(ratio.kind == "traces" for ratio in workload.ratios):
        run.batch_shapes = dict(setup.batch_shapes)
        log(
            f"[{workload.name}] {len(run.batch_shapes)} distinct batch shapes in an epoch of "
            f"{sum(run.batch_shapes.values()):,} batches"
        )
    names = (*workload.contenders, PEAK) if workload.peak_matmul else workload.contenders
    if only:
        names = tuple(name for name in names if name in only)
    for name in names:
        prepared = _prepare(CONTENDERS[name], setup, timer, search_epochs)
        if prepared is not None:
            _promote_winner_warmup(run, prepared)
            run.prepared[name] = prepared
    for rep in range(1, reps + 1):
        # Rotate the order every repetition: a contender can slow the one that runs after it
        # (an autotuned tf.data iterator may stall when it is torn down), and rotation spreads
        # that over everyone instead of always charging the same neighbour.
        order = list(run.prepared.values())
        shift = (rep - 1) % max(1, len(order))
        for prepared in order[shift:] + order[:shift]:
            if prepared.contender.name in run.prepared:
                _time_rep(run, timer, prepared, rep)
    for name, prepared in run.prepared.items():
        count = traces_of(prepared.epoch)
        if count is not None:
            run.traces[name] = count
        close_epoch_fn(prepared.epoch)
    return run


def _time_rep(run: WorkloadRun, timer: _Timer, prepared: Prepared, rep: int) -> None:
    """One steady epoch of one contender; a failure drops it from the remaining repetitions."""
    try:
        timer.epoch(prepared, phase="steady", rep=rep)
    except Exception as error:
        timer.failure(f"{prepared.contender.name} in rep {rep}", error)
        close_epoch_fn(prepared.epoch)
        del run.prepared[prepared.contender.name]


def peak_rss_mb() -> float:
    """This process's peak resident set size in MB.

    Reads ``VmHWM`` from /proc/self/status: unlike ``ru_maxrss``, it is not inherited from
    the parent across fork + exec (a child of a 1 GB parent would report at least 1 GB).
    Falls back to ``ru_maxrss`` where /proc is missing.
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_measurement(
    workload: Workload, *, name: str, config: Config, num_samples: int, seed: int
) -> dict[str, Any]:
    """Peak RSS and time to first step of one contender, run alone in this (fresh) process.

    Builds the data, then the contender, runs its first epoch with a first-step probe and a
    second epoch, and reports the process's peak resident set (after the data and at the end)
    and the cold warm-up overhead (first epoch minus second).
    """
    x, y = workload.make_data(num_samples, seed)
    probe = FirstStepProbe()
    setup = Setup(workload, x, y, seed, probe=probe)
    data_rss_mb = peak_rss_mb()
    epoch = CONTENDERS[name].build(setup, config)
    start = time.perf_counter()
    probe.begin()
    epoch()
    second = time.perf_counter()
    epoch()
    end = time.perf_counter()
    close_epoch_fn(epoch)
    return {
        "contender": name,
        "config": config,
        "peak_rss_mb": peak_rss_mb(),
        "data_rss_mb": data_rss_mb,
        "first_step_s": probe.seconds,
        "warmup_s": second - start,
        "warmup_overhead_s": (second - start) - (end - second),
    }
