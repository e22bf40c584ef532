"""ParameterServerStrategy with TensorFlow's tutorials' dataset functions, and its update count
(test_ps_input.py). An in-process localhost cluster as in ps_job.py.

Usage: ``python ps_input_job.py OUT_DIR SCENARIO``; writes ``OUT_DIR/SCENARIO.json``:

- ``cluster`` (2 workers, 1 parameter server): the "Parameter server training" tutorial's
  ``dataset_fn`` (``from_tensor_slices(...).shuffle(10).repeat().shard(...).batch(b)
  .prefetch(2)``: an unknown batch dimension) and its custom-loop one
  (``.shuffle(200).batch(32).repeat()``: a partial batch every pass) train, and ``max_steps``
  stops at its update; then the update
  count: a variable whose gradient is constant moves by exactly one per update applied (SGD
  updates it with one atomic add), compared with ``optimizer.iterations`` at every join, and a
  learning-rate schedule that stops the updates after 40 of them (between two joins).
- ``exact`` (1 worker: closures run one after another): a dataset function with a partial
  batch every pass trains as the same function does on one device (same batches, same order).
In-process servers do not shut down, so the process ends with ``os._exit``.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import numpy as np
from conftest import make_data, make_model  # before TensorFlow sets up its devices

STEPS_PER_EPOCH, K = 12, 6


def tutorial_dataset_fn(input_context: Any) -> Any:
    """The "Parameter server training" tutorial's dataset function (Model.fit section)."""
    import tensorflow as tf

    global_batch_size = 64
    batch_size = input_context.get_per_replica_batch_size(global_batch_size)

    x = tf.random.uniform((10, 10))
    y = tf.random.uniform((10,))

    dataset = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(10).repeat()
    dataset = dataset.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
    dataset = dataset.batch(batch_size)
    dataset = dataset.prefetch(2)

    return dataset


def partial_batches_fn(_: Any) -> Any:
    """As the tutorial's custom-loop ``dataset_fn``: ``batch(32)`` before ``repeat()``, 200
    examples, so each pass ends with a batch of 8. No shuffle: the order is the same on one
    device (``exact``)."""
    import tensorflow as tf

    x, y = make_data(200)
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(32).repeat()


def _trainer(strategy: Any, optimizer: Any = "adam", cls: Any = None, **options: Any) -> Any:
    import tfloop

    with strategy.scope() if strategy is not None else _nothing():
        model = make_model()
    return (cls or tfloop.Trainer)(
        model,
        optimizer,
        "categorical_crossentropy",
        metrics=["accuracy"],
        steps_per_execution=K,
        jit_compile=False,
        strategy=strategy,
        **options,
    )


def _nothing() -> Any:
    import contextlib

    return contextlib.nullcontext()


def tutorials(strategy: Any) -> dict[str, Any]:
    import keras

    import tfloop

    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((10,)), keras.layers.Dense(1)])
    trainer = tfloop.Trainer(model, "sgd", "mse", strategy=strategy)
    history = trainer.fit(tutorial_dataset_fn, epochs=5, steps_per_epoch=20, verbose=0)
    partial = _trainer(strategy, accumulate_steps=2)
    partial_history = partial.fit(partial_batches_fn, epochs=2, steps_per_epoch=14, verbose=0)
    budget = _trainer(strategy)
    budget.fit(partial_batches_fn, epochs=5, steps_per_epoch=14, max_steps=10, verbose=0)
    return {
        "max_steps": [budget.stop_reason, int(budget.optimizer.iterations.numpy())],
        "tutorial_iterations": int(trainer.optimizer.iterations.numpy()),
        "tutorial_loss": history.history["loss"],
        "partial_iterations": int(partial.optimizer.iterations.numpy()),
        "partial_loss": partial_history.history["loss"],
    }


def update_count(strategy: Any, learning_rate: Any) -> dict[str, Any]:
    """Trains with a variable ``counter`` whose gradient is 64 (SGD of rate 1/64 moves it by
    exactly -1 per update); returns, after every join, ``(step, iterations, -counter)``."""
    import keras
    import tensorflow as tf

    import tfloop

    with strategy.scope():
        counter = tf.Variable(0.0, name="counter")
        optimizer = keras.optimizers.SGD(learning_rate)

    class Counting(tfloop.Trainer):
        @property
        def trainable_variables(self) -> list[Any]:
            return [*self.model.trainable_variables, counter]

        def compute_loss(self, batch: Any, training: bool) -> Any:
            return super().compute_loss(batch, training) + 64.0 * counter

    seen: list[tuple[int, int, float]] = []

    class Record(tfloop.Callback):
        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            assert self.trainer is not None
            iterations = int(self.trainer.optimizer.iterations.numpy())
            seen.append((int(logs["step"]), iterations, -float(counter.numpy())))

    trainer = _trainer(strategy, optimizer, Counting, callbacks=[Record()])
    trainer.fit(partial_batches_fn, epochs=2, steps_per_epoch=64, verbose=0)
    return {"seen": seen, "counter": -float(counter.numpy())}


def exact() -> dict[str, Any]:
    from ps_job import in_process_cluster

    strategy, _servers = in_process_cluster(workers=1)
    results = {}
    for name, chosen in (("ps", strategy), ("single", None)):
        trainer = _trainer(chosen, accumulate_steps=2)
        history = trainer.fit(
            partial_batches_fn, epochs=2, steps_per_epoch=STEPS_PER_EPOCH, verbose=0
        )
        results[name] = {
            "weights": [np.asarray(w).tolist() for w in trainer.model.get_weights()],
            "iterations": int(trainer.optimizer.iterations.numpy()),
            "loss": history.history["loss"],
        }
    return results


def main() -> None:
    out, scenario = sys.argv[1], sys.argv[2]
    if scenario == "exact":
        result = exact()
    else:
        import keras
        from ps_job import in_process_cluster

        strategy, _servers = in_process_cluster()
        result = tutorials(strategy)
        result["constant"] = update_count(strategy, 1 / 64)
        schedule = keras.optimizers.schedules.PiecewiseConstantDecay([39], [1 / 64, 0.0])
        result["schedule"] = update_count(strategy, schedule)
    with open(os.path.join(out, f"{scenario}.json"), "w") as file:
        json.dump(result, file)
    sys.stdout.flush()
    os._exit(0)  # in-process servers do not shut down


if __name__ == "__main__":
    main()
