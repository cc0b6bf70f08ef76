"""Which models a preset needs, whether they are on disk, fetching and removing them.

Plain functions for the ``models`` job (``backend.kinds.models``) and the CLI:

* :func:`states` looks without touching the network: per role, the model's
  name, whether it is present (a complete hub snapshot in the Hugging Face
  cache, a built tiny replica, a local folder), its size on disk, and whether
  the manager may delete it (never a folder the user pointed at).
* :func:`download` fetches what is missing, reporting files and bytes. A hub
  model is fetched file by file (only the files the loaders read, see
  :mod:`.files`), each in a subprocess that a cancel kills; the hub's
  ``.incomplete`` file is kept, so the next download resumes it. A tiny
  replica is built (its "download").
* :func:`remove` deletes a model's cache entry.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from ..common.errors import ModelMissing
from .presets import TINY_PREFIX, Preset

# progress(files_done, files_total, bytes_done, bytes_total, what); bytes_total counts the hub files only
# (a tiny replica's size is known once it is built)
ProgressFn = Callable[[int, int, int, int, str], None]


@dataclass
class ModelState:
    role: str  # text_to_image | novel_view
    name: str  # hub id, tiny:..., or a folder
    source: str  # hub | tiny | folder
    present: bool
    bytes: int  # on disk (0 when absent)
    path: str | None
    removable: bool

    def to_dict(self) -> dict:
        return asdict(self)


def _folder_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_size  # follows the snapshot's links to the blobs
            except OSError:
                pass
    return total


def _tiny_folder(name: str) -> Path:
    from .tiny import TINY_VERSION, default_cache_dir

    return default_cache_dir() / f"tiny-v{TINY_VERSION}" / name[len(TINY_PREFIX):]


def hub_repo_folder(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The Hugging Face cache's folder of model ``name`` (``models--org--name``)."""
    from huggingface_hub import constants

    return Path(cache_dir or constants.HF_HUB_CACHE) / ("models--" + name.replace("/", "--"))


def _source(name: str) -> str:
    if name.startswith(TINY_PREFIX):
        return "tiny"
    if name.startswith((".", "/", "~")) or Path(name).expanduser().is_dir():
        return "folder"
    return "hub"


def state(role: str, name: str, cache_dir: str | os.PathLike | None = None) -> ModelState:
    from .store import _cached

    src = _source(name)
    if src == "tiny":
        path = _tiny_folder(name)
        present = (path / "model_index.json").is_file()
    elif src == "folder":
        path = Path(name).expanduser()
        present = (path / "model_index.json").is_file()
    else:
        path = _cached(name, cache_dir)
        present = path is not None
    return ModelState(role, name, src, present, _folder_bytes(path) if present else 0,
                      str(path) if present else None, src != "folder")


def states(preset: Preset, cache_dir: str | os.PathLike | None = None) -> list[ModelState]:
    return [state(role, name, cache_dir) for role, name in preset.models().items()]


# ----------------------------------------------------------------------------- download

def incomplete_bytes(blobs: Path) -> int:
    """Bytes in the blob folder's partial downloads (``*.incomplete``)."""
    try:
        return sum(p.stat().st_size for p in blobs.glob("*.incomplete"))
    except OSError:
        return 0


_FETCH = ("import sys\n"
          "from huggingface_hub import hf_hub_download\n"
          "name, rev, fn, cache = sys.argv[1:5]\n"
          "hf_hub_download(name, fn, revision=rev or None, cache_dir=cache or None)\n")


def fetch_file_subprocess(name: str, revision: str | None, filename: str, cache_dir, cancelled: Callable[[], bool],
                          tick: Callable[[int], None]) -> None:
    """One file of a hub model into the cache, in a subprocess (killed on cancel). ``tick`` gets the
    bytes written so far (the blob's ``.incomplete`` file)."""
    blobs = hub_repo_folder(name, cache_dir) / "blobs"
    proc = subprocess.Popen([sys.executable, "-c", _FETCH, name, revision or "", filename, str(cache_dir or "")],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while proc.poll() is None:
            if cancelled():
                proc.kill()
                proc.wait(10)
                return
            tick(incomplete_bytes(blobs))
            time.sleep(0.25)
    finally:
        if proc.poll() is None:
            proc.kill()
    if proc.returncode != 0:
        err = (proc.stderr.read() if proc.stderr else "").strip().splitlines()
        raise ModelMissing(f"downloading {filename} of '{name}' failed: {(err or ['?'])[-1][:300]}")


def download(preset: Preset, progress: ProgressFn, cancelled: Callable[[], bool] = lambda: False,
             cache_dir: str | os.PathLike | None = None, plan_fn=None, fetch_fn=None) -> list[ModelState]:
    """Fetch (or build) every missing model of ``preset``. Returns the states after. Stops early
    (returning what is there) when ``cancelled()``; raises :class:`ModelMissing` when the hub cannot be
    reached, with what to do. ``plan_fn`` / ``fetch_fn`` replace the hub's listing and the per-file
    fetch (tests)."""
    from .store import _offline, fetch_command, plan_download

    plan_fn = plan_fn or plan_download
    fetch_fn = fetch_fn or fetch_file_subprocess
    todo = [s for s in states(preset, cache_dir) if not s.present]
    for s in todo:
        if s.source == "folder":
            raise ModelMissing(f"the {s.role} model folder {s.name} does not exist (a folder is not downloaded)")
    plans = {}
    for s in todo:
        if s.source != "hub":
            continue
        if _offline():
            raise ModelMissing(f"model '{s.name}' is missing and downloading is off (HF_HUB_OFFLINE): fetch it on a "
                               f"machine with network ({fetch_command(preset.name)}) and copy the cache over")
        try:
            plans[s.role] = plan_fn(s.name)
        except ModelMissing:
            raise
        except Exception as exc:  # noqa: BLE001 - no network, unknown repo, auth...
            raise ModelMissing(f"could not reach the model hub for '{s.name}' ({type(exc).__name__}: "
                               f"{(str(exc).splitlines() or [''])[0][:200]}). Is this machine offline? Fetch the "
                               f"models on one with network ({fetch_command(preset.name)}) and copy the cache over")
    files_total = sum(len(p.files) for p in plans.values()) + sum(1 for s in todo if s.source == "tiny")
    bytes_total = sum(p.total_bytes for p in plans.values())
    files_done = bytes_done = 0
    progress(0, files_total, 0, bytes_total, "")
    for s in todo:
        if cancelled():
            break
        if s.source == "tiny":
            from .tiny import build_tiny

            progress(files_done, files_total, bytes_done, bytes_total, s.name)
            bytes_done += _folder_bytes(build_tiny(s.name[len(TINY_PREFIX):]))  # (not in bytes_total: unknown before)
            files_done += 1
            progress(files_done, files_total, bytes_done, bytes_total, s.name)
            continue
        plan = plans[s.role]
        for filename, size in plan.files:
            if cancelled():
                break
            base = bytes_done
            fetch_fn(s.name, plan.revision, filename, cache_dir, cancelled,
                     lambda n: progress(files_done, files_total, base + min(n, size or n), bytes_total,
                                        f"{s.name}/{filename}"))
            if cancelled():
                break
            files_done += 1
            bytes_done += size or 0
            progress(files_done, files_total, bytes_done, bytes_total, f"{s.name}/{filename}")
    return states(preset, cache_dir)


def remove(preset: Preset, roles: list[str] | None = None, cache_dir: str | os.PathLike | None = None) -> list[ModelState]:
    """Delete the cached models of ``preset`` (those of ``roles``; all when None). A folder the user gave
    is never touched; a model two roles share goes once."""
    for s in states(preset, cache_dir):
        if roles is not None and s.role not in roles:
            continue
        if not s.present or not s.removable:
            continue
        if s.source == "tiny":
            shutil.rmtree(_tiny_folder(s.name), ignore_errors=True)
        else:
            shutil.rmtree(hub_repo_folder(s.name, cache_dir), ignore_errors=True)
    return states(preset, cache_dir)
