"""A training job for the kill-and-resume tests: run it, kill it, run it again.

    python resume_job.py DIRECTORY OUT.npz [--kill-after N] [--term-after N] [--data arrays|dataset]

It trains a small Dropout MLP with Adam, accumulation and a checkpoint every few updates, and
writes the final weights and optimizer variables to OUT.npz. ``--kill-after N`` SIGKILLs the
process once N micro-batches have run (counted across restarts by the checkpointed progress);
``--term-after N`` sends it SIGTERM instead. ``--kill-in-write N`` SIGKILLs it inside the
background write of checkpoint N, after its files are complete but before the ``checkpoint`` index
names it. ``--sync-save`` writes checkpoints synchronously. ``--control`` also validates every 4
updates, keeps the 2 best checkpoints by ``val_loss``, logs to ``DIRECTORY/run.jsonl`` and writes
OUT.json: the History, its evaluations, the kept checkpoints and the log's records.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_DETERMINISTIC_OPS", "1")

import keras
import numpy as np
import tensorflow as tf

import tfloop


class KillAt(tfloop.Callback):
    """Sends a signal once a number of micro-batches ran (at an execution boundary)."""

    def __init__(self, after: int, signum: int) -> None:
        self.after = after
        self.signum = signum
        self.seen = 0

    def on_train_batch_end(self, batch, logs):
        info = self.trainer.run_info
        done = info.epoch * info.steps_per_epoch + batch + 1
        if done >= self.after and self.after >= 0:
            self.after = -1
            if self.signum == signal.SIGKILL:
                # Let a background write in flight finish, so the kill point (not the
                # writer's speed) decides which checkpoint the rerun resumes from.
                # --kill-in-write covers a kill during a write.
                self.trainer.checkpoint.wait()
            os.kill(os.getpid(), self.signum)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("directory")
    parser.add_argument("out")
    parser.add_argument("--kill-after", type=int, default=-1)
    parser.add_argument("--term-after", type=int, default=-1)
    parser.add_argument("--data", default="arrays")
    parser.add_argument("--every-n-steps", type=int, default=3)
    parser.add_argument("--kill-in-write", type=int, default=-1)
    parser.add_argument("--sync-save", action="store_true")
    parser.add_argument("--control", action="store_true")
    args = parser.parse_args()
    if args.kill_in_write >= 0:
        record_state = tf.train.CheckpointManager._record_state

        def kill_before_the_index(manager):
            if (manager.latest_checkpoint or "").endswith(f"-{args.kill_in_write}"):
                os.kill(os.getpid(), signal.SIGKILL)
            record_state(manager)

        tf.train.CheckpointManager._record_state = kill_before_the_index

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 6)).astype("float32")
    y = keras.utils.to_categorical(rng.integers(0, 3, 100), 3).astype("float32")
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dropout(0.3),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    log = os.path.join(args.directory, "run.jsonl")
    # The logger first: callbacks are matched to their saved state by position.
    callbacks = [tfloop.callbacks.JSONLLogger(log)] if args.control else []
    if args.kill_after >= 0:
        callbacks.append(KillAt(args.kill_after, signal.SIGKILL))
    if args.term_after >= 0:
        callbacks.append(KillAt(args.term_after, signal.SIGTERM))
    checkpointer = tfloop.Checkpointer(
        args.directory,
        every_n_steps=args.every_n_steps,
        async_save=not args.sync_save,
        keep_best=2 if args.control else 0,
    )
    trainer = tfloop.Trainer(
        model,
        "adam",
        "categorical_crossentropy",
        ["accuracy"],
        accumulate_steps=2,
        steps_per_execution=4,
        callbacks=callbacks,
        checkpoint=checkpointer,
        seed=7,
    )
    if args.data == "arrays":
        data = (x, y)
        kwargs = {"batch_size": 8}
    else:
        data = (
            tf.data.Dataset.from_tensor_slices((x, y))
            .shuffle(40, seed=3)
            .map(lambda a, b: (a * 1.0, b))
            .batch(8)
        )
        kwargs = {}
    if args.control:
        kwargs.update(validation_data=(x[:40], y[:40]), validation_every_n_steps=4)
    history = trainer.fit(data, epochs=int(os.environ.get("EPOCHS", 3)), verbose=0, **kwargs)
    if trainer.preempted:
        sys.exit(143)
    variables = {f"model_{i}": v.numpy() for i, v in enumerate(model.weights)}
    variables.update(
        {f"optimizer_{i}": v.numpy() for i, v in enumerate(trainer.optimizer.variables)}
    )
    # The metric's running state at the end: the last epoch's training accuracy.
    variables["accuracy"] = np.float32(history.history["accuracy"][-1])
    np.savez(args.out, **variables)
    if args.control:
        with open(log) as file:
            records = [json.loads(line) for line in file]
        summary = {
            "history": history.history,
            "evaluations": history.evaluations,
            "best": [(os.path.basename(p), v) for p, v in checkpointer.best_checkpoints],
            "files": sorted(n for n in os.listdir(args.directory) if n.endswith(".index")),
            "log": [{k: v for k, v in r.items() if k != "time"} for r in records],
        }
        with open(os.path.splitext(args.out)[0] + ".json", "w") as file:
            json.dump(summary, file)


if __name__ == "__main__":
    main()
