"""A ParameterServerStrategy fit on an in-process localhost cluster (test_parameter_server.py).

Usage: ``python ps_job.py OUT_DIR [DIE_AT_STEP]``. Starts 2 workers and 1 parameter server as
``tf.distribute.Server`` s in this process (TensorFlow's guide, on 127.0.0.1), this process
being the coordinator, and trains with a dataset function and a Checkpointer in
``OUT_DIR/checkpoints`` (every 2 updates). With ``DIE_AT_STEP`` the process exits (code 3) at
that update, as a killed coordinator would; run again, it resumes. Writes ``OUT_DIR/result.json``:
the update count fit started from, the restored weights and the checkpoint's, the final update
count, the losses, and an evaluation on the coordinator against the same model run locally.
In-process servers do not shut down, so the process ends with ``os._exit``.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import numpy as np
from conftest import make_data, make_model  # before TensorFlow sets up its devices

BATCH, STEPS_PER_EPOCH, EPOCHS, ACCUMULATE, K = 8, 8, 3, 2, 4


def dataset_fn(context: Any) -> Any:
    import tensorflow as tf

    x, y = make_data(256)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(256).repeat()
    return dataset.batch(context.get_per_replica_batch_size(BATCH), drop_remainder=True)


def in_process_cluster(workers: int = 2, parameter_servers: int = 1) -> Any:
    import _cluster
    import tensorflow as tf

    ports = _cluster.free_ports(workers + parameter_servers)
    spec = tf.train.ClusterSpec(
        {
            "worker": [f"127.0.0.1:{port}" for port in ports[:workers]],
            "ps": [f"127.0.0.1:{port}" for port in ports[workers:]],
        }
    )
    config = tf.compat.v1.ConfigProto(inter_op_parallelism_threads=workers + 1)
    servers = [
        tf.distribute.Server(spec, job_name="worker", task_index=i, config=config, protocol="grpc")
        for i in range(workers)
    ] + [
        tf.distribute.Server(spec, job_name="ps", task_index=i, protocol="grpc")
        for i in range(parameter_servers)
    ]
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(spec, rpc_layer="grpc")
    return tf.distribute.ParameterServerStrategy(resolver), servers


def configuration_errors(strategy: Any) -> dict[str, str]:
    """The ConfigError each unsupported setting raises under ParameterServerStrategy."""
    import keras

    import tfloop

    with strategy.scope():
        model = make_model()
        scaled = keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam())
    x, y = make_data(16)
    attempts = {
        "non_finite": lambda: tfloop.Trainer(
            model, "adam", "mse", strategy=strategy, non_finite="skip"
        ),
        "loss_scale": lambda: tfloop.Trainer(model, scaled, "mse", strategy=strategy),
        "jit": lambda: tfloop.Trainer(
            model, "adam", "mse", strategy=strategy, jit_compile=True
        ).fit(dataset_fn, steps_per_epoch=2, verbose=0),
        "arrays": lambda: tfloop.Trainer(model, "adam", "mse", strategy=strategy).fit(
            (x, y), steps_per_epoch=2, verbose=0
        ),
        "steps": lambda: tfloop.Trainer(model, "adam", "mse", strategy=strategy).fit(
            dataset_fn, verbose=0
        ),
        "window": lambda: tfloop.Trainer(
            model, "adam", "mse", strategy=strategy, accumulate_steps=3
        ).fit(dataset_fn, steps_per_epoch=4, verbose=0),
    }
    errors = {}
    for name, attempt in attempts.items():
        try:
            attempt()
            errors[name] = ""
        except (tfloop.errors.ConfigError, tfloop.errors.DataError) as error:
            errors[name] = f"{type(error).__name__}: {error}"
    return errors


def main() -> None:
    out = sys.argv[1]
    die_at = int(sys.argv[2]) if len(sys.argv) > 2 else -1
    import tensorflow as tf

    import tfloop

    strategy, _servers = in_process_cluster()
    checkpoints = os.path.join(out, "checkpoints")
    seen: dict[str, Any] = {}

    class Record(tfloop.Callback):
        def on_fit_start(self, logs: Any = None) -> None:
            assert self.trainer is not None
            seen["first_step"] = int(self.trainer.optimizer.iterations.numpy())
            seen["restored_from"] = path = tf.train.latest_checkpoint(checkpoints)
            seen["restored_equal"] = None
            if path:  # the weights fit starts from are the checkpoint's
                saved = make_model(seed=1)
                tf.train.Checkpoint(model=saved).restore(path).expect_partial()
                seen["restored_equal"] = all(
                    np.array_equal(a, b)
                    for a, b in zip(
                        saved.get_weights(), self.trainer.model.get_weights(), strict=True
                    )
                )

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            seen.setdefault("steps", []).append(int(logs["step"]))
            if 0 <= die_at <= logs["step"]:
                sys.stdout.flush()
                os._exit(3)

    with strategy.scope():
        model = make_model()
    trainer = tfloop.Trainer(
        model,
        "adam",
        "categorical_crossentropy",
        metrics=["accuracy"],
        accumulate_steps=ACCUMULATE,
        steps_per_execution=K,
        strategy=strategy,
        callbacks=[Record()],
        checkpoint=tfloop.Checkpointer(checkpoints, every_n_steps=2),
    )
    x, y = make_data(64, seed=5)
    history = trainer.fit(
        dataset_fn,
        epochs=EPOCHS,
        steps_per_epoch=STEPS_PER_EPOCH,
        validation_data=(x, y),
        verbose=0,
    )
    local = make_model()  # the same weights, evaluated without any strategy
    local.set_weights(trainer.model.get_weights())
    local_trainer = tfloop.Trainer(local, "adam", "categorical_crossentropy", metrics=["accuracy"])
    result = {
        "first_step": seen["first_step"],
        "steps": seen["steps"],
        "restored_from": seen["restored_from"],
        "restored_equal": seen["restored_equal"],
        "iterations": int(trainer.optimizer.iterations.numpy()),
        "loss": history.history["loss"],
        "val_loss": history.history["val_loss"],
        "evaluate": trainer.evaluate((x, y)),
        "evaluate_local": local_trainer.evaluate((x, y)),
        "predict_close": bool(
            np.allclose(trainer.predict(x), local_trainer.predict(x), rtol=1e-5, atol=1e-6)
        ),
        "latest": os.path.basename(tf.train.latest_checkpoint(checkpoints)),
        "stop_reason": trainer.stop_reason,
    }
    result["errors"] = configuration_errors(strategy)
    with open(os.path.join(out, "result.json"), "w") as file:
        json.dump(result, file)
    sys.stdout.flush()
    os._exit(0)  # in-process servers do not shut down


if __name__ == "__main__":
    main()
