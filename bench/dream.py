"""Text-to-3D by score distillation (``text_to_3d`` method ``sds``) with a prior that knows the answer.

    python bench/dream.py [--objects suzanne mug cube] [--quality draft|standard|high] [--steps N]
                          [--control] [--anchor] [--keep DIR] [--json FILE] [--renders DIR]

The text prior is replaced by the oracle denoiser on the Blender ground truth's textured mesh
(:class:`evaluation.oracle.RigTruth`): what a perfect text prior for that object would answer. The
job's own settings for the quality (``backend.kinds.generate.settings_from_params``, refinement off)
run :func:`backend.pipeline.generate.text_to_3d_sds` from a ball, and the script prints iterations,
seconds per iteration, the whole job's time and peak memory, and against the truth: held-out mask IoU
and PSNR (8 views around the object, our rasterizer for both, union of masks on white), the front
view's PSNR (the view an anchor's front image shows), Chamfer and F-score at 1 % of the diagonal. ``--control`` runs each object a second time with back views told
"front" (the prior answers a back camera with the front's image: the cause of Janus objects), which
must score worse.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backend.common import cameras as cam  # noqa: E402
from backend.common import device as dev  # noqa: E402
from backend.common.metrics import chamfer_fscore, composite_white, mask_iou, psnr_union  # noqa: E402
from backend.mesh.textured import render_mesh_rgba  # noqa: E402
from backend.pipeline.generate import QUALITY, text_to_3d_sds  # noqa: E402
from backend.pipeline.novel_views import FOV_DEG, RADIUS  # noqa: E402
from backend.pipeline.sds import OracleGuidance  # noqa: E402
from bench.reconstruct import PeakRSS  # noqa: E402
from evaluation.groundtruth import run_groundtruth  # noqa: E402
from evaluation.oracle import RigTruth, ToldFront, ViewFaults, framing_radius, gt_textured_mesh  # noqa: E402

HELD_OUT = [(el, az) for el in (0.0, 30.0) for az in (45.0, 135.0, 225.0, 315.0)]


def settings_for(quality: str, device: str):
    from backend.kinds.generate import settings_from_params

    params = {"quality": quality, "seed": 0, "views": 0, "view_steps": 0, "view_guidance": 3.0, "iterations": 0,
              "faces": 20000, "texture_size": 0, "reference_elevation": 0.0, "refine": False, "refine_steps": 0,
              "prior": True, "distill_steps": 0, "view_updates": -1, "dream_steps": 0}
    return settings_from_params(params, device)


# what each row runs: (the text prior told "front" for back views, the front view fitted, the image prior on it)
VARIANTS = {"oracle": (False, False, False), "told_front": (True, False, False),
            "told_front+photo": (True, True, False), "told_front+anchor": (True, True, True),
            "oracle+anchor": (False, True, True)}


def run_one(obj: str, variant: str, args, work: Path, device: str) -> dict:
    data = work / obj
    if not (data / "gt_mesh.npz").is_file():
        run_groundtruth(["--object", obj, "--out", str(data), "--train", "1", "--test", "1", "--resolution", "64"])
    gt = np.load(data / "gt_mesh.npz")
    center = gt["center"]
    radius = framing_radius(gt["vertices"], center)
    truth_mesh = gt_textured_mesh(gt)
    rig_truth = truth_mesh.copy(vertices=(truth_mesh.vertices - center) * (RADIUS / radius))  # the rig's frame
    truth = RigTruth(truth_mesh, center, radius / RADIUS)
    control, photo, image_prior = VARIANTS[variant]
    guidance = OracleGuidance(ToldFront(truth) if control else truth, size=args.prior_size)
    s = settings_for(args.quality, device)
    if args.steps is not None:
        s.dream.steps = args.steps
    if args.anchor_weight is not None:
        s.dream.anchor_weight = args.anchor_weight
    if args.reference_weight is not None:
        s.dream.reference_weight = args.reference_weight
    front, front_prior = None, None
    if photo:  # the truth's front view, framed as a reference (what text-to-image would give, perfect)
        k_ref = cam.Intrinsics.from_fov(math.radians(FOV_DEG), 256, 256)
        front = render_mesh_rgba(rig_truth, cam.spherical_to_c2w(0.0, 0.0, RADIUS), k_ref, supersample=3)
        s.reference_elevation = 0.0
    if image_prior:
        faulty = RigTruth(truth_mesh, center, radius / RADIUS, ViewFaults(), seed=1)

        def front_prior(reference, elevation):
            return [OracleGuidance(faulty, size=args.prior_size, name="zero123_oracle")]
    t0 = time.perf_counter()
    with PeakRSS() as mem:
        res = text_to_3d_sds([guidance], s, device, front=front, front_prior=front_prior)
    wall = time.perf_counter() - t0
    n = res.normalization
    mesh = res.mesh.copy(vertices=res.mesh.vertices / n["scale"] + np.asarray(n["center"]))  # the rig's frame
    k = cam.Intrinsics.from_fov(math.radians(FOV_DEG), args.resolution, args.resolution)
    psnrs, ious, pairs = [], [], []
    for el, az in HELD_OUT:
        c2w = cam.spherical_to_c2w(el, az, RADIUS)
        t = render_mesh_rgba(rig_truth, c2w, k, supersample=3)
        m = render_mesh_rgba(mesh, c2w, k, supersample=3)
        psnrs.append(psnr_union(m, t))
        ious.append(mask_iou(m[..., 3], t[..., 3]))
        pairs += [t, m]
    if args.renders:
        from PIL import Image

        out_dir = Path(args.renders)
        out_dir.mkdir(parents=True, exist_ok=True)
        sheet = np.concatenate([np.concatenate([composite_white(x) for x in pairs[r::2]], 1) for r in (0, 1)], 0)
        name = f"{obj}_{variant.replace('+', '_')}.png"
        Image.fromarray((np.clip(sheet, 0, 1) * 255 + 0.5).astype(np.uint8)).save(out_dir / name)
    front = cam.spherical_to_c2w(0.0, 0.0, RADIUS)  # the view an anchor's front image shows
    front_psnr = psnr_union(render_mesh_rgba(mesh, front, k, supersample=3), render_mesh_rgba(rig_truth, front, k, supersample=3))
    geo = chamfer_fscore(mesh.vertices, mesh.faces, rig_truth.vertices, rig_truth.faces)
    dream_s = res.timings["dream"]
    return {"object": obj, "prior": variant, "quality": args.quality,
            "anchor_weight": s.dream.anchor_weight if image_prior else 0.0,
            "steps": s.dream.steps, "gaussians": s.dream.gaussians, "seconds_per_step": dream_s / max(1, s.dream.steps),
            "dream_seconds": dream_s, "seconds": wall, "peak_rss_gb": mem.peak / 1e9,
            "psnr": float(np.mean(psnrs)), "front_psnr": float(front_psnr), "mask_iou": float(np.mean(ious)), "chamfer": geo["chamfer"],
            "fscore": geo["fscore"], "faces": res.stats.get("faces"), "watertight": res.stats.get("watertight"),
            "reframed": res.stats.get("reframed"),
            **({"peak_gpu_gb": torch.cuda.max_memory_allocated() / 1e9} if device.startswith("cuda") else {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--objects", nargs="+", default=["suzanne", "mug", "cube"])
    ap.add_argument("--quality", default="standard", choices=list(QUALITY))
    ap.add_argument("--steps", type=int, default=None, help="override the quality's score distillation steps")
    ap.add_argument("--prior-size", type=int, default=128, help="the oracle's image size")
    ap.add_argument("--resolution", type=int, default=128, help="held-out view size")
    ap.add_argument("--control", action="store_true", help="also run each object with back views told 'front'")
    ap.add_argument("--anchor", action="store_true", help="also the told-front prior anchored on the front view "
                    "(and its controls: the front's photo alone, the true prior anchored)")
    ap.add_argument("--anchor-weight", type=float, default=None, help="override the image prior's weight")
    ap.add_argument("--reference-weight", type=float, default=None, help="override the front view's weight")
    ap.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS), help="run these rows only")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--keep", default=None, help="keep (and reuse) the ground truth in this folder")
    ap.add_argument("--renders", default=None, help="write held-out renders (truth above, ours below) here")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = dev.pick_device(args.device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        variants = ["oracle"] + (["told_front"] if args.control or args.anchor else [])
        variants += ["told_front+photo", "told_front+anchor", "oracle+anchor"] if args.anchor else []
        variants = args.variants or variants
        for obj in args.objects:
            for variant in variants:
                r = run_one(obj, variant, args, work, device)
                rows.append(r)
                print(json.dumps(r), flush=True)
    info = dev.device_info(device)
    what = info.get("gpu_name") or f"{info['cpu_count']} CPU cores"
    print(f"\ndevice {device} ({what}), quality {args.quality}")
    print(f"{'object':8} {'prior':18} {'steps':>5} {'s/step':>6} {'dream s':>7} {'job s':>6} {'peakGB':>6} "
          f"{'PSNR':>6} {'front':>6} {'IoU':>6} {'chamfer':>8} {'F@1%':>6} {'watertight':>10}")
    for r in rows:
        print(f"{r['object']:8} {r['prior']:18} {r['steps']:5d} {r['seconds_per_step']:6.3f} {r['dream_seconds']:7.1f} "
              f"{r['seconds']:6.1f} {r['peak_rss_gb']:6.2f} {r['psnr']:6.2f} {r['front_psnr']:6.2f} {r['mask_iou']:6.3f} {r['chamfer']:8.4f} "
              f"{r['fscore']:6.3f} {str(r['watertight']):>10}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
