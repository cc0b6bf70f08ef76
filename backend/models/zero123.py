"""Zero-1-to-3 novel views, written on diffusers/transformers components.

Loads the diffusers layout published for zero123-xl (and Stable Zero123):
``unet/`` (UNet2DConditionModel, 8 input channels: the noisy latent and the
reference image's latent), ``vae/``, ``image_encoder/``
(CLIPVisionModelWithProjection), ``feature_extractor/`` (CLIPImageProcessor),
``scheduler/`` (DDIM) and ``clip_camera_projection/`` (a Linear from the CLIP
image embedding plus the 4-d camera vector to the embedding width). Each part
is loaded with its own class's ``from_pretrained``: no pipeline code is
fetched at run time.

Conditioning, exactly:

* cross-attention: ``proj(concat(clip_image_embeds, camera_vector))`` as one
  token, ``[B, 1, D]``;
* concatenated image: the reference's VAE latent, **unscaled**
  (``latent_dist.mode()``, not multiplied by 0.18215). Zero-1-to-3's training
  code concatenates ``encode_first_stage(x).mode()`` directly, i.e. without the
  scaling factor; one published pipeline does the same, another divides a
  scaled latent back, which is the same thing. The noisy latents themselves live
  in the usual scaled space (decoded with ``/ scaling_factor``).
* classifier-free guidance: the unconditional branch gets zeros for both the
  projected embedding and the concatenated latent.
* camera vector: :func:`backend.common.cameras.zero123_camera_vector` (or the Stable
  Zero123 variant), target relative to the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from ..common import cameras as cam

IMAGE_SIZE = 256


class CLIPCameraProjection(ModelMixin, ConfigMixin):
    """Linear(embedding_dim + additional_embeddings -> embedding_dim), as published
    (config keys ``embedding_dim``, ``additional_embeddings``; weights ``proj.*``)."""

    @register_to_config
    def __init__(self, embedding_dim: int = 768, additional_embeddings: int = 4):
        super().__init__()
        self.proj = torch.nn.Linear(embedding_dim + additional_embeddings, embedding_dim)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.proj(embedding)


@dataclass
class Zero123Parts:
    unet: object
    vae: object
    image_encoder: object
    feature_extractor: object
    scheduler: object
    projection: CLIPCameraProjection
    kind: str = "zero123"  # or "stable_zero123"


def load_parts(path: str, kind: str = "zero123", dtype: torch.dtype = torch.float32,
               prefer_fp16: bool | None = None) -> Zero123Parts:
    """Load every component from a local folder in the published layout. Each part's fp16
    weight variant is read where the folder has it and it is preferred (``prefer_fp16``, by
    default when ``dtype`` is fp16) or is all there is (see :func:`.files.weights_variant`)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    from .files import weights_variant

    fp16 = dtype == torch.float16 if prefer_fp16 is None else prefer_fp16

    def variant(sub: str) -> dict:
        v = weights_variant(Path(path) / sub, fp16)
        return {"variant": v} if v else {}

    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype, **variant("unet"))
    if unet.config.in_channels != 8:
        raise ValueError(f"{path}/unet has {unet.config.in_channels} input channels; Zero-1-to-3 needs 8 "
                         "(noisy latent + reference latent)")
    return Zero123Parts(
        unet=unet,
        vae=AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype, **variant("vae")),
        image_encoder=CLIPVisionModelWithProjection.from_pretrained(
            path, subfolder="image_encoder", torch_dtype=dtype, **variant("image_encoder")),
        feature_extractor=CLIPImageProcessor.from_pretrained(path, subfolder="feature_extractor"),
        scheduler=DDIMScheduler.from_pretrained(path, subfolder="scheduler"),
        projection=CLIPCameraProjection.from_pretrained(path, subfolder="clip_camera_projection", torch_dtype=dtype,
                                                        **variant("clip_camera_projection")),
        kind=kind,
    )


@dataclass
class Reference:
    """An encoded reference view."""

    clip: torch.Tensor  # [1, D] CLIP image embedding
    latent: torch.Tensor  # [1, 4, h, w] unscaled VAE latent
    elevation: float  # degrees, of the reference camera


class Zero123:
    """Novel views of one reference image, and the noise prediction SDS needs."""

    def __init__(self, parts: Zero123Parts, device: str | torch.device = "cpu"):
        self.parts = parts
        self.device = torch.device(device)
        self.dtype = parts.unet.dtype
        for m in (parts.unet, parts.vae, parts.image_encoder, parts.projection):
            m.to(self.device)
            m.eval()
            m.requires_grad_(False)

    @property
    def scaling_factor(self) -> float:
        return float(self.parts.vae.config.scaling_factor)

    # -- conditioning -----------------------------------------------------------
    @torch.no_grad()
    def encode_reference(self, image: np.ndarray, elevation: float = 0.0) -> Reference:
        """``image``: RGB float [H, W, 3] in [0, 1], object centred on white (see
        :func:`backend.pipeline.novel_views.prepare_reference`); resized to 256 px here."""
        from PIL import Image

        img = np.clip(np.asarray(image, np.float32)[..., :3], 0, 1)
        pil = Image.fromarray((img * 255 + 0.5).astype(np.uint8)).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)
        pixels = self.parts.feature_extractor(images=[pil], return_tensors="pt").pixel_values
        clip = self.parts.image_encoder(pixels.to(self.device, self.dtype)).image_embeds
        x = torch.from_numpy(np.asarray(pil, np.float32) / 255.0).permute(2, 0, 1)[None].to(self.device, self.dtype)
        latent = self.parts.vae.encode(x * 2 - 1).latent_dist.mode()  # unscaled (see module docstring)
        return Reference(clip, latent, float(elevation))

    def camera_vectors(self, ref: Reference, poses: Sequence[tuple[float, float, float]]) -> torch.Tensor:
        """Relative poses (d_elevation deg, d_azimuth deg, d_radius) -> [B, 4] camera vectors."""
        vecs = []
        for d_el, d_az, d_r in poses:
            if self.parts.kind == "stable_zero123":
                v = cam.stable_zero123_camera_vector(ref.elevation, 0.0, ref.elevation + d_el, d_az)
            else:
                v = cam.zero123_camera_vector(ref.elevation, 0.0, 0.0, ref.elevation + d_el, d_az, d_r)
            vecs.append(v)
        return torch.tensor(np.stack(vecs), dtype=self.dtype, device=self.device)

    def conditioning(self, ref: Reference, camera: torch.Tensor) -> torch.Tensor:
        """[B, 1, D] cross-attention token: projection of (CLIP embedding, camera vector)."""
        b = camera.shape[0]
        x = torch.cat([ref.clip.expand(b, -1), camera.to(ref.clip.dtype)], -1)[:, None, :]
        return self.parts.projection(x)

    def predict_noise(self, latents: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, ref: Reference,
                      guidance: float) -> torch.Tensor:
        """Classifier-free guided epsilon for noisy (scaled) latents [B, 4, h, w]."""
        b = latents.shape[0]
        ref_lat = ref.latent.expand(b, -1, -1, -1).to(latents.dtype)
        x = torch.cat([torch.cat([latents, ref_lat], 1), torch.cat([latents, torch.zeros_like(ref_lat)], 1)])
        enc = torch.cat([cond, torch.zeros_like(cond)]).to(latents.dtype)
        t = torch.as_tensor(t, device=latents.device).reshape(-1).expand(b)
        eps = self.parts.unet(x, torch.cat([t, t]), encoder_hidden_states=enc).sample
        eps_c, eps_u = eps.chunk(2)
        return eps_u + guidance * (eps_c - eps_u)

    # -- sampling ---------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        img = self.parts.vae.decode(latents / self.scaling_factor).sample
        return (img / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def generate(self, ref: Reference, poses: Sequence[tuple[float, float, float]], steps: int = 50,
                 guidance: float = 3.0, seed: int = 0, batch_size: int = 8,
                 on_step: Callable[[int, int], None] | None = None,
                 on_batch: Callable[[int, np.ndarray], None] | None = None) -> np.ndarray:
        """DDIM-sample one view per relative pose; deterministic for a seed.
        Returns RGB float [N, 256, 256, 3]. ``on_step(done, total)`` after every
        denoising step (it may raise to cancel); ``on_batch(first_index, images)``
        as views complete."""
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler.from_config(self.parts.scheduler.config)
        scheduler.set_timesteps(steps, device=self.device)
        gen = torch.Generator("cpu").manual_seed(int(seed))
        h = ref.latent.shape[-2]
        w = ref.latent.shape[-1]
        noise = torch.randn(len(poses), 4, h, w, generator=gen)  # drawn up front: independent of batching
        camera = self.camera_vectors(ref, poses)
        out = []
        total = len(poses) * steps
        done = 0
        for s in range(0, len(poses), batch_size):
            cond = self.conditioning(ref, camera[s:s + batch_size])
            latents = noise[s:s + batch_size].to(self.device, self.dtype) * scheduler.init_noise_sigma
            for t in scheduler.timesteps:
                eps = self.predict_noise(latents, t, cond, ref, guidance)
                latents = scheduler.step(eps, t, latents).prev_sample
                done += len(latents)
                if on_step:
                    on_step(done, total)
            imgs = self.decode(latents).permute(0, 2, 3, 1).float().cpu().numpy()
            if on_batch:
                on_batch(s, imgs)
            out.append(imgs)
        return np.concatenate(out)
