"""Posed views -> textured GLB, end to end on Blender ground truth (small settings,
real thresholds), through the function, the CLI and the server job."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from backend.common.dataset import load_transforms
from backend.mesh.gltf import read_glb, write_glb
from backend.mesh.textured import TexturedMesh, render_mesh_rgba
from backend.common.metrics import chamfer_fscore, mask_iou, psnr_union
from backend.pipeline.reconstruct import ReconstructSettings, reconstruct
from backend.kinds.reconstruct import pack_transforms

from conftest import ROOT

OFFSET = (0.25, -0.15, 0.1)  # the object is not at the origin: reconstruction must keep it there


@pytest.fixture(scope="module")
def suzanne(gt_data):
    return gt_data("suzanne", train=16, test=4, res=64, offset=OFFSET, seed=1)


@pytest.fixture(scope="module")
def result(suzanne):
    s = ReconstructSettings()
    s.train.iterations = 300
    s.mesh.grid_resolution = 64
    s.mesh.clean.target_faces = 5000
    s.bake.texture_size = 256
    t0 = time.perf_counter()
    res = reconstruct(load_transforms(suzanne / "transforms_train.json"), s)
    res.stats["wall"] = time.perf_counter() - t0
    return res


def test_quality_on_held_out_views(suzanne, result):
    test = load_transforms(suzanne / "transforms_test.json")
    mesh = result.mesh
    flat = mesh.copy(texture=np.broadcast_to(mesh.texture.reshape(-1, 3).mean(0), mesh.texture.shape).copy())
    ps, pf, ious = [], [], []
    for i in range(len(test)):
        im = render_mesh_rgba(mesh, test.c2w[i], test.intrinsics[i], 4)
        ps.append(psnr_union(im, test.images[i]))
        pf.append(psnr_union(render_mesh_rgba(flat, test.c2w[i], test.intrinsics[i], 4), test.images[i]))
        ious.append(mask_iou(im[..., 3], test.images[i][..., 3]))
    # at 64 px and 300 steps the full-size bar (22 dB, 0.93 IoU at 128 px) is not reachable; these
    # thresholds still fail for a wrong camera convention (IoU), a scrambled bake (PSNR vs flat colour)
    assert np.mean(ious) >= 0.93, ious
    assert np.mean(ps) >= 19.5, ps
    assert np.mean(ps) >= np.mean(pf) + 2.5, (ps, pf)
    gt = np.load(suzanne / "gt_mesh.npz")
    geo = chamfer_fscore(mesh.vertices, mesh.faces, gt["vertices"], gt["faces"], n=30000)
    assert geo["chamfer"] <= 0.025 and geo["fscore"] >= 0.55, geo
    assert result.stats["faces"] <= 5000 and result.stats["texture_size"] == 256


def test_world_placement_is_kept(suzanne, result):
    gt = np.load(suzanne / "gt_mesh.npz")
    lo, hi = result.mesh.vertices.min(0), result.mesh.vertices.max(0)
    glo, ghi = gt["vertices"].min(0), gt["vertices"].max(0)
    diag = np.linalg.norm(ghi - glo)
    assert np.abs(0.5 * (lo + hi) - 0.5 * (glo + ghi)).max() < 0.03 * diag
    assert np.abs((hi - lo) - (ghi - glo)).max() < 0.06 * diag


def test_glb_in_blender_is_textured_in_place(suzanne, result, tmp_path):
    from PIL import Image

    from evaluation.blender_check import check_glb

    glb = tmp_path / "model.glb"
    glb.write_bytes(write_glb(result.mesh))
    rep = check_glb(glb, tmp_path / "r.json", suzanne / "transforms_test.json", tmp_path / "bl", resolution=64)
    assert rep["n_mesh_objects"] == 1
    obj = rep["objects"][0]
    assert obj["has_uv"] and obj["materials"][0]["base_color_linked_image"]
    np.testing.assert_allclose(rep["bbox_min"], result.mesh.vertices.min(0), atol=1e-4)
    np.testing.assert_allclose(rep["bbox_max"], result.mesh.vertices.max(0), atol=1e-4)
    test = load_transforms(suzanne / "transforms_test.json")
    frames = json.loads((suzanne / "transforms_test.json").read_text())["frames"]
    ours, blender = [], []
    for i, fr in enumerate(frames):
        bl = np.asarray(Image.open(tmp_path / "bl" / (fr["file_path"] + ".png")).convert("RGBA"), np.float32) / 255
        blender.append(psnr_union(bl, test.images[i]))
        ours.append(psnr_union(render_mesh_rgba(result.mesh, test.c2w[i], test.intrinsics[i], 4), test.images[i]))
    # Blender sees the same textured model we do (a flipped V or axis would cost many dB)
    assert abs(np.mean(blender) - np.mean(ours)) < 1.5, (blender, ours)


def test_cli_reconstruct(gt_data, tmp_path):
    data = gt_data("cube", train=8, test=2, res=48)
    out = tmp_path / "cube.glb"
    r = subprocess.run([sys.executable, "-m", "backend", "reconstruct", str(data / "transforms_train.json"), "--out", str(out),
                        "--ply", str(tmp_path / "g.ply"), "--iterations", "60", "--faces", "800", "--texture-size", "128",
                        "--grid-resolution", "48", "--seed", "3", "-q"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    prims = read_glb(out.read_bytes())
    assert len(prims[0].indices) <= 800 and prims[0].texture.shape == (128, 128, 3)
    assert (tmp_path / "g.ply").read_bytes().startswith(b"ply\n")
    r = subprocess.run([sys.executable, "-m", "backend", "reconstruct", str(tmp_path / "missing.json"), "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "not found" in r.stderr and "Traceback" not in r.stderr


def test_reconstruct_job_on_the_server(gt_data, tmp_path):
    from backend.kinds import diagnose, reconstruct as rec
    from backend.service.jobs import Registry
    from backend.service.server import Server, ServerConfig
    from gen3d_wire import protocol as P
    from gen3d_wire.client import BackendError, Client
    from gen3d_wire.protocol import Attachment

    data = gt_data("cube", train=8, test=2, res=48)
    srv = Server(ServerConfig(port=0, jobs_dir=tmp_path / "jobs", device="cpu"), Registry([diagnose.SPEC, rec.SPEC]))
    srv.start_background()
    try:
        atts = pack_transforms(data / "transforms_train.json")
        params = {"iterations": 40, "faces": 600, "texture_size": 128, "grid_resolution": 48, "ply": True}
        stages = []
        with Client(srv.endpoint, timeout=10) as c:
            msg = c.run("reconstruct", params, atts, on_progress=lambda m: stages.append(m.get("stage")))
            assert {"gaussians", "mesh", "uv", "texture"} <= set(stages)
            glb = msg.attachment("model.glb").data
            assert read_glb(glb)[0].texture is not None
            assert msg.attachment("gaussians.ply") is not None
            assert 570 <= msg.get("metadata")["faces"] <= 600  # the face budget, within 5 %
            # bad input: a frame whose image was not sent, and a NaN camera
            meta = json.loads(atts[0].data)
            meta["frames"][0]["file_path"] = "views/nothing.png"
            with pytest.raises(BackendError) as info:
                c.run("reconstruct", params, [Attachment("transforms.json", "application/json", json.dumps(meta).encode())] + atts[1:])
            assert info.value.code == P.ErrorCode.BAD_INPUT and "views/nothing.png" in info.value.message
            meta = json.loads(atts[0].data)
            meta["frames"][1]["transform_matrix"][0][0] = float("nan")
            with pytest.raises(BackendError) as info:
                c.run("reconstruct", params, [Attachment("transforms.json", "application/json", json.dumps(meta).replace("NaN", "NaN").encode())] + atts[1:])
            assert info.value.code == P.ErrorCode.BAD_INPUT and "NaN" in info.value.message
            # cancel mid-training: stops within a second
            job = c.submit("reconstruct", {**params, "iterations": 5000}, atts)
            for m in c.events(job):
                if m.type == P.PROGRESS and m.get("stage") == "gaussians" and m.get("stage_fraction", 0) > 0.002:
                    break
            t0 = time.monotonic()
            c.cancel(job)
            last = [m for m in c.events(job) if m.type in P.TERMINAL_TYPES][-1]
            assert last.type == P.CANCELLED and time.monotonic() - t0 < 1.0
            # and the server still works
            assert c.ping() < 1.0
    finally:
        srv.stop()
