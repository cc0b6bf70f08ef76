"""Per-stage timings of text-to-3D and image-to-3D with full-size architectures.

    python bench/generate.py [--quality standard] [--device cuda] [--quick] [--keep DIR] [--tiny]
                             [--only image_to_3d text_to_3d text_to_3d_sds] [--sds] [--build-only]

Speed is a property of the architecture, not of the weights: this builds
random-weight models with the real configurations (Stable Diffusion 1.5:
UNet 320-1280 channels, VAE 128-512, CLIP text ViT-L/14; Zero-1-to-3 XL: the
same UNet with 8 input channels, CLIP vision ViT-L/14 with projection,
Linear(772, 768)) in the published folder layout, loads them through the
product's loader, and runs the jobs as the server would. Prints each stage's
seconds, the totals and the peak GPU memory. The pictures are noise; the
timings are the real ones. Absolute times mean something on the GPU machine;
``--quick`` (1-2 steps everywhere) only proves it runs on a CPU. Each job also prints its
atlas use and seam pixels (the seam test on the returned GLB's UVs); ``--tiny`` runs the tiny
preset's replicas instead, for those figures at the settings CI uses. ``--sds`` adds a row for
``text_to_3d`` method ``sds`` (score distillation from the text prior, anchored on a front view
with Zero-1-to-3 beside it, the job's default anchor). Each row is printed as JSON as soon as it
ends, so a run cut short keeps what it finished. ``--build-only --keep DIR`` only writes the
full-size models (to build them while something else runs).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backend.common import device as dev  # noqa: E402
from backend.kinds.generate import IMAGE_SPEC, TEXT_SPEC  # noqa: E402
from backend.service.jobs import JobContext, Limits  # noqa: E402
from backend.models.store import ModelStore  # noqa: E402
from backend.models.tiny import _scheduler_config, byte_level_clip_tokenizer  # noqa: E402
from backend.common.progress import Progress  # noqa: E402


def _sd_unet(in_channels: int, sample_size: int):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=sample_size, in_channels=in_channels, out_channels=4,
                                block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                                cross_attention_dim=768, attention_head_dim=8)


def _sd_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
                         sample_size=512, scaling_factor=0.18215)


def build_full_sd(out: Path) -> Path:
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    tok, vocab = byte_level_clip_tokenizer()
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, max_position_embeddings=77, projection_dim=768,
                                        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"]))
    pipe = StableDiffusionPipeline(vae=_sd_vae(), text_encoder=text, tokenizer=tok, unet=_sd_unet(4, 64),
                                   scheduler=DDIMScheduler(**_scheduler_config()), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def build_full_zero123(out: Path) -> Path:
    from diffusers import DDIMScheduler
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from backend.models.zero123 import CLIPCameraProjection

    enc = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                                         num_attention_heads=16, image_size=224, patch_size=14,
                                                         projection_dim=768))
    _sd_unet(8, 32).save_pretrained(out / "unet", safe_serialization=True)
    _sd_vae().save_pretrained(out / "vae", safe_serialization=True)
    enc.save_pretrained(out / "image_encoder", safe_serialization=True)
    CLIPCameraProjection(768, 4).save_pretrained(out / "clip_camera_projection", safe_serialization=True)
    DDIMScheduler(**_scheduler_config()).save_pretrained(out / "scheduler")
    CLIPImageProcessor().save_pretrained(out / "feature_extractor")
    (out / "model_index.json").write_text(json.dumps({"_class_name": "Zero123Pipeline"}))
    return out


def _cleanup_stand_in() -> bool:
    """Where pymeshlab is missing (the lent GPU machine cannot take its 100 MB
    wheel), decimate with fast_simplification instead so the GPU stages can be
    timed; says so, since the mesh stage's figure is then not the product's."""
    try:
        import pymeshlab  # noqa: F401

        return False
    except ImportError:
        pass
    import fast_simplification

    from backend.mesh import clean
    from backend.mesh.textured import vertex_normals

    def stand_in(vertices, faces, s):
        f = np.asarray(faces)[clean.main_components(vertices, faces, s.min_component_fraction, s.min_component_size)]
        v = np.asarray(vertices, np.float64)
        if len(f) > s.target_faces:
            v, f = fast_simplification.simplify(v.astype(np.float32), f.astype(np.int32), 1 - s.target_faces / len(f))
        return np.asarray(v, np.float64), np.asarray(f, np.int64), vertex_normals(np.asarray(v, np.float64), f)

    clean._clean = stand_in
    print("mesh clean-up: pymeshlab is missing here; fast_simplification stands in (the mesh stage's time is not the product's)")
    return True


def _seam_pixels(out) -> int:
    """The seam test on the returned GLB's UVs (bench/image_to_3d.py's ``seam_pixels_of``)."""
    from backend.common import cameras as cam
    from backend.mesh.gltf import read_glb
    from backend.mesh.textured import TexturedMesh, vertex_normals
    from bench.image_to_3d import seam_pixels_of

    glb = next(a.data for a in out.attachments if a.name == "model.glb")
    prim = read_glb(glb)[0]
    v = prim.world_vertices().astype(np.float64)
    mesh = TexturedMesh(v, prim.indices, prim.uv, prim.texture, vertex_normals(v, prim.indices))
    return seam_pixels_of(mesh, [cam.spherical_to_c2w(el, az, 3.0) for el, az in ((20, 30), (-20, 150), (40, 260))])


def run(kind: str, store: ModelStore, device: str, params: dict) -> dict:
    from gen3d_wire.protocol import Attachment

    from backend.common.dataset import encode_png

    spec = TEXT_SPEC if kind == "text_to_3d" else IMAGE_SPEC
    atts = []
    if kind == "image_to_3d":
        img = np.ones((256, 256, 4), np.float32)
        img[..., 3] = 0
        img[48:208, 64:192] = [0.8, 0.3, 0.2, 1.0]
        atts = [Attachment("image", "image/png", encode_png(img))]
    inputs = spec.validate(params, atts, Limits())
    label = kind + ("_sds" if params.get("method") == "sds" else "")
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = spec.handler(inputs, JobContext(Progress(), device, store))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    total = time.perf_counter() - t0
    res = {"kind": label, "total": total, "stages": out.metadata["timings"], "renderer": out.metadata.get("renderer"),
           "atlas_use": out.metadata.get("atlas_use"), "seam_pixels": _seam_pixels(out)}
    if device.startswith("cuda"):
        res["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
    meta = out.metadata
    res.update({k: meta[k] for k in ("dream_steps", "dream_gaussians", "prior", "faces", "elevation") if k in meta})
    print(json.dumps(res, default=str), flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quality", default="standard")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true", help="1-2 steps everywhere (a CPU smoke run)")
    ap.add_argument("--low-vram", action="store_true")
    ap.add_argument("--keep", default=None, help="build the full-size models here (reused next time)")
    ap.add_argument("--offload-refinement", action="store_true",
                    help="with --low-vram: keep CPU offload during refinement too (to measure what it costs)")
    ap.add_argument("--only", nargs="+", choices=("image_to_3d", "text_to_3d", "text_to_3d_sds"), default=None,
                    help="these rows, in this order (default: image_to_3d text_to_3d, and text_to_3d_sds with --sds)")
    ap.add_argument("--sds", action="store_true", help="also text_to_3d by score distillation (method sds)")
    ap.add_argument("--build-only", action="store_true", help="only build the full-size models (with --keep)")
    ap.add_argument("--tiny", action="store_true", help="the tiny preset's random replicas instead of full-size models")
    args = ap.parse_args()
    device = dev.pick_device(args.device)
    _cleanup_stand_in()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        t0 = time.perf_counter()
        if args.tiny:
            store = ModelStore("tiny", device, args.low_vram)
        else:
            sd = root / "sd15" if (root / "sd15" / "model_index.json").exists() else build_full_sd(root / "sd15")
            z = (root / "zero123xl" if (root / "zero123xl" / "model_index.json").exists()
                 else build_full_zero123(root / "zero123xl"))
            print(f"full-size random models ready in {time.perf_counter() - t0:.1f} s", flush=True)
            if args.build_only:
                return
            store = ModelStore("default", device, args.low_vram, text_to_image=str(sd), novel_view=str(z))
        t0 = time.perf_counter()
        store.stable_diffusion()
        store.zero123()
        print(f"loaded in {time.perf_counter() - t0:.1f} s ({store.describe()['dtype']} on {device})", flush=True)
        params = {"quality": args.quality}
        if args.quick:
            params.update(views=2, view_steps=1, iterations=20, distill_steps=5, refine_steps=1, texture_size=256, faces=2000)
        text_params = dict(params, prompt="a chair", **({"steps": 1} if args.quick else {}))
        if args.offload_refinement:
            import functools

            store.resident_for_refinement = functools.partial(store.resident_for_refinement, margin_bytes=1 << 50)
        rows = []
        kinds = args.only or ["image_to_3d", "text_to_3d"] + (["text_to_3d_sds"] if args.sds else [])
        for kind in kinds:
            if kind == "image_to_3d":
                rows.append(run("image_to_3d", store, device, dict(params)))
            elif kind == "text_to_3d":
                rows.append(run("text_to_3d", store, device, text_params))
            else:
                rows.append(run("text_to_3d", store, device, dict(text_params, method="sds",
                                                                  **({"dream_steps": 2} if args.quick else {}))))
    info = dev.device_info(device)
    print(f"\n{info.get('gpu_name') or str(info['cpu_count']) + ' CPU cores'}, quality {args.quality}{' (quick)' if args.quick else ''}")
    for r in rows:
        stages = {k: v for k, v in r["stages"].items() if "." not in k}
        print(f"{r['kind']:12} total {r['total']:7.1f} s  " + "  ".join(f"{k} {v:.1f}" for k, v in stages.items())
              + (f"  peak GPU {r['peak_gpu_gb']:.1f} GiB" if "peak_gpu_gb" in r else ""))
        sub = {k.split(".", 1)[1]: v for k, v in r["stages"].items() if k.startswith("surface.")}
        print(f"{'':12} surface: " + "  ".join(f"{k} {v:.1f}" for k, v in sub.items()) + f"  (renderer {r['renderer']})"
              + f"  atlas use {r['atlas_use'] or 0:.2f}, seam pixels {r['seam_pixels']}")


if __name__ == "__main__":
    main()
