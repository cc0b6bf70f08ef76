"""Image-to-3D quality, the way a user meets it: one reference image, novel views from a
generator, the product's settings, and the truth to compare with.

    python bench/image_to_3d.py [--objects suzanne mug cube] [--views perfect degraded]
                                [--quality standard] [--prior oracle|none] [--test 8]
                                [--resolution 128] [--seed 0] [--renders DIR] [--json FILE]
                                [--faults unseen=0 gain=0 ...] [--prior-faults same|none]
                                [--posterior exact|wiener] [--on-white]
                                [--prior-fault elevation_bias_deg=0 ...] [--set distill.prior_weight=1 ...]

For each object (suzanne: concavities and a photographic texture; mug: a thin handle and
a hollow; cube: flat faces and sharp edges, a photograph on each) and each kind of novel
view:

* ``perfect``: :class:`evaluation.oracle.OracleViews`, the true object rendered by Blender
  where Zero-1-to-3's camera vector points;
* ``degraded``: :class:`evaluation.oracle.DegradedOracleViews`, the same with
  Zero-1-to-3-like faults drawn per view (pose jitter and elevation bias, scale drift,
  blur, colour drift, a differently hallucinated unseen side);

Score distillation's prior is the oracle denoiser on the true object
(:func:`evaluation.oracle.oracle_prior`); for degraded views it samples like Zero-1-to-3
too, with the same kind of faults drawn on every call, so it is right on average but never
exactly (``--prior none``: the Gaussians are fitted to the views alone). ``--posterior``
says what the oracle's SDEdit passes (the view updates) return: ``exact`` its truth (for degraded
views a fresh faulty sample) whatever the strength, ``wiener`` the input's frequencies that the
pass's noise leaves, the rest from the truth, as a trained denoiser would. ``--faults`` and
``--prior-fault`` switch single faults off (or up) for the views and the prior, so that each
fault's cost can be measured; ``--set`` changes any setting of the job; ``--on-white`` hands the job
the novel views as RGB on white, as Zero-1-to-3 returns them, so that its own matting runs as in the
product (by default the views keep the renderer's alpha).

``image_to_3d`` runs on the oracle's reference image (refinement off: its priors need
real weights), the mesh is put back in the truth's frame, and the script prints held-out
PSNR (textured mesh vs Blender truth over the union of masks, on white), mask IoU,
Chamfer and F-score at 1 % of the truth's diagonal, the reference view's own PSNR, wall
time, peak memory, whether the mesh is watertight, UV figures (atlas use, charts, the fraction of
edges cut by seams, the normal map's bake time) and seam pixels (the seam test on this mesh's UVs:
a smooth colour field baked onto them, close-ups at 4 pixels per texel, white or black pixels
inside the silhouette), and how much of the truth lies recessed (seen from under a fifth of the
directions around it: a cup's inside) with the recall at 1 % of the recessed part and of the rest
(Chamfer and F mix them). ``--renders``: held-out renders, truth above and ours below, and the
generated views, as PNGs to look at.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backend.common import cameras as cam  # noqa: E402
from backend.common import device as dev  # noqa: E402
from backend.common.dataset import load_transforms  # noqa: E402
from backend.common.metrics import chamfer_fscore, composite_white, mask_iou, psnr_union  # noqa: E402
from backend.mesh.textured import render_mesh_rgba  # noqa: E402
from backend.pipeline.generate import QUALITY, GenerateSettings, image_to_3d  # noqa: E402
from backend.pipeline.novel_views import RADIUS, contact_sheet  # noqa: E402
from bench.reconstruct import PeakRSS  # noqa: E402
from evaluation.groundtruth import run_groundtruth  # noqa: E402
from evaluation.oracle import DegradedOracleViews, OracleViews, ViewFaults, framing_radius, oracle_prior  # noqa: E402


def settings_for(quality: str, device: str) -> GenerateSettings:
    """The settings the ``image_to_3d`` job uses at ``quality`` (refinement off)."""
    from backend.kinds.generate import settings_from_params

    params = {"quality": quality, "seed": 0, "views": 0, "view_steps": 0, "view_guidance": 3.0, "iterations": 0,
              "faces": 20000, "texture_size": 0, "reference_elevation": 0.0, "refine": False, "refine_steps": 0,
              "prior": True, "distill_steps": 0, "view_updates": -1}
    return settings_from_params(params, device)


def seam_pixels_of(mesh, c2ws, texel_px: float = 4.0, size: int = 160) -> int:
    """The seam test (tests/test_pbr.py) on this mesh's own UVs: a smooth colour field far from
    white and black, baked through the product's bake (``bake_texture``, gutters filled) at the
    mesh's texture size, then close-ups of the object's centre in which a texel spans ``texel_px``
    pixels, from each of ``c2ws``: the pixels inside the silhouette that are white (background)
    or black (an empty texel) are what UV seams show."""
    from backend.common.metrics import seam_pixels
    from backend.mesh.bake import BakeSettings, BakeView, bake_texture, sphere_cameras
    from backend.mesh.raster import interpolate, rasterize_mesh
    from backend.pipeline.reconstruct import atlas_use

    v, f = mesh.vertices, mesh.faces
    V, F = torch.as_tensor(v, dtype=torch.float32), torch.as_tensor(f)
    lo, hi = v.min(0), v.max(0)
    centre, ext = 0.5 * (lo + hi), float(np.linalg.norm(hi - lo))

    def colour(p):
        return 0.3 + 0.2 * (np.sin(6 * (p - centre) / ext) + 1.0)

    views = []
    for c2w, k in sphere_cameras(centre, 1.6 * ext, 40.0, 256):
        r = rasterize_mesh(V, F, c2w, k)
        pos = interpolate(r, V, F).numpy()
        views.append(BakeView(c2w, k, np.concatenate([colour(pos), r.mask.numpy()[..., None]], -1).astype(np.float32)))
    size_t = mesh.texture.shape[0]
    tex, _ = bake_texture(v, f, mesh.uv, mesh.normals, views, BakeSettings(texture_size=size_t))
    field = mesh.copy(texture=tex)
    area = 0.5 * np.linalg.norm(np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]]), axis=1).sum()
    texel = math.sqrt(area / max(atlas_use(mesh.uv, f, size_t) * size_t * size_t, 1e-12))
    bad = np.array([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]], np.float32)
    count = 0
    for c2w in c2ws:
        fpx = texel_px * float(np.linalg.norm(c2w[:3, 3] - centre)) / texel
        k = cam.Intrinsics(fpx, fpx, size / 2, size / 2, size, size)
        count += seam_pixels(render_mesh_rgba(field, c2w, k, supersample=1), bad)
    return count


def openness(vertices: np.ndarray, faces: np.ndarray, points: np.ndarray, size: int = 256,
             elevations=(-60.0, -30.0, 0.0, 30.0, 60.0), azimuths: int = 8, tolerance: float = 0.005) -> np.ndarray:
    """The fraction of 42 cameras around a mesh (five rings of eight, and the poles, at three
    times its bounding radius) that see each of ``points`` (on its surface): its depth there
    within ``tolerance`` of the bounding diameter. The truth's mug: outside 0.29, rim 0.38, inner
    wall 0.12 and floor 0.12 (medians)."""
    from backend.mesh.bake import sphere_cameras
    from backend.mesh.raster import rasterize_mesh

    v = np.asarray(vertices, np.float64)
    center = 0.5 * (v.min(0) + v.max(0))
    radius = 0.5 * float(np.linalg.norm(np.ptp(v, axis=0)))
    cameras = sphere_cameras(center, 3.0 * radius, 45.0, size, elevations=elevations, azimuths=azimuths)
    vt, ft = torch.as_tensor(v, dtype=torch.float32), torch.as_tensor(np.asarray(faces))
    seen = np.zeros(len(points))
    for c2w, k in cameras:
        depth = rasterize_mesh(vt, ft, c2w, k).depth.numpy()
        uv, z = cam.project(points, c2w, k)
        x = np.clip(np.floor(uv[:, 0]).astype(np.int64), 0, k.width - 1)
        y = np.clip(np.floor(uv[:, 1]).astype(np.int64), 0, k.height - 1)
        seen += np.abs(depth[y, x] - z) < tolerance * 2.0 * radius
    return seen / len(cameras)


def recessed_figures(mesh, gt, tau: float = 0.01, below: float = 0.2, n: int = 100_000) -> dict:
    """How much of the truth lies recessed (seen from fewer than ``below`` of the directions
    around it: a cup's inside, a face's eye sockets) and how well each part is recovered:
    recall at ``tau`` of the diagonal (the truth's points that have ours that near) and the
    mean distance to ours, for the recessed part and the rest. Chamfer and F mix the two; a
    mug's walls, outside and handle can be right while its inside is not."""
    from scipy.spatial import cKDTree

    from backend.common.metrics import sample_surface

    diag = float(np.linalg.norm(np.ptp(np.asarray(gt["vertices"]), axis=0)))
    truth = sample_surface(gt["vertices"], gt["faces"], n, 1)
    recessed = openness(gt["vertices"], gt["faces"], truth) < below
    d = cKDTree(sample_surface(mesh.vertices, mesh.faces, n, 0)).query(truth, workers=-1)[0] / diag
    out = {"recessed_share": float(recessed.mean())}
    for name, part in (("recessed", recessed), ("open", ~recessed)):
        out[f"{name}_recall"] = float((d[part] < tau).mean()) if part.any() else None
        out[f"{name}_distance"] = float(d[part].mean()) if part.any() else None
    return out


def run_one(obj: str, kind: str, args, work: Path, device: str) -> dict:
    data = work / obj
    if not (data / "gt_mesh.npz").is_file():
        run_groundtruth(["--object", obj, "--out", str(data), "--train", "1", "--test", str(args.test),
                         "--resolution", str(args.resolution), "--seed", str(args.seed)])
    test = load_transforms(data / "transforms_test.json")
    gt = np.load(data / "gt_mesh.npz")
    center = gt["center"]
    radius = framing_radius(gt["vertices"], center)
    cls = DegradedOracleViews if kind == "degraded" else OracleViews
    faults = ViewFaults(**dict(args.faults or {}))
    oracle = cls(obj, center, radius, **({"seed": args.seed, "faults": faults} if kind == "degraded" else {}))
    reference = oracle.reference(0.0)
    generator = OnWhite(oracle) if args.on_white else oracle
    s = settings_for(args.quality, device)
    # the prior knows the truth; for degraded views it samples like Zero-1-to-3 (faults on every call)
    prior = None
    if args.prior == "oracle":
        prior_faults = None
        if kind == "degraded" and args.prior_faults == "same":
            prior_faults = ViewFaults(**{**faults.__dict__, **dict(args.prior_fault or {})})
        prior = oracle_prior(gt, radius, prior_faults, args.seed + 1, posterior=args.posterior)
    if args.distill_steps is not None:
        s.distill.steps = args.distill_steps
    if args.view_updates is not None:
        s.view_updates = args.view_updates
    if args.iterations is not None:
        s.reconstruct.train.iterations = args.iterations
    if args.prior_elevations is not None:
        s.distill.elevation_range = tuple(args.prior_elevations)
    for path, value in args.set or []:
        *parents, leaf = path.split(".")
        target = s
        for name in parents:
            target = getattr(target, name)
        if not hasattr(target, leaf):
            raise SystemExit(f"--set: GenerateSettings has no {path}")
        setattr(target, leaf, value)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with PeakRSS() as mem:
        res = image_to_3d(reference, generator, s, device, prior=prior)
    wall = time.perf_counter() - t0
    n = res.normalization
    rig = res.mesh.vertices / n["scale"] + np.asarray(n["center"])
    mesh = res.mesh.copy(vertices=rig * (radius / RADIUS) + center)  # the truth's frame
    psnrs, ious, pairs = [], [], []
    for i in range(len(test)):
        m = render_mesh_rgba(mesh, test.c2w[i], test.intrinsics[i], supersample=4)
        psnrs.append(psnr_union(m, test.images[i]))
        ious.append(mask_iou(m[..., 3], test.images[i][..., 3]))
        pairs += [test.images[i], m]
    if args.renders:
        # held-out views, truth above and ours below, then the generated views as the pipeline saw them
        out_dir = Path(args.renders)
        out_dir.mkdir(parents=True, exist_ok=True)
        cols = len(test)
        grid = [pairs[0::2], pairs[1::2]]
        sheet = np.concatenate([np.concatenate([composite_white(x) for x in row], 1) for row in grid], 0)
        Image.fromarray((np.clip(sheet, 0, 1) * 255 + 0.5).astype(np.uint8)).save(out_dir / f"{obj}_{kind}_heldout.png")
        (out_dir / f"{obj}_{kind}_views.png").write_bytes(contact_sheet(res.views, cols=min(cols, 8), size=96))
    k = cam.Intrinsics.from_fov(math.radians(oracle.fov_deg), reference.shape[1], reference.shape[0])
    ref_psnr = psnr_union(render_mesh_rgba(mesh, oracle.reference_c2w(0.0), k, supersample=4), reference)
    geo = chamfer_fscore(mesh.vertices, mesh.faces, gt["vertices"], gt["faces"])
    seams = seam_pixels_of(mesh, test.c2w[:3])
    recess = recessed_figures(mesh, gt)
    if args.meshes:
        Path(args.meshes).mkdir(parents=True, exist_ok=True)
        np.savez_compressed(Path(args.meshes) / f"{obj}_{kind}.npz", vertices=mesh.vertices, faces=mesh.faces,
                            uv=mesh.uv, texture=mesh.texture)
    degraded = kind == "degraded"
    prior_faults = (dict(args.prior_fault or {}) if args.prior_faults == "same" else "none") if degraded else None
    out = {"object": obj, "views": kind, "on_white": bool(args.on_white), "faults": dict(args.faults or {}) if degraded else None,
           "prior_faults": prior_faults, "set": dict(args.set or {}), "prior": args.prior, "quality": args.quality,
           "psnr": float(np.mean(psnrs)),
           "mask_iou": float(np.mean(ious)), "chamfer": geo["chamfer"], "fscore": geo["fscore"],
           "precision": geo["precision"], "recall": geo["recall"],
           **recess,
           "reference_psnr": ref_psnr, "seconds": wall, "peak_rss_gb": mem.peak / 1e9, "timings": res.timings,
           "novel_views": int(len(res.views)), "seam_pixels": seams,
           **{k: res.stats.get(k) for k in ("watertight", "boundary_edges", "non_manifold_edges", "components", "genus", "faces",
                                            "atlas_use", "texture_coverage", "uv_charts", "uv_seam_edges",
                                            "uv_seam_fraction",
                                            "view_disagreement", "view_updates", "prior_pose",
                                            "view_elevation_offset", "view_registration", "update_registration")}}
    if device.startswith("cuda"):
        out["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return out


class OnWhite:
    """The oracle's views as Zero-1-to-3 returns its own: RGB on white, anti-aliased, no
    alpha, so the job mattes them itself (``--on-white``)."""

    def __init__(self, oracle):
        self.oracle = oracle

    def __call__(self, reference, reference_elevation, poses, progress=None):
        return composite_white(self.oracle(reference, reference_elevation, poses, progress))


def _fault(text: str) -> tuple:
    name, _, value = text.partition("=")
    if name not in ViewFaults.__dataclass_fields__ or not value:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE with NAME one of {', '.join(ViewFaults.__dataclass_fields__)}")
    return name, tuple(float(x) for x in value.split(",")) if "," in value else float(value)


def _setting(text: str) -> tuple:
    path, _, value = text.partition("=")
    if not path or not value:
        raise argparse.ArgumentTypeError("expected PATH=VALUE")
    try:
        return path, json.loads(value)
    except json.JSONDecodeError:
        return path, value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--objects", nargs="+", default=["suzanne", "mug", "cube"])
    ap.add_argument("--views", nargs="+", default=["perfect", "degraded"], choices=["perfect", "degraded"])
    ap.add_argument("--quality", default="standard", choices=list(QUALITY))
    ap.add_argument("--test", type=int, default=8, help="held-out views per object")
    ap.add_argument("--resolution", type=int, default=128, help="held-out view size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prior", default="oracle", choices=["oracle", "none"],
                    help="score distillation's guidance: the oracle denoiser (with faults for degraded views) or none")
    ap.add_argument("--distill-steps", type=int, default=None, help="override the quality's distillation steps")
    ap.add_argument("--iterations", type=int, default=None, help="override the quality's Gaussian training steps")
    ap.add_argument("--view-updates", type=int, default=None, help="override the quality's view updates")
    ap.add_argument("--prior-elevations", type=float, nargs=2, default=None,
                    help="override the elevation range (degrees) of the prior's random cameras")
    ap.add_argument("--faults", nargs="+", default=None, type=_fault, metavar="NAME=VALUE",
                    help="override ViewFaults of the degraded views and prior (e.g. unseen=0 gain=0 scale_drift=0; "
                         "blur_px=LO,HI), to see which fault costs what")
    ap.add_argument("--posterior", default="exact", choices=["exact", "wiener"],
                    help="what the oracle's SDEdit passes (the view updates) return: its (faulty) truth whatever "
                         "the strength, or the Wiener posterior that keeps what the noise leaves of the input")
    ap.add_argument("--prior-faults", default="same", choices=["same", "none"],
                    help="for degraded views, the oracle prior samples with the same faults (default) or none")
    ap.add_argument("--prior-fault", nargs="+", default=None, type=_fault, metavar="NAME=VALUE",
                    help="override these ViewFaults for the prior only (after --faults)")
    ap.add_argument("--set", nargs="+", default=None, type=_setting, metavar="PATH=VALUE",
                    help="override any GenerateSettings field (e.g. distill.prior_weight=1.5 view_updates=0)")
    ap.add_argument("--on-white", action="store_true",
                    help="hand the job the novel views as RGB on white, as Zero-1-to-3 returns them (matted by the job)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument("--keep", default=None, help="keep the ground truth in this folder")
    ap.add_argument("--renders", default=None, help="write held-out renders (truth above, ours below) and the views here")
    ap.add_argument("--meshes", default=None, help="save each mesh, in the truth's frame, here (.npz)")
    args = ap.parse_args()
    device = dev.pick_device(args.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for obj in args.objects:
            for kind in args.views:
                r = run_one(obj, kind, args, work, device)
                rows.append(r)
                print(json.dumps(r), flush=True)
    info = dev.device_info(device)
    what = info.get("gpu_name") or f"{info['cpu_count']} CPU cores"
    print(f"\ndevice {device} ({what}), quality {args.quality}, {args.test} held-out views at {args.resolution} px")
    print(f"{'object':8} {'views':9} {'prior':6} {'PSNR':>6} {'IoU':>6} {'chamfer':>8} {'F@1%':>6} {'refPSNR':>8} "
          f"{'time s':>7} {'peakGB':>7} {'watertight':>10} {'genus':>5} {'atlas':>5} {'charts':>6} {'seams':>5} "
          f"{'nmap s':>6} {'seam px':>7} {'recessed':>8} {'rec R':>5} {'open R':>6}")
    for r in rows:
        print(f"{r['object']:8} {r['views']:9} {r['prior']:6} {r['psnr']:6.2f} {r['mask_iou']:6.3f} {r['chamfer']:8.4f} "
              f"{r['fscore']:6.3f} {r['reference_psnr']:8.2f} {r['seconds']:7.1f} {r['peak_rss_gb']:7.2f} "
              f"{str(r['watertight']):>10} {str(r['genus']):>5} {r['atlas_use'] or 0:5.2f} "
              f"{r['uv_charts'] or 0:6d} {r['uv_seam_fraction'] or 0:5.2f} "
              f"{r['timings'].get('surface.normal_map', 0.0):6.2f} {r['seam_pixels']:7d} "
              f"{r['recessed_share']:8.2f} {r['recessed_recall'] or 0:5.2f} {r['open_recall'] or 0:6.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
