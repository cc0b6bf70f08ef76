"""Composition: which job kinds a server or the in-process CLI offers, and the
models a preset provides."""

from __future__ import annotations

from typing import Any

from .jobs import Registry


def build_registry() -> Registry:
    """Every job kind whose pipeline exists. A kind not implemented is not listed."""
    from . import diagnose, generate, reconstruct, refine

    specs = [diagnose.SPEC, reconstruct.SPEC, generate.TEXT_SPEC, generate.IMAGE_SPEC, refine.SPEC]
    return Registry(specs)


def make_models(preset: str, device: str, low_vram: bool = False, text_to_image: str | None = None,
                novel_view: str | None = None, novel_view_kind: str | None = None) -> Any:
    """The model store handed to jobs; it loads each model on first use."""
    from .models.store import ModelStore

    return ModelStore(preset, device, low_vram, text_to_image=text_to_image, novel_view=novel_view,
                      novel_view_kind=novel_view_kind)


def register_cli_verbs() -> None:
    """Register the job verbs that pipeline modules contribute to the CLI."""
    from . import cli, generate, reconstruct, refine

    cli.job_verb("reconstruct", "posed views (transforms.json) -> textured mesh GLB")(reconstruct.CLI)
    cli.job_verb("generate", "a prompt (--prompt) or a reference image (--image) -> textured mesh GLB")(generate.CLI)
    cli.job_verb("refine", "refine or restyle the texture of a mesh (GLB) from a prompt and/or reference image")(refine.CLI)
