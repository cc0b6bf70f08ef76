"""Model presets: which checkpoints a job uses, in one table.

A preset names a text-to-image model (Stable Diffusion in diffusers layout;
also the prior of SDS refinement) and a novel-view model (Zero-1-to-3 in the
diffusers layout published for zero123-xl, or Stable Zero123). Every entry can
be overridden by a hub id or a local folder: on the CLI
(``--text-to-image-model``, ``--novel-view-model``, ``--novel-view-kind``), in
the server's configuration (the same flags on ``serve``), or with the
environment variables ``GEN3D_TEXT_TO_IMAGE_MODEL``,
``GEN3D_NOVEL_VIEW_MODEL`` and ``GEN3D_NOVEL_VIEW_KIND``.

``tiny`` names random-weight replicas with the real classes and folder layout,
built locally and deterministically (see :mod:`backend.models.tiny`): no
download, for tests and offline demos. Its pictures are noise; its plumbing is
the real one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

TINY_PREFIX = "tiny:"
NOVEL_VIEW_KINDS = ("zero123", "stable_zero123")


@dataclass(frozen=True)
class Preset:
    name: str
    text_to_image: str  # hub id, local folder, or "tiny:stable-diffusion"
    novel_view: str  # hub id, local folder, or "tiny:zero123"
    novel_view_kind: str = "zero123"  # camera-vector variant: "zero123" | "stable_zero123"
    description: str = ""

    def models(self) -> dict[str, str]:
        return {"text_to_image": self.text_to_image, "novel_view": self.novel_view}


PRESETS: dict[str, Preset] = {
    "default": Preset(
        "default",
        text_to_image="stable-diffusion-v1-5/stable-diffusion-v1-5",
        novel_view="ashawkey/zero123-xl-diffusers",
        novel_view_kind="zero123",
        description="Stable Diffusion 1.5 and Zero-1-to-3 XL (4.6-7.1 GB of fp16 weights: see prefetch)",
    ),
    "stable-zero123": Preset(
        "stable-zero123",
        text_to_image="stable-diffusion-v1-5/stable-diffusion-v1-5",
        novel_view="ashawkey/stable-zero123-diffusers",
        novel_view_kind="stable_zero123",
        description="Stable Diffusion 1.5 and Stable Zero123 (non-commercial licence)",
    ),
    "tiny": Preset(
        "tiny",
        text_to_image=TINY_PREFIX + "stable-diffusion",
        novel_view=TINY_PREFIX + "zero123",
        novel_view_kind="zero123",
        description="random-weight replicas built locally in seconds: tests and offline demos",
    ),
}

ENV = {
    "text_to_image": "GEN3D_TEXT_TO_IMAGE_MODEL",
    "novel_view": "GEN3D_NOVEL_VIEW_MODEL",
    "novel_view_kind": "GEN3D_NOVEL_VIEW_KIND",
}


def resolve(name: str, text_to_image: str | None = None, novel_view: str | None = None,
            novel_view_kind: str | None = None) -> Preset:
    """The preset ``name`` with overrides applied: explicit arguments first, then
    the environment, then the table."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    p = PRESETS[name]
    t2i = text_to_image or os.environ.get(ENV["text_to_image"]) or p.text_to_image
    nv = novel_view or os.environ.get(ENV["novel_view"]) or p.novel_view
    kind = novel_view_kind or os.environ.get(ENV["novel_view_kind"]) or p.novel_view_kind
    if kind not in NOVEL_VIEW_KINDS:
        raise ValueError(f"unknown novel-view kind {kind!r}; known: {list(NOVEL_VIEW_KINDS)}")
    return replace(p, text_to_image=t2i, novel_view=nv, novel_view_kind=kind)


def describe() -> dict:
    return {k: {"text_to_image": p.text_to_image, "novel_view": p.novel_view, "novel_view_kind": p.novel_view_kind,
                "description": p.description} for k, p in PRESETS.items()}
