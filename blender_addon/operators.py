"""The operators: gather inputs, hand a Job to the manager, report how it ended.

In the UI they return at once and the manager's timer follows the job; in
background mode (``bpy.app.background``, where timers never fire) they block
until the result is in the scene, so scripts and tests can drive them.
"""

import math
import os
import random
import time
from types import SimpleNamespace

import bpy
from bpy.props import EnumProperty, IntProperty, StringProperty

from . import scene_io, wire
from .hints import hint_for
from .manager import MANAGER, Job, Outcome, human_size
from .prefs import connection, get_prefs, install_log, make_installer


# --------------------------------------------------------------------------- reporting


def _message(outcome: Outcome) -> str:
    text = f"{outcome.title}: {outcome.message}"
    if outcome.hint:
        text += f" -- {outcome.hint}"
    return text


def report_outcome(op, job: Job, state: str, message: str, code: str = "") -> set:
    """A problem found before sending: shown in the panel and reported by the operator."""
    MANAGER.outcome = Outcome(state, job.panel, job.label, message, hint_for(code) if state == "error" else "", code)
    op.report({"ERROR"} if state == "error" else {"WARNING"}, _message(MANAGER.outcome))
    _redraw()
    return {"CANCELLED"}


def _report_final(op, outcome: Outcome | None) -> set:
    if outcome is None:
        op.report({"ERROR"}, "The job did not finish")
        return {"CANCELLED"}
    if outcome.state == "error":
        op.report({"ERROR"}, _message(outcome))
        return {"CANCELLED"}
    if outcome.state == "cancelled":
        op.report({"WARNING"}, _message(outcome))
        return {"CANCELLED"}
    op.report({"INFO"}, outcome.message)
    return {"FINISHED"}


def _redraw() -> None:
    from .manager import _tag_redraw

    _tag_redraw()


def _window_override():
    wm = bpy.context.window_manager
    if bpy.context.window is None and wm is not None and len(wm.windows):
        win = wm.windows[0]
        return bpy.context.temp_override(window=win, screen=win.screen)
    return None


def notify(outcome: Outcome) -> None:
    """Status-bar report for a job that ended in the timer (UI mode): no operator is running then."""
    level = {"error": "ERROR", "cancelled": "WARNING"}.get(outcome.state, "INFO")
    text = _message(outcome) if outcome.state != "done" else outcome.message
    ctx = _window_override()
    try:
        if ctx is None:
            bpy.ops.gen3d.report(level=level, message=text)
        else:
            with ctx:
                bpy.ops.gen3d.report(level=level, message=text)
    except RuntimeError:
        # an ERROR report raises in scripts; it was shown already
        pass


def undo_push(message: str) -> None:
    ctx = _window_override()
    try:
        if ctx is None:
            bpy.ops.ed.undo_push(message=message)
        else:
            with ctx:
                bpy.ops.ed.undo_push(message=message)
    except RuntimeError:
        pass  # no undo stack (background mode)


def submit_job(op, job: Job, conn, keep: dict | None = None, extras: bool = True) -> set:
    """Send ``job`` (or queue it). ``keep``: {label, name, image} for a history entry (text and image to 3D),
    written with the parameters as sent (the scene's Extra Parameters included, unless ``extras`` is off)."""
    if extras:
        try:
            job.params.update(extra_params(bpy.context.scene.gen3d, job.kind))
        except ValueError as exc:
            return report_outcome(op, job, "error", str(exc), "input")
    if keep is not None and MANAGER.history is not None and wire.available():
        try:
            entry = MANAGER.history.add(job.kind, keep["label"], job.params, conn.endpoint, keep.get("image"),
                                        name=keep.get("name", ""), token=conn.token or "")
            job.history_id = entry.id
        except OSError as exc:
            op.report({"WARNING"}, f"The history could not be written ({exc}); the job runs anyway")
    queued = MANAGER.busy
    try:
        MANAGER.submit(job, conn)
    except RuntimeError as exc:
        if job.history_id:
            MANAGER.history.remove(job.history_id)
        return report_outcome(op, job, "error", str(exc), "no_wire" if not wire.available() else "input")
    if MANAGER.job is None:  # ended at once (the backend could not be started)
        return _report_final(op, MANAGER.outcome)
    if MANAGER.is_blocking():
        MANAGER.wait()  # (with what queued itself behind it: fetches of results left on the backend)
        return _report_final(op, job.outcome or MANAGER.outcome)
    where = f"queued ({len(MANAGER.queue)} waiting)" if queued else "started"
    op.report({"INFO"}, f"{job.label}: {where} (progress in the sidebar, Generate tab)")
    return {"FINISHED"}


def _connection_or_report(op, context, job: Job):
    if not wire.available():
        report_outcome(op, job, "error", wire.IMPORT_ERROR or "pyzmq is missing", "no_wire")
        return None
    try:
        return connection(get_prefs(context))
    except PermissionError as exc:
        report_outcome(op, job, "error", str(exc), "online_access")
    except ValueError as exc:
        report_outcome(op, job, "error", f"Bad connection settings: {exc}", "input")
    return None


def extra_params(s, kind: str) -> dict:
    """The scene's advanced parameters for ``kind`` (see GEN3D_SceneSettings.extra_params)."""
    import json

    text = (getattr(s, "extra_params", "") or "").strip()
    if not text:
        return {}
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"Extra Parameters are not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError('Extra Parameters must look like {"*": {...}, "text_to_3d": {...}}')
    return {**data.get("*", {}), **data.get(kind, {})}


def generation_params(s) -> dict:
    params = {"seed": int(s.seed), "quality": s.quality, "faces": int(s.faces),
              "texture_size": int(s.texture_size), "refine": bool(s.refine), "material": s.material}
    if s.negative_prompt.strip():
        params["negative_prompt"] = s.negative_prompt.strip()
    return params


def uses_front(s) -> bool:
    """Whether a text job has a front view: the Front View method, or anchored score distillation."""
    return s.text_method == "IMAGE" or bool(s.sds_anchor)


def text_method_params(s, chosen: bool = False) -> dict:
    """The text job's method parameters: none for Front View; for Score Distillation, ``method: sds``
    and its anchor (a chosen front view always anchors it: it is sent as the job's image)."""
    if s.text_method != "SDS":
        return {}
    return {"method": "sds", "anchor": "front" if (chosen or s.sds_anchor) else "none"}


def wire_params(s, params: dict) -> dict:
    """What is sent: with Topology Quads, ``topology: quad`` (the backend makes triangles that pair
    into about the face budget's polygons, and says which pairs to join)."""
    out = dict(params)
    if s.topology == "QUADS":
        out["topology"] = "quad"
    return out


def _apply_generated(place, label):
    def apply(ev):
        place.info.update({"job": ev.job, "metadata": ev.metadata})
        summary, names = scene_io.import_generated(ev, place, MANAGER.tmpdir())
        undo_push(label)
        return summary + elevation_note(ev.metadata), names

    return apply


def elevation_note(metadata) -> str:
    """What the result says of an estimated reference elevation, for the panel's message."""
    el = (metadata or {}).get("elevation") if isinstance(metadata, dict) else None
    if not isinstance(el, dict) or el.get("given", True):
        return ""
    if el.get("used"):
        return f"; elevation estimated {el.get('value', 0):.0f} deg (confidence {el.get('confidence', 0):.2f})"
    return (f"; elevation {el.get('value', 0):.0f} deg: the estimate ({el.get('degrees', 0):.0f} deg) was not "
            f"confident ({el.get('confidence', 0):.2f}), set it by hand if the shape leans")


PANEL_OF = {"text_to_3d": "TEXT", "image_to_3d": "IMAGE"}


def entry_info(entry) -> dict:
    """The custom properties of an object made from a history entry (as the job's first import set them)."""
    what = {"image": entry.label} if entry.kind == "image_to_3d" else {"prompt": entry.label}
    return {"kind": entry.kind, **what, **{k: v for k, v in entry.params.items() if k != "prompt"}}


def _place_here(context, entry):
    """Where an entry's model goes now: the 3D cursor, facing the camera, at the scene's Height setting."""
    s = context.scene.gen3d
    return scene_io.placement(context, entry.name or "gen3d_" + scene_io.slug(entry.label), entry_info(entry),
                              s.height, entry.params.get("topology") == "quad")


def resume_job(entry, import_result: bool) -> Job:
    """The Job that follows (or fetches) an entry whose end was never seen; its result lands where the
    3D cursor is when it arrives (when ``import_result``) or in the history only."""
    label = f"Fetch: {entry.label}"

    def apply(ev):
        return _apply_generated(_place_here(bpy.context, entry), label)(ev)

    return Job(entry.kind, label, PANEL_OF.get(entry.kind, "TEXT"), dict(entry.params), apply=apply,
               history_id=entry.id, resume_job=entry.job, import_result=import_result)


def _apply_refined(target, label):
    def apply(ev):
        target.info.update({"job": ev.job, "metadata": ev.metadata})
        summary, names = scene_io.apply_refined(ev, target, MANAGER.tmpdir())
        undo_push(label)
        return summary, names

    return apply


class _JobOperator:
    """A job operator runs while another job does: its job waits in the queue."""

    @classmethod
    def poll(cls, context):
        return context.scene is not None


# --------------------------------------------------------------------------- operators


class GEN3D_OT_generate_from_text(_JobOperator, bpy.types.Operator):
    bl_idname = "gen3d.generate_from_text"
    bl_label = "Generate"
    bl_description = "Generate a textured mesh from the prompt; it lands at the 3D cursor, facing the camera"
    bl_options = {"REGISTER"}

    def execute(self, context):
        s = context.scene.gen3d
        job = Job("text_to_3d", "Generate from text", "TEXT")
        prompt = s.prompt.strip()
        if not prompt:
            return report_outcome(self, job, "error", "Type a prompt first: what should be generated?", "input")
        conn = _connection_or_report(self, context, job)
        if conn is None:
            return {"CANCELLED"}
        if s.choose_front and uses_front(s):  # candidates first; GEN3D_OT_use_front lifts the one picked
            job = Job("text_to_image", "Front views", "TEXT")
            job.params = {"prompt": prompt, "seed": int(s.seed), "quality": s.quality, "count": int(s.front_count)}
            if s.negative_prompt.strip():
                job.params["negative_prompt"] = s.negative_prompt.strip()
            job.apply = _apply_fronts(dict(generation_params(s), prompt=prompt))
            return submit_job(self, job, conn)
        job.params = wire_params(s, dict(generation_params(s), prompt=prompt, **text_method_params(s)))
        name = "gen3d_" + scene_io.slug(prompt)
        place = scene_io.placement(context, name, {"kind": job.kind, "prompt": prompt, **generation_params(s)},
                                   s.height, s.topology == "QUADS")
        job.apply = _apply_generated(place, job.label)
        return submit_job(self, job, conn, keep={"label": prompt, "name": name})


def _apply_fronts(params: dict):
    def apply(ev):
        meta = ev.metadata or {}
        seeds = list(meta.get("seeds", []))
        pngs = [ev.attachments.get(f"front_{i}.png") for i in range(len(seeds))]
        if not seeds or not all(pngs):
            raise RuntimeError("the backend sent no front views")
        serial = (MANAGER.fronts or {}).get("serial", 0) + 1
        MANAGER.fronts = {"prompt": params["prompt"], "seeds": seeds, "pngs": pngs, "params": params,
                          "serial": serial}
        return f"{len(seeds)} front views of '{params['prompt']}': pick one in the panel to lift it to 3D", []

    return apply


class GEN3D_OT_use_front(_JobOperator, bpy.types.Operator):
    bl_idname = "gen3d.use_front"
    bl_label = "Lift to 3D"
    bl_description = "Turn this front view into the textured mesh (its seed, the panel's other settings)"
    bl_options = {"REGISTER"}

    index: IntProperty(default=0, min=0, options={"SKIP_SAVE"})

    def execute(self, context):
        s = context.scene.gen3d
        job = Job("text_to_3d", "Generate from text", "TEXT")
        fronts = MANAGER.fronts
        if not fronts or self.index >= len(fronts["seeds"]):
            return report_outcome(self, job, "error", "No such front view: press Generate first", "input")
        conn = _connection_or_report(self, context, job)
        if conn is None:
            return {"CANCELLED"}
        P, _ = wire.require()
        prompt, seed = fronts["prompt"], int(fronts["seeds"][self.index])
        # the settings now in the panel (quality, faces... may have changed since), the front's prompt and seed
        params = dict(generation_params(s), prompt=prompt, seed=seed, **text_method_params(s, chosen=True))
        job.params = wire_params(s, params)
        job.attachments = [P.Attachment("image", "image/png", fronts["pngs"][self.index])]
        name = "gen3d_" + scene_io.slug(prompt)
        info = {"kind": job.kind, "prompt": prompt, "front_view": "chosen", **params}
        place = scene_io.placement(context, name, info, s.height, s.topology == "QUADS")
        job.apply = _apply_generated(place, job.label)
        return submit_job(self, job, conn, keep={"label": prompt, "name": name, "image": fronts["pngs"][self.index]})


class GEN3D_OT_image_to_3d(_JobOperator, bpy.types.Operator):
    bl_idname = "gen3d.image_to_3d"
    bl_label = "Generate from Image"
    bl_description = ("Turn the reference image (the active image empty's, or the one chosen in the panel) into a "
                      "textured mesh at the 3D cursor")
    bl_options = {"REGISTER"}

    def execute(self, context):
        s = context.scene.gen3d
        job = Job("image_to_3d", "Image to 3D", "IMAGE")
        image, source = scene_io.reference_image(context)
        if image is None:
            return report_outcome(self, job, "error", "Choose a reference image in the panel, or make an image "
                                  "empty (Add > Image > Reference) the active object.", "input")
        try:
            png = scene_io.image_to_png(image)
        except scene_io.InputProblem as exc:
            return report_outcome(self, job, "error", str(exc), "input")
        conn = _connection_or_report(self, context, job)
        if conn is None:
            return {"CANCELLED"}
        P, _ = wire.require()
        params = generation_params(s)
        if not s.elevation_auto:  # (Auto: the backend estimates it and says so in the result's metadata)
            params["reference_elevation"] = float(math.degrees(s.reference_elevation))
        if s.prompt.strip():
            params["prompt"] = s.prompt.strip()
        job.params = wire_params(s, params)
        job.attachments = [P.Attachment("image", "image/png", png)]
        name = "gen3d_" + scene_io.slug(bpy.path.display_name(image.name))
        place = scene_io.placement(context, name, {"kind": job.kind, "image": image.name, **params}, s.height,
                                   s.topology == "QUADS")
        job.apply = _apply_generated(place, job.label)
        job.message = f"Reference: {source}"
        return submit_job(self, job, conn, keep={"label": image.name, "name": name, "image": png})


class GEN3D_OT_refine_texture(_JobOperator, bpy.types.Operator):
    bl_idname = "gen3d.refine_texture"
    bl_label = "Refine Texture"
    bl_description = ("Give the active mesh a new texture from the prompt (and optional reference image and cameras); "
                      "its geometry stays as it is")
    bl_options = {"REGISTER"}

    def execute(self, context):
        s = context.scene.gen3d
        job = Job("refine_texture", "Refine texture", "REFINE")
        obj = context.active_object
        prompt = s.refine_prompt.strip()
        if obj is None or obj.type != "MESH":
            return report_outcome(self, job, "error", "Select a mesh: the active object's texture is refined.", "input")
        if not prompt and s.refine_image is None:
            return report_outcome(self, job, "error", "Type a prompt (or choose a reference image) for the new look.",
                                  "input")
        conn = _connection_or_report(self, context, job)
        if conn is None:
            return {"CANCELLED"}
        P, _ = wire.require()
        try:
            export = scene_io.export_mesh(context, obj)
            attachments = [P.Attachment("mesh", "model/gltf-binary", export.glb_bytes)]
            if s.refine_image is not None:
                attachments.append(P.Attachment("image", "image/png", scene_io.image_to_png(s.refine_image)))
            frames, skipped = scene_io.camera_frames(context, s.refine_cameras)
        except scene_io.InputProblem as exc:
            return report_outcome(self, job, "error", str(exc), "input")
        if s.refine_cameras != "NONE" and not frames:
            which = "selected " if s.refine_cameras == "SELECTED" else ""
            return report_outcome(self, job, "error", f"No {which}perspective camera in the scene: add one, or set "
                                  "Cameras to None.", "input")
        if frames:
            attachments.append(P.Attachment("cameras", "application/json", scene_io.cameras_json(frames)))
        params = {"seed": int(s.seed), "texture_size": int(s.texture_size)}
        if prompt:
            params["prompt"] = prompt
        if s.negative_prompt.strip():
            params["negative_prompt"] = s.negative_prompt.strip()
        job.params = params
        job.attachments = attachments
        target = scene_io.RefineTarget(export, context.scene.name, context.view_layer.name,
                                       {"kind": job.kind, "prompt": prompt, "seed": int(s.seed),
                                        "cameras": [f["name"] for f in frames]})
        job.apply = _apply_refined(target, job.label)
        if skipped:
            self.report({"WARNING"}, f"{skipped} non-perspective camera(s) left out")
        return submit_job(self, job, conn)


class GEN3D_OT_cancel(bpy.types.Operator):
    bl_idname = "gen3d.cancel"
    bl_label = "Cancel"
    bl_description = "Stop the running job (or take a queued one out of the queue); nothing of it is added to the scene"
    bl_options = {"REGISTER"}

    queue_index: IntProperty(default=-1, description="-1: the running job; 0, 1, ...: that job of the queue")

    @classmethod
    def poll(cls, context):
        if not MANAGER.busy:
            cls.poll_message_set("No job is running")
            return False
        return True

    def execute(self, context):
        if self.queue_index >= 0:
            if self.queue_index >= len(MANAGER.queue):
                self.report({"WARNING"}, "That job has left the queue")
                return {"CANCELLED"}
            job = MANAGER.queue[self.queue_index]
            MANAGER.cancel(job)
            self.report({"INFO"}, f"{job.label}: taken out of the queue")
            return {"FINISHED"}
        label = MANAGER.job.label
        MANAGER.cancel()
        if MANAGER.is_blocking() and MANAGER.job is not None:
            MANAGER.wait(timeout=60.0)
        self.report({"INFO"}, f"{label}: cancelling" if MANAGER.busy else f"{label}: cancelled")
        return {"FINISHED"}


class GEN3D_OT_dismiss(bpy.types.Operator):
    bl_idname = "gen3d.dismiss"
    bl_label = "Dismiss"
    bl_description = "Hide this message"
    bl_options = {"INTERNAL"}

    def execute(self, context):
        MANAGER.clear_outcome()
        return {"FINISHED"}


class GEN3D_OT_report(bpy.types.Operator):
    """Shows a message in the status bar (used when a job ends in the background timer)."""

    bl_idname = "gen3d.report"
    bl_label = "gen3d Report"
    bl_options = {"INTERNAL"}

    level: EnumProperty(items=(("INFO", "Info", ""), ("WARNING", "Warning", ""), ("ERROR", "Error", "")))
    message: StringProperty()

    def execute(self, context):
        self.report({self.level}, self.message)
        return {"FINISHED"}


# -- the backend's connection (buttons in the add-on's preferences)

class GEN3D_OT_test_connection(bpy.types.Operator):
    bl_idname = "gen3d.test_connection"
    bl_label = "Connect / Test"
    bl_description = "Connect to the backend and show its device and versions (starts it when Auto-start is on)"

    @classmethod
    def poll(cls, context):
        if MANAGER.busy:
            cls.poll_message_set("A job is running")
            return False
        return True

    def execute(self, context):
        return _connect(self, context, force_start=False)


class GEN3D_OT_start_backend(bpy.types.Operator):
    bl_idname = "gen3d.start_backend"
    bl_label = "Start Backend"
    bl_description = "Start a backend on this computer with the Python, preset and port above, and wait until it answers"

    @classmethod
    def poll(cls, context):
        if MANAGER.busy:
            cls.poll_message_set("A job is running")
            return False
        return True

    def execute(self, context):
        return _connect(self, context, force_start=True)


class GEN3D_OT_stop_backend(bpy.types.Operator):
    bl_idname = "gen3d.stop_backend"
    bl_label = "Stop Backend"
    bl_description = "Stop the backend that the add-on started"

    @classmethod
    def poll(cls, context):
        return MANAGER.backend is not None

    def execute(self, context):
        MANAGER.clear_queue()
        if MANAGER.job is not None:
            MANAGER.cancel()
        MANAGER.stop_backend()
        self.report({"INFO"}, "Backend stopped")
        return {"FINISHED"}


# -- the history (the Queue & History panel)


def _entry_or_report(op, entry_id: str):
    entry = MANAGER.history.get(entry_id) if MANAGER.history is not None else None
    if entry is None:
        op.report({"ERROR"}, "That history entry is gone")
    return entry


class GEN3D_OT_history_import(bpy.types.Operator):
    bl_idname = "gen3d.history_import"
    bl_label = "Import Again"
    bl_description = "Place this result again, at the 3D cursor, facing the camera, at the Height setting"
    bl_options = {"REGISTER"}

    entry: StringProperty(options={"SKIP_SAVE"})

    def execute(self, context):
        entry = _entry_or_report(self, self.entry)
        if entry is None:
            return {"CANCELLED"}
        files = MANAGER.history.result(entry.id)
        if not files:
            self.report({"ERROR"}, f"The model of '{entry.label}' is not in the history folder (any more)")
            return {"CANCELLED"}
        place = _place_here(context, entry)
        ev = SimpleNamespace(job=entry.job, metadata=dict(entry.metadata), attachments=files)
        try:
            summary, names = _apply_generated(place, f"Import {entry.label}")(ev)
        except Exception as exc:  # a broken file in the history folder, an importer error
            self.report({"ERROR"}, f"Could not import '{entry.label}': {exc}")
            return {"CANCELLED"}
        MANAGER.history.imported(entry.id)
        self.report({"INFO"}, summary)
        return {"FINISHED"}


class GEN3D_OT_history_regenerate(bpy.types.Operator):
    bl_idname = "gen3d.history_regenerate"
    bl_label = "Regenerate with a New Seed"
    bl_description = "Send this job again with the same settings (and reference image) and a new seed"
    bl_options = {"REGISTER"}

    entry: StringProperty(options={"SKIP_SAVE"})

    def execute(self, context):
        entry = _entry_or_report(self, self.entry)
        if entry is None:
            return {"CANCELLED"}
        panel = PANEL_OF.get(entry.kind)
        job = Job(entry.kind, "Generate from text" if entry.kind == "text_to_3d" else "Image to 3D", panel or "TEXT")
        if panel is None:
            return report_outcome(self, job, "error", f"'{entry.kind}' jobs cannot be sent again", "input")
        attachments = []
        if entry.kind == "image_to_3d":
            png = MANAGER.history.read(entry.image)
            if not png:
                return report_outcome(self, job, "error", "The reference image of this entry is gone from the "
                                      "history folder", "input")
            P, _ = wire.require()
            attachments = [P.Attachment("image", "image/png", png)]
        conn = _connection_or_report(self, context, job)
        if conn is None:
            return {"CANCELLED"}
        old = entry.seed
        seed = random.Random().randrange(2**31 - 1)
        while seed == old:
            seed = random.Random().randrange(2**31 - 1)
        job.params = dict(entry.params, seed=seed)
        job.attachments = attachments
        info = dict(entry_info(entry), seed=seed)
        s = context.scene.gen3d
        place = scene_io.placement(context, entry.name or "gen3d_" + scene_io.slug(entry.label), info, s.height,
                                   entry.params.get("topology") == "quad")
        job.apply = _apply_generated(place, job.label)
        keep = {"label": entry.label, "name": entry.name,
                "image": MANAGER.history.read(entry.image) if entry.kind == "image_to_3d" else None}
        return submit_job(self, job, conn, keep=keep, extras=False)


class GEN3D_OT_history_fetch(bpy.types.Operator):
    bl_idname = "gen3d.history_fetch"
    bl_label = "Fetch Results"
    bl_description = ("Ask the backend for the results of jobs that were still running when Blender closed or the "
                      "connection dropped, and place them at the 3D cursor")
    bl_options = {"REGISTER"}

    def execute(self, context):
        job = Job("text_to_3d", "Fetch results", "HISTORY")
        if MANAGER.history is None or not MANAGER.history.unfinished():
            self.report({"INFO"}, "No result is waiting on the backend")
            return {"CANCELLED"}
        conn = _connection_or_report(self, context, job)
        if conn is None:
            return {"CANCELLED"}
        n = MANAGER.fetch_unfinished(conn, import_result=True)
        if n == 0:
            self.report({"INFO"}, "Those results are being fetched already")
            return {"CANCELLED"}
        if MANAGER.is_blocking():
            return _report_final(self, MANAGER.wait())
        self.report({"INFO"}, f"Fetching {n} result(s)")
        return {"FINISHED"}


class GEN3D_OT_history_remove(bpy.types.Operator):
    bl_idname = "gen3d.history_remove"
    bl_label = "Remove from History"
    bl_description = "Forget this entry and delete its files (objects already in the scene stay)"
    bl_options = {"REGISTER"}

    entry: StringProperty(options={"SKIP_SAVE"})

    def execute(self, context):
        if any(j.history_id == self.entry for j in MANAGER.jobs()):
            self.report({"WARNING"}, "Its job is still running: cancel it first")
            return {"CANCELLED"}
        if _entry_or_report(self, self.entry) is None:
            return {"CANCELLED"}
        MANAGER.history.remove(self.entry)
        _redraw()
        return {"FINISHED"}


# -- the backend's models (preferences, and the Download button of a model_missing error)


def _apply_models(action: str):
    def apply(ev):
        meta = ev.metadata or {}
        if "presets" in meta:
            MANAGER.models_info = meta
            n = sum(1 for p in meta["presets"] if p.get("present"))
            return f"{n} of {len(meta['presets'])} presets have all their models", []
        info = MANAGER.models_info or {"server_preset": None, "presets": []}
        info["presets"] = [meta if p.get("preset") == meta.get("preset") else p for p in info["presets"]]
        if not any(p.get("preset") == meta.get("preset") for p in info["presets"]):
            info["presets"].insert(0, meta)
        MANAGER.models_info = info
        state = "all models present" if meta.get("present") else "models missing"
        verb = {"download": "Downloaded", "remove": "Removed"}.get(action, "Checked")
        return f"{verb}: preset {meta.get('preset')}, {state} ({human_size(meta.get('bytes', 0))} on the backend's disk)", []

    return apply


class GEN3D_OT_models(bpy.types.Operator):
    bl_idname = "gen3d.models"
    bl_label = "Models"
    bl_description = "The backend's models: check which are on its disk, download them, or remove them"
    bl_options = {"REGISTER"}

    action: EnumProperty(items=(("status", "Refresh", "List every preset's models and whether they are on disk"),
                                ("download", "Download", "Fetch the preset's missing models (progress: files, bytes)"),
                                ("remove", "Remove", "Delete the preset's downloaded models from the backend's disk")))
    preset: StringProperty(default="", description="The preset (empty: the backend's own)", options={"SKIP_SAVE"})

    def execute(self, context):
        label = {"status": "Models", "download": "Download models", "remove": "Remove models"}[self.action]
        job = Job("models", label + (f" ({self.preset})" if self.preset else ""), "MODELS")
        conn = _connection_or_report(self, context, job)
        if conn is None:
            return {"CANCELLED"}
        job.params = {"action": self.action, "preset": "*" if self.action == "status" else self.preset}
        job.apply = _apply_models(self.action)
        return submit_job(self, job, conn, extras=False)


# -- the local backend's installer (preferences)


def installed(inst) -> None:
    """The installer ended well: auto-start uses the environment (no Python path to paste)."""
    prefs = get_prefs()
    if hasattr(prefs, "bl_rna"):
        prefs.python_path = ""
        prefs.auto_start = True
    MANAGER.stop_backend()  # a backend started from another Python is not the installed one


class GEN3D_OT_install_backend(bpy.types.Operator):
    bl_idname = "gen3d.install_backend"
    bl_label = "Install Local Backend"
    bl_description = ("Make a Python environment in the extension's user folder with torch (for this computer's GPU) "
                      "and the backend; run again to repair or upgrade it. Needs the package index (internet)")

    @classmethod
    def poll(cls, context):
        if MANAGER.installing():
            cls.poll_message_set("The installer is running")
            return False
        return True

    def execute(self, context):
        if not bpy.app.online_access and "--no-index" not in get_prefs(context).pip_args.split():
            self.report({"ERROR"}, "Blender's online access is off: the installer needs the package index. Allow it "
                                   "in Preferences > System > Network, or install offline from a wheel folder "
                                   "(Extra pip Options: --no-index --find-links FOLDER)")
            return {"CANCELLED"}
        try:
            inst = make_installer(get_prefs(context), os.path.dirname(os.path.abspath(__file__)))
            MANAGER.start_install(inst)
        except (ValueError, RuntimeError, OSError) as exc:
            self.report({"ERROR"}, f"Cannot install: {exc}")
            return {"CANCELLED"}
        if MANAGER.is_blocking():
            while MANAGER.installing():
                MANAGER.tick()
                time.sleep(0.1)
            if inst.state != "done":
                self.report({"ERROR"}, f"{inst.message}: " + " | ".join(inst.log_tail(3)))
                return {"CANCELLED"}
        self.report({"INFO"}, "Installing the local backend (progress in the preferences)"
                    if MANAGER.installing() else inst.message)
        return {"FINISHED"}


class GEN3D_OT_cancel_install(bpy.types.Operator):
    bl_idname = "gen3d.cancel_install"
    bl_label = "Cancel Install"
    bl_description = "Stop the installer (run Install again later to finish it)"

    @classmethod
    def poll(cls, context):
        return MANAGER.installing()

    def execute(self, context):
        MANAGER.installer.cancel()
        _redraw()
        self.report({"WARNING"}, MANAGER.installer.message)
        return {"FINISHED"}


class GEN3D_OT_open_install_log(bpy.types.Operator):
    bl_idname = "gen3d.open_install_log"
    bl_label = "Open Install Log"
    bl_description = "Open the installer's log (every command it ran and what pip said)"

    def execute(self, context):
        path = MANAGER.installer.log_path if MANAGER.installer is not None else install_log()
        if not os.path.isfile(path):
            self.report({"ERROR"}, "No install log yet")
            return {"CANCELLED"}
        bpy.ops.wm.path_open(filepath=path)
        return {"FINISHED"}


def _connect(op, context, force_start: bool):
    prefs = get_prefs(context)
    job = Job(kind=None, label="Connect", panel="PREFS")
    try:
        conn = connection(prefs, force_start=force_start)
    except (ValueError, PermissionError) as exc:
        code = "online_access" if isinstance(exc, PermissionError) else "input"
        return report_outcome(op, job, "error", str(exc), code)
    return submit_job(op, job, conn)



CLASSES = (GEN3D_OT_generate_from_text, GEN3D_OT_image_to_3d, GEN3D_OT_refine_texture, GEN3D_OT_cancel,
           GEN3D_OT_dismiss, GEN3D_OT_report, GEN3D_OT_test_connection, GEN3D_OT_start_backend, GEN3D_OT_stop_backend,
           GEN3D_OT_history_import, GEN3D_OT_history_regenerate, GEN3D_OT_history_fetch, GEN3D_OT_history_remove,
           GEN3D_OT_install_backend, GEN3D_OT_cancel_install, GEN3D_OT_open_install_log, GEN3D_OT_models,
           GEN3D_OT_use_front)
