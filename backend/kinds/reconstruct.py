"""Job kind ``reconstruct``: posed views (NeRF-synthetic transforms.json and images) ->
:func:`backend.pipeline.reconstruct.reconstruct` -> GLB (and the Gaussians as PLY)."""

from __future__ import annotations

import json
from pathlib import Path

from gen3d_wire.protocol import Attachment

from ..common.dataset import views_from_meta
from ..gaussians.model import ply_bytes
from ..mesh.gltf import write_glb
from ..pipeline.reconstruct import ReconstructSettings, reconstruct
from ..service.jobs import AttachmentSpec, InputError, JobContext, JobInputs, JobOutput, JobSpec, Param
from .material import MATERIAL, TOPOLOGY, apply_material, apply_topology, quads_attachment


def _check_background(v):
    if len(v) != 3 or not all(isinstance(x, (int, float)) and 0 <= x <= 1 for x in v):
        raise ValueError("must be three numbers in [0, 1]")
    return [float(x) for x in v]


def settings_from_params(p: dict) -> ReconstructSettings:
    s = ReconstructSettings()
    s.train.iterations = p["iterations"]
    s.train.seed = p["seed"]
    s.resolution = p["resolution"]
    apply_topology(s, p)
    s.bake.texture_size = p["texture_size"]
    s.mesh.grid_resolution = p["grid_resolution"]
    apply_material(s.bake, p)
    return s


COMMON_PARAMS = (
    Param("iterations", int, 0, "Gaussian training steps (0: by device)", min=0, max=100000),
    Param("faces", int, 20000, "face budget of the mesh", min=100, max=2_000_000),
    Param("texture_size", int, 1024, "texture size in pixels", min=64, max=8192),
    Param("seed", int, 0, "random seed", min=0, max=2**31 - 1),
    Param("grid_resolution", int, 128, "density grid resolution for mesh extraction", min=32, max=512),
) + MATERIAL + TOPOLOGY


def _handle(inputs: JobInputs, ctx: JobContext) -> JobOutput:
    p = inputs.params
    atts = inputs.attachments
    meta = json.loads(atts["transforms.json"].decode("utf-8"))

    def read(fp: str) -> bytes:
        for name in (fp, fp + ".png", "views/" + fp, "views/" + fp + ".png"):
            if name in atts:
                return atts[name]
        raise InputError(f"transforms.json names {fp!r} but no attachment of that name was sent")

    views = views_from_meta(meta, read, background=p["background"], max_pixels=ctx.limits.max_image_pixels)
    settings = settings_from_params(p)
    result = reconstruct(views, settings, ctx.device, ctx.progress)
    out = [Attachment("model.glb", "model/gltf-binary", write_glb(result.mesh))]
    if p["ply"]:
        out.append(Attachment("gaussians.ply", "application/octet-stream", ply_bytes(result.gaussians)))
    quads, quad_meta = quads_attachment(result.mesh, p)
    if quads is not None:
        out.append(quads)
    material = {"kind": "pbr" if settings.bake.normal_map else "albedo", "metallic": settings.bake.metallic,
                "roughness": settings.bake.roughness, "normal_map": settings.bake.normal_map}
    return JobOutput(out, {**result.stats, **quad_meta, "material": material, "timings": result.timings})


SPEC = JobSpec(
    kind="reconstruct",
    description="Posed RGBA views (NeRF-synthetic transforms.json) -> textured mesh (GLB) in the views' world frame.",
    handler=_handle,
    params=COMMON_PARAMS + (
        Param("resolution", int, 0, "resize views so their long side is this many pixels (0: as sent)", min=0, max=4096),
        Param("background", list, None, "RGB background of views without alpha", nullable=True, check=_check_background, cli=False),
        Param("ply", bool, False, "also return the Gaussians as gaussians.ply", cli=False),
    ),
    attachments=(
        AttachmentSpec("transforms.json", "json", True, "NeRF-synthetic camera file; file_path names the view attachments"),
        AttachmentSpec("views/", "image", True, "the view images, named 'views/<file_path>'", multiple=True),
    ),
)


def pack_transforms(path: str | Path) -> list[Attachment]:
    """A transforms.json and its images as job attachments (file paths renamed 'views/NNN.png')."""
    from ..common.dataset import resolve_image_path

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} not found")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{path} is not valid JSON: {exc}") from None
    frames = meta.get("frames")
    if not isinstance(frames, list):
        raise InputError(f"{path} has no 'frames' list")
    atts = []
    for i, fr in enumerate(frames):
        if not isinstance(fr, dict) or "file_path" not in fr:
            raise InputError(f"{path} frame {i} has no file_path")
        img = resolve_image_path(path.parent, str(fr["file_path"]))
        name = f"views/{i:04d}{img.suffix.lower()}"
        fr["file_path"] = name
        atts.append(Attachment(name, "image/png" if img.suffix.lower() == ".png" else "image/jpeg", img.read_bytes()))
    return [Attachment("transforms.json", "application/json", json.dumps(meta).encode())] + atts
