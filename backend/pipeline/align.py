"""Pose registration of a sampled prior's answers.

A prior like Zero-1-to-3 does not answer exactly for the camera it is asked about: each
sample is a view from a few degrees off, a little nearer or farther, and the error has a
systematic part (its views sit a little higher than asked). Score distillation that takes
those answers at face value pulls every render toward a differently misplaced target; the
average of such targets is a blurred object, and the systematic part tilts it.

:class:`PoseAligner` registers each answer to the render it was asked about before the
prior's gradient is formed. The render's expected depth turns a small change of the
camera (azimuth and elevation around the object's centre, log of the distance) into a
per-pixel image motion (:func:`pose_flows`); Gauss-Newton on blurred images finds the
camera change that best explains the answer as a view of the current object, and the
answer is warped back to the asked camera (:func:`register`). What is left is what the
prior disagrees with: detail, colour, an unseen side. A running mean of the accepted
changes starts the next registration, so a systematic error is found once and then only
refined. A registration that leaves 97 % of the residual or more is dropped (``accept``).

Plain tensors in and out: no model, no renderer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..common import cameras as cam
from ..common.metrics import gaussian_blur

PARAMS = ("azimuth_deg", "elevation_deg", "log_distance")
_STEPS = (0.5, 0.5, 0.005)  # finite-difference steps of the three parameters


def pose_flows(depth: torch.Tensor, views: Sequence, center) -> torch.Tensor:
    """Image motion [B,3,H,W,2] (pixels per unit of each of :data:`PARAMS`) of the surface
    seen at each pixel, for views (``elevation``, ``azimuth``, ``radius``, ``intr``, ``c2w``
    around ``center``) whose expected depth along the view is ``depth`` [B,H,W]."""
    b, h, w = depth.shape
    dev, dt = depth.device, depth.dtype
    jj, ii = torch.meshgrid(torch.arange(w, device=dev, dtype=dt) + 0.5, torch.arange(h, device=dev, dtype=dt) + 0.5,
                            indexing="xy")
    out = torch.zeros(b, 3, h, w, 2, device=dev, dtype=dt)
    center = np.asarray(center, np.float64)
    for k, v in enumerate(views):
        K = v.intr
        z = depth[k]
        x_cv = torch.stack([(jj - K.cx) / K.fx * z, (ii - K.cy) / K.fy * z, z, torch.ones_like(z)], -1)
        vm = torch.as_tensor(cam.c2w_to_viewmat(v.c2w), device=dev, dtype=dt)
        world = x_cv.reshape(-1, 4) @ torch.linalg.inv(vm).T
        def seen_from(el, az, r):
            vm2 = torch.as_tensor(cam.c2w_to_viewmat(cam.spherical_to_c2w(el, az, r, center)), device=dev, dtype=dt)
            q = world @ vm2.T
            zq = q[:, 2].clamp_min(1e-6)
            return torch.stack([K.fx * q[:, 0] / zq + K.cx, K.fy * q[:, 1] / zq + K.cy], -1).reshape(h, w, 2)

        # differences of two cameras on the sphere: a view that does not look exactly at the centre moves alike
        base = seen_from(v.elevation, v.azimuth, v.radius)
        for p, step in enumerate(_STEPS):
            el, az, r = v.elevation, v.azimuth, v.radius
            if p == 0:
                az = az + step
            elif p == 1:
                el = el + step
            else:
                r = r * math.exp(step)
            out[k, p] = (seen_from(el, az, r) - base) / step
    return out


def warp(images: torch.Tensor, flows: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """``images`` [B,C,h,w] sampled at each pixel plus ``flows`` [B,3,h,w,2] times ``eps`` [B,3]:
    the answer for a camera moved by ``eps`` brought back to the asked camera."""
    b, _, h, w = images.shape
    d = (flows * eps[:, :, None, None, None]).sum(1)  # [B,h,w,2] pixels
    jj, ii = torch.meshgrid(torch.arange(w, device=images.device, dtype=images.dtype) + 0.5,
                            torch.arange(h, device=images.device, dtype=images.dtype) + 0.5, indexing="xy")
    gx = 2 * (jj + d[..., 0]) / w - 1
    gy = 2 * (ii + d[..., 1]) / h - 1
    return F.grid_sample(images, torch.stack([gx, gy], -1), mode="bilinear", padding_mode="border", align_corners=False)


def extend(flows: torch.Tensor, mask: torch.Tensor, pixels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Carry the motion [B,3,h,w,2] of the surface ``pixels`` beyond the silhouette ``mask``
    [B,h,w] (the mean of the neighbours that have one, ring by ring): the outline moves with
    the surface next to it. Returns the flows and where they are now defined."""
    b, _, h, w, _ = flows.shape
    f = flows.permute(0, 1, 4, 2, 3).reshape(b, 6, h, w) * mask[:, None]
    m = mask[:, None].to(flows.dtype)
    for _ in range(pixels):
        fs = F.avg_pool2d(f, 3, 1, 1, count_include_pad=False)
        ms = F.avg_pool2d(m, 3, 1, 1, count_include_pad=False)
        new = (ms > 0) & (m == 0)
        f = torch.where(new, fs / ms.clamp_min(1e-12), f)
        m = torch.where(new, torch.ones_like(m), m)
    return f.reshape(b, 3, 2, h, w).permute(0, 1, 3, 4, 2), m[:, 0] > 0


def register(target: torch.Tensor, current: torch.Tensor, flows: torch.Tensor, mask: torch.Tensor,
             init: torch.Tensor, iters: int = 4, sigma: float = 1.5, max_deg: float = 12.0,
             max_log_distance: float = 0.2, accept: float = 0.97):
    """Find ``eps`` [B,3] such that ``target`` sampled along ``flows`` x ``eps`` matches
    ``current`` on ``mask`` [B,h,w]; Gauss-Newton from ``init`` [B,3] on images blurred by
    ``sigma`` pixels. Returns (the warped target, eps, accepted [B] bool, the residual's
    ratio to the unregistered one [B]): a registration whose ratio is not below ``accept`` is
    dropped (eps 0, the target unchanged)."""
    tb, cb = gaussian_blur(target, sigma), gaussian_blur(current, sigma)
    f, reach = extend(flows, mask, max(1, int(round(2 * sigma))))  # no motion far from the surface
    m = reach[:, None].to(target.dtype)
    lim = torch.tensor([max_deg, max_deg, max_log_distance], device=target.device, dtype=target.dtype)
    eps = init.clone().clamp(-lim, lim)

    def energy(e):
        return (((warp(tb, f, e) - cb) * m) ** 2).flatten(1).sum(1)

    e0 = energy(torch.zeros_like(eps))
    for _ in range(iters):
        wt = warp(tb, f, eps)
        gx = torch.zeros_like(wt)
        gy = torch.zeros_like(wt)
        gx[..., 1:-1] = 0.5 * (wt[..., 2:] - wt[..., :-2])
        gy[..., 1:-1, :] = 0.5 * (wt[..., 2:, :] - wt[..., :-2, :])
        J = gx[:, None] * f[..., 0][:, :, None] + gy[:, None] * f[..., 1][:, :, None]  # [B,3,C,h,w]
        J = J * m[:, None]
        r = (cb - wt) * m
        A = torch.einsum("bpchw,bqchw->bpq", J, J)
        g = torch.einsum("bpchw,bchw->bp", J, r)
        damp = 1e-3 * torch.diagonal(A, dim1=1, dim2=2).clamp_min(1e-12)
        A = A + torch.diag_embed(damp)
        eps = (eps + torch.linalg.solve(A, g[..., None])[..., 0]).clamp(-lim, lim)
    ratio = torch.where(e0 > 1e-12, energy(torch.nan_to_num(eps)) / e0.clamp_min(1e-12), torch.ones_like(e0))
    ok = torch.isfinite(eps).all(1) & (ratio < accept)
    eps = torch.where(ok[:, None], torch.nan_to_num(eps), torch.zeros_like(eps))
    return warp(target, f, eps), eps, ok, ratio


@dataclass
class PoseAligner:
    """Registers a prior's answers (:func:`register`) for the views of one batch of renders;
    keeps a running mean of the accepted camera changes to start from (``momentum``), and
    counts."""

    center: np.ndarray
    max_deg: float = 12.0
    momentum: float = 0.9
    sigma_px: float = 1.5  # blur of the registration, in pixels of a 96-pixel render
    mean: np.ndarray = field(default_factory=lambda: np.zeros(3))
    accept: float = 0.97  # largest residual ratio (registered / not) of a registration that is kept
    ratios: list = field(default_factory=list)  # every registration's residual ratio
    calls: int = 0
    accepted: int = 0
    _flows: torch.Tensor | None = None
    _mask: torch.Tensor | None = None

    def set_renders(self, depth: torch.Tensor, alpha: torch.Tensor, views: Sequence) -> None:
        """The renders the prior is about to see: expected depth and alpha [B,H,W]."""
        with torch.no_grad():
            valid = alpha > 0.5
            d = torch.where(valid, depth, torch.zeros_like(depth))
            self._flows = pose_flows(d.detach(), views, self.center)
            self._mask = valid

    @torch.no_grad()
    def __call__(self, target: torch.Tensor, current: torch.Tensor, idx: Sequence[int]) -> torch.Tensor:
        """``target`` and ``current`` [B,C,h,w] in any image-like space (a VAE's latents too)
        for the renders ``idx`` of the last :meth:`set_renders`."""
        if self._flows is None:
            return target
        h, w = target.shape[-2:]
        fl, mk = self._flows[list(idx)], self._mask[list(idx)]
        H = fl.shape[2]
        if (h, w) != tuple(fl.shape[2:4]):
            b = fl.shape[0]
            fl = F.interpolate(fl.permute(0, 1, 4, 2, 3).reshape(b, 6, *fl.shape[2:4]), (h, w), mode="bilinear",
                               align_corners=False).reshape(b, 3, 2, h, w).permute(0, 1, 3, 4, 2) * (h / H)
            mk = F.interpolate(mk[:, None].float(), (h, w), mode="area")[:, 0] > 0.5
        init = torch.as_tensor(self.mean, dtype=target.dtype, device=target.device).expand(len(fl), 3)
        out, eps, ok, ratio = register(target, current.detach(), fl.to(target), mk, init, sigma=self.sigma_px * h / 96,
                                       max_deg=self.max_deg, accept=self.accept)
        self.calls += len(ok)
        self.ratios += ratio.cpu().tolist()
        for e in eps[ok].cpu().numpy().astype(np.float64):
            self.mean = self.momentum * self.mean + (1 - self.momentum) * e
            self.accepted += 1
        return out

    def summary(self) -> dict:
        out = {"calls": self.calls, "accepted": self.accepted, **{p: round(float(x), 4) for p, x in zip(PARAMS, self.mean)}}
        if self.ratios:
            out["residual_ratio"] = [round(float(q), 3) for q in np.quantile(self.ratios, [0.1, 0.5, 0.9])]
        return out
