"""The service against a hostile or careless third-party client (raw pyzmq, from the protocol
page): replies that cannot fail to encode, bounded memory, jobs that belong to their
submitter, per-client request ids, error texts without server internals, restarts."""

from __future__ import annotations

import io
import json
import os
import random
import struct
import time

import numpy as np
import pytest
import zmq
from PIL import Image

from backend.service.jobs import AttachmentSpec, JobOutput, JobSpec, Limits, Param, Registry
from backend.service.server import Server, ServerConfig, scrub_message
from gen3d_wire import protocol as P
from gen3d_wire.client import BackendError, Client, new_token
from gen3d_wire.protocol import Attachment, ErrorCode


def _sleepy(inputs, ctx):
    t0 = time.monotonic()
    while time.monotonic() - t0 < inputs.params["seconds"]:
        ctx.progress.update((time.monotonic() - t0) / max(inputs.params["seconds"], 1e-6), "sleeping")
        time.sleep(0.01)
    return JobOutput([Attachment("out.txt", "text/plain", inputs.params["prompt"].encode())], {"slept": True})


def _leaky(inputs, ctx):
    raise FileNotFoundError(2, "No such file or directory", str(ctx.workdir / "cache" / "weights.bin"))


def _count_views(inputs, ctx):
    return JobOutput([], {"views": len(inputs.attachments)})


SPECS = [
    JobSpec("sleepy", "sleeps", _sleepy, params=(
        Param("seconds", float, 0.05, min=0.0, max=30.0), Param("prompt", str, ""), Param("negative_prompt", str, ""))),
    JobSpec("leaky", "fails with a server path in its exception", _leaky),
    JobSpec("views", "counts its images", _count_views,
            attachments=(AttachmentSpec("views/", "image", True, "images", multiple=True),)),
]


def make_server(tmp_path, **kw) -> Server:
    limits = kw.pop("limits", Limits(max_message_bytes=64 << 20, max_image_pixels=4096 * 4096, max_job_pixels=1 << 26))
    config = ServerConfig(host="127.0.0.1", port=0, jobs_dir=tmp_path / "jobs", device="cpu", limits=limits, **kw)
    return Server(config, Registry(SPECS))


@pytest.fixture
def server(tmp_path):
    srv = make_server(tmp_path)
    srv.start_background()
    yield srv
    srv.stop()


def dealer(endpoint: str) -> zmq.Socket:
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    return s


def ask(sock: zmq.Socket, frames, timeout: float = 5.0) -> P.Message:
    sock.send_multipart(frames)
    assert sock.poll(int(timeout * 1000)), "no reply"
    return P.decode(sock.recv_multipart())


def header(**fields) -> bytes:
    return json.dumps({"v": 1, **fields}, ensure_ascii=False).encode()


def alive(endpoint: str, within: float = 1.0) -> float:
    s = dealer(endpoint)
    try:
        t0 = time.monotonic()
        msg = ask(s, P.ping("alive"), timeout=within)
        assert msg.type == P.PONG
        return time.monotonic() - t0
    finally:
        s.close()


# -- replies that cannot fail to encode --------------------------------------------------

ECHO_CASES = {
    "non-ASCII type, 60 KB": ([header(type="é" * 30000, req="x")], ErrorCode.UNKNOWN_TYPE),
    "ASCII type, 65,500 bytes": ([header(type="t" * 65500, req="x")], ErrorCode.UNKNOWN_TYPE),
    "60 KB of unknown non-ASCII parameter names": (
        [header(type="submit", kind="sleepy", params={("ж" * 200) + str(i): 1 for i in range(140)})], ErrorCode.BAD_PARAMS),
    "unknown kind, 256 emoji": ([header(type="submit", kind="😀" * 256)], ErrorCode.UNKNOWN_KIND),
    "nested 10,000 deep": ([b'{"v":1,"type":"submit","kind":"sleepy","params":{"a":' + b"[" * 10000 + b"]" * 10000 + b"}}"],
                           ErrorCode.BAD_MESSAGE),
    "nested 40 deep": ([header(type="submit", kind="sleepy", params={"a": json.loads("[" * 40 + "]" * 40)})],
                       ErrorCode.BAD_MESSAGE),
    "an integer beyond a float": ([b'{"v":1,"type":"submit","kind":"sleepy","params":{"seconds":1' + b"0" * 400 + b"}}"],
                                  ErrorCode.BAD_PARAMS),
    "a float beyond a float": ([b'{"v":1,"type":"submit","kind":"sleepy","params":{"seconds":1e999}}'], ErrorCode.BAD_MESSAGE),
    "a 5,000-digit integer": ([b'{"v":1,"type":"ping","n":' + b"7" * 5000 + b"}"], ErrorCode.BAD_MESSAGE),
    "NaN": ([b'{"v":1,"type":"ping","n":NaN}'], ErrorCode.BAD_MESSAGE),
    "a lone surrogate in the request id": ([b'{"v":1,"type":"nope","req":"\\ud800"}'], ErrorCode.UNKNOWN_TYPE),
    "a bad client token": ([header(type="ping", client="short")], ErrorCode.BAD_MESSAGE),
    "a huge version": ([b'{"v":' + b"9" * 4000 + b',"type":"ping"}'], ErrorCode.BAD_VERSION),
}


@pytest.mark.parametrize("case", sorted(ECHO_CASES))
def test_malformed_messages_get_a_reply_and_the_loop_survives(server, case):
    frames, code = ECHO_CASES[case]
    assert len(frames[0]) <= P.MAX_HEADER_BYTES
    s = dealer(server.endpoint)
    try:
        msg = ask(s, frames)
        assert msg.type == P.ERROR and msg.get("code") == code, msg.header
        assert len(msg.get("message")) <= P.MAX_ERROR_MESSAGE
    finally:
        s.close()
    assert alive(server.endpoint) < 1.0
    assert server._thread.is_alive()


def test_status_and_cancel_of_a_job_with_4000_emoji_prompts(server):
    with Client(server.endpoint, timeout=5) as c:
        job = c.submit("sleepy", {"seconds": 5, "prompt": "😀" * 4000, "negative_prompt": "🙃" * 4000})
        st = c.status(job)
        assert st["state"] in (P.QUEUED, P.RUNNING) and st["params"]["prompt"].startswith("😀")
        req = "cancel-emoji"
        msg = c.request(P.cancel(job, req, c.token), req)
        assert msg.type == P.STATUS and msg.get("job") == job
        assert [m.type for m in c.events(job, idle_timeout=5)][-1] == P.CANCELLED
    on_disk = json.loads((server.jobs_dir / job / "job.json").read_text())
    assert on_disk["params"]["prompt"] == "😀" * 4000  # the record keeps it whole


# -- memory ----------------------------------------------------------------------------

def png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGBA", (w, h)).save(buf, "PNG", optimize=False, compress_level=9)
    return buf.getvalue()


def test_the_pixels_of_a_job_are_limited(server):
    big = png(4096, 4096)
    s = dealer(server.endpoint)
    try:
        views = [Attachment(f"views/{i:03d}.png", "image/png", big) for i in range(44)]
        msg = ask(s, P.submit("views", attachments=views))
        assert msg.get("code") == ErrorCode.TOO_LARGE and "pixels" in msg.get("message")
        ok = [Attachment(f"views/{i:03d}.png", "image/png", png(64, 64)) for i in range(4)]
        assert ask(s, P.submit("views", attachments=ok)).type == P.ACCEPTED
    finally:
        s.close()


def glb(doc: dict, binary: bytes = b"") -> bytes:
    j = json.dumps(doc).encode()
    j += b" " * (-len(j) % 4)
    body = struct.pack("<II", len(j), 0x4E4F534A) + j
    if binary:
        binary += b"\0" * (-len(binary) % 4)
        body += struct.pack("<II", len(binary), 0x004E4942) + binary
    return b"glTF" + struct.pack("<II", 2, 12 + len(body)) + body


GLB_BOMB = glb({"asset": {"version": "2.0"}, "scenes": [{"nodes": [0]}], "nodes": [{"mesh": 0}],
                "meshes": [{"primitives": [{"attributes": {"POSITION": 0, "TEXCOORD_0": 1}}]}],
                "accessors": [{"componentType": 5126, "type": "VEC3", "count": 10**9},
                              {"componentType": 5126, "type": "VEC2", "count": 10**9}]})


def _peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="peak RSS is read from /proc")
def test_memory_bombs_are_rejected_with_bounded_peak_memory(server_process):
    sp = server_process("--preset", "tiny")
    s = dealer(sp.endpoint)
    try:
        assert ask(s, P.ping("warm")).type == P.PONG
        assert ask(s, P.capabilities_request("warm")).type == P.CAPABILITIES
        base = _peak_rss(sp.pid)
        # 44 views that decode to 4096x4096 each (> 2.9 GB as RGBA bytes), in a 1-2 MB message
        big = png(4096, 4096)
        views = [Attachment(f"views/{i:03d}.png", "image/png", big) for i in range(44)]
        cams = json.dumps({"camera_angle_x": 0.8, "frames": [
            {"file_path": f"{i:03d}", "transform_matrix": np.eye(4).tolist()} for i in range(44)]}).encode()
        msg = ask(s, P.submit("reconstruct", attachments=views + [Attachment("transforms.json", "application/json", cams)]))
        assert msg.get("code") == ErrorCode.TOO_LARGE, msg.header
        # a 300-byte GLB claiming a billion vertices
        msg = ask(s, P.submit("refine_texture", {"prompt": "x"}, [Attachment("mesh", "model/gltf-binary", GLB_BOMB)]))
        assert msg.get("code") == ErrorCode.BAD_PARAMS and "accessor" in msg.get("message"), msg.header
        # a 24 MiB frame 0 of [{},{},...]
        t0 = time.monotonic()
        msg = ask(s, [b"[" + b"{}," * (8 << 20) + b"{}]"], timeout=10)
        assert msg.get("code") == ErrorCode.TOO_LARGE and time.monotonic() - t0 < 1.0
        # a JSON attachment of 24 MiB
        msg = ask(s, P.submit("refine_texture", {"prompt": "x"}, [Attachment("cameras", "application/json", b"[" + b"{}," * (8 << 20) + b"{}]")]))
        assert msg.get("code") == ErrorCode.TOO_LARGE, msg.header
        growth = _peak_rss(sp.pid) - base
        print(f"peak RSS {base / 1e6:.0f} MB before the bombs, +{growth / 1e6:.1f} MB after")
        assert growth < 100e6, f"peak RSS grew {growth / 1e6:.0f} MB"
        assert alive(sp.endpoint) < 1.0
    finally:
        s.close()


# -- jobs belong to their client -------------------------------------------------------

def test_another_client_cannot_see_fetch_reattach_or_cancel_a_job(server):
    with Client(server.endpoint, timeout=5, token=new_token()) as a, Client(server.endpoint, timeout=5, token=new_token()) as b:
        job = a.submit("sleepy", {"seconds": 1.0, "prompt": "secret prompt"})
        deadline = time.monotonic() + 5
        while a.status(job)["state"] != P.RUNNING:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert a.status()["running"] == job
        theirs = b.status()
        assert theirs["running"] is None and theirs["busy"] is True
        for call in (lambda: b.status(job), lambda: b.fetch(job)):
            with pytest.raises(BackendError) as info:
                call()
            assert info.value.code == ErrorCode.UNKNOWN_JOB and "secret" not in info.value.message
        for req, frames in (("w", P.fetch(job, True, "w", b.token)), ("c", P.cancel(job, "c", b.token))):
            with pytest.raises(BackendError) as info:
                b.request(frames, req)
            assert info.value.code == ErrorCode.UNKNOWN_JOB
        events = list(a.events(job, idle_timeout=5))  # a's stream was not moved, its job not cancelled
        assert events[-1].type == P.RESULT and events[-1].attachment("out.txt").data == b"secret prompt"
        with pytest.raises(BackendError):
            b.fetch(job)
        assert a.fetch(job).type == P.RESULT
    # without a token a job is its connection's
    s1, s2 = dealer(server.endpoint), dealer(server.endpoint)
    try:
        jid = ask(s1, P.submit("sleepy", {"seconds": 0.0})).get("job")
        assert ask(s2, P.status(jid)).get("code") == ErrorCode.UNKNOWN_JOB
        s1.send_multipart(P.status(jid, "st"))
        while True:  # the job's own stream comes to s1 too
            assert s1.poll(5000)
            m = P.decode(s1.recv_multipart())
            if m.get("req") == "st":
                break
        assert m.type == P.STATUS and m.get("state") in (P.QUEUED, P.RUNNING, P.DONE)
    finally:
        s1.close()
        s2.close()


def test_shared_mode_lets_every_client_see_every_job(tmp_path):
    srv = make_server(tmp_path, shared_jobs=True)
    srv.start_background()
    try:
        with Client(srv.endpoint, timeout=5, token=new_token()) as a, Client(srv.endpoint, timeout=5, token=new_token()) as b:
            job = a.submit("sleepy", {"seconds": 0.0, "prompt": "team"})
            list(a.events(job, idle_timeout=5))
            assert b.fetch(job).attachment("out.txt").data == b"team"
    finally:
        srv.stop()


def test_a_token_follows_its_client_across_sockets_and_processes(server):
    token = new_token()
    with Client(server.endpoint, timeout=5, token=token) as a:
        job = a.submit("sleepy", {"seconds": 0.3, "prompt": "mine"})
    with Client(server.endpoint, timeout=5, token=token) as again:  # a new socket: "fetch after reconnect"
        events = list(again.events(job, idle_timeout=0.3))
        assert events[-1].type == P.RESULT


# -- request ids are per client ---------------------------------------------------------

def test_request_ids_do_not_collide_across_clients_and_a_finished_duplicate_gets_its_end(server):
    a, b = dealer(server.endpoint), dealer(server.endpoint)
    ta, tb = new_token(), new_token()
    try:
        ra = ask(a, P.submit("sleepy", {"seconds": 0.2, "prompt": "A"}, req="a2", client=ta))
        rb = ask(b, P.submit("sleepy", {"seconds": 0.0, "prompt": "B"}, req="a2", client=tb))
        assert ra.type == rb.type == P.ACCEPTED and ra.get("job") != rb.get("job")
        ends = {}
        for sock, name in ((a, "A"), (b, "B")):
            deadline = time.monotonic() + 5
            while name not in ends:
                assert sock.poll(int(max(0.0, deadline - time.monotonic()) * 1000)), f"{name} got no result"
                m = P.decode(sock.recv_multipart())
                if m.type in P.TERMINAL_TYPES:
                    ends[name] = m
        assert ends["A"].attachment("out.txt").data == b"A" and ends["B"].attachment("out.txt").data == b"B"
        again = ask(a, P.submit("sleepy", {"seconds": 0.2, "prompt": "A"}, req="a2", client=ta))
        assert again.type == P.RESULT and again.get("req") == "a2" and again.get("job") == ra.get("job")
        assert again.attachment("out.txt").data == b"A"
    finally:
        a.close()
        b.close()
    with Client(server.endpoint, timeout=5) as c:  # the client library takes such an answer as its job's end
        req = "retry-after-done"
        first = c.request(P.submit("sleepy", {"prompt": "C"}, req=req, client=c.token), req)
        list(c.events(first.get("job"), idle_timeout=5))
        c._pending.clear()
        frames = P.submit("sleepy", {"prompt": "C"}, req=req, client=c.token)
        c.send(frames)
        assert c.recv(5).type == P.RESULT


# -- what error texts say ---------------------------------------------------------------

def test_error_texts_name_no_server_paths_or_addresses(server):
    root = str(server.jobs_dir.resolve())
    with Client(server.endpoint, timeout=5) as c:
        with pytest.raises(BackendError) as info:
            c.run("leaky")
        assert "weights.bin" in info.value.message and root not in info.value.message and "/cache/" not in info.value.message
        job = info.value.job
        assert root not in c.status(job)["error"]["message"]
        with pytest.raises(BackendError) as info:
            c.submit("views", attachments=[Attachment("views/a.png", "image/png", b"\x89PNG not really")])
        assert " at 0x" not in info.value.message and "BytesIO" not in info.value.message
        done = c.submit("sleepy", {"seconds": 0.0, "prompt": "gone"})
        list(c.events(done, idle_timeout=5))
        (server.jobs_dir / done / "result" / "out.txt").unlink()
        with pytest.raises(BackendError) as info:
            c.fetch(done)
        assert info.value.code == ErrorCode.EXPIRED and root not in info.value.message
    assert scrub_message("[Errno 2] '/srv/models/sd/unet/x.bin' <_io.BytesIO object at 0x7f3a>") == \
        "[Errno 2] 'x.bin' <_io.BytesIO>"


def test_pruned_jobs_are_expired_not_unknown_even_after_a_restart(tmp_path):
    srv = make_server(tmp_path, keep_jobs=1)
    srv.start_background()
    try:
        with Client(srv.endpoint, timeout=5) as c:
            first = c.submit("sleepy", {"prompt": "1"})
            list(c.events(first, idle_timeout=5))
            second = c.submit("sleepy", {"prompt": "2"})
            list(c.events(second, idle_timeout=5))
            deadline = time.monotonic() + 5
            while (srv.jobs_dir / first).exists():  # pruned just after the second job's end is sent
                assert time.monotonic() < deadline
                time.sleep(0.02)
            with pytest.raises(BackendError) as info:
                c.fetch(first)
            assert info.value.code == ErrorCode.EXPIRED
    finally:
        srv.stop()
    srv = make_server(tmp_path, keep_jobs=1)
    srv.start_background()
    try:
        with Client(srv.endpoint, timeout=5) as c:
            with pytest.raises(BackendError) as info:
                c.status(first)
            assert info.value.code == ErrorCode.EXPIRED
            assert c.fetch(second).attachment("out.txt").data == b"2"
        with Client(srv.endpoint, timeout=5, token=new_token()) as stranger:
            with pytest.raises(BackendError) as info:
                stranger.fetch(first)
            assert info.value.code == ErrorCode.UNKNOWN_JOB
    finally:
        srv.stop()


# -- a restart mid-job ------------------------------------------------------------------

def test_killed_mid_job_restart_keeps_finished_jobs_and_fails_the_interrupted_one(server_process, tmp_path):
    token = new_token()
    sp = server_process("--preset", "tiny")
    with Client(sp.endpoint, timeout=10, token=token) as c:
        done = c.submit("diagnose", {"bench_seconds": 0.05, "bench_size": 32})
        list(c.events(done, idle_timeout=10))
        running = c.submit("diagnose", {"bench_seconds": 60, "bench_size": 64})
        deadline = time.monotonic() + 20
        while c.status(running)["state"] != P.RUNNING:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    sp.proc.kill()
    sp.proc.wait(10)
    sp2 = server_process("--preset", "tiny")
    with Client(sp2.endpoint, timeout=10, token=token) as c:
        assert c.fetch(done).attachment("report.json") is not None
        assert c.status(running)["state"] == P.FAILED
        t0 = time.monotonic()
        end = list(c.events(running, idle_timeout=1.0))[-1]  # reports the failure, does not hang
        assert end.type == P.ERROR and end.get("code") == ErrorCode.JOB_FAILED and time.monotonic() - t0 < 5
    with Client(sp2.endpoint, timeout=10, token=new_token()) as stranger:
        with pytest.raises(BackendError) as info:
            stranger.fetch(done)
        assert info.value.code == ErrorCode.UNKNOWN_JOB


# -- fuzz ---------------------------------------------------------------------------------

def _random_frames(rng: random.Random, job_ids: list[str]) -> list[bytes]:
    pick = rng.random()
    if pick < 0.15:
        return [bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 200)))]
    if pick < 0.3:
        return [bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 50))) for _ in range(rng.randint(0, 4))]
    values = [None, True, 0, -1, 1.5, 10**30, "", "x" * rng.randint(0, 3000), "é" * rng.randint(0, 3000), [], {}, [[[]]],
              {"a": {"b": [1, 2, {"c": None}]}}, rng.choice(job_ids) if job_ids else "0" * 32, "0" * 32, "../../etc/passwd"]
    hdr: dict = {}
    if rng.random() < 0.9:
        hdr["v"] = rng.choice([1, 1, 1, 2, "1", None])
    hdr["type"] = rng.choice(list(P.REQUEST_TYPES) + ["result", "bogus", ""])
    for key in ("kind", "job", "req", "params", "watch", "client", "attachments"):
        if rng.random() < 0.5:  # never a kind a random message could run: every reply answers a request
            hdr[key] = rng.choice(values + (["views", "nope"] if key == "kind" else []))
    if rng.random() < 0.3:
        hdr["params"] = {rng.choice(["seconds", "prompt", "nope", "é" * 50]): rng.choice(values) for _ in range(rng.randint(1, 4))}
    raw = json.dumps(hdr, ensure_ascii=rng.random() < 0.5).encode("utf-8", "replace")
    if rng.random() < 0.1:
        raw = raw[: rng.randint(0, len(raw))]
    frames = [raw]
    if rng.random() < 0.2:
        frames += [png(rng.choice([4, 16, 64]), 16), b"junk"][: rng.randint(1, 2)]
    return frames


def test_fuzz_every_message_is_answered_never_internal_and_ping_stays_fast(server):
    rng = random.Random(1234)
    cases = [frames for frames, _ in ECHO_CASES.values()]
    cases += [P.submit("views", attachments=[Attachment(f"views/{i}.png", "image/png", png(4096, 4096)) for i in range(5)]),
              [b"\xff" * 70000], [b""], [], [b"{}", b"extra"]]
    with Client(server.endpoint, timeout=5, token=new_token()) as owner:  # a real job, someone else's
        job_ids = [owner.submit("sleepy", {"prompt": "not yours"})]
        list(owner.events(job_ids[0], idle_timeout=5))
    s = dealer(server.endpoint)
    try:
        for batch in range(8):
            sent = cases if batch == 0 else [_random_frames(rng, job_ids) for _ in range(60)]
            for frames in sent:
                s.send_multipart(frames or [b""])
                assert s.poll(5000), f"no answer to {str(frames)[:200]}"
                got = s.recv_multipart()
                if got[0] == b"" and len(got) > 1:  # an empty first frame reads as a REQ envelope: so is the reply
                    got = got[1:]
                reply = P.decode(got)
                assert reply.get("code") != ErrorCode.INTERNAL, (str(frames)[:300], reply.header)
                if reply.type == P.ACCEPTED:
                    job_ids.append(reply.get("job"))
            assert alive(server.endpoint) < 1.0, f"batch {batch}: ping slower than 1 s"
    finally:
        s.close()
    assert server._thread.is_alive()
