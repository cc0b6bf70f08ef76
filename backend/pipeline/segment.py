"""Foreground masks for reference images and generated views.

* An image with a real alpha channel keeps it.
* ``border`` (default, no weights): the background is what the image's border
  shows. Its colour is the median of a 2-pixel frame; pixels within a
  tolerance of it (set from the frame's own spread) that connect to the border
  are background; enclosed holes are filled (a white mug on white keeps its
  inside), specks under 1 % of the largest part are dropped, and the edge is
  softened over a pixel. It suits what the pipeline produces: objects on plain
  backgrounds (the text-to-image prompt asks for one; Zero-1-to-3 renders on
  white).
* ``rembg``: when the optional ``rembg`` package and its weights are
  installed, its U^2-Net matting (better on photos with busy backgrounds).
* ``auto``: ``rembg`` when it works here, else ``border``.

When no background can be found (nothing along the border stands out as
uniform), the whole image is the object; the result says so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

log = logging.getLogger("gen3d.segment")


@dataclass
class Matte:
    rgba: np.ndarray  # [H,W,4] float32, straight alpha
    method: str  # "alpha" | "border" | "rembg" | "none"
    coverage: float  # fraction of the image that is object


def has_alpha(img: np.ndarray) -> bool:
    return img.shape[-1] == 4 and float(img[..., 3].min()) < 0.5 < float(img[..., 3].max())


def border_matte(rgb: np.ndarray, tolerance: float | None = None) -> np.ndarray | None:
    """Alpha from background flood-fill, or None when no uniform border exists."""
    from scipy import ndimage

    h, w = rgb.shape[:2]
    frame = np.concatenate([rgb[:2].reshape(-1, 3), rgb[-2:].reshape(-1, 3), rgb[:, :2].reshape(-1, 3), rgb[:, -2:].reshape(-1, 3)])
    bg = np.median(frame, 0)
    spread = np.median(np.abs(frame - bg).max(-1))
    tol = tolerance if tolerance is not None else float(np.clip(0.06 + 3.0 * spread, 0.06, 0.25))
    dist = np.abs(rgb - bg).max(-1)
    near = dist < tol
    if near[[0, -1], :].mean() < 0.5 and near[:, [0, -1]].mean() < 0.5:
        return None  # the border is not one uniform colour: no background to remove
    labels, _ = ndimage.label(near)
    border_labels = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    background = np.isin(labels, border_labels[border_labels > 0])
    fg = ndimage.binary_fill_holes(~background)
    labels, n = ndimage.label(fg)
    if n == 0:
        return None
    sizes = ndimage.sum(fg, labels, range(1, n + 1))
    keep = np.isin(labels, 1 + np.nonzero(sizes >= 0.01 * sizes.max())[0])
    soft = np.clip((dist - 0.5 * tol) / tol, 0.0, 1.0)  # anti-aliased rim
    edge = keep ^ ndimage.binary_erosion(keep)
    alpha = np.where(edge, np.maximum(soft, 0.5), keep.astype(np.float32))
    return alpha.astype(np.float32)


def _rembg(rgb: np.ndarray) -> np.ndarray | None:
    try:
        import rembg  # optional
    except ImportError:
        return None
    from PIL import Image

    try:
        out = rembg.remove(Image.fromarray((rgb * 255 + 0.5).astype(np.uint8)))
    except Exception as exc:  # noqa: BLE001 - missing weights offline, etc.: fall back
        log.info("rembg unavailable (%s); using the border method", exc)
        return None
    return np.asarray(out, np.float32)[..., 3] / 255.0


def foreground(img: np.ndarray, method: str = "auto") -> Matte:
    """RGBA with the object's alpha, from an RGB or RGBA float image in [0, 1]."""
    img = np.asarray(img, np.float32)
    if img.ndim != 3 or img.shape[-1] not in (3, 4):
        raise ValueError(f"expected an RGB or RGBA image, got shape {img.shape}")
    if has_alpha(img):
        return Matte(img.copy(), "alpha", float((img[..., 3] > 0.5).mean()))
    rgb = img[..., :3]
    alpha = None
    used = "none"
    if method in ("auto", "rembg"):
        alpha = _rembg(rgb)
        used = "rembg" if alpha is not None else used
    if alpha is None and method in ("auto", "border", "rembg"):
        alpha = border_matte(rgb)
        used = "border" if alpha is not None else "none"
    if alpha is None or (alpha > 0.5).mean() < 0.002:
        alpha = np.ones(rgb.shape[:2], np.float32)
        used = "none"
    return Matte(np.concatenate([rgb, alpha[..., None]], -1), used, float((alpha > 0.5).mean()))
