"""Device choice, memory figures and library versions (for capabilities and diagnose)."""

from __future__ import annotations

import gc
import os
import platform
import sys
from importlib import metadata

LIBRARIES = (
    "torch",
    "diffusers",
    "transformers",
    "gsplat",
    "pymeshlab",
    "xatlas",
    "trimesh",
    "numpy",
    "pyzmq",
    "pillow",
)


def pick_device(requested: str | None = None) -> str:
    """'cuda' when a GPU is usable (or asked for), else 'cpu'. Env GEN3D_DEVICE overrides."""
    import torch

    requested = requested or os.environ.get("GEN3D_DEVICE") or "auto"
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {requested!r} was asked for but torch sees no CUDA GPU (torch {torch.__version__})")
    return requested


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    try:
        import zmq

        out["libzmq"] = zmq.zmq_version()
    except ImportError:  # pragma: no cover - pyzmq is a hard dependency
        pass
    return out


def process_rss_bytes() -> int:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:  # pragma: no cover
        return 0


def memory_info(device: str) -> dict:
    info: dict = {"process_rss_bytes": process_rss_bytes()}
    try:
        import psutil

        vm = psutil.virtual_memory()
        info["ram_total_bytes"] = int(vm.total)
        info["ram_available_bytes"] = int(vm.available)
    except ImportError:  # pragma: no cover
        pass
    if device.startswith("cuda"):
        import torch

        free, total = torch.cuda.mem_get_info()
        info.update(
            gpu_total_bytes=int(total),
            gpu_free_bytes=int(free),
            gpu_allocated_bytes=int(torch.cuda.memory_allocated()),
            gpu_peak_bytes=int(torch.cuda.max_memory_allocated()),
        )
    return info


def device_info(device: str) -> dict:
    import torch

    info = {
        "device": device,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
    }
    if device.startswith("cuda"):
        idx = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(idx)
        info.update(gpu_name=props.name, gpu_capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda)
    return info


def free_memory(device: str) -> None:
    """Give memory back after a job (called by the worker after every job)."""
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
    elif sys.platform.startswith("linux"):
        try:  # return freed heap pages to the OS so RSS reflects what is live
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    try:
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return True
    except (ImportError, AttributeError):  # pragma: no cover
        pass
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)
