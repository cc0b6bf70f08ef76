"""Oracles that know the answer, in place of the learned models.

:class:`OracleViews` is a novel-view generator (same contract as the
Zero-1-to-3 one in ``backend.pipeline.novel_views``) that renders the true object with
Blender at the pose Zero-1-to-3 would be asked for. It does not read the
pose we planned: it receives the *camera vector* the pipeline computes for the
model (``backend.common.cameras.zero123_camera_vector``) and turns it into a camera
with Zero-1-to-3's own training-code parametrisation (polar angle from +Z,
azimuth ``atan2(y, x)``, target = reference + delta). A sign error in the
camera vector, or a mismatch between it and the rig the reconstruction
assumes, therefore produces views of the wrong side, and the reconstruction
stops matching the truth.

``flip_azimuth`` deliberately breaks the convention (a negative control for
tests).
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from evaluation.groundtruth import run_groundtruth


def camera_from_vector(ref_position: np.ndarray, center: np.ndarray, vector: Sequence[float]) -> np.ndarray:
    """Camera position implied by a Zero-1-to-3 camera vector, in its training parametrisation."""
    d = np.asarray(ref_position, np.float64) - center
    r = float(np.linalg.norm(d))
    theta = math.atan2(math.hypot(d[0], d[1]), d[2])  # polar angle from +Z
    phi = math.atan2(d[1], d[0])
    d_polar, s, c, d_r = (float(x) for x in vector)
    theta_t = theta + d_polar
    phi_t = phi + math.atan2(s, c)
    r_t = r + d_r
    return center + r_t * np.array([math.sin(theta_t) * math.cos(phi_t), math.sin(theta_t) * math.sin(phi_t), math.cos(theta_t)])


def look_at(eye, target) -> np.ndarray:
    fwd = np.asarray(target, np.float64) - eye
    fwd /= np.linalg.norm(fwd)
    up = np.array([0.0, 0.0, 1.0])
    right = np.cross(fwd, up)
    if np.linalg.norm(right) < 1e-8:
        right = np.array([1.0, 0.0, 0.0])
    right /= np.linalg.norm(right)
    m = np.eye(4)
    m[:3, 0], m[:3, 1], m[:3, 2], m[:3, 3] = right, np.cross(right, fwd), -fwd, eye
    return m


def load_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGBA"), np.float32) / 255.0


@dataclass
class OracleViews:
    """Blender renders of ``obj`` (centred at ``center``) for the requested relative poses;
    with ``mesh`` (a TexturedMesh) our rasterizer renders that mesh instead (no Blender: fast
    tests of what lies downstream of the views)."""

    obj: str
    center: np.ndarray
    radius: float  # camera distance of the reference view
    fov_deg: float = 49.1
    size: int = 256
    offset: tuple = (0.0, 0.0, 0.0)
    flip_azimuth: bool = False
    kind: str = "zero123"
    mesh: object = None
    # the elevation the reference was really seen from: set, the views are made relative to it whatever
    # elevation the caller assumes (as Zero-1-to-3 does: it is told relative poses only)
    true_elevation: float | None = None

    def reference_c2w(self, elevation: float) -> np.ndarray:
        el = math.radians(elevation)
        eye = self.center + self.radius * np.array([0.0, -math.cos(el), math.sin(el)])  # azimuth 0: on -Y
        return look_at(eye, self.center)

    def render(self, c2ws: list[np.ndarray]) -> np.ndarray:
        if self.mesh is not None:
            from backend.common import cameras as cam
            from backend.mesh.textured import render_mesh_rgba

            k = cam.Intrinsics.from_fov(math.radians(self.fov_deg), self.size, self.size)
            return np.stack([render_mesh_rgba(self.mesh, m, k, supersample=3) for m in c2ws]).astype(np.float32)
        meta = {"camera_angle_x": math.radians(self.fov_deg),
                "frames": [{"file_path": f"v{i:03d}", "transform_matrix": m.tolist()} for i, m in enumerate(c2ws)]}
        with tempfile.TemporaryDirectory() as tmp:
            cams = Path(tmp) / "cams.json"
            cams.write_text(json.dumps(meta))
            run_groundtruth(["--object", self.obj, "--cameras", str(cams), "--out", tmp, "--resolution", str(self.size),
                             "--offset", *[str(x) for x in self.offset]])
            return np.stack([load_png(Path(tmp) / f"v{i:03d}.png") for i in range(len(c2ws))])

    def reference(self, elevation: float = 0.0) -> np.ndarray:
        return self.render([self.reference_c2w(elevation)])[0]

    def __call__(self, reference: np.ndarray, reference_elevation: float, poses, progress=None) -> np.ndarray:
        from backend.common import cameras as cam

        if self.true_elevation is not None:
            reference_elevation = self.true_elevation
        ref = self.reference_c2w(reference_elevation)
        c2ws = []
        for d_el, d_az, d_r in poses:
            if self.kind == "stable_zero123":
                v = cam.stable_zero123_camera_vector(reference_elevation, 0.0, reference_elevation + d_el, d_az)
                v[3] = 0.0
            else:
                v = cam.zero123_camera_vector(reference_elevation, 0.0, 0.0, reference_elevation + d_el, d_az, d_r)
            if self.flip_azimuth:
                v[1] = -v[1]
            c2ws.append(look_at(camera_from_vector(ref[:3, 3], self.center, v), self.center))
        out = self.render(c2ws)
        if progress is not None:
            progress.update(1.0, f"{len(out)} oracle views")
        return out


def framing_radius(vertices: np.ndarray, center: np.ndarray, fill: float | None = None, fov_deg: float = 49.1,
                   elevation: float = 0.0, size: int = 256) -> float:
    """Camera distance at which the object's longer side spans ``fill`` of the reference
    frame (default: the pipeline's ``FILL``), so that the pipeline takes the reference as
    framed (no re-cropping)."""
    from backend.common import cameras as cam
    from backend.pipeline.novel_views import FILL

    fill = FILL if fill is None else fill

    k = cam.Intrinsics.from_fov(math.radians(fov_deg), size, size)
    r = float(np.linalg.norm(vertices - center, axis=1).max()) / (fill * math.tan(math.radians(fov_deg) / 2))
    for _ in range(4):
        el = math.radians(elevation)
        c2w = look_at(center + r * np.array([0.0, -math.cos(el), math.sin(el)]), center)
        uv, _ = cam.project(vertices, c2w, k)
        side = max(np.ptp(uv[:, 0]), np.ptp(uv[:, 1])) / size
        r *= side / fill
    return r


class PoolTruth:
    """True renders for the oracle denoiser: Blender images of a camera pool,
    composited on white, looked up by the sampled view's ``source`` index."""

    def __init__(self, images_rgba: np.ndarray):
        import torch

        rgb = images_rgba[..., :3] * images_rgba[..., 3:4] + (1 - images_rgba[..., 3:4])
        self.images = torch.as_tensor(rgb, dtype=torch.float32).permute(0, 3, 1, 2)

    def __call__(self, views):
        import torch
        import torch.nn.functional as F

        out = []
        for v in views:
            if v.source < 0:
                raise ValueError("the oracle only knows the pool's cameras (camera_prob must be 1)")
            img = self.images[v.source][None]
            if img.shape[-1] != v.intr.width or img.shape[-2] != v.intr.height:
                img = F.interpolate(img, (v.intr.height, v.intr.width), mode="area")
            out.append(img[0])
        return torch.stack(out)


def degrade_texture(texture: np.ndarray, seed: int = 0) -> np.ndarray:
    """Blurred, colour-shifted and partly missing: what SDS must repair."""
    from scipy.ndimage import gaussian_filter

    t = np.asarray(texture, np.float32)
    sigma = max(1.0, t.shape[0] / 64)
    out = np.stack([gaussian_filter(t[..., c], sigma) for c in range(3)], -1)
    out = out * np.array([0.75, 0.9, 1.15], np.float32) + np.array([0.12, -0.05, 0.0], np.float32)
    h, w = out.shape[:2]
    rng = np.random.default_rng(seed)
    for _ in range(3):  # missing patches, flat grey
        y, x = rng.integers(0, h * 3 // 4), rng.integers(0, w * 3 // 4)
        out[y:y + h // 5, x:x + w // 5] = 0.5
    return np.clip(out, 0, 1)


class MeshTruth:
    """True renders for the oracle denoiser from a textured mesh, for any camera
    (sampled views, scene cameras of any aspect ratio), composited on the view's background
    (white unless the view says otherwise)."""

    def __init__(self, mesh, supersample: int = 2):
        import torch

        self.V = torch.as_tensor(mesh.vertices, dtype=torch.float32)
        self.F = torch.as_tensor(mesh.faces)
        self.UV = torch.as_tensor(mesh.uv, dtype=torch.float32)
        self.T = torch.as_tensor(mesh.texture, dtype=torch.float32)
        self.supersample = supersample

    def __call__(self, views):
        import torch

        from backend.mesh.textured import render_textured

        with torch.no_grad():
            return torch.stack([render_textured(self.V, self.F, self.UV, self.T, v.c2w, v.intr, self.supersample,
                                                background=torch.full((3,), float(getattr(v, "background", 1.0))))
                                for v in views]).permute(0, 3, 1, 2)


@dataclass
class ViewFaults:
    """Zero-1-to-3-like faults of one novel view, drawn per view from a seed. Defaults are
    what published Zero-1-to-3 XL samples show at 256 px: a few degrees of pose error with a
    systematic elevation bias, a few percent of scale drift, softer images, colour and
    brightness drift, and an unseen side hallucinated differently in every sample."""

    jitter_deg: float = 4.0  # std of azimuth and elevation errors
    elevation_bias_deg: float = 5.0  # every view a little higher than asked
    scale_drift: float = 0.06  # std of the relative camera distance
    blur_px: tuple = (0.6, 2.0)  # range of the Gaussian blur's sigma, in pixels at 256 px
    gain: float = 0.08  # std of a per-channel gain
    brightness: float = 0.05  # std of an additive brightness shift
    unseen: float = 0.3  # amplitude of view-specific detail, full on the side opposite the reference

    def draw(self, rng: np.random.Generator) -> dict:
        return {"d_el": self.elevation_bias_deg + rng.normal(0, self.jitter_deg),
                "d_az": rng.normal(0, self.jitter_deg),
                "scale": float(np.clip(1 + rng.normal(0, self.scale_drift), 0.8, 1.2)),
                "blur": float(rng.uniform(*self.blur_px)),
                "gain": 1 + rng.normal(0, self.gain, 3),
                "shift": rng.normal(0, self.brightness),
                "pattern_seed": int(rng.integers(2**31))}


@dataclass
class DegradedOracleViews(OracleViews):
    """:class:`OracleViews` with :class:`ViewFaults`: the same contract and the same true
    object, but each view is rendered from a perturbed camera and then blurred, colour-shifted
    and given its own detail on the side the reference did not see. The reference itself
    (``reference()``) stays perfect, as a user's photograph would be."""

    faults: ViewFaults = None  # type: ignore[assignment]
    seed: int = 0

    def __post_init__(self):
        if self.faults is None:
            self.faults = ViewFaults()

    def __call__(self, reference: np.ndarray, reference_elevation: float, poses, progress=None) -> np.ndarray:
        rng = np.random.default_rng(self.seed)
        draws = [self.faults.draw(rng) for _ in poses]
        perturbed = [(d_el + f["d_el"], d_az + f["d_az"], d_r + self.radius * (f["scale"] - 1))
                     for (d_el, d_az, d_r), f in zip(poses, draws)]
        views = super().__call__(reference, reference_elevation, perturbed, None)
        out = np.stack([self.degrade(v, f, pose[1]) for v, f, pose in zip(views, draws, poses)])
        if progress is not None:
            progress.update(1.0, f"{len(out)} degraded oracle views")
        return out

    def degrade(self, rgba: np.ndarray, f: dict, d_az: float) -> np.ndarray:
        return apply_faults(rgba, f, d_az, self.faults.unseen)


def apply_faults(rgba: np.ndarray, f: dict, azimuth: float, unseen: float) -> np.ndarray:
    """Blur, colour drift and view-specific detail (``f`` from :meth:`ViewFaults.draw`) on a
    straight-alpha RGBA image; the detail grows toward the side opposite the reference
    (``azimuth`` 180)."""
    from scipy.ndimage import gaussian_filter

    h = rgba.shape[0]
    sigma = f["blur"] * h / 256
    a = gaussian_filter(rgba[..., 3], sigma)
    pre = np.stack([gaussian_filter(rgba[..., c] * rgba[..., 3], sigma) for c in range(3)], -1)
    rgb = pre / np.maximum(a[..., None], 1e-4)
    rgb = rgb * f["gain"] + f["shift"]
    away = 0.5 * (1 - math.cos(math.radians(azimuth)))  # 0 facing the reference's side, 1 opposite
    if unseen > 0 and away > 0:
        prng = np.random.default_rng(f["pattern_seed"])
        field = np.stack([gaussian_filter(prng.normal(0, 1, (h, h)), h / 24) for _ in range(3)], -1)
        field /= max(float(np.abs(field).max()), 1e-6)
        rgb = rgb + unseen * away * field
    return np.concatenate([np.clip(rgb, 0, 1), np.clip(a, 0, 1)[..., None]], -1).astype(np.float32)


class RigTruth(MeshTruth):
    """True renders for the oracle denoiser at cameras given in the generation rig's frame
    (object at the origin, the reference at distance ``RADIUS``): the truth's frame is the
    rig's scaled by ``scale`` and moved to ``center``. ``faults`` makes it a sampler like
    Zero-1-to-3's: every call renders from a perturbed camera, then blurs, shifts colours
    and invents its own detail on the unseen side (:class:`ViewFaults`, drawn per view from
    ``seed`` and the call count), so score distillation and SDEdit meet a prior that is
    right on average but never exactly. Returns [B,3,H,W] on the views' backgrounds (white)."""

    def __init__(self, mesh, center, scale: float, faults: "ViewFaults | None" = None, seed: int = 0,
                 supersample: int = 2):
        super().__init__(mesh, supersample)
        self.center = np.asarray(center, np.float64)
        self.scale = float(scale)
        self.faults = faults
        self.rng = np.random.default_rng(seed)

    def __call__(self, views):
        import torch

        from backend.common import cameras as cam
        from backend.mesh.textured import render_textured

        out = []
        for v in views:
            el, az, r = cam.c2w_to_spherical(v.c2w, np.zeros(3))
            f = self.faults.draw(self.rng) if self.faults is not None else None
            if f is not None:
                el, az, r = el + f["d_el"], az + f["d_az"], r * f["scale"]
            c2w = cam.spherical_to_c2w(el, az, r * self.scale, self.center)
            with torch.no_grad():
                rgba = render_textured(self.V, self.F, self.UV, self.T, c2w, v.intr, self.supersample).clamp(0, 1).numpy()
            if f is not None:
                rgba = apply_faults(rgba, f, v.azimuth, self.faults.unseen)
            bg = float(getattr(v, "background", 1.0))
            rgb = rgba[..., :3] * rgba[..., 3:4] + bg * (1 - rgba[..., 3:4])
            out.append(torch.as_tensor(rgb, dtype=torch.float32).permute(2, 0, 1))
        return torch.stack(out)


class ToldFront:
    """A truth whose back views (azimuth 90-270) answer with the front's image: what a text prior
    does when the prompt says "front" whatever the camera (the cause of Janus objects). A negative
    control for text-to-3D by score distillation."""

    def __init__(self, truth):
        self.truth = truth

    def __call__(self, views):
        from dataclasses import replace

        from backend.common import cameras as cam

        out = []
        for v in views:
            if 90 < v.azimuth % 360 < 270:
                v = replace(v, c2w=cam.spherical_to_c2w(v.elevation, v.azimuth - 180, v.radius), azimuth=v.azimuth - 180)
            out.append(v)
        return self.truth(out)


def gt_textured_mesh(npz) -> "object":
    """The ground truth's ``gt_mesh.npz`` (vertices, faces, uv, texture) as a TexturedMesh."""
    from backend.mesh.textured import TexturedMesh

    v, f, uv = np.asarray(npz["vertices"], np.float64), np.asarray(npz["faces"], np.int64), np.asarray(npz["uv"], np.float32)
    if uv.ndim == 3:  # per face corner: one vertex per corner
        v, uv, f = v[f].reshape(-1, 3), uv.reshape(-1, 2), np.arange(f.size, dtype=np.int64).reshape(-1, 3)
    tex = np.asarray(npz["texture"])
    tex = tex.astype(np.float32) / 255.0 if tex.dtype == np.uint8 else tex.astype(np.float32)
    return TexturedMesh(v, f, uv, tex[..., :3])


def oracle_prior(npz, radius: float, faults: "ViewFaults | None" = None, seed: int = 0, size: int = 128,
                 guidance_scale: float = 1.0, posterior: str = "exact"):
    """A prior factory for ``image_to_3d``: the oracle denoiser on :class:`RigTruth` (perfect,
    or with Zero-1-to-3-like ``faults``); ``posterior`` is what its SDEdit passes return
    (:class:`backend.pipeline.sds.OracleGuidance`)."""
    from backend.pipeline.novel_views import RADIUS
    from backend.pipeline.sds import OracleGuidance

    truth = RigTruth(gt_textured_mesh(npz), npz["center"], radius / RADIUS, faults, seed)

    def build(reference_rgba, elevation):
        return [OracleGuidance(truth, size=size, guidance_scale=guidance_scale, posterior=posterior)]

    return build
