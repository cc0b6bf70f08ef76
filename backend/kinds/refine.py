"""Job kind ``refine_texture``: a GLB, a prompt and/or a reference image, optional scene
cameras -> :func:`backend.pipeline.sds.refine_texture` -> GLB with the same triangles."""

from __future__ import annotations

import json
import math

from gen3d_wire.protocol import Attachment

from ..common.dataset import decode_image
from ..mesh.gltf import check_glb, write_glb
from ..pipeline.refine import (REGISTRATION_MIN_IOU, build_guidances, keep_resident, mesh_from_glb, parse_cameras,
                               reference_view)
from ..pipeline.sds import RefineSettings, refine_texture
from ..service.jobs import AttachmentSpec, InputError, JobContext, JobInputs, JobOutput, JobSpec, Param


def _handle(inputs: JobInputs, ctx: JobContext) -> JobOutput:
    p = inputs.params
    atts = inputs.attachments
    plan = ctx.progress.stages({"load": 5, "refine": 90, "export": 5})
    mesh, uv_source = mesh_from_glb(atts["mesh"], p["texture_size"])
    plan["load"].update(1.0, f"{len(mesh.faces)} faces, UVs from {uv_source}")
    cameras = []
    if "cameras" in atts:
        cameras = parse_cameras(json.loads(atts["cameras"].decode("utf-8")))
    reference = None
    warnings = []
    registration = None
    if "image" in atts:
        img = decode_image(atts["image"], ctx.limits.max_image_pixels, "the reference image")
        rgba, reg = reference_view(img, mesh, p["reference_elevation"])
        reference = (rgba, reg.c2w, reg.intr)
        registration = {"iou": reg.iou, "distance": reg.distance, "fov_deg": math.degrees(reg.intr.fov_x),
                        "offset_px": list(reg.offset_px)}
        if reg.iou < REGISTRATION_MIN_IOU:
            warnings.append(f"the reference image matches the mesh's front silhouette poorly (IoU {reg.iou:.2f}); "
                            "it probably does not show this mesh from the front (-Y) at this elevation")
            plan["load"].update(1.0, warnings[-1])
    if not p["prompt"].strip() and reference is None:
        raise InputError("refine_texture needs a prompt or a reference image")
    if ctx.models is None:
        raise InputError("this backend was started without models")
    s = RefineSettings(steps=p["steps"], update=p["update"], seed=p["seed"], lr=p["lr"],
                       camera_prob=0.5 if cameras else 0.0, reference_weight=p["reference_weight"],
                       prior_weight=p["prior_weight"])
    gs = build_guidances(ctx.models, p["prompt"], p["negative_prompt"], reference[0] if reference else None,
                         p["reference_elevation"], p["guidance"], p["image_guidance"], ctx.device)
    with keep_resident(ctx.models):
        new, report = refine_texture(mesh, gs, s, cameras, reference, ctx.device, plan["refine"])
    glb = write_glb(new)
    plan["export"].update(1.0)
    meta = {"uv_source": uv_source, "faces": int(len(new.faces)), "vertices": int(len(new.vertices)),
            "texture_size": int(new.texture.shape[0]), "steps": report.steps, "scene_cameras": len(cameras),
            "update": p["update"], "timings": {"refine": report.seconds}, "final_loss": report.losses[-1] if report.losses else None,
            "prior_views": report.prior_views, "scene_views_without_prior": report.scene_views_dropped}
    if registration is not None:
        meta["reference_registration"] = registration
    if warnings:
        meta["warnings"] = warnings
    return JobOutput([Attachment("model.glb", "model/gltf-binary", glb)], meta)


SPEC = JobSpec(
    kind="refine_texture",
    description="Refine or restyle the texture of a mesh (GLB) by score distillation; geometry unchanged.",
    handler=_handle,
    params=(
        Param("prompt", str, "", "what the texture should look like"),
        Param("negative_prompt", str, "", "what to avoid"),
        Param("seed", int, 0, "random seed", min=0, max=2**31 - 1),
        Param("steps", int, 100, "refinement steps", min=1, max=20000),
        Param("texture_size", int, 0, "texture size (0: keep the mesh's, or 1024)", min=0, max=8192),
        Param("guidance", float, 100.0, "text guidance scale (SDS needs a high one)", min=0.0, max=500.0),
        Param("image_guidance", float, 4.0, "Zero-1-to-3 guidance scale", min=0.0, max=50.0),
        Param("update", str, "sds", "update rule: sds | sdedit | csd", choices=("sds", "sdedit", "csd")),
        Param("lr", float, 0.03, "texture learning rate", min=1e-5, max=1.0),
        Param("reference_weight", float, 1.0, "weight of the reference view's per-pixel MSE (the priors' losses "
              "are per-element means too)", min=0.0, max=1e4),
        Param("prior_weight", float, 1.0, "weight of the priors (text and image) against the reference", min=0.0, max=1e4),
        Param("reference_elevation", float, 0.0, "elevation of the reference image's camera", min=-60.0, max=80.0),
    ),
    attachments=(
        AttachmentSpec("mesh", "glb", True, "the mesh to refine (one mesh, world transform applied)", check=check_glb),
        AttachmentSpec("image", "image", False, "optional reference image (seen from the front, -Y)"),
        AttachmentSpec("cameras", "json", False, "optional scene cameras to refine what they see"),
    ),
)
