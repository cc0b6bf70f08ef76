"""The operators: gather inputs, hand a Job to the manager, report how it ended.

In the UI they return at once and the manager's timer follows the job; in
background mode (``bpy.app.background``, where timers never fire) they block
until the result is in the scene, so scripts and tests can drive them.
"""

import math

import bpy
from bpy.props import EnumProperty, StringProperty

from . import scene_io, wire
from .hints import hint_for
from .manager import MANAGER, Job, Outcome
from .prefs import connection, get_prefs


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


def submit_job(op, job: Job, conn) -> set:
    try:
        job.params.update(extra_params(bpy.context.scene.gen3d, job.kind))
    except ValueError as exc:
        return report_outcome(op, job, "error", str(exc), "input")
    try:
        MANAGER.submit(job, conn)
    except RuntimeError as exc:
        return report_outcome(op, job, "error", str(exc), "no_wire" if not wire.available() else "input")
    if MANAGER.job is None:  # ended at once (the backend could not be started)
        return _report_final(op, MANAGER.outcome)
    if MANAGER.is_blocking():
        return _report_final(op, MANAGER.wait())
    op.report({"INFO"}, f"{job.label}: started (progress in the sidebar, Generate tab)")
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


def wire_params(s, params: dict) -> dict:
    """What is sent: with Topology Quads, ``topology: quad`` (the backend makes twice the face budget in
    triangles and says which pairs to join)."""
    out = dict(params)
    if s.topology == "QUADS":
        out["topology"] = "quad"
    return out


def _apply_generated(place, label):
    def apply(ev):
        place.info.update({"job": ev.job, "metadata": ev.metadata})
        summary, names = scene_io.import_generated(ev, place, MANAGER.tmpdir())
        undo_push(label)
        return summary, names

    return apply


def _apply_refined(target, label):
    def apply(ev):
        target.info.update({"job": ev.job, "metadata": ev.metadata})
        summary, names = scene_io.apply_refined(ev, target, MANAGER.tmpdir())
        undo_push(label)
        return summary, names

    return apply


class _JobOperator:
    @classmethod
    def poll(cls, context):
        if MANAGER.busy:
            cls.poll_message_set(f"'{MANAGER.job.label}' is running: wait for it or cancel it")
            return False
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
        job.params = wire_params(s, dict(generation_params(s), prompt=prompt))
        place = scene_io.placement(context, "gen3d_" + scene_io.slug(prompt),
                                   {"kind": job.kind, "prompt": prompt, **generation_params(s)}, s.height,
                                   s.topology == "QUADS")
        job.apply = _apply_generated(place, job.label)
        return submit_job(self, job, conn)


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
        params["reference_elevation"] = float(math.degrees(s.reference_elevation))
        if s.prompt.strip():
            params["prompt"] = s.prompt.strip()
        job.params = wire_params(s, params)
        job.attachments = [P.Attachment("image", "image/png", png)]
        place = scene_io.placement(context, "gen3d_" + scene_io.slug(bpy.path.display_name(image.name)),
                                   {"kind": job.kind, "image": image.name, **params}, s.height,
                                   s.topology == "QUADS")
        job.apply = _apply_generated(place, job.label)
        job.message = f"Reference: {source}"
        return submit_job(self, job, conn)


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
    bl_description = "Stop the running job; nothing of it is added to the scene"
    bl_options = {"REGISTER"}

    @classmethod
    def poll(cls, context):
        if not MANAGER.busy:
            cls.poll_message_set("No job is running")
            return False
        return True

    def execute(self, context):
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
        if MANAGER.job is not None:
            MANAGER.cancel()
        MANAGER.stop_backend()
        self.report({"INFO"}, "Backend stopped")
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
           GEN3D_OT_dismiss, GEN3D_OT_report, GEN3D_OT_test_connection, GEN3D_OT_start_backend, GEN3D_OT_stop_backend)
