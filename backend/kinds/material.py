"""The request parameters of the material, shared by the job kinds that make geometry."""

from __future__ import annotations

from ..mesh.bake import BakeSettings
from ..pipeline.material import material_factors
from ..service.jobs import Param

MATERIAL = (
    Param("material", str, "pbr", "pbr: base colour, normal map, metallic and roughness | albedo: the base colour "
          "alone (metallic 0, roughness 1)", choices=("pbr", "albedo")),
    Param("metallic", float, -1.0, "metallic factor (-1: from the prompt's material words, else 0)", min=-1.0, max=1.0),
    Param("roughness", float, -1.0, "roughness factor (-1: from the prompt's material words, else 0.8)", min=-1.0,
          max=1.0),
)


TOPOLOGY = (
    Param("topology", str, "tri", "tri | quad: a quad-dominant mesh of about 'faces' polygons (quads and the "
          "triangles left; glTF stores triangles, the pairs to join come as quads.json)", choices=("tri", "quad")),
)


def apply_topology(s, p: dict) -> None:
    """The request's ``faces`` and ``topology`` on reconstruction settings: triangles at the budget,
    or for quads twice as many, decimated further until their pairs make ``faces`` polygons."""
    quad = p.get("topology") == "quad"
    s.mesh.clean.target_faces = int(p["faces"]) * (2 if quad else 1)
    s.quad_budget = int(p["faces"]) if quad else 0


def quads_attachment(mesh, p: dict):
    """``quads.json`` ({"triangles": F, "pairs": [[i, j], ...]}) for a quad request, else None."""
    if p.get("topology") != "quad":
        return None, {}
    import json

    from gen3d_wire.protocol import Attachment

    from ..mesh.quads import quad_pairs

    pairs = mesh.quad_pairs if mesh.quad_pairs is not None else quad_pairs(mesh.vertices, mesh.faces)
    n = int(len(mesh.faces))
    data = json.dumps({"triangles": n, "pairs": pairs.tolist()}).encode()
    return Attachment("quads.json", "application/json", data), {"topology": "quad", "quads": int(len(pairs)),
                                                                 "polygons": n - int(len(pairs))}


def apply_material(bake: BakeSettings, p: dict) -> dict:
    """The request's ``material``, ``metallic`` and ``roughness`` (and the prompt's material
    words) on the bake settings; returns what was chosen, for the job's metadata."""
    if p.get("material", "pbr") == "albedo":  # the base colour alone, as a plain dielectric
        bake.normal_map, bake.metallic, bake.roughness = False, 0.0, 1.0
        return {"kind": "albedo", "metallic": 0.0, "roughness": 1.0, "normal_map": False}
    f = material_factors(p.get("prompt", ""), p.get("metallic"), p.get("roughness"))
    bake.normal_map, bake.metallic, bake.roughness = True, f.metallic, f.roughness
    return {"kind": "pbr", "metallic": f.metallic, "roughness": f.roughness, "from": f.source, "normal_map": True}
