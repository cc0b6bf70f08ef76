"""Text-to-3D by score distillation on Gaussians: DreamFusion's method, DreamGaussian's representation.

No image is made first: Gaussians start as a ball in the canonical rig (object at the origin,
cameras at :data:`backend.pipeline.novel_views.RADIUS`, field of view ``FOV_DEG``) and every step
renders them from ``views_per_step`` random cameras around it (azimuth uniform, elevation in
``elevation_range``), on a white or, with probability ``black_background``, a black background
(DreamGaussian's inverted background: on white alone, Gaussians where there is no object turn white
instead of vanishing), and scores the renders by each guidance through
:func:`backend.pipeline.sds.guidance_loss` (score distillation with an annealed timestep). The text
prior is :class:`backend.pipeline.sds.StableDiffusionGuidance` with view-dependent prompts (front,
side, back, overhead: DreamFusion's answer to the many-faced Janus object); the tests use the oracle
denoiser, which knows a true object.

Anchored on a front view (Magic123's answer to the Janus object, ``reference`` given): every step
also fits the Gaussians' render at the reference camera to that image (the photometric loss of
distillation: L1 + SSIM on a random background, plus alpha against the mask, weight
``reference_weight``), and the caller adds an image prior conditioned on it (Zero-1-to-3) to the
text prior. The text prior says what the object is; the image prior, which knows where its
reference was seen from, says what its back looks like, where a text prior tends to paint a
second front.

Each sampled :class:`backend.pipeline.sds.View` carries its ``background``, so an oracle composites
its truth on the same one. What comes out is Gaussians (:func:`dream_gaussians`) and their own renders
from a fixed rig (:func:`rig_renders`), from which the usual mesh, UV and texture stages take over
(:func:`backend.pipeline.generate.text_to_3d_sds`).

Plain data in and out: guidances and settings; no model is loaded here.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np
import torch

from ..common import cameras as cam
from ..common.dataset import PosedViews
from ..common.progress import NULL, Progress
from ..gaussians.model import Gaussians
from ..gaussians.train import photometric_loss
from .distill import GaussianOptimizer, _render
from .novel_views import FILL, FOV_DEG, RADIUS
from .sds import Guidance, priors_loss, sample_view


@dataclass
class DreamSettings:
    steps: int = 500  # 0: the ball itself (a test of what follows)
    gaussians: int = 3000
    init_radius: float = 0.5  # of the ball, as a fraction of the reference framing's object radius
    init_opacity: float = 0.3
    render_size: int = 0  # the prior's renders (0: 64 on CPU, 256 on CUDA; the guidance resizes to its own)
    views_per_step: int = 1
    elevation_range: tuple = (-10.0, 45.0)
    black_background: float = 0.5  # chance of a black background instead of white
    # the prior's update rule and schedule (backend.pipeline.sds.guidance_loss)
    update: str = "sds"
    t_range: tuple = (0.02, 0.98)
    t_final_max: float = 0.5
    sdedit_t: tuple = (0.15, 0.45)
    sdedit_steps: int = 4
    # learning rates (means: per unit of object radius, decayed to lr_means_final of it)
    lr_means: float = 5e-3
    lr_means_final: float = 0.1
    lr_scales: float = 5e-3
    lr_quats: float = 1e-3
    lr_opacities: float = 5e-2
    lr_sh0: float = 2e-2
    max_scale: float = 0.15  # largest Gaussian, as a fraction of the object radius
    # anchored on a front view (dream_gaussians' reference): its photometric term, and the image prior's
    # weight beside the text prior's per unit of guidance scale (text_to_3d_sds applies it to the anchor
    # guidances). Measured with back views told "front" and an image prior with Zero-1-to-3-like faults,
    # held-out PSNR. The image prior's weight, test box: none 14.06, 1 15.71, 2 16.46, 4 17.15, 8 17.45 (the
    # true prior 17.75); suzanne / mug at standard with the photo's weight at 1: 1 12.15 / 12.16, 2 13.04 /
    # 12.76, 4 13.30 / 13.24 (told front 9.65 / 9.41). The photo's weight with the image prior's at 4,
    # suzanne / mug (held-out, front view): 0 14.66, 16.79 / 13.12, 13.25; 0.1 14.81, 17.77 / 13.80, 15.93;
    # 0.3 14.43, 17.35 / 13.76, 16.86; 1 13.30, 16.72 / 13.24, 16.50. A strong photo term fits the front at
    # the expense of the rest (Adam follows its steady gradient)
    reference_weight: float = 0.1
    ssim_weight: float = 0.2
    mask_weight: float = 1.0
    anchor_weight: float = 4.0
    seed: int = 0


@dataclass
class DreamReport:
    steps: int
    seconds: float
    prior_views: dict = field(default_factory=dict)  # guidance name -> random views it scored
    losses: list = field(default_factory=list)  # every 10th step: {step, prior, reference}


@dataclass
class DreamResult:
    gaussians: Gaussians
    report: DreamReport


def object_radius() -> float:
    """The radius of an object framed as a reference is (``FILL`` of the frame) at the rig's distance."""
    return RADIUS * math.tan(math.radians(FOV_DEG) / 2) * FILL


def initial_ball(n: int, radius: float, opacity: float = 0.3, seed: int = 0) -> Gaussians:
    """``n`` grey Gaussians uniformly in a ball of ``radius`` around the origin."""
    rng = np.random.default_rng(seed)
    d = rng.normal(size=(n, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True).clip(1e-9)
    pts = d * radius * rng.uniform(0, 1, (n, 1)) ** (1 / 3)
    scale = radius * (4.0 / n) ** (1 / 3)  # about touching neighbours
    return Gaussians.create(torch.tensor(pts, dtype=torch.float32), torch.full((n, 3), 0.5), scale, opacity=opacity)


def dream_gaussians(guidances: Sequence[Guidance], settings: DreamSettings | None = None, device: str = "cpu",
                    progress: Progress = NULL, init: Gaussians | None = None, reference: np.ndarray | None = None,
                    reference_elevation: float = 0.0) -> DreamResult:
    """Score distillation from ``guidances`` on Gaussians in the canonical rig, starting from
    ``init`` or a ball (:func:`initial_ball`). ``reference``: a framed RGBA front view (straight
    alpha, square; :func:`backend.pipeline.novel_views.prepare_reference`) seen from
    ``reference_elevation`` at azimuth 0, fitted at its camera every step."""
    s = settings or DreamSettings()
    if s.update not in ("sds", "sdedit", "csd"):
        raise ValueError(f"unknown update rule {s.update!r}")
    if not guidances:
        raise ValueError("score distillation needs at least one guidance")
    t0 = time.perf_counter()
    dev = torch.device(device)
    rng = np.random.default_rng(s.seed)
    gen = torch.Generator("cpu").manual_seed(s.seed)
    size = s.render_size or (256 if dev.type == "cuda" else 64)
    radius = object_radius()
    g0 = init if init is not None else initial_ball(s.gaussians, s.init_radius * radius, s.init_opacity, s.seed)
    report = DreamReport(s.steps, 0.0, prior_views={g.name: 0 for g in guidances})
    opt = GaussianOptimizer(g0, s, radius, dev)
    center = np.zeros(3)
    K = torch.as_tensor(cam.Intrinsics.from_fov(math.radians(FOV_DEG), size, size).K(), dtype=torch.float32,
                        device=dev)[None]
    ref = None
    if reference is not None:
        ref = _reference_target(reference, size, dev)
        ref_vm = torch.as_tensor(cam.c2w_to_viewmat(cam.spherical_to_c2w(reference_elevation, 0.0, RADIUS)[None]),
                                 dtype=torch.float32, device=dev)
    ref_loss = torch.zeros(())
    for step in range(s.steps):
        frac = step / max(1, s.steps - 1)
        pv = []
        for _ in range(s.views_per_step):
            v = sample_view(rng, center, RADIUS, FOV_DEG, s, size)
            pv.append(replace(v, background=0.0 if rng.uniform() < s.black_background else 1.0))
        vm = torch.as_tensor(cam.c2w_to_viewmat(np.stack([v.c2w for v in pv])), dtype=torch.float32, device=dev)
        bg = torch.tensor([[v.background] * 3 for v in pv], dtype=torch.float32, device=dev)
        colors, _ = _render(opt.params, vm, K.expand(len(pv), -1, -1), size, size, bg)
        prior = priors_loss(guidances, colors.permute(0, 3, 1, 2), pv, frac, s, gen, report.prior_views)
        loss = prior
        if ref is not None and s.reference_weight > 0:
            rbg = torch.rand(1, 3, generator=gen).to(dev)
            rc, ra = _render(opt.params, ref_vm, K, size, size, rbg)
            ref_loss, _ = photometric_loss(rc, ra, ref, rbg, s.ssim_weight, s.mask_weight)
            loss = loss + s.reference_weight * ref_loss
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == s.steps - 1:
            report.losses.append({"step": step, "prior": float(prior.detach()), "reference": float(ref_loss.detach())})
        progress.update((step + 1) / max(1, s.steps), f"step {step + 1}/{s.steps}")
    report.seconds = time.perf_counter() - t0
    return DreamResult(opt.gaussians(), report)


def _reference_target(reference: np.ndarray, size: int, dev: torch.device) -> torch.Tensor:
    """The framed front view as the photometric term's target: RGBA [1,size,size,4]."""
    from ..common.dataset import resize_rgba

    r = np.asarray(reference, np.float32)
    if r.ndim != 3 or r.shape[-1] != 4 or r.shape[0] != r.shape[1]:
        raise ValueError(f"the front view must be a square RGBA image, got shape {r.shape}")
    if r.shape[0] != size:
        r = resize_rgba(r, size, size)
    return torch.as_tensor(r, dtype=torch.float32, device=dev)[None]


# the rig the mesh stages see the dreamt Gaussians from: the front first (it plays the reference), then
# a ring below and above, and the top
RIG_POSES = ((0.0, 0.0),) + tuple((el, az) for el in (-10.0, 20.0) for az in range(0, 360, 45) if (el, az) != (0.0, 0))
RIG_POSES = RIG_POSES + ((60.0, 90.0), (60.0, 270.0))


@torch.no_grad()
def rig_renders(g: Gaussians, size: int = 128, poses: Sequence[tuple[float, float]] = RIG_POSES) -> PosedViews:
    """The Gaussians' own straight-alpha RGBA renders from ``poses`` (elevation, azimuth) at the rig's
    distance: the posed views the mesh, hull and bake stages take (view 0, the front, plays the
    reference)."""
    k = cam.Intrinsics.from_fov(math.radians(FOV_DEG), size, size)
    c2w = np.stack([cam.spherical_to_c2w(el, az, RADIUS) for el, az in poses])
    col, al, _ = g.render(c2w, k, background=None)
    a = al.cpu().numpy().astype(np.float32)
    rgb = col.cpu().numpy().astype(np.float32) / np.maximum(a, 1e-6)
    images = np.concatenate([np.clip(rgb, 0, 1), np.clip(a, 0, 1)], -1)
    names = ["front"] + [f"rig_{i:02d}" for i in range(1, len(poses))]
    return PosedViews(images, c2w, [k] * len(poses), names, np.ones(len(poses)))
