"""UV unwrapping with xatlas."""

from __future__ import annotations

import numpy as np


def unwrap(vertices: np.ndarray, faces: np.ndarray, texture_size: int = 1024, padding: int = 4,
           normals: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """xatlas charts packed for a ``texture_size`` texture with ``padding`` texels between charts.

    Returns (vmapping [V'] index of the original vertex of each new vertex,
    faces [F,3] into the new vertices, uv [V',2] in [0,1] with v up)."""
    import xatlas

    atlas = xatlas.Atlas()
    v = np.ascontiguousarray(vertices, dtype=np.float32)
    f = np.ascontiguousarray(faces, dtype=np.uint32)
    if normals is not None:
        atlas.add_mesh(v, f, np.ascontiguousarray(normals, dtype=np.float32))
    else:
        atlas.add_mesh(v, f)
    chart = xatlas.ChartOptions()
    pack = xatlas.PackOptions()
    pack.resolution = int(texture_size)
    pack.padding = int(padding)
    pack.bilinear = True
    pack.blockAlign = True
    atlas.generate(chart, pack)
    vmapping, indices, uvs = atlas[0]
    return vmapping.astype(np.int64), indices.astype(np.int64), uvs.astype(np.float32)
