"""Training under tf.distribute strategies equals single-device training on the same batches.

MirroredStrategy runs over the two logical CPU devices that conftest.py sets up; the
multi-worker tests start two localhost worker processes (tests/worker_job.py).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from _cluster import free_ports
from conftest import assert_weights_equal, make_data, make_model, mirrored, weights_of
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

import tfloop
from tfloop.errors import ConfigError

HERE = Path(__file__).parent


def train(
    strategy, x, y, sample_weight=None, *, optimizer="adam", epochs=2, batch_size=None, **kwargs
):
    """Fits a fresh model (same initial weights every time) under ``strategy`` (or none)."""
    scope = strategy.scope() if strategy is not None else tf.distribute.get_strategy().scope()
    with scope:
        model = make_model(features=x.shape[1])
        opt = {"sgd": keras.optimizers.SGD(0.1), "adam": keras.optimizers.Adam(0.01)}[optimizer]
    trainer = tfloop.Trainer(
        model,
        opt,
        "categorical_crossentropy",
        metrics=["accuracy"],
        strategy=strategy,
        seed=0,
        jit_compile=False,
        **kwargs,
    )
    data = (x, y) if sample_weight is None else (x, y, sample_weight)
    history = trainer.fit(data, epochs=epochs, verbose=0, batch_size=batch_size)
    return trainer, history


@settings(max_examples=5, phases=[Phase.explicit, Phase.generate])
@given(
    n=st.integers(9, 60),
    batch=st.integers(1, 9),
    k=st.integers(1, 4),
    optimizer=st.sampled_from(["sgd", "adam"]),
    clip=st.sampled_from([None, 0.05]),
    weighted=st.booleans(),
    drop=st.booleans(),
)
def test_mirrored_equals_single_device(n, batch, k, optimizer, clip, weighted, drop):
    # Ragged batches (odd sizes split 1:2, a last batch of one leaves a replica empty), a
    # ragged last window, and clipping of the *global* gradient.
    x, y = make_data(n)
    sample_weight = np.linspace(0.5, 2.0, n).astype("float32") if weighted else None
    kwargs = dict(accumulate_steps=k, clip_global_norm=clip, optimizer=optimizer)
    kwargs["drop_remainder"] = drop
    single, single_history = train(None, x, y, sample_weight, batch_size=batch, **kwargs)
    multi, multi_history = train(mirrored(), x, y, sample_weight, batch_size=batch, **kwargs)
    batches_per_epoch = math.ceil(n / batch)
    windows_per_epoch = batches_per_epoch // k if drop else math.ceil(batches_per_epoch / k)
    assert int(multi.optimizer.iterations.numpy()) == 2 * windows_per_epoch
    assert int(single.optimizer.iterations.numpy()) == 2 * windows_per_epoch
    assert_weights_equal(weights_of(multi.model), weights_of(single.model), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(
        multi_history.history["loss"], single_history.history["loss"], rtol=1e-5
    )
    np.testing.assert_allclose(
        multi_history.history["accuracy"], single_history.history["accuracy"], rtol=1e-6
    )


def test_mirrored_evaluate_and_predict_equal_single_device():
    x, y = make_data(37)
    single, _ = train(None, x, y, batch_size=8, epochs=1)
    multi, _ = train(mirrored(), x, y, batch_size=8, epochs=1)
    single_logs, multi_logs = (
        single.evaluate((x, y), batch_size=5),
        multi.evaluate((x, y), batch_size=5),
    )
    assert single_logs.keys() == multi_logs.keys()
    for name in single_logs:
        assert multi_logs[name] == pytest.approx(single_logs[name], rel=1e-5)
    predicted = multi.predict(x, batch_size=5)
    assert predicted.shape == (37, 3)  # replicas' outputs gathered back in order
    np.testing.assert_allclose(predicted, single.predict(x, batch_size=5), rtol=1e-5, atol=1e-6)


def test_non_finite_micro_batch_is_dropped_on_every_replica():
    x, y = make_data(40)
    x[13] = np.nan  # batch 1 of 4, in the second replica's half only
    results = []
    for strategy in (None, mirrored()):
        guard = tfloop.callbacks.NonFiniteGuard("skip")
        trainer, _ = train(strategy, x, y, batch_size=10, epochs=1, callbacks=[guard])
        results.append(trainer)
    single, multi = results
    assert int(multi.optimizer.iterations.numpy()) == int(single.optimizer.iterations.numpy()) == 3
    assert multi.first_non_finite_step == single.first_non_finite_step == 1
    assert all(np.isfinite(w).all() for w in weights_of(multi.model))
    assert_weights_equal(weights_of(multi.model), weights_of(single.model), rtol=1e-5, atol=1e-7)


def test_overridden_train_step_logs_are_averaged_over_replicas():
    class Logged(tfloop.Trainer):
        def train_step(self, batch):
            super().train_step(batch)
            return {"examples": tfloop.data.batch_size_of(batch)}

    x, y = make_data(40)
    strategy = mirrored()
    with strategy.scope():
        model = make_model()
    trainer = Logged(model, "sgd", "categorical_crossentropy", strategy=strategy)
    history = trainer.fit((x, y), batch_size=10, verbose=0)
    assert history.history["examples"] == [5.0]  # each replica saw half of each batch


def test_mixed_float16_loss_scaling_under_strategy():
    x, y = make_data(64)
    strategy = mirrored()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        with strategy.scope():
            model = make_model()
            optimizer = keras.optimizers.LossScaleOptimizer(
                keras.optimizers.Adam(0.01), initial_scale=2.0**24
            )
    finally:
        keras.mixed_precision.set_global_policy("float32")
    trainer = tfloop.Trainer(
        model, optimizer, "categorical_crossentropy", accumulate_steps=2, strategy=strategy
    )
    history = trainer.fit((x, y), epochs=6, batch_size=8, verbose=0)
    windows = 6 * 4
    assert 0 < int(optimizer.iterations.numpy()) < windows  # overflowing windows did not count
    assert float(optimizer.dynamic_scale.numpy()) < 2.0**24
    assert all(v.dtype == "float32" for v in model.trainable_variables)
    assert all(np.isfinite(w).all() for w in weights_of(model))
    assert history.history["loss"][-1] < history.history["loss"][0]


def test_mixed_bfloat16_under_strategy():
    x, y = make_data(64)
    strategy = mirrored()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        with strategy.scope():
            model = make_model()
    finally:
        keras.mixed_precision.set_global_policy("float32")
    trainer = tfloop.Trainer(
        model, "adam", "categorical_crossentropy", accumulate_steps=2, strategy=strategy
    )
    history = trainer.fit((x, y), epochs=5, batch_size=8, verbose=0)
    assert model.layers[0].compute_dtype == "bfloat16"
    assert all(v.dtype == "float32" for v in model.trainable_variables)
    assert history.history["loss"][-1] < history.history["loss"][0]


def test_resume_under_strategy_matches_an_uninterrupted_run(tmp_path):
    x, y = make_data(60)

    class StopAt(tfloop.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if logs["step"] >= 5:
                self.trainer.stop_training = True

    def run(directory, callbacks=()):
        strategy = mirrored()
        with strategy.scope():
            model = make_model(dropout=0.2)
        checkpointer = tfloop.Checkpointer(directory, every_n_steps=1, every_epoch=False)
        trainer = tfloop.Trainer(
            model,
            "adam",
            "categorical_crossentropy",
            accumulate_steps=2,
            strategy=strategy,
            seed=3,
            jit_compile=False,
            checkpoint=checkpointer,
            callbacks=list(callbacks),
        )
        trainer.fit((x, y), epochs=2, batch_size=7, verbose=0)
        return trainer

    straight = run(tmp_path / "straight")
    run(tmp_path / "resumed", [StopAt()])  # stops after update 5, mid-epoch
    resumed = run(tmp_path / "resumed")
    assert int(resumed.optimizer.iterations.numpy()) == int(straight.optimizer.iterations.numpy())
    assert_weights_equal(weights_of(resumed.model), weights_of(straight.model), rtol=1e-6)


def test_strategy_errors_name_the_fix():
    with pytest.raises(ConfigError, match=r"tf\.distribute\.Strategy"):
        tfloop.Trainer(make_model(), loss="mse", strategy="mirrored")
    strategy = mirrored()
    with pytest.raises(ConfigError, match=r"created outside strategy\.scope"):
        tfloop.Trainer(make_model(), loss="mse", strategy=strategy)
    with strategy.scope():
        model = make_model()
    outside = keras.optimizers.Adam()
    with pytest.raises(ConfigError, match="optimizer was created outside"):
        tfloop.Trainer(model, outside, loss="mse", strategy=strategy)
    trainer = tfloop.Trainer(model, "adam", loss="mse", strategy=strategy)  # a name is fine
    assert trainer.optimizer._distribution_strategy is strategy


# --------------------------------------------------------------------------- multi-worker


def _start_workers(
    tmp_path: Path, die_at: int = -1, checkpoints: Path | None = None
) -> list[subprocess.Popen]:
    ports = ",".join(str(p) for p in free_ports(2))
    # The tests' directory first, then the caller's path (a source tree under test, say).
    path = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": path}
    env.pop("TF_CONFIG", None)
    if checkpoints is not None:
        env["TFLOOP_TEST_CHECKPOINTS"] = str(checkpoints)
    return [
        subprocess.Popen(
            [sys.executable, str(HERE / "worker_job.py"), str(index), ports, str(tmp_path)]
            + ([str(die_at)] if index == 1 and die_at >= 0 else []),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for index in range(2)
    ]


def _finish(workers: list[subprocess.Popen], timeout: float) -> list[tuple[int, str]]:
    deadline = time.monotonic() + timeout
    results = []
    for worker in workers:
        try:
            output, _ = worker.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for other in workers:
                other.kill()
            output, _ = worker.communicate()
            pytest.fail(f"a worker did not finish within {timeout} s (hang):\n{output[-3000:]}")
        results.append((worker.returncode, output))
    return results


@pytest.mark.slow
def test_multi_worker_mirrored_equals_single_device(tmp_path):
    results = _finish(_start_workers(tmp_path), timeout=240)
    for code, output in results:
        assert code == 0, output[-3000:]
    from worker_job import train_single

    single = train_single()
    for index in range(2):
        saved = np.load(tmp_path / f"worker-{index}.npz")
        assert_weights_equal(
            [saved[f"w{i}"] for i in range(len(single["weights"]))],
            single["weights"],
            rtol=1e-5,
            atol=1e-7,
        )
        np.testing.assert_allclose(
            saved["predictions"], single["predictions"], rtol=1e-5, atol=1e-6
        )
        logs = json.loads(str(saved["history"]))
        np.testing.assert_allclose(logs["loss"], single["history"]["loss"], rtol=1e-5)
    # Both workers named the same log files and export: each was written once, by the chief.
    lines = (tmp_path / "run.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [(r["event"], r["epoch"]) for r in records] == [("epoch", 0), ("epoch", 1)]
    losses = [r["loss"] for r in records]
    np.testing.assert_allclose(losses, single["history"]["loss"], rtol=1e-5)
    rows = (tmp_path / "run.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,") and [r.split(",")[0] for r in rows[1:]] == ["0", "1"]
    exported = keras.models.load_model(tmp_path / "best.keras")
    assert_weights_equal(exported.get_weights(), single["weights"], rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_a_dead_worker_is_reported_not_hung(tmp_path):
    results = _finish(_start_workers(tmp_path, die_at=3), timeout=240)
    (chief_code, chief_output), (dead_code, _) = results
    assert dead_code == 3
    assert chief_code != 0
    assert "WorkerError" in chief_output and "restart every worker" in chief_output


@pytest.mark.slow
def test_a_restarted_cluster_resumes_from_the_chiefs_checkpoint(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    # worker 1 dies after update 5; the saves at updates 2 and 4 were made by both workers
    results = _finish(_start_workers(tmp_path, die_at=5, checkpoints=checkpoints), timeout=240)
    (chief_code, chief_output), (dead_code, _) = results
    assert dead_code == 3 and chief_code != 0, chief_output[-3000:]
    assert Path(tf.train.latest_checkpoint(str(checkpoints))).name == "ckpt-4"
    # the other worker's copies are deleted after each save
    assert sorted(p.name for p in checkpoints.iterdir() if p.name.startswith(".")) == []

    results = _finish(_start_workers(tmp_path, checkpoints=checkpoints), timeout=240)
    for code, output in results:
        assert code == 0, output[-3000:]
    from worker_job import train_single

    single = train_single()
    for index in range(2):
        saved = np.load(tmp_path / f"worker-{index}.npz")
        assert int(saved["first_step"]) == 4  # restored, not started afresh
        assert_weights_equal(
            [saved[f"w{i}"] for i in range(len(single["weights"]))],
            single["weights"],
            rtol=1e-5,
            atol=1e-7,
        )


@pytest.mark.slow
def test_workers_that_restore_different_checkpoints_stop(tmp_path):
    # a directory per worker: only the chief's holds checkpoints
    checkpoints = tmp_path / "worker-{index}"
    _finish(_start_workers(tmp_path, die_at=5, checkpoints=checkpoints), timeout=240)
    results = _finish(_start_workers(tmp_path, checkpoints=checkpoints), timeout=240)
    for code, output in results:
        assert code != 0
        assert "CheckpointError: the workers would restore different checkpoints" in output, output[
            -3000:
        ]
        assert "at updates [0, 4]" in output


def test_validation_every_n_steps_under_a_strategy_leaves_training_as_it_was():
    # Mid-epoch validation shares the metrics' on-read variables with training: their
    # per-replica running state is put back afterwards.
    x, y = make_data(40)

    def run(**fit_options):
        with mirrored().scope():
            model = make_model()
            optimizer = keras.optimizers.Adam(0.01)
        trainer = tfloop.Trainer(
            model,
            optimizer,
            "categorical_crossentropy",
            metrics=["accuracy"],
            strategy=mirrored(),
            steps_per_execution=2,
            jit_compile=False,
            seed=0,
        )
        history = trainer.fit(
            (x, y), epochs=2, batch_size=8, validation_data=(x, y), verbose=0, **fit_options
        )
        return trainer, history

    plain, plain_history = run()
    stepped, history = run(validation_every_n_steps=3)
    assert [record["step"] for record in history.evaluations] == [3, 6, 9]
    assert history.history == plain_history.history
    assert_weights_equal(weights_of(plain.model), weights_of(stepped.model))
    stopped, _ = run(max_steps=9)
    logs = stopped.evaluate((x, y), batch_size=8)
    assert history.evaluations[-1] == {"step": 9, "epoch": 1, **{f"val_{k}": logs[k] for k in logs}}
