"""The file layer (tfloop.io.files): URLs stay URLs, what is atomic where, schemes TensorFlow
lacks and unwritable directories named before training, and gs:// without credentials."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid

import numpy as np
import pytest
import tensorflow as tf
from conftest import make_data, make_model
from hypothesis import given
from hypothesis import strategies as st

import tfloop
from tfloop.callbacks import CSVLogger, ExportBest, JSONLLogger, Profiler, TensorBoard
from tfloop.errors import CheckpointError, ConfigError
from tfloop.io import checks, files


@pytest.fixture
def ram():
    """A directory of its own in TensorFlow's in-memory filesystem (one per process)."""
    root = f"ram://{uuid.uuid4().hex}"
    files.makedirs(root)
    yield root
    files.rmtree(root)


@pytest.fixture
def cwd(tmp_path, monkeypatch):
    """An empty working directory: whatever lands on local disk by mistake shows in it."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def trainer(**options):
    return tfloop.Trainer(make_model(), "sgd", "categorical_crossentropy", **options)


# ------------------------------------------------------------------------------ paths

names = st.text("abcxyz.-_0", min_size=1, max_size=8).filter(lambda n: n not in (".", ".."))
parents = st.sampled_from(["ram://r", "gs://bucket/run", "ram://r/a/b", "/tmp/x", "rel/dir", ""])


@given(parent=parents, name=names)
def test_a_joined_path_splits_back_and_a_url_stays_a_url(parent, name):
    path = files.join(parent, name) if parent else name
    assert files.split(path) == (parent, name)
    assert files.scheme(path) == (parent.split("://")[0] if "://" in parent else "")
    assert ("://" in path) == ("://" in parent)


def test_failures_are_the_os_errors_of_local_files(ram):
    with pytest.raises(FileNotFoundError):
        files.read_bytes(files.join(ram, "missing"))
    files.remove(files.join(ram, "missing"))  # nothing to remove: no error
    files.rmtree(files.join(ram, "missing"))


# ------------------------------------------------------------------ what is atomic where


@pytest.mark.parametrize("atomic", [True, False])
def test_publish_replaces_a_file_whole_and_leaves_no_temporary(ram, monkeypatch, atomic):
    monkeypatch.setattr(files, "atomic_rename", lambda path: atomic)
    path = files.join(ram, "index")
    files.publish(path, "old")
    files.publish(path, b"new\n")
    assert files.read_text(path) == "new\n"
    assert files.listdir(ram) == ["index"]


@pytest.mark.parametrize("where", ["local", "ram"])
def test_a_directory_is_replaced_with_its_pointer_removed_first_and_written_last(
    tmp_path, ram, monkeypatch, where
):
    root = str(tmp_path) if where == "local" else ram
    old, new = files.join(root, "model"), files.join(root, ".model.tmp")
    for directory, content in ((old, "old"), (new, "new")):
        files.makedirs(files.join(directory, "variables"))
        for name in ("saved_model.pb", "fingerprint.pb", "variables/variables.index"):
            files.publish(files.join(directory, name), content)
    moves, removals = [], []
    rename, remove = files._rename, files.remove
    monkeypatch.setattr(files, "_rename", lambda a, b: (moves.append(b), rename(a, b)))
    monkeypatch.setattr(files, "remove", lambda p: (removals.append(p), remove(p)))
    files.replace(new, old, last=["saved_model.pb"])
    for name in ("saved_model.pb", "fingerprint.pb", "variables/variables.index"):
        assert files.read_text(files.join(old, name)) == "new"
    assert files.listdir(root) == ["model"]
    if where == "local":  # atomic renames: the old directory out of the way, the new one in
        assert len(moves) == 2 and moves[-1] == old
    else:  # ram:// renames files only, as an object store copies objects
        assert moves[-1] == files.join(old, "saved_model.pb") and len(moves) == 3
        assert removals[0] == files.join(old, "saved_model.pb")


# -------------------------------------------------------- schemes TensorFlow has no filesystem for


def _registry_says_unknown(url):
    try:
        checks.check_scheme(url, "path")
    except ConfigError:
        return True
    return False


def _tensorflow_says_unknown(url):
    try:
        tf.io.gfile.exists(url)
    except tf.errors.UnimplementedError as error:
        assert "File system scheme" in str(error) and "not implemented" in str(error)
        return True
    return False


@pytest.mark.parametrize(
    "url", ["s3://b/x", "gss://b/x", "hdfs://n/x", "az://c/x", "foo://x", "ram://x", "file:///x"]
)
def test_the_scheme_check_agrees_with_what_tensorflow_does_with_the_path(url):
    assert _registry_says_unknown(url) == _tensorflow_says_unknown(url)


def _writers(url):
    """Each writer of tfloop, given ``url``: where the check happens, by construction."""
    return {
        "Checkpointer": lambda: tfloop.Checkpointer(url),
        "Trainer(checkpoint=)": lambda: trainer(checkpoint=url),
        "Checkpointer(restore=)": lambda: tfloop.Checkpointer("ckpt", restore=url),
        "JSONLLogger": lambda: JSONLLogger(url),
        "CSVLogger": lambda: CSVLogger(url),
        "TensorBoard": lambda: TensorBoard(url),
        "Profiler": lambda: Profiler(url),
        "ExportBest": lambda: ExportBest(url),
        "export": lambda: trainer().export(url),
        "evaluate_checkpoints": lambda: next(tfloop.evaluate_checkpoints(trainer(), url, None)),
        "History.from_jsonl": lambda: tfloop.History.from_jsonl(url),
        "History.plot": lambda: tfloop.History().plot(url),
    }


@pytest.mark.parametrize("writer", sorted(_writers("")))
@pytest.mark.parametrize(
    ("url", "fix"), [("s3://bucket/run", "pip install tensorflow-io"), ("gss://b/run", "spelling")]
)
def test_a_scheme_tensorflow_lacks_is_named_with_its_fix_and_creates_nothing(cwd, writer, url, fix):
    with pytest.raises(ConfigError) as raised:
        _writers(url)[writer]()
    message = str(raised.value)
    assert url in message and f"{files.scheme(url)}://" in message and fix in message
    assert os.listdir(cwd) == []


def test_the_plot_command_names_a_scheme_tensorflow_lacks(cwd, capsys):
    from tfloop.cli import main

    assert main(["plot", "s3://bucket/run.jsonl"]) == 1
    assert "tensorflow-io" in capsys.readouterr().err
    assert os.listdir(cwd) == []


def test_a_url_is_kept_as_a_url_by_every_writer(cwd):
    url = "gs://bucket/run"
    assert tfloop.Checkpointer(url).directory == url
    assert trainer(checkpoint=url).checkpoint.directory == url
    assert JSONLLogger(url + "/log.jsonl").path == url + "/log.jsonl"
    assert CSVLogger(url + "/log.csv").filename == url + "/log.csv"
    assert TensorBoard(url).log_dir == Profiler(url).log_dir == url
    assert ExportBest(url + "/best.keras").path == url + "/best.keras"
    assert os.listdir(cwd) == []


# ------------------------------------------------------------ unwritable: before training


def _blocked(tmp_path):
    """A path under a regular file: no directory can be made there."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    return blocker / "logs"


@pytest.mark.parametrize(
    ("callback", "argument"),
    [
        (lambda d: JSONLLogger(d / "run.jsonl"), "JSONLLogger path"),
        (lambda d: CSVLogger(d / "run.csv"), "CSVLogger filename"),
        (lambda d: TensorBoard(d), "TensorBoard log_dir"),
        (lambda d: Profiler(d), "Profiler log_dir"),
        (lambda d: ExportBest(d / "best.keras", monitor="loss"), "ExportBest path"),
    ],
)
def test_an_unwritable_log_or_export_directory_stops_fit_before_it_trains(
    tmp_path, callback, argument
):
    made = trainer(callbacks=[callback(_blocked(tmp_path))])
    with pytest.raises(ConfigError, match=f"{argument}.*is not writable"):
        made.fit(make_data(16), verbose=0)
    assert int(made.optimizer.iterations) == 0


def test_a_write_refused_by_the_store_stops_fit_before_it_trains(ram, monkeypatch):
    """What a bucket without write permission does: the probe write fails."""

    def refused(path, data):
        raise PermissionError(f"403 Forbidden: {path}")

    monkeypatch.setattr(files, "write", refused)
    made = trainer(checkpoint=files.join(ram, "ck"))
    with pytest.raises(CheckpointError, match=r"checkpoint directory.*not writable.*403"):
        made.fit(make_data(16), verbose=0)
    assert int(made.optimizer.iterations) == 0


# --------------------------------------------------------------------- gs:// for real

GS_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    import numpy as np, keras, tfloop
    from tfloop.callbacks import JSONLLogger

    x = np.ones((16, 5), "float32"); y = np.eye(3, dtype="float32")[np.arange(16) % 3]
    results = {}
    for name, options in [
        ("checkpoint", {"checkpoint": "gs://tfloop-no-such-bucket-4af1/run"}),
        ("logger", {"callbacks": [JSONLLogger("gs://tfloop-no-such-bucket-4af1/run.jsonl")]}),
    ]:
        model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])
        trainer = tfloop.Trainer(model, "sgd", "mse", **options)
        start = time.monotonic()
        try:
            trainer.fit((x, y), verbose=0)
            results[name] = {"error": None}
        except Exception as error:
            results[name] = {"error": type(error).__name__, "message": str(error)}
        results[name].update(seconds=time.monotonic() - start,
                             updates=int(trainer.optimizer.iterations))
    print(json.dumps({"results": results, "cwd": sorted(os.listdir("."))}))
    """
)


@pytest.mark.slow
def test_a_gs_path_without_credentials_fails_fast_and_lands_nothing_on_local_disk(tmp_path):
    # No credentials (no gcloud config, no key file, no metadata server) and short timeouts:
    # offline the host name does not resolve; online the anonymous write is refused.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GOOGLE_", "GCS_"))}
    env.update(
        NO_GCE_CHECK="true",
        CLOUDSDK_CONFIG=str(tmp_path / "no-gcloud"),
        GCS_REQUEST_CONNECTION_TIMEOUT_SECS="5",
        GCS_METADATA_REQUEST_TIMEOUT_SECS="5",
        GCS_WRITE_REQUEST_TIMEOUT_SECS="5",
        TF_CPP_MIN_LOG_LEVEL="3",
    )
    work = tmp_path / "work"
    work.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", GS_SCRIPT],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["cwd"] == []  # no "gs:" directory, nothing else
    checkpoint, logger = report["results"]["checkpoint"], report["results"]["logger"]
    assert checkpoint["error"] == "CheckpointError" and logger["error"] == "ConfigError"
    for outcome in (checkpoint, logger):
        assert "gs://tfloop-no-such-bucket-4af1" in outcome["message"]
        assert "credentials" in outcome["message"] and "not writable" in outcome["message"]
        assert outcome["updates"] == 0
    assert np.isfinite(checkpoint["seconds"])
