"""Which files of a diffusers-layout model repository the loaders read.

Hub repositories carry far more than one set of weights: Stable Diffusion 1.5
holds fp32, fp16 and non-EMA UNets, ``.bin`` copies of each, a safety checker
and multi-GB single-file checkpoints at the root, about 12 GB when all its
``*.safetensors`` are fetched, of which the fp16 pipeline reads 2.1 GB.
:func:`select_files` picks, from a repository's file listing, exactly what
:class:`backend.models.store.ModelStore` loads: ``model_index.json``, the
configs of the components the pipeline names, and per component one weight
set: the fp16 variant where the repository has one (when fp16 is wanted),
safetensors over pickles, never non-EMA or other training variants, never the
safety checker (the pipelines are built with ``safety_checker=None``).

:func:`weights_variant` makes the matching decision on a local folder, so the
loaders ask for ``variant="fp16"`` exactly where those files are what is there.

Pure functions of names (and sizes): no network, testable on fake listings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

SKIP_COMPONENTS = frozenset({"safety_checker"})  # never loaded: pipelines get safety_checker=None
CONFIG_SUFFIXES = (".json", ".txt", ".model")  # configs, tokenizer vocabularies/merges, sentencepiece models
WEIGHT_FORMATS = (".safetensors", ".bin")  # preference order
FP16 = "fp16"
_SHARD = re.compile(r"-\d{5}-of-\d{5}$")
_INDEX = re.compile(r"^(?P<base>[^.]+)\.(?P<fmt>safetensors|bin)\.index(?:\.(?P<variant>[^.]+))?\.json$")


@dataclass(frozen=True)
class WeightFile:
    component: str
    name: str
    fmt: str  # ".safetensors" | ".bin"
    variant: str | None  # None (the default weights), "fp16", "non_ema", ...


def parse_weight(path: str) -> WeightFile | None:
    """``unet/diffusion_pytorch_model.fp16.safetensors`` -> WeightFile(unet, ..., .safetensors, fp16);
    sharded names (``model.fp16-00001-of-00002.safetensors``) too; None for what is not a weight file."""
    parts = path.split("/")
    if len(parts) != 2:
        return None
    component, name = parts
    fmt = next((f for f in WEIGHT_FORMATS if name.endswith(f)), None)
    if fmt is None:
        return None
    stem = _SHARD.sub("", name[: -len(fmt)])
    base, _, variant = stem.partition(".")
    if not base:
        return None
    return WeightFile(component, name, fmt, variant or None)


def _variant_order(variants: set, want_fp16: bool) -> list:
    """Which weight set of one component to take: fp16 first when wanted, then the default weights;
    otherwise the default first, fp16 as a fallback (upcast by the loader); never ``non_ema``/``ema``
    training variants unless they are all there is."""
    first = [FP16, None] if want_fp16 else [None, FP16]
    rest = sorted((v for v in variants if v not in first and v not in ("non_ema", "ema")), key=str)
    training = sorted((v for v in variants if v in ("non_ema", "ema")), key=str)
    return [v for v in first + rest + training if v in variants]


def components_of(model_index: dict | None) -> set[str] | None:
    """Component folders a ``model_index.json`` names (entries ``[library, class]`` that are not null),
    minus those never loaded. None when there is no index to go by."""
    if not model_index:
        return None
    out = set()
    for key, value in model_index.items():
        if key.startswith("_") or not isinstance(value, (list, tuple)) or len(value) != 2:
            continue
        if value[0] is None or value[1] is None:
            continue
        out.add(key)
    return out - SKIP_COMPONENTS


def select_files(listing, want_fp16: bool = True, components: set[str] | None = None) -> list[str]:
    """The files to fetch from a repository whose files are ``listing`` (paths relative to its root).

    ``components``: the folders ``model_index.json`` names (:func:`components_of`); without it,
    every sub-folder but the skipped ones. Root-level files other than ``model_index.json``
    (single-file checkpoints, inference YAMLs, READMEs, images) and deeper folders are never taken."""
    listing = sorted(set(listing))
    chosen: list[str] = [p for p in listing if p == "model_index.json"]
    by_component: dict[str, list[str]] = {}
    for p in listing:
        parts = p.split("/")
        if len(parts) != 2 or parts[0] in SKIP_COMPONENTS or parts[0].startswith("."):
            continue
        if components is not None and parts[0] not in components:
            continue
        by_component.setdefault(parts[0], []).append(p)
    for component, files in sorted(by_component.items()):
        weights = [w for w in (parse_weight(p) for p in files) if w is not None]
        pick_variant = pick_fmt = None
        if weights:
            order = _variant_order({w.variant for w in weights}, want_fp16)
            pick_variant = order[0]
            fmts = {w.fmt for w in weights if w.variant == pick_variant}
            pick_fmt = next(f for f in WEIGHT_FORMATS if f in fmts)
        for p in files:
            name = p.split("/", 1)[1]
            w = parse_weight(p)
            if w is not None:
                if w.variant == pick_variant and w.fmt == pick_fmt:
                    chosen.append(p)
                continue
            index = _INDEX.match(name)
            if index is not None:  # a shard index belongs with its weight set
                if "." + index["fmt"] == pick_fmt and (index["variant"] or None) == pick_variant:
                    chosen.append(p)
                continue
            if name.endswith(CONFIG_SUFFIXES):
                chosen.append(p)
    return chosen


def weights_variant(folder: str | Path, want_fp16: bool) -> str | None:
    """``"fp16"`` when the loader of the component in ``folder`` should ask for the fp16 variant:
    its files are there and they are wanted (CUDA), or they are all there is (a folder fetched
    for a GPU, loaded on the CPU: the loader upcasts)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    variants = {w.variant for w in (parse_weight(f"{folder.name}/{p.name}") for p in folder.iterdir()) if w}
    order = _variant_order(variants & {FP16, None}, want_fp16)
    return order[0] if order else None


def pipeline_variant(root: str | Path, want_fp16: bool) -> str | None:
    """The variant for a whole-pipeline ``from_pretrained``: diffusers falls back per component to
    the default weights when a component has no such variant, so ``"fp16"`` is right when any
    component's choice is fp16."""
    root = Path(root)
    subs = [d for d in root.iterdir() if d.is_dir() and d.name not in SKIP_COMPONENTS] if root.is_dir() else []
    return FP16 if any(weights_variant(d, want_fp16) == FP16 for d in subs) else None


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit in ("B", "KB") else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")
