"""ParameterServerStrategy takes TensorFlow's tutorials' dataset functions as they are, and
counts every update it applies (tests/ps_input_job.py runs each cluster in a subprocess)."""

from __future__ import annotations

import json
import math

import _cluster
import numpy as np
import ps_input_job as job
import pytest
from conftest import assert_weights_equal


def _run(tmp_path, scenario: str) -> dict:
    [(code, output)] = _cluster.finish(
        [_cluster.start("ps_input_job.py", [str(tmp_path), scenario])], 300
    )
    assert code == 0, output[-3000:]
    return json.loads((tmp_path / f"{scenario}.json").read_text())


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("ps-input"), "cluster")


@pytest.mark.slow
def test_the_tutorials_dataset_functions_train(cluster):
    # an unknown batch dimension (the Model.fit section's dataset_fn), 5 epochs of 20 steps
    assert cluster["tutorial_iterations"] == 100
    assert len(cluster["tutorial_loss"]) == 5 and all(map(math.isfinite, cluster["tutorial_loss"]))
    # a partial batch every pass (the custom-loop section's): 2 epochs of 14 micro-batches
    assert cluster["partial_iterations"] == 14
    assert all(map(math.isfinite, cluster["partial_loss"]))


@pytest.mark.slow
def test_optimizer_iterations_equals_the_updates_applied(cluster):
    # after every join: optimizer.iterations is the count of updates the counter saw applied
    seen = cluster["constant"]["seen"]
    assert seen and all(iterations == applied for _, iterations, applied in seen)
    assert [step for step, _, _ in seen] == [iterations for _, iterations, _ in seen]
    assert seen[-1][1] == 128 == cluster["constant"]["counter"]


@pytest.mark.slow
def test_max_steps_stops_at_its_update(cluster):
    # closures of 6 and 4 steps, then a join: none is scheduled past update 10
    assert cluster["max_steps"] == ["max_steps", 10]


@pytest.mark.slow
def test_a_schedule_read_in_closures_sees_every_update(cluster):
    # The rate drops to 0 after update 40, between two joins: only an update in flight on the
    # other worker when the 40th was counted can still apply the first rate (no count is lost).
    applied = cluster["schedule"]["counter"]
    assert 40 <= applied <= 40 + 1
    assert cluster["schedule"]["seen"][-1][1] == 128


@pytest.mark.slow
def test_partial_batches_train_as_on_one_device(tmp_path):
    result = _run(tmp_path, "exact")
    ps, single = result["ps"], result["single"]
    assert ps["iterations"] == single["iterations"] == 2 * job.STEPS_PER_EPOCH // 2
    assert_weights_equal(
        [np.asarray(w) for w in ps["weights"]],
        [np.asarray(w) for w in single["weights"]],
        rtol=1e-5,
        atol=1e-6,
    )
    np.testing.assert_allclose(ps["loss"], single["loss"], rtol=1e-5)
