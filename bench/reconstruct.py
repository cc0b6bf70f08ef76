"""Reconstruction quality and cost on Blender-rendered ground truth.

    python bench/reconstruct.py [--objects suzanne mug] [--train 24] [--test 8] [--resolution 128]
                                [--iterations 0] [--faces 20000] [--texture-size 1024] [--no-blender]

For each object: Blender (Cycles, emission shading, so pixels are albedo)
renders training and held-out views; ``reconstruct`` runs with the given
settings (defaults = the product's defaults); then, on the held-out views:

* mesh PSNR: the textured mesh rendered by our rasterizer, and (unless
  --no-blender) the GLB imported by Blender's glTF importer and rendered by
  Cycles, compared with the truth over the pixels either covers, on white;
* Gaussian PSNR, same rule;
* mask IoU of the mesh's silhouettes;
* Chamfer distance and F-score at 1 % against the true mesh, relative to its
  bounding-box diagonal;
* wall time and peak memory (process RSS; GPU peak on CUDA).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backend.common import device as dev  # noqa: E402
from backend.common.dataset import load_transforms  # noqa: E402
from backend.mesh.gltf import write_glb  # noqa: E402
from backend.mesh.textured import render_mesh_rgba  # noqa: E402
from backend.common.metrics import chamfer_fscore, mask_iou, psnr_union  # noqa: E402
from backend.pipeline.reconstruct import ReconstructSettings, reconstruct  # noqa: E402
from evaluation.groundtruth import run_groundtruth  # noqa: E402


class PeakRSS:
    def __init__(self, interval: float = 0.05):
        self.peak = dev.process_rss_bytes()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self.interval = interval

    def _run(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, dev.process_rss_bytes())

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def gaussian_rgba(g, c2w, intr) -> np.ndarray:
    with torch.no_grad():
        col, al, _ = g.render(c2w[None], intr, background=None)
        return torch.cat([col[0] / al[0].clamp_min(1e-6), al[0]], -1).clamp(0, 1).cpu().numpy()


def load_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGBA"), np.float32) / 255.0


def run_object(obj: str, args, work: Path, device: str) -> dict:
    data = work / obj
    run_groundtruth(["--object", obj, "--out", str(data), "--train", str(args.train), "--test", str(args.test),
                     "--resolution", str(args.resolution), "--seed", str(args.seed)])
    train = load_transforms(data / "transforms_train.json")
    test = load_transforms(data / "transforms_test.json")
    s = ReconstructSettings()
    s.train.iterations = args.iterations
    s.train.seed = args.seed
    s.mesh.clean.target_faces = args.faces
    s.bake.texture_size = args.texture_size
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with PeakRSS() as mem:
        res = reconstruct(train, s, device)
    wall = time.perf_counter() - t0
    glb = work / f"{obj}.glb"
    glb.write_bytes(write_glb(res.mesh))
    mesh_psnr, gs_psnr, ious = [], [], []
    for i in range(len(test)):
        m = render_mesh_rgba(res.mesh, test.c2w[i], test.intrinsics[i], supersample=4)
        mesh_psnr.append(psnr_union(m, test.images[i]))
        ious.append(mask_iou(m[..., 3], test.images[i][..., 3]))
        gs_psnr.append(psnr_union(gaussian_rgba(res.gaussians, test.c2w[i], test.intrinsics[i]), test.images[i]))
    gt = np.load(data / "gt_mesh.npz")
    geo = chamfer_fscore(res.mesh.vertices, res.mesh.faces, gt["vertices"], gt["faces"])
    out = {
        "object": obj,
        "mesh_psnr": float(np.mean(mesh_psnr)),
        "gaussian_psnr": float(np.mean(gs_psnr)),
        "mask_iou": float(np.mean(ious)),
        "chamfer": geo["chamfer"],
        "fscore": geo["fscore"],
        "seconds": wall,
        "peak_rss_gb": mem.peak / 1e9,
        "timings": res.timings,
        "stats": res.stats,
    }
    if device.startswith("cuda"):
        out["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1e9
    if not args.no_blender:
        from evaluation.blender_check import check_glb

        rdir = work / f"{obj}_blender"
        report = check_glb(glb, work / f"{obj}_check.json", data / "transforms_test.json", rdir, resolution=args.resolution)
        bl = [psnr_union(load_png(rdir / (fr["file_path"] + ".png")), test.images[i])
              for i, fr in enumerate(json.loads((data / "transforms_test.json").read_text())["frames"])]
        out["blender_psnr"] = float(np.mean(bl))
        mat = report["objects"][0]["materials"][0]
        out["blender_textured"] = bool(mat.get("base_color_linked_image"))
        bmin, bmax = np.array(report["bbox_min"]), np.array(report["bbox_max"])
        out["blender_bbox_error"] = float(max(np.abs(bmin - res.mesh.vertices.min(0)).max(),
                                              np.abs(bmax - res.mesh.vertices.max(0)).max()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--objects", nargs="+", default=["suzanne", "mug"])
    ap.add_argument("--train", type=int, default=24)
    ap.add_argument("--test", type=int, default=8)
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--iterations", type=int, default=0, help="0: the device default")
    ap.add_argument("--faces", type=int, default=20000)
    ap.add_argument("--texture-size", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-blender", action="store_true", help="skip the Blender import + render check")
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument("--keep", default=None, help="keep renders and GLBs in this folder")
    args = ap.parse_args()
    device = dev.pick_device(args.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for obj in args.objects:
            r = run_object(obj, args, work, device)
            rows.append(r)
            print(json.dumps(r), flush=True)
    info = dev.device_info(device)
    what = info.get("gpu_name") or f"{info['cpu_count']} CPU cores"
    print(f"\ndevice {device} ({what}), {args.train} training + {args.test} held-out views at {args.resolution} px")
    hdr = f"{'object':10} {'meshPSNR':>9} {'blender':>8} {'gsPSNR':>7} {'IoU':>6} {'chamfer':>8} {'F@1%':>6} {'time s':>7} {'peakGB':>7}"
    print(hdr)
    for r in rows:
        print(f"{r['object']:10} {r['mesh_psnr']:9.2f} {r.get('blender_psnr', float('nan')):8.2f} {r['gaussian_psnr']:7.2f} "
              f"{r['mask_iou']:6.3f} {r['chamfer']:8.4f} {r['fscore']:6.3f} {r['seconds']:7.1f} {r['peak_rss_gb']:7.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
