"""Job kinds ``text_to_3d`` and ``image_to_3d``: request parameters -> the generation
pipeline's settings (:mod:`backend.pipeline.generate`) -> GLB and metadata."""

from __future__ import annotations

import time

import numpy as np

from gen3d_wire.protocol import Attachment

from ..common.dataset import decode_image, encode_png
from ..common.progress import Progress
from ..gaussians.model import ply_bytes
from ..mesh.gltf import write_glb
from ..pipeline.generate import QUALITY, GenerateResult, GenerateSettings, image_to_3d, text_to_3d_sds, text_to_image
from ..pipeline.novel_views import Zero123Views, on_white
from ..pipeline.sds import StableDiffusionGuidance, Zero123Guidance
from ..service.jobs import AttachmentSpec, InputError, JobContext, JobInputs, JobOutput, JobSpec, Param
from .material import MATERIAL, TOPOLOGY, apply_material, apply_topology, quads_attachment


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
    s.reconstruct.train.max_gaussians = q["max_gaussians"][kind]  # the CPU renderer's cost grows with them
    s.distill.steps = pick("distill_steps", q["distill_steps"][kind]) if p.get("prior", True) else 0
    s.distill.seed = p["seed"]
    s.distill.views_per_step = q["prior_views"]
    # a sampled prior answers for a camera a few degrees off: register its answers (degraded views, standard:
    # suzanne 16.42 -> 18.17 dB, mug 15.14 -> 15.59, cube 18.27 -> 19.18; perfect suzanne 24.37 -> 23.53, a perfect
    # prior losing the part of its correction that a camera change explains too)
    s.distill.align_prior = True
    updates = p.get("view_updates", -1)
    s.view_updates = q["view_updates"] if updates is None or updates < 0 else updates
    s.register_views = tuple(q["register_views"])
    s.reconstruct.train.seed = p["seed"]
    apply_topology(s.reconstruct, p)
    s.dream.steps = pick("dream_steps", q["dream_steps"][kind])
    s.dream.gaussians = 3000 if kind == "cpu" else 10000
    s.reconstruct.bake.texture_size = pick("texture_size", q["texture_size"])
    apply_material(s.reconstruct.bake, p)
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
    Param("prior", bool, True, "score distillation from the novel-view model on the Gaussians (off: fit the sampled "
          "views alone)"),
    Param("distill_steps", int, 0, "score distillation steps on the Gaussians (0: by quality and device)", min=0,
          max=100000),
    Param("view_updates", int, -1, "times the novel views are re-rendered and passed back through the model during "
          "distillation (-1: by quality)", min=-1, max=20),
    Param("faces", int, 20000, "face budget of the mesh", min=100, max=2_000_000),
    Param("texture_size", int, 0, "texture size in pixels (0: by quality)", min=0, max=8192),
    Param("reference_elevation", float, None, "elevation (degrees) of the camera that saw the reference; null (the "
          "default): estimated from probe views of the novel-view model", min=-60.0, max=80.0, nullable=True),
    Param("refine", bool, True, "finish with SDS texture refinement"),
    Param("refine_steps", int, 0, "texture refinement steps (0: by quality)", min=0, max=10000),
    Param("ply", bool, False, "also return the Gaussians as gaussians.ply (the GLB's frame)", cli=False),
) + MATERIAL + TOPOLOGY
T2I = (
    Param("prompt", str, "", "what to make"),
    Param("negative_prompt", str, "", "what to avoid"),
    Param("steps", int, 0, "text-to-image steps (0: by quality)", min=0, max=500),
    Param("guidance", float, 7.5, "text-to-image classifier-free guidance", min=0.0, max=50.0),
)
METHOD = (
    Param("method", str, "image", "image: a front view from the text, lifted to 3D (fast) | sds: score distillation "
          "from the text prior on Gaussians over random views (DreamFusion's method: the back is the prior's, not "
          "one view's guess)", choices=("image", "sds")),
    Param("dream_steps", int, 0, "method sds: score distillation steps (0: by quality and device)", min=0, max=100000),
    Param("sds_guidance", float, 100.0, "method sds: the text prior's classifier-free guidance (DreamFusion: 100)",
          min=1.0, max=500.0),
    Param("anchor", str, "front", "method sds: front: a front view from the text (or the attached image) anchors "
          "the distillation, fitted at its camera with the novel-view model on it beside the text prior "
          "(Magic123-like: against objects with a second face on the back) | none: the text prior alone",
          choices=("front", "none")),
    Param("anchor_weight", float, 4.0, "method sds, anchor front: the novel-view model's weight beside the text "
          "prior's, per unit of guidance scale", min=0.0, max=100.0),
)


def _need_prompt(inputs: JobInputs) -> None:
    if not inputs.params["prompt"].strip():
        raise ValueError("a text job needs a non-empty 'prompt'")


def _check_text(inputs: JobInputs) -> None:
    _need_prompt(inputs)
    p = inputs.params
    if p.get("method") == "sds" and p.get("anchor") == "none" and "image" in inputs.attachments:
        raise ValueError("method 'sds' with anchor 'none' uses no front view: send the image with anchor 'front', "
                         "or with method 'image'")


def _models(ctx: JobContext):
    if ctx.models is None:
        raise InputError("this backend was started without models")
    return ctx.models


def _finish(result: GenerateResult, extra: dict, p: dict) -> JobOutput:
    files = [Attachment("model.glb", "model/gltf-binary", write_glb(result.mesh)),
             Attachment("reference.png", "image/png", encode_png(result.reference))]
    if p.get("ply") and result.gaussians is not None:
        files.append(Attachment("gaussians.ply", "application/octet-stream", ply_bytes(result.gaussians)))
    quads, quad_meta = quads_attachment(result.mesh, p)
    if quads is not None:
        files.append(quads)
    extra = {**extra, **quad_meta}
    timings = {"text_to_image": extra.pop("text_to_image_seconds")} if "text_to_image_seconds" in extra else {}
    meta = {**result.stats, **extra, "normalization": result.normalization, "timings": {**timings, **result.timings}}
    return JobOutput(files, meta)


def _refiner(inputs: JobInputs, ctx: JobContext, prompt: str, settings: GenerateSettings):
    try:
        from ..pipeline.refine import pipeline_refiner
    except ImportError:
        return None
    return pipeline_refiner(ctx.models, prompt, inputs.params.get("negative_prompt", ""), settings, ctx.device)


def _generate(inputs: JobInputs, ctx: JobContext, image: np.ndarray, prompt: str, extra: dict,
              progress: Progress) -> JobOutput:
    s = settings_from_params(inputs.params, ctx.device)
    models = _models(ctx)
    gen = Zero123Views(models.zero123(), s.view_steps, s.view_guidance, s.seed)
    refiner = _refiner(inputs, ctx, prompt, s) if s.refine else None
    result = image_to_3d(image, gen, s, ctx.device, progress, refiner, zero123_prior(models))
    return _finish(result, {**extra, "material": apply_material(s.reconstruct.bake, inputs.params)}, inputs.params)


def zero123_prior(models, guidance_scale: float = 5.0):
    """Score distillation's guidance for image-to-3D: Zero-1-to-3 on the framed reference
    (DreamGaussian's guidance scale)."""

    def build(reference_rgba: np.ndarray, elevation: float):
        return [Zero123Guidance(models.zero123(), on_white(reference_rgba), elevation, guidance_scale)]

    return build


def _front_view(inputs: JobInputs, ctx: JobContext, models) -> tuple[np.ndarray, dict, Progress]:
    """The text job's front view: the attached one (a candidate chosen from text_to_image's), or one
    made from the prompt (progress stage ``text_to_image``). Returns (image, metadata, the progress
    left for the rest of the job)."""
    p = inputs.params
    extra = {"prompt": p["prompt"], "models": models.describe()}
    if "image" in inputs.attachments:
        image = decode_image(inputs.attachments["image"], ctx.limits.max_image_pixels, "the chosen front view")
        return image, dict(extra, front_view="chosen"), ctx.progress
    plan = ctx.progress.stages({"text_to_image": 10, "generate": 90})
    t0 = time.perf_counter()
    image = text_to_image(models.stable_diffusion(), p["prompt"], p["negative_prompt"],
                          p["steps"] or QUALITY[p["quality"]]["steps"], p["guidance"], p["seed"],
                          progress=plan["text_to_image"])
    plan["text_to_image"].update(1.0, "front view", encode_png(image))
    return image, dict(extra, text_to_image_seconds=time.perf_counter() - t0), plan["generate"]


def _handle_text(inputs: JobInputs, ctx: JobContext) -> JobOutput:
    p = inputs.params
    models = _models(ctx)
    if p.get("method") == "sds":
        return _dream(inputs, ctx, models)
    image, extra, progress = _front_view(inputs, ctx, models)  # then lifted to 3D
    return _generate(inputs, ctx, image, p["prompt"], extra, progress)


def _dream(inputs: JobInputs, ctx: JobContext, models) -> JobOutput:
    """Method ``sds``: the text prior (view-dependent prompts) distilled into Gaussians, anchored (by default) on a
    front view, the attached one or one made from the text; then the mesh stages."""
    p = inputs.params
    s = settings_from_params(p, ctx.device)
    s.dream.anchor_weight = p["anchor_weight"]
    anchored = p["anchor"] == "front"
    if anchored:
        front, extra, progress = _front_view(inputs, ctx, models)
    else:
        front, extra, progress = None, {"prompt": p["prompt"], "models": models.describe()}, ctx.progress
    extra["material"] = apply_material(s.reconstruct.bake, p)
    size = 512 if _device_kind(ctx.device) == "cuda" else 128
    guidance = StableDiffusionGuidance(models.stable_diffusion(), p["prompt"], p["negative_prompt"], p["sds_guidance"],
                                       size=size)
    refiner = None
    if s.refine:
        from ..pipeline.refine import pipeline_refiner

        refiner = pipeline_refiner(models, p["prompt"], p["negative_prompt"], s, ctx.device, reference=anchored)
    generator = Zero123Views(models.zero123(), s.view_steps, s.view_guidance, s.seed) if anchored else None
    result = text_to_3d_sds([guidance], s, ctx.device, progress, refiner, front,
                            zero123_prior(models) if anchored else None, generator)
    return _finish(result, extra, p)


def _handle_fronts(inputs: JobInputs, ctx: JobContext) -> JobOutput:
    """``count`` front views of the prompt, seeds ``seed``, ``seed + 1``, ...: the candidates an artist picks
    one of before lifting it to 3D (``text_to_3d`` with it as ``image``, and its seed)."""
    p = inputs.params
    models = _models(ctx)
    steps = p["steps"] or QUALITY[p["quality"]]["steps"]
    seeds = [min(p["seed"] + i, 2**31 - 1) for i in range(p["count"])]
    plan = ctx.progress.stages({f"front {i + 1}": 1.0 for i in range(len(seeds))})
    files, t0 = [], time.perf_counter()
    for i, seed in enumerate(seeds):
        pr = plan[f"front {i + 1}"]
        image = text_to_image(models.stable_diffusion(), p["prompt"], p["negative_prompt"], steps, p["guidance"],
                              seed, progress=pr)
        png = encode_png(image)
        pr.update(1.0, f"front view {i + 1} of {len(seeds)} (seed {seed})", png)
        files.append(Attachment(f"front_{i}.png", "image/png", png))
    return JobOutput(files, {"prompt": p["prompt"], "seeds": seeds, "steps": steps, "models": models.describe(),
                             "seconds_per_image": (time.perf_counter() - t0) / len(seeds)})


def _handle_image(inputs: JobInputs, ctx: JobContext) -> JobOutput:
    image = decode_image(inputs.attachments["image"], ctx.limits.max_image_pixels, "the reference image")
    return _generate(inputs, ctx, image, inputs.params["prompt"], {"models": _models(ctx).describe()}, ctx.progress)


TEXT_SPEC = JobSpec(
    kind="text_to_3d",
    description="Prompt -> front view -> novel views -> textured mesh, or (method sds) prompt -> score distillation "
                "on Gaussians -> textured mesh (GLB, unit sphere, front -Y).",
    handler=_handle_text,
    params=T2I + METHOD + COMMON,
    attachments=(AttachmentSpec("image", "image", False, "optional: the front view to lift (one of text_to_image's "
                                                         "candidates); the prompt then serves the refinement"),),
    check=_check_text,
)
FRONTS_SPEC = JobSpec(
    kind="text_to_image",
    description="Prompt -> several front views (seed variations), to choose the one text_to_3d lifts.",
    handler=_handle_fronts,
    params=T2I + (Param("quality", str, "standard", "draft | standard | high: the steps when not given",
                        choices=tuple(QUALITY)),
                  Param("seed", int, 0, "the first candidate's seed; the others count up", min=0, max=2**31 - 1),
                  Param("count", int, 4, "how many candidates", min=1, max=8)),
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
