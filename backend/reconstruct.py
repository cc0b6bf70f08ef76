"""Posed views -> 3D Gaussians -> clean textured mesh: the reconstruction pipeline,
its ``reconstruct`` job kind and CLI verb."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from gen3d_wire.protocol import Attachment

from . import cameras as cam
from .dataset import PosedViews, views_from_meta
from .gaussians.init import inside_hull
from .gaussians.model import Gaussians, save_ply
from .gaussians.render import renderer_name
from .gaussians.train import TrainSettings, train_gaussians
from .jobs import AttachmentSpec, InputError, JobContext, JobInputs, JobOutput, JobSpec, Param
from .mesh.bake import BakeSettings, BakeView, bake_texture, sphere_cameras
from .mesh.clean import CleanSettings, clean_mesh
from .mesh.extract import calibrated_surface, centre_density, density_grid, free_space, gaussian_bounds, solid_surface
from .mesh.gltf import write_glb
from .mesh.textured import TexturedMesh
from .mesh.uv import unwrap
from .progress import NULL, Progress


@dataclass
class MeshSettings:
    grid_resolution: int = 128
    level: float = 0.0  # iso level of the density (0: calibrated on the views' silhouettes)
    carve_views: int = 26  # extra views around the object used to find free space
    hull_consistency: float = 0.9  # a voxel outside the masks of more than 10 % of the views is empty
    clean: CleanSettings = field(default_factory=CleanSettings)


@dataclass
class ReconstructSettings:
    train: TrainSettings = field(default_factory=TrainSettings)
    mesh: MeshSettings = field(default_factory=MeshSettings)
    bake: BakeSettings = field(default_factory=BakeSettings)
    resolution: int = 0  # resize views so the long side is this (0: as given)
    bake_resolution: int = 0  # Gaussian renders for baking (0: twice the views', at most 512)
    name: str = "gen3d"


@dataclass
class ReconstructResult:
    mesh: TexturedMesh
    gaussians: Gaussians
    timings: dict
    stats: dict


def view_rig(views: PosedViews, center: np.ndarray) -> tuple[float, float]:
    """Median camera distance to ``center`` and median horizontal field of view (degrees)."""
    dist = float(np.median(np.linalg.norm(views.c2w[:, :3, 3] - center, axis=1)))
    fov = float(np.degrees(np.median([k.fov_x for k in views.intrinsics])))
    return dist, fov


@torch.no_grad()
def render_views(g: Gaussians, rig: list[tuple[np.ndarray, cam.Intrinsics]]) -> list[BakeView]:
    out = []
    for c2w, k in rig:
        col, al, _ = g.render(c2w[None], k, background=None)
        rgb = col[0] / al[0].clamp_min(1e-6)
        out.append(BakeView(c2w, k, torch.cat([rgb, al[0]], -1).clamp(0, 1).cpu().numpy()))
    return out


def gaussians_to_mesh(g: Gaussians, views: PosedViews, settings: MeshSettings, progress: Progress = NULL):
    """Density grid, free-space carving from renders, marching cubes, clean-up.
    Returns (vertices, faces, normals, iso level) in world space."""
    lo, hi = gaussian_bounds(g)
    grid = density_grid(g, settings.grid_resolution, (lo, hi))
    progress.update(0.3, "density grid")
    center = 0.5 * (lo + hi)
    dist, fov = view_rig(views, center)
    res = max(64, min(256, max(views.width, views.height)))
    rig = [(views.c2w[i], views.intrinsics[i]) for i in range(len(views))]
    if settings.carve_views:
        rig += sphere_cameras(center, dist, fov, res)[: settings.carve_views]
    free = free_space(grid, g, rig)
    # the surface cannot leave the views' visual hull: floaters outside it are not object
    dims = grid.values.shape
    ii, jj, kk = np.meshgrid(*[np.arange(d) for d in dims], indexing="ij")
    hull = inside_hull(grid.world(np.stack([ii, jj, kk], -1).reshape(-1, 3)).astype(np.float32), views,
                       settings.hull_consistency, dilate=2).reshape(dims)
    grid.values[~hull] = 0.0
    free |= ~hull
    progress.update(0.5, "free space")
    if settings.level > 0:
        v, f = solid_surface(grid, free, settings.level)
        level = settings.level
    else:
        v, f, level, _ = calibrated_surface(grid, free, views, centre_density(grid, g))
    progress.update(0.7, f"marching cubes at level {level:g}: {len(f)} faces")
    v, f, n = clean_mesh(v, f, settings.clean)
    return v, f, n, level


def reconstruct(views: PosedViews, settings: ReconstructSettings | None = None, device: str = "cpu",
                progress: Progress = NULL) -> ReconstructResult:
    s = settings or ReconstructSettings()
    timings: dict[str, float] = {}
    if s.resolution and max(views.width, views.height) != s.resolution:
        views = views.resized(s.resolution)
    plan = progress.stages({"gaussians": 70, "mesh": 8, "uv": 6, "texture": 16})

    t = time.perf_counter()
    trained = train_gaussians(views, s.train, device, plan["gaussians"])
    g = trained.gaussians
    timings["gaussians"] = time.perf_counter() - t

    t = time.perf_counter()
    p = plan["mesh"]
    v, f, n, level = gaussians_to_mesh(g, views, s.mesh, p)
    timings["mesh"] = time.perf_counter() - t

    t = time.perf_counter()
    plan["uv"].update(0.0, f"unwrapping {len(f)} faces")
    vmap, uf, uv = unwrap(v, f, s.bake.texture_size, normals=n)
    uvv, uvn = v[vmap], n[vmap]
    timings["uv"] = time.perf_counter() - t

    t = time.perf_counter()
    center = 0.5 * (v.min(0) + v.max(0))
    dist, fov = view_rig(views, center)
    bres = s.bake_resolution or min(512, 2 * max(views.width, views.height))
    rig = [(views.c2w[i], views.intrinsics[i].scaled(*_scaled_size(views, bres))) for i in range(len(views))]
    rig += sphere_cameras(center, dist, fov, bres)
    bake_views = render_views(g, rig)
    tex, covered = bake_texture(uvv, uf, uv, uvn, bake_views, s.bake, plan["texture"])
    timings["texture"] = time.perf_counter() - t
    mesh = TexturedMesh(uvv, uf, uv, tex, uvn, name=s.name)
    stats = {
        "views": len(views),
        "view_size": [views.width, views.height],
        "iterations": trained.iterations,
        "gaussians": len(g),
        "vertices": int(len(uvv)),
        "faces": int(len(uf)),
        "iso_level": level,
        "texture_size": int(tex.shape[0]),
        "texture_coverage": float(covered.mean()),
        "bounds": [v.min(0).tolist(), v.max(0).tolist()],
        "device": str(device),
        "renderer": renderer_name(device),
    }
    return ReconstructResult(mesh, g, timings, stats)


def _scaled_size(views: PosedViews, long_side: int) -> tuple[int, int]:
    s = long_side / max(views.width, views.height)
    return max(1, round(views.width * s)), max(1, round(views.height * s))


# ---------------------------------------------------------------------------
# job kind


def _check_background(v):
    if len(v) != 3 or not all(isinstance(x, (int, float)) and 0 <= x <= 1 for x in v):
        raise ValueError("must be three numbers in [0, 1]")
    return [float(x) for x in v]


def settings_from_params(p: dict) -> ReconstructSettings:
    s = ReconstructSettings()
    s.train.iterations = p["iterations"]
    s.train.seed = p["seed"]
    s.resolution = p["resolution"]
    s.mesh.clean.target_faces = p["faces"]
    s.bake.texture_size = p["texture_size"]
    s.mesh.grid_resolution = p["grid_resolution"]
    return s


COMMON_PARAMS = (
    Param("iterations", int, 0, "Gaussian training steps (0: by device)", min=0, max=100000),
    Param("faces", int, 20000, "face budget of the mesh", min=100, max=2_000_000),
    Param("texture_size", int, 1024, "texture size in pixels", min=64, max=8192),
    Param("seed", int, 0, "random seed", min=0, max=2**31 - 1),
    Param("grid_resolution", int, 128, "density grid resolution for mesh extraction", min=32, max=512),
)


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
    result = reconstruct(views, settings_from_params(p), ctx.device, ctx.progress)
    out = [Attachment("model.glb", "model/gltf-binary", write_glb(result.mesh))]
    if p["ply"]:
        import tempfile

        with tempfile.NamedTemporaryFile(suffix=".ply") as fh:
            save_ply(result.gaussians, fh.name)
            out.append(Attachment("gaussians.ply", "application/octet-stream", Path(fh.name).read_bytes()))
    return JobOutput(out, {**result.stats, "timings": result.timings})


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
    from .dataset import resolve_image_path

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


def _configure(p) -> None:
    from .cli import add_param_flags

    p.add_argument("transforms", help="NeRF-synthetic transforms.json (views next to it)")
    p.add_argument("--out", required=True, help="output GLB")
    p.add_argument("--ply", default=None, help="also write the Gaussians as a standard 3DGS .ply")
    p.add_argument("--background", type=float, nargs=3, default=None, metavar=("R", "G", "B"),
                   help="background colour (0-1) of views without alpha")
    add_param_flags(p, SPEC)


def _run(args) -> int:
    from .cli import params_from_args, run_job, write_outputs

    params = params_from_args(args, SPEC)
    params["ply"] = bool(args.ply)
    if args.background is not None:
        params["background"] = list(args.background)
    meta, files = run_job(args, "reconstruct", params, pack_transforms(args.transforms))
    for p in write_outputs(files, {"model.glb": args.out, "gaussians.ply": args.ply}):
        print(p)
    t = meta.get("timings", {})
    print(f"{meta.get('faces')} faces, {meta.get('gaussians')} gaussians, texture {meta.get('texture_size')} px; "
          + ", ".join(f"{k} {v:.1f}s" for k, v in t.items()))
    return 0


CLI = (_configure, _run)
