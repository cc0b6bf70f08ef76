"""Text or image -> textured mesh: the generation pipeline, its job kinds and CLI verb.

    prompt -> text-to-image front view -> foreground
    image  -> foreground
    reference (RGBA) -> framed reference -> novel views (Zero-1-to-3 or any
    NovelViewGenerator) -> posed views on the canonical rig -> reconstruction
    -> (SDS texture refinement) -> mesh centred at the origin, in the unit
    sphere, front facing -Y -> GLB
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from gen3d_wire.protocol import Attachment

from . import cameras as cam
from .dataset import PosedViews, decode_image, encode_png
from .jobs import AttachmentSpec, InputError, JobContext, JobInputs, JobOutput, JobSpec, Param
from .mesh.gltf import write_glb
from .mesh.textured import TexturedMesh
from .novel_views import (FOV_DEG, RADIUS, SIZE, NovelViewGenerator, Zero123Views, absolute_pose, contact_sheet,
                          on_white, plan_views, prepare_reference)
from .progress import NULL, Progress
from .reconstruct import ReconstructSettings, reconstruct
from .segment import foreground

# the image becomes the reference at azimuth 0 (the object's front, seen from -Y): ask for exactly that view
PROMPT_TEMPLATE = ("{prompt}, front view, a single isolated object, centered, full view, plain white background, "
                   "studio lighting, product photo")
NEGATIVE_PROMPT = ("back view, side view, top view, cropped, out of frame, multiple objects, text, watermark, shadow, "
                   "busy background, blurry, low quality, deformed")

# quality presets: what each sets unless the request gives it explicitly
QUALITY = {
    "draft": {"steps": 20, "views": 8, "view_steps": 30, "iterations": {"cpu": 250, "cuda": 1500}, "texture_size": 512,
              "refine_steps": 20, "resolution": {"cpu": 96, "cuda": 256}},
    "standard": {"steps": 30, "views": 12, "view_steps": 50, "iterations": {"cpu": 450, "cuda": 3000}, "texture_size": 1024,
                 "refine_steps": 40, "resolution": {"cpu": 128, "cuda": 256}},
    "high": {"steps": 50, "views": 16, "view_steps": 75, "iterations": {"cpu": 1000, "cuda": 6000}, "texture_size": 2048,
             "refine_steps": 100, "resolution": {"cpu": 128, "cuda": 256}},
}


@dataclass
class GenerateSettings:
    views: int = 12
    view_steps: int = 50
    view_guidance: float = 3.0
    reference_elevation: float = 0.0
    seed: int = 0
    segmenter: str = "auto"
    resolution: int = 128  # reconstruction works on views of this size
    reconstruct: ReconstructSettings = field(default_factory=ReconstructSettings)
    refine: bool = True
    refine_steps: int = 40


@dataclass
class GenerateResult:
    mesh: TexturedMesh  # normalised: centred at the origin, in the unit sphere, front -Y
    reference: np.ndarray  # the framed reference, RGBA
    views: np.ndarray  # the novel views, RGBA
    normalization: dict  # center, scale: world = v / scale + center, in the reconstruction's frame
    timings: dict
    stats: dict


def rig_camera(elevation: float, azimuth: float, radius: float = RADIUS) -> np.ndarray:
    return cam.spherical_to_c2w(elevation, azimuth, radius)


def rig_views(reference: np.ndarray, novel: np.ndarray, poses, reference_elevation: float) -> PosedViews:
    """The reference and the novel views as posed views on the canonical rig."""
    intr = cam.Intrinsics.from_fov(math.radians(FOV_DEG), reference.shape[1], reference.shape[0])
    images = [reference.astype(np.float32)]
    c2w = [rig_camera(reference_elevation, 0.0)]
    for img, pose in zip(novel, poses):
        el, az, r = absolute_pose(pose, reference_elevation)
        images.append(img.astype(np.float32))
        c2w.append(rig_camera(el, az, r))
    return PosedViews(np.stack(images), np.stack(c2w), [intr] * len(images),
                      ["reference"] + [f"view_{i:02d}" for i in range(len(novel))])


def normalize_mesh(mesh: TexturedMesh) -> tuple[TexturedMesh, dict]:
    """Centre the bounding box at the origin and scale into the unit sphere."""
    lo, hi = mesh.vertices.min(0), mesh.vertices.max(0)
    center = 0.5 * (lo + hi)
    radius = float(np.linalg.norm(mesh.vertices - center, axis=1).max())
    scale = 1.0 / max(radius, 1e-9)
    return mesh.copy(vertices=(mesh.vertices - center) * scale), {"center": center.tolist(), "scale": scale}


def image_to_3d(image: np.ndarray, generator: NovelViewGenerator, settings: GenerateSettings | None = None,
                device: str = "cpu", progress: Progress = NULL, refiner: Callable | None = None) -> GenerateResult:
    """A reference image (RGB or RGBA float) to a normalised textured mesh."""
    s = settings or GenerateSettings()
    plan = progress.stages({"segment": 1, "novel_views": 20, "reconstruct": 60, "refine": 15 if (s.refine and refiner) else 0.001,
                            "export": 1})
    timings: dict[str, float] = {}
    t = time.perf_counter()
    p = plan["segment"]
    matte = foreground(image, s.segmenter)
    reference, framing = prepare_reference(matte.rgba)
    p.update(1.0, f"foreground by {matte.method}, {matte.coverage:.0%} of the image", encode_png(reference))
    timings["segment"] = time.perf_counter() - t

    t = time.perf_counter()
    poses = plan_views(s.views, s.reference_elevation)
    novel = generator(reference, s.reference_elevation, poses, plan["novel_views"])
    if len(novel) != len(poses):
        raise RuntimeError(f"the novel-view generator returned {len(novel)} views for {len(poses)} poses")
    mattes = [foreground(v, "border") for v in novel]  # generated views come on white: no matting model needed
    novel_rgba = np.stack([m.rgba for m in mattes])
    plan["novel_views"].update(1.0, f"{len(novel)} views", contact_sheet(novel_rgba))
    timings["novel_views"] = time.perf_counter() - t

    views = rig_views(reference, novel_rgba, poses, s.reference_elevation)
    rs = s.reconstruct
    rs.resolution = s.resolution
    rs.train.hull_consistency = min(rs.train.hull_consistency, 0.75)  # generated views disagree a little
    rs.mesh.hull_consistency = min(rs.mesh.hull_consistency, 0.75)
    t = time.perf_counter()
    rec = reconstruct(views, rs, device, plan["reconstruct"])
    timings["reconstruct"] = time.perf_counter() - t
    timings.update({f"reconstruct.{k}": v for k, v in rec.timings.items()})
    mesh = rec.mesh
    if s.refine and refiner is not None:
        t = time.perf_counter()
        mesh = refiner(mesh, views, plan["refine"])
        timings["refine"] = time.perf_counter() - t
    mesh, norm = normalize_mesh(mesh)
    plan["export"].update(1.0)
    stats = {**rec.stats, "segmentation": matte.method, "reference_coverage": matte.coverage, "reframed": framing["reframed"],
             "views": len(novel), "front": [0.0, -1.0, 0.0], "up": [0.0, 0.0, 1.0], "radius": 1.0}
    return GenerateResult(mesh, reference, novel_rgba, norm, timings, stats)


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


# ---------------------------------------------------------------------------
# jobs


def _device_kind(device: str) -> str:
    return "cuda" if str(device).startswith("cuda") else "cpu"


def settings_from_params(p: dict, device: str) -> GenerateSettings:
    q = QUALITY[p["quality"]]
    kind = _device_kind(device)

    def pick(name, default):
        v = p.get(name)
        return default if v in (None, 0) else v

    s = GenerateSettings()
    s.views = pick("views", q["views"])
    s.view_steps = pick("view_steps", q["view_steps"])
    s.view_guidance = p["view_guidance"]
    s.reference_elevation = p["reference_elevation"]
    s.seed = p["seed"]
    s.refine = p["refine"]
    s.refine_steps = pick("refine_steps", q["refine_steps"])
    s.resolution = q["resolution"][kind]
    s.reconstruct.train.iterations = pick("iterations", q["iterations"][kind])
    s.reconstruct.train.seed = p["seed"]
    s.reconstruct.mesh.clean.target_faces = p["faces"]
    s.reconstruct.bake.texture_size = pick("texture_size", q["texture_size"])
    s.reconstruct.name = "gen3d"
    return s


COMMON = (
    Param("quality", str, "standard", "draft | standard | high: sets the step counts not given explicitly",
          choices=tuple(QUALITY)),
    Param("seed", int, 0, "random seed (the same seed gives the same result)", min=0, max=2**31 - 1),
    Param("views", int, 0, "novel views to generate (0: by quality)", min=0, max=64),
    Param("view_steps", int, 0, "denoising steps per novel view (0: by quality)", min=0, max=500),
    Param("view_guidance", float, 3.0, "classifier-free guidance of the novel-view model", min=0.0, max=20.0),
    Param("iterations", int, 0, "Gaussian training steps (0: by quality and device)", min=0, max=100000),
    Param("faces", int, 20000, "face budget of the mesh", min=100, max=2_000_000),
    Param("texture_size", int, 0, "texture size in pixels (0: by quality)", min=0, max=8192),
    Param("reference_elevation", float, 0.0, "elevation (degrees) of the camera that saw the reference", min=-60.0, max=80.0),
    Param("refine", bool, True, "finish with SDS texture refinement"),
    Param("refine_steps", int, 0, "texture refinement steps (0: by quality)", min=0, max=10000),
)
T2I = (
    Param("prompt", str, "", "what to make"),
    Param("negative_prompt", str, "", "what to avoid"),
    Param("steps", int, 0, "text-to-image steps (0: by quality)", min=0, max=500),
    Param("guidance", float, 7.5, "text-to-image classifier-free guidance", min=0.0, max=50.0),
)


def _need_prompt(inputs: JobInputs) -> None:
    if not inputs.params["prompt"].strip():
        raise ValueError("'text_to_3d' needs a non-empty 'prompt'")


def _models(ctx: JobContext):
    if ctx.models is None:
        raise InputError("this backend was started without models")
    return ctx.models


def _finish(result: GenerateResult, extra: dict) -> JobOutput:
    files = [Attachment("model.glb", "model/gltf-binary", write_glb(result.mesh)),
             Attachment("reference.png", "image/png", encode_png(result.reference))]
    extra = dict(extra)
    timings = {"text_to_image": extra.pop("text_to_image_seconds")} if "text_to_image_seconds" in extra else {}
    meta = {**result.stats, **extra, "normalization": result.normalization, "timings": {**timings, **result.timings}}
    return JobOutput(files, meta)


def _refiner(inputs: JobInputs, ctx: JobContext, prompt: str, settings: GenerateSettings):
    try:
        from .refine import pipeline_refiner
    except ImportError:
        return None
    return pipeline_refiner(ctx.models, prompt, inputs.params.get("negative_prompt", ""), settings, ctx.device)


def _generate(inputs: JobInputs, ctx: JobContext, image: np.ndarray, prompt: str, extra: dict,
              progress: Progress) -> JobOutput:
    s = settings_from_params(inputs.params, ctx.device)
    models = _models(ctx)
    gen = Zero123Views(models.zero123(), s.view_steps, s.view_guidance, s.seed)
    refiner = _refiner(inputs, ctx, prompt, s) if s.refine else None
    result = image_to_3d(image, gen, s, ctx.device, progress, refiner)
    return _finish(result, extra)


def _handle_text(inputs: JobInputs, ctx: JobContext) -> JobOutput:
    p = inputs.params
    models = _models(ctx)
    q = QUALITY[p["quality"]]
    plan = ctx.progress.stages({"text_to_image": 10, "generate": 90})
    t0 = time.perf_counter()
    image = text_to_image(models.stable_diffusion(), p["prompt"], p["negative_prompt"], p["steps"] or q["steps"],
                          p["guidance"], p["seed"], progress=plan["text_to_image"])
    plan["text_to_image"].update(1.0, "front view", encode_png(image))
    extra = {"prompt": p["prompt"], "models": models.describe(), "text_to_image_seconds": time.perf_counter() - t0}
    return _generate(inputs, ctx, image, p["prompt"], extra, plan["generate"])


def _handle_image(inputs: JobInputs, ctx: JobContext) -> JobOutput:
    image = decode_image(inputs.attachments["image"], ctx.limits.max_image_pixels, "the reference image")
    return _generate(inputs, ctx, image, inputs.params["prompt"], {"models": _models(ctx).describe()}, ctx.progress)


TEXT_SPEC = JobSpec(
    kind="text_to_3d",
    description="Prompt -> front view -> novel views -> textured mesh (GLB, unit sphere, front -Y).",
    handler=_handle_text,
    params=T2I + COMMON,
    check=_need_prompt,
)
IMAGE_SPEC = JobSpec(
    kind="image_to_3d",
    description="Reference image -> novel views -> textured mesh (GLB, unit sphere, front -Y).",
    handler=_handle_image,
    params=(Param("prompt", str, "", "optional description, used by the texture refinement"),
            Param("negative_prompt", str, "", "what to avoid in the refinement")) + COMMON,
    attachments=(AttachmentSpec("image", "image", True, "the reference image; RGBA alpha = the object's mask"),),
)


def _configure(p) -> None:
    from .cli import add_param_flags

    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="text prompt (text_to_3d)")
    src.add_argument("--image", help="reference image file (image_to_3d)")
    p.add_argument("--out", required=True, help="output GLB")
    p.add_argument("--reference-out", default=None, help="also write the framed reference image (PNG)")
    add_param_flags(p, TEXT_SPEC, skip=("prompt",))


def _run(args) -> int:
    from pathlib import Path

    from .cli import params_from_args, run_job, write_outputs

    if args.prompt is not None:
        kind, params, atts = "text_to_3d", params_from_args(args, TEXT_SPEC), []
        params["prompt"] = args.prompt
    else:
        path = Path(args.image)
        if not path.is_file():
            raise InputError(f"{path} not found")
        kind = "image_to_3d"
        params = {k: v for k, v in params_from_args(args, TEXT_SPEC).items() if k not in ("steps", "guidance")}
        atts = [Attachment("image", "image/png", path.read_bytes())]
    meta, files = run_job(args, kind, params, atts)
    for p in write_outputs(files, {"model.glb": args.out, "reference.png": args.reference_out}):
        print(p)
    t = meta.get("timings", {})
    print(f"{meta.get('faces')} faces, {meta.get('views')} novel views; "
          + ", ".join(f"{k} {v:.1f}s" for k, v in t.items() if "." not in k))
    return 0


CLI = (_configure, _run)
