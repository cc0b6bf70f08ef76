"""Add-on preferences: where the backend is, how long to wait, encryption keys,
an optional backend the add-on starts itself, and its installer."""

import os
import sys

import bpy
from bpy.props import BoolProperty, EnumProperty, FloatProperty, IntProperty, StringProperty

from . import installer, wire
from .manager import MANAGER, AutoStart, Connection, endpoint_is_local, human_size

ADDON_ID = __package__
DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"


class GEN3D_AddonPreferences(bpy.types.AddonPreferences):
    bl_idname = ADDON_ID

    endpoint: StringProperty(
        name="Endpoint", default=DEFAULT_ENDPOINT,
        description="ZeroMQ address of the gen3d backend (python -m backend serve). "
                    "tcp://127.0.0.1:5555 is a backend on this computer")
    timeout: FloatProperty(
        name="Request Timeout", default=10.0, min=0.5, max=600.0, unit="TIME_ABSOLUTE",
        description="Seconds to wait for the backend to answer before reporting it unreachable")
    server_key: StringProperty(
        name="Server Key",
        description="CurveZMQ public key of a remote backend (40 characters, from its KEYDIR/server.key), "
                    "or the path of that server.key file. Empty for a backend on this computer")
    client_key: StringProperty(
        name="Client Key File", subtype="FILE_PATH",
        description="Optional: this client's key pair (client.key_secret), when the backend only admits known clients")
    auto_start: BoolProperty(
        name="Auto-start Local Backend", default=False,
        description="Start a backend on this computer when a job needs one, and stop it when the add-on is disabled")
    python_path: StringProperty(
        name="Python", subtype="FILE_PATH",
        description="The Python executable that has the backend installed (e.g. the project's .venv/bin/python). "
                    "Empty: the one Install Local Backend made")
    backend_dir: StringProperty(
        name="Working Folder", subtype="DIR_PATH",
        description="Optional: folder to start the backend in (the source checkout, when it is not pip-installed)")
    preset: StringProperty(
        name="Preset", default="default",
        description="Model preset of the started backend: 'default' (real models) or 'tiny' (random weights, for tests)")
    port: IntProperty(name="Port", default=5555, min=1024, max=65535, description="Port of the started backend")
    start_timeout: FloatProperty(
        name="Start Timeout", default=180.0, min=5.0, max=3600.0, unit="TIME_ABSOLUTE",
        description="Seconds to wait for the started backend to answer (loading models takes a while)")
    install_python: StringProperty(
        name="Base Python", subtype="FILE_PATH",
        description="The Python the local backend's environment is made from (3.10 or newer). Empty: Blender's own")
    torch_build: EnumProperty(
        name="torch Build", default="AUTO",
        items=(("AUTO", "Automatic", "The CUDA build when an NVIDIA GPU is present, the CPU build otherwise"),
               ("CUDA", "CUDA (NVIDIA GPU)", "torch built for CUDA 12.6, from download.pytorch.org"),
               ("CPU", "CPU Only", "torch without GPU support, from download.pytorch.org (small, slow jobs)"),
               ("INDEX", "Package Index", "Whatever torch build the package index (or pip's configuration) serves: "
                                          "for mirrors and offline wheel folders")),
        description="Which build of torch the installer puts into the environment")
    pip_args: StringProperty(
        name="Extra pip Options",
        description="Given to every pip call of the installer, e.g. --index-url URL, --find-links DIR, --proxy URL")
    client_token: StringProperty(
        name="Client Token", subtype="PASSWORD",
        description="Who this Blender is to the backend: jobs are visible only to the token that submitted them. "
                    "Made on first use and kept with the preferences; give another Blender the same token to share jobs")

    def draw(self, context):
        draw_preferences(self, self.layout)


class _Defaults:
    """Preference values when the add-on's preferences are not reachable
    (e.g. its module was registered by hand)."""

    endpoint = DEFAULT_ENDPOINT
    timeout = 10.0
    server_key = ""
    client_key = ""
    auto_start = False
    python_path = ""
    backend_dir = ""
    preset = "default"
    port = 5555
    start_timeout = 180.0
    install_python = ""
    torch_build = "AUTO"
    pip_args = ""


def get_prefs(context=None):
    context = context or bpy.context
    addon = context.preferences.addons.get(ADDON_ID)
    if addon is not None and addon.preferences is not None:
        return addon.preferences
    return _Defaults()


def curve_keys(prefs):
    """CurveKeys from the preferences, or None. Raises ValueError with a readable message."""
    key = (prefs.server_key or "").strip()
    if not key:
        return None
    _, C = wire.require()
    client_file = bpy.path.abspath(prefs.client_key) if prefs.client_key else None
    if len(key) == 40 and not os.path.exists(key):
        if client_file:
            import zmq.auth

            try:
                pub, sec = zmq.auth.load_certificate(client_file)
            except Exception as exc:
                raise ValueError(f"could not read the client key file {client_file!r}: {exc}") from None
            return C.CurveKeys(key, pub.decode(), sec.decode() if sec else None)
        return C.CurveKeys(key)
    path = bpy.path.abspath(key)
    if not os.path.isfile(path):
        raise ValueError(f"the server key is neither a 40-character key nor an existing file: {key!r}")
    try:
        return C.CurveKeys.from_files(path, client_file)
    except Exception as exc:  # zmq.auth raises plain exceptions on malformed files
        raise ValueError(f"could not read the key file {path!r}: {exc}") from None


def env_dir() -> str:
    """Where Install Local Backend makes its environment: ``backend-env`` in the extension's user folder
    (kept across upgrades of the extension), the config folder for a legacy add-on."""
    try:
        base = bpy.utils.extension_path_user(__package__, create=True)
    except (ValueError, TypeError, AttributeError):
        base = bpy.utils.user_resource("CONFIG", path="gen3d", create=True)
    return os.path.join(base, "backend-env")


def install_log() -> str:
    return env_dir() + "-install.log"


def backend_python(prefs) -> str:
    """The Python auto-start uses: the one in the preferences, else the installed environment's."""
    if prefs.python_path:
        return bpy.path.abspath(prefs.python_path)
    return installer.installed_python(env_dir()) or ""


_gpu = None


def detected_torch_build() -> str:
    """What Automatic means on this machine (nvidia-smi is asked once per session)."""
    global _gpu
    if _gpu is None:
        _gpu = installer.has_nvidia_gpu()
    return "cuda" if _gpu else "cpu"


def make_installer(prefs, addon_dir: str) -> installer.Installer:
    """The installer for the current settings. Raises ValueError when there is nothing to install."""
    import shlex

    source = installer.backend_source(addon_dir)
    if source is None:
        raise ValueError("this add-on has no backend to install (its zip was built with --no-backend-wheel)")
    python = bpy.path.abspath(prefs.install_python) if prefs.install_python else sys.executable
    if not os.path.isfile(python):
        raise ValueError(f"the base Python {python!r} does not exist")
    build = installer.resolve_torch_build(prefs.torch_build.lower(), detect=lambda: detected_torch_build() == "cuda")
    try:
        extra = shlex.split(prefs.pip_args or "")
    except ValueError as exc:
        raise ValueError(f"Extra pip Options: {exc}") from None
    steps = installer.plan(python, env_dir(), source, build, pip_args=extra)
    return installer.Installer(steps, install_log())


def backend_cwd(prefs) -> str:
    """Where the started backend runs: the Working Folder, else the installed environment's folder for its
    Python (so that ``python -m backend`` finds the installed package, not a folder of Blender's)."""
    if prefs.backend_dir:
        return bpy.path.abspath(prefs.backend_dir)
    if not prefs.python_path and installer.installed_python(env_dir()):
        return env_dir()
    return ""


def auto_start_spec(prefs) -> AutoStart:
    return AutoStart(python=backend_python(prefs),
                     port=int(prefs.port), preset=prefs.preset.strip() or "default",
                     cwd=backend_cwd(prefs), start_timeout=float(prefs.start_timeout))


def client_token(prefs) -> str:
    """The add-on's client token, made on first use (call from an operator, not from a draw)."""
    token = prefs.client_token.strip()
    if not token or (wire.P is not None and not wire.P.TOKEN_RE.match(token)):
        import secrets

        token = prefs.client_token = secrets.token_urlsafe(24)
    return token


def connection(prefs, force_start: bool = False) -> Connection:
    """The Connection for a job. Raises ValueError (bad key) or PermissionError (online access off)."""
    spec = auto_start_spec(prefs) if (prefs.auto_start or force_start) else None
    endpoint = f"tcp://127.0.0.1:{spec.port}" if spec else (prefs.endpoint.strip() or DEFAULT_ENDPOINT)
    if not endpoint_is_local(endpoint) and not bpy.app.online_access:
        raise PermissionError(f"Blender's online access is off, so the add-on does not connect to {endpoint}.")
    return Connection(endpoint=endpoint, timeout=float(prefs.timeout), curve=None if spec else curve_keys(prefs),
                      auto_start=spec, token=client_token(prefs))


def draw_status_lines(layout, outcome) -> None:
    from .ui import draw_outcome

    draw_outcome(layout, outcome)


def draw_preferences(prefs, layout) -> None:
    col = layout.column()
    if not wire.available():
        box = col.box()
        box.alert = True
        box.label(text=wire.IMPORT_ERROR or "pyzmq is missing", icon="ERROR")
    box = col.box()
    box.label(text="Backend", icon="URL")
    sub = box.column()
    sub.enabled = not prefs.auto_start
    sub.prop(prefs, "endpoint")
    sub.prop(prefs, "server_key")
    sub.prop(prefs, "client_key")
    box.prop(prefs, "client_token")
    box.prop(prefs, "timeout")
    if not prefs.auto_start and not endpoint_is_local(prefs.endpoint) and not bpy.app.online_access:
        warn = box.column()
        warn.alert = True
        warn.label(text="Online access is off: remote backends are not contacted.", icon="ERROR")
        warn.label(text="Allow it in Preferences > System > Network.")

    draw_installer(prefs, col.box())

    box = col.box()
    box.prop(prefs, "auto_start")
    sub = box.column()
    sub.prop(prefs, "python_path")
    sub.prop(prefs, "backend_dir")
    row = sub.row()
    row.prop(prefs, "preset")
    row.prop(prefs, "port")
    sub.prop(prefs, "start_timeout")
    row = box.row()
    row.operator("gen3d.start_backend", icon="PLAY")
    row.operator("gen3d.stop_backend", icon="PAUSE")
    proc = MANAGER.backend
    if proc is not None:
        state = f"running (pid {proc.pid})" if proc.alive() else f"exited (code {proc.returncode})"
        box.label(text=f"Started backend: {state} on {proc.endpoint}", icon="CONSOLE")
        if not proc.alive():
            for line in proc.log_tail(6):
                box.label(text=line[:200])

    draw_models(col.box())

    box = col.box()
    row = box.row()
    row.operator("gen3d.test_connection", icon="PLUGIN")
    job = MANAGER.job
    if job is not None and job.panel == "PREFS":
        box.label(text=job.message or job.stage, icon="SORTTIME")
    info = MANAGER.server_info
    if info:
        dev = info.get("device") or {}
        box.label(text=f"Connected: {info.get('endpoint')}", icon="CHECKMARK")
        box.label(text=f"Server gen3d {info.get('server', '?')}, protocol {info.get('protocol', '?')}, "
                       f"preset {info.get('preset', '?')}")
        box.label(text=f"Device: {dev.get('device', '?')}" + (f" ({dev['gpu_name']})" if dev.get("gpu_name") else ""))
        versions = info.get("versions") or {}
        if versions:
            box.label(text="Versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())[:6]))
        kinds = sorted((info.get("job_kinds") or {}).keys())
        box.label(text="Jobs: " + (", ".join(kinds) or "none"))
        missing = [k for k in ("text_to_3d", "image_to_3d", "refine_texture") if k not in kinds]
        if missing:
            box.label(text="This backend cannot run: " + ", ".join(missing), icon="INFO")
    out = MANAGER.outcome
    if out is not None and out.panel == "PREFS":
        draw_status_lines(box, out)


def draw_models(box) -> None:
    """The backend's models per preset (from the last Refresh), with Download / Remove, and a running
    download's progress (files and bytes) with Cancel."""
    row = box.row()
    row.label(text="Models (on the backend's disk)", icon="FILE_3D")
    row.operator("gen3d.models", text="Refresh", icon="FILE_REFRESH").action = "status"
    job = next((j for j in MANAGER.jobs() if j.panel == "MODELS"), None)
    if job is not None:
        sub = box.box()
        if job is MANAGER.job and job.phase not in ("queued", "connecting"):
            sub.progress(factor=float(job.fraction), type="BAR", text=f"{job.label}  {int(round(100 * job.fraction))}%")
            sub.operator("gen3d.cancel", text="Cancel", icon="CANCEL").queue_index = -1
        else:
            sub.label(text=f"{job.label}: waiting", icon="SORTTIME")
        if job.message:
            sub.label(text=job.message[:120])
    out = MANAGER.outcome
    if out is not None and out.panel == "MODELS" and job is None:
        draw_status_lines(box, out)
    info = MANAGER.models_info
    if not info:
        box.label(text="Press Refresh to see which models the backend has.", icon="INFO")
        return
    for rep in info.get("presets", []):
        sub = box.box()
        own = rep.get("preset") == info.get("server_preset")
        head = sub.row()
        head.label(text=f"{rep.get('preset')}" + ("  (this backend's)" if own else ""),
                   icon="CHECKMARK" if rep.get("present") else "ERROR")
        models = rep.get("models", [])
        if not rep.get("present"):
            op = head.operator("gen3d.models", text="Download", icon="IMPORT")
            op.action, op.preset = "download", rep.get("preset", "")
        if any(m.get("present") and m.get("removable") for m in models):
            op = head.operator("gen3d.models", text="Remove", icon="TRASH")
            op.action, op.preset = "remove", rep.get("preset", "")
        for m in models:
            state = human_size(m.get("bytes", 0)) if m.get("present") else "missing"
            sub.label(text=f"{m.get('role')}: {m.get('name')}  {state}")
        if rep.get("description"):
            sub.label(text=rep["description"][:120])


def draw_installer(prefs, box) -> None:
    box.label(text="Local Backend", icon="PACKAGE")
    inst = MANAGER.installer
    py = installer.installed_python(env_dir())
    if inst is not None and inst.state == installer.RUNNING:
        n = len(inst.steps)
        box.progress(factor=float(inst.fraction), type="BAR", text=f"Step {inst.index + 1}/{n}: {inst.step.title}")
        if inst.package:
            box.label(text=f"Package: {inst.package}", icon="SORTTIME")
        row = box.row()
        row.operator("gen3d.cancel_install", text="Cancel", icon="CANCEL")
        row.operator("gen3d.open_install_log", text="Open Log", icon="TEXT")
        return
    if py:
        box.label(text=f"Installed: {py}", icon="CHECKMARK")
        if prefs.python_path:
            box.label(text="(not used: the Python below is set)", icon="INFO")
    else:
        box.label(text="Not installed: Install makes an environment with torch and the backend (a few GB).",
                  icon="INFO")
    col = box.column()
    col.use_property_split = True
    col.prop(prefs, "install_python")
    col.prop(prefs, "torch_build")
    if prefs.torch_build == "AUTO":
        col.label(text="This computer: " + ("NVIDIA GPU found, CUDA build" if detected_torch_build() == "cuda"
                                            else "no NVIDIA GPU found, CPU build"))
    col.prop(prefs, "pip_args")
    row = box.row()
    row.scale_y = 1.3
    row.operator("gen3d.install_backend", text="Repair / Upgrade Local Backend" if py else "Install Local Backend",
                 icon="IMPORT")
    if inst is not None and inst.state in (installer.FAILED, installer.CANCELLED):
        sub = box.column()
        sub.alert = inst.state == installer.FAILED
        sub.label(text=inst.message, icon="ERROR" if inst.state == installer.FAILED else "CANCEL")
        if inst.state == installer.FAILED:
            for line in inst.log_tail(6):
                sub.label(text=line[:200])
    elif inst is not None and inst.state == installer.DONE:
        box.label(text=f"{inst.message}: Auto-start uses it.", icon="CHECKMARK")
    if inst is not None or os.path.isfile(install_log()):
        box.operator("gen3d.open_install_log", text="Open Install Log", icon="TEXT")


CLASSES = (GEN3D_AddonPreferences,)
