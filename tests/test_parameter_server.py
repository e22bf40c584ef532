"""ParameterServerStrategy: an in-process localhost cluster (2 workers, 1 parameter server)
trains from a dataset function, checkpoints from the coordinator, and resumes after the
coordinator is killed (tests/ps_job.py runs each in a subprocess, bounded in time)."""

from __future__ import annotations

import json
from pathlib import Path

import _cluster
import ps_job
import pytest
import tensorflow as tf

UPDATES = ps_job.EPOCHS * ps_job.STEPS_PER_EPOCH // ps_job.ACCUMULATE


def _run(out: Path, *args: str) -> tuple[int, str]:
    [(code, output)] = _cluster.finish([_cluster.start("ps_job.py", [str(out), *args])], 240)
    return code, output


@pytest.mark.slow
def test_parameter_server_training_checkpoints_and_resumes(tmp_path):
    # the coordinator dies after update 7: the last checkpoint is at update 6
    code, output = _run(tmp_path, "7")
    assert code == 3, output[-3000:]
    checkpoints = tmp_path / "checkpoints"
    assert Path(tf.train.latest_checkpoint(str(checkpoints))).name == "ckpt-6"
    code, output = _run(tmp_path)
    assert code == 0, output[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["first_step"] == 6  # restored, not started afresh
    assert result["restored_from"].endswith("ckpt-6") and result["restored_equal"]
    # the coordinator counts the updates: every one of them, none lost to a race
    assert result["iterations"] == UPDATES and result["steps"] == [8, 10, 12]
    assert result["latest"] == f"ckpt-{UPDATES}" and result["stop_reason"] == "epochs"
    # the checkpoint holds the History: the resumed fit returns the whole run's 3 epochs
    assert len(result["loss"]) == 3 and len(result["val_loss"]) == 3
    # evaluate and predict run on the coordinator and give what the same model gives locally
    for name, value in result["evaluate_local"].items():
        assert result["evaluate"][name] == pytest.approx(value, rel=1e-5)
    assert result["predict_close"]
    # what parameter-server training does not support is a clear error before it trains
    errors = result["errors"]
    assert errors["non_finite"].startswith("ConfigError: non_finite='skip' is not supported")
    assert errors["loss_scale"].startswith("ConfigError: optimizer: a LossScaleOptimizer")
    assert errors["jit"].startswith("ConfigError: jit_compile=True is not supported")
    assert errors["arrays"].startswith("ConfigError: under ParameterServerStrategy every worker")
    assert errors["steps"].startswith("DataError: x is read by every worker") and (
        "steps_per_epoch" in errors["steps"]
    )
    assert errors["window"].startswith("ConfigError: steps_per_epoch=4 must be a multiple of")
