"""Ground-truth renders of textured test objects with Blender (Cycles, CPU).

Run as a subprocess (``python -m evaluation.groundtruth ...``) so that ``bpy``
never shares a process with torch; this module imports ``bpy`` only inside the
functions that need it, so the numpy helpers (poses, projection, intrinsics) and
:func:`run_groundtruth` can be imported from anywhere.

Conventions
-----------
* World: Blender's, right-handed, Z up, metres.
* Camera poses: camera-to-world 4x4 matrices exactly as Blender's camera
  ``matrix_world`` (the camera looks down its local -Z, +Y is up in the image),
  stored NeRF-synthetic style in ``transforms_*.json``::

      {"camera_angle_x": fov_x_rad, "w": W, "h": H,
       "frames": [{"file_path": "train/r_0", "transform_matrix": [[...], ...],
                   "elevation": deg, "azimuth": deg, "radius": r}, ...]}

  ``file_path`` is relative to the json and has no ``.png`` extension.
* Spherical poses: elevation in degrees (positive above the XY plane); azimuth in
  degrees, 0 = camera on -Y looking toward +Y (Blender's front view), growing
  counter-clockwise seen from above (azimuth 90 = camera on +X).  Position =
  target + r*(cos(el) sin(az), -cos(el) cos(az), sin(el)); the camera looks at the
  target with world +Z as up.
* Pinhole projection of a camera-space point (x, y, z), z < 0:
  ``u = cx + fl_x * x / -z``, ``v = cy - fl_y * y / -z`` in pixels, with pixel
  (i, j) covering [j, j+1) x [i, i+1) (pixel centres at +0.5).  Without explicit
  intrinsics ``fl_x = fl_y = 0.5 * W / tan(camera_angle_x / 2)``, ``cx = W/2``,
  ``cy = H/2``.
* Images: 8-bit sRGB RGBA PNG with straight (not premultiplied) alpha and a
  transparent background.  Materials are pure emission of the albedo texture and
  colour management is 'Standard' with no look, exposure 0, gamma 1 and no
  dithering, so a pixel reproduces the texture's sRGB value.

Outputs of the dataset mode (``--out DIR``)::

    DIR/transforms_train.json, DIR/train/r_*.png
    DIR/transforms_test.json,  DIR/test/r_*.png
    DIR/gt_mesh.npz   vertices f64 [V,3] (world), faces i64 [F,3], uv f32 [F,3,2]
                      (OpenGL: v=0 is the bottom row of the texture; u may exceed 1
                      on a wrap-around seam, sample with wrap), texture u8 [H,W,3]
                      (row 0 = top), center f64 [3], radius (bounding sphere)
    DIR/gt.glb        the same object through Blender's glTF exporter (+Y up)
    DIR/texture.png   the albedo texture
    DIR/info.json     settings and render times

Usage::

    python -m evaluation.groundtruth --object suzanne --out DIR --train 24 --test 8 \\
        --resolution 128 --seed 0 [--samples 16] [--radius 2.6] [--fov 40] \\
        [--offset 0 0 0] [--texture PNG]
    python -m evaluation.groundtruth --object suzanne --cameras cams.json --out DIR \\
        [--resolution 128] [--offset 0 0 0]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

OBJECTS = ("suzanne", "mug", "cube", "plane")
FIT_RADIUS = 0.7
DEFAULT_SAMPLES = 16
DEFAULT_RADIUS = 2.6
DEFAULT_FOV_DEG = 40.0
TRAIN_ELEVATIONS = (-20.0, 60.0)
TEST_ELEVATIONS = (-10.0, 50.0)
SENSOR_WIDTH_MM = 36.0
UV_MAP_NAME = "UVMap"


# --------------------------------------------------------------------------- cameras (numpy only)


def spherical_position(elevation: float, azimuth: float, radius: float, target: Sequence[float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """Camera position for (elevation, azimuth) in degrees; see the module conventions."""
    el, az = math.radians(elevation), math.radians(azimuth)
    d = np.array([math.cos(el) * math.sin(az), -math.cos(el) * math.cos(az), math.sin(el)])
    return np.asarray(target, dtype=np.float64) + radius * d


def look_at(eye: Sequence[float], target: Sequence[float], up: Sequence[float] = (0.0, 0.0, 1.0)) -> np.ndarray:
    """Camera-to-world matrix (Blender camera: looks down local -Z, +Y up)."""
    eye = np.asarray(eye, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    up = np.asarray(up, dtype=np.float64)
    forward = target - eye
    n = np.linalg.norm(forward)
    if n < 1e-12:
        raise ValueError("camera position coincides with its target")
    forward /= n
    right = np.cross(forward, up)
    if np.linalg.norm(right) < 1e-6:
        # Looking straight along `up` (a pole): nudge the up vector toward the
        # horizontal direction the camera would face just off the pole.
        if abs(forward[2]) > 0.5:
            alt = np.array([0.0, 1.0, 0.0]) if forward[2] < 0 else np.array([0.0, -1.0, 0.0])
        else:
            alt = np.array([0.0, 0.0, 1.0])
        right = np.cross(forward, alt)
    right /= np.linalg.norm(right)
    cam_up = np.cross(right, forward)
    m = np.eye(4)
    m[:3, 0] = right
    m[:3, 1] = cam_up
    m[:3, 2] = -forward
    m[:3, 3] = eye
    return m


def spherical_pose(elevation: float, azimuth: float, radius: float, target: Sequence[float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """Camera-to-world matrix of a camera at (elevation, azimuth, radius) looking at ``target``.

    At the poles (|elevation| = 90) the image up vector is the horizontal
    direction the camera would face at a slightly smaller |elevation|.
    """
    eye = spherical_position(elevation, azimuth, radius, target)
    if abs(abs(elevation) - 90.0) < 1e-4:
        az = math.radians(azimuth)
        toward = np.array([-math.sin(az), math.cos(az), 0.0])  # horizontal view direction at this azimuth
        up = toward if elevation > 0 else -toward
        return look_at(eye, target, up)
    return look_at(eye, target)


def sample_views(n_train: int, n_test: int, seed: int = 0) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """Deterministic (elevation, azimuth) pairs in degrees for train and test cameras.

    Train: azimuths evenly spread all around (jittered), elevations stratified in
    [-20, 60].  Test: azimuths halfway between an independent even spread, and
    elevations stratified in [-10, 50], so they differ from the training views.
    """
    rng = np.random.default_rng(seed)
    az0 = float(rng.uniform(0.0, 360.0))

    def stratified(n: int, lo: float, hi: float) -> np.ndarray:
        if n <= 0:
            return np.zeros(0)
        return lo + (hi - lo) * (rng.permutation(n) + rng.uniform(0.1, 0.9, n)) / n

    train_az = (az0 + 360.0 * (np.arange(n_train) + rng.uniform(-0.2, 0.2, n_train)) / max(n_train, 1)) % 360.0
    train_el = stratified(n_train, *TRAIN_ELEVATIONS)
    test_az = (az0 + 360.0 * (np.arange(n_test) + 0.5 + rng.uniform(-0.1, 0.1, n_test)) / max(n_test, 1)) % 360.0
    test_el = stratified(n_test, *TEST_ELEVATIONS)
    train = [(round(float(e), 4), round(float(a), 4)) for e, a in zip(train_el, train_az)]
    test = [(round(float(e), 4), round(float(a), 4)) for e, a in zip(test_el, test_az)]
    train_set = set(train)
    test = [(e + 0.5, a) if (e, a) in train_set else (e, a) for e, a in test]
    return train, test


def frame_intrinsics(meta: dict, frame: dict, resolution: int | None = None) -> dict:
    """Pinhole intrinsics of one frame of a transforms.json-like dict.

    Per-frame ``fl_x, fl_y, cx, cy, w, h`` override the same top-level keys; the
    focal length otherwise comes from ``camera_angle_x`` (or ``camera_angle_y``);
    the image size otherwise is ``resolution`` (square) or 128.
    """

    def get(key):
        if key in frame:
            return frame[key]
        return meta.get(key)

    w, h = get("w"), get("h")
    if w is None or h is None:
        res = int(resolution or 128)
        w = res if w is None else w
        h = res if h is None else h
    w, h = int(w), int(h)
    fl_x, fl_y = get("fl_x"), get("fl_y")
    angle_x, angle_y = get("camera_angle_x"), get("camera_angle_y")
    if fl_x is None and angle_x is not None:
        fl_x = 0.5 * w / math.tan(0.5 * float(angle_x))
    if fl_y is None and angle_y is not None:
        fl_y = 0.5 * h / math.tan(0.5 * float(angle_y))
    if fl_x is None and fl_y is None:
        raise ValueError("camera has no focal length: give camera_angle_x or fl_x")
    if fl_x is None:
        fl_x = fl_y
    if fl_y is None:
        fl_y = fl_x
    cx, cy = get("cx"), get("cy")
    cx = 0.5 * w if cx is None else float(cx)
    cy = 0.5 * h if cy is None else float(cy)
    return {"fl_x": float(fl_x), "fl_y": float(fl_y), "cx": cx, "cy": cy, "w": w, "h": h}


def project_points(points: np.ndarray, c2w: np.ndarray, fl_x: float, fl_y: float, cx: float, cy: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates [N,2] (x right, y down, pixel centres at +0.5) and depth [N] (> 0 in front)."""
    points = np.asarray(points, dtype=np.float64)
    w2c = np.linalg.inv(np.asarray(c2w, dtype=np.float64))
    pc = points @ w2c[:3, :3].T + w2c[:3, 3]
    depth = -pc[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        x = cx + fl_x * pc[:, 0] / depth
        y = cy - fl_y * pc[:, 1] / depth
    return np.stack([x, y], axis=1), depth


def load_transforms(path: str | os.PathLike) -> dict:
    with open(path) as f:
        return json.load(f)


# --------------------------------------------------------------------------- geometry (numpy only)


def _orient_outward(verts: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Flip a closed component's faces if its signed volume is negative."""
    a, b, c = verts[faces[:, 0]], verts[faces[:, 1]], verts[faces[:, 2]]
    vol = np.einsum("ij,ij->i", a, np.cross(b, c)).sum() / 6.0
    return faces if vol >= 0 else faces[:, ::-1].copy()


def _quads_to_tris(quads: np.ndarray, quad_uv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    tris = np.concatenate([quads[:, [0, 1, 2]], quads[:, [0, 2, 3]]])
    uv = np.concatenate([quad_uv[:, [0, 1, 2]], quad_uv[:, [0, 2, 3]]])
    return tris, uv


def _weld(verts: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    key = np.round(verts, 9)
    uniq, inverse = np.unique(key, axis=0, return_inverse=True)
    return uniq.astype(np.float64), inverse.reshape(-1)[faces]


def _boxed_faces(cells: Sequence[tuple[int, int]], grid: tuple[int, int], normals_eu_ev: Sequence[tuple]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    verts, quads, quv = [], [], []
    cols, rows = grid
    for (col, row), (n, eu, ev) in zip(cells, normals_eu_ev):
        n, eu, ev = (np.asarray(x, dtype=np.float64) for x in (n, eu, ev))
        o = n - 0.5 * (eu + ev)
        base = len(verts)
        verts += [o, o + eu, o + eu + ev, o + ev]
        quads.append([base, base + 1, base + 2, base + 3])
        u0, u1 = col / cols, (col + 1) / cols
        v0, v1 = row / rows, (row + 1) / rows
        quv.append([[u0, v0], [u1, v0], [u1, v1], [u0, v1]])
    tris, uv = _quads_to_tris(np.array(quads), np.array(quv))
    verts, tris = _weld(np.array(verts), tris)
    return verts, tris, uv


def cube_geometry() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A cube, each side showing its own cell of a 3x2 grid over the texture, upright from outside."""
    X, Y, Z = np.eye(3)
    sides = [  # outward normal, texture right, texture up (normal = right x up)
        (-Y, 2 * X, 2 * Z),  # front
        (X, 2 * Y, 2 * Z),  # right
        (Y, -2 * X, 2 * Z),  # back
        (-X, -2 * Y, 2 * Z),  # left
        (Z, 2 * X, 2 * Y),  # top
        (-Z, 2 * X, -2 * Y),  # bottom
    ]
    cells = [(0, 1), (1, 1), (2, 1), (0, 0), (1, 0), (2, 0)]
    return _boxed_faces(cells, (3, 2), sides)


def plane_geometry() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A square in the XZ plane facing -Y (the front view), showing the whole texture upright."""
    X, Y, Z = np.eye(3)
    verts, faces, uv = _boxed_faces([(0, 0)], (1, 1), [(np.zeros(3), 2 * X, 2 * Z)])
    return verts, faces, uv


def _lathe(profile: np.ndarray, profile_v: np.ndarray, n_around: int, u_range=(0.0, 1.0)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Closed surface of revolution about Z of a (r, z) profile whose first and last points lie on the axis."""
    K = len(profile)
    assert profile[0, 0] == 0 and profile[-1, 0] == 0
    theta = 2 * np.pi * np.arange(n_around) / n_around
    verts = [np.array([[0.0, 0.0, profile[0, 1]]])]
    for r, z in profile[1:-1]:
        verts.append(np.stack([r * np.cos(theta), r * np.sin(theta), np.full(n_around, z)], axis=1))
    verts.append(np.array([[0.0, 0.0, profile[-1, 1]]]))
    verts = np.concatenate(verts)
    last = len(verts) - 1

    def vid(k, j):
        if k == 0:
            return 0
        if k == K - 1:
            return last
        return 1 + (k - 1) * n_around + (j % n_around)

    u0, u1 = u_range
    faces, uvs = [], []
    for k in range(K - 1):
        for j in range(n_around):
            ua, ub = u0 + (u1 - u0) * j / n_around, u0 + (u1 - u0) * (j + 1) / n_around
            um = 0.5 * (ua + ub)
            va, vb = profile_v[k], profile_v[k + 1]
            a, b, c, d = vid(k, j), vid(k, j + 1), vid(k + 1, j + 1), vid(k + 1, j)
            if k == 0:
                faces.append([a, c, d])
                uvs.append([[um, va], [ub, vb], [ua, vb]])
            elif k + 1 == K - 1:
                faces.append([a, b, c])
                uvs.append([[ua, va], [ub, va], [um, vb]])
            else:
                faces += [[a, b, c], [a, c, d]]
                uvs += [[[ua, va], [ub, va], [ub, vb]], [[ua, va], [ub, vb], [ua, vb]]]
    return verts, np.array(faces, dtype=np.int64), np.array(uvs, dtype=np.float64)


def _segment(p0, p1, v0, v1, n):
    t = np.linspace(0.0, 1.0, n + 1)[:-1]
    pts = (1 - t)[:, None] * np.asarray(p0, float) + t[:, None] * np.asarray(p1, float)
    return pts, v0 + (v1 - v0) * t


def mug_geometry() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A cup (walls with an inner cavity, closed bottom) plus a curved handle whose capped ends sit inside the wall."""
    R, H, t, b = 0.5, 0.8, 0.06, 0.06
    segs = [  # (start, end, v start, v end, steps) along the profile, bottom centre -> inner bottom centre
        ((0.0, 0.0), (R, 0.0), 0.0, 0.1, 4),
        ((R, 0.0), (R, H), 0.1, 0.75, 12),
        ((R, H), (R - t, H), 0.75, 0.78, 1),
        ((R - t, H), (R - t, b), 0.78, 0.97, 10),
        ((R - t, b), (0.0, b), 0.97, 1.0, 4),
    ]
    pts, vs = [], []
    for p0, p1, v0, v1, n in segs:
        p, v = _segment(p0, p1, v0, v1, n)
        pts.append(p)
        vs.append(v)
    pts.append(np.array([[0.0, b]]))
    vs.append(np.array([1.0]))
    profile, profile_v = np.concatenate(pts), np.concatenate(vs)
    cup_v, cup_f, cup_uv = _lathe(profile, profile_v, 64)
    cup_f = _orient_outward(cup_v, cup_f)  # already outward; kept as a guard

    # Handle: part of a torus in the XZ plane; the centre line enters the wall at
    # mid-thickness and the tube (radius hb) stays inside the wall there.
    cx, cz, a, hb = R + 0.03, 0.5 * H, 0.2, 0.04
    u_end = math.acos((R - 0.5 * t - cx) / a)
    M, Nv = 24, 12
    us = np.linspace(-u_end, u_end, M + 1)
    vs_ = 2 * np.pi * np.arange(Nv) / Nv
    U, V = np.meshgrid(us, vs_, indexing="ij")
    ring = np.stack([cx + (a + hb * np.cos(V)) * np.cos(U), hb * np.sin(V), cz + (a + hb * np.cos(V)) * np.sin(U)], axis=-1)
    hv = ring.reshape(-1, 3)
    centers = np.array([[cx + a * math.cos(u), 0.0, cz + a * math.sin(u)] for u in (us[0], us[-1])])
    hv = np.concatenate([hv, centers])
    c0, c1 = len(hv) - 2, len(hv) - 1

    def hid(i, j):
        return i * Nv + (j % Nv)

    def tex(i, j):
        return [0.05 + 0.9 * i / M, 0.1 + 0.3 * j / Nv]

    hf, huv = [], []
    for i in range(M):
        for j in range(Nv):
            q = [hid(i, j), hid(i + 1, j), hid(i + 1, j + 1), hid(i, j + 1)]
            qt = [tex(i, j), tex(i + 1, j), tex(i + 1, j + 1), tex(i, j + 1)]
            hf += [[q[0], q[1], q[2]], [q[0], q[2], q[3]]]
            huv += [[qt[0], qt[1], qt[2]], [qt[0], qt[2], qt[3]]]
    for j in range(Nv):  # end caps (hidden inside the wall)
        hf.append([c0, hid(0, j), hid(0, j + 1)])
        huv.append([[0.05, 0.25], tex(0, j), tex(0, j + 1)])
        hf.append([c1, hid(M, j + 1), hid(M, j)])
        huv.append([[0.95, 0.25], tex(M, j + 1), tex(M, j)])
    hf = np.array(hf, dtype=np.int64)
    huv = np.array(huv, dtype=np.float64)
    oriented = _orient_outward(hv, hf)
    if oriented is not hf:
        hf, huv = oriented, huv[:, ::-1].copy()
    verts = np.concatenate([cup_v, hv])
    faces = np.concatenate([cup_f, hf + len(cup_v)])
    uv = np.concatenate([cup_uv, huv])
    return verts, faces, uv


def spherical_uv(verts: np.ndarray, faces: np.ndarray, center: Sequence[float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """Per-corner spherical UVs about ``center``: u = 0.5 at the front (-Y), seam at the back, v by elevation.

    Faces crossing the seam get u > 1 on their wrapped corners (sample with wrap).
    """
    d = verts - np.asarray(center, dtype=np.float64)
    phi = np.arctan2(d[:, 0], -d[:, 1])  # 0 at -Y, +pi/2 at +X
    u = 0.5 + phi / (2 * np.pi)
    r = np.linalg.norm(d, axis=1)
    v = 0.5 + np.arcsin(np.clip(d[:, 2] / np.maximum(r, 1e-12), -1, 1)) / np.pi
    fu, fv = u[faces], v[faces]
    wrap = (fu.max(axis=1) - fu.min(axis=1)) > 0.5
    fu = np.where(wrap[:, None] & (fu < 0.5), fu + 1.0, fu)
    return np.stack([fu, fv], axis=-1)


def normalize_geometry(verts: np.ndarray, fit_radius: float = FIT_RADIUS) -> np.ndarray:
    """Centre the bounding box at the origin and scale so the farthest vertex is at ``fit_radius``."""
    center = 0.5 * (verts.min(axis=0) + verts.max(axis=0))
    v = verts - center
    return v * (fit_radius / np.linalg.norm(v, axis=1).max())


def default_texture(obj: str) -> np.ndarray:
    """The object's albedo texture, uint8 [H, W, 3], row 0 = top."""
    import skimage.data

    if obj == "suzanne":
        img = skimage.data.astronaut()
    elif obj == "mug":
        img = skimage.data.coffee()
    elif obj in ("cube", "plane"):
        img = skimage.data.chelsea()
    else:
        raise ValueError(f"unknown object {obj!r}; choose from {OBJECTS}")
    return np.ascontiguousarray(img[..., :3]).astype(np.uint8)


def _read_texture(path: str | os.PathLike) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(np.uint8)


def _save_png(arr: np.ndarray, path: str | os.PathLike) -> None:
    from PIL import Image

    Image.fromarray(arr).save(path)


# --------------------------------------------------------------------------- Blender


def reset_scene():
    """An empty factory scene with the renderer configured; returns the scene."""
    import bpy

    bpy.ops.wm.read_factory_settings(use_empty=True)
    return bpy.context.scene


def _try_set(owner, attr: str, value) -> None:
    try:
        setattr(owner, attr, value)
    except (AttributeError, TypeError, ValueError):
        pass


def configure_render(scene, samples: int = DEFAULT_SAMPLES, width: int = 128, height: int = 128) -> None:
    """Cycles on the CPU, transparent film, 8-bit RGBA PNG, 'Standard' colour management, no dithering."""
    scene.render.engine = "CYCLES"
    cyc = scene.cycles
    cyc.device = "CPU"
    cyc.samples = int(samples)
    cyc.use_denoising = False
    _try_set(cyc, "use_adaptive_sampling", False)
    _try_set(cyc, "seed", 0)
    _try_set(cyc, "use_animated_seed", False)
    # Emission only: camera rays that hit a surface return its emission; no bounces needed.
    _try_set(cyc, "max_bounces", 0)
    _try_set(cyc, "diffuse_bounces", 0)
    _try_set(cyc, "glossy_bounces", 0)
    _try_set(cyc, "transmission_bounces", 0)
    _try_set(cyc, "volume_bounces", 0)
    _try_set(cyc, "transparent_max_bounces", 8)
    _try_set(cyc, "caustics_reflective", False)
    _try_set(cyc, "caustics_refractive", False)
    r = scene.render
    r.film_transparent = True
    r.resolution_x = int(width)
    r.resolution_y = int(height)
    r.resolution_percentage = 100
    r.pixel_aspect_x = 1.0
    r.pixel_aspect_y = 1.0
    r.dither_intensity = 0.0
    _try_set(r, "use_persistent_data", True)
    _try_set(r, "use_compositing", False)
    _try_set(r, "use_sequencer", False)
    _try_set(r, "threads_mode", "AUTO")
    scene.display_settings.display_device = "sRGB"
    scene.view_settings.view_transform = "Standard"
    scene.view_settings.look = "None"
    scene.view_settings.exposure = 0.0
    scene.view_settings.gamma = 1.0
    _try_set(scene.view_settings, "use_curve_mapping", False)
    im = r.image_settings
    _try_set(im, "media_type", "IMAGE")
    im.file_format = "PNG"
    im.color_mode = "RGBA"
    im.color_depth = "8"
    im.compression = 15
    _try_set(im, "color_management", "FOLLOW_SCENE")
    if scene.world is not None:
        scene.world = None


def _set_srgb(image) -> None:
    for name in ("sRGB", "sRGB IEC61966-2.1"):
        try:
            image.colorspace_settings.name = name
            return
        except TypeError:
            continue


def load_image(path: str | os.PathLike, name: str = "albedo"):
    """Load an sRGB texture image into Blender (packed, so the file may go away afterwards)."""
    import bpy

    img = bpy.data.images.load(str(Path(path).resolve()), check_existing=False)
    img.name = name
    _set_srgb(img)
    img.pack()
    return img


def textured_material(image, name: str = "albedo"):
    """A Principled BSDF material whose Base Color is the image through the UV map (what glTF exports)."""
    import bpy

    mat = bpy.data.materials.new(name)
    if mat.node_tree is None:  # Blender < 5: node trees are opt-in
        mat.use_nodes = True
    nt = mat.node_tree
    nt.nodes.clear()
    uvn = nt.nodes.new("ShaderNodeUVMap")
    uvn.uv_map = UV_MAP_NAME
    tex = nt.nodes.new("ShaderNodeTexImage")
    tex.image = image
    tex.interpolation = "Linear"
    tex.extension = "REPEAT"
    bsdf = nt.nodes.new("ShaderNodeBsdfPrincipled")
    out = nt.nodes.new("ShaderNodeOutputMaterial")
    nt.links.new(uvn.outputs["UV"], tex.inputs["Vector"])
    nt.links.new(tex.outputs["Color"], bsdf.inputs["Base Color"])
    nt.links.new(bsdf.outputs["BSDF"], out.inputs["Surface"])
    out.is_active_output = True
    return mat


def _active_output(nt):
    outs = [n for n in nt.nodes if n.bl_idname == "ShaderNodeOutputMaterial"]
    for n in outs:
        if n.is_active_output:
            return n
    return outs[0] if outs else None


def find_principled(material):
    """The Principled BSDF feeding the material output (or any in the tree), or None."""
    nt = material.node_tree
    if nt is None:
        return None
    out = _active_output(nt)
    if out is not None:
        # Walk upstream from the output's Surface socket.
        stack, seen = [out], set()
        while stack:
            node = stack.pop()
            if node.name in seen:
                continue
            seen.add(node.name)
            if node.bl_idname == "ShaderNodeBsdfPrincipled":
                return node
            for inp in node.inputs:
                for link in inp.links:
                    stack.append(link.from_node)
    for n in nt.nodes:
        if n.bl_idname == "ShaderNodeBsdfPrincipled":
            return n
    return None


def base_color_image(material):
    """(Image Texture node, directly_linked) feeding the Principled Base Color, searching upstream; (None, False) if none."""
    bsdf = find_principled(material)
    if bsdf is None:
        return None, False
    sock = bsdf.inputs["Base Color"]
    if not sock.is_linked:
        return None, False
    first = sock.links[0].from_node
    if first.bl_idname == "ShaderNodeTexImage":
        return first, True
    stack, seen = [first], set()
    while stack:
        node = stack.pop()
        if node.name in seen:
            continue
        seen.add(node.name)
        if node.bl_idname == "ShaderNodeTexImage":
            return node, False
        for inp in node.inputs:
            for link in inp.links:
                stack.append(link.from_node)
    return None, False


def to_emission(material) -> dict:
    """Route the material's base colour (texture chain or constant) into an Emission shader (strength 1).

    The Principled BSDF's alpha (linked or < 1) is kept through a mix with a
    Transparent BSDF.  Returns a small description of what was done.
    """
    nt = material.node_tree
    if nt is None:
        _try_set(material, "use_nodes", True)
        nt = material.node_tree
    out = _active_output(nt)
    if out is None:
        out = nt.nodes.new("ShaderNodeOutputMaterial")
    bsdf = find_principled(material)
    emit = nt.nodes.new("ShaderNodeEmission")
    emit.inputs["Strength"].default_value = 1.0
    info = {"source": "constant"}
    if bsdf is not None:
        base = bsdf.inputs["Base Color"]
        if base.is_linked:
            nt.links.new(base.links[0].from_socket, emit.inputs["Color"])
            info["source"] = "linked:" + base.links[0].from_node.bl_idname
        else:
            emit.inputs["Color"].default_value = tuple(base.default_value)
        alpha = bsdf.inputs["Alpha"]
        shader_out = emit.outputs["Emission"]
        if alpha.is_linked or alpha.default_value < 1.0:
            transp = nt.nodes.new("ShaderNodeBsdfTransparent")
            mix = nt.nodes.new("ShaderNodeMixShader")
            if alpha.is_linked:
                nt.links.new(alpha.links[0].from_socket, mix.inputs["Fac"])
            else:
                mix.inputs["Fac"].default_value = alpha.default_value
            nt.links.new(transp.outputs["BSDF"], mix.inputs[1])
            nt.links.new(emit.outputs["Emission"], mix.inputs[2])
            shader_out = mix.outputs["Shader"]
            info["alpha"] = True
    else:
        col = tuple(material.diffuse_color)
        emit.inputs["Color"].default_value = col
        shader_out = emit.outputs["Emission"]
    for link in list(out.inputs["Surface"].links):
        nt.links.remove(link)
    nt.links.new(shader_out, out.inputs["Surface"])
    if "Volume" in out.inputs:
        for link in list(out.inputs["Volume"].links):
            nt.links.remove(link)
    _try_set(out, "target", "ALL")
    return info


def suzanne_raw_geometry() -> tuple[np.ndarray, np.ndarray]:
    """Blender's monkey, subdivided once (Catmull-Clark), triangulated: (verts [V,3], faces [F,3])."""
    import bpy

    bpy.ops.mesh.primitive_monkey_add(size=2.0, calc_uvs=True, location=(0.0, 0.0, 0.0))
    obj = bpy.context.active_object
    mod = obj.modifiers.new("subdivide", "SUBSURF")
    mod.levels = 1
    mod.render_levels = 1
    dg = bpy.context.evaluated_depsgraph_get()
    me = bpy.data.meshes.new_from_object(obj.evaluated_get(dg))
    me.calc_loop_triangles()
    verts = np.empty(len(me.vertices) * 3, dtype=np.float32)
    me.vertices.foreach_get("co", verts)
    tris = np.empty(len(me.loop_triangles) * 3, dtype=np.int32)
    me.loop_triangles.foreach_get("vertices", tris)
    base = obj.data
    bpy.data.objects.remove(obj, do_unlink=True)
    bpy.data.meshes.remove(me)
    bpy.data.meshes.remove(base)
    return verts.reshape(-1, 3).astype(np.float64), tris.reshape(-1, 3).astype(np.int64)


def object_geometry(obj: str, offset: Sequence[float] = (0.0, 0.0, 0.0)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """World-space (verts f64 [V,3], faces i64 [F,3], uv f64 [F,3,2]) of a named object.

    ``suzanne`` needs bpy; the others are pure numpy.  Vertices are rounded to
    float32 (what Blender stores) before being returned.
    """
    if obj == "suzanne":
        v, f = suzanne_raw_geometry()
        v = normalize_geometry(v)
        uv = spherical_uv(v, f)
    elif obj == "mug":
        v, f, uv = mug_geometry()
        v = normalize_geometry(v)
    elif obj == "cube":
        v, f, uv = cube_geometry()
        v = normalize_geometry(v)
    elif obj == "plane":
        v, f, uv = plane_geometry()
        v = normalize_geometry(v)
    else:
        raise ValueError(f"unknown object {obj!r}; choose from {OBJECTS}")
    v = v + np.asarray(offset, dtype=np.float64)
    v = v.astype(np.float32).astype(np.float64)
    return v, f.astype(np.int64), uv.astype(np.float32)


def create_mesh_object(name: str, verts: np.ndarray, faces: np.ndarray, uv: np.ndarray, material, smooth: bool = False):
    """A Blender mesh object (identity transform) with per-corner UVs in the 'UVMap' layer."""
    import bpy

    me = bpy.data.meshes.new(name)
    me.from_pydata(verts.tolist(), [], faces.tolist())
    layer = me.uv_layers.new(name=UV_MAP_NAME)
    layer.data.foreach_set("uv", np.ascontiguousarray(uv, dtype=np.float32).reshape(-1))
    if smooth:
        me.shade_smooth()
    else:
        for poly in me.polygons:
            poly.use_smooth = False
    me.materials.append(material)
    me.update()
    if len(me.polygons) != len(faces) or len(me.vertices) != len(verts):
        raise RuntimeError("Blender changed the mesh topology")
    ob = bpy.data.objects.new(name, me)
    bpy.context.scene.collection.objects.link(ob)
    return ob


def make_camera(scene):
    import bpy

    data = bpy.data.cameras.new("camera")
    data.sensor_fit = "HORIZONTAL"
    data.sensor_width = SENSOR_WIDTH_MM
    data.clip_start = 0.01
    data.clip_end = 1000.0
    cam = bpy.data.objects.new("camera", data)
    scene.collection.objects.link(cam)
    scene.camera = cam
    return cam


def set_camera(scene, cam, c2w: np.ndarray, intr: dict) -> None:
    """Pose the camera (matrix_world = c2w) and set the pinhole intrinsics and resolution."""
    from mathutils import Matrix

    w, h = intr["w"], intr["h"]
    fl_x, fl_y = intr["fl_x"], intr["fl_y"]
    r = scene.render
    r.resolution_x, r.resolution_y = int(w), int(h)
    # Non-square pixels: pixel_aspect_x / pixel_aspect_y = fl_y / fl_x.
    ratio = fl_y / fl_x
    if abs(ratio - 1.0) < 1e-9:
        r.pixel_aspect_x = r.pixel_aspect_y = 1.0
    elif ratio > 1.0:
        r.pixel_aspect_x, r.pixel_aspect_y = ratio, 1.0
    else:
        r.pixel_aspect_x, r.pixel_aspect_y = 1.0, 1.0 / ratio
    ycor = r.pixel_aspect_y / r.pixel_aspect_x
    d = cam.data
    d.type = "PERSP"
    d.sensor_fit = "HORIZONTAL"
    d.sensor_width = SENSOR_WIDTH_MM
    d.lens = fl_x * SENSOR_WIDTH_MM / w
    d.shift_x = (0.5 * w - intr["cx"]) / w
    d.shift_y = (intr["cy"] - 0.5 * h) * ycor / w
    cam.matrix_world = Matrix(np.asarray(c2w, dtype=np.float64).tolist())


def _frame_png(out_dir: Path, file_path: str) -> Path:
    p = out_dir / file_path
    if p.suffix.lower() != ".png":
        p = p.with_name(p.name + ".png")
    return p


def render_frames(scene, cam, meta: dict, out_dir: str | os.PathLike, resolution: int | None = 128) -> list[float]:
    """Render every frame of a transforms dict to ``out_dir/<file_path>.png``; returns seconds per frame."""
    import bpy

    out_dir = Path(out_dir)
    times = []
    for frame in meta["frames"]:
        intr = frame_intrinsics(meta, frame, resolution)
        set_camera(scene, cam, np.asarray(frame["transform_matrix"], dtype=np.float64), intr)
        path = _frame_png(out_dir, frame["file_path"]).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        scene.render.filepath = str(path)
        t0 = time.perf_counter()
        bpy.ops.render.render(write_still=True)
        times.append(time.perf_counter() - t0)
        if not path.exists():
            raise RuntimeError(f"Blender did not write {path}")
    return times


def export_glb(objects: Iterable, path: str | os.PathLike) -> None:
    """Export the given objects (Principled materials) with Blender's glTF exporter, GLB, +Y up."""
    import bpy

    objects = list(objects)
    for ob in bpy.context.scene.objects:
        ob.select_set(False)
    for ob in objects:
        ob.select_set(True)
    bpy.context.view_layer.objects.active = objects[0]
    bpy.ops.export_scene.gltf(
        filepath=str(Path(path).resolve()),
        export_format="GLB",
        use_selection=True,
        export_yup=True,
        export_apply=True,
        export_texcoords=True,
        export_normals=True,
        export_materials="EXPORT",
        export_image_format="AUTO",
        export_cameras=False,
        export_lights=False,
        export_animations=False,
    )


def _build_object(obj: str, offset, texture_png: Path):
    import bpy

    verts, faces, uv = object_geometry(obj, offset)
    img = load_image(texture_png, name=f"{obj}_albedo")
    mat = textured_material(img, name=f"{obj}_material")
    ob = create_mesh_object(obj, verts, faces, uv, mat, smooth=(obj == "suzanne"))
    bpy.context.view_layer.update()
    return ob, mat, verts, faces, uv


def _dataset_meta(views: list[tuple[float, float]], radius: float, fov_rad: float, target, split: str, resolution: int) -> dict:
    frames = []
    for i, (el, az) in enumerate(views):
        c2w = spherical_pose(el, az, radius, target)
        frames.append(
            {
                "file_path": f"{split}/r_{i}",
                "transform_matrix": c2w.tolist(),
                "elevation": el,
                "azimuth": az,
                "radius": radius,
            }
        )
    return {"camera_angle_x": fov_rad, "w": resolution, "h": resolution, "frames": frames}


def render_dataset(
    obj: str,
    out_dir: str | os.PathLike,
    n_train: int = 24,
    n_test: int = 8,
    resolution: int = 128,
    seed: int = 0,
    samples: int = DEFAULT_SAMPLES,
    radius: float = DEFAULT_RADIUS,
    fov_deg: float = DEFAULT_FOV_DEG,
    offset: Sequence[float] = (0.0, 0.0, 0.0),
    texture: str | os.PathLike | None = None,
    export: bool = True,
) -> dict:
    """Render a train/test dataset of ``obj`` into ``out_dir`` (in this process: needs bpy); returns info."""
    import bpy

    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    offset = [float(x) for x in offset]
    tex = default_texture(obj) if texture is None else _read_texture(texture)
    tex_path = out / "texture.png"
    _save_png(tex, tex_path)

    scene = reset_scene()
    configure_render(scene, samples, resolution, resolution)
    ob, mat, verts, faces, uv = _build_object(obj, offset, tex_path)
    center = 0.5 * (verts.min(axis=0) + verts.max(axis=0))
    bradius = float(np.linalg.norm(verts - center, axis=1).max())
    np.savez_compressed(
        out / "gt_mesh.npz",
        vertices=verts.astype(np.float64),
        faces=faces.astype(np.int64),
        uv=uv.astype(np.float32),
        texture=tex,
        center=center.astype(np.float64),
        radius=np.float64(bradius),
    )
    if export:
        export_glb([ob], out / "gt.glb")
    to_emission(mat)

    cam = make_camera(scene)
    fov = math.radians(fov_deg)
    train_views, test_views = sample_views(n_train, n_test, seed)
    times = {}
    for split, views in (("train", train_views), ("test", test_views)):
        meta = _dataset_meta(views, radius, fov, center.tolist(), split, resolution)
        with open(out / f"transforms_{split}.json", "w") as f:
            json.dump(meta, f, indent=2)
        times[split] = render_frames(scene, cam, meta, out, resolution)

    all_times = times["train"] + times["test"]
    info = {
        "object": obj,
        "n_train": n_train,
        "n_test": n_test,
        "resolution": resolution,
        "seed": seed,
        "samples": samples,
        "radius": radius,
        "fov_deg": fov_deg,
        "offset": offset,
        "texture": str(texture) if texture else "default",
        "texture_shape": list(tex.shape),
        "center": center.tolist(),
        "bounding_radius": bradius,
        "n_vertices": int(len(verts)),
        "n_faces": int(len(faces)),
        "blender_version": bpy.app.version_string,
        "render_seconds": times,
        "mean_render_seconds": float(np.mean(all_times)) if all_times else None,
        "total_seconds": time.perf_counter() - t_start,
    }
    with open(out / "info.json", "w") as f:
        json.dump(info, f, indent=2)
    return info


def render_cameras(
    obj: str,
    cameras_json: str | os.PathLike,
    out_dir: str | os.PathLike,
    resolution: int = 128,
    samples: int = DEFAULT_SAMPLES,
    offset: Sequence[float] = (0.0, 0.0, 0.0),
    texture: str | os.PathLike | None = None,
) -> list[float]:
    """Render ``obj`` (same placement as :func:`render_dataset` with the same offset) from arbitrary cameras.

    ``cameras_json`` is transforms.json-like; each frame is written to
    ``out_dir/<file_path>.png``.  Returns seconds per frame.
    """
    meta = load_transforms(cameras_json)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tex = default_texture(obj) if texture is None else _read_texture(texture)
    with tempfile.TemporaryDirectory() as td:
        tex_path = Path(td) / "texture.png"
        _save_png(tex, tex_path)
        scene = reset_scene()
        configure_render(scene, samples, resolution, resolution)
        ob, mat, *_ = _build_object(obj, offset, tex_path)
    to_emission(mat)
    cam = make_camera(scene)
    return render_frames(scene, cam, meta, out, resolution)


# --------------------------------------------------------------------------- subprocess wrapper


def subprocess_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_groundtruth(args: Sequence[str], timeout: float = 1800.0, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python -m evaluation.groundtruth *args`` in a subprocess (bpy stays out of this process)."""
    proc = subprocess.run(
        [sys.executable, "-m", "evaluation.groundtruth", *[str(a) for a in args]],
        cwd=str(ROOT),
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise RuntimeError(f"evaluation.groundtruth failed (rc={proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m evaluation.groundtruth", description=__doc__.split("\n\n")[0])
    p.add_argument("--object", required=True, choices=OBJECTS)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--cameras", help="transforms.json-like file: render these cameras instead of a dataset")
    p.add_argument("--train", type=int, default=24)
    p.add_argument("--test", type=int, default=8)
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES)
    p.add_argument("--radius", type=float, default=DEFAULT_RADIUS, help="camera distance from the object centre")
    p.add_argument("--fov", type=float, default=DEFAULT_FOV_DEG, help="horizontal field of view, degrees")
    p.add_argument("--offset", type=float, nargs=3, default=(0.0, 0.0, 0.0), metavar=("X", "Y", "Z"))
    p.add_argument("--texture", help="replace the object's texture by this image (RGB)")
    p.add_argument("--no-glb", action="store_true", help="skip gt.glb")
    a = p.parse_args(argv)
    if a.cameras:
        times = render_cameras(a.object, a.cameras, a.out, a.resolution, a.samples, a.offset, a.texture)
        print(json.dumps({"frames": len(times), "mean_render_seconds": float(np.mean(times)) if times else None}))
    else:
        info = render_dataset(
            a.object, a.out, a.train, a.test, a.resolution, a.seed, a.samples, a.radius, a.fov, a.offset, a.texture, export=not a.no_glb
        )
        print(json.dumps({k: info[k] for k in ("object", "n_train", "n_test", "mean_render_seconds", "total_seconds")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
