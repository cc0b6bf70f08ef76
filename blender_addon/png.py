"""Minimal PNG encoding with numpy and zlib (Blender's Python has no Pillow)."""

from __future__ import annotations

import struct
import zlib

import numpy as np


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def encode_png(pixels: np.ndarray, level: int = 6) -> bytes:
    """uint8 [H, W, C] (C = 1, 2, 3 or 4, row 0 = top of the image) -> PNG bytes."""
    a = np.asarray(pixels)
    if a.ndim == 2:
        a = a[..., None]
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"expected uint8 [H, W, 1..4], got {a.dtype} {a.shape}")
    h, w, c = a.shape
    if h == 0 or w == 0:
        raise ValueError("image has no pixels")
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    rows = np.zeros((h, 1 + w * c), np.uint8)  # filter byte 0 (None) per row
    rows[:, 1:] = a.reshape(h, w * c)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(rows.tobytes(), level))
            + _chunk(b"IEND", b""))


def linear_to_srgb(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return np.where(x <= 0.0031308, x * 12.92, 1.055 * np.power(x, 1.0 / 2.4) - 0.055)


def float_to_uint8(x: np.ndarray) -> np.ndarray:
    return (np.clip(np.nan_to_num(x), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
