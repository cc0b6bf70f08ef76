"""Where the object is: bounds from the cameras and masks, and a visual-hull
initialisation of the Gaussians (points on the carved hull's surface, coloured
from the views that face them)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..common import cameras as cam
from ..common.dataset import PosedViews


@dataclass
class Bounds:
    center: np.ndarray  # [3]
    radius: float  # half-size of the cube that holds the object

    @property
    def lo(self) -> np.ndarray:
        return self.center - self.radius

    @property
    def hi(self) -> np.ndarray:
        return self.center + self.radius


def axes_convergence(c2w: np.ndarray) -> np.ndarray:
    """The point nearest (least squares) to every camera's optical axis."""
    A = np.zeros((3, 3))
    b = np.zeros(3)
    for M in c2w:
        o = M[:3, 3]
        d = -M[:3, 2] / np.linalg.norm(M[:3, 2])
        P = np.eye(3) - np.outer(d, d)
        A += P
        b += P @ o
    if np.linalg.cond(A) > 1e8:  # parallel axes: fall back to the mean position ahead of the cameras
        return np.mean([M[:3, 3] - M[:3, 2] * 2.0 for M in c2w], 0)
    return np.linalg.solve(A, b)


def estimate_bounds(views: PosedViews, alpha_threshold: float = 0.5) -> Bounds:
    """A cube that holds the object: centred where the cameras look, sized by the
    widest angle the masks cover as seen from each camera."""
    center = axes_convergence(views.c2w)
    radius = 0.0
    for img, M, k in zip(views.images, views.c2w, views.intrinsics):
        ys, xs = np.nonzero(img[..., 3] > alpha_threshold)
        if len(xs) == 0:
            continue
        uv_c, z_c = cam.project(center[None], M, k)
        if z_c[0] <= 0:
            continue
        # farthest mask pixel from the projected centre, as an angle -> distance at the centre's depth
        du = np.abs(np.concatenate([xs + 0.5 - uv_c[0, 0], [0]])).max() + 1.0
        dv = np.abs(np.concatenate([ys + 0.5 - uv_c[0, 1], [0]])).max() + 1.0
        radius = max(radius, z_c[0] * max(du / k.fx, dv / k.fy))
    if radius <= 0:
        dist = np.median(np.linalg.norm(views.c2w[:, :3, 3] - center, axis=1))
        radius = 0.5 * dist
    return Bounds(center, float(radius) * 1.1)


def inside_hull(points: np.ndarray, views: PosedViews, consistency: float = 0.9, alpha_threshold: float = 0.5,
                dilate: int = 1, binding: tuple[int, ...] = ()) -> np.ndarray:
    """Visual-hull test of world points: inside when they project into the
    (slightly dilated) mask in at least ``consistency`` of the views that see them,
    and into the mask of every view in ``binding`` (views known to be right and to frame
    the whole object, such as the user's own reference among generated ones: a point
    outside their frame is outside the object too)."""
    from scipy.ndimage import binary_dilation

    inside = np.zeros(len(points), np.int32)
    seen = np.zeros(len(points), np.int32)
    vetoed = np.zeros(len(points), bool)
    for i, (img, M, k) in enumerate(zip(views.images, views.c2w, views.intrinsics)):
        mask = img[..., 3] > alpha_threshold
        if dilate:
            mask = binary_dilation(mask, iterations=dilate)
        uv, z = cam.project(points, M, k)
        x = np.floor(uv[:, 0]).astype(np.int64)
        y = np.floor(uv[:, 1]).astype(np.int64)
        ok = (z > 0) & (x >= 0) & (x < k.width) & (y >= 0) & (y < k.height)
        seen += ok
        hit = np.zeros(len(points), bool)
        hit[ok] = mask[y[ok], x[ok]]
        inside += hit
        if i in binding:
            vetoed |= ~hit
    return (seen > 0) & (inside >= np.ceil(consistency * seen)) & ~vetoed


def carve(views: PosedViews, bounds: Bounds, resolution: int = 64, consistency: float = 0.9,
          alpha_threshold: float = 0.5, dilate: int = 1) -> np.ndarray:
    """Visual hull on a ``resolution``^3 grid over ``bounds`` (see :func:`inside_hull`)."""
    lin = np.linspace(-1, 1, resolution) * bounds.radius * (1 - 1 / resolution)
    gx, gy, gz = np.meshgrid(lin, lin, lin, indexing="ij")
    pts = np.stack([gx, gy, gz], -1).reshape(-1, 3) + bounds.center
    occ = inside_hull(pts, views, consistency, alpha_threshold, dilate)
    return occ.reshape(resolution, resolution, resolution)


def hull_points(views: PosedViews, bounds: Bounds, n_points: int, rng: np.random.Generator,
                resolution: int = 64, consistency: float = 0.9) -> tuple[np.ndarray, np.ndarray, float]:
    """Points on the visual hull's surface with colours from the views facing them.
    Returns (points [n,3], rgb [n,3], voxel size)."""
    from scipy.ndimage import binary_erosion, gaussian_filter

    occ = carve(views, bounds, resolution, consistency)
    voxel = 2 * bounds.radius / resolution
    if occ.sum() < 8:
        # nothing carved (masks inconsistent with the cameras): a ball in the bounds
        d = rng.normal(size=(n_points, 3))
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        pts = bounds.center + d * bounds.radius * 0.5 * rng.uniform(0.3, 1.0, (n_points, 1))
        return pts, np.full((n_points, 3), 0.5), voxel
    surface = occ & ~binary_erosion(occ)
    idx = np.argwhere(surface)
    choice = rng.choice(len(idx), size=n_points, replace=len(idx) < n_points)
    lin = np.linspace(-1, 1, resolution) * bounds.radius * (1 - 1 / resolution)
    pts = lin[idx[choice]] + bounds.center + rng.uniform(-0.5, 0.5, (n_points, 3)) * voxel
    # outward normals from the smoothed occupancy gradient
    field = gaussian_filter(occ.astype(np.float32), 1.5)
    grad = np.stack(np.gradient(field), -1)[tuple(idx[choice].T)]
    normals = -grad / np.linalg.norm(grad, axis=1, keepdims=True).clip(1e-8)
    rgb = np.zeros((n_points, 3))
    wsum = np.zeros(n_points)
    for img, M, k in zip(views.images, views.c2w, views.intrinsics):
        uv, z = cam.project(pts, M, k)
        x = np.clip(np.floor(uv[:, 0]).astype(np.int64), 0, k.width - 1)
        y = np.clip(np.floor(uv[:, 1]).astype(np.int64), 0, k.height - 1)
        to_cam = M[:3, 3] - pts
        to_cam /= np.linalg.norm(to_cam, axis=1, keepdims=True)
        w = np.clip((normals * to_cam).sum(1), 0, None) ** 4 * img[y, x, 3] * (z > 0)
        rgb += w[:, None] * img[y, x, :3]
        wsum += w
    rgb = np.where(wsum[:, None] > 1e-6, rgb / wsum.clip(1e-6)[:, None], 0.5)
    return pts, rgb, voxel


def init_gaussians(views: PosedViews, n_points: int = 6000, seed: int = 0, resolution: int = 64,
                   consistency: float = 0.9):
    from .model import Gaussians

    rng = np.random.default_rng(seed)
    bounds = estimate_bounds(views)
    pts, rgb, voxel = hull_points(views, bounds, n_points, rng, resolution, consistency)
    g = Gaussians.create(torch.tensor(pts, dtype=torch.float32), torch.tensor(rgb, dtype=torch.float32),
                         voxel * 0.6, opacity=0.5)
    return g, bounds
