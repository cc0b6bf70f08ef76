"""Scene data to the backend and results back into the scene (main thread only).

Out: the reference image's pixels as PNG, the active mesh as GLB (world
transform applied, one vertex per triangle corner), the scene's cameras as
camera-to-world matrices with lens data. In: a generated GLB imported at the
3D cursor facing the camera, or a refined texture put on the mesh's own
material with a new UV layer. No business logic: the backend decides
everything else.
"""

from __future__ import annotations

import json
import math
import os
import re
import uuid
from dataclasses import dataclass

import bpy
import numpy as np
from mathutils import Matrix, Vector

from . import glb
from .png import encode_png, float_to_uint8, linear_to_srgb

UV_LAYER = "gen3d"
MAX_REFERENCE_SIDE = 2048
MAX_TEXTURE_SIDE = 2048


class InputProblem(Exception):
    """Something the user can fix before sending (no image, no mesh...)."""


# --------------------------------------------------------------------------- images


def is_image_empty(obj) -> bool:
    return (obj is not None and obj.type == "EMPTY" and obj.empty_display_type == "IMAGE"
            and isinstance(obj.data, bpy.types.Image))


def reference_image(context):
    """(image, where it came from): the active image empty's image, else the panel's choice."""
    obj = context.active_object
    if is_image_empty(obj):
        return obj.data, f"image empty '{obj.name}'"
    img = context.scene.gen3d.image
    if img is not None:
        return img, f"image '{img.name}'"
    return None, ""


def image_to_png(image, max_side: int = MAX_REFERENCE_SIDE, keep_alpha: bool = True) -> bytes:
    """The image's pixels as 8-bit sRGB PNG (RGBA when it has a real alpha channel), top row first."""
    if image.type not in ("IMAGE", "UV_TEST"):
        raise InputProblem(f"'{image.name}' is a {image.type.replace('_', ' ').lower()}: save it as an image first")
    w, h = image.size
    if w == 0 or h == 0:
        raise InputProblem(f"the image '{image.name}' has no pixels (is its file missing? {image.filepath or 'no file'})")
    src, tmp = image, None
    if max(w, h) > max_side:
        s = max_side / max(w, h)
        tmp = image.copy()
        tmp.scale(max(1, round(w * s)), max(1, round(h * s)))
        src = tmp
        w, h = tmp.size
    try:
        buf = np.empty(w * h * 4, np.float32)
        src.pixels.foreach_get(buf)
    finally:
        if tmp is not None:
            bpy.data.images.remove(tmp)
    px = buf.reshape(h, w, 4)[::-1]  # Blender stores the bottom row first
    rgb = px[..., :3]
    colorspace = image.colorspace_settings.name
    if image.is_float and colorspace not in ("Non-Color", "Raw", "Generic Data"):
        alpha = px[..., 3:4]
        if image.alpha_mode == "PREMUL":
            rgb = np.where(alpha > 1e-6, rgb / np.maximum(alpha, 1e-6), rgb)
        rgb = linear_to_srgb(rgb)
    out = float_to_uint8(np.concatenate([rgb, px[..., 3:4]], -1))
    has_alpha = image.depth in (32, 64, 128) and image.alpha_mode != "NONE"  # RGBA buffers (8, 16, 32 bit)
    if not keep_alpha or not has_alpha or out[..., 3].min() == 255:
        out = np.ascontiguousarray(out[..., :3])
    return encode_png(out)


# --------------------------------------------------------------------------- materials


def principled_node(material):
    if material is None or material.node_tree is None:
        return None
    nodes = material.node_tree.nodes
    for node in nodes:
        if node.type == "OUTPUT_MATERIAL" and node.is_active_output:
            surf = node.inputs.get("Surface")
            if surf is not None and surf.links and surf.links[0].from_node.type == "BSDF_PRINCIPLED":
                return surf.links[0].from_node
    return next((n for n in nodes if n.type == "BSDF_PRINCIPLED"), None)


def base_color_image(material):
    """The image feeding the Principled BSDF's Base Color (through a few nodes at most)."""
    bsdf = principled_node(material)
    if bsdf is None:
        return None
    frontier = [link.from_node for link in bsdf.inputs["Base Color"].links]
    seen = set()
    for _ in range(4):
        nxt = []
        for node in frontier:
            if node.as_pointer() in seen:
                continue
            seen.add(node.as_pointer())
            if node.type == "TEX_IMAGE" and node.image is not None:
                return node.image
            for sock in node.inputs:
                nxt.extend(link.from_node for link in sock.links)
        frontier = nxt
    return None


def ensure_node_material(name: str):
    mat = bpy.data.materials.new(name)
    if bpy.app.version < (5, 0, 0):
        mat.use_nodes = True  # from 5.0 on materials always have nodes (and the property is deprecated)
    if principled_node(mat) is None:
        nt = mat.node_tree
        bsdf = nt.nodes.new("ShaderNodeBsdfPrincipled")
        out = next((n for n in nt.nodes if n.type == "OUTPUT_MATERIAL"), None) or nt.nodes.new("ShaderNodeOutputMaterial")
        nt.links.new(bsdf.outputs["BSDF"], out.inputs["Surface"])
    return mat


# --------------------------------------------------------------------------- meshes


@dataclass
class MeshExport:
    """What the refine result is checked against and mapped onto."""

    object_name: str
    mesh_name: str
    glb_bytes: bytes
    tri_loops: np.ndarray  # [3F] loop index of each sent corner (evaluated mesh)
    sent_positions: np.ndarray  # [3F, 3] float32, glTF frame, as written
    sent_uv: np.ndarray | None  # [3F, 2] v up
    same_topology: bool  # the evaluated mesh's loops are the object's own loops
    n_loops: int  # loops of the object's own mesh at export time
    had_image: str | None


def export_mesh(context, obj) -> MeshExport:
    """The object's evaluated mesh (modifiers applied) in world space, as a GLB with one vertex per corner."""
    if obj is None or obj.type != "MESH":
        raise InputProblem("Select a mesh object (it becomes the active object) to refine its texture.")
    if obj.mode == "EDIT":
        obj.update_from_editmode()
    # modifiers (and shape keys) applied; a plain mesh is read as it is (no stale evaluation possible)
    evaluated = bool(obj.modifiers) or obj.data.shape_keys is not None
    if evaluated:
        eobj = obj.evaluated_get(context.evaluated_depsgraph_get())
        mesh = eobj.to_mesh()
    else:
        eobj, mesh = obj, obj.data
    try:
        mesh.calc_loop_triangles()
        nt = len(mesh.loop_triangles)
        if nt == 0:
            raise InputProblem(f"'{obj.name}' has no faces to texture.")
        tri_loops = np.empty(nt * 3, np.int32)
        mesh.loop_triangles.foreach_get("loops", tri_loops)
        co = np.empty(len(mesh.vertices) * 3, np.float32)
        mesh.vertices.foreach_get("co", co)
        loop_vert = np.empty(len(mesh.loops), np.int32)
        mesh.loops.foreach_get("vertex_index", loop_vert)
        m = np.array(eobj.matrix_world, np.float64)
        corners = co.reshape(-1, 3)[loop_vert[tri_loops]].astype(np.float64)
        world = corners @ m[:3, :3].T + m[:3, 3]
        normals = None
        try:
            cn = np.empty(len(mesh.loops) * 3, np.float32)
            mesh.corner_normals.foreach_get("vector", cn)  # Blender 4.1+
            nmat = np.linalg.inv(m[:3, :3]).T if abs(np.linalg.det(m[:3, :3])) > 1e-12 else m[:3, :3]
            normals = cn.reshape(-1, 3)[tri_loops].astype(np.float64) @ nmat.T
        except (AttributeError, np.linalg.LinAlgError):
            normals = None
        uv = None
        if mesh.uv_layers.active is not None:
            luv = np.empty(len(mesh.loops) * 2, np.float32)
            mesh.uv_layers.active.data.foreach_get("uv", luv)
            uv = luv.reshape(-1, 2)[tri_loops]
        own = obj.data
        same = (len(mesh.loops) == len(own.loops) and len(mesh.polygons) == len(own.polygons)
                and len(mesh.vertices) == len(own.vertices))
        if same:
            own_lv = np.empty(len(own.loops), np.int32)
            own.loops.foreach_get("vertex_index", own_lv)
            same = bool(np.array_equal(own_lv, loop_vert))
    finally:
        if evaluated:
            eobj.to_mesh_clear()
    if not same and uv is None:
        raise InputProblem(f"'{obj.name}' has modifiers that change its faces and no UV map: apply the modifiers "
                           "(Ctrl+A) or unwrap it (U) first, so the new texture can be mapped back.")
    image = base_color_image(obj.active_material)
    texture_png = None
    base_color = (0.8, 0.8, 0.8, 1.0)
    if image is not None:
        try:
            texture_png = image_to_png(image, MAX_TEXTURE_SIDE, keep_alpha=False)
        except InputProblem:
            texture_png = None
    else:
        bsdf = principled_node(obj.active_material)
        if bsdf is not None and not bsdf.inputs["Base Color"].links:
            base_color = tuple(bsdf.inputs["Base Color"].default_value)
    data = glb.write_glb(world, normals=normals, uv=uv, texture_png=texture_png, base_color=base_color, name=obj.name)
    sent = glb.z_up_to_y_up(world).astype(np.float32)
    return MeshExport(obj.name, obj.data.name, data, tri_loops, sent, uv, same, len(obj.data.loops),
                      image.name if image is not None else None)


# --------------------------------------------------------------------------- cameras


def camera_frames(context, mode: str) -> tuple[list[dict], int]:
    """Perspective cameras as refine_texture frames (Blender lens data), and how many others were skipped."""
    scene = context.scene
    if mode == "NONE":
        return [], 0
    if mode == "SELECTED":
        objs = [o for o in context.selected_objects if o.type == "CAMERA"]
    else:
        objs = [o for o in scene.objects if o.type == "CAMERA"]
    r = scene.render
    w = max(1, int(round(r.resolution_x * r.resolution_percentage / 100)))
    h = max(1, int(round(r.resolution_y * r.resolution_percentage / 100)))
    frames, skipped = [], 0
    for o in sorted(objs, key=lambda o: o.name):
        cam = o.data
        if cam.type != "PERSP":
            skipped += 1
            continue
        frames.append({
            "name": o.name,
            "transform_matrix": [list(map(float, row)) for row in o.matrix_world],
            "lens": float(cam.lens), "sensor_width": float(cam.sensor_width), "sensor_height": float(cam.sensor_height),
            "sensor_fit": cam.sensor_fit, "w": w, "h": h,
            "shift_x": float(cam.shift_x), "shift_y": float(cam.shift_y),
        })
    return frames, skipped


def cameras_json(frames: list[dict]) -> bytes:
    return json.dumps({"frames": frames}).encode("utf-8")


# --------------------------------------------------------------------------- placing results


@dataclass
class Placement:
    scene: str
    view_layer: str
    collection: str | None  # None: the scene's master collection
    location: tuple
    angle: float  # rotation about Z (radians) that turns the object's front (-Y) toward the camera
    base_name: str
    info: dict
    height: float = 0.0  # the object's height in scene units, standing on the location (0: as the GLB has it)
    quads: bool = False  # join the imported triangles into quads (Blender's Tris to Quads)


def facing_angle(cursor, camera_location) -> float:
    """Angle about Z that turns -Y toward the camera's XY direction from the cursor (0 without one)."""
    if camera_location is None:
        return 0.0
    dx = camera_location[0] - cursor[0]
    dy = camera_location[1] - cursor[1]
    if math.hypot(dx, dy) < 1e-9:
        return 0.0
    return math.atan2(dx, -dy)  # R(a) @ (0, -1) = (sin a, -cos a) = (dx, dy) / |.|


def placement(context, base_name: str, info: dict, height: float = 0.0, quads: bool = False) -> Placement:
    scene = context.scene
    cursor = tuple(scene.cursor.location)
    cam = scene.camera
    angle = facing_angle(cursor, tuple(cam.matrix_world.translation) if cam is not None else None)
    coll = context.view_layer.active_layer_collection.collection
    coll_name = None if coll == scene.collection else coll.name
    return Placement(scene.name, context.view_layer.name, coll_name, cursor, angle, base_name, info, float(height),
                     bool(quads))


def join_quads(mesh, pairs) -> tuple[int, int]:
    """Join the triangle pairs the backend chose (``quads.json``: indices into the GLB's
    triangles, which Blender's glTF importer keeps in order) on ``mesh`` (a bpy Mesh). A pair
    that does not share an edge here is left as two triangles. Returns (quads, faces)."""
    import bmesh

    bm = bmesh.new()
    try:
        bm.from_mesh(mesh)
        bm.faces.ensure_lookup_table()
        faces = list(bm.faces)
        joined = 0
        for i, j in pairs:
            if not (0 <= i < len(faces) and 0 <= j < len(faces)):
                continue
            a, b = faces[i], faces[j]
            if not (a.is_valid and b.is_valid and len(a.verts) == 3 and len(b.verts) == 3):
                continue
            if not set(a.edges) & set(b.edges):
                continue
            if bmesh.utils.face_join([a, b], True) is not None:
                joined += 1
        bm.to_mesh(mesh)
    finally:
        bm.free()
    mesh.update()
    return sum(1 for p in mesh.polygons if p.loop_total == 4), len(mesh.polygons)


def _world_bounds(objects) -> tuple[tuple, tuple] | None:
    """Min and max corner of the mesh objects' vertices in world space (None: no vertices)."""
    lo, hi = None, None
    for o in objects:
        n = len(o.data.vertices)
        if n == 0:
            continue
        co = np.empty(n * 3, np.float64)
        o.data.vertices.foreach_get("co", co)
        m = np.array(o.matrix_world, np.float64)
        w = co.reshape(-1, 3) @ m[:3, :3].T + m[:3, 3]
        lo = w.min(0) if lo is None else np.minimum(lo, w.min(0))
        hi = w.max(0) if hi is None else np.maximum(hi, w.max(0))
    return None if lo is None else (tuple(lo), tuple(hi))


def base_frame(bounds, height: float) -> Matrix:
    """The transform that puts an object with these world ``bounds`` on the origin: the
    bottom centre of its box at (0, 0, 0) and, for ``height`` > 0, scaled uniformly to
    that height (0, or a flat object: centred only, size kept)."""
    lo, hi = bounds
    extent = hi[2] - lo[2]
    s = height / extent if height > 0 and extent > 1e-9 else 1.0
    bottom = Vector((0.5 * (lo[0] + hi[0]), 0.5 * (lo[1] + hi[1]), lo[2]))
    return Matrix.Scale(s, 4) @ Matrix.Translation(-bottom)


def _custom_properties(obj, info: dict) -> None:
    """The job's settings on the object: all of them as JSON in ``gen3d``, the plain ones
    also one by one (``gen3d_seed``, ``gen3d_prompt``, ...) for the N panel and drivers."""
    obj["gen3d"] = json.dumps(info)
    for k, v in info.items():
        if isinstance(v, (bool, int, float, str)):
            obj[f"gen3d_{k}"] = int(v) if isinstance(v, bool) else v


def slug(text: str, default: str = "gen3d") -> str:
    words = re.findall(r"[A-Za-z0-9]+", text or "")[:4]
    return "_".join(w.lower() for w in words) or default


def _override(scene, view_layer, collection):
    kw = {"scene": scene, "view_layer": view_layer, "collection": collection}
    wm = bpy.context.window_manager
    if bpy.context.window is None and wm is not None and len(wm.windows):
        window = wm.windows[0]
        kw["window"] = window
        kw["screen"] = window.screen
    return bpy.context.temp_override(**kw)


def _result_glb(ev) -> bytes:
    data = ev.attachments.get("model.glb")
    if data is None:
        data = next((v for k, v in ev.attachments.items() if k.endswith(".glb")), None)
    if data is None:
        raise RuntimeError("the backend's result holds no model.glb")
    return data


def _result_quads(ev) -> dict | None:
    data = (getattr(ev, "attachments", None) or {}).get("quads.json")
    if not data:
        return None
    try:
        out = json.loads(data.decode("utf-8"))
    except ValueError:
        return None
    return out if isinstance(out, dict) else None


def _write_temp(tmpdir: str, data: bytes, suffix: str) -> str:
    path = os.path.join(tmpdir, f"{uuid.uuid4().hex}{suffix}")
    with open(path, "wb") as fh:
        fh.write(data)
    return path


def _select_only(view_layer, objects) -> None:
    for o in view_layer.objects:
        if o.select_get(view_layer=view_layer):
            o.select_set(False, view_layer=view_layer)
    for o in objects:
        if o.name in view_layer.objects:
            o.select_set(True, view_layer=view_layer)
    if objects:
        view_layer.objects.active = objects[0]


def _scene(name: str):
    """The scene the job was started in, or (another file was loaded meanwhile) the current one."""
    scene = bpy.data.scenes.get(name) or bpy.context.scene
    if scene is None:
        wm = bpy.context.window_manager
        scene = wm.windows[0].scene if wm is not None and len(wm.windows) else bpy.data.scenes[0]
    return scene


def import_generated(ev, place: Placement, tmpdir: str) -> tuple[str, list[str]]:
    """Import the result GLB into the collection that was active, at the cursor, front toward the camera."""
    scene = _scene(place.scene)
    view_layer = scene.view_layers.get(place.view_layer) or scene.view_layers[0]
    coll = bpy.data.collections.get(place.collection) if place.collection else None
    if coll is None or coll not in scene.collection.children_recursive:
        coll = scene.collection
    path = _write_temp(tmpdir, _result_glb(ev), ".glb")
    before = {o.as_pointer() for o in bpy.data.objects}
    try:
        with _override(scene, view_layer, coll):
            if bpy.context.object is not None and bpy.context.object.mode != "OBJECT":
                bpy.ops.object.mode_set("EXEC_DEFAULT", False, mode="OBJECT")
            # undo=False: the whole result becomes one undo step, pushed after it is placed
            result = bpy.ops.import_scene.gltf("EXEC_DEFAULT", False, filepath=path, import_pack_images=True)
        if "FINISHED" not in result:
            raise RuntimeError(f"Blender's glTF importer returned {result}")
    finally:
        try:
            os.remove(path)
        except OSError:
            pass
    new = [o for o in bpy.data.objects if o.as_pointer() not in before]
    if not new:
        raise RuntimeError("the result GLB held no objects")
    for o in new:  # into the collection that was active when the job started
        if coll not in o.users_collection:
            coll.objects.link(o)
        for c in list(o.users_collection):
            if c != coll:
                c.objects.unlink(o)
    new_set = set(o.as_pointer() for o in new)
    roots = [o for o in new if o.parent is None or o.parent.as_pointer() not in new_set]
    view_layer.update()
    meshes = [o for o in new if o.type == "MESH"]
    place_m = Matrix.Translation(place.location) @ Matrix.Rotation(place.angle, 4, "Z")
    bounds = _world_bounds(meshes) if place.height > 0 else None
    base = base_frame(bounds, place.height) if bounds is not None else Matrix.Identity(4)
    for o in roots:
        if o.type == "MESH" and not o.children and o.data.users == 1:
            # the pivot at the base: the importer's transform and the sizing go into the mesh,
            # the object keeps scale 1 and only turns about Z
            o.data.transform(base @ o.matrix_world)
            o.data.update()
            o.matrix_world = place_m
        else:
            o.matrix_world = place_m @ base @ o.matrix_world
    if place.height > 0:
        place.info["height"] = place.height
    quads = _result_quads(ev) if place.quads else None
    if quads is not None and len(meshes) == 1 and meshes[0].data.users == 1 \
            and len(meshes[0].data.polygons) == quads.get("triangles"):
        q, _ = join_quads(meshes[0].data, quads.get("pairs", []))
        place.info["topology"] = "quads"
        place.info["quads"] = q
    elif place.quads:
        place.info["topology"] = "triangles (the backend sent no quads)"
    for i, o in enumerate(roots):
        o.name = place.base_name if len(roots) == 1 else f"{place.base_name}.{i:03d}"
        _custom_properties(o, place.info)
    ordered = meshes + [o for o in new if o.type != "MESH"]
    _select_only(view_layer, ordered)
    n_faces = sum(len(o.data.polygons) for o in meshes)
    return f"Imported '{ordered[0].name}' ({n_faces} faces)", [o.name for o in ordered]


@dataclass
class RefineTarget:
    export: MeshExport
    scene: str
    view_layer: str
    info: dict


def apply_refined(ev, target: RefineTarget, tmpdir: str) -> tuple[str, list[str]]:
    """New UV layer and texture on the mesh's own (copied) material; vertex positions untouched."""
    ex = target.export
    obj = bpy.data.objects.get(ex.object_name)
    if obj is None or obj.type != "MESH":
        raise RuntimeError(f"the object '{ex.object_name}' is gone: the refined texture was not applied")
    res = glb.read_glb(_result_glb(ev))
    n_tris = len(ex.tri_loops) // 3
    if len(res.indices) != n_tris:
        raise RuntimeError(f"the backend returned {len(res.indices)} triangles for the {n_tris} sent")
    got = res.positions[res.indices.reshape(-1)]
    extent = float(np.abs(ex.sent_positions).max()) or 1.0
    if not np.allclose(got, ex.sent_positions, rtol=0.0, atol=1e-4 * extent):
        raise RuntimeError("the backend returned the triangles in another order: the texture cannot be mapped")
    uv = res.corner_uv
    if uv is None:
        raise RuntimeError("the backend's mesh has no texture coordinates")
    if res.texture_png is None:
        raise RuntimeError("the backend's mesh has no base-colour texture")
    scene = _scene(target.scene)
    view_layer = scene.view_layers.get(target.view_layer) or scene.view_layers[0]
    if obj.mode != "OBJECT":
        with _override(scene, view_layer, scene.collection):
            view_layer.objects.active = obj
            bpy.ops.object.mode_set("EXEC_DEFAULT", False, mode="OBJECT")
    mesh = obj.data
    warnings = []
    if ex.same_topology:
        if len(mesh.loops) != ex.n_loops:
            raise RuntimeError(f"'{obj.name}' was edited while the job ran: the texture cannot be mapped")
        per_loop = np.zeros((len(mesh.loops), 2), np.float32)
        per_loop[ex.tri_loops] = uv
        # a polygon corner shared by two triangles can hold one UV only
        spread = np.abs(per_loop[ex.tri_loops] - uv).max(axis=1)
        conflicts = int(np.count_nonzero(spread > 1e-5))
        if conflicts:
            warnings.append(f"{conflicts} polygon corners got two UVs (triangulate the mesh for an exact mapping)")
    else:
        if ex.sent_uv is None or not np.allclose(uv, ex.sent_uv, atol=1e-5):
            raise RuntimeError(f"'{obj.name}' has modifiers that change its faces and the backend made new UVs: "
                               "apply the modifiers (Ctrl+A) and refine again")
        active = mesh.uv_layers.active
        per_loop = np.empty((len(mesh.loops), 2), np.float32)
        active.data.foreach_get("uv", per_loop.reshape(-1))
    layer = mesh.uv_layers.get(UV_LAYER)
    if layer is None:
        if len(mesh.uv_layers) >= 8:
            raise RuntimeError(f"'{obj.name}' already has 8 UV maps: remove one for the refined texture's map")
        layer = mesh.uv_layers.new(name=UV_LAYER, do_init=False)
    layer.data.foreach_set("uv", per_loop.reshape(-1))
    mesh.uv_layers.active = layer
    # the new texture, packed into the .blend
    suffix = ".jpg" if (res.texture_mime or "").endswith("jpeg") else ".png"
    path = _write_temp(tmpdir, res.texture_png, suffix)
    try:
        image = bpy.data.images.load(path)
        image.pack()
    finally:
        try:
            os.remove(path)
        except OSError:
            pass
    image.name = f"{obj.name}_gen3d"
    image.filepath_raw = f"//{bpy.path.clean_name(image.name)}{suffix}"  # where "Unpack" would write it
    # a copy of the old material (its image stays in it, unconnected), or a new one
    old = obj.active_material
    if old is not None:
        mat = old.copy()
        if principled_node(mat) is None:
            mat = ensure_node_material(f"{obj.name}_gen3d")
    else:
        mat = ensure_node_material(f"{obj.name}_gen3d")
    mat.name = f"{obj.name}_gen3d"
    nt = mat.node_tree
    bsdf = principled_node(mat)
    tex = nt.nodes.new("ShaderNodeTexImage")
    tex.name = tex.label = "gen3d texture"
    tex.image = image
    tex.location = (bsdf.location.x - 320, bsdf.location.y + 60)
    uvnode = nt.nodes.new("ShaderNodeUVMap")
    uvnode.name = uvnode.label = "gen3d UV"
    uvnode.uv_map = UV_LAYER
    uvnode.location = (tex.location.x - 220, tex.location.y)
    nt.links.new(uvnode.outputs["UV"], tex.inputs["Vector"])
    nt.links.new(tex.outputs["Color"], bsdf.inputs["Base Color"])
    for n in nt.nodes:
        n.select = False
    tex.select = True
    nt.nodes.active = tex
    if len(obj.material_slots) == 0:
        mesh.materials.append(mat)
    else:
        for slot in obj.material_slots:
            slot.material = mat
    obj["gen3d"] = json.dumps(target.info)
    _select_only(view_layer, [obj])
    text = f"Refined the texture of '{obj.name}' (material '{mat.name}', image '{image.name}')"
    if warnings:
        text += "; " + "; ".join(warnings)
    return text, [obj.name]
