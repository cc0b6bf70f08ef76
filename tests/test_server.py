"""The backend service under bad input and faults (in-process server on a free port)."""

from __future__ import annotations

import io
import json
import socket
import threading
import time

import numpy as np
import pytest
import zmq
from PIL import Image

from backend.kinds import diagnose
from backend.service.jobs import AttachmentSpec, JobOutput, JobSpec, Limits, Param, Registry
from backend.service.server import ConfigError, Server, ServerConfig, check_bind_security
from gen3d_wire import protocol as P
from gen3d_wire.client import BackendError, Client, CurveKeys, JobCancelled, JobWatcher, Unreachable, new_req
from gen3d_wire.protocol import Attachment, ErrorCode


def png_bytes(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((h, w, 4), np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _image_size(inputs, ctx):
    im = Image.open(io.BytesIO(inputs.attachments["image"]))
    return JobOutput([], {"size": list(im.size)})


def _boom(inputs, ctx):
    ctx.progress.update(0.5, "about to fail")
    raise RuntimeError("the stage exploded on purpose")


def _alloc(inputs, ctx):
    import torch

    torch.empty(10**14, dtype=torch.uint8)  # a real failed allocation (100 TB)
    return JobOutput()


def _sleepy(inputs, ctx):
    t0 = time.monotonic()
    while time.monotonic() - t0 < inputs.params["seconds"]:
        ctx.progress.update((time.monotonic() - t0) / inputs.params["seconds"], "sleeping")
        time.sleep(0.01)
    return JobOutput([Attachment("out.txt", "text/plain", b"slept")], {})


TEST_SPECS = [
    JobSpec("image_size", "size of an image", _image_size, attachments=(AttachmentSpec("image", "image", True, "any image"),)),
    JobSpec("boom", "always fails", _boom),
    JobSpec("alloc", "asks for 100 TB", _alloc),
    JobSpec("sleepy", "sleeps", _sleepy, params=(Param("seconds", float, 1.0, min=0.0, max=30.0),)),
]


def make_server(tmp_path, **kw) -> Server:
    limits = kw.pop("limits", Limits(max_message_bytes=8 * 1024 * 1024, max_image_pixels=256 * 256))
    config = ServerConfig(host="127.0.0.1", port=0, jobs_dir=tmp_path / "jobs", device="cpu", limits=limits, **kw)
    return Server(config, Registry([diagnose.SPEC, *TEST_SPECS]))


@pytest.fixture
def server(tmp_path):
    srv = make_server(tmp_path)
    srv.start_background()
    yield srv
    srv.stop()


def raw_dealer(endpoint: str) -> zmq.Socket:
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    return s


def recv(sock: zmq.Socket, timeout: float = 5.0) -> P.Message:
    assert sock.poll(int(timeout * 1000)), "no reply"
    return P.decode(sock.recv_multipart())


def test_ping_and_capabilities(server):
    with Client(server.endpoint, timeout=5) as c:
        assert c.ping() < 1.0
        caps = c.capabilities()
    assert caps["protocol"] == P.PROTOCOL_VERSION
    assert "diagnose" in caps["job_kinds"]
    assert caps["job_kinds"]["diagnose"]["params"]["bench_seconds"]["type"] == "number"
    assert {"tiny", "default"} <= set(caps["presets"])
    assert caps["device"]["device"] == "cpu"
    assert caps["renderer"]["renderer"] == "torch"  # the Gaussian rasterizer jobs use here
    for lib in ("torch", "pyzmq", "diffusers", "gsplat"):
        assert caps["versions"][lib]


def test_diagnose_job_end_to_end(server):
    progress = []
    with Client(server.endpoint, timeout=5) as c:
        msg = c.run("diagnose", {"bench_seconds": 0.3, "bench_size": 64}, on_progress=progress.append)
    report = json.loads(msg.attachment("report.json").data)
    assert report["bench"]["matmuls"] > 0 and report["bench"]["gflops"] > 0
    assert report["versions"]["torch"]
    assert progress and progress[-1].get("fraction") <= 1.0
    assert all(p.get("stage") == "benchmark" for p in progress)


@pytest.mark.parametrize(
    "frames, code",
    [
        ([b"\x00\xffgarbage"], ErrorCode.BAD_MESSAGE),
        ([b"{not json"], ErrorCode.BAD_MESSAGE),
        ([b"\"just a string\""], ErrorCode.BAD_MESSAGE),
        ([json.dumps({"v": 1, "type": "submit", "kind": ["diagnose"]}).encode()], ErrorCode.BAD_MESSAGE),
        ([json.dumps({"v": 7, "type": "ping", "req": "x"}).encode()], ErrorCode.BAD_VERSION),
        ([json.dumps({"v": 1, "type": "launch_missiles"}).encode()], ErrorCode.UNKNOWN_TYPE),
        (P.submit("text_to_3d_in_4k"), ErrorCode.UNKNOWN_KIND),
        (P.submit("diagnose", {"bench_seconds": "lots"}), ErrorCode.BAD_PARAMS),
        (P.submit("diagnose", {"bench_seconds": True}), ErrorCode.BAD_PARAMS),
        (P.submit("diagnose", {"bench_seconds": -1}), ErrorCode.BAD_PARAMS),
        (P.submit("diagnose", {"no_such_param": 1}), ErrorCode.BAD_PARAMS),
        (P.submit("image_size"), ErrorCode.BAD_PARAMS),  # missing attachment
        (P.submit("image_size", attachments=[Attachment("image", "image/png", b"not a png")]), ErrorCode.BAD_PARAMS),
        (P.submit("image_size", attachments=[Attachment("image", "image/png", png_bytes(512, 512))]), ErrorCode.TOO_LARGE),
        (P.submit("image_size", attachments=[Attachment("image", "image/png", png_bytes(16, 16)), Attachment("x", "a/b", b"1")]), ErrorCode.BAD_PARAMS),
        (P.fetch("../../../etc/passwd"), ErrorCode.UNKNOWN_JOB),
        (P.cancel("0" * 32), ErrorCode.UNKNOWN_JOB),
        (P.status("nope"), ErrorCode.UNKNOWN_JOB),
    ],
)
def test_bad_requests_get_an_error_and_the_server_keeps_serving(server, frames, code):
    s = raw_dealer(server.endpoint)
    try:
        s.send_multipart(frames)
        msg = recv(s)
        assert msg.type == P.ERROR
        assert msg.get("code") == code, msg.get("message")
        assert msg.get("message")
        s.send_multipart(P.ping("after"))
        assert recv(s).type == P.PONG
    finally:
        s.close()


def test_error_reply_carries_the_request_id(server):
    s = raw_dealer(server.endpoint)
    s.send_multipart(P.submit("nope", req="abc"))
    msg = recv(s)
    assert msg.get("req") == "abc" and msg.get("code") == ErrorCode.UNKNOWN_KIND
    s.close()


def test_a_good_image_is_accepted(server):
    with Client(server.endpoint, timeout=5) as c:
        msg = c.run("image_size", attachments=[Attachment("image", "image/png", png_bytes(40, 24))])
    assert msg.get("metadata")["size"] == [40, 24]


def test_oversized_message_is_dropped_and_server_survives(server):
    s = raw_dealer(server.endpoint)
    s.send_multipart(P.submit("image_size", attachments=[Attachment("image", "image/png", b"\0" * (9 * 1024 * 1024))]))
    assert not s.poll(1000), "an over-MAXMSGSIZE message must not be processed"
    s.close()
    with Client(server.endpoint, timeout=5) as c:
        assert c.ping() < 1.0


def test_raw_tcp_garbage_does_not_hurt(server):
    host, port = server.endpoint.replace("tcp://", "").rsplit(":", 1)
    for payload in (b"\xff" * 64, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", bytes(range(256)) * 40):
        with socket.create_connection((host, int(port)), timeout=2) as sock:
            try:
                sock.sendall(payload)
                sock.recv(64)
            except OSError:
                pass
    with Client(server.endpoint, timeout=5) as c:
        assert c.ping() < 1.0


def test_req_socket_client_can_ping(server):
    s = zmq.Context.instance().socket(zmq.REQ)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(server.endpoint)
    s.send_multipart(P.ping("req-style"))
    msg = recv(s)
    assert msg.type == P.PONG and msg.get("req") == "req-style"
    s.close()


def test_job_that_raises_reports_and_worker_goes_on(server):
    with Client(server.endpoint, timeout=5) as c:
        with pytest.raises(BackendError) as info:
            c.run("boom")
        assert info.value.code == ErrorCode.JOB_FAILED
        assert "exploded on purpose" in info.value.message
        with pytest.raises(BackendError) as info:
            c.run("alloc")
        assert info.value.code == ErrorCode.OUT_OF_MEMORY
        assert "out of memory" in info.value.message
        # the worker survived both
        msg = c.run("sleepy", {"seconds": 0.05})
        assert msg.attachment("out.txt").data == b"slept"
        # and the failure is on record
        status = c.status(info.value.job)
        assert status["state"] == P.FAILED and status["error"]["code"] == ErrorCode.OUT_OF_MEMORY


def test_disconnected_client_result_is_kept_and_fetchable(server, tmp_path):
    c = Client(server.endpoint, timeout=5)
    job = c.submit("sleepy", {"seconds": 0.5})
    c.close()  # vanishes mid-job
    deadline = time.monotonic() + 10
    with Client(server.endpoint, timeout=5) as c2:
        while c2.status(job)["state"] != P.DONE:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        msg = c2.fetch(job)
    assert msg.type == P.RESULT and msg.attachment("out.txt").data == b"slept"
    assert (tmp_path / "jobs" / job / "result" / "out.txt").read_bytes() == b"slept"
    assert json.loads((tmp_path / "jobs" / job / "job.json").read_text())["state"] == P.DONE


def test_result_survives_a_server_restart(tmp_path):
    srv = make_server(tmp_path)
    srv.start_background()
    with Client(srv.endpoint, timeout=5) as c:
        job = c.submit("sleepy", {"seconds": 0.05})
        list(c.events(job))
    srv.stop()
    srv2 = make_server(tmp_path)
    srv2.start_background()
    try:
        with Client(srv2.endpoint, timeout=5) as c:
            assert c.fetch(job).attachment("out.txt").data == b"slept"
    finally:
        srv2.stop()


def test_fetch_of_a_running_job_is_not_ready_and_watch_reattaches(server):
    with Client(server.endpoint, timeout=5) as c:
        job = c.submit("sleepy", {"seconds": 1.0})
        with pytest.raises(BackendError) as info:
            c.fetch(job)
        assert info.value.code == ErrorCode.NOT_READY
    with Client(server.endpoint, timeout=5) as c2:  # a new socket re-attaches
        events = list(c2.events(job, idle_timeout=0.3))
    assert events[-1].type == P.RESULT


def test_cancel_running_job_stops_within_a_second(server):
    with Client(server.endpoint, timeout=5) as c:
        job = c.submit("diagnose", {"bench_seconds": 60, "bench_size": 256})
        for msg in c.events(job):
            if msg.type == P.PROGRESS and msg.get("stage_fraction", 0) > 0:
                break
        t0 = time.monotonic()
        c.cancel(job)
        terminal = [m for m in c.events(job) if m.type in P.TERMINAL_TYPES]
        elapsed = time.monotonic() - t0
        assert terminal[-1].type == P.CANCELLED
        assert elapsed < 1.0, f"cancel took {elapsed:.2f} s"
        assert c.status(job)["state"] == P.CANCELLED_STATE
        with pytest.raises(JobCancelled):
            c.fetch(job)
        # a second cancel is refused politely
        req = new_req()
        with pytest.raises(BackendError) as info:
            c.request(P.cancel(job, req, c.token), req)
        assert info.value.code == ErrorCode.NOT_CANCELLABLE


def test_cancel_queued_job(server):
    with Client(server.endpoint, timeout=5) as c:
        first = c.submit("sleepy", {"seconds": 1.0})
        second = c.submit("sleepy", {"seconds": 1.0})
        c.cancel(second)
        assert [m.type for m in c.events(second)][-1] == P.CANCELLED
        assert c.status(second)["started"] is None
        assert [m.type for m in c.events(first)][-1] == P.RESULT


def test_queue_full(tmp_path):
    srv = make_server(tmp_path, max_queue=1)
    srv.start_background()
    try:
        with Client(srv.endpoint, timeout=5) as c:
            c.submit("sleepy", {"seconds": 1.0})  # runs
            time.sleep(0.2)
            c.submit("sleepy", {"seconds": 0.1})  # waits
            with pytest.raises(BackendError) as info:
                c.submit("sleepy", {"seconds": 0.1})
            assert info.value.code == ErrorCode.QUEUE_FULL
    finally:
        srv.stop()


def test_retried_submit_does_not_start_a_second_job(server):
    s = raw_dealer(server.endpoint)
    frames = P.submit("sleepy", {"seconds": 0.05}, req="same-req")
    s.send_multipart(frames)
    first = recv(s)
    assert first.type == P.ACCEPTED
    s.send_multipart(frames)
    # The job may already be running, so progress can arrive before the
    # second acknowledgement; collect everything until the job ends.
    seen = []
    while not (any(m.type in P.TERMINAL_TYPES for m in seen) and any(m.type == P.ACCEPTED for m in seen)):
        seen.append(recv(s))
    while s.poll(300):  # nothing more may follow: no second job, no second result
        seen.append(recv(s))
    accepted = [m for m in seen if m.type == P.ACCEPTED]
    assert len(accepted) == 1 and accepted[0].get("job") == first.get("job")
    assert {m.get("job") for m in seen} == {first.get("job")}
    assert sum(m.type in P.TERMINAL_TYPES for m in seen) == 1
    s.close()


def test_fifty_concurrent_clients_each_answered_exactly_once(server):
    n = 50
    results: dict[int, list] = {}
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            with Client(server.endpoint, timeout=30) as c:
                job = c.submit("sleepy", {"seconds": 0.0})
                terminal = [m for m in c.events(job, idle_timeout=30) if m.type in P.TERMINAL_TYPES]
                extra = [m for m in c.poll(0.3) if m.type in P.TERMINAL_TYPES]
                results[i] = [job, terminal, extra]
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert len(results) == n
    assert len({r[0] for r in results.values()}) == n  # n distinct jobs
    for job, terminal, extra in results.values():
        assert len(terminal) == 1 and terminal[0].type == P.RESULT and terminal[0].get("job") == job
        assert extra == []
    assert server.counters["jobs_done"] == n


def test_job_watcher_is_non_blocking(server):
    w = JobWatcher(server.endpoint, "sleepy", {"seconds": 0.3}, timeout=5)
    w.start()
    kinds = []
    t0 = time.monotonic()
    longest = 0.0
    while not w.done and time.monotonic() - t0 < 10:
        t = time.perf_counter()
        kinds += [e.kind for e in w.poll()]
        longest = max(longest, time.perf_counter() - t)
        time.sleep(0.01)
    assert kinds[0] == "accepted" and kinds[-1] == "result" and "progress" in kinds
    assert longest < 0.05


def test_job_watcher_reports_unreachable(tmp_path):
    w = JobWatcher("tcp://127.0.0.1:9", "diagnose", timeout=0.5)
    w.start()
    t0 = time.monotonic()
    events = []
    while not w.done and time.monotonic() - t0 < 5:
        events += w.poll()
        time.sleep(0.02)
    assert events and events[-1].kind == "error" and events[-1].code == "unreachable"
    assert "python -m backend serve" in events[-1].message


def test_job_watcher_cancel(server):
    w = JobWatcher(server.endpoint, "sleepy", {"seconds": 20}, timeout=5)
    w.start()
    events = []
    t0 = time.monotonic()
    while not w.done and time.monotonic() - t0 < 10:
        events += w.poll()
        if any(e.kind == "progress" for e in events) and not w.cancel_requested:
            w.cancel()
        time.sleep(0.01)
    assert events[-1].kind == "cancelled"


def test_unreachable_client_times_out(tmp_path):
    with Client("tcp://127.0.0.1:9", timeout=0.3) as c:
        t0 = time.monotonic()
        with pytest.raises(Unreachable):
            c.ping()
        assert time.monotonic() - t0 < 2.0


# -- CurveZMQ -------------------------------------------------------------


def test_non_loopback_bind_needs_keys(tmp_path):
    with pytest.raises(ConfigError) as info:
        check_bind_security(ServerConfig(host="0.0.0.0", jobs_dir=tmp_path))
    assert "python -m backend keys generate" in str(info.value)
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.5"):
        check_bind_security(ServerConfig(host=host, jobs_dir=tmp_path))
    with pytest.raises(ConfigError):
        check_bind_security(ServerConfig(host="192.168.1.10", jobs_dir=tmp_path, keys_dir=tmp_path / "nokeys"))


def test_curve_server_refuses_clients_without_its_key(tmp_path):
    from backend.service.keys import generate, load_public

    keys = generate(tmp_path / "keys")
    srv = make_server(tmp_path, keys_dir=tmp_path / "keys")
    srv.start_background()
    try:
        good = CurveKeys(load_public(keys["server"]))
        with Client(srv.endpoint, timeout=5, curve=good) as c:
            assert c.ping() < 1.0
        with Client(srv.endpoint, timeout=0.7) as plain:
            with pytest.raises(Unreachable):
                plain.ping()
        import zmq as _zmq

        wrong = CurveKeys(_zmq.curve_keypair()[0].decode())
        with Client(srv.endpoint, timeout=0.7, curve=wrong) as c:
            with pytest.raises(Unreachable):
                c.ping()
    finally:
        srv.stop()


def test_curve_authorized_clients_only(tmp_path):
    from backend.service.keys import generate, load_public

    keys = generate(tmp_path / "keys")
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "client.key").write_bytes(keys["client"].read_bytes())
    srv = make_server(tmp_path, keys_dir=tmp_path / "keys", authorized_clients=allowed)
    srv.start_background()
    try:
        known = CurveKeys.from_files(str(keys["server"]), str(keys["client_secret"]))
        with Client(srv.endpoint, timeout=5, curve=known) as c:
            assert c.ping() < 1.0
        stranger = CurveKeys(load_public(keys["server"]))  # right server key, unknown client key
        with Client(srv.endpoint, timeout=0.7, curve=stranger) as c:
            with pytest.raises(Unreachable):
                c.ping()
    finally:
        srv.stop()
