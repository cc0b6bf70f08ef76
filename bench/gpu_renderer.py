"""Which Gaussian rasterizer runs on this GPU, and how fast each is.

    python bench/gpu_renderer.py [--no-toolkit] [--gaussians 20000] [--size 256]

Prints the renderer decision (``backend.gaussians.render.renderer_info``) and
the time of one forward+backward pass of a training-sized render with gsplat
and with the PyTorch renderer on the same scene. ``--no-toolkit`` hides the
CUDA toolkit from gsplat before it is imported (as on a machine with a
pip-installed torch and no nvcc): gsplat then has no compiled extension, a
direct ``gsplat.rasterization`` call fails, and the product must fall back to
the PyTorch renderer on CUDA. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _scene(n: int, size: int, device: str):
    import numpy as np

    from backend.common import cameras as cam

    g = torch.Generator().manual_seed(0)
    means = (torch.rand(n, 3, generator=g) - 0.5)
    quats = torch.randn(n, 4, generator=g)
    scales = torch.rand(n, 3, generator=g) * 0.02 + 0.005
    opac = torch.rand(n, generator=g) * 0.9 + 0.05
    colors = torch.rand(n, 3, generator=g)
    c2w = np.stack([cam.spherical_to_c2w(15, a, 2.2) for a in (0, 90, 180, 270)])
    vm = torch.tensor(cam.c2w_to_viewmat(c2w), dtype=torch.float32)
    K = torch.tensor(cam.Intrinsics.from_fov(0.857, size, size).K(), dtype=torch.float32)[None].expand(4, 3, 3)
    return [t.to(device) for t in (means, quats, scales, opac, colors, vm, K.contiguous())]


def _time(fn, reps: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    ts.sort()
    return ts[len(ts) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-toolkit", action="store_true")
    ap.add_argument("--gaussians", type=int, default=20000)
    ap.add_argument("--size", type=int, default=256)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    if args.no_toolkit:
        import torch.utils.cpp_extension as ce

        ce._find_cuda_home = lambda: None  # what gsplat's loader sees without a toolkit
    from backend.gaussians.render import rasterize, renderer_info

    t = time.perf_counter()
    info = renderer_info("cuda")
    print(f"renderer on cuda: {info['renderer']} ({info['gsplat']}); decided in {time.perf_counter() - t:.1f} s", flush=True)
    means, quats, scales, opac, colors, vm, K = _scene(args.gaussians, args.size, "cuda")
    if info["renderer"] == "torch":
        try:
            from gsplat import rasterization

            rasterization(means, quats, scales, opac, colors, vm, K, args.size, args.size)
            print("a direct gsplat.rasterization call worked")
        except Exception as exc:  # noqa: BLE001 - the failure the product must avoid
            print(f"a direct gsplat.rasterization call fails: {type(exc).__name__}: {str(exc)[:120]}")
    params = [t.clone().requires_grad_(True) for t in (means, quats, scales, opac, colors)]

    def step(backend: str):
        def run():
            img, al, _ = rasterize(*params, vm, K, args.size, args.size, backend=backend,
                                   backgrounds=torch.ones(4, 3, device="cuda"))
            (img.mean() + al.mean()).backward()
        return run

    backends = ["torch"] + (["gsplat"] if info["renderer"] == "gsplat" else [])
    res = {b: _time(step(b)) for b in backends}
    print(f"{args.gaussians} Gaussians, 4 views of {args.size} px, forward+backward (median of 10):")
    for b, s in res.items():
        print(f"  {b:7} {s * 1000:8.1f} ms")
    img, _, _ = rasterize(*[p.detach() for p in params], vm, K, args.size, args.size)  # the automatic choice runs
    print(f"automatic choice rendered {tuple(img.shape)}, finite: {bool(torch.isfinite(img).all())}")


if __name__ == "__main__":
    main()
