"""Other files than GLB from a job's GLB: Wavefront OBJ with its MTL and PNG textures, in
triangles or quads.

The wire and the add-on stay GLB (one file, PBR in a standard); a pipeline that wants OBJ
converts on its own side, so a remote backend needs to know nothing of it.

Conventions kept from the GLB: OBJ is written in glTF's Y-up frame (glTF's positions with
their node transforms applied), which is what Blender's OBJ importer expects by default
(forward -Z, up Y): both importers put the object in the same place, at the same scale.
Texture coordinates go out with the origin at the bottom-left (OBJ's), normals with the
node's inverse-transpose. The MTL carries the base colour texture (``map_Kd``), the
metallic-roughness constants in the PBR extension of the format (``Pm``, ``Pr``) and the
tangent-space normal map (``map_Bump``, which Blender's importer wires to a Normal Map node;
Blender 5.0's OBJ importer leaves that image's colour space on sRGB, where a normal map needs
Non-Color: set it by hand, or import the GLB, which the add-on does).

Quads: glTF stores triangles only, so a quad-dominant OBJ joins the GLB's triangles in the
pairs a job returned (``quads.json``, :mod:`backend.mesh.quads`), or pairs them here.
"""

from __future__ import annotations

import io
import re

import numpy as np

from .gltf import GltfPrimitive, read_glb, texture_png
from .quads import polygons, quad_pairs


def _safe(name: str, fallback: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_.-]+", "_", name or "").strip("._")
    return s or fallback


def glb_to_obj(data: bytes, stem: str = "model", quads: bool = False, pairs: list | None = None) -> dict[str, bytes]:
    """``{stem}.obj``, ``{stem}.mtl`` and the textures (``{stem}_<material>_basecolor.png``,
    ``..._normal.png``) of every triangle primitive of ``data``. ``pairs``: per primitive, the
    triangle pairs [Q,2] to join into quads (a job's ``quads.json``); ``quads`` without them:
    pair the triangles here (:func:`backend.mesh.quads.quad_pairs`). Raises
    :class:`backend.common.errors.InputError` on a GLB the reader refuses."""
    stem = _safe(stem, "model")
    prims = read_glb(data)
    obj = io.StringIO()
    mtl = io.StringIO()
    files: dict[str, bytes] = {}
    obj.write(f"# written by gen3d from a GLB; Y up, -Z forward (glTF's frame)\nmtllib {stem}.mtl\n")
    mtl.write("# written by gen3d; Pr/Pm: the PBR extension of MTL\n")
    base = 1
    used: set[str] = set()
    for k, p in enumerate(prims):
        name = _safe(p.name, f"mesh{k}")
        mat = _safe(p.material or f"{name}_material", f"material{k}")
        while mat in used:
            mat += "_"
        used.add(mat)
        _write_material(mtl, files, stem, mat, p)
        v = np.asarray(p.positions, np.float64) @ p.world[:3, :3].T + p.world[:3, 3]
        obj.write(f"o {name}\n")
        obj.write("".join(f"v {x:.7g} {y:.7g} {z:.7g}\n" for x, y, z in v))
        if p.uv is not None:
            obj.write("".join(f"vt {s:.7g} {t:.7g}\n" for s, t in p.uv))
        if p.normals is not None:
            n = np.asarray(p.normals, np.float64) @ np.linalg.inv(p.world[:3, :3])  # (M^-T n) as rows
            n /= np.linalg.norm(n, axis=1, keepdims=True).clip(1e-12)
            obj.write("".join(f"vn {x:.6f} {y:.6f} {z:.6f}\n" for x, y, z in n))
        obj.write(f"usemtl {mat}\ns 1\n")
        tris = np.asarray(p.indices, np.int64).reshape(-1, 3)
        if pairs is not None and k < len(pairs):
            polys = polygons(tris, pairs[k])
        elif quads:
            polys = polygons(tris, quad_pairs(p.positions, tris))
        else:
            polys = list(tris)
        flip = np.linalg.det(p.world[:3, :3]) < 0  # a mirroring node flips the winding
        corner = ("{0}/{0}/{0}" if p.normals is not None else "{0}/{0}") if p.uv is not None else \
            ("{0}//{0}" if p.normals is not None else "{0}")
        for poly in polys:
            idx = (poly[::-1] if flip else poly) + base
            obj.write("f " + " ".join(corner.format(int(i)) for i in idx) + "\n")
        base += len(v)
    files[f"{stem}.obj"] = obj.getvalue().encode("utf-8")
    files[f"{stem}.mtl"] = mtl.getvalue().encode("utf-8")
    return files


def _write_material(mtl: io.StringIO, files: dict, stem: str, mat: str, p: GltfPrimitive) -> None:
    r, g, b, a = (float(x) for x in p.base_color)
    mtl.write(f"\nnewmtl {mat}\nKd {r:.6g} {g:.6g} {b:.6g}\nKa 0 0 0\nKs 0.5 0.5 0.5\nNs 250\nd {a:.6g}\nillum 2\n")
    mtl.write(f"Pr {p.roughness:.6g}\nPm {p.metallic:.6g}\n")
    if p.texture_png is not None or p.texture is not None:
        fn = f"{stem}_{mat}_basecolor.png"
        files[fn] = p.texture_png if p.texture_png is not None else texture_png(p.texture)
        mtl.write(f"map_Kd {fn}\n")
    if p.normal_map is not None:
        fn = f"{stem}_{mat}_normal.png"
        files[fn] = texture_png(p.normal_map)
        mtl.write(f"map_Bump -bm 1 {fn}\n")
