"""Distribution benchmarks: ``MirroredStrategy`` on one machine, per-worker input on two.

Default: the ``mlp`` workload under ``tf.distribute.MirroredStrategy``, same run, interleaved.
Contenders: tfloop with no strategy, and under ``MirroredStrategy`` with 1 and with 2 devices.
On a CPU machine the devices are logical CPUs split from the one physical CPU, so the
two-device run shows the cost of the distribution machinery (one ``strategy.run`` per step, the
cross-replica update), not a speed-up; on a machine with two GPUs pass ``--device gpu``.

    python benchmarks/strategy.py [--reps 5] [--samples 60000] [--device cpu|gpu] [--quick]

Prints samples/s per contender (median, min, max over the repetitions, steady epochs only)
and the ratios to the no-strategy run.

``--multi-worker``: ``MultiWorkerMirroredStrategy`` clusters of localhost worker processes
(``--workers``, default 2) against a one-worker cluster, launched alternately (``--reps`` times
each), on a TFRecord set the script writes (``--files`` files, parsed every epoch). For each input
form (``--inputs``: ``file`` = a dataset auto-sharded by file, ``function`` = a dataset function
sharding the files itself, ``data`` = an in-memory dataset auto-sharded by data, ``off`` =
auto-sharding turned off, every worker reading everything) it reports the records each worker's
pipeline read per epoch / the records of an epoch (target <= 1 / workers + one file's share), and
the cluster's steady throughput (examples/s of the global batch) against the one-worker cluster.
Each fit validates every epoch on a validation set of ``--validation-files`` files in the same
form, and the trained model is then evaluated on it: the records each worker read per
validation pass, and in ``evaluate``, / the records of the validation set are reported too.

    python benchmarks/strategy.py --multi-worker [--reps 3] [--inputs file function data off]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--samples", type=int, default=60_000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny data, 1 rep")
    parser.add_argument("--multi-worker", action="store_true", help="localhost worker clusters")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--validation-files", type=int, default=4)
    parser.add_argument("--inputs", nargs="+", default=["file", "function", "data", "off"])
    parser.add_argument("--epochs", type=int, default=4, help="epochs per cluster run")
    parser.add_argument("--worker", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        from multi_worker import run_worker

        return run_worker(*args.worker)
    if args.multi_worker:
        from multi_worker import run_clusters

        if args.quick:
            args.reps, args.epochs, args.inputs = 1, 2, ["file"]
        return run_clusters(args)
    if args.quick:
        args.reps, args.samples = 1, 2_048

    import tensorflow as tf

    if args.device == "cpu":
        # Two logical CPUs, set up before TensorFlow touches the device.
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2
        )
        devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    else:
        devices = [d.name for d in tf.config.list_logical_devices("GPU")]
        if len(devices) < 2:
            print("--device gpu needs two GPUs", file=sys.stderr)
            return 2

    import keras
    import numpy as np

    import tfloop

    rng = np.random.default_rng(0)
    x = rng.random((args.samples, 784), dtype=np.float32)
    y = keras.utils.to_categorical(rng.integers(0, 10, args.samples), 10).astype("float32")

    def make_trainer(strategy: tf.distribute.Strategy | None) -> tfloop.Trainer:
        scope = strategy.scope() if strategy is not None else tf.distribute.get_strategy().scope()
        with scope:
            keras.utils.set_random_seed(0)
            model = keras.Sequential(
                [
                    keras.Input((784,)),
                    keras.layers.Dense(128, activation="relu"),
                    keras.layers.Dense(10, activation="softmax"),
                ]
            )
        return tfloop.Trainer(
            model, "adam", "categorical_crossentropy", metrics=["accuracy"], strategy=strategy
        )

    # One strategy object per device set for the whole run (see docs/distribution.md).
    contenders = {
        "tfloop (no strategy)": make_trainer(None),
        "MirroredStrategy, 1 device": make_trainer(tf.distribute.MirroredStrategy(devices[:1])),
        "MirroredStrategy, 2 devices": make_trainer(tf.distribute.MirroredStrategy(devices[:2])),
    }
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    for trainer in contenders.values():  # warm-up epoch: tracing, not timed
        trainer.fit((x, y), batch_size=args.batch_size, epochs=1, verbose=0)
    for rep in range(args.reps):
        names = list(contenders)
        names = names[rep % len(names) :] + names[: rep % len(names)]  # rotate the order
        for name in names:
            start = time.perf_counter()
            contenders[name].fit((x, y), batch_size=args.batch_size, epochs=1, verbose=0)
            rates[name].append(args.samples / (time.perf_counter() - start))
            print(f"rep {rep + 1}/{args.reps} {name}: {rates[name][-1]:,.0f} samples/s", flush=True)

    base = statistics.median(rates["tfloop (no strategy)"])
    print("\n| contender | samples/s median [min, max] | / no strategy |")
    print("| --- | --- | --- |")
    for name, values in rates.items():
        median = statistics.median(values)
        print(
            f"| {name} | {median:,.0f} [{min(values):,.0f}, {max(values):,.0f}] "
            f"| {median / base:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
