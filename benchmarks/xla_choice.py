"""tfloop with XLA against tfloop without it, on every workload: what ``jit_compile="auto"``
should choose (docs/execution.md).

    python benchmarks/xla_choice.py [--workload NAME ...] [--reps R] [--samples N] [--quick]

For each workload, in one process, ``tfloop-xla`` (``jit_compile=True``) and ``tfloop-noxla``
(``jit_compile=False``) are prepared (their first epoch: tracing, compiling) and then timed
for R interleaved steady epochs, as ``bench.py`` times every contender. Printed per workload:
steady samples/s of each, the paired ratio XLA / no XLA (median, min, max over the
repetitions), both first epochs and both warm-up overheads (first epoch minus the median
steady epoch), and how many steady epochs XLA needs to win its extra warm-up back (when it
is faster). Each first epoch is in-process: the first contender of the first workload pays
TensorFlow's one-time start-up, so the order alternates between workloads.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ALL = (
    "mlp",
    "mlp-accum",
    "wide-mlp",
    "linear",
    "cnn",
    "text",
    "mlp-ds",
    "tfrecord",
    "transformer",
    "lstm",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", nargs="+", default=list(ALL))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--samples", type=int, help="samples per epoch (whole batches)")
    parser.add_argument("--quick", action="store_true", help="2,048 samples, 1 repetition")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE))
    import bench

    bench.configure_environment("cpu")
    from suite import run_workload
    from workloads import WORKLOADS, Ratio

    rows = []
    for index, name in enumerate(args.workload):
        base = WORKLOADS[name]
        order = ("tfloop-xla", "tfloop-noxla")
        workload = dataclasses.replace(
            base,
            contenders=order if index % 2 == 0 else order[::-1],
            ratios=(Ratio("tfloop-xla", "tfloop-noxla"),),
        )
        samples = bench.QUICK_SAMPLES + base.remainder if args.quick else base.num_samples
        if args.samples and not args.quick:
            samples = max(base.batch_size, args.samples // base.batch_size * base.batch_size)
            samples += base.remainder
        run = run_workload(
            workload,
            num_samples=samples,
            reps=1 if args.quick else args.reps,
            search_epochs=0,
            seed=bench.SEED,
            log=bench.log,
        )
        rows.append(_row(name, run))
    print()
    print(
        "| workload | samples/epoch | XLA samples/s | no XLA samples/s | XLA / no XLA "
        "(min, max) | first epoch XLA s | no XLA s | warm-up XLA s | no XLA s | "
        "epochs to win back |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


def _row(name: str, run: object) -> list[str]:
    records = run.records  # type: ignore[attr-defined]

    def of(contender: str, phase: str) -> list[object]:
        return [r for r in records if r.contender == contender and r.phase == phase]

    steady = {c: of(c, "steady") for c in ("tfloop-xla", "tfloop-noxla")}
    if not all(steady.values()):
        return [name, "failed", *["-"] * 8]
    first = {c: of(c, "warmup")[0].seconds for c in steady}  # type: ignore[attr-defined]
    median_epoch = {c: statistics.median(r.seconds for r in steady[c]) for c in steady}  # type: ignore[attr-defined]
    rate = {c: statistics.median(r.samples_per_s for r in steady[c]) for c in steady}  # type: ignore[attr-defined]
    by_rep = {c: {r.rep: r.samples_per_s for r in steady[c]} for c in steady}  # type: ignore[attr-defined]
    reps = by_rep["tfloop-xla"].keys() & by_rep["tfloop-noxla"].keys()
    ratios = [by_rep["tfloop-xla"][r] / by_rep["tfloop-noxla"][r] for r in reps]
    warmup = {c: first[c] - median_epoch[c] for c in steady}
    gain = median_epoch["tfloop-noxla"] - median_epoch["tfloop-xla"]
    extra = warmup["tfloop-xla"] - warmup["tfloop-noxla"]
    if extra <= 0:
        win_back = "0 (XLA warms up faster)"
    elif gain <= 0:
        win_back = "never"
    else:
        win_back = f"{extra / gain:.1f}"
    return [
        name,
        f"{run.num_samples:,}",  # type: ignore[attr-defined]
        f"{rate['tfloop-xla']:,.0f}",
        f"{rate['tfloop-noxla']:,.0f}",
        f"{statistics.median(ratios):.2f} ({min(ratios):.2f}, {max(ratios):.2f})",
        f"{first['tfloop-xla']:.1f}",
        f"{first['tfloop-noxla']:.1f}",
        f"{warmup['tfloop-xla']:.1f}",
        f"{warmup['tfloop-noxla']:.1f}",
        win_back,
    ]


if __name__ == "__main__":
    sys.exit(main())
