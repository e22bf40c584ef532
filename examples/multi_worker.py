"""Training on several machines: MultiWorkerMirroredStrategy, each worker reading its own files.

The digits (scikit-learn's, offline) are written as TFRecord files, and a model trains on them
under ``tf.distribute.MultiWorkerMirroredStrategy``. tfloop gives each worker its own files (a
dataset is auto-sharded by file, as in Keras; ``--input function`` shows the same with a
dataset function that shards by its ``InputContext``), so each worker reads about 1/N of the
data. The weights end up identical on every worker, and equal to training on one device on the
same global batches.

On a cluster, run this script on every machine, each with a ``TF_CONFIG`` naming the cluster
and the machine's place in it, the files and the checkpoints on storage every machine reads::

    TF_CONFIG='{"cluster": {"worker": ["host0:12345", "host1:12345"]},
                "task": {"type": "worker", "index": 0}}' \\
        python examples/multi_worker.py --data-dir /shared/digits --output-dir /shared/run

Without ``TF_CONFIG`` it shows itself on this machine: it starts ``--workers`` processes of
itself on 127.0.0.1, each with its ``TF_CONFIG``. They stop by themselves, or are killed after
``--timeout`` seconds.

    python examples/multi_worker.py --workers 2 --epochs 5
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from _datasets import IMAGE_SIZE, NUM_CLASSES, load_digits

import tfloop

FILES = 8
GLOBAL_BATCH_SIZE = 64


def write_digits(directory: str) -> None:
    """The digits' training split as FILES TFRecord files of serialized examples."""
    (x, y), _ = load_digits()
    os.makedirs(directory, exist_ok=True)
    for f in range(FILES):
        path = os.path.join(directory, f"digits-{f:02d}-of-{FILES:02d}.tfrecord")
        with tf.io.TFRecordWriter(path) as writer:
            for image, label in zip(x[f::FILES], y[f::FILES], strict=True):
                example = {
                    "image": tf.train.Feature(float_list=tf.train.FloatList(value=image.ravel())),
                    "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
                }
                record = tf.train.Example(features=tf.train.Features(feature=example))
                writer.write(record.SerializeToString())


def parse(records: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    spec = {
        "image": tf.io.FixedLenFeature([IMAGE_SIZE, IMAGE_SIZE], tf.float32),
        "label": tf.io.FixedLenFeature([], tf.int64),
    }
    parsed = tf.io.parse_example(records, spec)
    return parsed["image"], parsed["label"]


def make_dataset(data_dir: str) -> tf.data.Dataset:
    """Every file, batched by the *global* batch size: under MultiWorkerMirroredStrategy tfloop
    gives each worker its files and its share of each global batch (auto-sharding by file)."""
    files = tf.data.Dataset.from_tensor_slices(sorted(glob.glob(f"{data_dir}/*.tfrecord")))
    records = files.interleave(tf.data.TFRecordDataset, cycle_length=2)
    records = records.shuffle(512, seed=0)  # seeded: the order is part of a resume
    return records.batch(GLOBAL_BATCH_SIZE).map(parse).prefetch(tf.data.AUTOTUNE)


def make_dataset_fn(data_dir: str) -> Any:
    """The same input as a dataset function (TensorFlow's distribute_datasets_from_function
    convention): tfloop calls it on each worker with its InputContext."""

    def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        files = tf.data.Dataset.from_tensor_slices(sorted(glob.glob(f"{data_dir}/*.tfrecord")))
        files = files.shard(context.num_input_pipelines, context.input_pipeline_id)
        records = files.interleave(tf.data.TFRecordDataset, cycle_length=2)
        records = records.shuffle(512, seed=0)
        batch_size = context.get_per_replica_batch_size(GLOBAL_BATCH_SIZE)
        return records.batch(batch_size).map(parse).prefetch(tf.data.AUTOTUNE)

    return dataset_fn


def train(args: argparse.Namespace) -> dict[str, Any]:
    """One worker's part (TF_CONFIG set): train, evaluate, write this worker's result."""
    # First of all: TensorFlow sets up its collectives when the strategy is made.
    strategy = tf.distribute.MultiWorkerMirroredStrategy(
        # Without a timeout, a worker whose peer stops without failing waits forever.
        communication_options=tf.distribute.experimental.CommunicationOptions(timeout_seconds=120)
    )
    data = make_dataset(args.data_dir)  # or make_dataset_fn(args.data_dir)
    if args.input == "function":
        data = make_dataset_fn(args.data_dir)
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [
                keras.Input((IMAGE_SIZE, IMAGE_SIZE)),
                keras.layers.Flatten(),
                keras.layers.Dense(128, activation="relu"),
                keras.layers.Dense(NUM_CLASSES, activation="softmax"),
            ]
        )
    trainer = tfloop.Trainer(
        model,
        "adam",
        "sparse_categorical_crossentropy",
        metrics=["accuracy"],
        strategy=strategy,
        # Every worker gives the same directory (shared storage); the chief writes the
        # checkpoints, each worker its own input position next to them.
        checkpoint=tfloop.Checkpointer(os.path.join(args.output_dir, "checkpoints")),
    )
    trainer.fit(data, epochs=args.epochs, verbose=0)
    _, (x_test, y_test) = load_digits()
    result = {
        "accuracy": trainer.evaluate((x_test, y_test))["accuracy"],
        "checksum": float(sum(np.abs(w).sum() for w in model.get_weights())),
        "steps": int(trainer.optimizer.iterations.numpy()),
    }
    task = json.loads(os.environ["TF_CONFIG"])["task"]
    with open(os.path.join(args.output_dir, f"worker-{task['index']}.json"), "w") as file:
        json.dump(result, file)
    return result


def run_locally(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    """Starts ``args.workers`` processes of this script on 127.0.0.1 and waits for them."""
    sockets = [socket.socket() for _ in range(args.workers)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    cluster = {"worker": [f"127.0.0.1:{s.getsockname()[1]}" for s in sockets]}
    for s in sockets:
        s.close()
    workers = []
    for index in range(args.workers):
        task = {"type": "worker", "index": index}
        env = {**os.environ, "TF_CONFIG": json.dumps({"cluster": cluster, "task": task})}
        workers.append(subprocess.Popen([sys.executable, __file__, *argv], env=env))
    deadline = time.monotonic() + args.timeout
    try:
        codes = [w.wait(timeout=max(1.0, deadline - time.monotonic())) for w in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()  # a hung or slow cluster: stop it, never leave it running
                worker.wait()
    if any(codes):
        raise SystemExit(f"a worker failed (exit codes {codes})")
    results = []
    for index in range(args.workers):
        with open(os.path.join(args.output_dir, f"worker-{index}.json")) as file:
            results.append(json.load(file))
    summary = {
        "accuracy": results[0]["accuracy"],
        "workers_agree": len({r["checksum"] for r in results}) == 1,
    }
    print(
        f"test accuracy {summary['accuracy']:.3f}; identical weights on every worker: "
        f"{summary['workers_agree']}"
    )
    return summary


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--input", choices=["dataset", "function"], default="dataset")
    parser.add_argument("--data-dir", default=None, help="the TFRecord files (written if empty)")
    parser.add_argument("--output-dir", default=None, help="checkpoints and results")
    parser.add_argument("--workers", type=int, default=2, help="local demo: worker processes")
    parser.add_argument("--timeout", type=float, default=300.0, help="local demo: seconds")
    args = parser.parse_args(argv)
    if args.output_dir is None or args.data_dir is None:
        scratch = tempfile.mkdtemp(prefix="tfloop-multi-worker-")
        args.output_dir = args.output_dir or scratch
        args.data_dir = args.data_dir or os.path.join(scratch, "digits")
        argv += ["--output-dir", args.output_dir, "--data-dir", args.data_dir]
    if "TF_CONFIG" in os.environ:
        return train(args)
    if not glob.glob(os.path.join(args.data_dir, "*.tfrecord")):
        write_digits(args.data_dir)
    return run_locally(args, argv)


if __name__ == "__main__":
    main()
