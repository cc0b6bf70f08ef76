"""Posed RGBA views: loading NeRF-synthetic ``transforms.json`` and checking them.

``transforms.json``: ``camera_angle_x`` (horizontal field of view, radians) or
per-frame ``fl_x fl_y cx cy w h`` (also accepted at the top level);
``frames[].file_path`` relative to the json, with or without ``.png``;
``frames[].transform_matrix`` camera-to-world in the Blender convention (see
:mod:`backend.common.cameras`).
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from . import cameras as cam
from .errors import InputError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")


@dataclass
class PosedViews:
    """N posed views: RGBA images in [0, 1] (straight alpha), c2w matrices, intrinsics,
    and a confidence weight per view (1 for measured views; generated views less, those
    facing away from the reference least)."""

    images: np.ndarray  # [N, H, W, 4] float32
    c2w: np.ndarray  # [N, 4, 4] float64, Blender convention
    intrinsics: list[cam.Intrinsics]
    names: list[str] = field(default_factory=list)
    weights: np.ndarray | None = None  # [N] in (0, 1]; None: all 1

    def __post_init__(self) -> None:
        n = len(self.images)
        if self.c2w.shape != (n, 4, 4) or len(self.intrinsics) != n:
            raise ValueError("images, cameras and intrinsics disagree in number")
        if not self.names:
            self.names = [f"view_{i:03d}" for i in range(n)]
        w = np.ones(n) if self.weights is None else np.asarray(self.weights, np.float64).reshape(-1)
        if len(w) != n or not np.all(np.isfinite(w)) or np.any(w < 0):
            raise ValueError("view weights must be one finite, non-negative number per view")
        self.weights = w

    def __len__(self) -> int:
        return len(self.images)

    @property
    def height(self) -> int:
        return int(self.images.shape[1])

    @property
    def width(self) -> int:
        return int(self.images.shape[2])

    def Ks(self) -> np.ndarray:
        return np.stack([k.K() for k in self.intrinsics])

    def subset(self, idx: Sequence[int]) -> "PosedViews":
        idx = list(idx)
        return PosedViews(self.images[idx], self.c2w[idx], [self.intrinsics[i] for i in idx], [self.names[i] for i in idx],
                          self.weights[idx])

    def resized(self, resolution: int) -> "PosedViews":
        """Scale so that the longer side is ``resolution`` pixels (area filter, premultiplied)."""
        H, W = self.height, self.width
        s = resolution / max(H, W)
        if abs(s - 1.0) < 1e-9:
            return self
        nh, nw = max(1, round(H * s)), max(1, round(W * s))
        out = np.stack([resize_rgba(im, nw, nh) for im in self.images])
        return PosedViews(out, self.c2w.copy(), [k.scaled(nw, nh) for k in self.intrinsics], list(self.names),
                          self.weights.copy())


def resize_rgba(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize straight-alpha RGBA in premultiplied space (no dark fringes)."""
    from PIL import Image

    pre = img.copy()
    pre[..., :3] *= pre[..., 3:4]
    chans = [np.asarray(Image.fromarray(pre[..., c].astype(np.float32), mode="F").resize((width, height), Image.BOX if width < img.shape[1] else Image.BILINEAR)) for c in range(4)]
    out = np.stack(chans, -1).astype(np.float32)
    a = out[..., 3:4]
    out[..., :3] = np.where(a > 1e-6, out[..., :3] / np.maximum(a, 1e-6), 0.0)
    return np.clip(out, 0.0, 1.0)


def decode_image(data: bytes, max_pixels: int = 4096 * 4096, name: str = "image") -> np.ndarray:
    """PNG/JPEG/WebP bytes -> float32 [H, W, C] in [0, 1], C = 3 or 4 (8- or 16-bit input).
    Raises InputError for anything unreadable or too large."""
    from PIL import Image, UnidentifiedImageError

    try:
        im = Image.open(io.BytesIO(data))
        w, h = im.size
        if w * h > max_pixels:
            raise InputError(f"{name} is {w}x{h} = {w * h} pixels; the limit is {max_pixels}")
        if w < 8 or h < 8:
            raise InputError(f"{name} is {w}x{h}; at least 8x8 pixels are needed")
        im.load()
    except InputError:
        raise
    except UnidentifiedImageError:
        raise InputError(f"{name} is not a PNG, JPEG or WebP image") from None
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as exc:
        raise InputError(f"{name} is not a readable image ({type(exc).__name__}: {str(exc).split(' <')[0][:120]})") from None
    return pil_to_float(im)


def pil_to_float(im) -> np.ndarray:
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float32) / 65535.0
        return np.repeat(arr[..., None], 3, -1).clip(0, 1)
    if mode == "RGBA":
        return np.asarray(im, dtype=np.float32) / 255.0
    if mode in ("LA", "PA") or (mode == "P" and "transparency" in im.info):
        return np.asarray(im.convert("RGBA"), dtype=np.float32) / 255.0
    if mode == "RGB":
        return np.asarray(im, dtype=np.float32) / 255.0
    return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0


def encode_png(img: np.ndarray) -> bytes:
    """float [H, W, 3|4] in [0, 1] (or uint8) -> PNG bytes."""
    from PIL import Image

    a = np.asarray(img)
    if a.dtype != np.uint8:
        a = (np.clip(np.nan_to_num(a), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def alpha_from_background(rgb: np.ndarray, background: Sequence[float], tolerance: float = 0.04) -> np.ndarray:
    """Alpha for an image without one: pixels far from the background colour are object.
    A soft ramp over ``tolerance`` keeps anti-aliased edges."""
    d = np.abs(rgb - np.asarray(background, np.float32)[None, None, :]).max(-1)
    return np.clip((d - tolerance * 0.5) / tolerance, 0.0, 1.0).astype(np.float32)


def _intrinsics_for(frame: dict, meta: dict, w: int, h: int, where: str) -> cam.Intrinsics:
    def get(key):
        return frame.get(key, meta.get(key))

    fl_x, fl_y = get("fl_x"), get("fl_y")
    if fl_x is not None or fl_y is not None:
        fl_x = fl_x if fl_x is not None else fl_y
        fl_y = fl_y if fl_y is not None else fl_x
        fw, fh = get("w"), get("h")
        cx, cy = get("cx"), get("cy")
        vals = [fl_x, fl_y] + [v for v in (fw, fh, cx, cy) if v is not None]
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in vals) or fl_x <= 0 or fl_y <= 0:
            raise InputError(f"{where}: intrinsics must be finite positive numbers")
        fw = fw or w
        fh = fh or h
        cx = cx if cx is not None else fw / 2.0
        cy = cy if cy is not None else fh / 2.0
        intr = cam.Intrinsics(float(fl_x), float(fl_y), float(cx), float(cy), int(fw), int(fh))
        return intr.scaled(w, h) if (fw, fh) != (w, h) else intr
    angle = get("camera_angle_x")
    if angle is None:
        raise InputError(f"{where}: no camera_angle_x and no fl_x/fl_y: the field of view is unknown")
    if not isinstance(angle, (int, float)) or not (0 < angle < math.pi):
        raise InputError(f"{where}: camera_angle_x must be a number in (0, pi) radians, got {angle!r}")
    return cam.Intrinsics.from_fov(float(angle), w, h)


def views_from_meta(
    meta: dict,
    read: Callable[[str], bytes],
    *,
    background: Sequence[float] | None = None,
    max_pixels: int = 4096 * 4096,
    where: str = "transforms.json",
) -> PosedViews:
    """Build views from a parsed transforms dict; ``read(file_path)`` returns image bytes."""
    if not isinstance(meta, dict):
        raise InputError(f"{where} must hold a JSON object")
    frames = meta.get("frames")
    if not isinstance(frames, list):
        raise InputError(f"{where} has no 'frames' list")
    if len(frames) < 2:
        raise InputError(f"{where} has {len(frames)} frame(s); reconstruction needs at least 2 posed views")
    images, c2ws, intrs, names = [], [], [], []
    size = None
    for i, fr in enumerate(frames):
        fw = f"{where} frame {i}"
        if not isinstance(fr, dict) or "file_path" not in fr or "transform_matrix" not in fr:
            raise InputError(f"{fw}: needs 'file_path' and 'transform_matrix'")
        try:
            m = np.asarray(fr["transform_matrix"], dtype=np.float64)
        except (TypeError, ValueError):
            raise InputError(f"{fw}: transform_matrix is not a 4x4 matrix of numbers") from None
        if m.shape != (4, 4):
            raise InputError(f"{fw}: transform_matrix must be 4x4, got shape {m.shape}")
        try:
            cam.check_c2w(m, "camera")
        except ValueError as exc:
            raise InputError(f"{fw}: {exc}") from None
        data = read(str(fr["file_path"]))
        img = decode_image(data, max_pixels, name=f"{fw} image {fr['file_path']!r}")
        if img.shape[-1] == 3:
            if background is None:
                raise InputError(
                    f"{fw}: image {fr['file_path']!r} has no alpha channel; give a background colour "
                    "(--background R G B) or send RGBA views"
                )
            img = np.concatenate([img, alpha_from_background(img, background)[..., None]], -1)
        if size is None:
            size = img.shape[:2]
        elif img.shape[:2] != size:
            raise InputError(f"{fw}: image is {img.shape[1]}x{img.shape[0]}, the first view is {size[1]}x{size[0]}; all views must have one size")
        h, w = img.shape[:2]
        intrs.append(_intrinsics_for(fr, meta, w, h, fw))
        images.append(img.astype(np.float32))
        c2ws.append(cam.orthonormalize_c2w(m))
        names.append(str(fr["file_path"]))
    imgs = np.stack(images)
    if float(imgs[..., 3].max()) <= 0.0:
        raise InputError(f"{where}: every view is fully transparent; there is no object to reconstruct")
    return PosedViews(imgs, np.stack(c2ws), intrs, names)


def resolve_image_path(base: Path, file_path: str) -> Path:
    p = (base / file_path).resolve() if not os.path.isabs(file_path) else Path(file_path)
    if p.suffix.lower() in IMAGE_EXTS and p.is_file():
        return p
    for ext in IMAGE_EXTS:
        q = p.with_name(p.name + ext)
        if q.is_file():
            return q
    if p.is_file():
        return p
    raise InputError(f"view image {file_path!r} not found (looked for {p} with and without .png/.jpg)")


def load_transforms(path: str | os.PathLike, *, background: Sequence[float] | None = None,
                    max_pixels: int = 4096 * 4096) -> PosedViews:
    """Load a NeRF-synthetic ``transforms.json`` and its images."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} not found")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{path} is not valid JSON: {exc}") from None
    base = path.parent
    return views_from_meta(meta, lambda fp: resolve_image_path(base, fp).read_bytes(), background=background,
                           max_pixels=max_pixels, where=path.name)


def save_transforms(views: PosedViews, out_dir: str | os.PathLike, name: str = "transforms.json", subdir: str = "images") -> Path:
    """Write views as RGBA PNGs plus a transforms.json with per-frame intrinsics."""
    out = Path(out_dir)
    (out / subdir).mkdir(parents=True, exist_ok=True)
    frames = []
    for i in range(len(views)):
        rel = f"{subdir}/view_{i:03d}"
        (out / (rel + ".png")).write_bytes(encode_png(views.images[i]))
        k = views.intrinsics[i]
        frames.append({"file_path": rel, "transform_matrix": views.c2w[i].tolist(), "fl_x": k.fx, "fl_y": k.fy,
                       "cx": k.cx, "cy": k.cy, "w": k.width, "h": k.height})
    meta = {"camera_angle_x": views.intrinsics[0].fov_x, "frames": frames}
    p = out / name
    p.write_text(json.dumps(meta, indent=1))
    return p
