"""Binary glTF 2.0 (GLB) writing and reading, with numpy only.

Written by hand rather than through a scene library so that what goes in comes
out exactly: positions are stored as float32 in glTF's Y-up frame, mapped from
the project's Z-up world by (x, y, z) -> (x, z, -y) (Blender's importer maps
them back), texture coordinates with glTF's top-left origin (t = 1 - v), and
the texture is the material's ``baseColorTexture``; a mesh with a normal map also
gets its ``normalTexture`` and per-vertex ``TANGENT`` frames (the ones it was baked
with), and ``metallicFactor``/``roughnessFactor`` are the mesh's constants, so every
glTF viewer, Blender's importer included, shows a metallic-roughness material.

The reader covers what a mesh from Blender or another tool carries: nodes
with matrices or TRS, several meshes and primitives, interleaved or tightly
packed accessors, 8/16/32-bit indices, normalised integer texture
coordinates, embedded PNG/JPEG textures. Compressed geometry
(KHR_draco_mesh_compression, meshopt) and external buffers are refused with a
clear message.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

import numpy as np

from ..common import cameras as cam
from ..common.errors import InputError
from .textured import TexturedMesh

GLB_MAGIC = b"glTF"
CHUNK_JSON = 0x4E4F534A
CHUNK_BIN = 0x004E4942

_COMPONENT = {5120: np.int8, 5121: np.uint8, 5122: np.int16, 5123: np.uint16, 5125: np.uint32, 5126: np.float32}
_NCOMP = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4, "MAT2": 4, "MAT3": 9, "MAT4": 16}


# ---------------------------------------------------------------------------
# writing


class _Builder:
    def __init__(self):
        self.bin = bytearray()
        self.gltf: dict = {
            "asset": {"version": "2.0", "generator": "gen3d"},
            "scene": 0,
            "scenes": [{"nodes": []}],
            "nodes": [],
            "meshes": [],
            "materials": [],
            "textures": [],
            "images": [],
            "samplers": [{"magFilter": 9729, "minFilter": 9987, "wrapS": 10497, "wrapT": 10497}],
            "accessors": [],
            "bufferViews": [],
            "buffers": [],
        }

    def _view(self, data: bytes, target: int | None = None) -> int:
        while len(self.bin) % 4:
            self.bin.append(0)
        view = {"buffer": 0, "byteOffset": len(self.bin), "byteLength": len(data)}
        if target is not None:
            view["target"] = target
        self.bin += data
        self.gltf["bufferViews"].append(view)
        return len(self.gltf["bufferViews"]) - 1

    def accessor(self, arr: np.ndarray, kind: str, target: int | None, minmax: bool = False) -> int:
        arr = np.ascontiguousarray(arr)
        ctype = {np.dtype(np.float32): 5126, np.dtype(np.uint32): 5125, np.dtype(np.uint16): 5123}[arr.dtype]
        acc = {"bufferView": self._view(arr.tobytes(), target), "componentType": ctype, "count": int(arr.shape[0]), "type": kind}
        if minmax:
            acc["min"] = arr.min(0).astype(float).tolist()
            acc["max"] = arr.max(0).astype(float).tolist()
        self.gltf["accessors"].append(acc)
        return len(self.gltf["accessors"]) - 1

    def image(self, png: bytes) -> int:
        self.gltf["images"].append({"bufferView": self._view(png), "mimeType": "image/png"})
        self.gltf["textures"].append({"sampler": 0, "source": len(self.gltf["images"]) - 1})
        return len(self.gltf["textures"]) - 1

    def finish(self) -> bytes:
        g = {k: v for k, v in self.gltf.items() if v != []}
        g["buffers"] = [{"byteLength": len(self.bin)}]
        js = json.dumps(g, separators=(",", ":")).encode("utf-8")
        js += b" " * ((4 - len(js) % 4) % 4)
        binary = bytes(self.bin) + b"\0" * ((4 - len(self.bin) % 4) % 4)
        total = 12 + 8 + len(js) + 8 + len(binary)
        return (struct.pack("<4sII", GLB_MAGIC, 2, total) + struct.pack("<II", len(js), CHUNK_JSON) + js
                + struct.pack("<II", len(binary), CHUNK_BIN) + binary)


def texture_png(texture: np.ndarray) -> bytes:
    from ..common.dataset import encode_png

    return encode_png(texture)


def write_glb(meshes: TexturedMesh | list[TexturedMesh]) -> bytes:
    """One node, mesh and material per :class:`TexturedMesh` (world Z-up in, glTF Y-up out).

    A mesh read from a GLB can carry ``extras["gltf_positions"]`` (the float32
    positions as stored) and ``extras["gltf_matrix"]`` (its node's matrix):
    they are written back untouched, so its geometry survives bit for bit."""
    if isinstance(meshes, TexturedMesh):
        meshes = [meshes]
    b = _Builder()
    for m in meshes:
        raw = m.extras.get("gltf_positions")
        if raw is not None:
            v = np.asarray(raw, np.float32)
        else:
            v = cam.blender_to_gltf(np.asarray(m.vertices, np.float64)).astype(np.float32)
        f = np.asarray(m.faces)
        if len(f) == 0 or f.min() < 0 or f.max() >= len(v):
            raise ValueError(f"mesh {m.name!r}: face indices out of range")
        attrs = {"POSITION": b.accessor(v, "VEC3", 34962, minmax=True)}
        if m.extras.get("gltf_normals") is not None:
            attrs["NORMAL"] = b.accessor(np.asarray(m.extras["gltf_normals"], np.float32), "VEC3", 34962)
        elif m.normals is not None:
            n = cam.blender_to_gltf(np.asarray(m.normals, np.float64)).astype(np.float32)
            n /= np.linalg.norm(n, axis=1, keepdims=True).clip(1e-12)
            attrs["NORMAL"] = b.accessor(n, "VEC3", 34962)
        st = np.asarray(m.uv, np.float32).copy()
        st[:, 1] = 1.0 - st[:, 1]  # glTF texture coordinates start at the top-left
        attrs["TEXCOORD_0"] = b.accessor(st, "VEC2", 34962)
        idx = b.accessor(f.astype(np.uint32).reshape(-1), "SCALAR", 34963)
        tex = b.image(m.extras.get("texture_png") or texture_png(m.texture))
        mat = {
            "name": f"{m.name}_material",
            "pbrMetallicRoughness": {"baseColorTexture": {"index": tex}, "metallicFactor": float(m.metallic),
                                     "roughnessFactor": float(m.roughness)},
            "doubleSided": bool(m.extras.get("double_sided", False)),
        }
        if m.normal_map is not None:
            if "gltf_tangents" in m.extras:  # read from a GLB: its own tangents, or none (the viewer's MikkTSpace)
                t_gltf = m.extras["gltf_tangents"]
            else:
                from .bake import vertex_tangents

                if m.normals is None:
                    raise ValueError(f"mesh {m.name!r}: a normal map needs vertex normals")
                tan = vertex_tangents(m.vertices, f, m.uv, m.normals)
                # a rotation keeps handedness: the Z-up -> Y-up map is one
                t_gltf = np.concatenate([cam.blender_to_gltf(tan[:, :3].astype(np.float64)), tan[:, 3:]], 1)
            if t_gltf is not None:
                attrs["TANGENT"] = b.accessor(np.asarray(t_gltf, np.float32), "VEC4", 34962)
            mat["normalTexture"] = {"index": b.image(texture_png(m.normal_map)), "scale": 1.0}
        b.gltf["materials"].append(mat)
        b.gltf["meshes"].append({"name": m.name, "primitives": [
            {"attributes": attrs, "indices": idx, "material": len(b.gltf["materials"]) - 1, "mode": 4}]})
        node = {"name": m.name, "mesh": len(b.gltf["meshes"]) - 1}
        if m.extras.get("gltf_matrix") is not None:
            mat = np.asarray(m.extras["gltf_matrix"], np.float64)
            if not np.allclose(mat, np.eye(4)):
                node["matrix"] = mat.T.reshape(-1).tolist()  # column-major
        if m.extras.get("node_extras"):
            node["extras"] = m.extras["node_extras"]
        b.gltf["nodes"].append(node)
        b.gltf["scenes"][0]["nodes"].append(len(b.gltf["nodes"]) - 1)
    return b.finish()


# ---------------------------------------------------------------------------
# reading


@dataclass
class GltfPrimitive:
    """One triangle primitive of a GLB, in the project's Z-up world."""

    name: str
    positions: np.ndarray  # [V,3] float32 as stored (glTF frame, node transform NOT applied)
    indices: np.ndarray  # [F,3] int64
    world: np.ndarray  # [4,4] the node's world matrix (glTF frame)
    uv: np.ndarray | None  # [V,2] float32, v up (converted from glTF's t)
    normals: np.ndarray | None
    texture: np.ndarray | None  # base-colour texture [H,W,3] float32
    base_color: tuple = (1.0, 1.0, 1.0, 1.0)
    material: str | None = None
    node: int = -1
    mesh: int = -1
    primitive: int = -1
    texture_png: bytes | None = None
    extras: dict = field(default_factory=dict)
    normal_map: np.ndarray | None = None  # normalTexture [H,W,3] float32 in [0,1]
    tangents: np.ndarray | None = None  # TANGENT [V,4] as stored (glTF frame)
    metallic: float = 0.0  # the material's factors (glTF's default 1 where it has one without them;
    roughness: float = 1.0  # with no material at all, 0 and 1: a plain dielectric, as Blender shows it)

    def world_vertices(self) -> np.ndarray:
        """Vertices in the Z-up world (node transform applied), float64."""
        p = np.asarray(self.positions, np.float64)
        w = p @ self.world[:3, :3].T + self.world[:3, 3]
        return cam.gltf_to_blender(w)


def _parse_glb(data: bytes) -> tuple[dict, bytes]:
    if len(data) < 20 or data[:4] != GLB_MAGIC:
        raise InputError("not a GLB file (binary glTF starts with 'glTF')")
    version, length = struct.unpack_from("<II", data, 4)
    if version != 2:
        raise InputError(f"glTF version {version} is not supported (2 is)")
    if length > len(data):
        raise InputError(f"GLB is truncated: header says {length} bytes, got {len(data)}")
    off = 12
    gltf, binary = None, b""
    while off + 8 <= length:
        clen, ctype = struct.unpack_from("<II", data, off)
        chunk = data[off + 8: off + 8 + clen]
        if len(chunk) != clen:
            raise InputError("GLB chunk is truncated")
        if ctype == CHUNK_JSON:
            try:
                gltf = json.loads(chunk.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as exc:
                raise InputError(f"GLB JSON chunk is invalid: {exc}") from None
        elif ctype == CHUNK_BIN:
            binary = chunk
        off += 8 + clen  # chunk lengths include their padding
    if not isinstance(gltf, dict):
        raise InputError("GLB has no JSON chunk")
    for ext in gltf.get("extensionsRequired", []):
        if ext in ("KHR_draco_mesh_compression", "EXT_meshopt_compression", "KHR_mesh_quantization"):
            raise InputError(f"GLB uses {ext}; export it without mesh compression")
        raise InputError(f"GLB requires the unsupported extension {ext}")
    return gltf, binary


MAX_ELEMENTS = 1 << 24  # vertices or indices of one accessor (16.7 M): more than any mesh worth refining


def _int(value, what: str, lo: int = 0, hi: int = 1 << 40) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise InputError(f"GLB {what} must be an integer in [{lo}, {hi}], got {str(value)[:32]}")
    return value


def _accessor(gltf: dict, binary: bytes, i: int) -> np.ndarray:
    """The accessor's data, after checking it against its buffer view and the binary chunk's
    length (nothing is allocated from a count the file does not back with bytes)."""
    accessors = gltf.get("accessors")
    i = _int(i, "accessor index", 0, (len(accessors) - 1) if isinstance(accessors, list) else -1)
    acc = accessors[i]
    if not isinstance(acc, dict):
        raise InputError(f"GLB accessor {i} is not an object")
    if "sparse" in acc:
        raise InputError("GLB sparse accessors are not supported")
    ctype = acc.get("componentType")
    if ctype not in _COMPONENT or acc.get("type") not in _NCOMP:
        raise InputError(f"GLB accessor {i} has an unknown type")
    dtype = np.dtype(_COMPONENT[ctype])
    ncomp = _NCOMP[acc["type"]]
    count = _int(acc.get("count", 0), f"accessor {i} count", 0, MAX_ELEMENTS)
    if "bufferView" not in acc:
        # all zeros by the spec (a sparse accessor's base): never geometry worth allocating for
        raise InputError(f"GLB accessor {i} has no bufferView (no data)")
    views = gltf.get("bufferViews")
    vi = _int(acc["bufferView"], f"accessor {i} bufferView", 0, (len(views) - 1) if isinstance(views, list) else -1)
    bv = views[vi]
    if not isinstance(bv, dict):
        raise InputError(f"GLB bufferView {vi} is not an object")
    buffers = gltf.get("buffers") or [{}]
    bi = _int(bv.get("buffer", 0), f"bufferView {vi} buffer", 0, len(buffers) - 1)
    if bi != 0 or (isinstance(buffers[0], dict) and "uri" in buffers[0]):
        raise InputError("GLB references an external buffer; embed everything in the GLB")
    view_off = _int(bv.get("byteOffset", 0), f"bufferView {vi} byteOffset")
    view_len = _int(bv.get("byteLength", 0), f"bufferView {vi} byteLength")
    if view_off + view_len > len(binary):
        raise InputError(f"GLB bufferView {vi} reaches past the end of the binary chunk")
    elem = dtype.itemsize * ncomp
    stride = _int(bv.get("byteStride", 0), f"bufferView {vi} byteStride", 0, 252) or elem
    if stride < elem:
        raise InputError(f"GLB bufferView {vi} byteStride {stride} is shorter than an element ({elem} bytes)")
    start = _int(acc.get("byteOffset", 0), f"accessor {i} byteOffset")
    need = start + stride * (count - 1) + elem if count else start
    if need > view_len:
        raise InputError(f"GLB accessor {i} claims {count} elements, more than its bufferView holds")
    base = view_off + start
    if stride == elem:
        arr = np.frombuffer(binary, dtype=dtype, count=count * ncomp, offset=base).reshape(count, ncomp)
    else:
        raw = np.frombuffer(binary, dtype=np.uint8, count=stride * (count - 1) + elem, offset=base)
        rows = np.lib.stride_tricks.as_strided(raw, shape=(count, elem), strides=(stride, 1))
        arr = np.ascontiguousarray(rows).view(dtype).reshape(count, ncomp)
    if acc.get("normalized") and dtype.kind in "iu":
        info = np.iinfo(dtype)
        arr = np.maximum(arr.astype(np.float32) / info.max, -1.0)
    return arr


def _node_matrix(node: dict) -> np.ndarray:
    if "matrix" in node:
        m = np.asarray(node["matrix"], np.float64)
        if m.shape != (16,) or not np.all(np.isfinite(m)):
            raise InputError("GLB node matrix is not 16 finite numbers")
        return m.reshape(4, 4).T  # column-major
    t = np.asarray(node.get("translation", [0, 0, 0]), np.float64)
    q = np.asarray(node.get("rotation", [0, 0, 0, 1]), np.float64)
    s = np.asarray(node.get("scale", [1, 1, 1]), np.float64)
    if not (np.all(np.isfinite(t)) and np.all(np.isfinite(q)) and np.all(np.isfinite(s))):
        raise InputError("GLB node transform has non-finite values")
    x, y, z, w = q / max(np.linalg.norm(q), 1e-12)
    R = np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                  [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                  [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])
    m = np.eye(4)
    m[:3, :3] = R * s[None, :]
    m[:3, 3] = t
    return m


def _image(gltf: dict, binary: bytes, tex_index: int) -> tuple[np.ndarray | None, bytes | None]:
    from ..common.dataset import decode_image

    try:
        src = gltf["textures"][tex_index]["source"]
        img = gltf["images"][src]
    except (IndexError, KeyError, TypeError):
        return None, None
    if "bufferView" not in img:
        raise InputError("GLB texture image is not embedded (external image file); embed textures in the GLB")
    bv = gltf["bufferViews"][img["bufferView"]]
    off = int(bv.get("byteOffset", 0))
    data = binary[off: off + int(bv["byteLength"])]
    arr = decode_image(data, name="GLB texture")
    return arr[..., :3], data


def _factor(value) -> float:
    """A material factor in [0, 1] (glTF's range); anything else is malformed."""
    f = float(value)
    if not 0.0 <= f <= 1.0:  # NaN fails too
        raise InputError(f"GLB material factor {str(value)[:32]} is outside [0, 1]")
    return f


def read_glb(data: bytes, textures: bool = True) -> list[GltfPrimitive]:
    """All triangle primitives of the default scene, with their world matrices. Anything
    malformed (wrong types, bad indices, counts the bytes do not back) is an :class:`InputError`."""
    try:
        return _read_glb(data, textures)
    except InputError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, OverflowError, AttributeError, struct.error) as exc:
        raise InputError(f"GLB structure is invalid ({type(exc).__name__}: {str(exc)[:120]})") from None


def check_glb(data: bytes) -> None:
    """Reject a GLB the mesh reader cannot use (raises InputError, a ValueError): what a server
    runs on a submitted mesh before accepting the job. Reads every primitive's accessors (as
    views of the bytes, mostly), not its textures."""
    read_glb(data, textures=False)


def _read_glb(data: bytes, textures: bool = True) -> list[GltfPrimitive]:
    gltf, binary = _parse_glb(data)
    nodes = gltf.get("nodes", [])
    scenes = gltf.get("scenes", [])
    roots = scenes[gltf.get("scene", 0)]["nodes"] if scenes else [i for i in range(len(nodes))]
    out: list[GltfPrimitive] = []
    total = 0
    stack = [(r, np.eye(4)) for r in roots]
    seen = set()
    while stack:
        ni, parent = stack.pop()
        if ni in seen or not (0 <= ni < len(nodes)):
            raise InputError("GLB node hierarchy is invalid (cycle or bad index)")
        seen.add(ni)
        node = nodes[ni]
        world = parent @ _node_matrix(node)
        for c in node.get("children", []):
            stack.append((c, world))
        if "mesh" not in node:
            continue
        mesh = gltf["meshes"][node["mesh"]]
        for pi, prim in enumerate(mesh.get("primitives", [])):
            mode = prim.get("mode", 4)
            if mode != 4:
                continue  # points/lines/strips: nothing to texture
            attrs = prim.get("attributes", {})
            if "POSITION" not in attrs:
                raise InputError("GLB primitive has no POSITION")
            pos = _accessor(gltf, binary, attrs["POSITION"]).astype(np.float32)
            if not np.all(np.isfinite(pos)):
                raise InputError("GLB vertex positions contain NaN or infinity")
            if "indices" in prim:
                idx = _accessor(gltf, binary, prim["indices"]).astype(np.int64).reshape(-1)
            else:
                idx = np.arange(len(pos), dtype=np.int64)
            total += len(pos) + len(idx)
            if total > 2 * MAX_ELEMENTS:  # primitives may share accessors: bound what is read in all
                raise InputError(f"GLB holds more than {2 * MAX_ELEMENTS} vertices and indices in all")
            if len(idx) % 3 or (len(idx) and (idx.min() < 0 or idx.max() >= len(pos))):
                raise InputError("GLB triangle indices are out of range or not a multiple of 3")
            uv = None
            if "TEXCOORD_0" in attrs:
                st = _accessor(gltf, binary, attrs["TEXCOORD_0"]).astype(np.float32)
                uv = np.stack([st[:, 0], 1.0 - st[:, 1]], -1)
            normals = _accessor(gltf, binary, attrs["NORMAL"]).astype(np.float32) if "NORMAL" in attrs else None
            tangents = _accessor(gltf, binary, attrs["TANGENT"]).astype(np.float32) if "TANGENT" in attrs else None
            if tangents is not None and tangents.shape != (len(pos), 4):
                raise InputError("GLB TANGENT must be one VEC4 per vertex")
            texture = png = normal_map = None
            base = (1.0, 1.0, 1.0, 1.0)
            mat_name = None
            metallic, roughness = 0.0, 1.0
            if "material" in prim:
                mat = gltf["materials"][prim["material"]]
                mat_name = mat.get("name")
                pbr = mat.get("pbrMetallicRoughness", {})
                base = tuple(pbr.get("baseColorFactor", base))
                if "baseColorTexture" in pbr and textures:
                    texture, png = _image(gltf, binary, pbr["baseColorTexture"]["index"])
                metallic = _factor(pbr.get("metallicFactor", 1.0))
                roughness = _factor(pbr.get("roughnessFactor", 1.0))
                if "normalTexture" in mat and textures:
                    normal_map, _ = _image(gltf, binary, mat["normalTexture"]["index"])
            out.append(GltfPrimitive(
                name=node.get("name") or mesh.get("name") or f"mesh_{node['mesh']}",
                positions=pos, indices=idx.reshape(-1, 3), world=world, uv=uv, normals=normals, texture=texture,
                base_color=base, material=mat_name, node=ni, mesh=node["mesh"], primitive=pi, texture_png=png,
                extras=node.get("extras", {}) if isinstance(node.get("extras"), dict) else {},
                normal_map=normal_map, tangents=tangents, metallic=metallic, roughness=roughness))
    if not out:
        raise InputError("GLB holds no triangle mesh")
    return out
