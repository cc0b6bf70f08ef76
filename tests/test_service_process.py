"""``python -m backend`` as a user runs it: serve, ping, capabilities, keys,
and the server process's memory under load and after a cancel."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest

from gen3d_wire import protocol as P
from gen3d_wire.client import Client

from conftest import ROOT


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "backend", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_ping_and_capabilities_verbs(server_process):
    sp = server_process()
    r = cli("ping", "--endpoint", sp.endpoint)
    assert r.returncode == 0, r.stderr
    assert "ms" in r.stdout
    r = cli("capabilities", "--endpoint", sp.endpoint)
    assert r.returncode == 0, r.stderr
    caps = json.loads(r.stdout)
    assert caps["protocol"] == P.PROTOCOL_VERSION
    assert "diagnose" in caps["job_kinds"]
    assert caps["preset"] == "tiny" and "default" in caps["presets"]
    assert caps["device"]["device"] in ("cpu", "cuda")
    assert caps["versions"]["torch"] and caps["versions"]["libzmq"]


def test_ping_dead_endpoint_fails_fast_with_a_clear_message():
    t0 = time.monotonic()
    r = cli("ping", "--endpoint", "tcp://127.0.0.1:9", "--timeout", "1")
    assert time.monotonic() - t0 < 15  # interpreter start-up included
    assert r.returncode != 0
    assert "no answer from the backend at tcp://127.0.0.1:9" in r.stderr
    assert "Traceback" not in r.stderr


def test_diagnose_in_process_and_remote(server_process, tmp_path):
    r = cli("diagnose", "-q", "--out", str(tmp_path / "local.json"))
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "local.json").read_text())["device"]["device"] == "cpu"
    sp = server_process()
    r = cli("diagnose", "-q", "--endpoint", sp.endpoint, "--bench-seconds", "0.2", "--bench-size", "64")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["bench"]["matmuls"] > 0


def test_serve_refuses_public_bind_without_keys(tmp_path):
    r = cli("serve", "--host", "0.0.0.0", "--port", "0", "--jobs-dir", str(tmp_path), timeout=60)
    assert r.returncode == 2
    assert "python -m backend keys generate" in r.stderr


def test_keys_and_encrypted_server(server_process, tmp_path):
    keydir = tmp_path / "keys"
    r = cli("keys", "generate", str(keydir))
    assert r.returncode == 0, r.stderr
    assert (keydir / "server.key").exists() and (keydir / "server.key_secret").exists()
    assert (keydir / "server.key_secret").stat().st_mode & 0o077 == 0
    r = cli("keys", "generate", str(keydir))
    assert r.returncode != 0 and "already exists" in r.stderr  # never overwrites
    sp = server_process("--host", "0.0.0.0", "--keys", str(keydir))
    endpoint = sp.endpoint.replace("0.0.0.0", "127.0.0.1")
    r = cli("ping", "--endpoint", endpoint, "--server-key", str(keydir / "server.key"))
    assert r.returncode == 0, r.stderr
    r = cli("ping", "--endpoint", endpoint, "--timeout", "1")
    assert r.returncode != 0 and "no answer" in r.stderr


def test_memory_bounded_under_many_clients(server_process):
    sp = server_process()

    def burst(n: int) -> None:
        def one() -> None:
            with Client(sp.endpoint, timeout=60) as c:
                c.run("diagnose", {}, idle_timeout=60)

        threads = [threading.Thread(target=one) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)

    burst(50)  # warm-up: imports, allocator pools
    before = sp.rss()
    for _ in range(3):
        burst(50)
    growth = sp.rss() - before
    assert growth < 40 * 1024 * 1024, f"RSS grew {growth / 1e6:.1f} MB over 150 more jobs"
    with Client(sp.endpoint, timeout=10) as c:
        assert c.status()["counters"]["jobs_done"] == 200


def test_cancel_frees_the_jobs_memory(server_process):
    sp = server_process()
    with Client(sp.endpoint, timeout=10) as c:
        c.run("diagnose", {"bench_seconds": 0.1, "bench_size": 64})  # warm-up
        base = c.status()["memory"]["process_rss_bytes"]
        # two 4096^2 float32 matrices and their product: ~200 MB while it runs
        job = c.submit("diagnose", {"bench_seconds": 120, "bench_size": 4096})
        peak = base
        deadline = time.monotonic() + 60
        while peak - base < 150e6:
            assert time.monotonic() < deadline, "the job never allocated its matrices"
            time.sleep(0.2)
            peak = max(peak, sp.rss())
        t0 = time.monotonic()
        c.cancel(job)
        last = [m for m in c.events(job, idle_timeout=10) if m.type in P.TERMINAL_TYPES][-1]
        assert last.type == P.CANCELLED
        assert time.monotonic() - t0 < 1.0 + 2.0  # one 4096^3 matmul on 2 cores takes up to ~1-2 s
        after = c.status()["memory"]["process_rss_bytes"]
    assert after - base < 60e6, f"RSS {base / 1e6:.0f} MB before, {peak / 1e6:.0f} peak, {after / 1e6:.0f} after cancel"


def test_serve_shuts_down_when_its_parent_process_ends(server_process):
    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        sp = server_process("--parent-pid", str(parent.pid))
        with Client(sp.endpoint, timeout=5) as c:
            assert c.ping() < 1.0
        time.sleep(1.5)
        assert sp.proc.poll() is None, "the server must keep running while its parent lives"
    finally:
        parent.kill()
        parent.wait()
    assert sp.proc.wait(timeout=15) == 0
    assert "parent process" in sp.log()


def test_serve_refuses_a_parent_pid_that_does_not_exist(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    r = cli("serve", "--port", "0", "--jobs-dir", str(tmp_path), "--parent-pid", str(dead.pid), timeout=60)
    assert r.returncode == 2
    assert "no such process" in r.stderr
