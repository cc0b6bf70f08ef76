"""Loading the preset's models, lazily, once per process; and fetching them.

``ModelStore`` is what jobs receive (``JobContext.models``). It resolves a model
name to a local folder (tiny replicas are built; hub ids come from the local
Hugging Face cache, downloaded when the network allows), loads with
diffusers/transformers ``from_pretrained``, fp16 on CUDA and fp32 on CPU, and
applies the memory options for small GPUs behind one flag (``low_vram``:
attention slicing, VAE slicing, CPU offload of idle models).

A model that is neither on disk nor downloadable is a :class:`ModelMissing`
error naming the model and the command that fetches it, never a stack trace.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ..common.errors import ModelMissing
from .files import components_of, human_size, pipeline_variant, select_files
from .presets import TINY_PREFIX, Preset, resolve

log = logging.getLogger("gen3d.models")

def quiet_loading() -> None:
    """No per-file progress bars or deprecation chatter from the loaders (our own progress is shown)."""
    import warnings

    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated.*")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def fetch_command(preset: str) -> str:
    return f"python -m backend prefetch --preset {preset}"


def _cached(name: str, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The local Hugging Face cache's snapshot of ``name``, without touching the network."""
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(name, local_files_only=True, cache_dir=cache_dir))
    except Exception:  # noqa: BLE001 - not cached (any flavour of hub error)
        return None
    try:  # an interrupted download leaves model_index.json alone: not a model yet
        with open(path / "model_index.json", encoding="utf-8") as f:
            wanted = components_of(json.load(f)) or set()
    except (OSError, ValueError):
        return None
    return path if all(_component_complete(path / c) for c in wanted) else None


def _component_complete(folder: Path) -> bool:
    """A component folder with a model config has its weights too (a stopped download may leave only the config)."""
    if not folder.is_dir():
        return False
    if not (folder / "config.json").is_file():
        return True  # scheduler, tokenizer, feature extractor: configs only
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))


@dataclass
class DownloadPlan:
    """What fetching ``name`` means: the files the loaders read (see :mod:`.files`) and their sizes."""

    name: str
    revision: str | None
    files: list[tuple[str, int | None]]

    @property
    def total_bytes(self) -> int:
        return sum(size or 0 for _, size in self.files)

    def describe(self) -> list[str]:
        lines = [f"  {path}  {human_size(size) if size is not None else '(size unknown)'}" for path, size in self.files]
        lines.append(f"  {len(self.files)} files, {human_size(self.total_bytes)} in all")
        return lines


def plan_from_listing(name: str, sizes: dict[str, int | None], model_index: dict | None = None,
                      revision: str | None = None, want_fp16: bool = True) -> DownloadPlan:
    files = select_files(sizes, want_fp16, components_of(model_index))
    return DownloadPlan(name, revision, [(f, sizes.get(f)) for f in files])


def _hub_listing(name: str) -> tuple[dict[str, int | None], dict | None, str | None]:
    """The hub's file listing of ``name`` with sizes, its ``model_index.json`` and the commit (network)."""
    from huggingface_hub import HfApi, hf_hub_download

    info = HfApi().model_info(name, files_metadata=True)
    sizes = {s.rfilename: s.size for s in (info.siblings or [])}
    index = None
    if "model_index.json" in sizes:
        with open(hf_hub_download(name, "model_index.json", revision=info.sha), encoding="utf-8") as f:
            index = json.load(f)
    return sizes, index, info.sha


def _download(plan: DownloadPlan) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(plan.name, revision=plan.revision, allow_patterns=[f for f, _ in plan.files]))


def plan_download(name: str, want_fp16: bool = True) -> DownloadPlan:
    sizes, index, revision = _hub_listing(name)
    if not sizes:
        raise ModelMissing(f"model '{name}' lists no files on the hub")
    return plan_from_listing(name, sizes, index, revision, want_fp16)


def _missing(name: str, preset: str, exc: BaseException) -> ModelMissing:
    return ModelMissing(
        f"model '{name}' is not on this machine and could not be downloaded ({type(exc).__name__}: "
        f"{(str(exc).splitlines() or [''])[0][:200]}). Fetch it with: {fetch_command(preset)} on a machine with network, "
        "or copy the folder and pass it with --text-to-image-model/--novel-view-model")


def local_path(name: str, preset: str = "default", download: bool = True, progress=None) -> Path:
    """Folder holding model ``name`` (hub id, folder or ``tiny:...``).
    Downloads (only the files the loaders read: :mod:`.files`) when allowed; raises
    :class:`ModelMissing` otherwise. ``progress`` receives the download plan's lines."""
    if name.startswith(TINY_PREFIX):
        from .tiny import build_tiny

        return build_tiny(name[len(TINY_PREFIX):])
    p = Path(name).expanduser()
    if p.is_dir():
        if not (p / "model_index.json").is_file():
            raise ModelMissing(f"{p} is not a diffusers model folder (no model_index.json)")
        return p
    if name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1):
        raise ModelMissing(f"model folder {name} not found")
    cached = _cached(name)
    if cached is not None:
        return cached
    if not download or _offline():
        raise ModelMissing(
            f"model '{name}' is not on this machine and downloading is {'off (HF_HUB_OFFLINE)' if _offline() else 'disabled'}. "
            f"Fetch it with: {fetch_command(preset)}  (or point --text-to-image-model/--novel-view-model at a local folder)")
    try:
        plan = plan_download(name)
    except ModelMissing:
        raise
    except Exception as exc:  # noqa: BLE001 - no network, unknown repo, auth...
        raise _missing(name, preset, exc) from None
    for line in plan.describe():
        (progress or log.info)(line)
    try:
        return _download(plan)
    except Exception as exc:  # noqa: BLE001
        raise _missing(name, preset, exc) from None


def prefetch(preset: Preset, progress=print) -> dict[str, Path]:
    """Download (or build) every model of ``preset``; returns their folders. For a hub model,
    what will be fetched (files and total size, from the hub's listing) is printed first."""
    out = {}
    for role, name in preset.models().items():
        progress(f"{role}: {name}")
        out[role] = local_path(name, preset.name, download=True, progress=progress)
        progress(f"  -> {out[role]}")
    return out


class ModelStore:
    """The models of one preset on one device, loaded on first use."""

    def __init__(self, preset: str | Preset = "tiny", device: str = "cpu", low_vram: bool = False, **overrides):
        self.preset = preset if isinstance(preset, Preset) else resolve(preset, **overrides)
        self.device = device
        self.low_vram = low_vram
        self.fp16 = str(device).startswith("cuda")
        self.dtype = torch.float16 if self.fp16 else torch.float32
        self._lock = threading.Lock()
        self._sd = None
        self._zero123 = None
        quiet_loading()

    def describe(self) -> dict:
        return {"preset": self.preset.name, **self.preset.models(), "novel_view_kind": self.preset.novel_view_kind,
                "dtype": str(self.dtype).replace("torch.", ""), "low_vram": self.low_vram}

    def stable_diffusion(self):
        """A diffusers StableDiffusionPipeline (text-to-image, and the SDS prior)."""
        with self._lock:
            if self._sd is None:
                from diffusers import DDIMScheduler, StableDiffusionPipeline

                path = local_path(self.preset.text_to_image, self.preset.name)
                try:
                    pipe = StableDiffusionPipeline.from_pretrained(
                        path, torch_dtype=self.dtype, variant=pipeline_variant(path, self.fp16),
                        safety_checker=None, requires_safety_checker=False)
                except (OSError, ValueError) as exc:
                    raise ModelMissing(f"could not load the text-to-image model from {path}: {exc}") from None
                pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
                pipe.set_progress_bar_config(disable=True)
                if self.low_vram and str(self.device).startswith("cuda"):
                    pipe.enable_attention_slicing()
                    pipe.vae.enable_slicing()
                    pipe.enable_model_cpu_offload()
                else:
                    pipe.to(self.device)
                self._sd = pipe
            return self._sd

    def zero123(self):
        from .zero123 import Zero123, load_parts

        with self._lock:
            if self._zero123 is None:
                path = local_path(self.preset.novel_view, self.preset.name)
                try:
                    parts = load_parts(str(path), self.preset.novel_view_kind, self.dtype, prefer_fp16=self.fp16)
                except (OSError, ValueError) as exc:
                    raise ModelMissing(f"could not load the novel-view model from {path}: {exc}") from None
                if self.low_vram and str(self.device).startswith("cuda"):
                    parts.unet.set_attention_slice("auto")
                    parts.vae.enable_slicing()
                self._zero123 = Zero123(parts, self.device)
            return self._zero123

    @contextmanager
    def resident_for_refinement(self, margin_bytes: int = 3 << 30):
        """Score distillation calls the UNet and the VAE on every step. Under
        ``low_vram`` the Stable Diffusion pipeline is CPU-offloaded (each model
        moved to the GPU when called and back when another one is), which would
        move the 1.7 GB fp16 UNet across the bus on every refinement step. For
        the refinement, keep the pipeline's models on the GPU when they fit with
        ``margin_bytes`` to spare, then put the offload back. Without
        ``low_vram``, or when they do not fit, nothing changes (and the cost is
        logged)."""
        pipe = self._sd
        offloaded = (pipe is not None and self.low_vram and str(self.device).startswith("cuda")
                     and getattr(pipe, "_offload_gpu_id", None) is not None)
        if not offloaded:
            yield
            return
        parts = [m for m in (pipe.unet, pipe.vae, pipe.text_encoder) if m is not None]
        need = sum(p.numel() * p.element_size() for m in parts for p in m.parameters())
        free = torch.cuda.mem_get_info()[0]
        if need + margin_bytes > free:
            log.warning("refinement keeps CPU offload (models %.1f GB, GPU free %.1f GB): the UNet moves to the GPU "
                        "and back on every step", need / 1e9, free / 1e9)
            yield
            return
        pipe.remove_all_hooks()
        for m in parts:
            m.to(self.device)
        try:
            yield
        finally:
            for m in parts:
                m.to("cpu")
            torch.cuda.empty_cache()
            pipe.enable_model_cpu_offload()

    def release(self) -> None:
        """Drop loaded models (frees their memory)."""
        with self._lock:
            self._sd = None
            self._zero123 = None
