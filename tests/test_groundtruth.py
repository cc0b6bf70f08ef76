"""Ground-truth renderer and Blender GLB checker (evaluation/): conventions proven on small renders.

Blender runs only in subprocesses (``python -m evaluation.groundtruth`` /
``python -m evaluation.blender_check``); this process never imports bpy.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from evaluation.blender_check import check_glb  # noqa: E402
from evaluation.groundtruth import (  # noqa: E402
    cube_geometry,
    frame_intrinsics,
    mug_geometry,
    project_points,
    run_groundtruth,
    sample_views,
    spherical_pose,
)

pytestmark = [
    pytest.mark.blender,
    pytest.mark.skipif(importlib.util.find_spec("bpy") is None, reason="needs the bpy module"),
]

OFFSET = (0.3, -0.2, 0.1)
RES = 64


def _png(path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        assert im.mode == "RGBA", im.mode
        return np.asarray(im).copy()


def _raster_mask(verts, faces, c2w, intr) -> np.ndarray:
    """Pixels whose centre lies inside a projected triangle (all vertices in front of the camera)."""
    xy, depth = project_points(verts, c2w, intr["fl_x"], intr["fl_y"], intr["cx"], intr["cy"])
    assert (depth > 0).all()
    H, W = intr["h"], intr["w"]
    px, py = np.meshgrid(np.arange(W) + 0.5, np.arange(H) + 0.5)
    P = np.stack([px.ravel(), py.ravel()], axis=1)
    mask = np.zeros(len(P), dtype=bool)
    for a, b, c in xy[faces]:

        def edge(p, q):
            return (q[0] - p[0]) * (P[:, 1] - p[1]) - (q[1] - p[1]) * (P[:, 0] - p[0])

        e = np.stack([edge(a, b), edge(b, c), edge(c, a)], axis=1)
        mask |= (e >= 0).all(axis=1) | (e <= 0).all(axis=1)
    return mask.reshape(H, W)


def _sample_texture(tex: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Bilinear lookup with wrap; uv in the OpenGL convention (v = 0 at the bottom row), tex row 0 = top."""
    H, W = tex.shape[:2]
    x = (uv[:, 0] % 1.0) * W - 0.5
    y = (1.0 - (uv[:, 1] % 1.0)) * H - 0.5
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    t = tex.astype(np.float64)

    def at(yy, xx):
        return t[np.clip(yy, 0, H - 1), xx % W]

    return (at(y0, x0) * (1 - fx) * (1 - fy) + at(y0, x0 + 1) * fx * (1 - fy) + at(y0 + 1, x0) * (1 - fx) * fy
            + at(y0 + 1, x0 + 1) * fx * fy)


def _on_white(img: np.ndarray) -> np.ndarray:
    rgb = img[..., :3].astype(np.float64) / 255.0
    a = img[..., 3:4].astype(np.float64) / 255.0
    return rgb * a + (1.0 - a)


@pytest.fixture(scope="module")
def cube_dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gt_cube")
    run_groundtruth(
        ["--object", "cube", "--out", out, "--train", 4, "--test", 2, "--resolution", RES, "--seed", 3,
         "--offset", *OFFSET],
        timeout=300,
    )
    return out


def test_flat_emission_reproduces_srgb_exactly(tmp_path):
    """A stripe texture on a plane filling the view renders to the same 8-bit sRGB values."""
    from PIL import Image

    cols = np.array([(0, 0, 0), (255, 255, 255), (10, 50, 128), (200, 100, 30), (1, 2, 3), (127, 128, 129),
                     (250, 5, 180), (64, 192, 32)], dtype=np.uint8)
    tex = np.repeat(np.repeat(cols[None], 16, axis=0), 32, axis=1)
    Image.fromarray(tex).save(tmp_path / "stripes.png")
    fov = math.radians(40.0)
    dist = 1.0
    cams = {"camera_angle_x": fov, "frames": [{"file_path": "views/front", "transform_matrix": spherical_pose(0.0, 0.0, dist).tolist()}]}
    (tmp_path / "cams.json").write_text(json.dumps(cams))
    run_groundtruth(["--object", "plane", "--texture", tmp_path / "stripes.png", "--cameras", tmp_path / "cams.json",
                     "--out", tmp_path / "out", "--resolution", 128], timeout=300)
    img = _png(tmp_path / "out" / "views" / "front.png")
    assert img.shape == (128, 128, 4)
    assert (img[..., 3] == 255).all(), "the plane must fill the view"
    # Column -> texture u: the plane spans [-h, h] in X (h = 0.7/sqrt(2)) and shows u = 0..1 left to right.
    W = 128
    f = 0.5 * W / math.tan(0.5 * fov)
    half = 0.7 / math.sqrt(2.0)
    u = ((np.arange(W) + 0.5 - 0.5 * W) / f * dist) / (2 * half) + 0.5
    s = u * len(cols)
    idx = np.floor(s).astype(int)
    frac = s - idx
    keep = (frac > 0.2) & (frac < 0.8)
    assert keep.sum() > 60 and len(set(idx[keep])) >= 6
    diff = np.abs(img[:, keep, :3].astype(int) - cols[idx[keep]][None].astype(int))
    assert diff.max() <= 2, f"max difference {diff.max()} / 255"


def test_dataset_files_and_alpha(cube_dataset):
    d = cube_dataset
    info = json.loads((d / "info.json").read_text())
    assert info["object"] == "cube" and info["resolution"] == RES and info["offset"] == list(OFFSET)
    assert (d / "gt.glb").stat().st_size > 1000
    for split, n in (("train", 4), ("test", 2)):
        meta = json.loads((d / f"transforms_{split}.json").read_text())
        assert len(meta["frames"]) == n
        assert abs(meta["camera_angle_x"] - math.radians(40.0)) < 1e-9
        for i, fr in enumerate(meta["frames"]):
            assert fr["file_path"] == f"{split}/r_{i}"
            img = _png(d / f"{fr['file_path']}.png")
            assert img.shape == (RES, RES, 4)
            a = img[..., 3]
            assert a[0, 0] == a[0, -1] == a[-1, 0] == a[-1, -1] == 0
            assert a[RES // 2, RES // 2] == 255
    g = np.load(d / "gt_mesh.npz")
    assert g["vertices"].dtype == np.float64 and g["vertices"].shape == (8, 3)
    assert g["faces"].dtype == np.int64 and g["faces"].shape == (12, 3)
    assert g["uv"].dtype == np.float32 and g["uv"].shape == (12, 3, 2)
    assert g["texture"].dtype == np.uint8 and g["texture"].ndim == 3 and g["texture"].shape[2] == 3
    np.testing.assert_allclose(g["center"], OFFSET, atol=1e-6)
    assert abs(float(g["radius"]) - 0.7) < 1e-4
    assert np.linalg.norm(g["vertices"] - g["center"], axis=1).max() <= float(g["radius"]) + 1e-6


def test_transforms_are_rigid_and_look_at_the_object(cube_dataset):
    g = np.load(cube_dataset / "gt_mesh.npz")
    views = {}
    for split in ("train", "test"):
        meta = json.loads((cube_dataset / f"transforms_{split}.json").read_text())
        for fr in meta["frames"]:
            M = np.asarray(fr["transform_matrix"])
            assert M.shape == (4, 4)
            np.testing.assert_allclose(M[3], [0, 0, 0, 1], atol=1e-12)
            R = M[:3, :3]
            np.testing.assert_allclose(R.T @ R, np.eye(3), atol=1e-9)
            assert abs(np.linalg.det(R) - 1.0) < 1e-9
            to_center = g["center"] - M[:3, 3]
            assert abs(np.linalg.norm(to_center) - fr["radius"]) < 1e-6
            np.testing.assert_allclose(-R[:, 2], to_center / np.linalg.norm(to_center), atol=1e-9)
            assert R[2, 1] >= 0.0  # image up has a non-negative world-Z component (Z-up look-at)
            el, az = math.radians(fr["elevation"]), math.radians(fr["azimuth"])
            expect = fr["radius"] * np.array([math.cos(el) * math.sin(az), -math.cos(el) * math.cos(az), math.sin(el)])
            np.testing.assert_allclose(M[:3, 3] - g["center"], expect, atol=1e-9)
            views.setdefault(split, []).append((fr["elevation"], fr["azimuth"]))
    assert all(-20 <= e <= 60 for e, _ in views["train"])
    assert not set(views["train"]) & set(views["test"])


def test_azimuth_and_pole_conventions():
    M = spherical_pose(0.0, 90.0, 2.0)
    assert M[0, 3] > 1.99 and abs(M[1, 3]) < 1e-9 and abs(M[2, 3]) < 1e-9
    np.testing.assert_allclose(-M[:3, 2], [-1, 0, 0], atol=1e-9)  # looks toward -X
    F = spherical_pose(0.0, 0.0, 2.0)  # Blender's front view: on -Y, right = +X, up = +Z
    np.testing.assert_allclose(F[:3, 3], [0, -2, 0], atol=1e-9)
    np.testing.assert_allclose(F[:3, :3], [[1, 0, 0], [0, 0, -1], [0, 1, 0]], atol=1e-9)
    T = spherical_pose(30.0, 180.0, 1.0, target=(1.0, 2.0, 3.0))
    assert T[1, 3] > 2.0 and T[2, 3] > 3.0  # behind (+Y) and above the target
    for el in (90.0, -90.0):  # poles: a valid rotation, continuous with the nearby pose
        P = spherical_pose(el, 30.0, 2.0)
        assert np.isfinite(P).all()
        np.testing.assert_allclose(P[:3, :3].T @ P[:3, :3], np.eye(3), atol=1e-9)
        near = spherical_pose(el - np.sign(el) * 1e-3, 30.0, 2.0)
        np.testing.assert_allclose(P[:3, :3], near[:3, :3], atol=1e-3)
    train, test = sample_views(24, 8, seed=0)
    assert train == sample_views(24, 8, seed=0)[0] and len(train) == 24 and len(test) == 8
    az = np.sort([a for _, a in train])
    assert np.diff(np.concatenate([az, [az[0] + 360]])).max() < 30.0  # spread all around


def test_projection_matches_alpha_mask(cube_dataset):
    """Projecting gt_mesh.npz with the stored cameras (pinhole, -Z forward) lands on the rendered object."""
    g = np.load(cube_dataset / "gt_mesh.npz")
    V, F = g["vertices"], g["faces"]
    rng = np.random.default_rng(0)
    fi = rng.integers(0, len(F), 3000)
    b = rng.dirichlet([1, 1, 1], 3000)
    pts = np.concatenate([V, np.einsum("nk,nkd->nd", b, V[F[fi]])])
    for split in ("train", "test"):
        meta = json.loads((cube_dataset / f"transforms_{split}.json").read_text())
        for fr in meta["frames"]:
            intr = frame_intrinsics(meta, fr, RES)
            assert (intr["w"], intr["h"]) == (RES, RES)
            c2w = np.asarray(fr["transform_matrix"])
            alpha = _png(cube_dataset / f"{fr['file_path']}.png")[..., 3]
            xy, depth = project_points(pts, c2w, intr["fl_x"], intr["fl_y"], intr["cx"], intr["cy"])
            assert (depth > 0).all()
            ij = np.floor(xy).astype(int)
            inside = (ij[:, 0] >= 0) & (ij[:, 0] < RES) & (ij[:, 1] >= 0) & (ij[:, 1] < RES)
            assert inside.all()
            hit = alpha[ij[:, 1], ij[:, 0]] > 0
            assert hit.mean() > 0.95, hit.mean()
            sil = _raster_mask(V, F, c2w, intr)
            rendered = alpha > 127
            iou = (sil & rendered).sum() / (sil | rendered).sum()
            assert iou > 0.97, iou


def test_uv_convention_matches_renders(cube_dataset):
    """Rendered colours match the texture sampled at gt_mesh.npz's UVs (v = 0 at the bottom row), not a flipped lookup."""
    g = np.load(cube_dataset / "gt_mesh.npz")
    V, F, UV, tex = g["vertices"], g["faces"], g["uv"].astype(np.float64), g["texture"]
    rng = np.random.default_rng(1)
    errs = {"ok": [], "flip_v": [], "flip_u": []}
    meta = json.loads((cube_dataset / "transforms_train.json").read_text())
    for fr in meta["frames"]:
        c2w = np.asarray(fr["transform_matrix"])
        intr = frame_intrinsics(meta, fr, RES)
        img = _png(cube_dataset / f"{fr['file_path']}.png")
        eye = c2w[:3, 3]
        for f in range(len(F)):
            tri = V[F[f]]
            n = np.cross(tri[1] - tri[0], tri[2] - tri[0])
            if np.dot(n, eye - tri.mean(axis=0)) <= 0.2 * np.linalg.norm(n) * np.linalg.norm(eye - tri.mean(axis=0)):
                continue  # back-facing or grazing (the cube is convex: front-facing means visible)
            b = rng.dirichlet([2, 2, 2], 200)
            b = b[b.min(axis=1) > 0.12]
            p = b @ tri
            xy, _ = project_points(p, c2w, intr["fl_x"], intr["fl_y"], intr["cx"], intr["cy"])
            ij = np.floor(xy).astype(int)
            px = img[ij[:, 1], ij[:, 0]]
            keep = px[:, 3] == 255
            uv = b @ UV[f]
            rgb = px[keep, :3].astype(np.float64)
            for key, uvk in (("ok", uv), ("flip_v", uv * [1, -1] + [0, 1]), ("flip_u", uv * [-1, 1] + [1, 0])):
                errs[key].append(np.abs(_sample_texture(tex, uvk[keep]) - rgb).mean(axis=1))
    e = {k: float(np.concatenate(v).mean()) for k, v in errs.items()}
    assert sum(len(x) for x in errs["ok"]) > 300
    assert e["ok"] < 12.0, e
    assert e["ok"] < 0.5 * e["flip_v"] and e["ok"] < 0.5 * e["flip_u"], e


def test_cameras_entry_point_with_intrinsics(tmp_path, cube_dataset):
    """Arbitrary cameras: per-frame fl_x/fl_y/cx/cy/w/h (off-centre, non-square) match the pinhole projection."""
    g = np.load(cube_dataset / "gt_mesh.npz")
    c = g["center"]
    frames = [
        {"file_path": "a/wide", "transform_matrix": spherical_pose(20.0, 35.0, 2.4, c).tolist(),
         "fl_x": 70.0, "fl_y": 70.0, "cx": 34.0, "cy": 27.0, "w": 80, "h": 60},
        {"file_path": "b/aniso", "transform_matrix": spherical_pose(-10.0, 250.0, 2.6, c).tolist(),
         "fl_x": 80.0, "fl_y": 96.0, "cx": 30.0, "cy": 36.0, "w": 64, "h": 72},
    ]
    (tmp_path / "cams.json").write_text(json.dumps({"frames": frames}))
    run_groundtruth(["--object", "cube", "--cameras", tmp_path / "cams.json", "--out", tmp_path / "r",
                     "--offset", *OFFSET], timeout=300)
    meta = json.loads((tmp_path / "cams.json").read_text())
    for fr in meta["frames"]:
        img = _png(tmp_path / "r" / f"{fr['file_path']}.png")
        assert img.shape == (fr["h"], fr["w"], 4)
        intr = frame_intrinsics(meta, fr)
        sil = _raster_mask(g["vertices"], g["faces"], np.asarray(fr["transform_matrix"]), intr)
        rendered = img[..., 3] > 127
        iou = (sil & rendered).sum() / (sil | rendered).sum()
        assert iou > 0.97, (fr["file_path"], iou)


def test_blender_check_roundtrip(tmp_path, cube_dataset):
    """gt.glb through Blender's glTF importer: same world box (Y-up handled), textured, renders match."""
    g = np.load(cube_dataset / "gt_mesh.npz")
    rep = check_glb(cube_dataset / "gt.glb", tmp_path / "check.json", render_json=cube_dataset / "transforms_test.json",
                    render_out=tmp_path / "renders", resolution=RES)
    assert rep["n_mesh_objects"] == 1
    (ob,) = [o for o in rep["objects"] if o["type"] == "MESH"]
    np.testing.assert_allclose(ob["bbox_min"], g["vertices"].min(axis=0), atol=1e-3)
    np.testing.assert_allclose(ob["bbox_max"], g["vertices"].max(axis=0), atol=1e-3)
    np.testing.assert_allclose(ob["vertex_mean"], g["center"], atol=1e-3)
    assert ob["has_uv"] and ob["n_triangles"] == 12
    (mat,) = ob["materials"]
    assert mat["base_color_linked_image"] and mat["image"]["size"] == [g["texture"].shape[1], g["texture"].shape[0]]
    assert rep["all_base_colors_textured"]
    meta = json.loads((cube_dataset / "transforms_test.json").read_text())
    for fr in meta["frames"]:
        mine = _png(tmp_path / "renders" / f"{fr['file_path']}.png")
        ref = _png(cube_dataset / f"{fr['file_path']}.png")
        m = (mine[..., 3] > 127) | (ref[..., 3] > 127)
        assert m.sum() > 100
        mse = ((_on_white(mine) - _on_white(ref))[m] ** 2).mean()
        psnr = 10 * math.log10(1.0 / max(mse, 1e-12))
        assert psnr > 30.0, psnr


def test_procedural_meshes_are_closed_and_outward():
    trimesh = pytest.importorskip("trimesh")
    for fn in (cube_geometry, mug_geometry):
        v, f, uv = fn()
        assert uv.shape == (len(f), 3, 2) and uv.min() >= 0.0 and uv.max() <= 1.0
        parts = trimesh.Trimesh(v, f, process=False).split(only_watertight=False)
        for part in parts:
            assert part.is_watertight and part.is_winding_consistent and part.volume > 0, fn.__name__
    assert len(trimesh.Trimesh(*mug_geometry()[:2], process=False).split(only_watertight=False)) == 2  # cup + handle


@pytest.mark.parametrize("obj", ["suzanne", "mug"])
def test_other_objects_render_and_round_trip(tmp_path, obj):
    """Suzanne (spherical UVs wrapping past u = 1) and the mug survive gt.glb -> Blender import unchanged."""
    out = tmp_path / obj
    run_groundtruth(["--object", obj, "--out", out, "--train", 1, "--test", 2, "--resolution", RES, "--offset", *OFFSET],
                    timeout=300)
    g = np.load(out / "gt_mesh.npz")
    assert len(g["faces"]) > 1000 and g["uv"].shape == (len(g["faces"]), 3, 2)
    np.testing.assert_allclose(g["center"], OFFSET, atol=1e-6)
    rep = check_glb(out / "gt.glb", tmp_path / "check.json", render_json=out / "transforms_test.json",
                    render_out=tmp_path / "renders", resolution=RES)
    (ob,) = [o for o in rep["objects"] if o["type"] == "MESH"]
    assert ob["n_triangles"] == len(g["faces"])
    np.testing.assert_allclose(ob["bbox_min"], g["vertices"].min(axis=0), atol=1e-3)
    np.testing.assert_allclose(ob["bbox_max"], g["vertices"].max(axis=0), atol=1e-3)
    assert rep["all_base_colors_textured"]
    meta = json.loads((out / "transforms_test.json").read_text())
    for fr in meta["frames"]:
        ref = _png(out / f"{fr['file_path']}.png")
        mine = _png(tmp_path / "renders" / f"{fr['file_path']}.png")
        m = (mine[..., 3] > 127) | (ref[..., 3] > 127)
        mse = ((_on_white(mine) - _on_white(ref))[m] ** 2).mean()
        assert 10 * math.log10(1.0 / max(mse, 1e-12)) > 30.0
        # Detailed texture: the object is not flat-coloured.
        assert _on_white(ref)[ref[..., 3] == 255].std(axis=0).mean() > 0.08


def test_modules_import_without_bpy_or_torch():
    import subprocess

    code = ("import sys, evaluation.groundtruth, evaluation.blender_check; "
            "assert 'bpy' not in sys.modules and 'torch' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)
