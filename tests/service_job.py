"""Training from the tf.data service, in-process (test_data_service.py).

Usage: ``python service_job.py OUT_DIR``. Starts a ``DispatchServer`` and a ``WorkerServer`` in
this process (127.0.0.1) and writes ``OUT_DIR/result.json``: whether tfloop recognises service
datasets; the weights of a fit on the local pipeline and on the same pipeline through the
service; the error a Checkpointer that saves
the iterator raises; and, with ``save_iterator=False``, a run stopped after update 3 and resumed
against a straight one. In-process servers do not shut down, so the process ends with
``os._exit``.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import numpy as np
from conftest import make_data, make_model  # before TensorFlow sets up its devices


def main() -> None:
    out = sys.argv[1]
    import tensorflow as tf

    import tfloop

    service = tf.data.experimental.service
    dispatcher = service.DispatchServer(service.DispatcherConfig(port=0))
    address = dispatcher.target.split("://")[1]
    _worker = service.WorkerServer(
        service.WorkerConfig(dispatcher_address=address, worker_address="127.0.0.1:%port%")
    )
    x, y = make_data(60)

    def pipeline() -> Any:
        dataset = tf.data.Dataset.from_tensor_slices((x, y)).map(lambda a, b: (a * 2.0, b))
        return dataset.batch(8)  # a ragged last batch of 4

    def through_service() -> Any:
        return pipeline().apply(service.distribute("parallel_epochs", dispatcher.target))

    class StopAt(tfloop.Callback):
        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            if logs["step"] >= 3:
                assert self.trainer is not None
                self.trainer.stop_training = True

    def fit(data: Any, checkpoint: Any = None, callbacks: Any = ()) -> tfloop.Trainer:
        trainer = tfloop.Trainer(
            make_model(),
            "adam",
            "categorical_crossentropy",
            steps_per_execution=2,
            seed=0,
            checkpoint=checkpoint,
            callbacks=list(callbacks),
        )
        trainer.fit(data, epochs=2, verbose=0)
        return trainer

    def weights(trainer: tfloop.Trainer) -> list[Any]:
        return [np.asarray(w).tolist() for w in trainer.model.get_weights()]

    nested = tf.data.Dataset.range(2).interleave(lambda _: through_service())
    result: dict[str, Any] = {
        # recognised before anything is read: directly, batched further, inside an interleave
        "detected": [
            tfloop.data.uses_data_service(d)
            for d in (pipeline(), through_service(), through_service().batch(2), nested)
        ],
        "local": weights(fit(pipeline())),
        "service": weights(fit(through_service())),
    }
    trainer = None
    try:
        fit(through_service(), tfloop.Checkpointer(os.path.join(out, "saving"), every_n_steps=2))
        result["error"] = ""
    except tfloop.errors.CheckpointError as error:
        result["error"] = str(error)
    result["files_after_error"] = sorted(os.listdir(os.path.join(out, "saving")))

    def by_count(name: str) -> Any:
        directory = os.path.join(out, name)
        return tfloop.Checkpointer(
            directory, every_n_steps=1, every_epoch=False, save_iterator=False
        )

    straight = fit(through_service(), by_count("straight"))
    fit(through_service(), by_count("resumed"), [StopAt()])
    trainer = fit(through_service(), by_count("resumed"))
    result["straight"], result["resumed"] = weights(straight), weights(trainer)
    result["iterations"] = int(trainer.optimizer.iterations.numpy())
    with open(os.path.join(out, "result.json"), "w") as file:
        json.dump(result, file)
    sys.stdout.flush()
    os._exit(0)  # in-process servers do not shut down


if __name__ == "__main__":
    main()
