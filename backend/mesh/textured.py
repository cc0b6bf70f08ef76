"""The textured mesh that the pipeline passes around, and its renderer."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F

from ..common import cameras as cam
from .raster import interpolate, rasterize_mesh, sample_texture


@dataclass
class TexturedMesh:
    """World-space (Z up) triangle mesh with per-vertex UVs and a base-colour texture,
    optionally a tangent-space normal map (same UVs; tangent frames from
    :func:`backend.mesh.bake.vertex_tangents`) and constant metallic/roughness factors:
    a glTF metallic-roughness material.

    ``uv`` follows the OpenGL/glTF-loader convention: v = 0 at the bottom row of
    ``texture`` (whose row 0 is the top of the image). Vertices on UV seams are
    duplicated, as in any glTF mesh."""

    vertices: np.ndarray  # [V,3] float64
    faces: np.ndarray  # [F,3] int64
    uv: np.ndarray  # [V,2] float32
    texture: np.ndarray  # [Ht,Wt,3] float32 in [0,1]
    normals: np.ndarray | None = None  # [V,3]
    name: str = "gen3d"
    extras: dict = field(default_factory=dict)
    normal_map: np.ndarray | None = None  # [Hn,Wn,3] float32 in [0,1] (0.5, 0.5, 1: the face's own normal)
    metallic: float = 0.0
    roughness: float = 1.0
    quad_pairs: np.ndarray | None = None  # [Q,2] triangles to join into quads (backend.mesh.quads), when asked for

    def copy(self, **changes) -> "TexturedMesh":
        return replace(self, **changes)

    @property
    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        return self.vertices.min(0), self.vertices.max(0)


def vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted vertex normals."""
    v = np.asarray(vertices, np.float64)
    tri = v[faces]
    fn = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    n = np.zeros_like(v)
    for k in range(3):
        np.add.at(n, faces[:, k], fn)
    return n / np.linalg.norm(n, axis=1, keepdims=True).clip(1e-12)


def render_textured(vertices: torch.Tensor, faces: torch.Tensor, uv: torch.Tensor, texture: torch.Tensor, c2w,
                    intr: cam.Intrinsics, supersample: int = 2, background: torch.Tensor | None = None,
                    wrap: bool = True) -> torch.Tensor:
    """Render a textured mesh from a Blender-convention camera.

    Returns RGBA [H,W,4] with straight alpha (``background`` None) or RGB
    composited over ``background``. Differentiable with respect to ``texture``;
    anti-aliased by ``supersample`` x ``supersample`` box filtering."""
    ss = max(1, int(supersample))
    k = intr.scaled(intr.width * ss, intr.height * ss)
    r = rasterize_mesh(vertices, faces, c2w, k)
    uvs = interpolate(r, uv, faces)
    rgb = sample_texture(texture, uvs, wrap=wrap)
    a = r.mask.to(rgb.dtype)[..., None]
    rgb = rgb * a  # premultiplied
    if ss > 1:
        rgb = F.avg_pool2d(rgb.permute(2, 0, 1)[None], ss)[0].permute(1, 2, 0)
        a = F.avg_pool2d(a.permute(2, 0, 1)[None], ss)[0].permute(1, 2, 0)
    if background is not None:
        return rgb + background.reshape(1, 1, -1) * (1 - a)
    return torch.cat([rgb / a.clamp_min(1e-6), a], -1)


def render_mesh_rgba(mesh: TexturedMesh, c2w, intr: cam.Intrinsics, supersample: int = 2) -> np.ndarray:
    """Convenience: numpy RGBA render of a :class:`TexturedMesh`."""
    with torch.no_grad():
        out = render_textured(torch.as_tensor(mesh.vertices, dtype=torch.float32), torch.as_tensor(mesh.faces),
                              torch.as_tensor(mesh.uv, dtype=torch.float32),
                              torch.as_tensor(mesh.texture, dtype=torch.float32), c2w, intr, supersample)
    return out.clamp(0, 1).numpy()
