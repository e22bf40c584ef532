"""Runs localhost jobs in subprocesses, bounded in time: a cluster of workers, or one process.

Every process gets its own process group; on a timeout the helper kills the groups it started
(and only those) and fails the test, so nothing hangs and nothing is left running.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    env.pop("TF_CONFIG", None)
    env.pop("TF_DETERMINISTIC_OPS", None)  # a job that wants op determinism turns it on itself
    env.update(extra or {})
    return env


def start(script: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(HERE / script), *args],
        env=_environment(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, killed by its id on a timeout
    )


def start_workers(script: str, args: list[str], workers: int = 2) -> list[subprocess.Popen]:
    """``script`` once per worker of a localhost cluster, with TF_CONFIG set."""
    ports = free_ports(workers)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    return [
        start(
            script,
            [str(index), *args],
            {
                "TF_CONFIG": json.dumps(
                    {"cluster": cluster, "task": {"type": "worker", "index": index}}
                )
            },
        )
        for index in range(workers)
    ]


def finish(processes: list[subprocess.Popen], timeout: float) -> list[tuple[int, str]]:
    """Waits for every process (at most ``timeout`` seconds in all); returns (code, output)."""
    deadline = time.monotonic() + timeout
    results = []
    try:
        for process in processes:
            try:
                output, _ = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"a job did not finish within {timeout} s (hang)")
            results.append((process.returncode, output))
    finally:
        for process in processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.communicate()
    return results
