"""Image and geometry metrics, and the SSIM used as a training loss.

PSNR follows the project's rule: over the pixels that the render *or* the
truth covers, both composited on white, so that background never flatters a
result.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def _gauss_window(size: int = 11, sigma: float = 1.5, device=None, dtype=torch.float32) -> torch.Tensor:
    x = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    w = torch.exp(-(x * x) / (2 * sigma * sigma))
    return w / w.sum()


def gaussian_blur(x: torch.Tensor, sigma: float, size: int | None = None) -> torch.Tensor:
    """Separable Gaussian blur of images [B,C,H,W] (window ``size``, default 2 ceil(2.5 sigma) + 1;
    borders reflected)."""
    if size is None:
        size = 2 * max(1, math.ceil(2.5 * sigma)) + 1
    C = x.shape[1]
    w = _gauss_window(size, sigma, x.device, x.dtype)
    pad = size // 2
    x = F.conv2d(F.pad(x, (pad, pad, 0, 0), mode="reflect"), w.reshape(1, 1, 1, size).expand(C, 1, 1, size), groups=C)
    return F.conv2d(F.pad(x, (0, 0, pad, pad), mode="reflect"), w.reshape(1, 1, size, 1).expand(C, 1, size, 1), groups=C)


def ssim(a: torch.Tensor, b: torch.Tensor, size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Mean SSIM of images [B,C,H,W] in [0,1] (Gaussian window, as in 3DGS)."""

    def blur(x):
        return gaussian_blur(x, sigma, size)

    mu_a, mu_b = blur(a), blur(b)
    s_aa = blur(a * a) - mu_a * mu_a
    s_bb = blur(b * b) - mu_b * mu_b
    s_ab = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    m = ((2 * mu_a * mu_b + c1) * (2 * s_ab + c2)) / ((mu_a * mu_a + mu_b * mu_b + c1) * (s_aa + s_bb + c2))
    return m.mean()


def composite_white(rgba: np.ndarray) -> np.ndarray:
    rgba = np.asarray(rgba, np.float64)
    return rgba[..., :3] * rgba[..., 3:4] + (1.0 - rgba[..., 3:4])


def psnr_union(pred_rgba: np.ndarray, true_rgba: np.ndarray, alpha_threshold: float = 0.5) -> float:
    """PSNR over pixels covered by either image (alpha > threshold), both on white."""
    p, t = composite_white(pred_rgba), composite_white(true_rgba)
    mask = (np.asarray(pred_rgba)[..., 3] > alpha_threshold) | (np.asarray(true_rgba)[..., 3] > alpha_threshold)
    if not mask.any():
        return float("inf")
    mse = float(((p - t) ** 2)[mask].mean())
    return float("inf") if mse == 0 else 10.0 * math.log10(1.0 / mse)


def mask_iou(pred_alpha: np.ndarray, true_alpha: np.ndarray, threshold: float = 0.5) -> float:
    a = np.asarray(pred_alpha) > threshold
    b = np.asarray(true_alpha) > threshold
    union = (a | b).sum()
    return 1.0 if union == 0 else float((a & b).sum() / union)


def sample_surface(vertices: np.ndarray, faces: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Area-uniform random points on a triangle mesh."""
    rng = np.random.default_rng(seed)
    v = np.asarray(vertices, np.float64)
    f = np.asarray(faces, np.int64)
    tri = v[f]
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    if area.sum() <= 0:
        raise ValueError("mesh has no area")
    idx = rng.choice(len(f), size=n, p=area / area.sum())
    r1, r2 = rng.random(n), rng.random(n)
    s = np.sqrt(r1)
    u, w = 1 - s, s * (1 - r2)
    vv = s * r2
    return tri[idx, 0] * u[:, None] + tri[idx, 1] * w[:, None] + tri[idx, 2] * vv[:, None]


def chamfer_fscore(pred_v, pred_f, true_v, true_f, n: int = 100_000, tau: float = 0.01, seed: int = 0) -> dict:
    """Symmetric Chamfer distance (mean of both directions' mean nearest distances)
    and F-score at ``tau``, both relative to the truth's bounding-box diagonal."""
    from scipy.spatial import cKDTree

    diag = float(np.linalg.norm(np.ptp(np.asarray(true_v), axis=0)))
    a = sample_surface(pred_v, pred_f, n, seed)
    b = sample_surface(true_v, true_f, n, seed + 1)
    d_ab, _ = cKDTree(b).query(a, workers=-1)
    d_ba, _ = cKDTree(a).query(b, workers=-1)
    d_ab /= diag
    d_ba /= diag
    precision = float((d_ab < tau).mean())
    recall = float((d_ba < tau).mean())
    f = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return {
        "chamfer": float(0.5 * (d_ab.mean() + d_ba.mean())),
        "fscore": f,
        "precision": precision,
        "recall": recall,
        "diagonal": diag,
    }


def seam_pixels(rgba: np.ndarray, colours: np.ndarray, tolerance: float = 0.1, erode: int = 1) -> int:
    """Pixels inside a render's silhouette (alpha 1, ``erode`` pixels in from its edge) whose
    colour lies within ``tolerance`` (max over channels) of one of ``colours`` [K,3]: the
    background or the black of an unpadded texture showing through a UV seam."""
    from scipy.ndimage import binary_erosion

    inside = rgba[..., 3] > 0.999
    if erode:
        inside = binary_erosion(inside, iterations=erode)
    px = rgba[inside][:, :3]
    near = np.zeros(len(px), bool)
    for c in np.asarray(colours, np.float32).reshape(-1, 3):
        near |= np.abs(px - c).max(1) <= tolerance
    return int(near.sum())
