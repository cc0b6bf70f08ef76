"""The reference elevation estimate (backend.pipeline.elevation) against the truth.

    python bench/elevation.py [--objects suzanne mug cube] [--views perfect degraded]
                              [--elevations -10 0 15 30 45] [--seeds 0 1] [--work DIR]

For each object, each elevation the reference is rendered from, and each kind of probe
view (``perfect``: the true textured mesh rendered by our rasterizer where the generator is
asked to look, relative to the true elevation as Zero-1-to-3 does; ``degraded``: the same
with Zero-1-to-3-like faults per view, seeds ``--seeds``), it prints the estimate, its
confidence, whether the pipeline would use it (else it keeps 0 degrees), the matches and
the time; then per object and kind how many land within 7 degrees and the mean error.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backend.pipeline.elevation import estimate_elevation  # noqa: E402
from backend.pipeline.novel_views import prepare_reference  # noqa: E402
from evaluation.groundtruth import run_groundtruth  # noqa: E402
from evaluation.oracle import DegradedOracleViews, OracleViews, framing_radius, gt_textured_mesh  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--objects", nargs="+", default=["suzanne", "mug", "cube"])
    ap.add_argument("--views", nargs="+", default=["perfect", "degraded"], choices=["perfect", "degraded"])
    ap.add_argument("--elevations", nargs="+", type=float, default=[-10.0, 0.0, 15.0, 30.0, 45.0])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--work", default=None, help="keep the ground truth here (default: a temporary folder)")
    args = ap.parse_args()
    import tempfile

    work = Path(args.work or tempfile.mkdtemp(prefix="gen3d_elevation_"))
    print(f"{'object':8s} {'views':9s} {'seed':>4s} {'true':>6s} {'est':>6s} {'conf':>5s} {'used':>5s} {'match':>5s} "
          f"{'s':>5s}")
    summary = {}
    for obj in args.objects:
        data = work / obj
        if not (data / "gt_mesh.npz").is_file():
            run_groundtruth(["--object", obj, "--out", str(data), "--train", "1", "--test", "1", "--resolution", "64"])
        gt = np.load(data / "gt_mesh.npz")
        mesh, center = gt_textured_mesh(gt), gt["center"]
        radius = framing_radius(gt["vertices"], center)
        for kind in args.views:
            for seed in (args.seeds if kind == "degraded" else [0]):
                for e in args.elevations:
                    if kind == "degraded":
                        o = DegradedOracleViews(obj, center, radius, mesh=mesh, true_elevation=e, seed=seed)
                    else:
                        o = OracleViews(obj, center, radius, mesh=mesh, true_elevation=e)
                    ref = prepare_reference(o.reference(e))[0]
                    t = time.perf_counter()
                    est = estimate_elevation(ref, o)
                    dt = time.perf_counter() - t
                    summary.setdefault((obj, kind), []).append((e, est))
                    print(f"{obj:8s} {kind:9s} {seed:4d} {e:6.1f} {est.degrees:6.1f} {est.confidence:5.2f} "
                          f"{str(est.used):>5s} {est.matches:5d} {dt:5.1f}", flush=True)
    print()
    for (obj, kind), rows in summary.items():
        err = [abs(est.degrees - e) for e, est in rows]
        used = [est for _, est in rows if est.used]
        within = sum(1 for e, est in rows if est.used and abs(est.degrees - e) <= 7)
        print(f"{obj:8s} {kind:9s}: {within}/{len(rows)} used and within 7 deg, {len(used)} used, "
              f"mean |error| {np.mean(err):.1f} deg (of the used: "
              f"{np.mean([abs(est.degrees - e) for e, est in rows if est.used]) if used else float('nan'):.1f})")


if __name__ == "__main__":
    main()
