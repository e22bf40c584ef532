"""tfloop with XLA against tfloop without it, on every workload: what ``jit_compile="auto"``
should choose (docs/execution.md).

    python benchmarks/xla_choice.py [--workload NAME ...] [--reps R] [--samples N] [--quick]

For each workload, in one process, ``tfloop-xla`` (``jit_compile=True``) and ``tfloop-noxla``
(``jit_compile=False``) are prepared (their first epoch: tracing, compiling) and then timed
for R interleaved steady epochs, as ``bench.py`` times every contender. Then each is started
``--cold`` times, alternately, alone in a fresh process (``bench.py --child``): its first epoch
and its warm-up overhead (first epoch minus second) there, cold, are the figures (in-process
first epochs depend on the order). Printed per workload: the paired steady ratio XLA / no
XLA (median, min, max over the repetitions), each one's median steady epoch, the median cold
first epochs and warm-ups, and how many steady epochs XLA needs to win its extra warm-up back
(its warm-up minus the plain graph's, over the median steady epoch's difference).
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
    parser.add_argument("--cold", type=int, default=2, help="fresh processes per contender")
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
        cold = _cold(args, name, samples)
        rows.append(_row(name, run, cold))
    print()
    print(
        "| workload | samples/epoch | steady XLA / no XLA (min, max) | steady epoch XLA s | "
        "no XLA s | first epoch XLA s | no XLA s | warm-up XLA s | no XLA s | "
        "epochs to win back |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


def _cold(args: argparse.Namespace, name: str, samples: int) -> dict[str, list[dict[str, float]]]:
    """``--cold`` fresh-process measurements of each contender, alternating."""
    import bench

    child_args = argparse.Namespace(device="cpu", quick=args.quick, samples=samples)
    results: dict[str, list[dict[str, float]]] = {"tfloop-xla": [], "tfloop-noxla": []}
    for _ in range(0 if args.cold < 1 else args.cold):
        for contender in results:
            result = bench._run_child(child_args, name, contender, {})
            if "error" not in result:
                results[contender].append(result)
                bench.log(
                    f"[{name}] cold          {contender:17} first epoch "
                    f"{result['warmup_s']:.1f} s, warm-up {result['warmup_overhead_s']:.1f} s"
                )
    return results


def _row(name: str, run: object, cold: dict[str, list[dict[str, float]]]) -> list[str]:
    records = run.records  # type: ignore[attr-defined]

    def of(contender: str, phase: str) -> list[object]:
        return [r for r in records if r.contender == contender and r.phase == phase]

    steady = {c: of(c, "steady") for c in ("tfloop-xla", "tfloop-noxla")}
    if not all(steady.values()):
        return [name, "failed", *["-"] * 8]
    median_epoch = {c: statistics.median(r.seconds for r in steady[c]) for c in steady}  # type: ignore[attr-defined]
    by_rep = {c: {r.rep: r.samples_per_s for r in steady[c]} for c in steady}  # type: ignore[attr-defined]
    reps = by_rep["tfloop-xla"].keys() & by_rep["tfloop-noxla"].keys()
    ratios = [by_rep["tfloop-xla"][r] / by_rep["tfloop-noxla"][r] for r in reps]
    if all(cold.values()):
        first = {c: statistics.median(m["warmup_s"] for m in cold[c]) for c in steady}
        warmup = {c: statistics.median(m["warmup_overhead_s"] for m in cold[c]) for c in steady}
    else:  # in-process
        first = {c: of(c, "warmup")[0].seconds for c in steady}  # type: ignore[attr-defined]
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
        f"{statistics.median(ratios):.2f} ({min(ratios):.2f}, {max(ratios):.2f})",
        f"{median_epoch['tfloop-xla']:.3f}",
        f"{median_epoch['tfloop-noxla']:.3f}",
        f"{first['tfloop-xla']:.1f}",
        f"{first['tfloop-noxla']:.1f}",
        f"{warmup['tfloop-xla']:.1f}",
        f"{warmup['tfloop-noxla']:.1f}",
        win_back,
    ]


if __name__ == "__main__":
    sys.exit(main())
