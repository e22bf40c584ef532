"""One worker of a two-worker MultiWorkerMirroredStrategy run on localhost (test_distribute.py).

Usage: ``python worker_job.py INDEX PORT0,PORT1 OUT_DIR [DIE_AT_STEP]``. Trains the model of
``train_single`` under the strategy and saves weights, predictions and history to
``OUT_DIR/worker-INDEX.npz``, logging to ``OUT_DIR/run.jsonl`` and ``run.csv`` and exporting
the best model to ``OUT_DIR/best.keras`` (the same paths on both workers); with ``DIE_AT_STEP`` the process exits (code 3) at that update.
With ``TFLOOP_TEST_CHECKPOINTS`` set to a directory (``{index}`` in it is the worker's index), it
checkpoints there every 2 updates and resumes from it.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import numpy as np
from _job import exit_at_step
from conftest import make_data, make_model  # before TensorFlow sets up its devices

SAMPLES, BATCH, EPOCHS, ACCUMULATE = 53, 8, 2, 2


def _data() -> tuple[np.ndarray, np.ndarray]:
    return make_data(SAMPLES)


def _fit(
    strategy: Any, die_at: int = -1, epochs: int = EPOCHS, checkpoints: str = "", logs: str = ""
) -> Any:
    import tensorflow as tf

    import tfloop

    record = exit_at_step(die_at)
    # Every worker names the same files: only the chief may write them.
    writers = (
        [
            tfloop.callbacks.JSONLLogger(os.path.join(logs, "run.jsonl")),
            tfloop.callbacks.CSVLogger(os.path.join(logs, "run.csv")),
            tfloop.callbacks.ExportBest(os.path.join(logs, "best.keras"), monitor="loss"),
        ]
        if logs
        else []
    )

    scope = strategy.scope() if strategy is not None else tf.distribute.get_strategy().scope()
    with scope:
        model = make_model()
    trainer = tfloop.Trainer(
        model,
        "adam",
        "categorical_crossentropy",
        metrics=["accuracy"],
        accumulate_steps=ACCUMULATE,
        steps_per_execution=2,
        jit_compile=False,
        strategy=strategy,
        seed=0,
        callbacks=[record, *writers],
        checkpoint=tfloop.Checkpointer(checkpoints, every_n_steps=2) if checkpoints else None,
    )
    x, y = _data()
    history = trainer.fit((x, y), epochs=epochs, batch_size=BATCH, verbose=0)
    trainer.first_step = record.first_step
    return trainer, history, x


def train_single() -> dict[str, Any]:
    trainer, history, x = _fit(None)
    return {
        "weights": [np.array(w) for w in trainer.model.get_weights()],
        "predictions": trainer.predict(x),
        "history": history.history,
    }


def main() -> None:
    index, ports, out = int(sys.argv[1]), sys.argv[2].split(","), sys.argv[3]
    die_at = int(sys.argv[4]) if len(sys.argv) > 4 else -1
    os.environ["TF_CONFIG"] = json.dumps(
        {
            "cluster": {"worker": [f"127.0.0.1:{port}" for port in ports]},
            "task": {"type": "worker", "index": index},
        }
    )
    import tensorflow as tf

    strategy = tf.distribute.MultiWorkerMirroredStrategy(
        communication_options=tf.distribute.experimental.CommunicationOptions(timeout_seconds=60)
    )
    # A worker that dies makes the other one fail; give it many epochs to die in.
    trainer, history, x = _fit(
        strategy,
        die_at,
        epochs=EPOCHS if die_at < 0 else 200,
        checkpoints=os.environ.get("TFLOOP_TEST_CHECKPOINTS", "").format(index=index),
        logs=out,
    )
    predictions = trainer.predict(x)
    weights = {f"w{i}": np.array(w) for i, w in enumerate(trainer.model.get_weights())}
    np.savez(
        os.path.join(out, f"worker-{index}.npz"),
        predictions=predictions,
        history=json.dumps(history.history),
        first_step=trainer.first_step,
        **weights,
    )


if __name__ == "__main__":
    main()
