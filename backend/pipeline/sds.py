"""Score Distillation Sampling of a mesh's texture, with pluggable guidance.

The texture of a fixed mesh is optimised: render it from a sampled camera
(differentiably, :func:`backend.mesh.textured.render_textured`), bring the
render into the guidance's space (Stable Diffusion's latents, Zero-1-to-3's,
or the image itself for the oracle), add noise at a timestep ``t``, ask the
guidance for the noise, and push the texture along ``w(t) (eps_hat - eps)``.

Guidance objects share one interface (:class:`Guidance`) so the oracle
denoiser and the real models run through exactly this code:

* ``encode(images) -> x0`` (differentiable; images [B,3,H,W] in [0,1]),
* ``decode(x0) -> images`` (for the multi-step update),
* ``eps(x_t, t, views) -> (eps_cond, eps_uncond or None)``,
* ``alphas_cumprod``, ``guidance_scale``, ``size`` (render size it wants).

Update rules (``RefineSettings.update``):

* ``sds`` - DreamFusion's score distillation: gradient ``w(t)(eps_cfg - eps)``
  with ``w(t) = 1 - abar_t``, ``t`` uniform in ``t_range`` whose upper end is
  annealed toward low noise. High guidance (about 100 for Stable Diffusion)
  gives saturated, sharp textures; it can over-saturate with many steps.
* ``sdedit`` - a multi-step denoised target (as in two-stage Gaussian
  pipelines): noise the render to a moderate ``t``, denoise it with a few DDIM
  steps to a clean image, and regress the render onto it (MSE). Converges in
  tens of steps, keeps colours natural, follows the current texture more
  closely; the right choice for a quick clean-up of a baked texture.
* ``csd`` - classifier score distillation: gradient ``w(t) s (eps_cond -
  eps_uncond)``, the classifier part alone. Stronger restyling toward the
  prompt with less colour drift; needs a conditional/unconditional model (not
  the oracle).

Loss weights. Every term is a per-element mean, so weights compare like with
like whatever the render size or latent shape:

``loss = prior_weight * sum_g g.weight * L_g + reference_weight * L_ref``

* ``L_g`` for ``sds``/``csd``: ``0.5 * mean((x0 - sg(x0 - grad))^2)`` over the
  guidance's space (latents or pixels), i.e. a gradient of ``grad / numel`` on
  ``x0``; for ``sdedit``: ``mean((render - target)^2)`` over pixels and channels.
* ``L_ref``: ``mean((render - reference)^2)`` over the reference's masked pixels
  and channels.

The reference camera itself is never shown to a prior (it has the reference
image, which is better); given cameras that coincide with it are dropped.

Views the priors see are square: a scene camera of another aspect ratio is
rendered through a square frame with the same pose and focal length (its frame
padded with more of the scene), never squeezed. Zero-1-to-3 only sees views
like its training rig (object centred, field of view near 49.1 degrees, framed
as the reference within the radii it was trained on, see
:meth:`Zero123Guidance.accepts`); other scene cameras get the text prior only.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..common import cameras as cam
from ..mesh.textured import TexturedMesh, render_textured
from ..common.progress import NULL, Progress


@dataclass
class View:
    """A sampled camera, with what guidances condition on."""

    c2w: np.ndarray
    intr: cam.Intrinsics
    elevation: float  # degrees, around the object's centre
    azimuth: float  # degrees, our convention (0 = front, on -Y)
    radius: float
    source: int = -1  # index into the given cameras, or -1 when sampled
    scale: float = 1.0  # the object's apparent size relative to the reference framing (1: framed as the reference)
    offset: float = 0.0  # distance of the object's centre from the frame's centre, as a fraction of the frame
    background: float = 1.0  # grey level the render was made on (1: white); an oracle composites its truth on it


class Guidance(Protocol):
    name: str
    weight: float
    guidance_scale: float
    size: int
    alphas_cumprod: torch.Tensor

    def encode(self, images: torch.Tensor) -> torch.Tensor: ...

    def decode(self, x0: torch.Tensor) -> torch.Tensor: ...

    def eps(self, x_t: torch.Tensor, t: torch.Tensor, views: Sequence[View]) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def accepts(self, view: View) -> bool: ...


def scaled_linear_alphas(n: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """Stable Diffusion's schedule, for guidances without a scheduler (the oracle)."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, n, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def _square_resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize square renders [B,3,H,H] to the prior's size; a non-square image here is
    a bug (it would be squeezed): the refiner renders square views."""
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"priors take square images, got {tuple(images.shape[-2:])}")
    if images.shape[-1] == size:
        return images
    return F.interpolate(images, (size, size), mode="bilinear", align_corners=False, antialias=images.shape[-1] > size)


# ---------------------------------------------------------------------------
# guidances


@dataclass
class OracleGuidance:
    """A denoiser that knows the truth: ``eps(x_t, t) = (x_t - sqrt(abar) x*) / sqrt(1 - abar)`` with
    ``x*`` the true render from the same camera (image space; ``truth(views) -> [B,3,H,W]``).

    ``posterior`` says what an SDEdit pass through it (:func:`sdedit_images`) returns:

    * ``"exact"``: ``x*``, whatever the strength. Its prediction ignores what ``x_t`` still holds, so
      from a sampling truth (faults drawn per call) a pass returns a fresh faulty sample.
    * ``"wiener"``: ``x* + W (input - x*)`` with ``W(f) = P(f) / (P(f) + (1 - abar) / abar)`` per
      spatial frequency, ``P`` the radially averaged power of ``x*`` times ``spread`` and ``abar`` at
      the pass's strength: the input's frequencies that the noise would not drown are kept, the rest
      come from ``x*``. Like a trained denoiser's partial-noise pass, it keeps the input's layout and
      colours at low strength and replaces more of it as the strength rises. It is the posterior mean
      of a Gaussian prior around ``x*``, taken without the sampling noise a multi-step pass under
      that prior would add (which would cover the background with coloured noise). Score
      distillation (``eps``) is the same under both."""

    truth: object
    size: int = 128
    weight: float = 1.0
    guidance_scale: float = 1.0
    name: str = "oracle"
    alphas_cumprod: torch.Tensor = field(default_factory=scaled_linear_alphas)
    posterior: str = "exact"  # "exact" | "wiener"
    spread: float = 1.0  # wiener: the prior's power relative to the image's own

    def __post_init__(self):
        if self.posterior not in ("exact", "wiener"):
            raise ValueError(f"unknown posterior {self.posterior!r} (exact | wiener)")

    def encode(self, images):
        return images * 2 - 1

    def decode(self, x0):
        return (x0 + 1) / 2

    def accepts(self, view: View) -> bool:
        return True

    def _truth(self, views, like: torch.Tensor) -> torch.Tensor:
        x_star = self.truth(views).to(like)
        if x_star.shape[-2:] != like.shape[-2:]:
            x_star = F.interpolate(x_star, like.shape[-2:], mode="area")
        return x_star

    def eps(self, x_t, t, views):
        x_star = self._truth(views, x_t) * 2 - 1
        ab = self.alphas_cumprod.to(x_t)[t].reshape(-1, 1, 1, 1)
        return (x_t - ab.sqrt() * x_star) / (1 - ab).sqrt(), None

    def edit(self, imgs: torch.Tensor, views: Sequence[View], t_frac: float) -> torch.Tensor | None:
        """The SDEdit pass in closed form for the ``wiener`` posterior ([B,3,H,W] in [0,1]); None
        for ``exact`` (the pass then runs step by step)."""
        if self.posterior == "exact":
            return None
        x_star = self._truth(views, imgs)
        ab = self.alphas_cumprod.to(imgs)[int(min(max(t_frac, 0.0), 1.0) * (len(self.alphas_cumprod) - 1))]
        p = self.spread * radial_power(x_star * 2 - 1)  # the prior's power per frequency, in [-1,1] units
        gain = p / (p + (1 - ab) / ab)
        d = torch.fft.fft2((imgs - x_star).float() * 2, norm="ortho") * gain
        return (x_star + torch.fft.ifft2(d, norm="ortho").real.to(imgs) / 2).clamp(0, 1)


def radial_power(x: torch.Tensor) -> torch.Tensor:
    """Per-coefficient power of ``x`` [B,C,H,W] under the orthonormal 2-D DFT, averaged over the
    channels and over rings of equal spatial frequency: [B,1,H,W]."""
    b, _, h, w = x.shape
    p = (torch.fft.fft2(x.float(), norm="ortho").abs() ** 2).mean(1)  # [B,H,W]
    fy, fx = torch.fft.fftfreq(h, device=x.device) * h, torch.fft.fftfreq(w, device=x.device) * w
    ring = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2).round().long().flatten()  # [H*W]
    n = int(ring.max()) + 1
    sums = torch.zeros(b, n, device=x.device).index_add_(1, ring, p.flatten(1))
    counts = torch.zeros(n, device=x.device).index_add_(0, ring, torch.ones(ring.shape, device=x.device))
    return (sums / counts)[:, ring].reshape(b, 1, h, w)


def view_suffix(elevation: float, azimuth: float) -> str:
    """DreamFusion-style view-dependent prompt suffix (front is azimuth 0, on -Y)."""
    if elevation > 60:
        return "overhead view"
    a = azimuth % 360
    if a <= 45 or a >= 315:
        return "front view"
    if 135 <= a <= 225:
        return "back view"
    return "side view"


class StableDiffusionGuidance:
    """Text prior: Stable Diffusion (any diffusers StableDiffusionPipeline)."""

    name = "stable_diffusion"

    def __init__(self, pipe, prompt: str, negative_prompt: str = "", guidance_scale: float = 100.0,
                 weight: float = 1.0, view_dependent: bool = True, size: int = 512):
        self.pipe = pipe
        self.weight = weight
        self.guidance_scale = guidance_scale
        self.size = size
        # where inputs go: the GPU also when the pipeline is CPU-offloaded (its weights then sit on the CPU)
        self.device = getattr(pipe, "_execution_device", None) or pipe.unet.device
        self.dtype = pipe.unet.dtype
        self.alphas_cumprod = pipe.scheduler.alphas_cumprod.to(self.device)
        for m in (pipe.unet, pipe.vae, pipe.text_encoder):
            m.requires_grad_(False)
        suffixes = ["front view", "side view", "back view", "overhead view"] if view_dependent else [""]
        texts = {s: f"{prompt}, {s}" if s else prompt for s in suffixes}
        with torch.no_grad():
            self.cond = {s: self._embed(t) for s, t in texts.items()}
            self.uncond = self._embed(negative_prompt)
        self.view_dependent = view_dependent

    def _embed(self, text: str) -> torch.Tensor:
        tok = self.pipe.tokenizer(text, padding="max_length", max_length=self.pipe.tokenizer.model_max_length,
                                  truncation=True, return_tensors="pt")
        return self.pipe.text_encoder(tok.input_ids.to(self.device))[0]

    def accepts(self, view: View) -> bool:
        return True  # trained on every kind of framing

    def encode(self, images):
        x = _square_resize(images, self.size)
        lat = self.pipe.vae.encode((x * 2 - 1).to(self.dtype)).latent_dist.sample()
        return lat * self.pipe.vae.config.scaling_factor

    def decode(self, x0):
        img = self.pipe.vae.decode((x0 / self.pipe.vae.config.scaling_factor).to(self.dtype)).sample
        return (img.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def eps(self, x_t, t, views):
        keys = [view_suffix(v.elevation, v.azimuth) if self.view_dependent else "" for v in views]
        cond = torch.cat([self.cond[k] for k in keys])
        uncond = self.uncond.expand(len(views), -1, -1)
        x = torch.cat([x_t, x_t]).to(self.dtype)
        e = self.pipe.unet(x, torch.cat([t, t]).to(self.device), encoder_hidden_states=torch.cat([cond, uncond])).sample
        c, u = e.float().chunk(2)
        return c, u


class Zero123Guidance:
    """Image prior: Zero-1-to-3 conditioned on the reference and the relative camera."""

    name = "zero123"

    # the training rig (objaverse renders): field of view 49.1 deg, radii 1.5-2.2 around a
    # normalised object, object centred; our reference framing stands for radius RIG_RADIUS
    RIG_FOV_DEG = (35.0, 65.0)
    RIG_RADIUS = 2.0
    RIG_RADII = (1.5, 2.2)
    MAX_OFFSET = 0.05

    def __init__(self, model, reference_rgb: np.ndarray, reference_elevation: float = 0.0, guidance_scale: float = 4.0,
                 weight: float = 1.0):
        self.model = model
        self.ref = model.encode_reference(reference_rgb, reference_elevation)
        self.guidance_scale = guidance_scale
        self.weight = weight
        self.size = 256
        self.alphas_cumprod = model.parts.scheduler.alphas_cumprod.to(model.device)
        for m in (model.parts.unet, model.parts.vae):
            m.requires_grad_(False)

    @classmethod
    def view_radius(cls, view: View) -> float:
        """The view's camera distance in the model's units: the reference framing is
        RIG_RADIUS; an object that looks smaller is farther."""
        return cls.RIG_RADIUS / max(view.scale, 1e-6)

    def accepts(self, view: View) -> bool:
        """Only views like Zero-1-to-3's training renders: object centred, a field of
        view near 49.1 degrees, and at a distance within its trained radii."""
        fov = math.degrees(view.intr.fov_x)
        return (view.offset <= self.MAX_OFFSET and self.RIG_FOV_DEG[0] <= fov <= self.RIG_FOV_DEG[1]
                and self.RIG_RADII[0] <= self.view_radius(view) <= self.RIG_RADII[1])

    def encode(self, images):
        x = _square_resize(images, self.size)
        lat = self.model.parts.vae.encode((x * 2 - 1).to(self.model.dtype)).latent_dist.sample()
        return lat * self.model.scaling_factor

    def decode(self, x0):
        return self.model.decode(x0.to(self.model.dtype)).float()

    @torch.no_grad()
    def eps(self, x_t, t, views):
        poses = [(v.elevation - self.ref.elevation, v.azimuth, self.view_radius(v) - self.RIG_RADIUS) for v in views]
        cond = self.model.conditioning(self.ref, self.model.camera_vectors(self.ref, poses))
        b = len(views)
        ref_lat = self.ref.latent.expand(b, -1, -1, -1).to(x_t.dtype)
        x = torch.cat([torch.cat([x_t, ref_lat], 1), torch.cat([x_t, torch.zeros_like(ref_lat)], 1)]).to(self.model.dtype)
        enc = torch.cat([cond, torch.zeros_like(cond)])
        e = self.model.parts.unet(x, torch.cat([t, t]).to(self.model.device), encoder_hidden_states=enc).sample
        c, u = e.float().chunk(2)
        return c, u


# ---------------------------------------------------------------------------
# the optimisation


@dataclass
class RefineSettings:
    steps: int = 100
    lr: float = 0.03
    update: str = "sds"  # "sds" | "sdedit" | "csd"
    t_range: tuple = (0.02, 0.98)
    t_final_max: float = 0.5  # the upper end of t anneals linearly to this
    sdedit_t: tuple = (0.15, 0.45)  # noise level of the multi-step target, annealed high -> low
    sdedit_steps: int = 4
    render_size: int = 0  # 0: 128 on CPU, 512 on CUDA
    views_per_step: int = 1
    elevation_range: tuple = (-15.0, 45.0)
    fov_deg: float = 49.1  # of sampled views when there is no reference view (else the reference's)
    camera_prob: float = 0.5  # chance of drawing a given (scene) camera instead of a random one
    prior_weight: float = 1.0  # weight of the priors' per-element losses (module docstring)
    reference_weight: float = 1.0  # weight of the reference view's per-pixel MSE, when one is given
    background: str = "white"  # "white" | "random"
    seed: int = 0
    supersample: int = 2


@dataclass
class RefineReport:
    steps: int
    seconds: float
    losses: list = field(default_factory=list)
    prior_views: dict = field(default_factory=dict)  # guidance name -> views it was shown
    scene_views_dropped: int = 0  # scene-camera draws no prior could take (replaced by sampled views)


def _object_frame(vertices: np.ndarray) -> tuple[np.ndarray, float]:
    lo, hi = vertices.min(0), vertices.max(0)
    center = 0.5 * (lo + hi)
    return center, float(np.linalg.norm(vertices - center, axis=1).max())


def view_of(c2w: np.ndarray, intr: cam.Intrinsics, center: np.ndarray, source: int = -1) -> View:
    el, az, r = cam.c2w_to_spherical(c2w, center)
    return View(np.asarray(c2w, np.float64), intr, el, az, r, source)


def square_view(v: View, size: int) -> View:
    """The same camera through a square frame of ``size`` px: the longer side kept,
    the shorter one padded symmetrically with more of the scene (no squeeze)."""
    k = v.intr
    side = max(k.width, k.height)
    sq = cam.Intrinsics(k.fx, k.fy, k.cx + (side - k.width) / 2, k.cy + (side - k.height) / 2, side, side)
    return replace(v, intr=sq.scaled(size, size))


def _framing(v: View, center: np.ndarray, ref_extent: float) -> View:
    """Fill in ``scale`` (apparent size against the reference framing, whose half
    frame spans ``ref_extent`` at the object's depth) and ``offset``."""
    uv, z = cam.project(np.asarray(center, np.float64)[None], v.c2w, v.intr)
    k = v.intr
    if not (z[0] > 1e-9):
        return replace(v, scale=0.0, offset=float("inf"))
    extent = float(z[0]) * 0.5 * k.width / k.fx  # half the frame's width, in world units at the object
    off = float(np.hypot(uv[0, 0] - k.width / 2, uv[0, 1] - k.height / 2)) / k.width
    return replace(v, scale=ref_extent / extent, offset=off)


def _same_camera(a: View, b: View) -> bool:
    return bool(np.allclose(a.c2w, b.c2w, atol=1e-6) and math.isclose(a.intr.fov_x, b.intr.fov_x, rel_tol=1e-3))


def sample_view(rng: np.random.Generator, center, dist: float, fov_deg: float, s: RefineSettings, size: int) -> View:
    el = float(rng.uniform(*s.elevation_range))
    az = float(rng.uniform(0, 360))
    intr = cam.Intrinsics.from_fov(math.radians(fov_deg), size, size)
    return View(cam.spherical_to_c2w(el, az, dist, center), intr, el, az, dist)


def refine_texture(mesh: TexturedMesh, guidances: Sequence[Guidance], settings: RefineSettings | None = None,
                   cameras: Sequence[tuple[np.ndarray, cam.Intrinsics]] = (), reference: tuple | None = None,
                   device: str = "cpu", progress: Progress = NULL) -> tuple[TexturedMesh, RefineReport]:
    """See :func:`_refine_texture`. The same seed gives the same texture: the guidances' VAE
    posterior samples draw from torch's global generator, seeded here for the refinement only
    (the caller's random state is restored afterwards)."""
    s = settings or RefineSettings()
    dev = torch.device(device)
    with torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else []):
        torch.manual_seed(s.seed)
        return _refine_texture(mesh, guidances, s, cameras, reference, device, progress)


def _refine_texture(mesh: TexturedMesh, guidances: Sequence[Guidance], settings: RefineSettings | None = None,
                    cameras: Sequence[tuple[np.ndarray, cam.Intrinsics]] = (), reference: tuple | None = None,
                    device: str = "cpu", progress: Progress = NULL) -> tuple[TexturedMesh, RefineReport]:
    """Optimise ``mesh.texture`` under the guidances. ``cameras``: given views
    (scene cameras) drawn with probability ``camera_prob``; ``reference``:
    (rgba [H,W,4], c2w, Intrinsics) matched by a per-pixel MSE. Sampled views
    look at the object from the reference's distance and field of view (or, with
    no reference, from where the bounding sphere fills the frame). Geometry and
    UVs are untouched; returns the mesh with its new texture."""
    s = settings or RefineSettings()
    if s.update not in ("sds", "sdedit", "csd"):
        raise ValueError(f"unknown update rule {s.update!r}")
    if not guidances and reference is None:
        raise ValueError("refinement needs a prompt, a reference image or another guidance")
    t0 = time.perf_counter()
    dev = torch.device(device)
    rng = np.random.default_rng(s.seed)
    gen = torch.Generator("cpu").manual_seed(s.seed)
    size = s.render_size or (512 if dev.type == "cuda" else 128)
    V = torch.as_tensor(mesh.vertices, dtype=torch.float32, device=dev)
    Fc = torch.as_tensor(mesh.faces, device=dev)
    UV = torch.as_tensor(mesh.uv, dtype=torch.float32, device=dev)
    tex = torch.nn.Parameter(torch.as_tensor(np.clip(mesh.texture, 0, 1), dtype=torch.float32, device=dev).clone())
    opt = torch.optim.Adam([tex], lr=s.lr)
    center, radius = _object_frame(mesh.vertices)
    ref = None
    if reference is not None:
        rgba, rc2w, rk = reference
        ref = (torch.as_tensor(rgba, dtype=torch.float32, device=dev), view_of(rc2w, rk, center))
    if ref is not None:  # sampled views framed as the reference
        rv = ref[1]
        dist, fov_deg = rv.radius, math.degrees(rv.intr.fov_x)
    else:
        fov_deg = s.fov_deg
        dist = radius / math.sin(math.radians(fov_deg) / 2) * 1.1
    ref_extent = dist * math.tan(math.radians(fov_deg) / 2)
    given = []
    for i, (c, k) in enumerate(cameras):
        v = view_of(c, k, center, i)
        if ref is not None and _same_camera(v, ref[1]):
            continue  # the reference view is matched to the reference image, never shown to a prior
        given.append(_framing(square_view(v, size), center, ref_extent))
    report = RefineReport(s.steps, 0.0, prior_views={g.name: 0 for g in guidances})
    for step in range(s.steps):
        frac = step / max(1, s.steps - 1)
        views = []
        for _ in range(s.views_per_step if guidances else 0):
            v = None
            if given and rng.random() < s.camera_prob:
                v = given[int(rng.integers(len(given)))]
                if not any(g.accepts(v) for g in guidances):
                    report.scene_views_dropped += 1
                    v = None
            if v is None:
                v = sample_view(rng, center, dist, fov_deg, s, size)
            views.append(v)
        bg = torch.ones(3, device=dev) if s.background == "white" else torch.rand(3, generator=gen).to(dev)
        loss = torch.zeros((), device=dev)
        imgs = None
        if views:
            imgs = torch.stack([render_textured(V, Fc, UV, tex, v.c2w, v.intr, s.supersample, background=bg)
                                for v in views]).permute(0, 3, 1, 2)
            loss = loss + s.prior_weight * priors_loss(guidances, imgs, views, frac, s, gen, report.prior_views)
        if ref is not None and s.reference_weight > 0:
            rgba, rv = ref
            out = render_textured(V, Fc, UV, tex, rv.c2w, rv.intr, s.supersample, background=None)
            m = (rgba[..., 3:4] > 0.5).float() * (out[..., 3:4] > 0.5).float()
            loss = loss + s.reference_weight * ((out[..., :3] - rgba[..., :3]) ** 2 * m).sum() / (3 * m.sum()).clamp_min(1.0)
        opt.zero_grad(set_to_none=True)
        if loss.requires_grad:
            loss.backward()
            opt.step()
        with torch.no_grad():
            tex.clamp_(0.0, 1.0)
        report.losses.append(float(loss.detach()))
        preview = None
        if imgs is not None and (step % max(1, s.steps // 5) == 0 or step == s.steps - 1):
            from ..common.dataset import encode_png

            preview = encode_png(imgs[0].detach().permute(1, 2, 0).cpu().numpy())
        progress.update((step + 1) / s.steps, f"step {step + 1}/{s.steps}", preview)
    new = mesh.copy(texture=tex.detach().cpu().numpy().astype(np.float32))
    report.seconds = time.perf_counter() - t0
    return new, report


@torch.no_grad()
def sdedit_images(g: Guidance, imgs: torch.Tensor, views: Sequence[View], t_frac: float, steps: int,
                  gen: torch.Generator) -> torch.Tensor:
    """SDEdit through a guidance: noise ``imgs`` [B,3,H,W] (in [0,1]) to ``t_frac`` of the
    schedule, denoise with ``steps`` DDIM steps (classifier-free guided where the guidance has
    an unconditional branch) and decode. Returns images at the input's size. A guidance with an
    ``edit(imgs, views, t_frac)`` that answers (the oracle's Wiener posterior) does the pass in
    closed form instead."""
    closed = g.edit(imgs, views, t_frac) if hasattr(g, "edit") else None
    if closed is not None:
        return closed
    ac = g.alphas_cumprod
    b = imgs.shape[0]
    t0 = int(min(max(t_frac, 0.0), 1.0) * (len(ac) - 1))
    x0 = g.encode(imgs).float()  # the schedule's arithmetic in float32 (eps casts to the model's dtype)
    noise = torch.randn(x0.shape, generator=gen).to(x0)
    ab = ac.to(x0)[t0]
    x = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    ts = np.linspace(t0, 0, max(1, steps) + 1).round().astype(int)
    for cur, nxt in zip(ts[:-1], ts[1:]):
        tc = torch.full((b,), int(cur), dtype=torch.long)
        c, u = g.eps(x, tc, views)
        e = c if u is None else u + g.guidance_scale * (c - u)
        a_c = ac.to(x)[int(cur)]
        x0_hat = (x - (1 - a_c).sqrt() * e) / a_c.sqrt()
        if nxt > 0:
            a_n = ac.to(x)[int(nxt)]
            x = a_n.sqrt() * x0_hat + (1 - a_n).sqrt() * e
        else:
            x = x0_hat
    out = g.decode(x).to(imgs)
    return F.interpolate(out, imgs.shape[-2:], mode="bilinear", align_corners=False)


def priors_loss(guidances: Sequence[Guidance], imgs: torch.Tensor, views: Sequence[View], frac: float, s,
                gen: torch.Generator, shown: dict, align: Callable | None = None) -> torch.Tensor:
    """Sum over ``guidances`` of ``weight * guidance_loss`` on the renders each one accepts;
    ``shown[name]`` counts the views each was shown. ``align(answer, render, idx)``, when
    given, registers each guidance's answers for the renders ``idx`` to them
    (:class:`backend.pipeline.align.PoseAligner`)."""
    loss = torch.zeros((), device=imgs.device)
    for g in guidances:
        idx = [i for i, v in enumerate(views) if g.accepts(v)]
        if not idx:
            continue
        shown[g.name] = shown.get(g.name, 0) + len(idx)
        sub = imgs[idx] if len(idx) < len(views) else imgs
        al = None if align is None else (lambda a, b, idx=idx: align(a, b, idx))
        loss = loss + g.weight * guidance_loss(g, sub, [views[i] for i in idx], frac, s, gen, al)
    return loss


def guidance_loss(g: Guidance, imgs: torch.Tensor, views: Sequence[View], frac: float, s, gen: torch.Generator,
                  align: Callable | None = None) -> torch.Tensor:
    """The prior's loss on renders ``imgs`` [B,3,H,W] at ``views``, ``frac`` of the way through
    the schedule. ``s`` names the rule and schedule: ``update``, ``t_range``, ``t_final_max``,
    ``sdedit_t``, ``sdedit_steps`` (:class:`RefineSettings`, or the Gaussians' distillation
    settings). ``align(answer, current)`` registers the prior's answer (its estimate of the
    clean image, in the space it works in) to the current one before the gradient is formed;
    score distillation's gradient ``w (eps_hat - eps)`` is ``sqrt(abar (1 - abar)) (x0 - x0_hat)``,
    so registering ``x0_hat`` is registering the gradient (classifier score distillation has
    no answer to register)."""
    ac = g.alphas_cumprod
    n_t = len(ac)
    b = imgs.shape[0]
    if s.update == "sdedit":
        lo, hi = s.sdedit_t
        t_val = hi - (hi - lo) * frac
        target = sdedit_images(g, imgs.detach(), views, t_val, s.sdedit_steps, gen)  # a constant: no activations kept
        if align is not None:
            target = align(target, imgs.detach())
        return F.mse_loss(imgs, target)
    # the latent in float32 whatever the model's dtype: on CUDA the models run in float16, and mse_loss of a
    # float16 latent against a float32 target fails in its CUDA backward ("Found dtype Float but expected
    # Half"; the CPU kernel accepts the mix). The cast's own backward hands the encoder a float16 gradient.
    x0 = g.encode(imgs).float()
    lo, hi = s.t_range
    hi_now = hi - (hi - s.t_final_max) * frac
    t = torch.randint(int(lo * (n_t - 1)), int(max(lo, hi_now) * (n_t - 1)) + 1, (b,), generator=gen)
    with torch.no_grad():
        noise = torch.randn(x0.shape, generator=gen).to(x0)
        ab = ac.to(x0)[t].reshape(-1, 1, 1, 1)
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        c, u = g.eps(x_t, t, views)
        w = 1 - ab
        if s.update == "csd":
            if u is None:
                raise ValueError(f"classifier score distillation needs a conditional model; '{g.name}' has none")
            grad = w * g.guidance_scale * (c - u)
        else:
            e = c if u is None else u + g.guidance_scale * (c - u)
            if align is None:
                grad = w * (e - noise)
            else:
                x0_hat = align(x0 + ((1 - ab) / ab).sqrt() * (noise - e), x0)
                grad = (ab * (1 - ab)).sqrt() * (x0 - x0_hat)
        grad = torch.nan_to_num(grad)
    target = (x0 - grad).detach()
    return 0.5 * F.mse_loss(x0, target)  # d/dx0 = grad / numel
