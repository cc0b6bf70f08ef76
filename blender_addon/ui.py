"""The "Generate" tab of the 3D Viewport's sidebar: three job panels, each with
its settings, its button (which queues while another job runs) and, while its
job runs, a progress bar, the backend's latest preview and Cancel; after it
ends, the result or the error and what to do about it. A fourth panel, Queue &
History, lists the jobs in flight and the kept results."""

from __future__ import annotations

import os
import textwrap

import bpy

from . import scene_io, wire
from .manager import CONNECTING, MANAGER, QUEUED

STAGE_LABELS = {
    "connecting": "Connecting", "starting backend": "Starting backend", "submitting": "Sending",
    "queued": "Queued", "text_to_image": "Text to image", "segment": "Cutting out", "novel_views": "Novel views",
    "gaussians": "Gaussians", "distill": "Score distillation", "mesh": "Mesh", "uv": "UV unwrap", "texture": "Texture", "refine": "Refining",
    "export": "Export", "job": "Working",
}


def stage_label(stage: str) -> str:
    return STAGE_LABELS.get(stage or "", (stage or "Working").replace("_", " ").capitalize())


def _lines(layout, text: str, icon: str = "NONE", width: int = 46) -> None:
    for i, line in enumerate(textwrap.wrap(text, width) or [""]):
        layout.label(text=line, icon=icon if i == 0 else "BLANK1" if icon != "NONE" else "NONE")


# --------------------------------------------------------------------------- previews

_previews = None
_preview_key = None
_preview_path = None


def preview_icon(job) -> int:
    """icon_id of the job's latest preview PNG (0 when there is none)."""
    global _previews, _preview_key, _preview_path
    if job is None or not job.preview_png:
        return 0
    key = f"{id(job)}_{job.preview_serial}"
    if _previews is None:
        import bpy.utils.previews

        _previews = bpy.utils.previews.new()
    if key not in _previews:
        path = os.path.join(MANAGER.tmpdir(), f"preview_{key}.png")
        with open(path, "wb") as fh:
            fh.write(job.preview_png)
        _previews.clear()
        if _preview_path and os.path.exists(_preview_path):
            try:
                os.remove(_preview_path)
            except OSError:
                pass
        _previews.load(key, path, "IMAGE")
        _preview_key, _preview_path = key, path
    return _previews[key].icon_id


_thumbs = None
_fronts = None


def front_icon(i: int) -> int:
    """icon_id of front-view candidate ``i`` of MANAGER.fronts."""
    global _fronts
    f = MANAGER.fronts
    if not f:
        return 0
    if _fronts is None:
        import bpy.utils.previews

        _fronts = bpy.utils.previews.new()
    key = f"{f['serial']}_{i}"
    if key not in _fronts:
        path = os.path.join(MANAGER.tmpdir(), f"front_{key}.png")
        with open(path, "wb") as fh:
            fh.write(f["pngs"][i])
        _fronts.load(key, path, "IMAGE")
    return _fronts[key].icon_id


def _draw_fronts(layout) -> None:
    f = MANAGER.fronts
    if not f:
        return
    box = layout.box()
    box.label(text=f"Pick a front view of '{f['prompt'][:30]}':", icon="IMAGE_DATA")
    grid = box.grid_flow(columns=2, even_columns=True, even_rows=True, align=True)
    for i, seed in enumerate(f["seeds"]):
        cell = grid.column(align=True)
        cell.template_icon(icon_value=front_icon(i), scale=5.0)
        cell.operator("gen3d.use_front", text=f"Lift seed {seed}", icon="MESH_MONKEY").index = i


def thumb_icon(entry) -> int:
    """icon_id of a history entry's thumbnail (0 when it has none)."""
    global _thumbs
    path = MANAGER.history.file(entry.thumb) if MANAGER.history is not None else None
    if path is None:
        return 0
    if _thumbs is None:
        import bpy.utils.previews

        _thumbs = bpy.utils.previews.new()
    key = f"{entry.id}:{entry.thumb}"
    if key not in _thumbs:
        _thumbs.load(key, path, "IMAGE")
    return _thumbs[key].icon_id


def clear_previews() -> None:
    global _previews, _preview_key, _preview_path, _thumbs, _fronts
    import bpy.utils.previews

    for coll in (_previews, _thumbs, _fronts):
        if coll is not None:
            bpy.utils.previews.remove(coll)
    _previews = _preview_key = _preview_path = _thumbs = _fronts = None


def image_icon(image) -> int:
    if image is None:
        return 0
    try:
        image.preview_ensure()
        return image.preview.icon_id
    except (AttributeError, RuntimeError):
        return 0


# --------------------------------------------------------------------------- status


def draw_outcome(layout, outcome) -> None:
    box = layout.box()
    if outcome.state == "error":
        box.alert = True
        _lines(box, outcome.message, "ERROR")
        if outcome.hint:
            col = box.column()
            col.alert = False
            _lines(col, outcome.hint, "INFO")
        if outcome.code == "model_missing":  # the backend's own preset: fetch it from here
            row = box.row()
            row.alert = False
            op = row.operator("gen3d.models", text="Download Models", icon="IMPORT")
            op.action = "download"
            op.preset = ""
    elif outcome.state == "cancelled":
        _lines(box, outcome.message, "CANCEL")
    else:
        _lines(box, outcome.message, "CHECKMARK")
    box.operator("gen3d.dismiss", text="Dismiss", icon="X")


def draw_status(layout, panel: str) -> None:
    if not wire.available():
        box = layout.box()
        box.alert = True
        _lines(box, wire.IMPORT_ERROR or "pyzmq is missing", "ERROR")
        return
    job = MANAGER.job
    if job is not None and job.panel == panel:
        box = layout.box()
        if job.phase == CONNECTING:
            box.progress(factor=0.0, type="BAR", text=stage_label(job.stage) + "...")
        else:
            pct = int(round(100 * job.fraction))
            box.progress(factor=float(job.fraction), type="BAR", text=f"{stage_label(job.stage)}  {pct}%")
        if job.message:
            _lines(box, job.message)
        if job.preview_png:  # (icon ids are 0 in background mode, where nothing is drawn anyway)
            box.template_icon(icon_value=preview_icon(job), scale=8.0)
        box.operator("gen3d.cancel", text="Cancel", icon="CANCEL")
        _draw_queued_here(layout, panel)
        return
    _draw_queued_here(layout, panel)
    out = MANAGER.outcome
    if out is not None and out.panel == panel:
        draw_outcome(layout, out)


def _draw_queued_here(layout, panel: str) -> None:
    n = sum(1 for j in MANAGER.queue if j.panel == panel)
    if n:
        layout.label(text=f"{n} more queued (Queue & History panel)", icon="SORTTIME")


def _run_button(layout, operator: str, text: str, icon: str) -> None:
    row = layout.row()
    row.scale_y = 1.4
    # while a job runs, the button queues another one behind it
    row.operator(operator, text=text + " (Queue)" if MANAGER.busy else text, icon=icon)


def _draw_generation_settings(layout, s, idname: str) -> None:
    header, body = layout.panel(idname, default_closed=True)
    header.label(text="Settings")
    if body is not None:
        body.use_property_split = True
        body.use_property_decorate = False
        body.prop(s, "quality")
        body.prop(s, "height")
        body.prop(s, "faces")
        body.prop(s, "topology")
        body.prop(s, "texture_size")
        body.prop(s, "material")
        body.prop(s, "refine")
        body.prop(s, "seed")
        body.prop(s, "negative_prompt", text="Negative")
        body.prop(s, "extra_params", text="Extra (JSON)")


# --------------------------------------------------------------------------- panels


class _Gen3DPanel:
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "Generate"


class GEN3D_PT_generate_text(_Gen3DPanel, bpy.types.Panel):
    bl_idname = "GEN3D_PT_generate_text"
    bl_label = "Generate from text"

    def draw(self, context):
        layout = self.layout
        s = context.scene.gen3d
        layout.prop(s, "prompt", text="", placeholder="Prompt, e.g. a red wooden chair")
        layout.prop(s, "text_method", text="Method")
        if s.text_method == "SDS":
            layout.prop(s, "sds_anchor", text="Anchor on a Front View")
        with_front = s.text_method == "IMAGE" or s.sds_anchor  # unanchored score distillation makes no front view
        fronts = s.choose_front and with_front
        row = layout.row()
        row.enabled = with_front
        row.prop(s, "choose_front", text="Choose Front First")
        sub = row.row()
        sub.enabled = s.choose_front
        sub.prop(s, "front_count", text="")
        _draw_generation_settings(layout, s, "gen3d_text_settings")
        _run_button(layout, "gen3d.generate_from_text", "Generate Fronts" if fronts else "Generate", "PLAY")
        draw_status(layout, "TEXT")
        _draw_fronts(layout)


class GEN3D_PT_image_to_3d(_Gen3DPanel, bpy.types.Panel):
    bl_idname = "GEN3D_PT_image_to_3d"
    bl_label = "Image to 3D"

    def draw(self, context):
        layout = self.layout
        s = context.scene.gen3d
        obj = context.active_object
        if scene_io.is_image_empty(obj):
            layout.label(text=f"Image empty: {obj.name}", icon="IMAGE_REFERENCE")
            image = obj.data
        else:
            layout.template_ID(s, "image", new="image.new", open="image.open")
            image = s.image
        if image is not None:
            layout.template_icon(icon_value=image_icon(image), scale=6.0)
            w, h = image.size
            layout.label(text=f"{image.name}: {w} x {h}", icon="IMAGE_DATA")
        else:
            layout.label(text="No reference image: choose or open one,", icon="INFO")
            layout.label(text="or select an image empty (Add > Image > Reference).")
        col = layout.column()
        col.use_property_split = True
        col.use_property_decorate = False
        row = col.row(heading="Elevation")
        row.prop(s, "elevation_auto", text="Auto")
        sub = row.row()
        sub.enabled = not s.elevation_auto
        sub.prop(s, "reference_elevation", text="")
        col.prop(s, "prompt", text="Prompt")
        _draw_generation_settings(layout, s, "gen3d_image_settings")
        _run_button(layout, "gen3d.image_to_3d", "Generate from Image", "PLAY")
        draw_status(layout, "IMAGE")


class GEN3D_PT_refine_texture(_Gen3DPanel, bpy.types.Panel):
    bl_idname = "GEN3D_PT_refine_texture"
    bl_label = "Refine texture"

    def draw(self, context):
        layout = self.layout
        s = context.scene.gen3d
        obj = context.active_object
        if obj is not None and obj.type == "MESH":
            layout.label(text=f"Mesh: {obj.name} ({len(obj.data.polygons)} faces)", icon="MESH_DATA")
        else:
            row = layout.row()
            row.alert = True
            row.label(text="Select a mesh (the active object)", icon="ERROR")
        layout.prop(s, "refine_prompt", text="", placeholder="New look, e.g. rusty metal")
        layout.label(text="Reference image (optional):")
        layout.template_ID(s, "refine_image", open="image.open")
        col = layout.column()
        col.use_property_split = True
        col.use_property_decorate = False
        col.prop(s, "refine_cameras")
        if s.refine_cameras != "NONE":
            frames, skipped = scene_io.camera_frames(context, s.refine_cameras)
            col.label(text=f"{len(frames)} camera(s)" + (f", {skipped} not perspective" if skipped else ""),
                      icon="CAMERA_DATA")
        col.prop(s, "texture_size")
        col.prop(s, "seed")
        _run_button(layout, "gen3d.refine_texture", "Refine Texture", "SHADING_TEXTURE")
        draw_status(layout, "REFINE")


def _draw_queue(layout) -> None:
    jobs = MANAGER.jobs()
    if not jobs:
        layout.label(text="No job running", icon="CHECKMARK")
        return
    for i, job in enumerate(jobs):
        box = layout.box()
        row = box.row()
        row.label(text=job.label if len(job.label) <= 40 else job.label[:39] + "...",
                  icon="PLAY" if i == 0 else "SORTTIME")
        op = row.operator("gen3d.cancel", text="", icon="X")
        op.queue_index = i - 1  # -1: the running job
        if job.phase == QUEUED:
            box.label(text=f"Queued ({i} before it)")
        elif job.phase == CONNECTING:
            box.progress(factor=0.0, type="BAR", text=stage_label(job.stage) + "...")
        else:
            pct = int(round(100 * job.fraction))
            box.progress(factor=float(job.fraction), type="BAR", text=f"{stage_label(job.stage)}  {pct}%")


def _age(seconds: float) -> str:
    if seconds < 90:
        return "just now"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 129600:
        return f"{seconds / 3600:.0f} h ago"
    return f"{seconds / 86400:.0f} days ago"


def _draw_history(layout, limit: int) -> None:
    import time

    hist = MANAGER.history
    if hist is None:
        return
    entries = hist.entries()
    waiting = hist.unfinished()
    running_ids = {j.history_id for j in MANAGER.jobs() if j.history_id}
    if any(e.id not in running_ids for e in waiting):
        box = layout.box()
        _lines(box, f"{len(waiting)} result(s) may be waiting on the backend (Blender was closed or the "
                    "connection dropped).", "INFO")
        box.operator("gen3d.history_fetch", text="Fetch Results", icon="IMPORT")
    if not entries:
        layout.label(text="Nothing generated yet", icon="INFO")
        return
    now = time.time()
    for e in entries[:limit]:
        box = layout.box()
        row = box.row()
        if hist.file(e.thumb):  # (icon ids are 0 in background mode, where nothing is drawn anyway)
            row.template_icon(icon_value=thumb_icon(e), scale=3.0)
        col = row.column(align=True)
        what = "Text" if e.kind == "text_to_3d" else "Image"
        col.label(text=e.label if len(e.label) <= 34 else e.label[:33] + "...",
                  icon="FONT_DATA" if e.kind == "text_to_3d" else "IMAGE_DATA")
        p = e.params
        col.label(text=f"{what} - seed {e.seed} - {p.get('quality', '?')} - {p.get('faces', '?')} faces")
        state = {"done": f"{e.seconds:.0f} s", "running": "running" if e.id in running_ids else "not seen to end",
                 "error": "failed", "cancelled": "cancelled"}.get(e.state, e.state)
        col.label(text=f"{_age(now - e.created)} - {state}")
        if e.state == "error" and e.message:
            sub = box.column()
            sub.alert = True
            _lines(sub, e.message, "ERROR")
        row = box.row(align=True)
        sub = row.row(align=True)
        sub.enabled = bool(e.glb)
        sub.operator("gen3d.history_import", text="Import", icon="IMPORT").entry = e.id
        row.operator("gen3d.history_regenerate", text="New Seed", icon="FILE_REFRESH").entry = e.id
        row.operator("gen3d.history_remove", text="", icon="TRASH").entry = e.id
    if len(entries) > limit:
        layout.label(text=f"... and {len(entries) - limit} older")


class GEN3D_PT_queue_history(_Gen3DPanel, bpy.types.Panel):
    bl_idname = "GEN3D_PT_queue_history"
    bl_label = "Queue & History"

    def draw(self, context):
        layout = self.layout
        _draw_queue(layout)
        layout.separator()
        layout.label(text="History", icon="TIME")
        _draw_history(layout, limit=12)


CLASSES = (GEN3D_PT_generate_text, GEN3D_PT_image_to_3d, GEN3D_PT_refine_texture, GEN3D_PT_queue_history)
