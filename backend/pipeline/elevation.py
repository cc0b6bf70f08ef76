"""The reference's elevation, estimated from the novel-view model itself.

Zero-1-to-3 is told relative poses; it makes each view from the elevation the reference
was really seen from, whatever the pipeline assumes. Views it makes at the same relative
elevation and a few azimuths apart therefore lie on one circle of the true elevation, and
the epipolar geometry between two of them depends on that elevation alone: the azimuth
step turns the camera about the world's up axis, which the camera sees tilted by the
elevation. So (One-2-3-45's idea, with our own cost): make a few such probe views, match
SIFT features between every pair, and choose the candidate elevation whose camera pairs
explain the matches best (the smallest robust Sampson distance). The confidence compares
that cost with the cost of the other candidates: near 0 when no candidate stands out
(features matched at random, a symmetric object), near 1 when one does.

Plain functions of arrays; the generator is passed in (the pipeline's contract,
:class:`backend.pipeline.novel_views.NovelViewGenerator`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import combinations

import numpy as np

from ..common import cameras as cam
from ..common.progress import NULL, Progress
from .novel_views import FOV_DEG, RADIUS

PROBE_AZIMUTHS = (-50.0, -25.0, 25.0, 50.0)  # relative to the reference, at its own elevation
CANDIDATES = tuple(float(e) for e in range(-30, 76))  # degrees, 1 apart
MIN_MATCHES = 24  # fewer matches than this in all: no estimate
MIN_CONFIDENCE = 0.25  # below this the pipeline falls back to 0 degrees


@dataclass
class ElevationEstimate:
    degrees: float
    confidence: float  # 0..1
    matches: int  # feature matches used, over all view pairs
    used: bool  # the estimate was confident enough to be used (else ``fallback``)
    fallback: float = 0.0
    costs: dict = field(default_factory=dict)  # candidate -> cost (every 5 degrees, for the report)

    @property
    def value(self) -> float:
        """The elevation to use: the estimate, or the fallback when it is not confident."""
        return self.degrees if self.used else self.fallback

    def to_dict(self) -> dict:
        return {"degrees": round(self.degrees, 1), "confidence": round(self.confidence, 3), "matches": self.matches,
                "used": self.used, "value": round(self.value, 1), "method": "probe views, SIFT, epipolar fit"}


def _features(rgba: np.ndarray):
    """SIFT keypoints (x, y in pixels, centres at +0.5) and descriptors on the object."""
    from skimage.color import rgb2gray
    from skimage.feature import SIFT

    rgb = rgba[..., :3] if rgba.shape[-1] == 3 else rgba[..., :3] * rgba[..., 3:4] + (1 - rgba[..., 3:4])
    gray = rgb2gray(np.clip(rgb, 0, 1))
    sift = SIFT()
    try:
        sift.detect_and_extract(gray)
    except RuntimeError:  # nothing to detect (a flat image)
        return np.zeros((0, 2)), np.zeros((0, 128), np.uint8)
    rc = sift.keypoints.astype(np.float64)
    if rgba.shape[-1] == 4:
        a = rgba[..., 3]
        r = np.clip(rc[:, 0].round().astype(int), 0, a.shape[0] - 1)
        c = np.clip(rc[:, 1].round().astype(int), 0, a.shape[1] - 1)
        keep = a[r, c] > 0.5
        rc, desc = rc[keep], sift.descriptors[keep]
    else:
        desc = sift.descriptors
    return np.stack([rc[:, 1] + 0.5, rc[:, 0] + 0.5], 1), desc


def _matches(fa, fb) -> tuple[np.ndarray, np.ndarray]:
    from skimage.feature import match_descriptors

    (pa, da), (pb, db) = fa, fb
    if len(pa) < 2 or len(pb) < 2:
        return np.zeros((0, 2)), np.zeros((0, 2))
    m = match_descriptors(da, db, cross_check=True, max_ratio=0.8)
    return pa[m[:, 0]], pb[m[:, 1]]


def fundamental(c2w_a: np.ndarray, c2w_b: np.ndarray, K: np.ndarray) -> np.ndarray:
    """F with x_b^T F x_a = 0 for pixels of camera a and b (OpenCV pixel frame)."""
    wa, wb = cam.c2w_to_viewmat(c2w_a), cam.c2w_to_viewmat(c2w_b)
    R = wb[:3, :3] @ wa[:3, :3].T
    t = wb[:3, 3] - R @ wa[:3, 3]
    tx = np.array([[0, -t[2], t[1]], [t[2], 0, -t[0]], [-t[1], t[0], 0]])
    Ki = np.linalg.inv(K)
    return Ki.T @ tx @ R @ Ki


def sampson(F: np.ndarray, xa: np.ndarray, xb: np.ndarray) -> np.ndarray:
    """Squared Sampson distances (pixels^2) of matches ``xa`` -> ``xb`` [N,2] under ``F``."""
    ha = np.concatenate([xa, np.ones((len(xa), 1))], 1)
    hb = np.concatenate([xb, np.ones((len(xb), 1))], 1)
    Fa = ha @ F.T  # F x_a
    Fb = hb @ F  # F^T x_b
    num = np.einsum("ij,ij->i", hb, Fa) ** 2
    den = Fa[:, 0] ** 2 + Fa[:, 1] ** 2 + Fb[:, 0] ** 2 + Fb[:, 1] ** 2
    return num / np.maximum(den, 1e-12)


def elevation_cost(pairs, azimuths, K: np.ndarray, elevation: float, tau_px: float = 2.0) -> float:
    """Mean truncated squared Sampson distance of every pair's matches if the probe views were
    taken at ``elevation``."""
    total, n = 0.0, 0
    c2w = {az: cam.spherical_to_c2w(elevation, az % 360.0, RADIUS) for az in azimuths}
    for (a, b), (xa, xb) in pairs.items():
        if len(xa) == 0:
            continue
        d = sampson(fundamental(c2w[a], c2w[b], K), xa, xb)
        total += float(np.minimum(d, tau_px ** 2).sum())
        n += len(d)
    return total / n if n else float("inf")


def estimate_from_views(views: np.ndarray, azimuths, fov_deg: float = FOV_DEG, candidates=CANDIDATES,
                        min_confidence: float = MIN_CONFIDENCE, fallback: float = 0.0) -> ElevationEstimate:
    """The elevation under which probe ``views`` [N,H,W,3|4], made at the reference's elevation and
    ``azimuths`` (degrees, relative), agree best."""
    h, w = views.shape[1:3]
    K = cam.Intrinsics.from_fov(math.radians(fov_deg), w, h).K()
    feats = [_features(v) for v in views]
    pairs = {(azimuths[i], azimuths[j]): _matches(feats[i], feats[j]) for i, j in combinations(range(len(views)), 2)}
    n = sum(len(x[0]) for x in pairs.values())
    if n < MIN_MATCHES:
        return ElevationEstimate(fallback, 0.0, n, False, fallback)
    costs = np.array([elevation_cost(pairs, azimuths, K, e) for e in candidates])
    i = int(np.argmin(costs))
    best = float(candidates[i])
    if 0 < i < len(candidates) - 1:  # a parabola through the minimum and its neighbours
        c0, c1, c2 = costs[i - 1], costs[i], costs[i + 1]
        den = c0 - 2 * c1 + c2
        if den > 1e-12:
            best += float(np.clip(0.5 * (c0 - c2) / den, -0.5, 0.5)) * (candidates[i + 1] - candidates[i])
    far = costs[np.abs(np.asarray(candidates) - candidates[i]) > 15]
    ref = float(np.median(far)) if len(far) else float(costs.max())
    confidence = float(np.clip(1.0 - costs[i] / max(ref, 1e-12), 0.0, 1.0))
    report = {float(e): round(float(c), 3) for e, c in zip(candidates, costs) if float(e) % 5 == 0}
    return ElevationEstimate(best, confidence, n, confidence >= min_confidence, fallback, report)


def estimate_elevation(reference: np.ndarray, generator, progress: Progress = NULL, azimuths=PROBE_AZIMUTHS,
                       min_confidence: float = MIN_CONFIDENCE, fallback: float = 0.0) -> ElevationEstimate:
    """Make probe views of the framed ``reference`` with ``generator`` and estimate the elevation
    it was seen from (:func:`estimate_from_views`)."""
    poses = [(0.0, az % 360.0, 0.0) for az in azimuths]
    views = generator(reference, 0.0, poses, progress)
    return estimate_from_views(np.asarray(views), list(azimuths), min_confidence=min_confidence, fallback=fallback)
