"""Binary glTF (GLB) for the refine round trip, with numpy only (no bpy, no exporter).

The add-on writes the selected mesh as one vertex per triangle corner, so the
corner order of the file is the loop order of Blender's ``loop_triangles``; the
backend returns the same triangles in the same order with per-corner texture
coordinates and a new base-colour texture, which :func:`read_glb` gives back.

Frames: positions come in Blender's Z-up world and are stored glTF Y-up,
(x, y, z) -> (x, z, -y), as float32; texture coordinates are stored with
glTF's top-left origin, t = 1 - v.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import numpy as np

GLB_MAGIC = b"glTF"
CHUNK_JSON = 0x4E4F534A
CHUNK_BIN = 0x004E4942
_COMPONENT = {5120: np.int8, 5121: np.uint8, 5122: np.int16, 5123: np.uint16, 5125: np.uint32, 5126: np.float32}
_NCOMP = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4, "MAT4": 16}


class GlbError(ValueError):
    pass


def z_up_to_y_up(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float64)
    return np.stack([v[:, 0], v[:, 2], -v[:, 1]], axis=1)


def y_up_to_z_up(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float64)
    return np.stack([v[:, 0], -v[:, 2], v[:, 1]], axis=1)


def write_glb(positions: np.ndarray, *, normals: np.ndarray | None = None, uv: np.ndarray | None = None,
              texture_png: bytes | None = None, base_color=(0.8, 0.8, 0.8, 1.0), name: str = "mesh") -> bytes:
    """Triangle soup (``positions`` [3F, 3], Z-up world, corner k of triangle t at 3t+k) -> GLB bytes.

    ``normals`` [3F, 3] (Z-up), ``uv`` [3F, 2] (Blender's v-up convention),
    ``texture_png``: the base-colour texture (PNG bytes)."""
    pos = z_up_to_y_up(positions).astype(np.float32)
    n = len(pos)
    if n == 0 or n % 3:
        raise GlbError(f"need a whole number of triangles, got {n} corners")
    if not np.all(np.isfinite(pos)):
        raise GlbError("the mesh has NaN or infinite vertex positions")
    binary = bytearray()
    views: list[dict] = []
    accessors: list[dict] = []

    def view(data: bytes, target: int | None = None) -> int:
        while len(binary) % 4:
            binary.append(0)
        v = {"buffer": 0, "byteOffset": len(binary), "byteLength": len(data)}
        if target is not None:
            v["target"] = target
        binary.extend(data)
        views.append(v)
        return len(views) - 1

    def accessor(arr: np.ndarray, kind: str, ctype: int, target: int | None, minmax: bool = False) -> int:
        arr = np.ascontiguousarray(arr)
        acc = {"bufferView": view(arr.tobytes(), target), "componentType": ctype, "count": int(arr.shape[0]), "type": kind}
        if minmax:
            acc["min"] = arr.min(0).astype(float).tolist()
            acc["max"] = arr.max(0).astype(float).tolist()
        accessors.append(acc)
        return len(accessors) - 1

    attrs = {"POSITION": accessor(pos, "VEC3", 5126, 34962, minmax=True)}
    if normals is not None:
        nrm = z_up_to_y_up(normals)
        nrm /= np.linalg.norm(nrm, axis=1, keepdims=True).clip(1e-12)
        attrs["NORMAL"] = accessor(nrm.astype(np.float32), "VEC3", 5126, 34962)
    if uv is not None:
        st = np.asarray(uv, np.float32).reshape(n, 2).copy()
        st[:, 1] = 1.0 - st[:, 1]
        attrs["TEXCOORD_0"] = accessor(st, "VEC2", 5126, 34962)
    indices = accessor(np.arange(n, dtype=np.uint32), "SCALAR", 5125, 34963)
    pbr: dict = {"baseColorFactor": [float(c) for c in base_color], "metallicFactor": 0.0, "roughnessFactor": 1.0}
    gltf: dict = {
        "asset": {"version": "2.0", "generator": "gen3d Blender add-on"},
        "scene": 0,
        "scenes": [{"nodes": [0]}],
        "nodes": [{"name": name, "mesh": 0}],
        "meshes": [{"name": name, "primitives": [{"attributes": attrs, "indices": indices, "material": 0, "mode": 4}]}],
        "materials": [{"name": f"{name}_material", "pbrMetallicRoughness": pbr}],
    }
    if texture_png:
        pbr["baseColorFactor"] = [1.0, 1.0, 1.0, 1.0]
        gltf["images"] = [{"bufferView": view(texture_png), "mimeType": "image/png"}]
        gltf["samplers"] = [{"magFilter": 9729, "minFilter": 9987, "wrapS": 10497, "wrapT": 10497}]
        gltf["textures"] = [{"sampler": 0, "source": 0}]
        pbr["baseColorTexture"] = {"index": 0}
    gltf["accessors"] = accessors
    gltf["bufferViews"] = views
    while len(binary) % 4:
        binary.append(0)
    gltf["buffers"] = [{"byteLength": len(binary)}]
    js = json.dumps(gltf, separators=(",", ":")).encode("utf-8")
    js += b" " * ((4 - len(js) % 4) % 4)
    total = 12 + 8 + len(js) + 8 + len(binary)
    return (struct.pack("<4sII", GLB_MAGIC, 2, total) + struct.pack("<II", len(js), CHUNK_JSON) + js
            + struct.pack("<II", len(binary), CHUNK_BIN) + bytes(binary))


@dataclass
class GlbMesh:
    """The triangles of a GLB (all primitives, in file order), Z-up world."""

    positions: np.ndarray  # [V, 3] float32, glTF frame as stored (node transforms not applied)
    indices: np.ndarray  # [F, 3] int64 into positions
    uv: np.ndarray | None  # [V, 2] float32, v up
    texture_png: bytes | None  # base-colour texture of the first textured primitive
    texture_mime: str | None
    node_matrix_identity: bool

    @property
    def corner_positions_z_up(self) -> np.ndarray:
        """[3F, 3] float64, corner k of triangle t at 3t+k."""
        return y_up_to_z_up(self.positions[self.indices.reshape(-1)])

    @property
    def corner_uv(self) -> np.ndarray | None:
        return None if self.uv is None else self.uv[self.indices.reshape(-1)]


def _parse(data: bytes) -> tuple[dict, bytes]:
    if len(data) < 20 or data[:4] != GLB_MAGIC:
        raise GlbError("not a GLB file")
    version, length = struct.unpack_from("<II", data, 4)
    if version != 2 or length > len(data):
        raise GlbError("unsupported or truncated GLB")
    off, gltf, binary = 12, None, b""
    while off + 8 <= length:
        clen, ctype = struct.unpack_from("<II", data, off)
        chunk = data[off + 8: off + 8 + clen]
        if ctype == CHUNK_JSON:
            gltf = json.loads(chunk.decode("utf-8"))
        elif ctype == CHUNK_BIN:
            binary = chunk
        off += 8 + clen
    if not isinstance(gltf, dict):
        raise GlbError("GLB has no JSON chunk")
    return gltf, binary


def _accessor(gltf: dict, binary: bytes, i: int) -> np.ndarray:
    acc = gltf["accessors"][i]
    dtype = np.dtype(_COMPONENT[acc["componentType"]])
    ncomp = _NCOMP[acc["type"]]
    count = int(acc["count"])
    bv = gltf["bufferViews"][acc["bufferView"]]
    base = int(bv.get("byteOffset", 0)) + int(acc.get("byteOffset", 0))
    elem = dtype.itemsize * ncomp
    stride = int(bv.get("byteStride", 0)) or elem
    if count and base + stride * (count - 1) + elem > len(binary):
        raise GlbError(f"accessor {i} reads past the end of the binary chunk")
    if stride == elem:
        arr = np.frombuffer(binary, dtype=dtype, count=count * ncomp, offset=base).reshape(count, ncomp)
    else:
        raw = np.frombuffer(binary, dtype=np.uint8, count=stride * (count - 1) + elem, offset=base)
        rows = np.lib.stride_tricks.as_strided(raw, shape=(count, elem), strides=(stride, 1))
        arr = np.ascontiguousarray(rows).view(dtype).reshape(count, ncomp)
    if acc.get("normalized") and dtype.kind in "iu":
        arr = np.maximum(arr.astype(np.float32) / np.iinfo(dtype).max, -1.0)
    return arr


def read_glb(data: bytes) -> GlbMesh:
    """All triangle primitives of the GLB's mesh nodes, concatenated in file order."""
    gltf, binary = _parse(bytes(data))
    positions, indices, uvs = [], [], []
    texture_png = texture_mime = None
    identity = True
    offset = 0
    for node in gltf.get("nodes", []):
        if "mesh" not in node:
            continue
        if any(k in node for k in ("matrix", "rotation", "scale", "translation")):
            m = node.get("matrix")
            identity = identity and (m is None or np.allclose(np.asarray(m).reshape(4, 4), np.eye(4))) \
                and np.allclose(node.get("translation", [0, 0, 0]), 0) and np.allclose(node.get("scale", [1, 1, 1]), 1) \
                and np.allclose(node.get("rotation", [0, 0, 0, 1]), [0, 0, 0, 1])
        for prim in gltf["meshes"][node["mesh"]].get("primitives", []):
            if prim.get("mode", 4) != 4:
                continue
            attrs = prim["attributes"]
            pos = _accessor(gltf, binary, attrs["POSITION"]).astype(np.float32)
            idx = (_accessor(gltf, binary, prim["indices"]).astype(np.int64).reshape(-1)
                   if "indices" in prim else np.arange(len(pos), dtype=np.int64))
            if len(idx) % 3 or (len(idx) and (idx.min() < 0 or idx.max() >= len(pos))):
                raise GlbError("triangle indices out of range")
            if "TEXCOORD_0" in attrs:
                st = _accessor(gltf, binary, attrs["TEXCOORD_0"]).astype(np.float32)
                uvs.append(np.stack([st[:, 0], 1.0 - st[:, 1]], -1))
            else:
                uvs.append(None)
            positions.append(pos)
            indices.append(idx.reshape(-1, 3) + offset)
            offset += len(pos)
            if texture_png is None and "material" in prim:
                pbr = gltf["materials"][prim["material"]].get("pbrMetallicRoughness", {})
                if "baseColorTexture" in pbr:
                    tex = gltf["textures"][pbr["baseColorTexture"]["index"]]
                    img = gltf["images"][tex["source"]]
                    if "bufferView" in img:
                        bv = gltf["bufferViews"][img["bufferView"]]
                        off = int(bv.get("byteOffset", 0))
                        texture_png = bytes(binary[off: off + int(bv["byteLength"])])
                        texture_mime = img.get("mimeType", "image/png")
    if not positions:
        raise GlbError("the GLB holds no triangles")
    uv = None
    if all(u is not None for u in uvs):
        uv = np.concatenate(uvs)
    return GlbMesh(np.concatenate(positions), np.concatenate(indices), uv, texture_png, texture_mime, identity)
