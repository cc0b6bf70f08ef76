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


def test_manager_refuses_a_second_job_while_one_runs(endpoint):
    mgr = M.Manager()
    mgr.submit(M.Job("text_to_3d", "A", "TEXT", params={"prompt": "x"}), M.Connection(endpoint, timeout=5))
    with pytest.raises(RuntimeError, match="still running"):
        mgr.submit(M.Job("text_to_3d", "B", "TEXT", params={"prompt": "y"}), M.Connection(endpoint, timeout=5))
    mgr.cancel()
    mgr.wait(timeout=20)
    mgr.shutdown()


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
