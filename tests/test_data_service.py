"""tf.data service datasets train like the local pipeline; their iterators cannot be saved, so a
Checkpointer that would save one stops fit before it trains, and save_iterator=False resumes by
count (tests/service_job.py runs an in-process dispatcher and worker in a subprocess)."""

from __future__ import annotations

import json

import _cluster
import numpy as np
import pytest
from conftest import assert_weights_equal


@pytest.mark.slow
def test_data_service_trains_like_the_local_pipeline_and_resumes_by_count(tmp_path):
    [(code, output)] = _cluster.finish([_cluster.start("service_job.py", [str(tmp_path)])], 240)
    assert code == 0, output[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["detected"] == [False, True, True, True]
    as_arrays = lambda key: [np.asarray(w) for w in result[key]]  # noqa: E731
    assert_weights_equal(as_arrays("service"), as_arrays("local"))
    assert "tf.data service" in result["error"] and "save_iterator=False" in result["error"]
    assert not any(name.startswith("ckpt-") for name in result["files_after_error"])
    assert result["iterations"] == 2 * 8
    assert_weights_equal(as_arrays("resumed"), as_arrays("straight"))
