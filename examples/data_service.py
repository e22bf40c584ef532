"""Input from the tf.data service: preprocessing on other machines, training here.

``tf.data.experimental.service.distribute`` moves a pipeline's work to the service's workers;
the trainer only receives batches. tfloop trains on such a dataset like on any other, with one
difference: the service cannot save a reader's position (TensorFlow: "SaveInternal is not yet
supported"), so a Checkpointer must be told ``save_iterator=False``. A checkpoint then records
how many batches were trained on, and a resume skips that many: exact when the service gives
the batches in the same order every time (one service worker, ``parallel_epochs``; with several,
or ``distributed_epoch``, the order differs and the resume is approximate). Without it, ``fit``
stops with a CheckpointError before it trains.

Without ``--dispatcher`` the script starts a dispatcher and a worker in this process (on
127.0.0.1); in-process servers never shut down, so it then ends with ``os._exit``.

    python examples/data_service.py --epochs 5
    python examples/data_service.py --dispatcher grpc://dispatcher-host:5050
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import keras
import tensorflow as tf
from _datasets import IMAGE_SIZE, NUM_CLASSES, load_digits

import tfloop

service = tf.data.experimental.service


def in_process_service() -> str:
    """A dispatcher and one worker in this process; returns the dispatcher's address."""
    dispatcher = service.DispatchServer(service.DispatcherConfig(port=0))
    address = dispatcher.target.split("://")[1]
    config = service.WorkerConfig(dispatcher_address=address, worker_address="127.0.0.1:%port%")
    in_process_service.servers = [dispatcher, service.WorkerServer(config)]  # type: ignore[attr-defined]
    return str(dispatcher.target)


def train(dispatcher: str, args: argparse.Namespace) -> dict[str, Any]:
    (x, y), (x_test, y_test) = load_digits()
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=0).batch(32)
    # The pipeline runs on the service's workers; this process reads its batches.
    dataset = dataset.apply(service.distribute("parallel_epochs", service=dispatcher))

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
        # The service cannot save where a reader is: resume by count instead.
        checkpoint=tfloop.Checkpointer(args.checkpoint_dir, save_iterator=False),
    )
    trainer.fit(dataset, epochs=args.epochs, verbose=args.verbose)
    result = {
        "accuracy": trainer.evaluate((x_test, y_test))["accuracy"],
        "updates": int(trainer.optimizer.iterations.numpy()),
    }
    print(f"test accuracy {result['accuracy']:.3f} after {result['updates']} updates")
    return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dispatcher", default=None, help="grpc://host:port of a dispatcher")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--checkpoint-dir", default=None)
    parser.add_argument("--result", default=None, help="write the result here as JSON")
    parser.add_argument("--verbose", type=int, default=1)
    args = parser.parse_args(argv)
    args.checkpoint_dir = args.checkpoint_dir or tempfile.mkdtemp(prefix="tfloop-service-")
    result = train(args.dispatcher or in_process_service(), args)
    if args.result:
        with open(args.result, "w") as file:
            json.dump(result, file)
    if args.dispatcher is None:
        sys.stdout.flush()
        os._exit(0)  # in-process servers never shut down
    return result


if __name__ == "__main__":
    main()
