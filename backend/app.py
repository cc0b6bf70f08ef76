"""The composition root: which job kinds a server or the in-process CLI offers, and
the models a preset provides. The service and the CLI get both from here."""

from __future__ import annotations

from typing import Any

from .service.jobs import Registry


def build_registry() -> Registry:
    """Every job kind whose pipeline exists. A kind not implemented is not listed."""
    from .kinds import diagnose, generate, models, reconstruct, refine

    specs = [diagnose.SPEC, models.SPEC, reconstruct.SPEC, generate.TEXT_SPEC, generate.FRONTS_SPEC, generate.IMAGE_SPEC,
             refine.SPEC]
    return Registry(specs)


def make_models(preset: str, device: str, low_vram: bool = False, text_to_image: str | None = None,
                novel_view: str | None = None, novel_view_kind: str | None = None) -> Any:
    """The model store handed to jobs; it loads each model on first use."""
    from .models.store import ModelStore

    return ModelStore(preset, device, low_vram, text_to_image=text_to_image, novel_view=novel_view,
                      novel_view_kind=novel_view_kind)
