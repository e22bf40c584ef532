"""The examples run in-process with small settings and do what their docstrings claim."""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path
from types import ModuleType
from typing import Any

import keras
import numpy as np
import pytest

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture
def examples(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Imports an example script by module name, as ``python examples/<name>.py`` would."""
    monkeypatch.syspath_prepend(str(EXAMPLES_DIR))

    def load(name: str) -> ModuleType:
        return importlib.import_module(name)

    return load


def striped_digits(num_examples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Fake MNIST bytes whose label is written as a bright horizontal stripe, so it is learnable."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=num_examples).astype(np.uint8)
    images = rng.integers(0, 60, size=(num_examples, 28, 28)).astype(np.uint8)
    for image, label in zip(images, labels, strict=True):
        image[4 + 2 * label : 6 + 2 * label, :] = 255
    return images, labels


def test_linear_regression_recovers_slope_and_intercept(examples: Any) -> None:
    linear_regression = examples("linear_regression")
    result = linear_regression.main(["--epochs", "20", "--seed", "1"])
    assert abs(result["W"] - linear_regression.TRUE_W) < linear_regression.TOLERANCE
    assert abs(result["b"] - linear_regression.TRUE_B) < linear_regression.TOLERANCE
    assert result["loss"] < 0.01  # noise variance is 0.0025


def test_digits_loader_is_deterministic_stratified_and_in_unit_range(examples: Any) -> None:
    datasets = examples("_datasets")
    (x_train, y_train), (x_test, y_test) = datasets.load_digits()
    (x_again, _), _ = datasets.load_digits()
    assert x_train.shape == (1437, 28, 28) and x_test.shape == (360, 28, 28)
    assert x_train.dtype == np.float32 and y_train.dtype == np.int64
    assert x_train.min() >= 0.0 and x_train.max() <= 1.0 and x_train.max() > 0.9
    np.testing.assert_array_equal(x_train, x_again)
    assert set(np.bincount(y_test)) <= {35, 36, 37}


@pytest.mark.slow
def test_mlp_on_digits_learns_and_saved_model_reloads(
    examples: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mnist_mlp = examples("mnist_mlp")
    trained: list[keras.Model] = []
    save_model = mnist_mlp.save_model

    def recording_save_model(model: keras.Model, output_dir: Path) -> Path:
        trained.append(model)
        return save_model(model, output_dir)

    monkeypatch.setattr(mnist_mlp, "save_model", recording_save_model)
    results = mnist_mlp.main(["--epochs", "5", "--output-dir", str(tmp_path), "--verbose", "0"])
    assert results["accuracy"] > 0.9

    _, (x_test, y_test) = examples("_datasets").load_digits()
    reloaded = keras.models.load_model(tmp_path / mnist_mlp.MODEL_FILENAME)
    predictions = reloaded.predict(x_test, verbose=0)
    np.testing.assert_allclose(predictions, trained[0].predict(x_test, verbose=0), atol=1e-6)
    accuracy = np.mean(predictions.argmax(axis=-1) == y_test)
    assert accuracy == pytest.approx(results["accuracy"], abs=1e-6)


@pytest.mark.slow
def test_mlp_keras_source_uses_keras_mnist_and_learns(
    examples: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def fake_load_data() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
        calls.append(1)
        return striped_digits(512, seed=0), striped_digits(128, seed=1)

    monkeypatch.setattr(keras.datasets.mnist, "load_data", fake_load_data)
    mnist_mlp = examples("mnist_mlp")
    args = ["--data", "keras", "--epochs", "3", "--output-dir", str(tmp_path), "--verbose", "0"]
    results = mnist_mlp.main(args)
    assert calls == [1]
    assert results["accuracy"] > 0.9
    assert (tmp_path / mnist_mlp.MODEL_FILENAME).is_file()


@pytest.mark.slow
def test_mlp_tfds_source_trains_on_a_batched_dataset_offline(
    examples: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tfds = pytest.importorskip("tensorflow_datasets")
    requested = []
    load = tfds.load

    def recording_load(name: str, **kwargs: Any) -> Any:
        requested.append((name, kwargs.get("split"), kwargs.get("as_supervised")))
        return load(name, **kwargs)

    monkeypatch.setattr(tfds, "load", recording_load)
    mnist_mlp = examples("mnist_mlp")
    with tfds.testing.mock_data(num_examples=64):
        results = mnist_mlp.main(
            ["--data", "tfds", "--epochs", "1", "--output-dir", str(tmp_path), "--verbose", "0"]
        )
    assert sorted(requested) == [("mnist", "test", True), ("mnist", "train", True)]
    assert math.isfinite(results["loss"]) and 0.0 <= results["accuracy"] <= 1.0
    assert (tmp_path / mnist_mlp.MODEL_FILENAME).is_file()


def test_tfds_loader_returns_unit_range_images_offline(examples: Any) -> None:
    tfds = pytest.importorskip("tensorflow_datasets")
    datasets = examples("_datasets")
    with tfds.testing.mock_data(num_examples=20):
        (x_train, y_train), (x_test, _) = datasets.load_tfds_mnist()
    assert x_train.shape == (20, 28, 28) and x_test.shape == (20, 28, 28)
    assert x_train.dtype == np.float32 and y_train.dtype == np.int64
    assert x_train.min() >= 0.0 and x_train.max() <= 1.0 and x_train.max() > 0.5


@pytest.mark.slow
def test_accumulated_micro_batches_match_one_big_batch(examples: Any) -> None:
    results = examples("gradient_accumulation").main(["--check", "--epochs", "1"])
    # Guards against a vacuous match: the weights did move during training.
    assert results["max_abs_change"] > 1e-2
    assert results["max_abs_diff"] < 1e-5
    assert results["own_loop_max_abs_diff"] < 1e-5


@pytest.mark.slow
def test_both_accumulation_demos_learn_the_digits(examples: Any) -> None:
    results = examples("gradient_accumulation").main(["--epochs", "2"])
    assert results["trainer_accuracy"] > 0.85
    assert results["own_loop_accuracy"] > 0.85


def _run_example(script: str, args: list[str], timeout: float = 300) -> str:
    """Runs an example that starts servers or worker processes in its own process group,
    killed if it outlives ``timeout``; returns its output."""
    import _cluster

    [(code, output)] = _cluster.finish([_cluster.start(str(EXAMPLES_DIR / script), args)], timeout)
    assert code == 0, output[-3000:]
    return output


@pytest.mark.slow
@pytest.mark.parametrize("data", ["dataset", "function"])
def test_multi_worker_example_trains_two_localhost_workers_alike(tmp_path: Path, data: str) -> None:
    args = ["--workers", "2", "--epochs", "3", "--input", data, "--output-dir", str(tmp_path)]
    _run_example("multi_worker.py", [*args, "--data-dir", str(tmp_path / "digits")])
    results = [json.loads((tmp_path / f"worker-{i}.json").read_text()) for i in range(2)]
    assert results[0]["checksum"] == results[1]["checksum"]  # identical weights
    # Each worker batches its own files, so an epoch may end in two partial global batches.
    assert results[0]["steps"] == results[1]["steps"] in (3 * 23, 3 * 24)
    assert all(result["accuracy"] > 0.85 for result in results)


@pytest.mark.slow
def test_parameter_server_example_trains_on_an_in_process_cluster(tmp_path: Path) -> None:
    result_file = tmp_path / "result.json"
    args = ["--epochs", "3", "--verbose", "0", "--checkpoint-dir", str(tmp_path / "ckpt")]
    _run_example("parameter_server.py", [*args, "--result", str(result_file)])
    result = json.loads(result_file.read_text())
    assert result["updates"] == 3 * (1437 // 32)  # every update counted, none lost
    assert result["accuracy"] > 0.85
    assert (tmp_path / "ckpt" / f"ckpt-{result['updates']}.index").exists()


@pytest.mark.slow
def test_data_service_example_trains_and_checkpoints_by_count(tmp_path: Path) -> None:
    result_file = tmp_path / "result.json"
    args = ["--epochs", "3", "--verbose", "0", "--checkpoint-dir", str(tmp_path / "ckpt")]
    _run_example("data_service.py", [*args, "--result", str(result_file)])
    result = json.loads(result_file.read_text())
    assert result["updates"] == 3 * math.ceil(1437 / 32)
    assert result["accuracy"] > 0.85
    assert (tmp_path / "ckpt" / f"ckpt-{result['updates']}.index").exists()
