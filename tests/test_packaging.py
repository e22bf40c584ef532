"""The built wheel installs into a fresh virtual environment and trains, with no repository file
on the path.

``python -m build`` makes the sdist and, from it, the wheel (so a file missing from the sdist
breaks the wheel too). The wheel is installed with its ``cpu`` extra into a new venv by pip,
from the package index (or pip's cache); that install is most of this test's run time.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Generous bounds: they only stop a hung network install from hanging the suite.
BUILD_TIMEOUT = 300
INSTALL_TIMEOUT = 900
RUN_TIMEOUT = 300

# Runs in the fresh venv with a temporary directory as cwd and ``python -I`` (no cwd, no
# PYTHONPATH on sys.path), so only the installed wheel can provide tfloop.
TRAINING_SCRIPT = """
import json, sys
import keras, numpy as np, tfloop

rng = np.random.default_rng(0)
x = rng.normal(size=(512, 4)).astype("float32")
y = x @ np.array([[1.0], [-2.0], [0.5], [3.0]], dtype="float32")
model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
trainer = tfloop.Trainer(model, keras.optimizers.SGD(0.1), "mse", seed=0)
history = trainer.fit((x, y), epochs=5, batch_size=32, verbose=0)
json.dump({
    "version": tfloop.__version__,
    "file": tfloop.__file__,
    "loss": history.history["loss"],
    "evaluate": trainer.evaluate((x, y)),
}, sys.stdout)
"""


def source_version() -> str:
    text = (ROOT / "src" / "tfloop" / "_version.py").read_text()
    match = re.search(r"""__version__\s*=\s*["']([^"']+)["']""", text)
    assert match, "src/tfloop/_version.py has no __version__"
    return match.group(1)


def run(command: list[str], timeout: int, **kwargs: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, check=False, **kwargs
    )
    assert result.returncode == 0, (
        f"{' '.join(command)} failed ({result.returncode}):\n"
        f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    )
    return result


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


@pytest.mark.slow
def test_wheel_installs_in_a_fresh_venv_and_trains(tmp_path: Path) -> None:
    pytest.importorskip("build")
    dist = tmp_path / "dist"
    run([sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT)], BUILD_TIMEOUT)
    wheels = list(dist.glob("*.whl"))
    sdists = list(dist.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, sorted(p.name for p in dist.iterdir())
    wheel = wheels[0]
    version = source_version()
    assert wheel.name.startswith(f"tfloop-{version}-")

    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert "tfloop/py.typed" in names
    assert "tfloop/__init__.py" in names
    assert not any(name.startswith(("tests/", "examples/", "benchmarks/")) for name in names)

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], BUILD_TIMEOUT)
    python = venv_python(venv)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    run(
        [str(python), "-m", "pip", "install", "-q", f"{wheel}[cpu]"],
        INSTALL_TIMEOUT,
        env=env,
    )

    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    result = run([str(python), "-I", "-c", TRAINING_SCRIPT], RUN_TIMEOUT, cwd=workdir, env=env)
    report = json.loads(result.stdout.strip().splitlines()[-1])

    assert report["version"] == version
    installed = Path(report["file"]).resolve()
    assert installed.is_relative_to(venv.resolve()), installed
    assert (installed.parent / "py.typed").is_file()
    losses = report["loss"]
    assert len(losses) == 5 and losses[-1] < losses[0] / 10
    assert set(report["evaluate"]) == {"loss"}
