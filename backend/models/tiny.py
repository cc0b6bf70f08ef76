"""Random-weight replicas of the preset models, with the real classes and folder layout.

``build_tiny(kind, root)`` writes, deterministically (fixed seed) and in
seconds:

* ``stable-diffusion``: ``model_index.json``, ``unet/`` (UNet2DConditionModel,
  4 in-channels), ``vae/`` (AutoencoderKL, 8x downsampling like SD's),
  ``text_encoder/`` (CLIPTextModel), ``tokenizer/`` (CLIPTokenizer: byte-level
  vocabulary, no merges), ``scheduler/`` (DDIM, SD's schedule);
* ``zero123``: ``model_index.json``, ``unet/`` (8 in-channels: noisy latent +
  reference latent), ``vae/``, ``image_encoder/`` (CLIPVisionModelWithProjection),
  ``feature_extractor/`` (CLIPImageProcessor), ``scheduler/`` (DDIM,
  scaled_linear 0.00085-0.012, clip_sample False, steps_offset 1),
  ``clip_camera_projection/`` (Linear(embedding + 4 -> embedding)),

and they load through exactly the code path real checkpoints take. Widths are
tiny; the image sizes are the real ones (Zero-1-to-3: 256 px, 32x32 latents).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

TINY_VERSION = 3  # bump when the replicas change: the cache key
EMBED = 32  # CLIP width of the replicas (768 in the real models)


def default_cache_dir() -> Path:
    base = os.environ.get("GEN3D_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "gen3d")
    return Path(base) / "models"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def byte_level_clip_tokenizer():
    """A CLIPTokenizer over single bytes (no merges) plus CLIP's start/end tokens; returns (tokenizer, vocab)."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    tokenizer.model_max_length = 77
    return tokenizer, vocab


def _scheduler_config() -> dict:
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4, layers_per_block=1,
        block_out_channels=(8, 8, 16, 16),  # four levels: 8x downsampling, as in SD's VAE
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=256, scaling_factor=0.18215,
    )


def _unet(in_channels: int, sample_size: int, cross_dim: int):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=in_channels, out_channels=4, layers_per_block=1,
        # attention on the coarser level only: at the full latent size (64x64 for SD at 512 px) its
        # 4096-token self-attention made the tiny model cost seconds a step on a CPU, for nothing a
        # replica is for
        block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=cross_dim,
        attention_head_dim=4, norm_num_groups=8,
    )


def _build_stable_diffusion(out: Path) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer, vocab = byte_level_clip_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=EMBED, intermediate_size=2 * EMBED, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=EMBED,
        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"]))
    pipe = StableDiffusionPipeline(
        vae=_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=_unet(4, 64, EMBED),
        scheduler=DDIMScheduler(**_scheduler_config()), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    # the published layout keeps the byte-level BPE files (vocab.json, merges.txt), not tokenizer.json
    tok = out / "tokenizer"
    (tok / "tokenizer.json").unlink(missing_ok=True)
    (tok / "vocab.json").write_text(json.dumps(vocab))
    (tok / "merges.txt").write_text("#version: 0.2\n")


def _build_zero123(out: Path) -> None:
    from diffusers import DDIMScheduler
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from .zero123 import CLIPCameraProjection

    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=EMBED, intermediate_size=2 * EMBED, num_hidden_layers=2, num_attention_heads=2,
        image_size=32, patch_size=8, projection_dim=EMBED))
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    parts = {
        "unet": _unet(8, 32, EMBED),
        "vae": _vae(),
        "image_encoder": encoder,
        "clip_camera_projection": CLIPCameraProjection(embedding_dim=EMBED, additional_embeddings=4),
        "scheduler": DDIMScheduler(**_scheduler_config()),
        "feature_extractor": processor,
    }
    for name, part in parts.items():
        if hasattr(part, "save_pretrained"):
            part.save_pretrained(out / name, **({"safe_serialization": True} if name not in ("scheduler", "feature_extractor") else {}))
    index = {
        "_class_name": "Zero123Pipeline",
        "_diffusers_version": __import__("diffusers").__version__,
        "clip_camera_projection": ["zero123", "CLIPCameraProjection"],
        "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2))


BUILDERS = {"stable-diffusion": _build_stable_diffusion, "zero123": _build_zero123}


def build_tiny(kind: str, root: str | os.PathLike | None = None) -> Path:
    """Folder of the ``kind`` replica, built once and cached (atomically)."""
    if kind not in BUILDERS:
        raise ValueError(f"no tiny replica named {kind!r}; known: {sorted(BUILDERS)}")
    root = Path(root) if root is not None else default_cache_dir()
    out = root / f"tiny-v{TINY_VERSION}" / kind
    if (out / "model_index.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{kind}-", dir=out.parent))
    try:
        state = torch.random.get_rng_state()
        torch.manual_seed(1234)
        try:
            BUILDERS[kind](tmp)
        finally:
            torch.random.set_rng_state(state)
        try:
            os.replace(tmp, out)
        except OSError:  # another process finished first: use its copy
            if not (out / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
