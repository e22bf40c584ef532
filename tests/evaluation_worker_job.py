"""One worker of a two-worker MultiWorkerMirroredStrategy run: sharded evaluation, TensorFlow's
tutorials' inputs, and a time budget (tests/test_worker_evaluation.py).

Usage: ``python evaluation_worker_job.py INDEX OUT_DIR`` with ``TF_CONFIG`` set
(tests/_cluster.py); ``OUT_DIR/files`` holds the training files and ``OUT_DIR/validation`` the
validation files (sharded_worker_job.write_files). Writes ``OUT_DIR/worker-INDEX.json``:

- ``fit``: a fit validating on the validation files every epoch; the records this worker's
  validation pipeline read in each pass, the ``val_*`` logs and the final weights;
- ``evaluate``: ``evaluate`` of those weights on the validation files (records read, results),
  on three of them (uneven shards: one worker runs empty steps), on an in-memory dataset
  (sharded by data) and on a dataset function;
- ``tutorials``: the "Multi-worker training with Keras" tutorial's dataset (an unseeded
  ``shuffle().repeat().batch()``, auto-sharded) and the "Parameter server training" tutorial's
  dataset function under this strategy: each trains, on both workers alike;
- ``budget``: ``fit(max_time=25)`` with each worker's clock running at its own speed (worker 1
  ten times faster): the workers agree on when the budget is spent.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import sys
from typing import Any

import numpy as np
import sharded_worker_job as shared
from conftest import make_data, make_model  # before TensorFlow sets up its devices

EPOCHS = 2


def validation_files(directory: str, count: int | None = None) -> list[str]:
    return sorted(glob.glob(os.path.join(directory, "*.tfrecord")))[:count]


def validation_dataset(files: list[str], counter: Any = None) -> Any:
    """The validation files, batched by the global batch size (auto-sharded by file)."""
    return shared._records(files, counter).batch(shared.BATCH)


def trainer_for(strategy: Any, callbacks: Any = ()) -> Any:
    import tensorflow as tf

    import tfloop

    scope = strategy.scope() if strategy is not None else tf.distribute.get_strategy().scope()
    with scope:
        model = make_model()
    return tfloop.Trainer(
        model,
        "adam",
        "categorical_crossentropy",
        metrics=["accuracy"],
        steps_per_execution=2,
        jit_compile=False,
        strategy=strategy,
        seed=0,
        callbacks=list(callbacks),
    )


def evaluations(trainer: Any, out: str, counter: Any) -> dict[str, Any]:
    """``trainer.evaluate`` on each evaluation input, and the records this worker read."""
    every = validation_files(os.path.join(out, "validation"))
    result: dict[str, Any] = {}
    for name, files in (("files", every), ("uneven", every[:3])):
        counter.assign(0)
        result[name] = trainer.evaluate(validation_dataset(files, counter))
        result[f"{name}_reads"] = int(counter.numpy())
    result["memory"] = trainer.evaluate(shared.memory_dataset())
    result["function"] = trainer.evaluate(shared.dataset_fn())
    return result


def fit_and_evaluate(strategy: Any, out: str) -> dict[str, Any]:
    import tensorflow as tf

    import tfloop

    counter = tf.Variable(0, dtype=tf.int64)  # a plain local variable: this worker's reads
    passes: list[int] = []

    class CountPasses(tfloop.Callback):  # fit's validation passes (not evaluate's)
        def on_eval_start(self, logs: Any = None) -> None:
            if self.trainer is not None and self.trainer.run_info.in_fit:
                counter.assign(0)

        def on_eval_end(self, logs: Any = None) -> None:
            if self.trainer is not None and self.trainer.run_info.in_fit:
                passes.append(int(counter.numpy()))

    trainer = trainer_for(strategy, [CountPasses()])
    validation = validation_dataset(validation_files(os.path.join(out, "validation")), counter)
    history = trainer.fit(shared.dataset_fn(), epochs=EPOCHS, validation_data=validation, verbose=0)
    weights = [np.asarray(w).tolist() for w in trainer.model.get_weights()]
    logs = {key: values for key, values in history.history.items() if key.startswith("val_")}
    return {
        "fit": {"reads": passes, "logs": logs, "weights": weights},
        "evaluate": evaluations(trainer, out, counter),
    }


def single_device(weights: list[Any], out: str) -> dict[str, Any]:
    """The same evaluations on one device, with ``weights`` (run by the test)."""
    import tensorflow as tf

    trainer = trainer_for(None)
    trainer.model.set_weights([np.asarray(w) for w in weights])
    return evaluations(trainer, out, tf.Variable(0, dtype=tf.int64))


def keras_tutorial_dataset(global_batch_size: int) -> Any:
    """As the "Multi-worker training with Keras" tutorial's ``mnist_dataset``."""
    import tensorflow as tf

    x_train, y_train = make_data(256)
    train_dataset = (
        tf.data.Dataset.from_tensor_slices((x_train, y_train))
        .shuffle(256)
        .repeat()
        .batch(global_batch_size)
    )
    return train_dataset


def parameter_server_tutorial_fn(input_context: Any) -> Any:
    """As the "Parameter server training" tutorial's ``dataset_fn``."""
    import tensorflow as tf

    global_batch_size = 64
    batch_size = input_context.get_per_replica_batch_size(global_batch_size)
    x, y = make_data(64)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(10).repeat()
    dataset = dataset.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
    dataset = dataset.batch(batch_size)
    dataset = dataset.prefetch(2)
    return dataset


def tutorials(strategy: Any) -> dict[str, Any]:
    import tensorflow as tf

    result = {}
    for name, data in (
        ("keras", lambda: keras_tutorial_dataset(32)),
        ("parameter_server", lambda: parameter_server_tutorial_fn),
    ):
        trainer = trainer_for(strategy)  # sets the global seed, as keras.utils does
        tf.random.set_seed(None)  # the tutorials set none: every worker shuffles its own way
        # Op determinism (TF_DETERMINISTIC_OPS, inherited from a test run that set it) forbids
        # the tutorials' unseeded shuffles: they run as the tutorials run them, without it.
        from tensorflow.python.framework import config

        config.disable_op_determinism()
        history = trainer.fit(data(), epochs=EPOCHS, steps_per_epoch=5, verbose=0)
        result[name] = {
            "iterations": int(trainer.optimizer.iterations.numpy()),
            "loss": history.history["loss"],
            "weights": [np.asarray(w).tolist() for w in trainer.model.get_weights()],
        }
    return result


def budget(strategy: Any, index: int) -> dict[str, Any]:
    import tfloop
    import tfloop.trainer
    from tfloop._fit_args import plan_fit

    now = [0.0]

    class Tick(tfloop.Callback):
        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            now[0] += 10.0 if index == 1 else 1.0

    tfloop.trainer.plan_fit = functools.partial(plan_fit, clock=lambda: now[0])
    trainer = trainer_for(strategy, [Tick()])
    x, y = make_data(64)
    trainer.fit(x, y, batch_size=shared.BATCH, epochs=50, verbose=0, max_time=25)
    return {
        "stop_reason": trainer.stop_reason,
        "iterations": int(trainer.optimizer.iterations.numpy()),
    }


def main() -> None:
    index, out = int(sys.argv[1]), sys.argv[2]
    import tensorflow as tf

    strategy = tf.distribute.MultiWorkerMirroredStrategy(
        communication_options=tf.distribute.experimental.CommunicationOptions(timeout_seconds=60)
    )
    result = fit_and_evaluate(strategy, out)
    result["tutorials"] = tutorials(strategy)
    result["budget"] = budget(strategy, index)
    with open(os.path.join(out, f"worker-{index}.json"), "w") as file:
        json.dump(result, file)


if __name__ == "__main__":
    main()
