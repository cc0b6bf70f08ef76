"""SDS texture refinement: renderer gradient, oracle convergence, both priors on
the tiny preset, the refine_texture job and CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from backend import cameras as cam
from backend.dataset import encode_png, load_transforms
from backend.jobs import InputError
from backend.mesh.gltf import read_glb, write_glb
from backend.mesh.textured import TexturedMesh, render_mesh_rgba, render_textured, vertex_normals
from backend.metrics import psnr_union
from backend.sds import OracleGuidance, RefineSettings, StableDiffusionGuidance, Zero123Guidance, refine_texture, view_suffix

from conftest import ROOT


def test_texture_gradient_matches_finite_differences():
    import trimesh

    m = trimesh.creation.icosphere(2, radius=0.5)
    from backend.mesh.uv import unwrap

    vm, f, uv = unwrap(np.asarray(m.vertices), np.asarray(m.faces), 32)
    V = torch.tensor(np.asarray(m.vertices)[vm], dtype=torch.float64)
    tex = torch.rand(16, 16, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    c2w = cam.spherical_to_c2w(20, 30, 2.0)
    k = cam.Intrinsics.from_fov(math.radians(40), 24, 24)
    w = torch.rand(24, 24, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    bg = torch.tensor([0.2, 0.3, 0.4], dtype=torch.float64)

    def loss(t):
        return (render_textured(V, torch.tensor(f), torch.tensor(uv, dtype=torch.float64), t, c2w, k, 2, background=bg) * w).sum()

    loss(tex).backward()
    rng = np.random.default_rng(0)
    hit = 0
    for _ in range(30):
        i, j, c = rng.integers(16), rng.integers(16), rng.integers(3)
        e = 1e-6
        tp = tex.detach().clone()
        tm = tex.detach().clone()
        tp[i, j, c] += e
        tm[i, j, c] -= e
        fd = (loss(tp) - loss(tm)).item() / (2 * e)
        assert tex.grad[i, j, c].item() == pytest.approx(fd, abs=1e-6, rel=1e-5)
        hit += abs(fd) > 1e-6
    assert hit >= 5  # the probes touched texels the camera sees
    assert (tex.grad.abs().sum(-1) > 0).float().mean() > 0.2


def test_view_suffixes():
    assert view_suffix(0, 0) == "front view" and view_suffix(0, 180) == "back view"
    assert view_suffix(10, 90) == "side view" and view_suffix(70, 0) == "overhead view"


@pytest.fixture(scope="module")
def cube_pool(gt_data):
    return gt_data("cube", train=12, test=3, res=64, seed=2)


def test_oracle_sds_repairs_a_degraded_texture(cube_pool):
    from evaluation.oracle import PoolTruth, degrade_texture

    train = load_transforms(cube_pool / "transforms_train.json")
    test = load_transforms(cube_pool / "transforms_test.json")
    gt = np.load(cube_pool / "gt_mesh.npz")
    v = gt["vertices"][gt["faces"]].reshape(-1, 3)
    mesh = TexturedMesh(v, np.arange(len(v)).reshape(-1, 3), gt["uv"].reshape(-1, 2),
                        degrade_texture(gt["texture"].astype(np.float32) / 255))

    def held_out(m):
        return np.mean([psnr_union(render_mesh_rgba(m, test.c2w[i], test.intrinsics[i], 4), test.images[i]) for i in range(len(test))])

    before = held_out(mesh)
    s = RefineSettings(steps=60, render_size=64, camera_prob=1.0, views_per_step=2, lr=0.05, t_final_max=0.3)
    cams = [(train.c2w[i], train.intrinsics[i]) for i in range(len(train))]
    refined, report = refine_texture(mesh, [OracleGuidance(PoolTruth(train.images), size=64)], s, cams)
    after = held_out(refined)
    assert after >= before + 5.0 and after >= 24.0, (before, after)
    np.testing.assert_array_equal(refined.vertices, mesh.vertices)
    # the oracle has no unconditional branch: classifier score distillation is refused clearly
    with pytest.raises(ValueError, match="conditional"):
        refine_texture(mesh, [OracleGuidance(PoolTruth(train.images), size=64)], RefineSettings(steps=1, update="csd",
                                                                                             camera_prob=1.0, render_size=64), cams)


@pytest.fixture(scope="module")
def tiny_models():
    from backend.models.store import ModelStore

    return ModelStore("tiny", "cpu")


def _ball(texture_size=32):
    import trimesh

    from backend.mesh.uv import unwrap

    m = trimesh.creation.icosphere(2, radius=0.8)
    vm, f, uv = unwrap(np.asarray(m.vertices), np.asarray(m.faces), texture_size)
    v = np.asarray(m.vertices)[vm]
    return TexturedMesh(v, f, uv, np.full((texture_size, texture_size, 3), 0.5, np.float32), vertex_normals(v, f))


@pytest.mark.parametrize("update", ["sds", "sdedit", "csd"])
def test_both_priors_on_the_tiny_preset(tiny_models, update):
    sd = StableDiffusionGuidance(tiny_models.stable_diffusion(), "a bronze statue", "blurry", 100.0, size=64)
    ref = np.ones((256, 256, 3), np.float32)
    ref[64:192, 64:192] = [0.8, 0.2, 0.1]
    z = Zero123Guidance(tiny_models.zero123(), ref, 0.0, 4.0, weight=0.5)
    mesh = _ball()
    out, report = refine_texture(mesh, [sd, z], RefineSettings(steps=3, update=update, render_size=64, sdedit_steps=2))
    assert np.isfinite(report.losses).all() and report.steps == 3
    assert np.abs(out.texture - mesh.texture).max() > 1e-4  # the priors moved the texture
    assert out.texture.min() >= 0 and out.texture.max() <= 1


# -- the job and the CLI -----------------------------------------------------------------


def _mesh_glb(with_uv=True) -> bytes:
    m = _ball(64)
    rng = np.random.default_rng(0)
    m = m.copy(texture=rng.random((64, 64, 3)).astype(np.float32), vertices=m.vertices + np.array([1.5, -0.3, 0.2]))
    glb = write_glb(m)
    if with_uv:
        return glb
    # strip TEXCOORD_0 and the texture: a bare mesh, as some tools export
    prim = read_glb(glb)[0]
    bare = TexturedMesh(prim.world_vertices(), prim.indices, np.zeros((len(prim.positions), 2), np.float32),
                        np.ones((4, 4, 3), np.float32))
    data = write_glb(bare)
    import struct

    jlen = struct.unpack_from("<I", data, 12)[0]
    js = json.loads(data[20:20 + jlen])
    del js["meshes"][0]["primitives"][0]["attributes"]["TEXCOORD_0"]
    del js["meshes"][0]["primitives"][0]["material"]
    raw = json.dumps(js).encode()
    raw += b" " * ((4 - len(raw) % 4) % 4)
    rest = data[20 + jlen:]
    body = struct.pack("<II", len(raw), 0x4E4F534A) + raw + rest
    return struct.pack("<4sII", b"glTF", 2, 12 + len(body)) + body


def _run_job(models, params, attachments):
    from backend import refine
    from backend.jobs import JobContext, Limits
    from gen3d_wire.protocol import Attachment

    spec = refine.SPEC
    inputs = spec.validate(params, [Attachment(n, "x", d) for n, d in attachments.items()], Limits())
    return spec.handler(inputs, JobContext(models=models))


def test_refine_job_keeps_geometry_bit_for_bit(tiny_models):
    glb = _mesh_glb()
    out = _run_job(tiny_models, {"prompt": "rusty metal", "steps": 3}, {"mesh": glb})
    a = read_glb(glb)[0]
    b = read_glb(out.attachments[0].data)[0]
    assert np.array_equal(a.positions.view(np.uint32), b.positions.view(np.uint32))
    assert np.array_equal(a.indices, b.indices) and np.array_equal(a.uv, b.uv)
    assert np.abs(a.texture - b.texture).max() > 1e-3
    assert out.metadata["uv_source"] == "input"
    # the existing texture is the starting point: a step with a tiny rate barely changes it
    out = _run_job(tiny_models, {"prompt": "x", "steps": 1, "lr": 1e-5}, {"mesh": glb})
    assert np.abs(read_glb(out.attachments[0].data)[0].texture - a.texture).max() < 0.01


def test_refine_job_unwraps_a_mesh_without_uvs(tiny_models):
    glb = _mesh_glb(with_uv=False)
    a = read_glb(glb)[0]
    assert a.uv is None and a.texture is None
    ref = np.ones((128, 128, 4), np.float32)
    ref[..., 3] = 0
    ref[30:100, 30:100] = [0.1, 0.6, 0.3, 1.0]
    out = _run_job(tiny_models, {"steps": 2}, {"mesh": glb, "image": encode_png(ref)})
    b = read_glb(out.attachments[0].data)[0]
    assert out.metadata["uv_source"] == "xatlas" and b.uv is not None and b.texture is not None
    # same triangles in the same order, each corner at exactly the same position
    assert np.array_equal(a.positions[a.indices].view(np.uint32), b.positions[b.indices].view(np.uint32))


def test_refine_job_bad_inputs(tiny_models):
    from backend.refine import parse_cameras

    glb = _mesh_glb()
    with pytest.raises(InputError, match="prompt or a reference"):
        _run_job(tiny_models, {}, {"mesh": glb})
    two = write_glb([_ball(), _ball().copy(name="other")])
    with pytest.raises(InputError, match="2 meshes"):
        _run_job(tiny_models, {"prompt": "x"}, {"mesh": two})
    with pytest.raises(InputError, match="NaN"):
        parse_cameras({"frames": [{"transform_matrix": [[float("nan")] * 4] * 4, "lens": 50}]})
    with pytest.raises(InputError, match="field of view"):
        parse_cameras({"frames": [{"transform_matrix": np.eye(4).tolist()}]})
    with pytest.raises(InputError, match="GLB"):
        _run_job(tiny_models, {"prompt": "x"}, {"mesh": b"glTF" + b"\x02\x00\x00\x00" + (24).to_bytes(4, "little") + b"\0" * 12})


def test_scene_cameras_from_blender_lens_data():
    from backend.refine import parse_cameras

    c2w = cam.spherical_to_c2w(10, 30, 4)
    (m, k), = parse_cameras({"frames": [{"name": "Camera", "transform_matrix": c2w.tolist(), "lens": 50, "sensor_width": 36,
                                          "sensor_height": 24, "sensor_fit": "AUTO", "w": 1920, "h": 1080}]})
    np.testing.assert_allclose(m, c2w, atol=1e-12)
    assert k.width == 256 and k.height == 144  # the shape is kept, the size is the refiner's
    assert k.fov_x == pytest.approx(2 * math.atan(18 / 50))


def test_cli_refine_with_cameras(tmp_path):
    (tmp_path / "in.glb").write_bytes(_mesh_glb())
    cams = {"frames": [{"transform_matrix": cam.spherical_to_c2w(20, a, 5.0, (1.5, -0.3, 0.2)).tolist(), "lens": 35,
                        "w": 640, "h": 480} for a in (0, 120)]}
    (tmp_path / "cams.json").write_text(json.dumps(cams))
    r = subprocess.run([sys.executable, "-m", "backend", "refine", str(tmp_path / "in.glb"), "--prompt", "weathered bronze",
                        "--out", str(tmp_path / "out.glb"), "--cameras", str(tmp_path / "cams.json"), "--steps", "4",
                        "--texture-size", "64", "-q"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    b = read_glb((tmp_path / "out.glb").read_bytes())[0]
    assert b.texture.shape == (64, 64, 3)
    r = subprocess.run([sys.executable, "-m", "backend", "refine", str(tmp_path / "in.glb"), "--out", "x.glb"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "prompt or a reference" in r.stderr and "Traceback" not in r.stderr
