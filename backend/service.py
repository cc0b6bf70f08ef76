"""Composition: which job kinds a server or the in-process CLI offers, and the
models a preset provides."""

from __future__ import annotations

from typing import Any

from .jobs import Registry


def build_registry() -> Registry:
    """Every job kind whose pipeline exists. A kind not implemented is not listed."""
    from . import diagnose, reconstruct

    specs = [diagnose.SPEC, reconstruct.SPEC]
    return Registry(specs)


def make_models(preset: str, device: str) -> Any:
    """The model store handed to jobs (loads lazily). None while no job kind needs models."""
    return None


def register_cli_verbs() -> None:
    """Register the job verbs that pipeline modules contribute to the CLI."""
    from . import cli, reconstruct

    cli.job_verb("reconstruct", "posed views (transforms.json) -> textured mesh GLB")(reconstruct.CLI)
