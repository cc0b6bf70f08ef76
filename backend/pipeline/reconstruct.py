"""Posed views -> 3D Gaussians -> clean textured mesh: the reconstruction pipeline
(job kind: :mod:`backend.kinds.reconstruct`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch


from ..common import cameras as cam
from ..common.dataset import PosedViews, resize_rgba
from ..gaussians.init import inside_hull
from ..gaussians.model import Gaussians
from ..gaussians.render import renderer_name
from ..gaussians.train import TrainSettings, train_gaussians
from ..mesh.bake import BakeSettings, BakeView, bake_normal_map, bake_texture, sphere_cameras
from ..mesh.clean import CleanSettings, clean_mesh, mesh_topology
from ..mesh.extract import (FieldNormals, Grid, calibrated_surface, centre_density, close_solid, density_grid, free_space,
                            gaussian_bounds, marching_cubes, surface_field)
from ..mesh.textured import TexturedMesh, vertex_normals
from ..mesh.quads import fit_quad_budget
from ..mesh.silhouette import grow_to_mask, snap_to_mask
from ..mesh.uv import unwrap, uv_seams
from ..common.progress import NULL, Progress


@dataclass
class MeshSettings:
    grid_resolution: int = 128
    level: float = 0.0  # iso level of the density (0: calibrated on the views' silhouettes)
    carve_views: int = 26  # extra views around the object used to find free space
    hull_consistency: float = 0.9  # a voxel outside the masks of more than 10 % of the views is empty
    hull_binding: tuple[int, ...] = ()  # ... or outside the mask of one of these views (known to be right)
    depth_votes: int = 1  # a voxel in front of the rendered depth in this many views is empty
    close_voxels: int = 0  # free channels into the solid narrower than about twice this are filled
    fill_voxels: int = 0  # dents and tunnels of the final solid narrower than about twice this are filled (genus)
    # vertices that project this many pixels or less outside a binding view's mask are moved onto its outline
    # (backend.mesh.silhouette; 0: never). The hull holds the surface only to its dilation and a voxel: the cube's
    # outline reached a pixel past its reference's, 98 % of that view's error (bench, 256 px: 25.5 dB, snapped 41.5)
    snap_px: float = 3.0
    # ... and grown out onto it where the mesh leaves more than this fraction of its pixels uncovered (1: never).
    # A gate of 1.5 % kept perfect-view suzanne's held-out figures (24.17 dB, else 23.23) but left the degraded
    # cube's reference 11 dB down (26.88 against 32.78 grown): the user's own view comes first
    grow_shortfall: float = 0.0
    level_views: str = "views"  # what the iso level's silhouettes are matched to: the "views"' masks, or "gaussians" (their renders)
    clean: CleanSettings = field(default_factory=CleanSettings)


@dataclass
class ReconstructSettings:
    train: TrainSettings = field(default_factory=TrainSettings)
    mesh: MeshSettings = field(default_factory=MeshSettings)
    bake: BakeSettings = field(default_factory=BakeSettings)
    resolution: int = 0  # resize views so the long side is this (0: as given)
    bake_resolution: int = 0  # Gaussian renders for baking (0: twice the views', at most 512)
    name: str = "gen3d"
    # quads: the mesh is decimated further until its triangles pair into this many polygons (within 3 %;
    # backend.mesh.quads.fit_quad_budget), made with twice as many triangles (0: triangles, at the face budget)
    quad_budget: int = 0


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


@torch.no_grad()
def rendered_views(g: Gaussians, views: PosedViews, keep: tuple[int, ...] = ()) -> PosedViews:
    """The Gaussians' own renders (straight-alpha RGBA) at the views' cameras; the views
    ``keep`` stay as they are."""
    rig = [(views.c2w[i], views.intrinsics[i]) for i in range(len(views))]
    images = np.stack([b.rgba for b in render_views(g, rig)]).astype(np.float32)
    for i in keep:
        images[i] = views.images[i]
    return PosedViews(images, views.c2w, views.intrinsics, views.names, views.weights)


@dataclass
class ExtractedMesh:
    vertices: np.ndarray  # [V,3] world space, after clean-up and decimation
    faces: np.ndarray  # [F,3]
    normals: np.ndarray  # [V,3]
    level: float  # the density's iso level
    detail: FieldNormals  # the surface before decimation: its normals at any point near it
    snapped: int = 0  # vertices moved onto a binding view's outline (in from past it, or out to it)


def gaussians_to_mesh(g: Gaussians, views: PosedViews, settings: MeshSettings, progress: Progress = NULL,
                      photos: dict | None = None) -> ExtractedMesh:
    """Density grid, free-space carving from renders, marching cubes, clean-up (world space);
    then the outline held to the binding views' masks (``photos`` {view index: RGBA}: those
    views at full size, where given)."""
    lo, hi = gaussian_bounds(g)
    grid = density_grid(g, settings.grid_resolution, (lo, hi))
    progress.update(0.3, "density grid")
    center = 0.5 * (lo + hi)
    dist, fov = view_rig(views, center)
    res = max(64, min(256, max(views.width, views.height)))
    rig = [(views.c2w[i], views.intrinsics[i]) for i in range(len(views))]
    if settings.carve_views:
        rig += sphere_cameras(center, dist, fov, res)[: settings.carve_views]
    free = free_space(grid, g, rig, depth_votes=settings.depth_votes)
    # the surface cannot leave the views' visual hull: floaters outside it are not object
    dims = grid.values.shape
    ii, jj, kk = np.meshgrid(*[np.arange(d) for d in dims], indexing="ij")
    hull = inside_hull(grid.world(np.stack([ii, jj, kk], -1).reshape(-1, 3)).astype(np.float32), views,
                       settings.hull_consistency, dilate=2, binding=tuple(settings.hull_binding)).reshape(dims)
    grid.values[~hull] = 0.0
    free = close_solid(free, settings.close_voxels) | ~hull
    progress.update(0.5, "free space")
    if settings.level > 0:
        level = settings.level
    else:
        if settings.level_views not in ("views", "gaussians"):
            raise ValueError(f"level_views must be 'views' or 'gaussians', not {settings.level_views!r}")
        # the binding views (the user's own reference) are right: their masks stay
        cal = views if settings.level_views == "views" else rendered_views(g, views, tuple(settings.hull_binding))
        v, f, level, _ = calibrated_surface(grid, free, cal, centre_density(grid, g))
    # the solid at that level, its small dents and tunnels filled (settings.fill_voxels; the level is searched without
    # the filling: the same level on the bench's six captured cases, each search step a closing cheaper)
    field_ = surface_field(grid, free, level, settings.fill_voxels)
    if settings.level > 0 or settings.fill_voxels > 0:
        v, f = marching_cubes(Grid(field_, grid.origin, grid.voxel), level, fill=False)
    progress.update(0.7, f"marching cubes at level {level:g}: {len(f)} faces")
    v, f, n = clean_mesh(v, f, settings.clean)
    snapped = 0
    if settings.snap_px > 0 and settings.hull_binding:
        for i in settings.hull_binding:
            img = (photos or {}).get(i, views.images[i])
            k = views.intrinsics[i].scaled(img.shape[1], img.shape[0])
            px = settings.snap_px * img.shape[1] / views.width
            v, moved = snap_to_mask(v, img[..., 3], views.c2w[i], k, px)
            v, grown = grow_to_mask(v, f, img[..., 3], views.c2w[i], k, px, min_shortfall=settings.grow_shortfall)
            snapped += moved + grown
        if snapped:
            n = vertex_normals(v, f)
    detail = FieldNormals(field_, grid.origin, grid.voxel, level)
    return ExtractedMesh(v, f, n, level, detail, snapped)


def reconstruct(views: PosedViews, settings: ReconstructSettings | None = None, device: str = "cpu",
                progress: Progress = NULL) -> ReconstructResult:
    s = settings or ReconstructSettings()
    if s.resolution and max(views.width, views.height) != s.resolution:
        views = views.resized(s.resolution)
    plan = progress.stages({"gaussians": 70, "surface": 30})

    t = time.perf_counter()
    trained = train_gaussians(views, s.train, device, plan["gaussians"])
    seconds = time.perf_counter() - t
    rec = gaussians_to_textured_mesh(trained.gaussians, views, s, device, plan["surface"])
    rec.timings = {"gaussians": seconds, **rec.timings}
    rec.stats["iterations"] = trained.iterations
    return rec


def gaussians_to_textured_mesh(g: Gaussians, views: PosedViews, settings: ReconstructSettings | None = None,
                               device: str = "cpu", progress: Progress = NULL, photos: dict | None = None
                               ) -> ReconstructResult:
    """Trained Gaussians -> clean mesh -> UVs -> texture baked from the Gaussians' renders.
    ``views`` (at the resolution the Gaussians were fitted to) bound the surface (visual
    hull) and calibrate its iso level. ``photos`` {view index: RGBA}: images baked in place
    of the Gaussians' render at those views, with priority (:class:`BakeView`: the user's
    reference colours the side it shows squarely with its own pixels, not the Gaussians' blur)."""
    s = settings or ReconstructSettings()
    timings: dict[str, float] = {}
    plan = progress.stages({"mesh": 8, "uv": 6, "texture": 16})

    t = time.perf_counter()
    p = plan["mesh"]
    em = gaussians_to_mesh(g, views, s.mesh, p, photos)
    v, f, n, level = em.vertices, em.faces, em.normals, em.level
    timings["mesh"] = time.perf_counter() - t
    topo = mesh_topology(v, f)

    t = time.perf_counter()
    plan["uv"].update(0.0, f"unwrapping {len(f)} faces")
    pairs, quad_stats = None, {}
    if s.quad_budget > 0:
        fit = fit_quad_budget(v, f, n, s.quad_budget, s.bake.texture_size)
        v, f, n, vmap, uf, uv, pairs = fit.vertices, fit.faces, fit.normals, fit.vmap, fit.uv_faces, fit.uv, fit.pairs
        topo = mesh_topology(v, f)
        quad_stats = {"quad_passes": fit.passes, "quad_pairs_fraction": 2 * len(pairs) / max(len(uf), 1)}
    else:
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
    for i, img in (photos or {}).items():
        k = bake_views[i].intr
        if img.shape[:2] != (k.height, k.width):
            img = resize_rgba(img, k.width, k.height)
        bake_views[i] = BakeView(bake_views[i].c2w, k, np.asarray(img, np.float32), priority=True)
    tex, covered = bake_texture(uvv, uf, uv, uvn, bake_views, s.bake, plan["texture"])
    timings["texture"] = time.perf_counter() - t
    normal_map = None
    if s.bake.normal_map:
        t = time.perf_counter()
        # the surface before decimation, seen through the decimated mesh's tangent frames
        normal_map, _ = bake_normal_map(uvv, uf, uv, uvn, lambda p, nr: em.detail(p, nr, 0.3), int(tex.shape[0]))
        timings["normal_map"] = time.perf_counter() - t
    mesh = TexturedMesh(uvv, uf, uv, tex, uvn, name=s.name, normal_map=normal_map,
                        metallic=s.bake.metallic, roughness=s.bake.roughness, quad_pairs=pairs)
    stats = {
        "views": len(views),
        "view_size": [views.width, views.height],
        "gaussians": len(g),
        "vertices": int(len(uvv)),
        "faces": int(len(uf)),
        "iso_level": level,
        "snapped_vertices": em.snapped,
        "watertight": topo["watertight"],
        "boundary_edges": topo["boundary_edges"],
        "non_manifold_edges": topo["non_manifold_edges"],
        "components": topo["components"],
        "genus": topo["genus"],
        "texture_size": int(tex.shape[0]),
        "texture_coverage": float(covered.mean()),  # texels some view saw
        "atlas_use": atlas_use(uv, uf, int(tex.shape[0])),  # texels inside UV islands
        **{f"uv_{k}": v for k, v in uv_seams(f, uf).items()},  # uv_charts, uv_seam_edges, ...
        **quad_stats,
        "bounds": [v.min(0).tolist(), v.max(0).tolist()],
        "device": str(device),
        "renderer": renderer_name(device),
    }
    return ReconstructResult(mesh, g, timings, stats)


def atlas_use(uv: np.ndarray, faces: np.ndarray, size: int) -> float:
    """Fraction of a ``size`` x ``size`` texture's texels that lie inside the UV islands."""
    from ..mesh.raster import rasterize_uv

    r = rasterize_uv(torch.as_tensor(uv, dtype=torch.float32), torch.as_tensor(faces, dtype=torch.long), size)
    return float(r.mask.float().mean())


def _scaled_size(views: PosedViews, long_side: int) -> tuple[int, int]:
    s = long_side / max(views.width, views.height)
    return max(1, round(views.width * s)), max(1, round(views.height * s))
