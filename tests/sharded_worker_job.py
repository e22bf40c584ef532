"""One worker of a two-worker MultiWorkerMirroredStrategy run with per-worker input.

Usage: ``python sharded_worker_job.py INDEX OUT_DIR SCENARIO [DIE_AT_STEP]`` with ``TF_CONFIG``
set (tests/_cluster.py). Scenarios:

- ``input``: several fits in one cluster, each writing ``OUT_DIR/<mode>-<INDEX>.json``:
  ``file`` (TFRecord files, auto-sharded by file; counts the records each worker reads),
  ``data`` (in-memory, seeded reshuffle, auto-sharded by data), ``fn`` (a dataset function),
  ``uneven`` (a dataset function whose shards are uneven: worker 0 holds one batch more, and
  worker 1 runs an empty step) and ``overlap`` (one that does not shard: the DataError each
  worker raised).
- ``resume``: the ``file`` fit with a Checkpointer in ``OUT_DIR/checkpoints`` (every 2 updates);
  with ``DIE_AT_STEP`` the process exits (code 3) at that update.

The single-device references on the same global batches are built here too
(``reference_*``), and run by the test in its own process.
"""

from __future__ import annotations

import glob
import json
import os
import sys
from typing import Any

import numpy as np
from _job import exit_at_step
from conftest import make_data, make_model  # before TensorFlow sets up its devices

BATCH, EPOCHS, ACCUMULATE, K = 8, 2, 2, 2
FILES, RECORDS_PER_FILE, FEATURES, CLASSES = 4, 16, 5, 3
SAMPLES = 53  # ragged: the last global batch has 5 examples (3 + 2)
UNEVEN = 49  # shards of 25 and 24 examples: 7 batches and 6, the last global batch 1 + 0


# --------------------------------------------------------------------------- the inputs


def write_files(directory: str) -> None:
    """FILES TFRecord files of RECORDS_PER_FILE examples (x: FEATURES floats, y: one-hot)."""
    import tensorflow as tf

    x, y = make_data(FILES * RECORDS_PER_FILE, FEATURES, CLASSES, seed=1)
    for f in range(FILES):
        with tf.io.TFRecordWriter(os.path.join(directory, f"part-{f}.tfrecord")) as writer:
            for r in range(f * RECORDS_PER_FILE, (f + 1) * RECORDS_PER_FILE):
                example = tf.train.Example(
                    features=tf.train.Features(
                        feature={
                            "x": tf.train.Feature(float_list=tf.train.FloatList(value=x[r])),
                            "y": tf.train.Feature(float_list=tf.train.FloatList(value=y[r])),
                        }
                    )
                )
                writer.write(example.SerializeToString())


def _records(files: list[str], counter: Any = None) -> Any:
    import tensorflow as tf

    spec = {
        "x": tf.io.FixedLenFeature([FEATURES], tf.float32),
        "y": tf.io.FixedLenFeature([CLASSES], tf.float32),
    }

    def parse(record: Any) -> Any:
        if counter is not None:
            counter.assign_add(1)  # one record read by this process's pipeline
        example = tf.io.parse_single_example(record, spec)
        return example["x"], example["y"]

    files_ds = tf.data.Dataset.from_tensor_slices(files)
    return files_ds.interleave(tf.data.TFRecordDataset, cycle_length=1).map(parse)


def file_dataset(directory: str, counter: Any = None) -> Any:
    """What a user writes: every file, batched by the global batch size."""
    return _records(sorted(glob.glob(os.path.join(directory, "*.tfrecord"))), counter).batch(BATCH)


def memory_dataset(samples: int = SAMPLES, counter: Any = None) -> Any:
    import tensorflow as tf

    x, y = make_data(samples)
    dataset = tf.data.Dataset.from_tensor_slices((x, y))
    if counter is not None:
        dataset = dataset.map(lambda a, b: (a + 0 * tf.cast(counter.assign_add(1), a.dtype), b))
    return dataset.shuffle(samples, seed=7, reshuffle_each_iteration=True).batch(BATCH)


def dataset_fn(samples: int = SAMPLES, shard: bool = True) -> Any:
    def make(context: Any) -> Any:
        import tensorflow as tf

        x, y = make_data(samples)
        dataset = tf.data.Dataset.from_tensor_slices((x, y))
        dataset = dataset.shuffle(samples, seed=7, reshuffle_each_iteration=True)
        if shard:
            dataset = dataset.shard(context.num_input_pipelines, context.input_pipeline_id)
        return dataset.batch(context.get_per_replica_batch_size(BATCH))

    return make


def reference_file_dataset(directory: str) -> Any:
    """The global batches of the ``file`` fit on one device: worker i reads files i, i+2, in
    batches of BATCH / 2; each global batch is the two workers' batches together."""
    import tensorflow as tf

    files = sorted(glob.glob(os.path.join(directory, "*.tfrecord")))
    parts = tuple(_records(files[i::2]).batch(BATCH // 2) for i in range(2))
    return tf.data.Dataset.zip(parts).map(
        lambda a, b: tuple(tf.concat([u, v], 0) for u, v in zip(a, b, strict=True))
    )


# ------------------------------------------------------------------------------ training


def fit(strategy: Any, data: Any, *, checkpoints: str = "", die_at: int = -1) -> Any:
    import tensorflow as tf

    import tfloop

    record = exit_at_step(die_at)

    scope = strategy.scope() if strategy is not None else tf.distribute.get_strategy().scope()
    with scope:
        model = make_model()
    trainer = tfloop.Trainer(
        model,
        "adam",
        "categorical_crossentropy",
        metrics=["accuracy"],
        accumulate_steps=ACCUMULATE,
        steps_per_execution=K,
        jit_compile=False,
        strategy=strategy,
        seed=0,
        callbacks=[record],
        checkpoint=tfloop.Checkpointer(checkpoints, every_n_steps=2) if checkpoints else None,
    )
    history = trainer.fit(data, epochs=EPOCHS, verbose=0)
    return {
        "weights": [np.asarray(w).tolist() for w in trainer.model.get_weights()],
        "loss": history.history["loss"],
        "iterations": int(trainer.optimizer.iterations.numpy()),
        "first_step": record.first_step,
    }


def _write(out: str, name: str, result: dict[str, Any]) -> None:
    with open(os.path.join(out, f"{name}.json"), "w") as file:
        json.dump(result, file)


def main() -> None:
    index, out, scenario = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    die_at = int(sys.argv[4]) if len(sys.argv) > 4 else -1
    import tensorflow as tf

    import tfloop

    strategy = tf.distribute.MultiWorkerMirroredStrategy(
        communication_options=tf.distribute.experimental.CommunicationOptions(timeout_seconds=60)
    )
    files = os.path.join(out, "files")
    if scenario == "resume":
        result = fit(
            strategy,
            file_dataset(files),
            checkpoints=os.path.join(out, "checkpoints"),
            die_at=die_at,
        )
        _write(out, f"resume-{index}", result)
        return
    counter = tf.Variable(0, dtype=tf.int64)  # a plain local variable: this worker's reads
    result = fit(strategy, file_dataset(files, counter))
    _write(out, f"file-{index}", {**result, "reads": int(counter.numpy())})
    counter.assign(0)
    result = fit(strategy, memory_dataset(counter=counter))
    _write(out, f"data-{index}", {**result, "reads": int(counter.numpy())})
    _write(out, f"fn-{index}", fit(strategy, dataset_fn()))
    _write(out, f"uneven-{index}", fit(strategy, dataset_fn(UNEVEN)))
    try:
        fit(strategy, dataset_fn(shard=False))
        error = ""
    except tfloop.errors.DataError as raised:
        error = str(raised)
    _write(out, f"overlap-{index}", {"error": error})


if __name__ == "__main__":
    main()
