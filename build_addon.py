#!/usr/bin/env python3
"""Build the Blender extension: ``dist/gen3d-<version>.zip``, for "Install from Disk".

The zip holds the add-on (``blender_addon/``) at its root, the shared wire code
as the subpackage ``gen3d_wire/`` (imported relatively by the add-on), and
pyzmq wheels for Windows, macOS and Linux under ``wheels/``, listed in the
manifest's ``wheels``:

* cp311 wheels for Blender 4.2 to 5.0 (Python 3.11),
* cp312-abi3 wheels, which serve Python 3.13 (Blender 5.1 on).

It also holds the backend itself as a wheel under ``backend_wheel/`` (built
here with ``pip wheel --no-deps``, a few hundred kB, not listed in the
manifest: Blender does not install it into its own Python). The add-on's
"Install Local Backend" installs it into a virtual environment of its own
(``blender_addon/installer.py``); ``--no-backend-wheel`` leaves it out.

Wheels are fetched once with ``pip download --only-binary=:all: --no-deps``
into a cache (``~/.cache/gen3d/wheels``, or ``--cache``) and reused; with
``--wheels DIR`` nothing is downloaded and the wheels are taken from DIR.
``--platform`` / ``--python`` build for fewer targets (the manifest's
``platforms`` and, for 3.11 alone, ``blender_version_max`` say so).

    python build_addon.py                      # all targets, downloads what the cache lacks
    python build_addon.py --wheels ./wheels    # offline
    python build_addon.py --platform linux-x64 --python 3.11 --wheels DIR
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
ADDON_DIR = ROOT / "blender_addon"
WIRE_DIR = ROOT / "gen3d_wire"
MANIFEST = "blender_manifest.toml"

PYZMQ_VERSION = "27.3.0"
# Python version of Blender -> wheel python/abi tags
PYTHON_TAGS = {"3.11": "cp311-cp311", "3.13": "cp312-abi3"}
# Blender platform -> (pip --platform, the wheel's platform tag)
PLATFORMS = {
    "windows-x64": ("win_amd64", "win_amd64"),
    "windows-arm64": ("win_arm64", "win_arm64"),
    "macos-arm64": ("macosx_11_0_arm64", "macosx_10_15_universal2"),
    "macos-x64": ("macosx_10_15_x86_64", "macosx_10_15_universal2"),
    "linux-x64": ("manylinux_2_28_x86_64", "manylinux_2_26_x86_64.manylinux_2_28_x86_64"),
}
WIRE_FILES = ("__init__.py", "protocol.py", "client.py")
EXCLUDE_DIRS = {"__pycache__", ".pytest_cache", "wheels", "gen3d_wire"}
EXCLUDE_SUFFIXES = (".pyc", ".pyo", ".orig", ".rej", ".blend1")


def default_cache() -> Path:
    base = os.environ.get("GEN3D_WHEEL_CACHE")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "gen3d" / "wheels"


def wheel_name(python: str, platform: str) -> str:
    return f"pyzmq-{PYZMQ_VERSION}-{PYTHON_TAGS[python]}-{PLATFORMS[platform][1]}.whl"


def targets(platforms: list[str], pythons: list[str]) -> dict[str, tuple[str, str]]:
    """wheel file name -> (python, platform) that fetches it (universal2 serves both macOS platforms)."""
    out: dict[str, tuple[str, str]] = {}
    for py in pythons:
        for plat in platforms:
            out.setdefault(wheel_name(py, plat), (py, plat))
    return out


def read_manifest() -> str:
    return (ADDON_DIR / MANIFEST).read_text(encoding="utf-8")


def manifest_field(text: str, key: str) -> str | None:
    m = re.search(rf'^{key}\s*=\s*"([^"]*)"', text, re.M)
    return m.group(1) if m else None


def manifest_list(text: str, key: str) -> list[str]:
    m = re.search(rf"^{key}\s*=\s*\[(.*?)\]", text, re.M | re.S)
    if not m:
        return []
    return re.findall(r'"([^"]+)"', re.sub(r"#.*", "", m.group(1)))


def _toml_list(key: str, items: list[str]) -> str:
    return f"{key} = [\n" + "".join(f'  "{i}",\n' for i in items) + "]"


def build_manifest(text: str, wheels: list[str], platforms: list[str], pythons: list[str]) -> str:
    text = re.sub(r"^wheels\s*=\s*\[.*?\]", lambda _: _toml_list("wheels", [f"./wheels/{w}" for w in wheels]),
                  text, count=1, flags=re.M | re.S)
    text = re.sub(r"^platforms\s*=\s*\[.*?\]", lambda _: "platforms = [" + ", ".join(f'"{p}"' for p in platforms) + "]",
                  text, count=1, flags=re.M | re.S)
    # the [build] table is for Blender's own "extension build" command, not for an installed package
    text = re.sub(r"^\[build\]\s*\n(?:(?!^\[).*\n?)*", "", text, flags=re.M)
    if "3.13" not in pythons and not re.search(r"^blender_version_max", text, re.M):
        # cp311 wheels only: Blender 5.1 moved to Python 3.13 (the maximum is exclusive)
        text = re.sub(r"^(blender_version_min\s*=.*)$", r'\1\nblender_version_max = "5.1.0"', text, count=1, flags=re.M)
    return text


def check_source_manifest(text: str) -> None:
    """The wheels listed in the source manifest are exactly the full pinned set."""
    listed = sorted(Path(w).name for w in manifest_list(text, "wheels"))
    expected = sorted(targets(list(PLATFORMS), list(PYTHON_TAGS)))
    if listed != expected:
        raise SystemExit(f"{ADDON_DIR / MANIFEST} lists the wheels\n  {listed}\nbut pyzmq=={PYZMQ_VERSION} for all "
                         f"targets means\n  {expected}\nUpdate one or the other.")


def fetch_wheels(names: dict[str, tuple[str, str]], cache: Path, quiet: bool = False) -> dict[str, Path]:
    """Each wheel from the cache, downloading (once) what it lacks."""
    cache.mkdir(parents=True, exist_ok=True)
    found: dict[str, Path] = {}
    for name, (py, plat) in sorted(names.items()):
        path = cache / name
        if not path.is_file():
            cmd = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--no-deps", "--disable-pip-version-check",
                   "--platform", PLATFORMS[plat][0], "--python-version", py, "--dest", str(cache),
                   f"pyzmq=={PYZMQ_VERSION}"]
            if not quiet:
                print("fetching", name, flush=True)
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0 or not path.is_file():
                raise SystemExit(f"could not download {name}:\n$ {' '.join(cmd)}\n{res.stdout[-2000:]}{res.stderr[-2000:]}\n"
                                 "Build offline with --wheels DIR (a folder holding the wheels).")
        found[name] = path
    return found


def wheels_from_dir(names: dict[str, tuple[str, str]], folder: Path) -> dict[str, Path]:
    missing = [n for n in sorted(names) if not (folder / n).is_file()]
    if missing:
        raise SystemExit(f"{folder} lacks these wheels:\n  " + "\n  ".join(missing)
                         + "\nDownload them (python build_addon.py without --wheels does) or build for fewer targets "
                           "with --platform / --python.")
    return {n: folder / n for n in names}


def addon_files() -> list[tuple[Path, str]]:
    out = []
    for path in sorted(ADDON_DIR.rglob("*")):
        rel = path.relative_to(ADDON_DIR)
        if path.is_dir() or any(part in EXCLUDE_DIRS for part in rel.parts) or path.name.endswith(EXCLUDE_SUFFIXES):
            continue
        if rel.as_posix() == MANIFEST:
            continue
        out.append((path, rel.as_posix()))
    for name in WIRE_FILES:
        out.append((WIRE_DIR / name, f"gen3d_wire/{name}"))
    return out


def build_backend_wheel(out_dir: Path, quiet: bool = False) -> Path:
    """The backend's wheel (``gen3d-<version>-py3-none-any.whl``), built from this tree without its
    dependencies (the installer fetches those)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # with this Python's own setuptools first (offline); an older one (before 70.1 it needs the `wheel` package)
    # makes pip fetch a build environment instead
    for isolation in (["--no-build-isolation"], []):
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-w", str(out_dir), str(ROOT)]
        if quiet:
            cmd.insert(4, "-q")
        res = subprocess.run(cmd, capture_output=quiet, text=True)
        if res.returncode == 0:
            break
    wheels = sorted(out_dir.glob("gen3d-*.whl"))
    if res.returncode != 0 or not wheels:
        detail = (res.stderr or res.stdout or "")[-2000:] if quiet else ""
        raise SystemExit(f"could not build the backend wheel (pip wheel exited {res.returncode}){detail and ': ' + detail}")
    return wheels[-1]


def build(out_dir: Path, wheels: dict[str, Path], platforms: list[str], pythons: list[str],
          backend_wheel: Path | None = None) -> Path:
    text = read_manifest()
    check_source_manifest(text)
    version = manifest_field(text, "version")
    ext_id = manifest_field(text, "id")
    manifest = build_manifest(text, sorted(wheels), platforms, pythons)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{ext_id}-{version}.zip"
    fd, tmp = tempfile.mkstemp(suffix=".zip", dir=out_dir)
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(MANIFEST, manifest)
            for src, arc in addon_files():
                zf.write(src, arc)
            for name, src in sorted(wheels.items()):
                zf.write(src, f"wheels/{name}", compress_type=zipfile.ZIP_STORED)
            if backend_wheel is not None:
                zf.write(backend_wheel, f"backend_wheel/{backend_wheel.name}", compress_type=zipfile.ZIP_STORED)
        shutil.move(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "dist"), help="output folder (default dist/)")
    ap.add_argument("--wheels", default=None, help="offline: take the pyzmq wheels from this folder, download nothing")
    ap.add_argument("--cache", default=None, help="download cache for wheels (default ~/.cache/gen3d/wheels)")
    ap.add_argument("--platform", action="append", choices=sorted(PLATFORMS), dest="platforms",
                    help="build for this Blender platform only (repeatable; default all)")
    ap.add_argument("--python", action="append", choices=sorted(PYTHON_TAGS), dest="pythons",
                    help="Blender's Python version to bundle wheels for (repeatable; default 3.11 and 3.13)")
    ap.add_argument("--no-backend-wheel", action="store_true",
                    help="leave the backend's wheel out (the add-on's installer then has nothing to install)")
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args(argv)
    platforms = [p for p in PLATFORMS if p in (args.platforms or PLATFORMS)]
    pythons = [p for p in PYTHON_TAGS if p in (args.pythons or PYTHON_TAGS)]
    names = targets(platforms, pythons)
    if args.wheels:
        wheels = wheels_from_dir(names, Path(args.wheels))
    else:
        wheels = fetch_wheels(names, Path(args.cache) if args.cache else default_cache(), args.quiet)
    with tempfile.TemporaryDirectory() as tmp:
        backend = None if args.no_backend_wheel else build_backend_wheel(Path(tmp), args.quiet)
        path = build(Path(args.out), wheels, platforms, pythons, backend)
    if not args.quiet:
        print(f"built {path} ({path.stat().st_size / 1e6:.1f} MB, {len(wheels)} wheels, platforms: {', '.join(platforms)}"
              f"{', backend ' + backend.name if backend else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
