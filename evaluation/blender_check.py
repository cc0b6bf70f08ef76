"""Import a GLB with Blender's glTF importer and report what Blender sees; optionally render it.

Usage::

    python -m evaluation.blender_check MODEL.glb --json OUT.json \\
        [--render transforms.json --render-out DIR --resolution 128 --samples 16]

OUT.json::

    {"file": ..., "blender_version": ..., "objects": [
        {"name", "type": "MESH", "bbox_min": [x,y,z], "bbox_max": [x,y,z]  (world, Z up),
         "n_vertices", "n_faces", "n_triangles", "vertex_mean": [x,y,z] (world),
         "has_uv": bool, "uv_layers": [...],
         "materials": [{"name", "has_principled", "base_color_linked_image" (Base Color
                        fed by an Image Texture, directly or through other nodes),
                        "base_color_direct_image", "image": {"name", "size": [w, h]} | null,
                        "base_color": [r,g,b,a] (the socket value when unlinked)}]}, ...],
     "bbox_min", "bbox_max" (over all meshes), "n_mesh_objects", "renders": [...] (with --render)}

With ``--render`` every material is turned into an emission of its base colour
(the same texture node chain and UV map, or the constant colour) and the cameras
of the transforms file are rendered exactly like :mod:`evaluation.groundtruth`
(Cycles CPU, transparent film, 'Standard' view, 8-bit RGBA PNG) into
``DIR/<file_path>.png``, so a GLB can be compared with ground-truth renders as
Blender sees it.  Imports ``bpy`` only inside functions; :func:`check_glb` runs
this module in a subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from evaluation.groundtruth import DEFAULT_SAMPLES, ROOT, subprocess_env


def _material_report(mat) -> dict:
    from evaluation.groundtruth import base_color_image, find_principled

    rep = {"name": mat.name if mat else None, "has_principled": False, "base_color_linked_image": False,
           "base_color_direct_image": False, "image": None, "base_color": None}
    if mat is None:
        return rep
    bsdf = find_principled(mat)
    if bsdf is None:
        rep["base_color"] = list(mat.diffuse_color)
        return rep
    rep["has_principled"] = True
    base = bsdf.inputs["Base Color"]
    rep["base_color"] = list(base.default_value)
    rep["base_color_linked"] = bool(base.is_linked)
    rep["base_color_source"] = base.links[0].from_node.bl_idname if base.is_linked else None
    node, direct = base_color_image(mat)
    if node is not None and node.image is not None:
        img = node.image
        rep["base_color_linked_image"] = True
        rep["base_color_direct_image"] = bool(direct)
        rep["image"] = {
            "name": img.name,
            "size": [int(img.size[0]), int(img.size[1])],
            "colorspace": img.colorspace_settings.name,
            "uv_map": _uv_map_of(node),
        }
    return rep


def _uv_map_of(tex_node) -> str | None:
    vec = tex_node.inputs.get("Vector")
    if vec is None or not vec.is_linked:
        return None
    src = vec.links[0].from_node
    if src.bl_idname == "ShaderNodeUVMap":
        return src.uv_map or None
    return src.bl_idname


def inspect_objects(objects) -> dict:
    import bpy

    dg = bpy.context.evaluated_depsgraph_get()
    reports = []
    all_min, all_max = [], []
    for ob in objects:
        if ob.type != "MESH":
            reports.append({"name": ob.name, "type": ob.type})
            continue
        ev = ob.evaluated_get(dg)
        me = ev.to_mesh()
        try:
            n = len(me.vertices)
            co = np.empty(n * 3, dtype=np.float32)
            me.vertices.foreach_get("co", co)
            co = co.reshape(-1, 3).astype(np.float64)
            M = np.array(ev.matrix_world, dtype=np.float64)
            world = co @ M[:3, :3].T + M[:3, 3]
            me.calc_loop_triangles()
            rep = {
                "name": ob.name,
                "type": "MESH",
                "n_vertices": n,
                "n_faces": len(me.polygons),
                "n_triangles": len(me.loop_triangles),
                "bbox_min": world.min(axis=0).tolist() if n else None,
                "bbox_max": world.max(axis=0).tolist() if n else None,
                "vertex_mean": world.mean(axis=0).tolist() if n else None,
                "has_uv": len(me.uv_layers) > 0,
                "uv_layers": [l.name for l in me.uv_layers],
                "matrix_world": M.tolist(),
                "materials": [_material_report(slot.material) for slot in ob.material_slots],
            }
            if n:
                all_min.append(world.min(axis=0))
                all_max.append(world.max(axis=0))
        finally:
            ev.to_mesh_clear()
        reports.append(rep)
    out = {"objects": reports, "n_mesh_objects": sum(1 for r in reports if r.get("type") == "MESH")}
    out["bbox_min"] = np.min(all_min, axis=0).tolist() if all_min else None
    out["bbox_max"] = np.max(all_max, axis=0).tolist() if all_max else None
    mats = [m for r in reports for m in r.get("materials", [])]
    out["all_base_colors_textured"] = bool(mats) and all(m["base_color_linked_image"] for m in mats)
    return out


def import_glb(path: str | os.PathLike) -> list:
    """Import into the current scene; returns the newly created objects."""
    import bpy

    before = set(bpy.data.objects)
    res = bpy.ops.import_scene.gltf(filepath=str(Path(path).resolve()))
    if "FINISHED" not in res:
        raise RuntimeError(f"glTF import failed: {res}")
    bpy.context.view_layer.update()
    return [ob for ob in bpy.data.objects if ob not in before]


def run_check(
    glb_path: str | os.PathLike,
    json_path: str | os.PathLike,
    render_json: str | os.PathLike | None = None,
    render_out: str | os.PathLike | None = None,
    resolution: int = 128,
    samples: int = DEFAULT_SAMPLES,
) -> dict:
    """In-process (needs bpy): import, report, optionally render; writes and returns the report."""
    import bpy

    from evaluation.groundtruth import (
        _frame_png,
        configure_render,
        load_transforms,
        make_camera,
        render_frames,
        reset_scene,
        to_emission,
    )

    t0 = time.perf_counter()
    scene = reset_scene()
    configure_render(scene, samples, resolution, resolution)
    new = import_glb(glb_path)
    report = {"file": str(glb_path), "blender_version": bpy.app.version_string}
    report.update(inspect_objects(new))
    report["import_seconds"] = time.perf_counter() - t0
    if render_json:
        if render_out is None:
            raise ValueError("--render needs --render-out")
        # Imported lights/cameras must not change the look; keep only meshes visible.
        for ob in new:
            if ob.type in ("LIGHT", "CAMERA"):
                ob.hide_render = True
        done = set()
        emission = []
        for ob in new:
            if ob.type != "MESH":
                continue
            for slot in ob.material_slots:
                mat = slot.material
                if mat is None or mat.name in done:
                    continue
                done.add(mat.name)
                emission.append({"material": mat.name, **to_emission(mat)})
            if not ob.material_slots:
                # No material: render flat white like a default material would look unlit.
                mat = bpy.data.materials.new("default")
                if mat.node_tree is None:
                    mat.use_nodes = True
                ob.data.materials.append(mat)
                emission.append({"material": mat.name, **to_emission(mat)})
        configure_render(scene, samples, resolution, resolution)
        cam = make_camera(scene)
        meta = load_transforms(render_json)
        times = render_frames(scene, cam, meta, render_out, resolution)
        report["renders"] = [str(_frame_png(Path(render_out), f["file_path"])) for f in meta["frames"]]
        report["render_seconds"] = times
        report["emission"] = emission
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(report, f, indent=2)
    return report


def check_glb(
    glb_path: str | os.PathLike,
    json_path: str | os.PathLike,
    render_json: str | os.PathLike | None = None,
    render_out: str | os.PathLike | None = None,
    resolution: int = 128,
    samples: int = DEFAULT_SAMPLES,
    timeout: float = 1800.0,
) -> dict:
    """Run ``python -m evaluation.blender_check`` in a subprocess and return the parsed report."""
    cmd = [sys.executable, "-m", "evaluation.blender_check", str(glb_path), "--json", str(json_path)]
    if render_json:
        cmd += ["--render", str(render_json), "--render-out", str(render_out), "--resolution", str(resolution), "--samples", str(samples)]
    proc = subprocess.run(cmd, cwd=str(ROOT), env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"evaluation.blender_check failed (rc={proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    with open(json_path) as f:
        return json.load(f)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m evaluation.blender_check", description=__doc__.split("\n\n")[0])
    p.add_argument("glb")
    p.add_argument("--json", required=True, help="report path")
    p.add_argument("--render", help="transforms.json of cameras to render")
    p.add_argument("--render-out", help="folder for the renders")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES)
    a = p.parse_args(argv)
    if a.render and not a.render_out:
        p.error("--render needs --render-out")
    rep = run_check(a.glb, a.json, a.render, a.render_out, a.resolution, a.samples)
    print(json.dumps({"n_mesh_objects": rep["n_mesh_objects"], "bbox_min": rep["bbox_min"], "bbox_max": rep["bbox_max"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
