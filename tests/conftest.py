"""Shared fixtures: servers in-process and as subprocesses, test-only job kinds."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Tests never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Tests keep their caches (tiny model replicas, default jobs folder) out of the user's home.
_OWN_HOME = "GEN3D_TEST_HOME" not in os.environ
if _OWN_HOME:
    import tempfile

    os.environ["GEN3D_TEST_HOME"] = tempfile.mkdtemp(prefix="gen3d-tests-")
os.environ["GEN3D_HOME"] = os.environ["GEN3D_TEST_HOME"]


def pytest_sessionfinish(session, exitstatus):
    if _OWN_HOME:
        import shutil

        shutil.rmtree(os.environ["GEN3D_TEST_HOME"], ignore_errors=True)


class ServerProcess:
    """``python -m backend serve`` in a subprocess, on a free port."""

    def __init__(self, args: list[str], env: dict | None = None, timeout: float = 60.0):
        self.lines: list[str] = []
        full_env = dict(os.environ)
        full_env.update(env or {})
        full_env["PYTHONUNBUFFERED"] = "1"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "backend", "serve", "--port", "0", *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=full_env,
        )
        self.endpoint = None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            if "listening on" in line:
                self.endpoint = line.strip().split("listening on ")[1]
                break
        if self.endpoint is None:
            self.proc.kill()
            raise RuntimeError("server did not start:\n" + "".join(self.lines) + (self.proc.stdout.read() or ""))
        self._drain = threading.Thread(target=self._read_rest, daemon=True)
        self._drain.start()

    def _read_rest(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss(self) -> int:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def log(self) -> str:
        return "".join(self.lines)


@pytest.fixture
def server_process(tmp_path):
    started: list[ServerProcess] = []

    def start(*args: str, env: dict | None = None) -> ServerProcess:
        sp = ServerProcess(["--jobs-dir", str(tmp_path / "jobs"), *args], env=env)
        started.append(sp)
        return sp

    yield start
    for sp in started:
        sp.stop()


@pytest.fixture(scope="session")
def gt_data(tmp_path_factory):
    """Ground-truth datasets rendered by Blender (in a subprocess), once per session."""
    import importlib.util

    if importlib.util.find_spec("bpy") is None:
        pytest.skip("needs the bpy module (pip install bpy==5.0.1 on Python 3.11)")
    from evaluation.groundtruth import run_groundtruth

    cache: dict = {}

    def make(obj: str = "suzanne", train: int = 16, test: int = 4, res: int = 64, offset=(0.0, 0.0, 0.0), seed: int = 0) -> Path:
        key = (obj, train, test, res, tuple(offset), seed)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"gt_{obj}_{res}")
            run_groundtruth(["--object", obj, "--out", str(out), "--train", str(train), "--test", str(test),
                             "--resolution", str(res), "--seed", str(seed), "--offset", *[str(x) for x in offset]])
            cache[key] = out
        return cache[key]

    return make
