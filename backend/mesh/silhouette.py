"""A mesh's outline held to a view's mask, to a fraction of a pixel.

The visual hull bounds the surface only to its dilation and the grid's voxel (about a
pixel or two of the reference at the reconstruction's size), so a mesh can reach a pixel
past the outline of the one image known to be right, the user's reference: a rim of
surface where the photo shows background, the worst error its view has. :func:`snap_to_mask`
moves the vertices that project outside the mask onto its outline (the mask's 0.5 contour
of the bilinearly interpolated alpha, found at ``upsample`` times the mask's resolution),
each perpendicular to its viewing ray, at its own depth.
"""

from __future__ import annotations

import numpy as np

from ..common import cameras as cam


def outside_distance(alpha: np.ndarray, upsample: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """For each point of a grid ``upsample`` times finer than ``alpha`` [H,W]: its distance (in
    ``alpha``'s pixels) to the nearest point inside the mask (alpha > 0.5, bilinear), 0 inside,
    and that nearest point's pixel coordinates [...,2] (x, y; pixel centres at +0.5). An empty
    mask: every distance is infinite."""
    from scipy.ndimage import distance_transform_edt, map_coordinates

    h, w = alpha.shape
    u = int(upsample)
    ys = (np.arange(h * u) + 0.5) / u - 0.5  # fine pixel centres, in alpha's index space
    xs = (np.arange(w * u) + 0.5) / u - 0.5
    gy, gx = np.meshgrid(ys, xs, indexing="ij")
    fine = map_coordinates(np.asarray(alpha, np.float32), [gy, gx], order=1, mode="nearest") > 0.5
    if not fine.any():
        return np.full(fine.shape, np.inf), np.zeros(fine.shape + (2,))
    dist, idx = distance_transform_edt(~fine, return_indices=True)
    nearest = np.stack([(idx[1] + 0.5) / u, (idx[0] + 0.5) / u], -1)
    return dist / u, nearest


def snap_to_mask(vertices: np.ndarray, alpha: np.ndarray, c2w: np.ndarray, intr: cam.Intrinsics,
                 max_px: float = 3.0, upsample: int = 4) -> tuple[np.ndarray, int]:
    """Vertices that project outside the mask of ``alpha`` (the view's [H,W] alpha, at
    ``intr``'s size) by at most ``max_px`` pixels, moved at their depth onto the mask's outline;
    farther ones (not this view's business: a mask that misses a part) and those behind the
    camera stay. Returns (vertices, how many moved)."""
    v = np.asarray(vertices, np.float64)
    uv, z = cam.project(v, c2w, intr)
    dist, nearest = outside_distance(alpha, upsample)
    hh, ww = dist.shape
    fx = np.clip(np.floor(uv[:, 0] * upsample).astype(np.int64), 0, ww - 1)
    fy = np.clip(np.floor(uv[:, 1] * upsample).astype(np.int64), 0, hh - 1)
    inside_frame = (uv[:, 0] >= 0) & (uv[:, 0] < intr.width) & (uv[:, 1] >= 0) & (uv[:, 1] < intr.height)
    d = np.where(inside_frame, dist[fy, fx], np.inf)
    move = (z > 0) & (d > 0) & (d <= max_px)
    if not move.any():
        return v.copy(), 0
    target = nearest[fy[move], fx[move]]
    zm = z[move]
    p_cam = np.stack([(target[:, 0] - intr.cx) * zm / intr.fx, (target[:, 1] - intr.cy) * zm / intr.fy, zm], -1)
    vm = cam.c2w_to_viewmat(c2w)
    out = v.copy()
    out[move] = (p_cam - vm[:3, 3]) @ vm[:3, :3]  # the inverse of project's rigid part
    return out, int(move.sum())
