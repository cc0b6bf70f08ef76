"""Texture baking: colour every texel from the views that see it.

Each texel inside a UV chart gets its surface point and normal. Every view
(an RGBA image with its camera: renders of the Gaussians, or photos) votes for
the texels it sees: visible (depth test against the mesh rendered from that
view), inside the view's alpha, facing the camera; the vote's weight is
``cos(angle)^power``, so frontal views dominate and grazing ones fade out.
A *priority* view (the user's photograph) is not one vote among many: where it
sees a texel squarely (``cos`` at or above ``priority_cos[1]``) its colour is
the texel's, and toward grazing (down to ``priority_cos[0]``) it hands over
smoothly to the other views' blend. Averaged with the renders, a photograph
would come back half as blurred as they are.
Texels no view sees, and the gutters between charts, are filled from the
nearest coloured texel (seam padding), so bilinear filtering and mipmaps
never bleed background into the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..common import cameras as cam
from ..common.progress import NULL, Progress
from .raster import interpolate, rasterize_mesh, rasterize_uv


@dataclass
class BakeView:
    c2w: np.ndarray  # [4,4] Blender convention
    intr: cam.Intrinsics
    rgba: np.ndarray  # [H,W,4] straight alpha
    weight: float = 1.0  # its votes count this many times
    priority: bool = False  # a photo: it colours what it sees squarely, the others only the rest (BakeSettings.priority_cos)


@dataclass
class BakeSettings:
    texture_size: int = 1024
    cos_power: float = 4.0
    min_cos: float = 0.05
    alpha_threshold: float = 0.5
    depth_tolerance: float = 0.01  # as a fraction of the mesh's bounding diagonal
    # a priority view's share of a texel: 0 at or below the first cosine, 1 at or above the second, smooth between
    priority_cos: tuple = (0.3, 0.6)
    normal_map: bool = True  # also bake a tangent-space normal map from the surface before decimation
    metallic: float = 0.0  # the material's constant factors (glTF metallic-roughness)
    roughness: float = 0.8


def sphere_cameras(center, radius: float, fov_deg: float, resolution: int, elevations=(-45.0, 0.0, 45.0),
                   azimuths: int = 8, poles: bool = True) -> list[tuple[np.ndarray, cam.Intrinsics]]:
    """Cameras around ``center`` at ``radius`` (26 by default: 3 rings of 8 plus top and bottom)."""
    intr = cam.Intrinsics.from_fov(np.radians(fov_deg), resolution, resolution)
    out = []
    for el in elevations:
        for k in range(azimuths):
            out.append((cam.spherical_to_c2w(el, 360.0 * k / azimuths + (22.5 if el != 0 else 0.0), radius, center), intr))
    if poles:
        out.append((cam.spherical_to_c2w(89.9, 0.0, radius, center), intr))
        out.append((cam.spherical_to_c2w(-89.9, 0.0, radius, center), intr))
    return out


def _bilinear(img: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
    """Sample img [H,W,C] at pixel coordinates xy [N,2] (centres at +0.5), clamped at borders."""
    H, W, _ = img.shape
    x = (xy[:, 0] - 0.5).clamp(0, W - 1)
    y = (xy[:, 1] - 0.5).clamp(0, H - 1)
    x0 = x.floor().long().clamp(max=W - 2) if W > 1 else x.floor().long()
    y0 = y.floor().long().clamp(max=H - 2) if H > 1 else y.floor().long()
    fx = (x - x0).unsqueeze(1)
    fy = (y - y0).unsqueeze(1)
    x1 = (x0 + 1).clamp(max=W - 1)
    y1 = (y0 + 1).clamp(max=H - 1)
    return ((img[y0, x0] * (1 - fx) + img[y0, x1] * fx) * (1 - fy) + (img[y1, x0] * (1 - fx) + img[y1, x1] * fx) * fy)


def fill_empty(texture: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Copy each invalid texel's colour from the nearest valid one."""
    from scipy.ndimage import distance_transform_edt

    if valid.all() or not valid.any():
        return texture
    _, (iy, ix) = distance_transform_edt(~valid, return_indices=True)
    return texture[iy, ix]


@torch.no_grad()
def bake_texture(vertices: np.ndarray, faces: np.ndarray, uv: np.ndarray, normals: np.ndarray, views: list[BakeView],
                 settings: BakeSettings | None = None, progress: Progress = NULL,
                 base: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Bake ``views`` into a texture for the mesh (vertices/normals per UV vertex).

    Returns (texture [S,S,3] float32, coverage [S,S] bool: texels some view saw).
    ``base``, if given, is the colour for texels no view sees (else nearest fill)."""
    s = settings or BakeSettings()
    S = s.texture_size
    V = torch.as_tensor(vertices, dtype=torch.float32)
    Fc = torch.as_tensor(faces, dtype=torch.long)
    N = torch.as_tensor(normals, dtype=torch.float32)
    r = rasterize_uv(torch.as_tensor(uv, dtype=torch.float32), Fc, S)
    texel = r.mask.reshape(-1)
    idx = torch.nonzero(texel).squeeze(1)
    pos = interpolate(r, V, Fc).reshape(-1, 3)[idx]
    nrm = interpolate(r, N, Fc).reshape(-1, 3)[idx]
    nrm = nrm / nrm.norm(dim=1, keepdim=True).clamp_min(1e-12)
    acc = torch.zeros(len(idx), 3)
    wsum = torch.zeros(len(idx))
    pacc = torch.zeros(len(idx), 3)  # the priority views' blend, and their share of each texel
    pwsum = torch.zeros(len(idx))
    share = torch.zeros(len(idx))
    lo, hi = s.priority_cos
    diag = float(np.linalg.norm(np.ptp(vertices, axis=0)))
    tol = s.depth_tolerance * diag
    for i, view in enumerate(views):
        progress.update(i / max(1, len(views)), f"view {i + 1}/{len(views)}")
        k = view.intr
        img = torch.as_tensor(view.rgba, dtype=torch.float32)
        depth = rasterize_mesh(V, Fc, view.c2w, k).depth
        vm = torch.as_tensor(cam.c2w_to_viewmat(view.c2w), dtype=torch.float32)
        pc = pos @ vm[:3, :3].T + vm[:3, 3]
        z = pc[:, 2]
        front = z > 1e-6
        zs = torch.where(front, z, torch.ones_like(z))
        xy = torch.stack([k.fx * pc[:, 0] / zs + k.cx, k.fy * pc[:, 1] / zs + k.cy], -1)
        inside = front & (xy[:, 0] >= 0) & (xy[:, 0] < k.width) & (xy[:, 1] >= 0) & (xy[:, 1] < k.height)
        px = xy[:, 0].clamp(0, k.width - 1).long()
        py = xy[:, 1].clamp(0, k.height - 1).long()
        visible = inside & (z <= depth[py, px] + tol)
        cam_pos = torch.as_tensor(view.c2w[:3, 3], dtype=torch.float32)
        to_cam = cam_pos - pos
        cos = (nrm * to_cam).sum(1) / to_cam.norm(dim=1).clamp_min(1e-12)
        sample = _bilinear(img, xy)
        seen = visible & (cos > s.min_cos) & (sample[:, 3] > s.alpha_threshold)
        w = torch.where(seen, view.weight * cos.clamp_min(0) ** s.cos_power, torch.zeros_like(cos))
        if view.priority:
            pacc += w[:, None] * sample[:, :3]
            pwsum += w
            x = ((cos - lo) / max(hi - lo, 1e-6)).clamp(0, 1)
            share = torch.maximum(share, torch.where(seen, x * x * (3 - 2 * x), torch.zeros_like(x)))
        else:
            acc += w[:, None] * sample[:, :3]
            wsum += w
    progress.update(1.0, "filling seams")
    rest = acc / wsum.clamp_min(1e-12)[:, None]
    photo = pacc / pwsum.clamp_min(1e-12)[:, None]
    share = torch.where(wsum > 0, share, (pwsum > 0).float())  # only a photo saw it: the photo's colour
    color = share[:, None] * photo + (1 - share[:, None]) * rest
    colored = (wsum > 0) | (pwsum > 0)
    tex = np.zeros((S * S, 3), np.float32)
    got = np.zeros(S * S, bool)
    tex[idx[colored].numpy()] = color[colored].numpy()
    got[idx[colored].numpy()] = True
    tex = tex.reshape(S, S, 3)
    got = got.reshape(S, S)
    if base is not None:
        b = np.asarray(base, np.float32).reshape(S, S, -1)[..., :3]
        tex = np.where(got[..., None], tex, b)
        return tex, got
    return fill_empty(tex, got), got


# ---------------------------------------------------------------------------
# normal maps


def vertex_tangents(vertices: np.ndarray, faces: np.ndarray, uv: np.ndarray, normals: np.ndarray) -> np.ndarray:
    """Per-vertex tangent frames for a tangent-space normal map, as glTF stores them:
    [V,4], xyz the unit tangent (the surface direction of increasing u, made orthogonal
    to the vertex normal), w = +1 or -1 so that ``cross(normal, tangent.xyz) * w`` is the
    direction of increasing v (v up, the convention of :class:`TexturedMesh`: the normal
    map's green channel points up in the image, as glTF and Blender read it).

    Each face's UV derivatives are accumulated on its corners, weighted by the corner
    angle (as MikkTSpace does, which Blender and glTF viewers compute when no tangents
    are given; on smooth, unmirrored charts the two agree closely)."""
    v = np.asarray(vertices, np.float64)
    f = np.asarray(faces, np.int64)
    t = np.asarray(uv, np.float64)
    n = np.asarray(normals, np.float64)
    p0, p1, p2 = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    w0, w1, w2 = t[f[:, 0]], t[f[:, 1]], t[f[:, 2]]
    e1, e2 = p1 - p0, p2 - p0
    d1, d2 = w1 - w0, w2 - w0
    det = d1[:, 0] * d2[:, 1] - d2[:, 0] * d1[:, 1]
    ok = np.abs(det) > 1e-14
    r = np.where(ok, 1.0 / np.where(ok, det, 1.0), 0.0)[:, None]
    du = (e1 * d2[:, 1:2] - e2 * d1[:, 1:2]) * r  # dP/du
    dv = (e2 * d1[:, 0:1] - e1 * d2[:, 0:1]) * r  # dP/dv
    tan = np.zeros_like(v)
    bit = np.zeros_like(v)
    tri = [p0, p1, p2]
    for k in range(3):
        a, b = tri[(k + 1) % 3] - tri[k], tri[(k + 2) % 3] - tri[k]
        cosang = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)).clip(1e-20)
        ang = np.arccos(np.clip(cosang, -1.0, 1.0))[:, None]
        np.add.at(tan, f[:, k], ang * du)
        np.add.at(bit, f[:, k], ang * dv)
    tan -= n * (tan * n).sum(1, keepdims=True)
    length = np.linalg.norm(tan, axis=1, keepdims=True)
    # vertices with no usable UV derivative: any direction orthogonal to the normal
    fallback = np.cross(n, np.where(np.abs(n[:, 2:3]) < 0.9, [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]))
    tan = np.where(length > 1e-12, tan / length.clip(1e-20), fallback / np.linalg.norm(fallback, axis=1, keepdims=True).clip(1e-20))
    w = np.where((np.cross(n, tan) * bit).sum(1) < 0.0, -1.0, 1.0)
    return np.concatenate([tan, w[:, None]], 1).astype(np.float32)


def _tangent_frame(normal: np.ndarray, tangent: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Orthonormal (tangent, bitangent, normal) rows from interpolated normals [N,3] and tangents [N,4]."""
    n = normal / np.linalg.norm(normal, axis=1, keepdims=True).clip(1e-12)
    t = tangent[:, :3] - n * (tangent[:, :3] * n).sum(1, keepdims=True)
    t /= np.linalg.norm(t, axis=1, keepdims=True).clip(1e-12)
    b = np.cross(n, t) * np.where(tangent[:, 3:4] < 0.0, -1.0, 1.0)
    return t, b, n


def encode_tangent_normals(detail: np.ndarray, normal: np.ndarray, tangent: np.ndarray) -> np.ndarray:
    """World-space unit normals ``detail`` [N,3] expressed in the tangent frames (``normal``
    [N,3], ``tangent`` [N,4] interpolated per texel) and encoded as a normal map's colours
    in [0, 1] (0.5, 0.5, 1 where the two normals agree)."""
    t, b, n = _tangent_frame(normal, tangent)
    local = np.stack([(detail * t).sum(1), (detail * b).sum(1), (detail * n).sum(1)], 1)
    local[:, 2] = np.maximum(local[:, 2], 1e-3)  # a detail normal facing away from the face cannot be shown: clamp it
    local /= np.linalg.norm(local, axis=1, keepdims=True)
    return (0.5 * local + 0.5).astype(np.float32)


def decode_tangent_normals(rgb: np.ndarray, normal: np.ndarray, tangent: np.ndarray) -> np.ndarray:
    """The inverse of :func:`encode_tangent_normals`: world-space unit normals."""
    t, b, n = _tangent_frame(normal, tangent)
    local = 2.0 * np.asarray(rgb, np.float64) - 1.0
    out = local[:, :1] * t + local[:, 1:2] * b + local[:, 2:3] * n
    return out / np.linalg.norm(out, axis=1, keepdims=True).clip(1e-12)


@torch.no_grad()
def bake_normal_map(vertices: np.ndarray, faces: np.ndarray, uv: np.ndarray, normals: np.ndarray,
                    detail_normals: Callable[[np.ndarray, np.ndarray], np.ndarray], size: int,
                    chunk: int = 1 << 18) -> tuple[np.ndarray, np.ndarray]:
    """Tangent-space normal map of a (decimated) mesh from a more detailed surface.

    ``detail_normals(points [N,3], normals [N,3]) -> [N,3]`` gives the detailed surface's
    unit normal near each texel's point on this mesh (its interpolated normal tells which
    side; rows of NaN: unknown there, the face's own normal is kept). Returns (map
    [size,size,3] float32 in [0,1], the UV charts' texel mask [size,size]); gutters are
    filled from the nearest texel of a chart, as the colour map's are."""
    V = torch.as_tensor(vertices, dtype=torch.float32)
    Fc = torch.as_tensor(faces, dtype=torch.long)
    N = torch.as_tensor(normals, dtype=torch.float32)
    T = torch.as_tensor(vertex_tangents(vertices, faces, uv, normals), dtype=torch.float32)
    r = rasterize_uv(torch.as_tensor(uv, dtype=torch.float32), Fc, size)
    texel = r.mask.reshape(-1)
    idx = torch.nonzero(texel).squeeze(1)
    pos = interpolate(r, V, Fc).reshape(-1, 3)[idx].numpy().astype(np.float64)
    nrm = interpolate(r, N, Fc).reshape(-1, 3)[idx].numpy().astype(np.float64)
    tan = interpolate(r, T, Fc).reshape(-1, 4)[idx].numpy().astype(np.float64)
    nrm /= np.linalg.norm(nrm, axis=1, keepdims=True).clip(1e-12)
    out = np.empty((len(idx), 3), np.float32)
    for s in range(0, len(idx), chunk):
        sl = slice(s, s + chunk)
        d = np.asarray(detail_normals(pos[sl], nrm[sl]), np.float64)
        d = np.where(np.isfinite(d).all(1, keepdims=True), d, nrm[sl])
        d /= np.linalg.norm(d, axis=1, keepdims=True).clip(1e-12)
        out[sl] = encode_tangent_normals(d, nrm[sl], tan[sl])
    tex = np.zeros((size * size, 3), np.float32)
    tex[:] = (0.5, 0.5, 1.0)
    tex[idx.numpy()] = out
    got = texel.numpy().reshape(size, size)
    return fill_empty(tex.reshape(size, size, 3), got), got
