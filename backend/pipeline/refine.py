"""Texture refinement as a composition: a mesh from GLB, the reference registered to it,
the priors, and the refiner that ends ``image_to_3d``. The maths is in
:mod:`backend.pipeline.sds`; the job kind in :mod:`backend.kinds.refine`."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch


from ..common import cameras as cam
from ..common.dataset import resize_rgba
from ..common.errors import InputError
from ..mesh.gltf import read_glb
from ..mesh.textured import TexturedMesh, vertex_normals
from ..mesh.uv import unwrap
from ..mesh.raster import rasterize_mesh
from ..common.metrics import mask_iou
from .novel_views import FILL, FOV_DEG, on_white, prepare_reference
from ..common.progress import NULL, Progress
from .sds import RefineSettings, StableDiffusionGuidance, Zero123Guidance, refine_texture


# ---------------------------------------------------------------------------
# inputs


def parse_cameras(data: dict) -> list[tuple[np.ndarray, cam.Intrinsics]]:
    """Scene cameras: ``{"frames": [{"transform_matrix", and Blender lens data
    (lens, sensor_width, sensor_height, sensor_fit, w, h, shift_x, shift_y) or
    fl_x/fl_y/cx/cy/w/h}]}``; also plain NeRF ``camera_angle_x``."""
    if not isinstance(data, dict) or not isinstance(data.get("frames"), list) or not data["frames"]:
        raise InputError("cameras: expected {\"frames\": [...]} with at least one camera")
    out = []
    for i, fr in enumerate(data["frames"]):
        where = f"camera {i}" + (f" ({fr.get('name')})" if isinstance(fr, dict) and fr.get("name") else "")
        if not isinstance(fr, dict) or "transform_matrix" not in fr:
            raise InputError(f"{where}: needs a transform_matrix")
        try:
            m = np.asarray(fr["transform_matrix"], np.float64)
            cam.check_c2w(m, "camera")
        except (TypeError, ValueError) as exc:
            raise InputError(f"{where}: {exc}") from None

        def num(key, default=None):
            v = fr.get(key, data.get(key, default))
            if v is not None and (not isinstance(v, (int, float)) or not math.isfinite(v)):
                raise InputError(f"{where}: {key} must be a finite number")
            return v

        w, h = num("w", 1920), num("h", 1080)
        if w <= 0 or h <= 0:
            raise InputError(f"{where}: image size must be positive")
        s = 256 / max(w, h)  # only the shape matters: refinement renders at its own size
        if num("lens") is not None:
            if num("lens") <= 0:
                raise InputError(f"{where}: lens must be positive")
            try:
                k = cam.Intrinsics.from_blender(num("lens"), num("sensor_width", 36.0), num("sensor_height", 24.0),
                                                str(fr.get("sensor_fit", "AUTO")), int(w), int(h),
                                                num("shift_x", 0.0) or 0.0, num("shift_y", 0.0) or 0.0)
            except ValueError as exc:
                raise InputError(f"{where}: {exc}") from None
        elif num("fl_x") is not None:
            fx = num("fl_x")
            k = cam.Intrinsics(fx, num("fl_y", fx), num("cx", w / 2), num("cy", h / 2), int(w), int(h))
        elif num("camera_angle_x") is not None:
            k = cam.Intrinsics.from_fov(num("camera_angle_x"), int(w), int(h))
        else:
            raise InputError(f"{where}: no lens, fl_x or camera_angle_x: the field of view is unknown")
        out.append((cam.orthonormalize_c2w(m), k.scaled(max(1, round(w * s)), max(1, round(h * s)))))
    return out


# xatlas's time grows faster than the face count (on 2 CPU cores: 20k faces 2.7 s, 82k 19 s,
# 327k over 6 minutes, whatever its chart and pack options): a mesh without UVs above this is
# refused up front with what to do, rather than left unwrapping for minutes
MAX_UNWRAP_FACES = 100_000


def mesh_from_glb(data: bytes, texture_size: int = 0) -> tuple[TexturedMesh, str]:
    """The one mesh of a GLB, ready to refine, keeping its stored positions.
    Returns (mesh, uv_source)."""
    prims = read_glb(data)
    if len(prims) > 1:
        names = ", ".join(sorted({p.name for p in prims}))
        raise InputError(f"the GLB holds {len(prims)} meshes/materials ({names}); refine one mesh with one material "
                         "at a time (the add-on sends the active object)")
    p = prims[0]
    world = p.world_vertices()
    faces = p.indices
    raw = p.positions
    normals_raw = p.normals
    if p.uv is None and len(faces) > MAX_UNWRAP_FACES:
        raise InputError(f"the mesh has {len(faces):,} triangles and no UV map; unwrapping that many here would take "
                         f"minutes. Give it UVs first (in Blender: UV > Smart UV Project), or reduce it under "
                         f"{MAX_UNWRAP_FACES:,} triangles (a Decimate modifier), then refine again")
    if p.uv is None:
        vmap, faces_new, uv = unwrap(world, faces, texture_size or 1024)
        world, raw, faces = world[vmap], raw[vmap], faces_new
        normals_raw = normals_raw[vmap] if normals_raw is not None else None
        uv_source = "xatlas"
    else:
        uv = p.uv
        uv_source = "input"
    size = texture_size or (p.texture.shape[0] if p.texture is not None else 1024)
    if p.texture is not None:
        tex = p.texture * np.asarray(p.base_color[:3], np.float32)
        if tex.shape[:2] != (size, size):
            tex = resize_rgba(np.concatenate([tex, np.ones(tex.shape[:2] + (1,), np.float32)], -1), size, size)[..., :3]
    else:
        tex = np.broadcast_to(np.asarray(p.base_color[:3], np.float32), (size, size, 3)).copy()
    extras = {"gltf_positions": raw, "gltf_matrix": p.world, "gltf_normals": normals_raw}
    # the material's other parts pass through; a normal map only with the UVs it was made for
    normal_map = p.normal_map if uv_source == "input" else None
    if normal_map is not None:
        extras["gltf_tangents"] = p.tangents
    mesh = TexturedMesh(world, faces, uv.astype(np.float32), tex.astype(np.float32), vertex_normals(world, faces),
                        name=p.name, extras=extras, normal_map=normal_map, metallic=p.metallic, roughness=p.roughness)
    return mesh, uv_source


REGISTRATION_MIN_IOU = 0.8  # below this the image probably does not show this mesh from that side
REGISTRATION_FOVS = (FOV_DEG, 30.0, 65.0, 20.0)  # fields of view tried, the rig's first (it wins ties)


@dataclass
class Registration:
    """Where the reference image is seen from, found by matching silhouettes."""

    c2w: np.ndarray
    intr: cam.Intrinsics
    iou: float  # the mesh's rendered mask against the reference's mask
    distance: float  # camera distance from the mesh's bounding-box centre
    offset_px: tuple  # principal point shift (x, y) that centres the silhouettes, in reference pixels


def _mask_box(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    return (x0 + x1) / 2, (y0 + y1) / 2, float(x1 - x0), float(y1 - y0)


def _mesh_mask(vertices: torch.Tensor, faces: torch.Tensor, c2w, k: cam.Intrinsics) -> np.ndarray:
    return rasterize_mesh(vertices, faces, c2w, k).mask.cpu().numpy()


def register_reference(mask: np.ndarray, vertices: np.ndarray, faces: np.ndarray, elevation: float = 0.0,
                       azimuth: float = 0.0, fov_deg: float = FOV_DEG, iterations: int = 6) -> Registration:
    """The camera, looking at the mesh from (``elevation``, ``azimuth``) with field of
    view ``fov_deg``, under which the mesh's silhouette best matches ``mask``
    [H, W] (bool): the distance matches the silhouettes' sizes, a principal point
    shift matches their centres (a few fixed-point rounds, perspective included).
    ``iou`` says how well the two agree in the end."""
    h, w = mask.shape
    ref_box = _mask_box(mask)
    if ref_box is None:
        raise InputError("the reference image has no foreground")
    lo, hi = vertices.min(0), vertices.max(0)
    center = 0.5 * (lo + hi)
    radius = float(np.linalg.norm(vertices - center, axis=1).max())
    V = torch.as_tensor(vertices, dtype=torch.float32)
    Fc = torch.as_tensor(faces)
    base = cam.Intrinsics.from_fov(math.radians(fov_deg), w, h)
    dist = radius / (FILL * math.tan(math.radians(fov_deg) / 2))
    dx = dy = 0.0

    def camera(d, ox, oy):
        k = cam.Intrinsics(base.fx, base.fy, base.cx + ox, base.cy + oy, w, h)
        return cam.spherical_to_c2w(elevation, azimuth, d, center), k

    for _ in range(iterations):
        c2w, k = camera(dist, dx, dy)
        box = _mask_box(_mesh_mask(V, Fc, c2w, k))
        if box is None:  # nothing in view: start over from farther away
            dist *= 2.0
            continue
        size_ratio = max(box[2], box[3]) / max(ref_box[2], ref_box[3])
        dist = max(dist * size_ratio, radius * 1.05)  # apparent size goes as 1 / distance
        dx += ref_box[0] - box[0]
        dy += ref_box[1] - box[1]
        if abs(size_ratio - 1) < 1e-3 and abs(ref_box[0] - box[0]) < 0.25 and abs(ref_box[1] - box[1]) < 0.25:
            break
    c2w, k = camera(dist, dx, dy)
    iou = mask_iou(_mesh_mask(V, Fc, c2w, k).astype(np.float32), mask.astype(np.float32))
    return Registration(c2w, k, float(iou), float(dist), (float(dx), float(dy)))


def reference_view(image: np.ndarray, mesh: TexturedMesh, elevation: float = 0.0) -> tuple[np.ndarray, Registration]:
    """The reference image framed as the generation rig frames it (object centred,
    80 % of the frame), and the front (-Y) camera registered to it by silhouette."""
    from .segment import foreground

    rgba, _ = prepare_reference(foreground(image).rgba)
    mask = rgba[..., 3] > 0.5
    # the photo's field of view is unknown: the rig's first, others where perspective fits better
    best = None
    for fov in REGISTRATION_FOVS:
        reg = register_reference(mask, mesh.vertices, mesh.faces, elevation, fov_deg=fov)
        if best is None or reg.iou > best.iou + 0.005:
            best = reg
    return rgba, best


# ---------------------------------------------------------------------------
# composition


def build_guidances(models, prompt: str, negative: str, reference_rgba: np.ndarray | None, reference_elevation: float,
                    text_scale: float, image_scale: float, device: str) -> list:
    gs = []
    if prompt.strip():
        gs.append(StableDiffusionGuidance(models.stable_diffusion(), prompt, negative, text_scale,
                                          size=512 if str(device).startswith("cuda") else 128))
    if reference_rgba is not None:
        gs.append(Zero123Guidance(models.zero123(), on_white(reference_rgba), reference_elevation, image_scale,
                                  weight=1.0 if not gs else 0.5))
    return gs


def keep_resident(models):
    """The models' "keep the prior on the GPU while refining" scope, where they have one."""
    keep = getattr(models, "resident_for_refinement", None)
    return keep() if keep is not None else contextlib.nullcontext()


def pipeline_refiner(models, prompt: str, negative: str, settings, device: str, reference: bool = True):
    """The last stage of text_to_3d / image_to_3d: refine the baked texture with the
    text prior (when a prompt exists) and Zero-1-to-3 on the reference view (``views``'
    first; ``reference`` False: the text prior alone, as for score-distilled text-to-3D,
    whose first view is its own render, not a user's image)."""

    def run(mesh: TexturedMesh, views, progress: Progress = NULL) -> TexturedMesh:
        ref_rgba = views.images[0] if reference else None
        s = RefineSettings(steps=settings.refine_steps, update="sdedit", seed=settings.seed, lr=0.02)
        gs = build_guidances(models, prompt, negative, ref_rgba, settings.reference_elevation or 0.0, 7.5, 3.0, device)
        ref = (ref_rgba, views.c2w[0], views.intrinsics[0]) if reference else None
        with keep_resident(models):
            new, _ = refine_texture(mesh, gs, s, reference=ref, device=device, progress=progress)
        return new

    return run
