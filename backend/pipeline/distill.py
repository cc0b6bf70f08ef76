"""Score distillation on 3D Gaussians: the prior, not one of its samples, decides the unseen side.

DreamGaussian's first stage with this project's guidances (:class:`backend.pipeline.sds.Guidance`:
Zero-1-to-3 on the reference, or an oracle that knows the object). Gaussians already fitted
to the reference and the generated views (:func:`backend.gaussians.train.train_gaussians`,
weighted by each view's confidence) are optimised further; every step adds

* the **reference** term: the photometric loss (L1 + SSIM on a random background, plus the
  alpha-vs-mask L1) at the reference camera, weight ``reference_weight``;
* a **views** term: the same loss on one generated view in turn, its colour part weighted
  ``views_weight`` times that view's confidence, its silhouette part ``views_mask_weight``.
  Both are small by default (0 and 0.1): the samples have already shaped the Gaussians (they
  were fitted to them), and here every one of their faults (a camera a few degrees off, a
  softer image, its own colours) pulls against the prior, which answers for the camera it was
  asked about. DreamGaussian's first stage has no such term at all; the small silhouette part
  stays as a guard against score distillation on white growing white Gaussians where no view
  has the object. On the image-to-3D bench (standard, degraded views, seed 0) lowering them
  from 0.5 and 1.0 gained 1.8-2.8 dB of held-out PSNR (suzanne 19.63 -> 21.47, mug 18.51 ->
  20.47, cube 20.15 -> 22.96); the silhouettes were most of it (suzanne at 0.5 and 0.3:
  20.50). Perfect views gain too (suzanne 23.12 -> 24.80, mug 24.13 -> 25.67, cube 26.46 ->
  27.32), not explained yet: those views are exact Blender renders, and the prior
  renders the same object with this project's rasteriser;
* the **prior** term: ``views_per_step`` random cameras around the object (azimuth uniform,
  elevation in ``elevation_range``, the reference's distance and field of view), rendered
  on white and scored by each guidance through :func:`backend.pipeline.sds.guidance_loss`
  (score distillation with an annealed timestep, or an SDEdit target), weight
  ``prior_weight`` times the guidance's own weight. With ``align_prior`` each answer is first
  registered to the render it was asked about (:mod:`backend.pipeline.align`): a sampled
  prior answers for a camera a few degrees off, and unregistered answers average into blur.

Iterative dataset update (``updates``): now and then the Gaussians are rendered at the
generated views' poses and passed back through the guidance with partial noise
(:func:`backend.pipeline.sds.sdedit_images`); the result replaces those views' targets. Each
sample was drawn on its own; after a few updates they are all renders of one object,
touched up by the prior. ``report.view_disagreement`` measures that: the mean absolute
difference between the targets and the final Gaussians' renders at the generated poses.

Plain data in and out: Gaussians, posed views, guidances; no model is loaded here.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from ..common import cameras as cam
from ..common.dataset import PosedViews, resize_rgba
from ..common.progress import NULL, Progress
from ..gaussians.init import axes_convergence
from ..gaussians.model import Gaussians
from ..gaussians.render import rasterize
from ..gaussians.train import photometric_loss
from .align import PoseAligner
from .sds import Guidance, priors_loss, sample_view, sdedit_images, view_of
from .view_pose import register_views


@dataclass
class DistillSettings:
    steps: int = 200  # 0: no distillation
    render_size: int = 0  # the prior's renders (0: 96 on CPU, 256 on CUDA; the guidance resizes to its own)
    views_per_step: int = 1  # random cameras shown to the prior per step
    reference_weight: float = 1.0
    views_weight: float = 0.0  # colour of the generated views, times each one's confidence
    views_mask_weight: float = 0.1  # their silhouettes (alpha L1), whatever their confidence: a guard that keeps
    # score distillation's white-on-white Gaussians from growing where no view has the object (at 0 the bench's
    # degraded views, whose oracle prior never grows them, read suzanne +0.42, mug +0.07, cube -0.27 dB; a real prior may)
    prior_weight: float = 3.0
    ssim_weight: float = 0.2
    mask_weight: float = 1.0
    elevation_range: tuple = (-20.0, 50.0)  # absolute elevations of the prior's cameras (degrees)
    # register each of the prior's answers to the render it was asked about (a sampled prior answers for a
    # camera a few degrees off, with a systematic part; backend.pipeline.align) before its gradient is formed
    align_prior: bool = False
    align_max_deg: float = 12.0
    align_accept: float = 0.97  # a registration is kept where it leaves less than this of the residual
    # the prior's update rule and timestep schedule (see backend.pipeline.sds)
    update: str = "sds"
    t_range: tuple = (0.02, 0.98)
    t_final_max: float = 0.5
    sdedit_t: tuple = (0.15, 0.45)
    sdedit_steps: int = 4
    # iterative dataset update: re-render the generated views and pass them through the prior
    updates: int = 0  # how many (0: never), evenly from update_start on, the last leaving time to settle
    update_start: float = 0.3  # fraction of the schedule of the first update
    update_strength: float = 0.35  # noise level of the SDEdit pass, as a fraction of the schedule
    update_steps: int = 8  # DDIM steps of that pass
    # the generated views' cameras sit this many degrees of elevation above the poses they were asked for
    # (backend.pipeline.view_pose); an update asks the prior for the pose it was asked for first, since the
    # prior's error comes with every answer
    ask_elevation_offset: float = 0.0
    # register each updated view to the Gaussians (backend.pipeline.view_pose.register_views): the prior answered
    # from a camera of its own, a few degrees off the one it was asked for
    register_updates: bool = False
    # learning rates (means: per unit of object radius, decayed to lr_means_final of it)
    lr_means: float = 3e-3
    lr_means_final: float = 0.1
    lr_scales: float = 5e-3
    lr_quats: float = 1e-3
    lr_opacities: float = 5e-2
    lr_sh0: float = 1e-2
    max_scale: float = 0.15  # largest Gaussian, as a fraction of the object radius
    seed: int = 0


@dataclass
class DistillReport:
    steps: int
    seconds: float
    updates: int = 0  # iterative dataset updates done
    prior_views: dict = field(default_factory=dict)  # guidance name -> random views it scored
    prior_pose: dict = field(default_factory=dict)  # with align_prior: answers registered, the running camera change
    losses: list = field(default_factory=list)  # every 10th step: {step, reference, views, prior}
    view_disagreement: float = float("nan")  # mean |target - render| over the generated views' masks, at the end
    initial_disagreement: float = float("nan")  # the same before distillation
    registrations: list = field(default_factory=list)  # with register_updates: what each one found


@dataclass
class DistillResult:
    gaussians: Gaussians
    views: PosedViews  # the targets at the end (updated when updates > 0)
    report: DistillReport


def _object_rig(views: PosedViews) -> tuple[np.ndarray, float, float]:
    """Centre the cameras look at, the reference's distance to it and its field of view."""
    center = axes_convergence(views.c2w) if len(views) > 1 else np.zeros(3)
    dist = float(np.linalg.norm(views.c2w[0, :3, 3] - center))
    return center, dist, math.degrees(views.intrinsics[0].fov_x)


class GaussianOptimizer:
    """Adam on each of the Gaussians' parameters (not ``shN``) at a settings object's learning rates
    (``lr_means`` per unit of ``radius``, decayed to ``lr_means_final`` of it over ``steps``;
    ``lr_scales``, ``lr_quats``, ``lr_opacities``, ``lr_sh0``), the scales clamped to
    ``max_scale * radius`` after each step. Shared by distillation and text-to-3D (dream.py)."""

    def __init__(self, gaussians: Gaussians, s, radius: float, dev: torch.device):
        self.params = {k: torch.nn.Parameter(v.detach().to(dev).clone()) for k, v in gaussians.params.items()
                       if k != "shN"}
        lrs = {"means": s.lr_means * radius, "quats": s.lr_quats, "scales": s.lr_scales, "opacities": s.lr_opacities,
               "sh0": s.lr_sh0}
        self.optimizers = {k: torch.optim.Adam([p], lr=lrs[k], eps=1e-15) for k, p in self.params.items()}
        self.gamma = s.lr_means_final ** (1.0 / max(1, s.steps))
        self.max_log_scale = math.log(s.max_scale * radius)

    def step(self) -> None:
        for opt in self.optimizers.values():
            opt.step()
            opt.zero_grad(set_to_none=True)
        for group in self.optimizers["means"].param_groups:
            group["lr"] *= self.gamma
        with torch.no_grad():
            self.params["scales"].clamp_(max=self.max_log_scale)

    def gaussians(self) -> Gaussians:
        return Gaussians({k: v.detach() for k, v in self.params.items()}, 0)


def _render(params: dict, viewmats: torch.Tensor, Ks: torch.Tensor, W: int, H: int, bg: torch.Tensor,
            mode: str = "RGB"):
    g = Gaussians(params, 0)
    colors, alphas, _ = rasterize(g.means, g.quats, g.scales, g.opacities, g.sh_coeffs(), viewmats, Ks, W, H,
                                  sh_degree=0, backgrounds=bg, render_mode=mode)
    return colors, alphas


@torch.no_grad()
def disagreement(g: Gaussians, views: PosedViews, idx: Sequence[int], max_views: int = 6) -> float:
    """Mean absolute RGB difference between the views and the Gaussians' renders at their
    poses, over the union of both masks, on white (at most ``max_views`` of them, evenly
    picked: it is a report, and renders cost)."""
    errs = []
    idx = list(idx)
    if len(idx) > max_views:
        idx = [idx[int(j)] for j in np.linspace(0, len(idx) - 1, max_views).round()]
    for i in idx:
        col, al, _ = g.render(views.c2w[i:i + 1], views.intrinsics[i], background=(1.0, 1.0, 1.0))
        img = torch.as_tensor(views.images[i], dtype=torch.float32)
        tgt = img[..., :3] * img[..., 3:4] + (1 - img[..., 3:4])
        m = (img[..., 3] > 0.5) | (al[0, ..., 0].cpu() > 0.5)
        if m.any():
            errs.append(float((col[0].cpu() - tgt).abs()[m].mean()))
    return float(np.mean(errs)) if errs else float("nan")


def distill_gaussians(gaussians: Gaussians, views: PosedViews, guidances: Sequence[Guidance],
                      settings: DistillSettings | None = None, device: str = "cpu",
                      progress: Progress = NULL, asked: np.ndarray | None = None) -> DistillResult:
    """Optimise ``gaussians`` under the reference (``views[0]``), the generated views
    (``views[1:]``, weighted by ``views.weights``) and the guidances. ``asked``: the cameras
    [N,4,4] the generated views were asked for, where the view updates ask the prior again
    (default: the views' own, lowered by ``settings.ask_elevation_offset``). The same seed gives
    the same result (the guidances' VAE samples draw from torch's global generator, seeded here
    for the stage and restored afterwards)."""
    s = settings or DistillSettings()
    dev = torch.device(device)
    if asked is None:
        asked = np.asarray(views.c2w, np.float64).copy()
        if s.ask_elevation_offset and len(views) > 1:
            center = _object_rig(views)[0]
            for i in range(1, len(views)):
                el, az, r = cam.c2w_to_spherical(asked[i], center)
                asked[i] = cam.spherical_to_c2w(el - s.ask_elevation_offset, az, r, center)
    with torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else []):
        torch.manual_seed(s.seed)
        return _distill(gaussians, views, list(guidances), s, dev, progress, np.asarray(asked, np.float64))


def _distill(gaussians: Gaussians, views: PosedViews, guidances: list, s: DistillSettings, dev: torch.device,
             progress: Progress, asked: np.ndarray) -> DistillResult:
    if s.update not in ("sds", "sdedit", "csd"):
        raise ValueError(f"unknown update rule {s.update!r}")
    t0 = time.perf_counter()
    rng = np.random.default_rng(s.seed)
    gen = torch.Generator("cpu").manual_seed(s.seed)
    size = s.render_size or (256 if dev.type == "cuda" else 96)
    center, dist, fov = _object_rig(views)
    radius = dist * math.tan(math.radians(fov) / 2)  # the frame's half width at the object: its scale
    generated = list(range(1, len(views)))
    report = DistillReport(s.steps, 0.0, prior_views={g.name: 0 for g in guidances})
    report.initial_disagreement = disagreement(gaussians.to(dev), views, generated)

    opt = GaussianOptimizer(gaussians, s, radius, dev)
    params = opt.params

    images = torch.as_tensor(views.images, dtype=torch.float32, device=dev)
    c2w = np.asarray(views.c2w, np.float64).copy()
    viewmats = torch.as_tensor(cam.c2w_to_viewmat(c2w), dtype=torch.float32, device=dev)
    Ks = torch.as_tensor(views.Ks(), dtype=torch.float32, device=dev)
    W, H = views.width, views.height
    weights = views.weights / max(float(views.weights.max()), 1e-12)
    order: list[int] = []
    prior_K = None
    white = torch.ones(1, 3, device=dev)
    aligner = PoseAligner(center, s.align_max_deg, accept=s.align_accept) if s.align_prior else None

    update_at = {int(s.steps * (s.update_start + (1 - s.update_start) * k / s.updates)) for k in range(s.updates)}
    for step in range(s.steps):
        frac = step / max(1, s.steps - 1)
        if step in update_at and guidances and generated:
            current = PosedViews(views.images, c2w, list(views.intrinsics), list(views.names), views.weights)
            images = _update_views(params, current, images, generated, guidances[0], center, fov, size, s, gen, dev,
                                   asked)
            report.updates += 1
            if s.register_updates:  # each answer came from a camera of its own: find it
                current = PosedViews(images.cpu().numpy(), c2w, list(views.intrinsics), list(views.names), views.weights)
                c2w, reg = register_views(opt.gaussians(), current, generated, center, origin=views.c2w)
                viewmats = torch.as_tensor(cam.c2w_to_viewmat(c2w), dtype=torch.float32, device=dev)
                report.registrations.append(reg.to_dict())
        # the reference and one generated view, in one render call
        idx = [0]
        if generated and (s.views_weight > 0 or s.views_mask_weight > 0):
            if not order:
                order = list(rng.permutation(generated))
            idx.append(int(order.pop()))
        bg = torch.rand(len(idx), 3, generator=gen).to(dev)
        colors, alphas = _render(params, viewmats[idx], Ks[idx], W, H, bg)
        ref_loss, _ = photometric_loss(colors[:1], alphas[:1], images[:1], bg[:1], s.ssim_weight, s.mask_weight)
        loss = s.reference_weight * ref_loss
        view_loss = torch.zeros((), device=dev)
        if len(idx) > 1:
            gt = images[idx[1:]]
            view_loss, _ = photometric_loss(colors[1:], alphas[1:], gt, bg[1:], s.ssim_weight, 0.0)
            mask_loss = (alphas[1:, ..., 0] - gt[..., 3]).abs().mean()
            loss = loss + s.views_weight * float(weights[idx[1]]) * view_loss + s.views_mask_weight * mask_loss
        prior_loss = torch.zeros((), device=dev)
        if guidances and s.prior_weight > 0 and s.views_per_step > 0:
            pv = [sample_view(rng, center, dist, fov, s, size) for _ in range(s.views_per_step)]
            if prior_K is None:
                prior_K = torch.as_tensor(pv[0].intr.K(), dtype=torch.float32, device=dev)[None]
            vm = torch.as_tensor(cam.c2w_to_viewmat(np.stack([v.c2w for v in pv])), dtype=torch.float32, device=dev)
            pc, pa = _render(params, vm, prior_K.expand(len(pv), -1, -1), size, size, white.expand(len(pv), -1),
                             "RGB+ED" if aligner else "RGB")
            if aligner:
                aligner.set_renders(pc[..., 3].detach(), pa[..., 0].detach(), pv)
                pc = pc[..., :3]
            prior_loss = priors_loss(guidances, pc.permute(0, 3, 1, 2), pv, frac, s, gen, report.prior_views, aligner)
            loss = loss + s.prior_weight * prior_loss
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == s.steps - 1:
            report.losses.append({"step": step, "reference": float(ref_loss.detach()), "views": float(view_loss.detach()),
                                  "prior": float(prior_loss.detach())})
        progress.update((step + 1) / max(1, s.steps), f"step {step + 1}/{s.steps}, reference {float(ref_loss.detach()):.4f}")

    out = opt.gaussians()
    final_views = PosedViews(images.detach().cpu().numpy().astype(np.float32), c2w, list(views.intrinsics),
                             list(views.names), views.weights.copy())
    report.view_disagreement = disagreement(out, final_views, generated)
    if aligner:
        report.prior_pose = aligner.summary()
    report.seconds = time.perf_counter() - t0
    return DistillResult(out, final_views, report)


@torch.no_grad()
def _update_views(params: dict, views: PosedViews, images: torch.Tensor, generated: list[int], guidance: Guidance,
                  center: np.ndarray, fov: float, size: int, s: DistillSettings, gen: torch.Generator,
                  dev: torch.device, asked: np.ndarray) -> torch.Tensor:
    """Render the generated poses at the prior's size on white, SDEdit them through
    ``guidance`` (asked for the cameras ``asked``), and take the results (alpha from the
    render) as the new targets."""
    from .segment import foreground

    k = cam.Intrinsics.from_fov(math.radians(fov), size, size)
    vm = torch.as_tensor(cam.c2w_to_viewmat(np.stack([views.c2w[i] for i in generated])), dtype=torch.float32, device=dev)
    # rendered where the views are, asked for as they were asked for
    pv = [view_of(asked[i], k, center, i) for i in generated]
    K = torch.as_tensor(pv[0].intr.K(), dtype=torch.float32, device=dev)[None].expand(len(pv), -1, -1)
    white = torch.ones(len(pv), 3, device=dev)
    col, al = _render({k: v.detach() for k, v in params.items()}, vm, K, size, size, white)
    keep = [j for j, v in enumerate(pv) if guidance.accepts(v)]
    if not keep:
        return images
    new = sdedit_images(guidance, col.permute(0, 3, 1, 2)[keep], [pv[j] for j in keep], s.update_strength,
                        s.update_steps, gen)
    out = images.clone()
    for j, img in zip(keep, new.permute(0, 2, 3, 1).clamp(0, 1).cpu().numpy()):
        rgba = foreground(img, "border").rgba  # generated views come on white
        if rgba.shape[0] != views.height or rgba.shape[1] != views.width:
            rgba = resize_rgba(rgba, views.width, views.height)
        out[generated[j]] = torch.as_tensor(rgba, dtype=torch.float32, device=dev)
    return out
