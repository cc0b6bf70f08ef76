"""A triangle rasterizer in PyTorch: per-pixel face id, barycentrics and depth.

Used for visibility when baking textures, for rendering textured meshes (the
texture lookup is differentiable, so SDS can push gradients into every texel)
and for metrics. Pixel centres are at +0.5, as in the Gaussian renderer.
Rasterization itself is not differentiable (the geometry is fixed); sampling
the texture at the rasterized UVs is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..common import cameras as cam


@dataclass
class Raster:
    face_id: torch.Tensor  # [H,W] long, -1 where empty
    bary: torch.Tensor  # [H,W,3] perspective-correct barycentrics
    depth: torch.Tensor  # [H,W] camera-space depth (inf where empty)

    @property
    def mask(self) -> torch.Tensor:
        return self.face_id >= 0


def _candidates(xy: torch.Tensor, fids: torch.Tensor, width: int, height: int):
    """(face, pixel) pairs for the pixel centres inside each face's bounding box."""
    lo = xy.min(1).values
    hi = xy.max(1).values
    x0 = torch.ceil(lo[:, 0] - 0.5).clamp(0, width).long()
    x1 = torch.floor(hi[:, 0] - 0.5).clamp(-1, width - 1).long()
    y0 = torch.ceil(lo[:, 1] - 0.5).clamp(0, height).long()
    y1 = torch.floor(hi[:, 1] - 0.5).clamp(-1, height - 1).long()
    nx = (x1 - x0 + 1).clamp_min(0)
    cnt = nx * (y1 - y0 + 1).clamp_min(0)
    owner = torch.repeat_interleave(torch.arange(len(fids), device=xy.device), cnt)
    j = torch.arange(len(owner), device=xy.device) - (torch.cumsum(cnt, 0) - cnt)[owner]
    px = x0[owner] + j % nx[owner]
    py = y0[owner] + torch.div(j, nx[owner], rounding_mode="floor")
    return owner, px, py


def _bary(xy: torch.Tensor, owner, px, py):
    a, b, c = xy[owner, 0], xy[owner, 1], xy[owner, 2]
    p = torch.stack([px.to(xy.dtype) + 0.5, py.to(xy.dtype) + 0.5], -1)

    def edge(u, v, w):
        return (v[:, 0] - u[:, 0]) * (w[:, 1] - u[:, 1]) - (v[:, 1] - u[:, 1]) * (w[:, 0] - u[:, 0])

    area = edge(a, b, c)
    w0 = edge(b, c, p)
    w1 = edge(c, a, p)
    w2 = edge(a, b, p)
    safe = torch.where(area.abs() < 1e-12, torch.ones_like(area), area)
    bary = torch.stack([w0, w1, w2], -1) / safe[:, None]
    eps = 1e-6
    inside = (area.abs() >= 1e-12) & (bary >= -eps).all(-1)
    return bary, inside


def rasterize_screen(xy: torch.Tensor, z: torch.Tensor, width: int, height: int, budget: int = 1 << 22) -> Raster:
    """Rasterize triangles given in pixel coordinates.

    xy: [F,3,2] screen positions of each face's corners; z: [F,3] positive
    depths (for perspective correction and the depth test). Faces are
    processed in chunks of about ``budget`` candidate pixels."""
    device = xy.device
    n_pix = width * height
    zbuf = torch.full((n_pix,), float("inf"), device=device, dtype=torch.float32)
    face_id = torch.full((n_pix,), -1, dtype=torch.long, device=device)
    bary_out = torch.zeros(n_pix, 3, device=device, dtype=torch.float32)
    if len(xy) == 0:
        return Raster(face_id.reshape(height, width), bary_out.reshape(height, width, 3), zbuf.reshape(height, width))
    # chunk faces so that each chunk's bounding boxes hold about ``budget`` pixels
    lo = xy.min(1).values
    hi = xy.max(1).values
    est = ((hi[:, 0] - lo[:, 0]).clamp(0, width) + 1) * ((hi[:, 1] - lo[:, 1]).clamp(0, height) + 1)
    chunk_of = torch.div(torch.cumsum(est, 0) - est, budget, rounding_mode="floor").long()
    splits = (torch.nonzero(chunk_of[1:] != chunk_of[:-1]).squeeze(1) + 1).tolist()
    bounds = [0] + splits + [len(xy)]
    chunks = list(zip(bounds[:-1], bounds[1:]))

    def pass_(keep_best: bool):
        for s, e in chunks:
            fids = torch.arange(s, e, device=device)
            owner, px, py = _candidates(xy[s:e], fids, width, height)
            if len(owner) == 0:
                continue
            bary, inside = _bary(xy[s:e], owner, px, py)
            owner, px, py, bary = owner[inside], px[inside], py[inside], bary[inside]
            inv = bary / z[s:e][owner]  # perspective-correct weights
            depth = 1.0 / inv.sum(-1)
            pix = py * width + px
            if not keep_best:
                zbuf.scatter_reduce_(0, pix, depth.float(), reduce="amin")
            else:
                win = depth.float() <= zbuf[pix]
                pix_w = pix[win]
                face_id[pix_w] = fids[owner[win]]
                bary_out[pix_w] = (inv[win] * depth[win, None]).float()

    pass_(False)
    pass_(True)
    return Raster(face_id.reshape(height, width), bary_out.reshape(height, width, 3), zbuf.reshape(height, width))


def project_vertices(vertices: torch.Tensor, c2w, intr: cam.Intrinsics) -> tuple[torch.Tensor, torch.Tensor]:
    """World vertices -> (pixel coordinates [V,2], camera depth [V]) for a Blender-convention camera."""
    vm = torch.as_tensor(cam.c2w_to_viewmat(np.asarray(c2w, np.float64)), dtype=vertices.dtype, device=vertices.device)
    p = vertices @ vm[:3, :3].T + vm[:3, 3]
    z = p[:, 2]
    zs = torch.where(z.abs() < 1e-9, torch.full_like(z, 1e-9), z)
    xy = torch.stack([intr.fx * p[:, 0] / zs + intr.cx, intr.fy * p[:, 1] / zs + intr.cy], -1)
    return xy, z


def rasterize_mesh(vertices: torch.Tensor, faces: torch.Tensor, c2w, intr: cam.Intrinsics, near: float = 1e-3) -> Raster:
    """Rasterize a world-space mesh from a camera. Faces crossing the near plane are dropped."""
    xy, z = project_vertices(vertices, c2w, intr)
    fz = z[faces]
    keep = (fz > near).all(-1)
    fidx = torch.nonzero(keep).squeeze(1)
    r = rasterize_screen(xy[faces[fidx]], fz[fidx], intr.width, intr.height)
    fid = torch.where(r.face_id >= 0, fidx[r.face_id.clamp_min(0)], r.face_id)
    return Raster(fid, r.bary, r.depth)


def rasterize_uv(uv: torch.Tensor, faces: torch.Tensor, size: int) -> Raster:
    """Rasterize the UV layout into a ``size`` x ``size`` texture (row 0 = top, v up)."""
    xy = torch.stack([uv[:, 0] * size, (1.0 - uv[:, 1]) * size], -1)[faces]
    return rasterize_screen(xy, torch.ones(faces.shape, dtype=uv.dtype, device=uv.device), size, size)


def interpolate(raster: Raster, attr: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Per-pixel barycentric interpolation of a per-vertex attribute [V,D] -> [H,W,D] (0 where empty)."""
    fid = raster.face_id.clamp_min(0)
    corners = attr[faces[fid]]  # [H,W,3,D]
    out = (raster.bary[..., None] * corners).sum(-2)
    return torch.where(raster.mask[..., None], out, torch.zeros_like(out))


def sample_texture(texture: torch.Tensor, uv: torch.Tensor, wrap: bool = True) -> torch.Tensor:
    """Bilinear lookup of ``texture`` [Ht,Wt,C] at ``uv`` [...,2] (v up, as glTF loaders
    convert and as xatlas gives). Differentiable with respect to the texture."""
    shape = uv.shape[:-1]
    u = uv[..., 0]
    v = uv[..., 1]
    if wrap:
        u = u - torch.floor(u)
        v = v - torch.floor(v)
    grid = torch.stack([2 * u - 1, 1 - 2 * v], -1).reshape(1, -1, 1, 2)
    tex = texture.permute(2, 0, 1)[None]
    out = F.grid_sample(tex, grid.to(tex.dtype), mode="bilinear", padding_mode="border", align_corners=False)
    return out[0, :, :, 0].T.reshape(*shape, texture.shape[-1])
