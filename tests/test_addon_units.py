"""The add-on's bpy-free parts, in this process: PNG and GLB writing, the job
manager's state machine against a live backend, error hints, and the build
script's manifest handling. (Blender sessions are in test_addon.py.)"""

from __future__ import annotations

import io
import json
import re
import socket
import time
import tomllib
import zipfile

import numpy as np
import pytest
from PIL import Image

import build_addon
from addon_helpers import StubServer
from blender_addon import glb, hints, manager as M
from blender_addon.png import encode_png
from gen3d_wire.protocol import ErrorCode


# --------------------------------------------------------------------------- PNG / GLB


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_png_encoder_round_trips_through_pillow(channels):
    rng = np.random.default_rng(channels)
    px = rng.integers(0, 256, (13, 17, channels), dtype=np.uint8)
    im = Image.open(io.BytesIO(encode_png(px)))
    back = np.asarray(im)
    assert back.reshape(13, 17, channels).tolist() == px.tolist()
    assert im.mode == {1: "L", 3: "RGB", 4: "RGBA"}[channels]


def test_add_on_glb_is_read_back_exactly_by_the_backend():
    from backend.mesh.gltf import read_glb as backend_read

    rng = np.random.default_rng(0)
    corners = rng.normal(size=(3 * 40, 3)) * 3.0  # Z-up world, one vertex per triangle corner
    uv = rng.random((3 * 40, 2)).astype(np.float32)
    png = encode_png(np.full((8, 8, 3), 90, np.uint8))
    data = glb.write_glb(corners, normals=rng.normal(size=(120, 3)), uv=uv, texture_png=png, name="thing")
    (prim,) = backend_read(data)
    assert prim.indices.tolist() == np.arange(120).reshape(40, 3).tolist()  # corner order kept
    np.testing.assert_array_equal(prim.world_vertices().astype(np.float32), corners.astype(np.float32))
    np.testing.assert_allclose(prim.uv, uv, atol=1e-7)
    assert prim.texture_png == png and prim.name == "thing"
    # and the add-on's reader agrees
    mine = glb.read_glb(data)
    np.testing.assert_array_equal(mine.corner_positions_z_up.astype(np.float32), corners.astype(np.float32))
    np.testing.assert_allclose(mine.corner_uv, uv, atol=1e-7)
    assert mine.texture_png == png


def test_add_on_reads_backend_glb_per_corner():
    from backend.mesh.gltf import write_glb as backend_write
    from backend.mesh.textured import TexturedMesh

    verts = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], np.float64)
    faces = np.array([[0, 1, 2], [0, 3, 1], [1, 3, 2]])
    uv = np.array([[0.1, 0.2], [0.9, 0.2], [0.1, 0.8], [0.5, 0.5]], np.float32)
    data = backend_write(TexturedMesh(verts, faces, uv, np.ones((4, 4, 3), np.float32)))
    g = glb.read_glb(data)
    np.testing.assert_allclose(g.corner_positions_z_up, verts[faces.reshape(-1)], atol=1e-7)
    np.testing.assert_allclose(g.corner_uv, uv[faces.reshape(-1)], atol=1e-6)
    assert g.texture_png and g.texture_png.startswith(b"\x89PNG")


def test_glb_writer_refuses_bad_meshes():
    with pytest.raises(glb.GlbError):
        glb.write_glb(np.zeros((4, 3)))
    with pytest.raises(glb.GlbError):
        glb.write_glb(np.full((3, 3), np.nan))


# --------------------------------------------------------------------------- hints, endpoints


def test_every_backend_error_code_has_a_hint():
    codes = [v for k, v in vars(ErrorCode).items() if k.isupper()]
    for code in codes + ["unreachable", "online_access", "no_wire", "backend_exited"]:
        assert hints.hint_for(code), code
    assert "prefetch" in hints.hint_for("model_missing")


@pytest.mark.parametrize("endpoint, local", [
    ("tcp://127.0.0.1:5555", True), ("tcp://localhost:5555", True), ("tcp://[::1]:5555", True),
    ("tcp://127.3.4.5:1", True), ("ipc:///tmp/gen3d", True),
    ("tcp://192.168.1.20:5555", False), ("tcp://gpu-box.example.org:5555", False), ("tcp://10.0.0.1:5555", False),
])
def test_endpoint_is_local(endpoint, local):
    assert M.endpoint_is_local(endpoint) is local


# --------------------------------------------------------------------------- the manager, without Blender


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory):
    """Always the stand-in kinds: these tests are about the manager, not the backend's pipeline."""
    srv = StubServer(tmp_path_factory.mktemp("unit_jobs"))
    yield srv.endpoint
    srv.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_manager_runs_a_job_and_applies_the_result(endpoint):
    mgr = M.Manager()
    got = []

    def apply(ev):
        got.append(ev)
        return "applied", ["obj"]

    job = M.Job("text_to_3d", "Generate from text", "TEXT", params={"prompt": "a cube", "quality": "draft"}, apply=apply)
    mgr.submit(job, M.Connection(endpoint, timeout=5))
    seen_stages = set()
    while mgr.busy:
        mgr.tick()
        if mgr.job is not None:
            seen_stages.add(mgr.job.stage)
        time.sleep(0.02)
    assert mgr.outcome.state == "done" and mgr.outcome.message == "applied" and mgr.outcome.objects == ["obj"]
    assert len(got) == 1 and "model.glb" in got[0].attachments
    assert {"connecting", "text_to_image"} <= seen_stages
    assert {"text_to_3d", "image_to_3d", "refine_texture"} <= set(mgr.server_info["job_kinds"])
    mgr.shutdown()


def test_manager_cancel_drops_the_result(endpoint):
    mgr = M.Manager()
    applied = []
    job = M.Job("text_to_3d", "Generate from text", "TEXT", params={"prompt": "x"},
                apply=lambda ev: applied.append(ev) or ("no", []))
    mgr.submit(job, M.Connection(endpoint, timeout=5))
    t0 = time.monotonic()
    while mgr.busy and (mgr.job.job_id is None or mgr.job.fraction < 0.1) and time.monotonic() - t0 < 10:
        mgr.tick()
        time.sleep(0.02)
    assert mgr.cancel()
    assert mgr.job.phase == M.CANCELLING
    out = mgr.wait(timeout=20)
    assert out.state == "cancelled" and not applied
    mgr.shutdown()


def test_manager_reports_unreachable_without_blocking():
    mgr = M.Manager()
    ep = f"tcp://127.0.0.1:{_free_port()}"
    mgr.submit(M.Job("text_to_3d", "Generate", "TEXT", params={"prompt": "x"}), M.Connection(ep, timeout=0.5))
    slowest = 0.0
    while mgr.busy:
        t = time.perf_counter()
        mgr.tick()
        slowest = max(slowest, time.perf_counter() - t)
        time.sleep(0.01)
    assert slowest < 0.1, "a tick must never wait for the backend"
    assert mgr.outcome.state == "error" and mgr.outcome.code == "unreachable" and ep in mgr.outcome.message
    assert "Start the backend" in mgr.outcome.hint
    mgr.shutdown()


def test_manager_says_when_the_backend_lacks_a_kind(endpoint):
    mgr = M.Manager()
    mgr.submit(M.Job("make_coffee", "Coffee", "TEXT"), M.Connection(endpoint, timeout=5))
    out = mgr.wait(timeout=10)
    assert out.state == "error" and out.code == "unknown_kind" and "text_to_3d" in out.message
    mgr.shutdown()


def test_manager_queues_jobs_and_runs_them_in_order(endpoint):
    mgr = M.Manager()
    conn = M.Connection(endpoint, timeout=5)
    order = []

    def job(name):
        return M.Job("text_to_3d", name, "TEXT", params={"prompt": name},
                     apply=lambda ev: (order.append((name, ev.metadata["prompt"])), (f"applied {name}", [name]))[1])

    a, b, c = job("a"), job("b"), job("c")
    for j in (a, b, c):
        mgr.submit(j, conn)
    assert mgr.job is a and mgr.queue == [b, c] and [j.phase for j in (b, c)] == [M.QUEUED, M.QUEUED]
    assert "after 2 job" in c.message
    # a connection test is refused while jobs run: it would stand in the queue for no reason
    with pytest.raises(RuntimeError, match="still running"):
        mgr.submit(M.Job(None, "Connect", "PREFS"), conn)
    d = job("d")
    mgr.submit(d, conn)
    assert mgr.cancel(d) and d not in mgr.queue and mgr.outcome.state == "cancelled"
    out = mgr.wait(timeout=60)
    assert order == [("a", "a"), ("b", "b"), ("c", "c")]
    assert out.state == "done" and out.message == "applied c" and not mgr.queue and mgr.job is None
    mgr.shutdown()


def _history_job(hist, conn, prompt, **kw):
    e = hist.add("text_to_3d", prompt, {"prompt": prompt, "seed": 5}, conn.endpoint, name="gen3d_" + prompt)
    return M.Job("text_to_3d", prompt, "TEXT", params={"prompt": prompt, "seed": 5}, history_id=e.id, **kw), e


def test_manager_keeps_results_in_the_history(endpoint, tmp_path):
    from blender_addon.history import History

    mgr = M.Manager()
    mgr.history = hist = History(str(tmp_path / "h"))
    conn = M.Connection(endpoint, timeout=5)
    ok, e_ok = _history_job(hist, conn, "kept", apply=lambda ev: ("in", ["o"]))
    bad, e_bad = _history_job(hist, conn, "broken import", apply=lambda ev: 1 / 0)
    gone, e_gone = _history_job(hist, conn, "cancelled in the queue")
    for j in (ok, bad, gone):
        mgr.submit(j, conn)
    mgr.cancel(gone)
    mgr.wait(timeout=60)
    again = History(str(tmp_path / "h"))  # what the next Blender session reads
    got = {e.label: e for e in again.entries()}
    assert set(got) == {"kept", "broken import"}, "a job taken out of the queue leaves no entry"
    for label in got:
        e = got[label]
        assert e.state == "done" and e.job and e.seed == 5 and e.metadata.get("prompt") == label
        assert again.result(e.id)["model.glb"][:4] == b"glTF"
        assert again.read(e.thumb).startswith(b"\x89PNG")  # the backend's reference image
    assert got["kept"].imports == 1 and got["broken import"].imports == 0, "a failed import keeps the result"
    again.remove(got["kept"].id)
    assert History(str(tmp_path / "h")).get(e_ok.id) is None and not (tmp_path / "h" / f"{e_ok.id}.glb").exists()
    mgr.shutdown()


def test_a_job_left_running_is_fetched_by_its_id_on_the_next_connection(endpoint, tmp_path):
    from blender_addon.history import History

    conn = M.Connection(endpoint, timeout=5, token="t" * 24)
    first = M.Manager()
    first.history = History(str(tmp_path / "h"))
    job, entry = _history_job(first.history, conn, "left behind")
    first.submit(job, conn)
    t0 = time.monotonic()
    while job.job_id is None and time.monotonic() - t0 < 10:
        first.tick()
        time.sleep(0.02)
    assert job.job_id
    first.shutdown()  # Blender closes: the job is not cancelled, its entry keeps the id
    hist = History(str(tmp_path / "h"))
    (e,) = hist.unfinished()
    assert e.id == entry.id and e.job == job.job_id and e.state == "running"
    time.sleep(2.0)  # it ends on the backend while nobody listens

    second = M.Manager()
    second.history = hist
    fetched = []
    second.resume_factory = lambda en, imp: M.Job(en.kind, "Fetch", "TEXT", dict(en.params), history_id=en.id,
                                                  resume_job=en.job, import_result=imp,
                                                  apply=lambda ev: (fetched.append(ev.job), ("placed", []))[1])
    # any connection to that backend brings the result back (into the history only, by default)
    second.submit(M.Job(None, "Connect", "PREFS"), conn)
    second.wait(timeout=30)
    assert hist.get(entry.id).state == "done" and hist.result(entry.id)["model.glb"][:4] == b"glTF"
    assert not fetched and "Fetched into the history" in second.outcome.message
    assert not hist.unfinished()
    # a fetch of a job the backend does not know ends the entry with its error, not a crash
    e2 = hist.add("text_to_3d", "unknown", {"prompt": "x"}, conn.endpoint)
    hist.accepted(e2.id, "0123456789abcdef0123456789abcdef")
    assert second.fetch_unfinished(conn, import_result=True) == 1
    out = second.wait(timeout=30)
    assert out.state == "error" and hist.get(e2.id).state == "error" and not hist.unfinished()
    second.shutdown()


def test_history_survives_a_broken_file_and_trims_old_entries(tmp_path):
    from blender_addon.history import History

    folder = tmp_path / "h"
    folder.mkdir()
    (folder / "history.json").write_text("{not json")
    h = History(str(folder), max_entries=3)
    assert h.entries() == []
    ids = []
    for i in range(5):
        e = h.add("text_to_3d", f"p{i}", {"seed": i}, image_png=b"\x89PNG fake")
        h.accepted(e.id, f"job{i}")
        if i != 0:
            h.finished(e.id, {"model.glb": b"glTF" + bytes(8)})
        ids.append(e.id)
    # the oldest finished ones went with their files; the running p0 stays (its result may still come)
    assert [e.label for e in h.entries()] == ["p4", "p3", "p0"]
    assert h.get(ids[0]) is not None and h.get(ids[1]) is None and not (folder / f"{ids[1]}.glb").exists()
    (folder / "history.json").write_text(json.dumps({"entries": [{"id": 3}, {"id": "x", "kind": "text_to_3d",
                                                                             "params": "not a dict"}, "junk"]}))
    assert History(str(folder)).entries() == []


def test_manager_bad_params_come_back_as_an_error_with_a_hint(endpoint):
    mgr = M.Manager()
    mgr.submit(M.Job("text_to_3d", "Generate", "TEXT", params={"prompt": "x", "quality": "ultra"}),
               M.Connection(endpoint, timeout=5))
    out = mgr.wait(timeout=10)
    assert out.state == "error" and out.code == "bad_params" and "quality" in out.message and out.hint
    mgr.shutdown()


# --------------------------------------------------------------------------- build script


def test_source_manifest_lists_the_pinned_wheels_and_permissions():
    text = build_addon.read_manifest()
    build_addon.check_source_manifest(text)  # raises when the list and the pin disagree
    m = tomllib.loads(text)
    assert m["id"] == "gen3d" and m["type"] == "add-on" and m["blender_version_min"] == "4.2.0"
    assert set(m["permissions"]) == {"network", "files"} and all(m["permissions"].values())
    # Blender's strict manifest check (extensions platform, `blender --command extension validate`): at most
    # 64 characters, ending in a letter or digit
    for text in [m["tagline"], *m["permissions"].values()]:
        assert len(text) <= 64 and text[-1].isalnum(), text
    assert set(m["platforms"]) == set(build_addon.PLATFORMS)
    assert all(w.startswith("./wheels/pyzmq-" + build_addon.PYZMQ_VERSION) for w in m["wheels"])
    assert any("cp311-cp311" in w for w in m["wheels"]) and any("cp312-abi3" in w for w in m["wheels"])
    assert len(m["tagline"]) <= 64 and not m["tagline"].endswith(".")


def test_partial_manifest_narrows_platforms_and_blender_versions():
    text = build_addon.build_manifest(build_addon.read_manifest(), ["pyzmq-x-cp311-cp311-win_amd64.whl"],
                                      ["windows-x64"], ["3.11"])
    m = tomllib.loads(text)
    assert m["platforms"] == ["windows-x64"] and m["wheels"] == ["./wheels/pyzmq-x-cp311-cp311-win_amd64.whl"]
    assert m["blender_version_max"] == "5.1.0" and "build" not in m
    full = tomllib.loads(build_addon.build_manifest(build_addon.read_manifest(), ["a-1-cp311-cp311-x.whl"],
                                                    list(build_addon.PLATFORMS), ["3.11", "3.13"]))
    assert "blender_version_max" not in full


def test_offline_build_without_the_wheels_says_which_are_missing(tmp_path):
    with pytest.raises(SystemExit, match="win_amd64"):
        build_addon.main(["--out", str(tmp_path), "--wheels", str(tmp_path), "--platform", "windows-x64", "-q"])


def test_build_with_a_wheel_folder_makes_an_installable_layout(tmp_path):
    # any file with the pinned wheel's name will do for checking the layout (the install test uses the real one)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    names = build_addon.targets(["windows-x64"], ["3.11", "3.13"])
    for n in names:
        with zipfile.ZipFile(wheels / n, "w") as zf:
            zf.writestr("zmq/__init__.py", "")
    assert build_addon.main(["--out", str(tmp_path / "dist"), "--wheels", str(wheels), "--platform", "windows-x64",
                             "-q"]) == 0
    (zpath,) = (tmp_path / "dist").glob("gen3d-*.zip")
    version = tomllib.loads(build_addon.read_manifest())["version"]
    assert zpath.name == f"gen3d-{version}.zip"
    with zipfile.ZipFile(zpath) as zf:
        files = set(zf.namelist())
        m = tomllib.loads(zf.read("blender_manifest.toml").decode())
    assert {"__init__.py", "manager.py", "gen3d_wire/__init__.py", "gen3d_wire/client.py",
            "gen3d_wire/protocol.py"} <= files
    assert {f"wheels/{n}" for n in names} <= files
    assert sorted(m["wheels"]) == sorted(f"./wheels/{n}" for n in names)
    assert m["platforms"] == ["windows-x64"] and "blender_version_max" not in m
    assert not any(re.search(r"__pycache__|\.pyc$", f) for f in files)
    json.dumps(m)  # plain data


# --------------------------------------------------------------------------- the local backend's installer


def test_installer_plan_puts_the_right_torch_first(tmp_path):
    from blender_addon import installer as I

    env = str(tmp_path / "env")
    steps = I.plan("/usr/bin/python3", env, "/x/gen3d-0.1.0-py3-none-any.whl", "cuda", pip_args=["--proxy", "p:1"])
    assert [s.name for s in steps] == ["environment", "torch", "backend", "check"]
    assert steps[0].argv == ["/usr/bin/python3", "-m", "venv", env]
    torch = steps[1].argv
    assert torch[:3] == [I.env_python(env), "-m", "pip"] and I.TORCH_SPEC in torch
    assert torch[torch.index("--index-url") + 1].endswith("/cu126") and "--proxy" in torch
    assert "--index-url" not in I.plan("p", env, "w", "index")[1].argv  # the index (or pip's config) decides
    assert I.plan("p", env, "w", "cpu")[1].argv[-1].endswith("/whl/cpu")
    assert steps[2].argv[-1].endswith(".whl") and "--upgrade" in steps[2].argv
    assert I.resolve_torch_build("auto", detect=lambda: True) == "cuda"
    assert I.resolve_torch_build("auto", detect=lambda: False) == "cpu"
    with pytest.raises(ValueError):
        I.resolve_torch_build("rocm")


def test_installer_backend_source_is_the_zip_wheel_or_the_source_tree(tmp_path):
    from blender_addon import installer as I

    assert I.backend_source(str(build_addon.ADDON_DIR)) == str(build_addon.ROOT)
    (tmp_path / "ext" / "backend_wheel").mkdir(parents=True)
    whl = tmp_path / "ext" / "backend_wheel" / "gen3d-0.1.0-py3-none-any.whl"
    whl.write_bytes(b"PK")
    assert I.backend_source(str(tmp_path / "ext")) == str(whl)
    assert I.backend_source(str(tmp_path)) is None


def _steps(*codes):
    import sys

    from blender_addon import installer as I

    return [I.Step(f"s{i}", f"Step {i}", [sys.executable, "-c", c]) for i, c in enumerate(codes)]


def test_installer_runs_its_steps_and_reports_the_failing_one_with_the_log_tail(tmp_path):
    from blender_addon import installer as I

    ok = I.Installer(_steps("print('Collecting numpy>=1.24')", "print('Downloading torch-2.13.0-cp311.whl')"),
                     str(tmp_path / "ok.log"))
    ok.start()
    seen = set()
    while ok.poll() == I.RUNNING:
        seen.add((ok.index, ok.package))
        time.sleep(0.01)
    assert ok.state == I.DONE and ok.fraction == 1.0
    log = (tmp_path / "ok.log").read_text()
    assert "step 1/2" in log and "step 2/2" in log and "Collecting numpy" in log and "== done" in log

    bad = I.Installer(_steps("print('fine')", "import sys; print('ERROR: No matching distribution for torch'); "
                                              "sys.exit(3)", "print('never')"), str(tmp_path / "bad.log"))
    bad.start()
    assert bad.wait(30) == I.FAILED
    assert bad.index == 1 and "'s1'" in bad.message and "exit code 3" in bad.message
    assert any("No matching distribution" in line for line in bad.log_tail())
    assert "never" not in (tmp_path / "bad.log").read_text().replace("print('never')", "")


def test_installer_cancel_kills_the_running_step(tmp_path):
    import os

    from blender_addon import installer as I

    inst = I.Installer(_steps("import subprocess, sys, time; "
                              "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
                              "print('child started', flush=True); time.sleep(60)"), str(tmp_path / "c.log"))
    inst.start()
    pid = inst.proc.pid
    t0 = time.monotonic()
    while "child started" not in (tmp_path / "c.log").read_text() and time.monotonic() - t0 < 20:
        inst.poll()
        time.sleep(0.05)
    assert inst.cancel() and inst.state == I.CANCELLED and "'s0'" in inst.message
    t0 = time.monotonic()
    gone = False
    while not gone and time.monotonic() - t0 < 10:  # the whole process group goes, the step's own child too
        try:
            os.killpg(pid, 0)
            time.sleep(0.05)
        except ProcessLookupError:
            gone = True
    assert gone
    assert not inst.cancel()
