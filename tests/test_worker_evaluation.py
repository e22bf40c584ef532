"""Evaluation under MultiWorkerMirroredStrategy: each worker reads its shard of the validation
data and of evaluate's, and the results are exactly those of one device (sums and counts are
reduced, not means); TensorFlow's tutorials' inputs train; workers agree on a time budget.
Two localhost workers run tests/evaluation_worker_job.py."""

from __future__ import annotations

import json

import _cluster
import evaluation_worker_job as job
import numpy as np
import pytest
import sharded_worker_job as shared

RECORDS = shared.FILES * shared.RECORDS_PER_FILE  # the validation set: 4 files of 16


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    out = tmp_path_factory.mktemp("worker-evaluation")
    for name in ("files", "validation"):
        (out / name).mkdir()
        shared.write_files(str(out / name))
    workers = _cluster.start_workers("evaluation_worker_job.py", [str(out)])
    for code, output in _cluster.finish(workers, 300):
        assert code == 0, output[-3000:]
    results = [json.loads((out / f"worker-{i}.json").read_text()) for i in range(2)]
    single = job.single_device(results[0]["fit"]["weights"], str(out))
    return results, single


def _assert_same_results(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


@pytest.mark.slow
def test_fit_validation_reads_each_workers_shard_and_equals_one_device(cluster):
    results, single = cluster
    for worker in results:
        # every validation pass read this worker's 2 of the 4 files, nothing else
        assert worker["fit"]["reads"] == [RECORDS // 2] * job.EPOCHS
        assert worker["fit"]["weights"] == results[0]["fit"]["weights"]
        # the last validation ran on the final weights: one device's evaluate of them
        last = {key[len("val_") :]: values[-1] for key, values in worker["fit"]["logs"].items()}
        _assert_same_results(last, single["files"])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["files", "uneven", "memory", "function"])
def test_evaluate_on_two_workers_equals_one_device(cluster, name):
    results, single = cluster
    for worker in results:
        _assert_same_results(worker["evaluate"][name], single[name])


@pytest.mark.slow
def test_evaluate_reads_each_workers_shard(cluster):
    results, _ = cluster
    assert [w["evaluate"]["files_reads"] for w in results] == [RECORDS // 2] * 2
    # three files: worker 0 reads files 0 and 2, worker 1 file 1 (and runs empty steps)
    per_file = shared.RECORDS_PER_FILE
    assert [w["evaluate"]["uneven_reads"] for w in results] == [2 * per_file, per_file]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["keras", "parameter_server"])
def test_the_tutorials_inputs_train_on_both_workers_alike(cluster, name):
    results, _ = cluster
    first, second = (worker["tutorials"][name] for worker in results)
    assert first["iterations"] == second["iterations"] == job.EPOCHS * 5
    assert first["weights"] == second["weights"]  # one synchronous model
    assert np.isfinite(first["loss"]).all() and first["loss"] == second["loss"]


@pytest.mark.slow
def test_workers_agree_when_the_time_budget_is_spent(cluster):
    # worker 1's clock runs ten times faster: it spends 25 s in three executions; worker 0
    # would take 25. Both stop after the third, together.
    results, _ = cluster
    assert [w["budget"] for w in results] == [{"stop_reason": "max_time", "iterations": 6}] * 2
