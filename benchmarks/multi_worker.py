"""Per-worker input on localhost ``MultiWorkerMirroredStrategy`` clusters (strategy.py
``--multi-worker``; the protocol is in its docstring).

Each cluster run is a set of worker processes of ``strategy.py --worker SPEC OUT``, each in its own
process group, killed (by group id) if the run outlives its timeout. A worker trains the ``mlp``
model on the TFRecord set for a few epochs, validating every epoch on a second set, then
evaluates on it, counting the records its own pipelines read (a counter in the parse function):
in training, in each validation pass and in ``evaluate``. The chief times every epoch.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

RECORDS_PER_FILE, FEATURES, CLASSES, GLOBAL_BATCH = 2048, 784, 10, 256
TIMEOUT = 900.0


def write_files(directory: str, files: int) -> None:
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    for f in range(files):
        x = rng.random((RECORDS_PER_FILE, FEATURES), dtype=np.float32)
        labels = rng.integers(0, CLASSES, RECORDS_PER_FILE)
        with tf.io.TFRecordWriter(os.path.join(directory, f"part-{f:03d}.tfrecord")) as writer:
            for row, label in zip(x, labels, strict=True):
                feature = {
                    "x": tf.train.Feature(float_list=tf.train.FloatList(value=row)),
                    "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
                }
                example = tf.train.Example(features=tf.train.Features(feature=feature))
                writer.write(example.SerializeToString())


def _parse(counter: Any) -> Any:
    import tensorflow as tf

    spec = {
        "x": tf.io.FixedLenFeature([FEATURES], tf.float32),
        "label": tf.io.FixedLenFeature([], tf.int64),
    }

    def parse(records: Any) -> Any:
        counter.assign_add(tf.size(records, tf.int64))  # records this pipeline read
        parsed = tf.io.parse_example(records, spec)
        return parsed["x"], tf.one_hot(parsed["label"], CLASSES)

    return parse


def make_input(kind: str, directory: str, counter: Any) -> Any:
    """The training input of ``kind`` (see strategy.py's docstring), global batch GLOBAL_BATCH."""
    import tensorflow as tf

    files = sorted(glob.glob(os.path.join(directory, "*.tfrecord")))
    autotune = tf.data.AUTOTUNE

    def records(names: Any, batch: int) -> Any:
        dataset = names.interleave(tf.data.TFRecordDataset, cycle_length=4, num_parallel_calls=4)
        return dataset.batch(batch).map(_parse(counter), num_parallel_calls=autotune)

    if kind == "function":

        def dataset_fn(context: tf.distribute.InputContext) -> Any:
            names = tf.data.Dataset.from_tensor_slices(files)
            names = names.shard(context.num_input_pipelines, context.input_pipeline_id)
            batch = context.get_per_replica_batch_size(GLOBAL_BATCH)
            return records(names, batch).prefetch(autotune)

        return dataset_fn
    if kind == "data":  # in memory: the records parsed once, then sharded by data every epoch
        x = []
        for batch_x, _ in records(tf.data.Dataset.from_tensor_slices(files), 4096):
            x.append(batch_x.numpy())
        counter.assign(0)
        import numpy as np

        features = np.concatenate(x)
        labels = tf.one_hot(np.arange(len(features)) % CLASSES, CLASSES)
        dataset = tf.data.Dataset.from_tensor_slices((features, labels))

        def count(a: Any, b: Any) -> Any:
            counter.assign_add(1)
            return a, b

        return dataset.map(count).batch(GLOBAL_BATCH).prefetch(autotune)
    dataset = records(tf.data.Dataset.from_tensor_slices(files), GLOBAL_BATCH).prefetch(autotune)
    if kind == "off":
        options = tf.data.Options()
        policy = tf.data.experimental.AutoShardPolicy.OFF
        options.experimental_distribute.auto_shard_policy = policy
        dataset = dataset.with_options(options)
    return dataset


def run_worker(spec_json: str, out: str) -> int:
    """One worker of a cluster run (TF_CONFIG is set by the launcher)."""
    spec = json.loads(spec_json)
    import keras
    import tensorflow as tf

    import tfloop

    strategy = tf.distribute.MultiWorkerMirroredStrategy(
        communication_options=tf.distribute.experimental.CommunicationOptions(timeout_seconds=300)
    )
    counter = tf.Variable(0, dtype=tf.int64)
    data = make_input(spec["input"], spec["files"], counter)
    seen = tf.Variable(0, dtype=tf.int64)  # the validation pipelines' reads
    validation = make_input(spec["input"], spec["validation"], seen)
    passes: list[int] = []
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [
                keras.Input((FEATURES,)),
                keras.layers.Dense(128, activation="relu"),
                keras.layers.Dense(CLASSES, activation="softmax"),
            ]
        )
    ends: list[float] = []

    class Clock(tfloop.Callback):
        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            ends.append(time.perf_counter())

        def on_eval_start(self, logs: Any = None) -> None:
            if self.trainer is not None and self.trainer.run_info.in_fit:
                seen.assign(0)  # fit's check of the validation data read some: not a pass's

        def on_eval_end(self, logs: Any = None) -> None:
            if self.trainer is not None and self.trainer.run_info.in_fit:
                passes.append(int(seen.numpy()))

    trainer = tfloop.Trainer(
        model, "adam", "categorical_crossentropy", strategy=strategy, callbacks=[Clock()]
    )
    start = time.perf_counter()
    trainer.fit(data, epochs=spec["epochs"], verbose=0, validation_data=validation)
    times = [b - a for a, b in zip([start, *ends[:-1]], ends, strict=True)]
    evaluation = make_input(spec["input"], spec["validation"], seen)
    seen.assign(0)
    trainer.evaluate(evaluation)
    result = {
        "epoch_seconds": times,
        "reads": int(counter.numpy()),
        "validation_reads": passes,
        "evaluate_reads": int(seen.numpy()),
    }
    with open(out, "w") as file:
        json.dump(result, file)
    return 0


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def run_cluster(workers: int, spec: dict[str, Any], scratch: str) -> list[dict[str, Any]]:
    """One cluster run of ``workers`` localhost processes; each worker's results."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in _free_ports(workers)]}
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "strategy.py")
    outs = [os.path.join(scratch, f"worker-{index}.json") for index in range(workers)]
    processes = []
    for index in range(workers):
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
        task = {"type": "worker", "index": index}
        env["TF_CONFIG"] = json.dumps({"cluster": cluster, "task": task})
        processes.append(
            subprocess.Popen(
                [sys.executable, script, "--worker", json.dumps(spec), outs[index]],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
        )
    deadline = time.monotonic() + TIMEOUT
    try:
        for process in processes:
            output, _ = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
            if process.returncode != 0:
                raise RuntimeError(f"a worker failed:\n{output[-3000:]}")
    finally:
        for process in processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.communicate()
    results = []
    for out in outs:
        with open(out) as file:
            results.append(json.load(file))
    return results


def run_clusters(args: argparse.Namespace) -> int:
    scratch = tempfile.mkdtemp(prefix="tfloop-multi-worker-")
    files = os.path.join(scratch, "files")
    os.makedirs(files)
    write_files(files, args.files)
    validation = os.path.join(scratch, "validation")
    os.makedirs(validation)
    write_files(validation, args.validation_files)
    examples = args.files * RECORDS_PER_FILE
    held_out = args.validation_files * RECORDS_PER_FILE
    print(
        f"{args.files} files x {RECORDS_PER_FILE} records (validation: {args.validation_files} "
        f"files), global batch {GLOBAL_BATCH}"
    )
    rows = []
    evaluation_rows = []
    for kind in args.inputs:
        spec = {"input": kind, "files": files, "validation": validation, "epochs": args.epochs}
        rates: dict[int, list[float]] = {1: [], args.workers: []}
        reads: list[float] = []
        validation_reads: list[float] = []
        evaluate_reads: list[float] = []
        for rep in range(args.reps):
            for workers in (1, args.workers) if rep % 2 == 0 else (args.workers, 1):
                results = run_cluster(workers, spec, scratch)
                steady = results[0]["epoch_seconds"][1:] or results[0]["epoch_seconds"]
                rates[workers].append(examples / statistics.median(steady))
                if workers == args.workers:
                    reads += [r["reads"] / args.epochs / examples for r in results]
                    validation_reads += [
                        n / held_out for r in results for n in r["validation_reads"]
                    ]
                    evaluate_reads += [r["evaluate_reads"] / held_out for r in results]
                print(
                    f"rep {rep + 1}/{args.reps} {kind}, {workers} worker(s): "
                    f"{rates[workers][-1]:,.0f} examples/s",
                    flush=True,
                )
        ratios = [a / b for a, b in zip(rates[args.workers], rates[1], strict=True)]
        rows.append((kind, reads, rates, ratios))
        evaluation_rows.append((kind, validation_reads, evaluate_reads))
    target = 1 / args.workers + 1 / args.files
    print(
        f"\n| input | records read per worker / records per epoch (target <= {target:.3f}) "
        f"| examples/s, {args.workers} workers vs 1 | {args.workers} workers / 1 |"
    )
    print("| --- | --- | --- | --- |")
    for kind, reads, rates, ratios in rows:
        print(
            f"| {kind} | {statistics.median(reads):.3f} [{min(reads):.3f}, {max(reads):.3f}] "
            f"| {statistics.median(rates[args.workers]):,.0f} vs "
            f"{statistics.median(rates[1]):,.0f} | {statistics.median(ratios):.2f} "
            f"[{min(ratios):.2f}, {max(ratios):.2f}] |"
        )
    print(
        f"\n| input | records read per worker / validation set: each validation pass "
        f"| in evaluate | ({args.workers} workers) |"
    )
    print("| --- | --- | --- | --- |")
    for kind, validation_reads, evaluate_reads in evaluation_rows:
        print(f"| {kind} | {_spread(validation_reads)} | {_spread(evaluate_reads)} | |")
    return 0


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} [{min(values):.3f}, {max(values):.3f}]"
