"""Parameter-server training: ParameterServerStrategy through a ClusterCoordinator.

The variables live on the parameter servers; each worker trains on its own stream of batches
and updates them asynchronously; this process, the *coordinator*, schedules the work (one
closure per superbatch), validates and writes the checkpoints. Keras 3's ``model.fit`` does not
support this strategy; tfloop runs it with the same Trainer and train step as everywhere else.

On a cluster every task gets a ``TF_CONFIG`` (``"worker"``, ``"ps"`` or ``"chief"`` for the
coordinator): workers and parameter servers run ``--role server``, the coordinator this
script's default role::

    TF_CONFIG='{"cluster": {"chief": ["c:2222"], "worker": ["w0:2222", "w1:2222"],
                "ps": ["p0:2222"]}, "task": {"type": "worker", "index": 0}}' \\
        python examples/parameter_server.py --role server

Without ``TF_CONFIG`` it runs a whole cluster in this process (2 workers, 1 parameter server
on 127.0.0.1, as in TensorFlow's guide); in-process servers never shut down, so the script
ends with ``os._exit``.

    python examples/parameter_server.py --epochs 5
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import keras
import tensorflow as tf
from _datasets import IMAGE_SIZE, NUM_CLASSES, load_digits

import tfloop

BATCH_SIZE = 32


def in_process_cluster(workers: int = 2, parameter_servers: int = 1) -> Any:
    """A cluster of ``tf.distribute.Server`` s in this process, on 127.0.0.1."""
    sockets = [socket.socket() for _ in range(workers + parameter_servers)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    addresses = [f"127.0.0.1:{s.getsockname()[1]}" for s in sockets]
    for s in sockets:
        s.close()
    spec = tf.train.ClusterSpec({"worker": addresses[:workers], "ps": addresses[workers:]})
    config = tf.compat.v1.ConfigProto(inter_op_parallelism_threads=workers + 1)
    for index in range(workers):
        tf.distribute.Server(spec, "worker", index, config=config, protocol="grpc")
    for index in range(parameter_servers):
        tf.distribute.Server(spec, "ps", index, protocol="grpc")
    return tf.distribute.cluster_resolver.SimpleClusterResolver(spec, rpc_layer="grpc")


def serve() -> None:
    """A worker or parameter server of a real cluster: serve until killed."""
    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    server = tf.distribute.Server(
        resolver.cluster_spec(),
        job_name=resolver.task_type,
        task_index=resolver.task_id,
        protocol=resolver.rpc_layer or "grpc",
    )
    server.join()


def coordinate(resolver: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The coordinator: the whole training, as any tfloop script."""
    (x, y), (x_test, y_test) = load_digits()
    strategy = tf.distribute.ParameterServerStrategy(resolver)
    with strategy.scope():  # the variables are created on the parameter servers
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [
                keras.Input((IMAGE_SIZE, IMAGE_SIZE)),
                keras.layers.Flatten(),
                keras.layers.Dense(128, activation="relu"),
                keras.layers.Dense(NUM_CLASSES, activation="softmax"),
            ]
        )

    def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        # Traced once, run on every worker: each worker shuffles the data its own way.
        dataset = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x)).repeat()
        batch_size = context.get_per_replica_batch_size(BATCH_SIZE)
        return dataset.batch(batch_size).prefetch(2)  # as TensorFlow's tutorial

    trainer = tfloop.Trainer(
        model,
        "adam",
        "sparse_categorical_crossentropy",
        metrics=["accuracy"],
        strategy=strategy,
        checkpoint=tfloop.Checkpointer(args.checkpoint_dir, every_n_steps=50),
    )
    trainer.fit(
        dataset_fn,
        epochs=args.epochs,
        steps_per_epoch=len(x) // BATCH_SIZE,  # required: the workers' streams never end
        validation_data=(x_test, y_test),  # evaluated on the coordinator
        verbose=args.verbose,
    )
    result = {
        "accuracy": trainer.evaluate((x_test, y_test))["accuracy"],
        "updates": int(trainer.optimizer.iterations.numpy()),
    }
    print(f"test accuracy {result['accuracy']:.3f} after {result['updates']} updates")
    return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", choices=["coordinator", "server"], default="coordinator")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--checkpoint-dir", default=None)
    parser.add_argument("--result", default=None, help="write the result here as JSON")
    parser.add_argument("--verbose", type=int, default=1)
    args = parser.parse_args(argv)
    args.checkpoint_dir = args.checkpoint_dir or tempfile.mkdtemp(prefix="tfloop-ps-")
    if args.role == "server":
        serve()
    in_process = "TF_CONFIG" not in os.environ
    if in_process:
        resolver = in_process_cluster()
    else:
        resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    result = coordinate(resolver, args)
    if args.result:
        with open(args.result, "w") as file:
            json.dump(result, file)
    if in_process:
        sys.stdout.flush()
        os._exit(0)  # in-process servers never shut down
    return result


if __name__ == "__main__":
    main()
