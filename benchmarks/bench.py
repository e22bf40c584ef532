"""tfloop benchmark suite: same-run, interleaved throughput ratios (see BENCHMARKS.md).

    python benchmarks/bench.py --workload mlp --reps 5 [--quick] [--rss] [--write-docs]

Writes ``benchmarks/results/<timestamp>.json`` (one record per contender and epoch) and a
PNG chart per workload next to it, and prints a Markdown report; ``--write-docs`` also writes
``docs/benchmarks.md``. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from contenders import Config
    from suite import WorkloadRun

HERE = Path(__file__).resolve().parent
DOCS = HERE.parent / "docs"
QUICK_SAMPLES = 2_048
QUICK_WORKLOADS = ["mlp", "mlp-ds", "tfrecord", "text", "transformer", "lstm"]
"""What ``--quick`` runs when no ``--workload`` is given: the default workload, the
tf.data ones (whose input paths differ from mlp's) and the real Keras models."""
SEED = 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; parsed before TensorFlow is imported (it sets the environment)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workload",
        nargs="+",
        metavar="NAME",
        help="mlp, mlp-accum, wide-mlp, cnn, linear, mlp-ds, tfrecord, text, transformer, "
        "lstm, or all "
        f"(default: mlp; with --quick: {' '.join(QUICK_WORKLOADS)})",
    )
    parser.add_argument(
        "--reps", type=int, help="interleaved repetitions (default 5; 1 with --quick)"
    )
    parser.add_argument(
        "--search-epochs",
        type=int,
        help="timed epochs per configuration when tuning a contender (default 2; 1 with --quick)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test: {QUICK_SAMPLES:,} samples, 1 repetition; measures nothing meaningful",
    )
    parser.add_argument(
        "--samples",
        type=int,
        help="samples per epoch instead of the workload's own (e.g. a shorter wide-mlp run); "
        "rounded down to whole batches",
    )
    parser.add_argument(
        "--contenders",
        nargs="+",
        metavar="NAME",
        help="run only these contenders of each workload (default: all of them); a ratio is "
        "reported when both of its sides ran",
    )
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument(
        "--rss",
        action="store_true",
        help="also run each contender alone in a subprocess: peak RSS and time to first step",
    )
    parser.add_argument("--write-docs", action="store_true", help="write docs/benchmarks.md")
    parser.add_argument("--results-dir", type=Path, default=HERE / "results")
    parser.add_argument("--child", metavar="CONTENDER", help=argparse.SUPPRESS)
    parser.add_argument("--child-config", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.workload = args.workload or (QUICK_WORKLOADS if args.quick else ["mlp"])
    args.reps = args.reps or (1 if args.quick else 5)
    if args.samples is not None and args.samples < 1:
        parser.error(f"--samples must be a positive number of samples, got {args.samples}")
    args.search_epochs = args.search_epochs or (1 if args.quick else 2)
    return args


def configure_environment(device: str) -> None:
    """Quiet TensorFlow's C++ logging and, for ``--device cpu``, hide any GPU."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = "-1"


def log(message: str) -> None:
    """One progress line, flushed at once (safe when stdout is not a terminal)."""
    print(message, flush=True)


def versions() -> dict[str, Any]:
    """Versions and machine facts for the JSON file."""
    import keras
    import numpy as np
    import tensorflow as tf

    try:
        import tfloop

        tfloop_version = getattr(tfloop, "__version__", "unknown")
    except Exception as error:
        tfloop_version = f"not importable ({type(error).__name__}: {error})"
    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "tfloop": tfloop_version,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
    }


def _run_child(
    args: argparse.Namespace, workload: str, name: str, config: Config
) -> dict[str, Any]:
    """Measure one contender in a fresh ``--child`` process; {"error": ...} if it fails."""
    command = [sys.executable, str(Path(__file__).resolve()), "--workload", workload]
    command += ["--device", args.device, "--child", name, "--child-config", json.dumps(config)]
    command += ["--quick"] if args.quick else []
    command += ["--samples", str(args.samples)] if args.samples else []
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def measure_rss(args: argparse.Namespace, run: WorkloadRun) -> dict[str, dict[str, Any]]:
    """Run each prepared contender, with its chosen config, alone in a fresh process."""
    from workloads import PEAK

    results = {}
    for name, prepared in run.prepared.items():
        if name == PEAK:
            continue
        results[name] = result = _run_child(args, run.workload.name, name, prepared.config)
        if "error" in result:
            summary = f"FAILED: {result['error']}"
        else:
            first_step = result["first_step_s"]
            first_text = "-" if first_step is None else f"{first_step:.2f} s"
            summary = f"peak RSS {result['peak_rss_mb']:,.0f} MB, first step {first_text}"
        log(f"[{run.workload.name}] rss           {name:17} {summary}")
    return results


def run_child(args: argparse.Namespace) -> None:
    """``--child``: measure one contender in this fresh process; print one JSON line."""
    from suite import child_measurement
    from workloads import WORKLOADS

    workload = WORKLOADS[args.workload[0]]
    num_samples = _num_samples(args, workload)
    result = child_measurement(
        workload,
        name=args.child,
        config=json.loads(args.child_config),
        num_samples=num_samples,
        seed=SEED,
    )
    print(json.dumps(result))


def _num_samples(args: argparse.Namespace, workload: Any) -> int:
    """Samples per epoch: ``--quick``'s, ``--samples`` (whole batches), or the workload's; plus
    the workload's partial last batch, if it has one (``mlp-ds``)."""
    if args.quick:
        return QUICK_SAMPLES + int(workload.remainder)
    if args.samples:
        whole = max(workload.batch_size, args.samples // workload.batch_size * workload.batch_size)
        return whole + int(workload.remainder)
    return int(workload.num_samples)


def _docs_page(sections: list[str], meta: dict[str, Any]) -> str:
    env = meta["versions"]
    return (
        "# Benchmarks\n\n"
        f"Generated by `python benchmarks/bench.py {' '.join(meta['argv'])}` on {meta['timestamp']} "
        f"(TensorFlow {env['tensorflow']}, Keras {env['keras']}, tfloop {env['tfloop']}, "
        f"{env['cpus']} CPUs, {meta['device']}).\n\n"
        "Every figure is a ratio measured in one process run with the contenders interleaved; "
        "absolute samples/s move by 2x between runs on shared machines, so never compare them "
        "across runs. Protocol and targets: `BENCHMARKS.md`; method: `benchmarks/README.md`.\n\n"
        + "\n".join(sections)
    )


def run_meta(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    """What was run, where, with which versions: the JSON file's "meta"."""
    return {
        "timestamp": time.strftime("%Y%m%dT%H%M%S"),
        "argv": sys.argv[1:] if argv is None else argv,
        "device": args.device,
        "reps": args.reps,
        "search_epochs": args.search_epochs,
        "quick": args.quick,
        "samples": args.samples,
        "versions": versions(),
    }


def run_and_report(
    args: argparse.Namespace, name: str, stamp: str
) -> tuple[str, str, dict[str, Any]]:
    """Run one workload; return its Markdown (printed, docs) and its JSON entry."""
    from report import chart, figures, markdown
    from suite import run_workload
    from workloads import WORKLOADS

    workload = WORKLOADS[name]
    run = run_workload(
        workload,
        num_samples=_num_samples(args, workload),
        reps=args.reps,
        search_epochs=args.search_epochs,
        seed=SEED,
        log=log,
        only=args.contenders,
    )
    rss = measure_rss(args, run) if args.rss else {}
    figs = figures(run, rss)
    title = f"{name}: same-run ratios"
    png = args.results_dir / f"{stamp}-{name}.png"
    printed = markdown(run, figs, rss, args.reps, str(png) if chart(figs, title, png) else None)
    docs = ""
    if args.write_docs:
        DOCS.mkdir(exist_ok=True)
        doc_png = DOCS / f"benchmarks-{name}.png"
        docs = markdown(
            run, figs, rss, args.reps, doc_png.name if chart(figs, title, doc_png) else None
        )
    entry = {
        "records": [asdict(r) for r in run.records],
        "chosen_configs": {n: p.config for n, p in run.prepared.items()},
        "figures": [f.as_json() for f in figs],
        "rss": rss,
        "failures": run.failures,
        "traces": run.traces,
        "batch_shapes": [
            {"shape": [list(leaf) for leaf in shape], "batches": count}
            for shape, count in run.batch_shapes.items()
        ],
    }
    return printed, docs, entry


def main(argv: list[str] | None = None) -> int:
    """Run the suite; returns the process exit status."""
    args = parse_args(argv)
    configure_environment(args.device)
    sys.path.insert(0, str(HERE))
    import tensorflow as tf
    from workloads import WORKLOADS

    names = list(WORKLOADS) if args.workload == ["all"] else args.workload
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        log(f"unknown workload(s) {unknown}; choose from {list(WORKLOADS)} or all")
        return 2
    if args.child:
        run_child(args)
        return 0
    if args.device == "gpu" and not tf.config.list_physical_devices("GPU"):
        log("--device gpu: no GPU is visible to TensorFlow")
        return 2

    args.results_dir.mkdir(parents=True, exist_ok=True)
    meta = run_meta(args, argv)
    output: dict[str, Any] = {"meta": meta, "workloads": {}}
    printed, docs = [], []
    for name in names:
        text, doc_text, output["workloads"][name] = run_and_report(args, name, meta["timestamp"])
        printed.append(text)
        docs.append(doc_text)
    results_file = args.results_dir / f"{meta['timestamp']}.json"
    results_file.write_text(json.dumps(output, indent=1))
    print("\n" + "\n".join(printed), flush=True)
    log(f"results: {results_file}")
    if args.write_docs:
        (DOCS / "benchmarks.md").write_text(_docs_page(docs, meta))
        log(f"docs: {DOCS / 'benchmarks.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
