"""Text or image -> textured mesh: the generation pipeline (job kinds: :mod:`backend.kinds.generate`).

    prompt -> text-to-image front view -> foreground
    image  -> foreground
    reference (RGBA) -> framed reference -> novel views (Zero-1-to-3 or any
    NovelViewGenerator) -> posed views on the canonical rig, weighted by
    confidence -> Gaussians fitted to them -> score distillation from the prior
    (Zero-1-to-3 or an oracle) with the reference's loss, the views updated
    through the prior -> mesh, UVs, texture -> (SDS texture refinement) -> mesh
    centred at the origin, in the unit sphere, front facing -Y -> GLB

    prompt -> (text_to_3d_sds) Gaussians in a ball -> score distillation from the text
    prior over random views (anchored: also a front view's photometric loss and Zero-1-to-3
    on it) -> their own renders on a fixed rig -> the same mesh, UV, texture, refinement
    and normalisation stages
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch


from ..common import cameras as cam
from ..common.dataset import PosedViews, encode_png
from ..mesh.textured import TexturedMesh
from ..common.progress import NULL, Progress
from ..gaussians.model import Gaussians
from ..gaussians.train import train_gaussians
from .distill import DistillSettings, distill_gaussians
from .dream import RIG_POSES, DreamSettings, dream_gaussians, rig_renders
from .elevation import estimate_elevation
from .novel_views import (FOV_DEG, RADIUS, NovelViewGenerator, absolute_pose, contact_sheet, plan_views, prepare_reference,
                          view_weights)
from .reconstruct import ReconstructSettings, gaussians_to_textured_mesh
from .sds import Guidance
from .segment import foreground
from .view_pose import estimate_elevation_offset, register_views

# the image becomes the reference at azimuth 0 (the object's front, seen from -Y): ask for exactly that view
PROMPT_TEMPLATE = ("{prompt}, front view, a single isolated object, centered, full view, plain white background, "
                   "studio lighting, product photo")
NEGATIVE_PROMPT = ("back view, side view, top view, cropped, out of frame, multiple objects, text, watermark, shadow, "
                   "busy background, blurry, low quality, deformed")

# quality presets: what each sets unless the request gives it explicitly. CPU counts fit the
# 3-minute budget of the tiny preset on 2 cores (standard text-to-3D: 1:38 with 1000 Gaussian
# iterations, 1:21 with 250; the 1000 pay on the image-to-3D bench: suzanne F 0.918 -> 0.960,
# the cube's Chamfer 0.0207 -> 0.0114, held-out PSNR +0.8 to +3.7 dB); CUDA distillation follows DreamGaussian's stage 1
# (500 Zero-1-to-3 steps at standard; image-to-3D 84 s on an H200 with 12 views, README). prior_views: random cameras the prior scores per
# distillation step; two average out more of a sampled prior's pose error (degraded suzanne +1.1 dB, IoU
# 0.919 -> 0.935, perfect views unchanged: 24.23 -> 24.37 dB) for 14 s more on the CPU at standard
# (tiny text-to-3D measured alone in one session: 2:31 with one, 2:37 with two). views: standard's 14 (12 before)
# keep 10 on the rings beside the 4 from above that plan_views now makes. register_views: fractions of the Gaussian
# fit at which each generated view is registered to the Gaussians so far and its camera moved by its own error
# (image-to-3D bench, standard, degraded views at seeds 0 / 1: suzanne +1.07 / +0.81 dB, mug +1.31 / -0.91, cube
# +1.41 / +3.22; perfect views: suzanne +0.07, mug +0.09, cube -1.07). Not at draft: its 150 CPU iterations are
# unmeasured with it, and a 48 px box with 8 views and 200 iterations lost 0.6-1.2 dB to it
QUALITY = {
    "draft": {"steps": 20, "views": 8, "view_steps": 30, "iterations": {"cpu": 150, "cuda": 1500}, "texture_size": 512,
              "max_gaussians": {"cpu": 6000, "cuda": 40000}, "distill_steps": {"cpu": 80, "cuda": 250}, "prior_views": 1,
              "view_updates": 0, "dream_steps": {"cpu": 150, "cuda": 400},
              "refine_steps": 20, "resolution": {"cpu": 96, "cuda": 256}, "register_views": ()},
    "standard": {"steps": 30, "views": 14, "view_steps": 50, "iterations": {"cpu": 1000, "cuda": 2000}, "texture_size": 1024,
                 "max_gaussians": {"cpu": 10000, "cuda": 60000}, "distill_steps": {"cpu": 150, "cuda": 500},
                 "prior_views": 2, "view_updates": 2, "dream_steps": {"cpu": 300, "cuda": 800}, "refine_steps": 40, "resolution": {"cpu": 128, "cuda": 256},
                 "register_views": (0.2, 0.3, 0.4, 0.5, 0.6)},
    "high": {"steps": 50, "views": 16, "view_steps": 75, "iterations": {"cpu": 1500, "cuda": 4000}, "texture_size": 2048,
             "max_gaussians": {"cpu": 20000, "cuda": 100000}, "distill_steps": {"cpu": 400, "cuda": 1000},
             "prior_views": 2, "view_updates": 3, "dream_steps": {"cpu": 600, "cuda": 1500}, "refine_steps": 100, "resolution": {"cpu": 128, "cuda": 256},
             "register_views": (0.2, 0.3, 0.4, 0.5, 0.6)},
}


@dataclass
class GenerateSettings:
    views: int = 14
    view_steps: int = 50
    view_guidance: float = 3.0
    reference_elevation: float | None = 0.0  # None: estimated from probe views (backend.pipeline.elevation)
    seed: int = 0
    segmenter: str = "auto"
    resolution: int = 128  # reconstruction works on views of this size
    novel_weight: float = 0.7  # confidence of a generated view beside the reference (the reference: 1)
    away_weight: float = 0.3  # ... times this for the view opposite the reference
    reconstruct: ReconstructSettings = field(default_factory=ReconstructSettings)
    distill: DistillSettings = field(default_factory=DistillSettings)  # with a prior; steps 0: none
    view_updates: int = 0  # iterative dataset updates during distillation (0: none)
    # find the generated views' common elevation error from their silhouettes and move their cameras by it
    # (backend.pipeline.view_pose); the prior is still asked for the poses the views were asked for
    fit_view_elevation: bool = True
    # register each generated view to the Gaussians fitted so far, at these fractions of the fit, and go on from
    # the moved cameras (backend.pipeline.view_pose.register_views; (): never)
    register_views: tuple = ()
    dream: DreamSettings = field(default_factory=DreamSettings)  # text-to-3D by score distillation (text_to_3d_sds)
    refine: bool = True
    refine_steps: int = 40


PriorFactory = Callable[[np.ndarray, float], Sequence[Guidance]]  # (framed reference RGBA, its elevation) -> guidances


@dataclass
class GenerateResult:
    mesh: TexturedMesh  # normalised: centred at the origin, in the unit sphere, front -Y
    reference: np.ndarray  # the framed reference, RGBA
    views: np.ndarray  # the novel views, RGBA
    normalization: dict  # center, scale: world = v / scale + center, in the reconstruction's frame
    timings: dict
    stats: dict
    gaussians: Gaussians | None = None  # the 3D stage's Gaussians in the mesh's normalised frame


def rig_camera(elevation: float, azimuth: float, radius: float = RADIUS) -> np.ndarray:
    return cam.spherical_to_c2w(elevation, azimuth, radius)


def rig_views(reference: np.ndarray, novel: np.ndarray, poses, reference_elevation: float,
              weights: Sequence[float] | None = None) -> PosedViews:
    """The reference (weight 1) and the novel views (``weights``, default 1) as posed views
    on the canonical rig."""
    intr = cam.Intrinsics.from_fov(math.radians(FOV_DEG), reference.shape[1], reference.shape[0])
    images = [reference.astype(np.float32)]
    c2w = [rig_camera(reference_elevation, 0.0)]
    for img, pose in zip(novel, poses):
        el, az, r = absolute_pose(pose, reference_elevation)
        images.append(img.astype(np.float32))
        c2w.append(rig_camera(el, az, r))
    w = np.concatenate([[1.0], np.ones(len(novel)) if weights is None else np.asarray(weights, np.float64)])
    return PosedViews(np.stack(images), np.stack(c2w), [intr] * len(images),
                      ["reference"] + [f"view_{i:02d}" for i in range(len(novel))], w)


def normalize_mesh(mesh: TexturedMesh) -> tuple[TexturedMesh, dict]:
    """Centre the bounding box at the origin and scale into the unit sphere."""
    lo, hi = mesh.vertices.min(0), mesh.vertices.max(0)
    center = 0.5 * (lo + hi)
    radius = float(np.linalg.norm(mesh.vertices - center, axis=1).max())
    scale = 1.0 / max(radius, 1e-9)
    return mesh.copy(vertices=(mesh.vertices - center) * scale), {"center": center.tolist(), "scale": scale}


def _framed_reference(image: np.ndarray, s: GenerateSettings, generator: NovelViewGenerator | None, plan: dict,
                      timings: dict) -> tuple:
    """Segment and frame the reference; estimate its elevation when ``s.reference_elevation`` is
    None (Auto) and a generator can make probe views (without one, Auto means 0). Sets
    ``s.reference_elevation`` (the refiner reads it there). Returns (matte, framed reference,
    framing, elevation report)."""
    t = time.perf_counter()
    matte = foreground(image, s.segmenter)
    reference, framing = prepare_reference(matte.rgba)
    plan["segment"].update(1.0, f"foreground by {matte.method}, {matte.coverage:.0%} of the image", encode_png(reference))
    timings["segment"] = time.perf_counter() - t
    report = {"value": s.reference_elevation, "given": True}
    if s.reference_elevation is None and generator is None:
        s.reference_elevation = 0.0
        report = {"value": 0.0, "given": False, "used": False, "method": "default (no generator to estimate it)"}
    elif s.reference_elevation is None:  # estimated: the elevation under which the model's probe views agree
        t = time.perf_counter()
        est = estimate_elevation(reference, generator, plan["elevation"])
        s.reference_elevation = est.value
        report = {**est.to_dict(), "given": False}
        plan["elevation"].update(1.0, f"elevation {est.value:.1f} deg" + ("" if est.used else
                                 f" (estimate {est.degrees:.1f} deg not confident: {est.confidence:.2f})"))
        timings["elevation"] = time.perf_counter() - t
    return matte, reference, framing, report


def image_to_3d(image: np.ndarray, generator: NovelViewGenerator, settings: GenerateSettings | None = None,
                device: str = "cpu", progress: Progress = NULL, refiner: Callable | None = None,
                prior: PriorFactory | None = None) -> GenerateResult:
    """A reference image (RGB or RGBA float) to a normalised textured mesh. ``prior`` builds
    the guidances for score distillation on the Gaussians from the framed reference; without
    one (or with ``settings.distill.steps`` 0) the Gaussians are fitted to the views alone."""
    s = settings or GenerateSettings()
    distilling = prior is not None and s.distill.steps > 0
    plan = progress.stages({"segment": 1, "elevation": 3 if s.reference_elevation is None else 0.001, "novel_views": 20, "gaussians": 35, "distill": 30 if distilling else 0.001,
                            "surface": 15, "refine": 15 if (s.refine and refiner) else 0.001, "export": 1})
    timings: dict[str, float] = {}
    matte, reference, framing, elevation_report = _framed_reference(image, s, generator, plan, timings)
    t = time.perf_counter()
    poses = plan_views(s.views, s.reference_elevation)
    novel = generator(reference, s.reference_elevation, poses, plan["novel_views"])
    if len(novel) != len(poses):
        raise RuntimeError(f"the novel-view generator returned {len(novel)} views for {len(poses)} poses")
    mattes = [foreground(v, "border") for v in novel]  # generated views come on white: no matting model needed
    novel_rgba = np.stack([m.rgba for m in mattes])
    plan["novel_views"].update(1.0, f"{len(novel)} views", contact_sheet(novel_rgba))
    timings["novel_views"] = time.perf_counter() - t

    weights = view_weights(poses, s.novel_weight, s.away_weight)
    rig = rig_views(reference, novel_rgba, poses, s.reference_elevation, weights)
    asked = rig
    offset = None
    if s.fit_view_elevation:
        t = time.perf_counter()
        offset = estimate_elevation_offset(rig, np.zeros(3), range(1, len(rig)))
        if offset.used:
            rig = rig_views(reference, novel_rgba, [(d_el + offset.value, d_az, d_r) for d_el, d_az, d_r in poses],
                            s.reference_elevation, weights)
        timings["view_pose"] = time.perf_counter() - t
    views = rig
    rs = s.reconstruct
    rs.resolution = s.resolution
    rs.train.hull_consistency = min(rs.train.hull_consistency, 0.75)  # generated views disagree a little
    rs.mesh.hull_consistency = min(rs.mesh.hull_consistency, 0.75)
    rs.mesh.hull_binding = (0,)  # but the reference is the user's own image: nothing lies outside its mask
    # distilled Gaussians leave gaps in their shell; one view's depth through a gap would tunnel into the solid
    rs.mesh.depth_votes = max(rs.mesh.depth_votes, 4)
    rs.mesh.close_voxels = max(rs.mesh.close_voxels, 2)
    # the views' masks are each a little larger than what they agree on: the iso level fitted to them inflated
    # the surface (a degraded cube's faces 1-2 % of the diagonal out); fitted to the Gaussians' own renders it
    # keeps their object (degraded cube Chamfer 0.0147 -> 0.0131, suzanne 0.0070 -> 0.0058; perfect cube the same)
    rs.mesh.level_views = "gaussians"
    # at that level thin density breaks along edges and across thin walls: bites and small handles (captured
    # degraded Gaussians: cube genus 48, suzanne 25, mug 38); closing the solid by 2 voxels leaves 2, 0 and 8
    # (perfect mug 5 -> 2, its handle kept) at about the same Chamfer (0.0131 / 0.0054 / 0.0198 against
    # 0.0130 / 0.0058 / 0.0194)
    rs.mesh.fill_voxels = max(rs.mesh.fill_voxels, 2)
    if rs.resolution and max(views.width, views.height) != rs.resolution:
        views = views.resized(rs.resolution)
    t = time.perf_counter()
    registrations: list = []
    pose_update = None
    if s.register_views and len(views) > 1:
        rs.train.pose_update_at = tuple(s.register_views)
        origin = views.c2w.copy()  # where the views start: no view moves further than a model's pose error from it

        def pose_update(g_now, v_now):
            c2w, reg = register_views(g_now, v_now, range(1, len(v_now)), np.zeros(3), origin=origin)
            registrations.append(reg.to_dict())
            return c2w

    trained = train_gaussians(views, rs.train, device, plan["gaussians"], pose_update=pose_update)
    g = trained.gaussians
    if trained.c2w is not None:
        views = PosedViews(views.images, trained.c2w, list(views.intrinsics), list(views.names), views.weights)
    timings["gaussians"] = time.perf_counter() - t
    extra: dict = {"iterations": trained.iterations, **({"view_registration": registrations} if registrations else {})}
    if distilling:
        t = time.perf_counter()
        ds = s.distill
        ds.updates = s.view_updates
        if s.register_views:
            ds.register_updates = True
        guidances = list(prior(reference, s.reference_elevation))
        # the view updates ask the prior for the cameras the views were asked for
        d = distill_gaussians(g, views, guidances, ds, device, plan["distill"], asked=asked.c2w)
        g, views = d.gaussians, d.views
        timings["distill"] = time.perf_counter() - t
        extra.update({"distill_steps": ds.steps, "view_updates": d.report.updates, "prior": [x.name for x in guidances],
                      "view_disagreement": [d.report.initial_disagreement, d.report.view_disagreement],
                      **({"update_registration": d.report.registrations} if d.report.registrations else {}),
                      **({"prior_pose": d.report.prior_pose} if d.report.prior_pose else {})})
    t = time.perf_counter()
    rec = gaussians_to_textured_mesh(g, views, rs, device, plan["surface"], photos={0: rig.images[0]})
    timings["surface"] = time.perf_counter() - t
    timings.update({f"surface.{k}": v for k, v in rec.timings.items()})
    mesh = rec.mesh
    if s.refine and refiner is not None:
        t = time.perf_counter()
        mesh = refiner(mesh, rig, plan["refine"])  # the reference at full size
        timings["refine"] = time.perf_counter() - t
    mesh, norm = normalize_mesh(mesh)
    plan["export"].update(1.0)
    stats = {**rec.stats, **extra, "segmentation": matte.method, "reference_coverage": matte.coverage,
             "reframed": framing["reframed"], "views": len(novel),
             **({"view_elevation_offset": offset.to_dict()} if offset is not None else {}),
             "view_weights": [round(float(w), 3) for w in views.weights],
             "front": [0.0, -1.0, 0.0], "up": [0.0, 0.0, 1.0], "radius": 1.0, "elevation": elevation_report}
    return GenerateResult(mesh, reference, novel_rgba, norm, timings, stats,
                          g.moved(norm["center"], norm["scale"]).to("cpu"))


def text_to_3d_sds(guidances: Sequence[Guidance], settings: GenerateSettings | None = None, device: str = "cpu",
                   progress: Progress = NULL, refiner: Callable | None = None, front: np.ndarray | None = None,
                   front_prior: PriorFactory | None = None, generator: NovelViewGenerator | None = None) -> GenerateResult:
    """DreamFusion's text-to-3D on Gaussians (:mod:`backend.pipeline.dream`): score distillation
    from ``guidances`` (the text prior with view-dependent prompts, or an oracle) from a ball, then
    the mesh stages on the Gaussians' own renders from a fixed rig, whose front view stands for
    the reference (the result's ``reference``; ``views``: the rest).

    Anchored (Magic123-like) when ``front`` is given: a front view of the object (RGB or RGBA;
    segmented and framed as image-to-3D's reference, its elevation estimated with ``generator``
    when the settings say Auto) is fitted at its camera every step, ``front_prior`` adds the
    guidances conditioned on it (Zero-1-to-3), their weights times ``dream.anchor_weight`` per unit
    of classifier-free guidance (times the text prior's scale over theirs: Magic123's 1 : 40 at
    scales 100 : 5 is ``anchor_weight`` 2), and it becomes the reference: baked in place on the
    front and handed to the refiner first."""
    s = settings or GenerateSettings()
    anchored = front is not None
    plan = progress.stages({"segment": 1 if anchored else 0.001,
                            "elevation": 3 if anchored and s.reference_elevation is None and generator else 0.001,
                            "dream": 75, "surface": 15, "refine": 10 if (s.refine and refiner) else 0.001, "export": 1})
    timings: dict[str, float] = {}
    ds = s.dream
    ds.seed = s.seed
    guidances = list(guidances)
    reference, anchor_stats, poses = None, {}, RIG_POSES
    if anchored:
        matte, reference, framing, elevation = _framed_reference(front, s, generator, plan, timings)
        anchors = list(front_prior(reference, s.reference_elevation)) if front_prior is not None else []
        text_scale = max([g.guidance_scale for g in guidances] or [1.0])
        for a in anchors:  # per unit of classifier-free guidance: an SDS gradient grows about with its scale
            a.weight = a.weight * ds.anchor_weight * text_scale / max(a.guidance_scale, 1e-6)
        guidances += anchors
        poses = ((float(s.reference_elevation), 0.0),) + RIG_POSES[1:]
        anchor_stats = {"anchor": "front", "anchor_prior": [a.name for a in anchors], "segmentation": matte.method,
                        "reference_coverage": matte.coverage, "reframed": framing["reframed"], "elevation": elevation}
    t = time.perf_counter()
    d = dream_gaussians(guidances, ds, device, plan["dream"], reference=reference,
                        reference_elevation=float(s.reference_elevation or 0.0))
    g = d.gaussians.to("cpu")
    views = rig_renders(g, s.resolution, poses)
    plan["dream"].update(1.0, f"{ds.steps} steps", contact_sheet(views.images, cols=6, size=96))
    timings["dream"] = time.perf_counter() - t
    coverage = float((views.images[0, ..., 3] > 0.5).mean())
    if coverage < 1e-3:
        raise RuntimeError("score distillation left nothing visible from the front (all the Gaussians faded): "
                           "try another seed, more steps or a lower guidance")
    rs = s.reconstruct
    rs.resolution = 0  # the renders are made at the reconstruction's size
    rs.mesh.depth_votes = max(rs.mesh.depth_votes, 4)  # as for distilled image-to-3D Gaussians: gaps in the shell
    rs.mesh.close_voxels = max(rs.mesh.close_voxels, 2)
    t = time.perf_counter()
    rec = gaussians_to_textured_mesh(g, views, rs, device, plan["surface"], photos={0: reference} if anchored else None)
    timings["surface"] = time.perf_counter() - t
    timings.update({f"surface.{k}": v for k, v in rec.timings.items()})
    mesh = rec.mesh
    if s.refine and refiner is not None:
        t = time.perf_counter()
        ref_views = views
        if anchored:  # the front view at full size first, as image-to-3D hands its reference
            ref_views = PosedViews(reference[None], views.c2w[:1],
                                   [cam.Intrinsics.from_fov(math.radians(FOV_DEG), reference.shape[1], reference.shape[0])],
                                   ["reference"], np.ones(1))
        mesh = refiner(mesh, ref_views, plan["refine"])
        timings["refine"] = time.perf_counter() - t
    mesh, norm = normalize_mesh(mesh)
    plan["export"].update(1.0)
    stats = {**rec.stats, "method": "sds", "dream_steps": ds.steps, "dream_gaussians": len(g),
             "prior": [x.name for x in guidances], "prior_views": d.report.prior_views, "front_coverage": coverage,
             "anchor": "none", **anchor_stats,
             "views": len(views), "front": [0.0, -1.0, 0.0], "up": [0.0, 0.0, 1.0], "radius": 1.0}
    return GenerateResult(mesh, reference if anchored else views.images[0], views.images[1:], norm, timings, stats,
                          g.moved(norm["center"], norm["scale"]).to("cpu"))


def text_to_image(pipe, prompt: str, negative_prompt: str = "", steps: int = 30, guidance: float = 7.5, seed: int = 0,
                  size: int = 512, progress: Progress = NULL) -> np.ndarray:
    """The front view: an isolated object on a plain background. RGB float [size,size,3]."""
    full = PROMPT_TEMPLATE.format(prompt=prompt.strip())
    negative = ", ".join(x for x in (negative_prompt.strip(), NEGATIVE_PROMPT) if x)
    gen = torch.Generator("cpu").manual_seed(int(seed))

    def on_step(pipe_, i, t, kwargs):
        progress.update((i + 1) / steps, f"step {i + 1}/{steps}")
        return kwargs

    out = pipe(full, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance, generator=gen,
               height=size, width=size, output_type="np", callback_on_step_end=on_step)
    return np.asarray(out.images[0], np.float32)
