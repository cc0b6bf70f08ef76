"""The Blender add-on in real Blender sessions (the bpy module, one subprocess
per session, isolated user folders) against a live backend.

The backend is chosen by GEN3D_ADDON_BACKEND (see tests/addon_helpers.py):
stand-in job kinds in-process by default, ``real`` for ``python -m backend
serve --preset tiny``. Checks that only hold for the stand-ins (exact mesh,
metadata they echo) are skipped against a real backend.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import platform
import shutil
import socket
import sys
import time

import numpy as np
import pytest

from addon_helpers import ROOT, BlenderSessions, find_cached_wheel, icosphere, start_backend
from gen3d_wire.client import BackendError, Client, new_token

pytestmark = [
    pytest.mark.blender,
    pytest.mark.skipif(importlib.util.find_spec("bpy") is None, reason="needs the bpy module (pip install bpy==5.0.1)"),
]

# a real backend on CPU takes longer than the stand-ins; the image session alone takes ~65 s on 2 cores
# the real tiny backend unless told otherwise, as addon_helpers.start_backend decides
SESSION_TIMEOUT = 240 if os.environ.get("GEN3D_ADDON_BACKEND", "real").strip() == "stub" else 900
PANELS = ("GEN3D_PT_generate_text", "GEN3D_PT_image_to_3d", "GEN3D_PT_refine_texture")
OPERATORS = ("GEN3D_OT_generate_from_text", "GEN3D_OT_image_to_3d", "GEN3D_OT_refine_texture", "GEN3D_OT_cancel")


KINDS = ("text_to_3d", "image_to_3d", "refine_texture")


@pytest.fixture(scope="module")
def backend_server(tmp_path_factory):
    """(endpoint, is_stub, kinds offered) of the backend the live tests use (see GEN3D_ADDON_BACKEND)."""
    endpoint, stop, is_stub = start_backend(tmp_path_factory.mktemp("addon_jobs"))
    try:
        with Client(endpoint, timeout=10) as c:
            offered = set(c.capabilities()["job_kinds"])
        yield endpoint, is_stub, offered
    finally:
        stop()


def need(backend_server, *kinds):
    """(endpoint, is_stub) for a test that runs ``kinds``; skipped while the backend lacks one of them."""
    endpoint, is_stub, offered = backend_server
    missing = [k for k in kinds if k not in offered]
    if missing:
        pytest.skip(f"the backend at {endpoint} does not offer {missing} yet")
    return endpoint, is_stub


# Small step counts for the real tiny backend (sent through Scene.gen3d.extra_params, as a TD would)
FAST = {"text_to_3d": {"views": 4, "view_steps": 3, "steps": 2, "iterations": 40, "distill_steps": 8, "refine_steps": 2,
                       "dream_steps": 10},
        "image_to_3d": {"views": 4, "view_steps": 3, "iterations": 40, "distill_steps": 8, "refine_steps": 2},
        "refine_texture": {"steps": 3}}


def fast(stub: bool) -> str:
    return "" if stub else json.dumps(FAST)


@pytest.fixture(scope="module")
def backend_endpoint(backend_server):
    return backend_server[0]


@pytest.fixture
def blender(tmp_path):
    return BlenderSessions(tmp_path / "blender")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- install from the built zip


@pytest.fixture(scope="module")
def built_zip(tmp_path_factory):
    """gen3d-<version>.zip built offline from a wheel folder holding the pinned Linux cp311 pyzmq wheel
    (taken from the build cache; fetched into it once when absent)."""
    import build_addon

    if not (sys.platform.startswith("linux") and platform.machine() == "x86_64" and sys.version_info[:2] == (3, 11)):
        pytest.skip("the install test bundles the Linux x86_64 cp311 wheel")
    name = build_addon.wheel_name("3.11", "linux-x64")
    cached = find_cached_wheel(name)
    if cached is None:
        try:
            cached = build_addon.fetch_wheels({name: ("3.11", "linux-x64")}, build_addon.default_cache(), quiet=True)[name]
        except SystemExit as exc:
            pytest.skip(f"pyzmq wheel not cached and not downloadable: {exc}")
    wheels = tmp_path_factory.mktemp("wheels")
    shutil.copy(cached, wheels / name)
    out = tmp_path_factory.mktemp("dist")
    assert build_addon.main(["--out", str(out), "--wheels", str(wheels), "--platform", "linux-x64",
                             "--python", "3.11", "-q"]) == 0
    zips = list(out.glob("gen3d-*.zip"))
    assert len(zips) == 1
    return zips[0]


INSTALL_SCRIPT = r'''
zip_path = ARGS["zip"]
res = bpy.ops.extensions.package_install_files(filepath=zip_path, repo="user_default", enable_on_install=True)
mod = addon_module()
mgr = mod.manager.MANAGER
site = os.path.join(bpy.utils.user_resource("EXTENSIONS"), ".local", "lib", "python3.11", "site-packages")
out = dict(
    result=sorted(res), enabled=ADDON in bpy.context.preferences.addons,
    panels={n: hasattr(bpy.types, n) for n in ARGS["panels"]},
    operators={n: hasattr(bpy.types, n) for n in ARGS["operators"]},
    ops_callable=[bpy.ops.gen3d.generate_from_text.poll(), bpy.ops.gen3d.cancel.poll()],
    scene_prop=hasattr(bpy.types.Scene, "gen3d") and bpy.context.scene.gen3d.quality,
    wire_module=mod.wire.C.__name__, wheel_unpacked=os.path.isdir(os.path.join(site, "zmq")),
    addon_dir=os.path.dirname(mod.__file__),
)
# the installed add-on talks to the backend with its bundled wire code
p = prefs()
p.endpoint = ARGS["endpoint"]
r = bpy.ops.gen3d.test_connection()
out["connect"] = sorted(r)
out["kinds"] = sorted((mgr.server_info or {}).get("job_kinds", {}))
# a job in flight (non-blocking, as in the UI) when the add-on is disabled
mgr.blocking = False
bpy.context.scene.gen3d.prompt = "a teapot"
bpy.ops.gen3d.generate_from_text()
timer = mod.manager._timer
out["timer_while_running"] = bpy.app.timers.is_registered(timer)
t0 = time.time()
while mgr.job is not None and mgr.job.job_id is None and time.time() - t0 < 10:
    timer(); time.sleep(0.02)
out["job_id"] = mgr.job.job_id if mgr.job else None
out["token"] = p.client_token
names = [c for c in dir(bpy.types) if c.startswith(("GEN3D_", "gen3d"))]
out["registered_before"] = names
res = bpy.ops.preferences.addon_disable(module=ADDON)
out["disable"] = sorted(res)
out["left"] = dict(
    classes=[c for c in dir(bpy.types) if c.startswith(("GEN3D_", "gen3d"))],
    scene_prop=hasattr(bpy.types.Scene, "gen3d"),
    timer=bpy.app.timers.is_registered(timer),
    job=mgr.job is not None, watcher=mgr._watcher is not None, probe=mgr._probe is not None,
    backend=mgr.backend is not None, enabled=ADDON in bpy.context.preferences.addons,
)
emit(**out)
'''


def test_built_zip_installs_registers_and_unregisters_cleanly(blender, built_zip, backend_server):
    backend_endpoint, _, offered = backend_server
    import zipfile

    with zipfile.ZipFile(built_zip) as zf:
        names = set(zf.namelist())
        manifest = zf.read("blender_manifest.toml").decode()
    assert {"blender_manifest.toml", "__init__.py", "gen3d_wire/client.py", "gen3d_wire/protocol.py"} <= names
    assert any(n.startswith("wheels/pyzmq-") for n in names)
    assert 'id = "gen3d"' in manifest and "./wheels/pyzmq-" in manifest and "[permissions]" in manifest
    assert not any("__pycache__" in n for n in names)

    r = blender.run(INSTALL_SCRIPT, {"zip": str(built_zip), "endpoint": backend_endpoint, "panels": PANELS,
                                     "operators": OPERATORS})
    d = r.data
    assert d["result"] == ["FINISHED"] and d["enabled"]
    assert all(d["panels"].values()), d["panels"]
    assert all(d["operators"].values()), d["operators"]
    assert d["ops_callable"] == [True, False]  # nothing running: Cancel is greyed out
    assert d["scene_prop"] == "standard"
    assert d["wire_module"] == "bl_ext.user_default.gen3d.gen3d_wire.client", "the bundled wire code must be used"
    assert d["wheel_unpacked"], "Blender should have installed the bundled pyzmq wheel"
    assert d["connect"] == ["FINISHED"]
    assert set(d["kinds"]) == offered
    assert d["timer_while_running"]
    assert d["job_id"] or "text_to_3d" not in offered
    assert d["disable"] == ["FINISHED"]
    assert d["left"] == {"classes": [], "scene_prop": False, "timer": False, "job": False, "watcher": False,
                         "probe": False, "backend": False, "enabled": False}, d["left"]
    assert "Traceback" not in r.stderr, r.stderr
    if d["job_id"]:
        # the job left in flight is a whole standard-quality one: on the shared backend it held the one worker for
        # 408 s on a slow machine while the next test's job queued behind it, past that session's 240 s
        with Client(backend_endpoint, timeout=10, token=d["token"]) as c:
            c.cancel(d["job_id"])
            t0 = time.time()
            while c.status(d["job_id"])["state"] not in ("cancelled", "done", "failed") and time.time() - t0 < 60:
                time.sleep(0.2)
            assert c.status(d["job_id"])["state"] in ("cancelled", "done"), c.status(d["job_id"])


# --------------------------------------------------------------------------- the local backend's installer

INSTALLER_SCRIPT = r'''
import signal
from types import SimpleNamespace
res = bpy.ops.extensions.package_install_files(filepath=ARGS["zip"], repo="user_default", enable_on_install=True)
mod = addon_module()
mgr = mod.manager.MANAGER
p = prefs()
p.torch_build = "INDEX"  # whatever pip's configuration serves: here the CPU build from a local wheel folder
mgr.blocking = False     # as in the UI: the operator returns at once, the timer runs the steps
refused = None
try:
    bpy.ops.gen3d.install_backend()
except RuntimeError as exc:
    refused = str(exc)
bpy.context.preferences.system.use_online_access = True  # the user allows it (Preferences > System > Network)

def drawn():
    log = []
    class Rec:
        def __init__(self): object.__setattr__(self, "attrs", {})
        def __setattr__(self, k, v): self.attrs[k] = v
        def label(self, text="", icon="NONE", **k): log.append(["label", text, icon])
        def prop(self, data, name, **k): log.append(["prop", name])
        def operator(self, idname, text=None, **k): log.append(["operator", idname, text]); return Rec()
        def progress(self, factor=0.0, type="BAR", text=""): log.append(["progress", factor, text])
        def row(self, **k): return self
        column = box = row
    mod.prefs.draw_installer(p, Rec())
    return log

def pump(until, limit):
    t0 = time.time()
    while not until() and time.time() - t0 < limit:
        mod.manager._timer(); time.sleep(0.05)
    return time.time() - t0

out = dict(installed=sorted(res), refused=refused, zip_wheel=mod.installer.backend_source(os.path.dirname(mod.__file__)),
           before=drawn())
# a broken step: pip refuses an option, at the torch step; the panel says which step and shows the log's end
p.pip_args = "--no-such-pip-option"
t0 = time.time()
res = bpy.ops.gen3d.install_backend()
op_seconds = time.time() - t0
pump(lambda: not mgr.installing(), 120)
inst = mgr.installer
out["broken"] = dict(result=sorted(res), op_seconds=op_seconds, state=inst.state, step=inst.step.name,
                     message=inst.message, drawn=drawn(), log=inst.log_path)
# cancelled in the middle of the torch step: its processes are gone
p.pip_args = ""
bpy.ops.gen3d.install_backend()
pump(lambda: mgr.installer.index >= 1 and mgr.installer.package, 120)
inst = mgr.installer
running = dict(step=inst.step.name, package=inst.package, drawn=drawn())
pid = inst.proc.pid if inst.proc else None
bpy.ops.gen3d.cancel_install()
time.sleep(0.5)
try:
    os.killpg(pid, 0); alive = True
except (ProcessLookupError, TypeError):
    alive = False
out["cancel"] = dict(running=running, state=inst.state, message=inst.message, alive=alive)
# the whole install, then auto-start runs the installed backend with no Python path set
t0 = time.time()
bpy.ops.gen3d.install_backend()
pump(lambda: not mgr.installing(), ARGS["wait"])
inst = mgr.installer
out["install"] = dict(state=inst.state, seconds=time.time() - t0, message=inst.message, tail=inst.log_tail(5),
                      auto_start=p.auto_start, python_path=p.python_path, drawn=drawn(),
                      env_python=mod.installer.installed_python(mod.prefs.env_dir()))
p.preset = "tiny"; p.port = ARGS["port"]; p.start_timeout = 120.0
mgr.blocking = None
res = bpy.ops.gen3d.test_connection()
info = mgr.server_info or {}
out["connect"] = dict(result=sorted(res), python=mgr.backend.python if mgr.backend else None,
                      cwd=mgr.backend.cwd if mgr.backend else None, env_dir=mod.prefs.env_dir(),
                      preset=info.get("preset"), kinds=sorted(info.get("job_kinds") or {}),
                      message=mgr.outcome.message if mgr.outcome else None)
bpy.ops.preferences.addon_disable(module=ADDON)
emit(**out)
'''


def test_install_local_backend_from_the_zip_then_auto_start_uses_it(blender, built_zip):
    port = free_port()
    r = blender.run(INSTALLER_SCRIPT, {"zip": str(built_zip), "port": port, "wait": 900}, timeout=1200)
    d = r.data
    assert d["installed"] == ["FINISHED"] and d["zip_wheel"].endswith(".whl") and "backend_wheel" in d["zip_wheel"]
    assert ["operator", "gen3d.install_backend", "Install Local Backend"] in d["before"]
    assert d["refused"] and "online access is off" in d["refused"]  # Blender's setting is honoured
    b = d["broken"]
    assert b["result"] == ["FINISHED"] and b["op_seconds"] < 1.0, "the installer must not block the UI"
    assert b["state"] == "failed" and b["step"] == "torch" and "'torch'" in b["message"]
    labels = [x[1] for x in b["drawn"] if x[0] == "label"]
    assert b["message"] in labels and any("no-such-pip-option" in t for t in labels), labels  # the log's tail
    assert ["operator", "gen3d.open_install_log", "Open Install Log"] in b["drawn"]
    c = d["cancel"]
    assert c["running"]["step"] == "torch" and c["running"]["package"]
    prog = [x for x in c["running"]["drawn"] if x[0] == "progress"]
    assert prog and "Step 2/4" in prog[0][2] and ["operator", "gen3d.cancel_install", "Cancel"] in c["running"]["drawn"]
    assert c["state"] == "cancelled" and not c["alive"] and "torch" in c["message"]
    i = d["install"]
    assert i["state"] == "done", i["tail"]
    assert i["auto_start"] and i["python_path"] == "" and i["env_python"]
    assert any(x[0] == "label" and x[1].startswith("Installed:") for x in i["drawn"])
    ready = [line for line in i["tail"] if line.startswith("gen3d backend ready")]  # (not the "$ command" line)
    # the installed wheel, not this checkout (the Blender session runs in the repository's folder)
    assert ready and "site-packages" in ready[0] and str(ROOT / "backend") not in ready[0], i["tail"]
    k = d["connect"]
    assert k["result"] == ["FINISHED"] and k["python"] == i["env_python"] and k["preset"] == "tiny", k
    assert k["cwd"] == k["env_dir"], "the started backend runs in the environment's folder, not Blender's"
    assert {"text_to_3d", "image_to_3d", "refine_texture"} <= set(k["kinds"])


# --------------------------------------------------------------------------- the model manager

MODELS_SCRIPT = r'''
enable_source_addon()
mod = addon_module()
mgr = mod.manager.MANAGER
p = prefs(); p.endpoint = ARGS["tiny"]; p.timeout = 10.0
mgr.blocking = False

def drawn():
    log = []
    class Rec:
        def __init__(self, path=""): object.__setattr__(self, "attrs", {}); object.__setattr__(self, "path", path)
        def __setattr__(self, k, v):
            self.attrs[k] = v
            log.append(["set", self.path, k, v])
        def label(self, text="", icon="NONE", **k): log.append(["label", text, icon])
        def prop(self, data, name, **k): log.append(["prop", name])
        def operator(self, idname, text=None, **k): log.append(["operator", idname, text]); return Rec(idname)
        def progress(self, factor=0.0, type="BAR", text=""): log.append(["progress", factor, text])
        def row(self, **k): return Rec(self.path)
        column = box = row
    mod.prefs.draw_models(Rec())
    return log

def run(action, preset="", limit=120):
    seen = []
    res = bpy.ops.gen3d.models(action=action, preset=preset)
    t0 = time.time()
    while (mgr.job is not None or mgr.queue) and time.time() - t0 < limit:
        mod.manager._timer()
        j = mgr.job
        if j is not None and j.phase == "running" and j.message and (not seen or seen[-1][1] != j.message):
            seen.append([j.fraction, j.message, drawn()])
        time.sleep(0.02)
    return sorted(res), seen

def tiny():
    return next(r for r in mgr.models_info["presets"] if r["preset"] == "tiny")

out = dict(empty=drawn())
out["status"] = run("status")[0]
out["before"] = dict(tiny=tiny(), server=mgr.models_info["server_preset"],
                     presets=[r["preset"] for r in mgr.models_info["presets"]], drawn=drawn())
res, seen = run("download", "tiny")
out["download"] = dict(result=res, seen=seen, tiny=tiny(), outcome=mgr.outcome.state, message=mgr.outcome.message,
                       drawn=drawn())
res, _ = run("remove", "tiny")
out["remove"] = dict(result=res, tiny=tiny(), message=mgr.outcome.message)
# a backend whose models are missing and cannot be downloaded (offline): the job says so, with a Download button
p.endpoint = ARGS["offline"]
s = bpy.context.scene.gen3d
s.prompt = "a chair"
bpy.ops.gen3d.generate_from_text()
t0 = time.time()
while mgr.job is not None and time.time() - t0 < 60:
    mod.manager._timer(); time.sleep(0.02)
o = mgr.outcome
log = []
class Rec2:
    def __init__(self, path=""): object.__setattr__(self, "path", path)
    def __setattr__(self, k, v): log.append(["set", self.path, k, v])
    def label(self, text="", icon="NONE", **k): log.append(["label", text, icon])
    def operator(self, idname, text=None, **k): log.append(["operator", idname, text]); return Rec2(idname)
    def row(self, **k): return Rec2(self.path)
    column = box = row
mod.ui.draw_outcome(Rec2(), o)
out["missing"] = dict(state=o.state, code=o.code, message=o.message, drawn=log)
res, _ = run("download", "")  # the Download button: the backend's own preset
o = mgr.outcome
out["offline"] = dict(result=res, state=o.state, code=o.code, message=o.message)
emit(**out)
'''


def test_model_manager_downloads_and_removes_a_preset_and_a_missing_model_offers_download(blender, tmp_path):
    from conftest import ServerProcess

    home = tmp_path / "backend_home"
    tiny = ServerProcess(["--jobs-dir", str(home / "jobs"), "--preset", "tiny"], env={"GEN3D_HOME": str(home)})
    offline = ServerProcess(["--jobs-dir", str(tmp_path / "jobs2"), "--preset", "default"],
                            env={"GEN3D_HOME": str(tmp_path / "home2"), "HF_HUB_OFFLINE": "1",
                                 "HF_HOME": str(tmp_path / "hf")})
    try:
        d = blender.run(MODELS_SCRIPT, {"tiny": tiny.endpoint, "offline": offline.endpoint}, timeout=300).data
    finally:
        tiny.stop()
        offline.stop()
    assert any(x[0] == "label" and "Refresh" in x[1] for x in d["empty"])
    b = d["before"]
    assert d["status"] == ["FINISHED"] and b["server"] == "tiny" and b["presets"][0] == "tiny"
    assert {"default", "stable-zero123", "tiny"} <= set(b["presets"])
    assert [m["present"] for m in b["tiny"]["models"]] == [False, False]
    labels = [x[1] for x in b["drawn"] if x[0] == "label"]
    assert "text_to_image: tiny:stable-diffusion  missing" in labels
    assert "text_to_image: stable-diffusion-v1-5/stable-diffusion-v1-5  missing" in labels
    downloads = [x for x in b["drawn"] if x[0] == "set" and x[1] == "gen3d.models" and x[2] == "preset"]
    assert "tiny" in [x[3] for x in downloads]
    dl = d["download"]
    assert dl["result"] == ["FINISHED"] and dl["outcome"] == "done" and "all models present" in dl["message"]
    msgs = [m[1] for m in dl["seen"]]
    assert any("1/2 files" in m and "MB" in m for m in msgs) and any("2/2 files" in m for m in msgs), msgs
    assert any(x[0] == "progress" for x in dl["seen"][0][2]), "the running download draws a progress bar"
    assert any(x[:2] == ["operator", "gen3d.cancel"] for x in dl["seen"][0][2])
    assert all(m["present"] and m["bytes"] > 100_000 for m in dl["tiny"]["models"])
    paths = [m["path"] for m in dl["tiny"]["models"]]
    assert all(pth.startswith(str(home)) for pth in paths), paths  # on the backend's disk
    assert any(x[0] == "label" and "tiny:zero123" in x[1] and "MB" in x[1] for x in dl["drawn"])
    rm = d["remove"]
    assert rm["result"] == ["FINISHED"] and [m["present"] for m in rm["tiny"]["models"]] == [False, False]
    assert not any(os.path.exists(pth) for pth in paths), "Remove frees the disk"
    mi = d["missing"]
    assert mi["state"] == "error" and mi["code"] == "model_missing" and "stable-diffusion-v1-5" in mi["message"]
    assert ["operator", "gen3d.models", "Download Models"] in mi["drawn"]
    assert ["set", "gen3d.models", "action", "download"] in mi["drawn"]
    off = d["offline"]
    assert off["state"] == "error" and off["code"] == "model_missing" and "HF_HUB_OFFLINE" in off["message"], off


# --------------------------------------------------------------------------- live jobs (blocking, background mode)

TEXT_SCRIPT = r'''
enable_source_addon()
p = prefs(); p.endpoint = ARGS["endpoint"]; p.timeout = 10.0
scene = bpy.context.scene
clear_objects(keep=("Camera",))
cam = bpy.data.objects["Camera"]
cam.location = (3.0, -1.0, 1.5)
scene.camera = cam
scene.cursor.location = (1.0, 2.0, 0.5)
s = scene.gen3d
s.extra_params = ARGS.get("extra", "")
s.prompt = "a red wooden chair"; s.seed = 3; s.quality = "draft"; s.faces = 5000; s.texture_size = "512"
s.height = 1.7
before = set(object_names())
bpy.ops.ed.undo_push(message="before")
t0 = time.time()
res = bpy.ops.gen3d.generate_from_text()
seconds = time.time() - t0
new = [bpy.data.objects[n] for n in object_names() if n not in before]
obj = bpy.context.view_layer.objects.active
mw = [list(r) for r in obj.matrix_world]
world = [list(obj.matrix_world @ v.co) for v in obj.data.vertices]
mat = obj.active_material
imgs = [n.image for n in mat.node_tree.nodes if n.type == "TEX_IMAGE" and n.image] if mat else []
bsdf = next(n for n in mat.node_tree.nodes if n.type == "BSDF_PRINCIPLED")
mgr = addon_module().manager.MANAGER
emit(result=sorted(res), seconds=seconds, new=[o.name for o in new], types=[o.type for o in new],
     active=obj.name, selected=sorted(o.name for o in bpy.context.selected_objects),
     collections=[c.name for c in obj.users_collection], matrix=mw, world=world,
     cursor=list(scene.cursor.location), camera=list(cam.location),
     material=mat.name if mat else None, images=[i.name for i in imgs], packed=[bool(i.packed_file) for i in imgs],
     base_color_linked=bool(bsdf.inputs["Base Color"].links),
     normal_map_node=(bsdf.inputs["Normal"].links[0].from_node.type if bsdf.inputs["Normal"].links else None),
     roughness=bsdf.inputs["Roughness"].default_value, material_setting=s.material,
     image_size=list(imgs[0].size) if imgs else None,
     info=json.loads(obj.get("gen3d", "{}")), outcome=mgr.outcome.state, message=mgr.outcome.message,
     token=p.client_token, seed_property=obj.get("gen3d_seed"), height_property=obj.get("gen3d_height"),
     **undo_redo(before))
'''


def test_generate_from_text_adds_a_textured_object_at_the_cursor_facing_the_camera(blender, backend_server):
    endpoint, stub = need(backend_server, "text_to_3d")
    r = blender.run(TEXT_SCRIPT, {"endpoint": endpoint, "extra": fast(stub)}, timeout=SESSION_TIMEOUT)
    d = r.data
    assert d["result"] == ["FINISHED"], d
    assert d["outcome"] == "done" and "Imported" in d["message"]
    assert len(d["new"]) >= 1 and "MESH" in d["types"]
    assert d["active"].startswith("gen3d_a_red_wooden") and d["selected"] == sorted(d["new"])
    assert d["collections"] == ["Collection"]  # the active collection of the default scene
    assert d["material"] and d["images"] and all(d["packed"]) and d["base_color_linked"]
    # the PBR material (the panel's default): the normal map wired into the Principled BSDF
    assert d["material_setting"] == "pbr" and d["normal_map_node"] == "NORMAL_MAP"
    # the prompt's material word sets the roughness (the stand-in backend: always 0.8)
    expected = 0.8 if stub else 0.7
    assert abs(d["roughness"] - expected) < 1e-6, d["roughness"]
    if not stub:
        assert d["info"]["metadata"]["material"]["from"] == "wooden"
    # placement: at the cursor, rotated about Z so that the front (-Y) points at the camera
    cur, cam = np.array(d["cursor"]), np.array(d["camera"])
    angle = math.atan2(cam[0] - cur[0], -(cam[1] - cur[1]))
    m = np.array(d["matrix"])
    c, s = math.cos(angle), math.sin(angle)
    expected = np.array([[c, -s, 0, cur[0]], [s, c, 0, cur[1]], [0, 0, 1, cur[2]], [0, 0, 0, 1]])
    np.testing.assert_allclose(m, expected, atol=1e-5)
    front = m[:3, :3] @ np.array([0.0, -1.0, 0.0])
    to_cam = (cam - cur)[:2] / np.linalg.norm((cam - cur)[:2])
    np.testing.assert_allclose(front[:2], to_cam, atol=1e-5)
    # size and pivot: it stands on the cursor, centred on it, as tall as the panel's Height
    world = np.array(d["world"])
    lo, hi = world.min(0), world.max(0)
    assert abs(lo[2] - cur[2]) < 1e-4, (lo, cur)
    assert abs((hi[2] - lo[2]) - 1.7) < 0.017, (lo, hi)
    local = (world - cur) @ m[:3, :3]  # in the object's own frame (turned toward the camera): centred on its origin
    np.testing.assert_allclose(0.5 * (local.min(0) + local.max(0))[:2], 0.0, atol=1e-4)
    assert d["seed_property"] == 3 and abs(d["height_property"] - 1.7) < 1e-6
    assert d["info"]["prompt"] == "a red wooden chair" and d["info"]["job"]
    assert d["undo_restores"] and d["redo_restores"], "one undo step must remove the whole result"
    # the job belongs to the token the add-on made and keeps in its preferences, and to no one else
    with Client(endpoint, timeout=10, token=d["token"]) as owner:
        assert owner.status(d["info"]["job"])["state"] == "done"
    with Client(endpoint, timeout=10, token=new_token()) as stranger, pytest.raises(BackendError) as info:
        stranger.status(d["info"]["job"])
    assert info.value.code == "unknown_job"
    if stub:
        # the stand-in's icosphere, stood on its base, sized, rotated and moved: every vertex where it should be
        verts, _ = icosphere(2)
        bottom = np.array([*(0.5 * (verts.min(0) + verts.max(0)))[:2], verts[:, 2].min()])
        scale = 1.7 / np.ptp(verts[:, 2])
        R = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
        want = ((verts - bottom) * scale) @ R.T + cur
        dist = np.linalg.norm(world[:, None, :] - want[None, :, :], axis=2).min(axis=1)
        assert dist.max() < 1e-4
        meta = d["info"]["metadata"]
        assert meta["seed"] == 3 and meta["quality"] == "draft" and meta["texture_size"] == 512 and meta["refine"]
        assert d["image_size"] == [32, 32]


IMAGE_SCRIPT = r'''
enable_source_addon()
p = prefs(); p.endpoint = ARGS["endpoint"]
scene = bpy.context.scene
clear_objects(keep=("Camera",))
scene.cursor.location = (0.0, 0.0, 0.0)
s = scene.gen3d
s.extra_params = ARGS.get("extra", "")
w, h = 64, 48
img = bpy.data.images.new("reference", w, h, alpha=True)
px = np.zeros((h, w, 4), np.float32)
px[..., 0] = 1.0; px[..., 1] = 0.5; px[..., 3] = 0.0
px[10:30, 20:40, 3] = 1.0          # an opaque square on a transparent background
px[h - 1, :, 2] = 1.0              # Blender's first row is the bottom one: blue bottom row
img.pixels.foreach_set(px.ravel())
s.image = img
s.elevation_auto = False  # an explicit elevation is sent as it is
s.reference_elevation = math.radians(15.0)
out = {}
res = bpy.ops.gen3d.image_to_3d()
mgr = addon_module().manager.MANAGER
obj = bpy.context.view_layer.objects.active
out["first"] = dict(result=sorted(res), name=obj.name, info=json.loads(obj.get("gen3d", "{}")), outcome=mgr.outcome.state)
# an image empty as the active object wins over the panel's image
img2 = bpy.data.images.new("empty_image", 40, 40, alpha=False)
img2.pixels.foreach_set(np.full(40 * 40 * 4, 0.25, np.float32))
bpy.ops.object.empty_add(type="IMAGE", location=(5, 5, 0))
empty = bpy.context.active_object
empty.data = img2
s.topology = "QUADS"
s.faces = 600
s.elevation_auto = True  # not sent: the backend estimates it
res = bpy.ops.gen3d.image_to_3d()
obj = bpy.context.view_layer.objects.active
sizes = [p.loop_total for p in obj.data.polygons]
uv = obj.data.uv_layers.active.data
texels = sorted({(round(obj.data.vertices[l.vertex_index].co.x, 4), round(obj.data.vertices[l.vertex_index].co.y, 4),
                  round(obj.data.vertices[l.vertex_index].co.z, 4), round(uv[i].uv[0], 4), round(uv[i].uv[1], 4))
                 for i, l in enumerate(obj.data.loops)})
out["second"] = dict(result=sorted(res), name=obj.name, info=json.loads(obj.get("gen3d", "{}")), sizes=sizes,
                     corners=len(texels), triangles=sum(n - 2 for n in sizes))
emit(**out)
'''


def test_image_to_3d_sends_the_reference_image_pixels(blender, backend_server):
    endpoint, stub = need(backend_server, "image_to_3d")
    d = blender.run("import math\nimport numpy as np\n" + IMAGE_SCRIPT, {"endpoint": endpoint, "extra": fast(stub)}, timeout=SESSION_TIMEOUT).data
    first, second = d["first"], d["second"]
    assert first["result"] == ["FINISHED"] and first["outcome"] == "done"
    assert first["name"].startswith("gen3d_reference")
    assert second["result"] == ["FINISHED"] and second["name"].startswith("gen3d_empty_image")
    assert first["info"]["image"] == "reference" and second["info"]["image"] == "empty_image"
    # the second asked for quads at a budget of 600: fewer than 1200 triangles made, joined in the backend's pairs
    sizes = np.array(second["sizes"])
    assert second["info"]["topology"] == "quads" and second["info"]["faces"] == 600
    assert set(sizes) <= {3, 4} and second["info"]["quads"] == (sizes == 4).sum()
    meta = second["info"]["metadata"]
    made = meta["faces"]
    assert second["triangles"] == made and made <= 1200  # every triangle kept, none re-cut
    assert meta["quads"] == (sizes == 4).sum() and meta["polygons"] == len(sizes)  # every pair joined
    print(f"quads: {made} triangles -> {len(sizes)} faces, {(sizes == 4).mean():.2f} quads")
    assert (sizes == 4).sum() > 0
    if stub:  # the stand-in's icosphere has few UV seams: nearly all of it pairs
        assert (sizes == 4).mean() >= 0.8
    else:  # the real backend's triangles pair into the budget's polygons, within 5 %
        assert abs(len(sizes) - 600) <= 30, len(sizes)
    if stub:
        m1, m2 = first["info"]["metadata"], second["info"]["metadata"]
        assert m1["image_size"] == [64, 48] and m1["image_mode"] == "RGBA"
        assert m1["reference_elevation"] == pytest.approx(15.0)
        mean = np.array(m1["image_mean"])
        opaque = 20 * 20 / (64 * 48)
        assert mean[3] == pytest.approx(255 * opaque, abs=0.6)
        assert mean[0] == pytest.approx(255, abs=0.6)
        assert m2["image_size"] == [40, 40] and m2["image_mode"] == "RGB"  # no real alpha: RGB
        assert m2["reference_elevation"] is None  # Auto: left to the backend
        assert m2["image_mean"][0] == pytest.approx(round(0.25 * 255), abs=1)  # byte image: sent as stored
    else:
        assert second["info"]["metadata"]["elevation"]["given"] is False
        el = first["info"]["metadata"]["elevation"]
        assert el["given"] is True and el["value"] == pytest.approx(15.0)


REFINE_SCRIPT = r'''
import numpy as np
enable_source_addon()
p = prefs(); p.endpoint = ARGS["endpoint"]
scene = bpy.context.scene
clear_objects(keep=("Camera",))
s = scene.gen3d
s.extra_params = ARGS.get("extra", "")
out = {}

def positions(o):
    a = np.empty(len(o.data.vertices) * 3, np.float32)
    o.data.vertices.foreach_get("co", a)
    return a

def uvs(o, name):
    a = np.empty(len(o.data.loops) * 2, np.float32)
    o.data.uv_layers[name].data.foreach_get("uv", a)
    return a.reshape(-1, 2)

# a transformed cube with UVs and an image-textured material
bpy.ops.mesh.primitive_cube_add(size=1.0, location=(2.0, -1.0, 0.5), rotation=(0.3, 0.0, 0.7))
cube = bpy.context.active_object
cube.scale = (1.0, 2.0, 0.5)
old_img = bpy.data.images.new("old_texture", 16, 16)
old_img.pixels.foreach_set(np.tile([0.2, 0.2, 0.9, 1.0], 256).astype(np.float32))
mat = bpy.data.materials.new("cube_mat")
if bpy.app.version < (5, 0, 0):
    mat.use_nodes = True
tex = mat.node_tree.nodes.new("ShaderNodeTexImage"); tex.image = old_img
bsdf = next(n for n in mat.node_tree.nodes if n.type == "BSDF_PRINCIPLED")
mat.node_tree.links.new(tex.outputs["Color"], bsdf.inputs["Base Color"])
cube.data.materials.append(mat)
cam2 = bpy.data.objects.new("Cam2", bpy.data.cameras.new("Cam2")); scene.collection.objects.link(cam2)
cam2.location = (0, -6, 1)
bpy.context.view_layer.update()
bpy.ops.object.select_all(action="DESELECT")
cam2.select_set(True); cube.select_set(True); bpy.context.view_layer.objects.active = cube
s.refine_prompt = "green moss"; s.refine_cameras = "SELECTED"; s.texture_size = "256"
pos_before = positions(cube)
uv_before = uvs(cube, cube.data.uv_layers.active.name)
bbox = [list(cube.matrix_world @ v.co) for v in cube.data.vertices]
bpy.ops.ed.undo_push(message="before refine")
res = bpy.ops.gen3d.refine_texture()
bpy.ops.ed.undo()
c = bpy.data.objects["Cube"]
out["undo"] = dict(uv_layers=[l.name for l in c.data.uv_layers], material=c.active_material.name)
bpy.ops.ed.redo()
# undo/redo reload the data: fetch fresh references
scene = bpy.context.scene
s = scene.gen3d
s.extra_params = ARGS.get("extra", "")
cube = bpy.data.objects["Cube"]
cam2 = bpy.data.objects["Cam2"]
old_img = bpy.data.images["old_texture"]
mgr = addon_module().manager.MANAGER
new_mat = cube.active_material
bsdf = next(n for n in new_mat.node_tree.nodes if n.type == "BSDF_PRINCIPLED")
img = bsdf.inputs["Base Color"].links[0].from_node.image
ipx = np.empty(img.size[0] * img.size[1] * 4, np.float32); img.pixels.foreach_get(ipx)
out["cube"] = dict(
    result=sorted(res), outcome=mgr.outcome.state, message=mgr.outcome.message,
    positions_equal=bool(np.array_equal(pos_before, positions(cube))),
    polygons=len(cube.data.polygons), uv_layers=[l.name for l in cube.data.uv_layers],
    active_uv=cube.data.uv_layers.active.name, uv_same=bool(np.allclose(uvs(cube, "gen3d"), uv_before, atol=1e-6)),
    material=new_mat.name, slots=[sl.material.name for sl in cube.material_slots], old_mat_exists="cube_mat" in bpy.data.materials,
    old_image_users=bpy.data.images["old_texture"].users,
    old_image_in_new_mat=any(n.type == "TEX_IMAGE" and n.image == old_img for n in new_mat.node_tree.nodes),
    image=img.name, packed=bool(img.packed_file), image_mean=[float(x) for x in ipx.reshape(-1, 4).mean(0)],
    uvmap_node=[n.uv_map for n in new_mat.node_tree.nodes if n.type == "UVMAP"],
    info=json.loads(cube.get("gen3d", "{}")), bbox=bbox, cam2=[list(r) for r in cam2.matrix_world],
    selected=sorted(o.name for o in bpy.context.selected_objects), active=bpy.context.view_layer.objects.active.name,
)
# a triangle mesh without UVs and without material: per-corner UVs from the backend land on its loops
bpy.ops.mesh.primitive_ico_sphere_add(subdivisions=2, radius=0.7, location=(-2, 0, 0))
ico = bpy.context.active_object
while ico.data.uv_layers:
    ico.data.uv_layers.remove(ico.data.uv_layers[0])
s.refine_cameras = "NONE"; s.refine_prompt = "orange clay"
pos_before = positions(ico)
res = bpy.ops.gen3d.refine_texture()
out["ico"] = dict(result=sorted(res), outcome=mgr.outcome.state, message=mgr.outcome.message,
                  positions_equal=bool(np.array_equal(pos_before, positions(ico))),
                  uv_layers=[l.name for l in ico.data.uv_layers], slots=[sl.material.name for sl in ico.material_slots],
                  info=json.loads(ico.get("gen3d", "{}")))
uv = uvs(ico, "gen3d")
loc = np.empty(len(ico.data.loops) * 3, np.float32)
out["ico"]["uv_in_unit_square"] = bool(uv.min() >= 0.0 and uv.max() <= 1.0 and uv.std() > 0.05)
# topology-changing modifier and no UVs: refused before sending, scene untouched
bpy.ops.mesh.primitive_cube_add(size=1.0, location=(0, 3, 0))
sub = bpy.context.active_object
sub.data.uv_layers.remove(sub.data.uv_layers[0])
sub.modifiers.new("subsurf", "SUBSURF")
n_before = len(bpy.data.objects)
try:
    bpy.ops.gen3d.refine_texture()
    out["modifier_error"] = None
except RuntimeError as exc:
    out["modifier_error"] = str(exc)
out["modifier_untouched"] = len(sub.data.uv_layers) == 0 and len(bpy.data.objects) == n_before
emit(**out)
'''


def test_refine_texture_changes_the_texture_and_keeps_the_geometry(blender, backend_server):
    endpoint, stub = need(backend_server, "refine_texture")
    d = blender.run(REFINE_SCRIPT, {"endpoint": endpoint, "extra": fast(stub)}, timeout=SESSION_TIMEOUT).data
    cube = d["cube"]
    assert cube["result"] == ["FINISHED"] and cube["outcome"] == "done", cube["message"]
    assert d["undo"] == {"uv_layers": ["UVMap"], "material": "cube_mat"}  # one undo step reverts the refinement
    assert cube["positions_equal"] and cube["polygons"] == 6
    assert cube["uv_layers"] == ["UVMap", "gen3d"] and cube["active_uv"] == "gen3d"
    assert cube["material"] == "Cube_gen3d" and cube["slots"] == ["Cube_gen3d"]
    assert cube["old_mat_exists"] and cube["old_image_users"] >= 1 and cube["old_image_in_new_mat"]
    assert cube["image"] == "Cube_gen3d" and cube["packed"]
    assert cube["uvmap_node"] == ["gen3d"]
    assert cube["selected"] == ["Cube"] and cube["active"] == "Cube"
    ico = d["ico"]
    assert ico["result"] == ["FINISHED"] and ico["outcome"] == "done", ico["message"]
    assert ico["positions_equal"] and ico["uv_layers"] == ["gen3d"] and ico["slots"] == ["Icosphere_gen3d"]
    assert ico["uv_in_unit_square"]
    assert d["modifier_error"] and "modifiers" in d["modifier_error"] and d["modifier_untouched"]
    if stub:
        meta = cube["info"]["metadata"]
        assert meta["uv_source"] == "input" and cube["uv_same"]  # the backend kept the mesh's own UVs
        assert meta["had_texture"] and meta["had_uv"] and meta["triangles"] == 12 and not meta["has_image"]
        assert meta["prompt"] == "green moss" and meta["texture_size"] == 256
        assert len(meta["cameras"]) == 1 and meta["cameras"][0]["name"] == "Cam2"
        np.testing.assert_allclose(meta["cameras"][0]["transform_matrix"], cube["cam2"], atol=1e-6)
        for k in ("lens", "sensor_width", "sensor_height", "sensor_fit", "w", "h"):
            assert k in meta["cameras"][0]
        mean = cube["image_mean"]
        assert mean[1] > 0.5 and mean[0] < 0.3  # the new (green) texture, not the old blue one
        assert ico["info"]["metadata"]["uv_source"] == "xatlas"


# --------------------------------------------------------------------------- cancel, through the UI's own path

CANCEL_SCRIPT = r'''
import numpy as np
enable_source_addon()
p = prefs(); p.endpoint = ARGS["endpoint"]
mod = addon_module()
mgr = mod.manager.MANAGER
mgr.blocking = False           # what the UI does: the operator returns at once, a timer follows the job
timer = mod.manager._timer
scene = bpy.context.scene
scene.gen3d.prompt = "a slow statue"
before = object_names()
t0 = time.time()
res = bpy.ops.gen3d.generate_from_text()
op_seconds = time.time() - t0
out = dict(result=sorted(res), op_seconds=op_seconds, timer_registered=bpy.app.timers.is_registered(timer))
# Blender would call the timer; background mode has no event loop, so call it as Blender would
intervals = []
t0 = time.time()
while time.time() - t0 < ARGS["wait"]:
    intervals.append(timer())
    if mgr.job is not None and mgr.job.fraction >= ARGS["min_fraction"] and (mgr.job.preview_png or not ARGS["stub"]):
        break
    time.sleep(0.05)
job = mgr.job
out["running"] = dict(stage=job.stage, fraction=job.fraction, has_preview=bool(job.preview_png), job_id=job.job_id,
                      phase=job.phase)
# what the panel shows right now
calls = []
class Rec:
    def __init__(self): object.__setattr__(self, "attrs", {})
    def __setattr__(self, k, v): self.attrs[k] = v
    def _add(self, *a): calls.append(list(a)); return Rec()
    def label(self, text="", icon="NONE", **k): return self._add("label", text, icon)
    def prop(self, data, name, **k): return self._add("prop", name)
    def operator(self, idname, **k): return self._add("operator", idname)
    def progress(self, factor=0.0, type="BAR", text=""): return self._add("progress", factor, text)
    def template_icon(self, icon_value=0, scale=1.0): return self._add("template_icon", icon_value)
    def row(self, **k): return Rec()
    column = box = split = row
    def panel(self, idname, default_closed=False): return Rec(), None
class FakePanel:
    layout = Rec()
mod.ui.GEN3D_PT_generate_text.draw(FakePanel(), bpy.context)
out["drawn"] = calls
res = bpy.ops.gen3d.cancel()
out["cancel"] = sorted(res)
t0 = time.time()
while mgr.job is not None and time.time() - t0 < 20:
    intervals.append(timer())
    time.sleep(0.05)
out["last_interval"] = intervals[-1]
out["outcome"] = mgr.outcome.state
out["message"] = mgr.outcome.message
out["objects_same"] = object_names() == before
out["timer_after"] = bpy.app.timers.is_registered(timer)
# the backend agrees
client = mod.wire.C.Client(ARGS["endpoint"], timeout=5, token=prefs().client_token)  # the add-on's jobs are its token's
out["backend_state"] = client.status(out["running"]["job_id"])["state"]
client.close()
emit(**out)
'''


def test_cancel_mid_job_leaves_the_scene_as_it_was(blender, backend_server):
    endpoint, stub = need(backend_server, "text_to_3d")
    args = {"endpoint": endpoint, "stub": stub, "wait": 15 if stub else 300, "min_fraction": 0.25 if stub else 0.01}
    r = blender.run(CANCEL_SCRIPT, args, timeout=SESSION_TIMEOUT)
    d = r.data
    assert d["result"] == ["FINISHED"] and d["op_seconds"] < 0.5, "the UI path must not block"
    assert d["timer_registered"]
    run = d["running"]
    assert run["phase"] == "running" and run["job_id"] and run["fraction"] >= args["min_fraction"]
    assert run["has_preview"] or not stub
    kinds = [c[0] for c in d["drawn"]]
    progress = [c for c in d["drawn"] if c[0] == "progress"]
    assert progress and progress[0][1] == pytest.approx(run["fraction"]) and "%" in progress[0][2]
    assert ("template_icon" in kinds or not stub) and ["operator", "gen3d.cancel"] in d["drawn"]
    assert d["cancel"] == ["FINISHED"]
    assert d["outcome"] == "cancelled" and d["objects_same"]
    assert d["last_interval"] is None  # the timer callback asks Blender to remove it
    assert d["backend_state"] == "cancelled"


# --------------------------------------------------------------------------- text to 3D with a choice of front

FRONTS_SCRIPT = r'''
enable_source_addon()
mod = addon_module()
mgr = mod.manager.MANAGER
p = prefs(); p.endpoint = ARGS["endpoint"]; p.timeout = 10.0
scene = bpy.context.scene
clear_objects(keep=("Camera",))
s = scene.gen3d
s.extra_params = ARGS.get("extra", "")
s.prompt = "a red chair"; s.seed = 20; s.quality = "draft"; s.faces = 2000; s.texture_size = "256"
s.choose_front = True; s.front_count = 3
before = set(object_names())
res = bpy.ops.gen3d.generate_from_text()
f = mgr.fronts
out = dict(first=dict(result=sorted(res), new=sorted(set(object_names()) - before), seeds=f["seeds"],
                      pngs=[x[:8] == b"\x89PNG\r\n\x1a\n" for x in f["pngs"]], message=mgr.outcome.message))
log = []
class Rec:
    def __init__(self, path=""): object.__setattr__(self, "path", path)
    def __setattr__(self, k, v): log.append(["set", self.path, k, v])
    def label(self, text="", icon="NONE", **k): log.append(["label", text, icon])
    def prop(self, data, name, **k): log.append(["prop", name])
    def operator(self, idname, text=None, **k): log.append(["operator", idname, text]); return Rec(idname)
    def template_icon(self, icon_value=0, scale=1.0): log.append(["template_icon"])
    def progress(self, **k): log.append(["progress"])
    def panel(self, idname, default_closed=False): return Rec(), None
    def row(self, **k): return Rec(self.path)
    column = box = grid_flow = row
class FakePanel:
    layout = Rec()
mod.ui.GEN3D_PT_generate_text.draw(FakePanel(), bpy.context)
out["drawn"] = log
res = bpy.ops.gen3d.use_front(index=1)
new = [bpy.data.objects[n] for n in object_names() if n not in before and bpy.data.objects[n].type == "MESH"]
info = json.loads(new[0].get("gen3d", "{}")) if new else {}
e = mgr.history.entries()[0]
out["lift"] = dict(result=sorted(res), objects=[o.name for o in new], seed=new[0].get("gen3d_seed") if new else None,
                   front=info.get("front_view"), backend_front=(info.get("metadata") or {}).get("front_view"),
                   timings=sorted(((info.get("metadata") or {}).get("timings") or {})),
                   entry=dict(label=e.label, seed=e.seed, state=e.state, kind=e.kind))
# score distillation without its anchor: no front views to choose from, whatever Choose Front First says
s.text_method = "SDS"; s.sds_anchor = False
log = []  # (the first drawing stays in out["drawn"]; Rec writes to whatever list this name holds)
mod.ui.GEN3D_PT_generate_text.draw(FakePanel(), bpy.context)
out["drawn_sds"] = log[:]
ops = mod.operators
out["sds_params"] = dict(plain=ops.text_method_params(s), plain_chosen=ops.text_method_params(s, chosen=True))
# anchored (the default): the fronts come back, and lifting one distils the text prior anchored on it
s.sds_anchor = True
log = []
mod.ui.GEN3D_PT_generate_text.draw(FakePanel(), bpy.context)
out["drawn_anchor"] = log[:]
out["sds_params"]["anchored"] = ops.text_method_params(s)
before = set(object_names())
res = bpy.ops.gen3d.use_front(index=0)
new = [bpy.data.objects[n] for n in object_names() if n not in before and bpy.data.objects[n].type == "MESH"]
info = json.loads(new[0].get("gen3d", "{}")) if new else {}
meta = info.get("metadata") or {}
e = mgr.history.entries()[0]
out["sds"] = dict(result=sorted(res), objects=len(new), method=meta.get("method"), anchor=meta.get("anchor"),
                  front=meta.get("front_view"), prior=meta.get("prior"), sent=e.params.get("method"),
                  sent_anchor=e.params.get("anchor"), message=mgr.outcome.message)
emit(**out)
'''


def test_text_to_3d_with_a_choice_of_front_views(blender, backend_server):
    endpoint, stub = need(backend_server, "text_to_image", "text_to_3d")
    d = blender.run(FRONTS_SCRIPT, {"endpoint": endpoint, "extra": fast(stub)}, timeout=SESSION_TIMEOUT).data
    first = d["first"]
    assert first["result"] == ["FINISHED"] and first["new"] == [], "the candidates add nothing to the scene"
    assert first["seeds"] == [20, 21, 22] and first["pngs"] == [True] * 3 and "pick one" in first["message"]
    drawn = d["drawn"]
    assert sum(1 for x in drawn if x[0] == "template_icon") == 3
    assert [x[2] for x in drawn if x[:2] == ["operator", "gen3d.use_front"]] == ["Lift seed 20", "Lift seed 21",
                                                                                   "Lift seed 22"]
    assert [x[3] for x in drawn if x[:3] == ["set", "gen3d.use_front", "index"]] == [0, 1, 2]
    assert ["operator", "gen3d.generate_from_text", "Generate Fronts"] in drawn
    lift = d["lift"]
    assert lift["result"] == ["FINISHED"] and len(lift["objects"]) == 1 and lift["seed"] == 21
    assert lift["front"] == "chosen" and lift["backend_front"] == "chosen"  # the backend lifted the image it got
    assert stub or ("text_to_image" not in lift["timings"] and "novel_views" in lift["timings"]), lift["timings"]
    assert lift["entry"] == {"label": "a red chair", "seed": 21, "state": "done", "kind": "text_to_3d"}
    # Method: Score Distillation without its anchor makes no front view: Choose Front First greys out
    plain = d["drawn_sds"]
    assert ["operator", "gen3d.generate_from_text", "Generate"] in plain and ["prop", "text_method"] in plain
    assert ["prop", "sds_anchor"] in plain and ["set", "", "enabled", False] in plain
    assert d["sds_params"]["plain"] == {"method": "sds", "anchor": "none"}
    assert d["sds_params"]["plain_chosen"] == {"method": "sds", "anchor": "front"}  # a chosen front always anchors
    # anchored, the fronts apply again, and the chosen one anchors the distillation
    anchored = d["drawn_anchor"]
    assert ["operator", "gen3d.generate_from_text", "Generate Fronts"] in anchored
    assert ["set", "", "enabled", True] in anchored and d["sds_params"]["anchored"] == {"method": "sds", "anchor": "front"}
    sds = d["sds"]
    assert sds["result"] == ["FINISHED"] and sds["objects"] == 1, sds
    assert sds["sent"] == "sds" and sds["sent_anchor"] == "front", sds
    assert stub or (sds["method"] == "sds" and sds["anchor"] == "front" and sds["front"] == "chosen"
                    and sds["prior"] == ["stable_diffusion", "zero123"]), sds


# --------------------------------------------------------------------------- queue and history

QUEUE_SCRIPT = r'''
enable_source_addon()
mod = addon_module()
mgr = mod.manager.MANAGER
p = prefs(); p.endpoint = ARGS["endpoint"]; p.timeout = 10.0
scene = bpy.context.scene
clear_objects(keep=("Camera",))
scene.camera = bpy.data.objects["Camera"]
s = scene.gen3d
s.extra_params = ARGS.get("extra", "")
s.quality = "draft"; s.faces = 2000; s.texture_size = "256"; s.height = 1.0
ended = []
orig_notify = mgr.notify
mgr.notify = lambda o: (ended.append([o.state, o.message, list(o.objects)]), orig_notify(o))
mgr.blocking = False  # as in the UI: the operators return at once, the timer follows the jobs
prompts = ["a red chair", "a blue vase", "a green lamp"]
results = []
for i, prompt in enumerate(prompts):
    s.prompt = prompt; s.seed = 10 + i; s.height = 0.5 + 0.5 * i
    scene.cursor.location = (3.0 * i, 0.0, 0.25 * i)
    t0 = time.time()
    results.append([sorted(bpy.ops.gen3d.generate_from_text()), time.time() - t0])
out = dict(submitted=results, phases=[j.phase for j in mgr.jobs()], queued=len(mgr.queue))
t0 = time.time()
while (mgr.job is not None or mgr.queue) and time.time() - t0 < ARGS["wait"]:
    mod.manager._timer(); time.sleep(0.02)
out["ended"] = ended
def described(o):
    co = [o.matrix_world @ v.co for v in o.data.vertices]
    zs = [c.z for c in co]
    return dict(name=o.name, prompt=o.get("gen3d_prompt"), seed=o.get("gen3d_seed"), min_z=min(zs),
                height=max(zs) - min(zs))
out["objects"] = [described(o) for o in bpy.data.objects if o.type == "MESH" and o.get("gen3d_prompt")]
hist = mgr.history
out["entries"] = [dict(id=e.id, label=e.label, state=e.state, seed=e.seed, job=e.job, imports=e.imports,
                       glb=bool(hist.file(e.glb)), thumb=bool(hist.file(e.thumb))) for e in hist.entries()]
# Import again: the oldest entry, at the cursor where it is now, at the Height setting
first = hist.entries()[-1]
scene.cursor.location = (0.0, 6.0, 1.0); s.height = 2.0
before = set(object_names())
res = bpy.ops.gen3d.history_import(entry=first.id)
new = [bpy.data.objects[n] for n in object_names() if n not in before and bpy.data.objects[n].type == "MESH"]
out["reimport"] = dict(result=sorted(res), objects=[described(o) for o in new], imports=hist.get(first.id).imports)
# Regenerate with a new seed; Blender closes while it runs: not cancelled, kept in the history with its job id
mgr.blocking = False
res = bpy.ops.gen3d.history_regenerate(entry=first.id)
newest = hist.entries()[0]
out["regenerate"] = dict(result=sorted(res), label=newest.label, seed=newest.seed, old_seed=first.seed,
                         same_settings={k: v for k, v in newest.params.items() if k != "seed"} ==
                                       {k: v for k, v in first.params.items() if k != "seed"})
t0 = time.time()
while mgr.job is not None and mgr.job.job_id is None and time.time() - t0 < 20:
    mod.manager._timer(); time.sleep(0.02)
out["left_job"] = mgr.job.job_id if mgr.job else None
bpy.ops.preferences.addon_disable(module=ADDON)
bpy.ops.wm.save_userpref()
emit(**out)
'''

FETCH_SCRIPT = r'''
enable_source_addon()
mod = addon_module()
mgr = mod.manager.MANAGER
p = prefs(); p.endpoint = ARGS["endpoint"]; p.timeout = 10.0
p.client_token = ""  # even a new token: the entry keeps the one its job was sent with
hist = mgr.history
waiting = [dict(label=e.label, job=e.job, state=e.state) for e in hist.unfinished()]
t0 = time.time()
client = mod.wire.C.Client(ARGS["endpoint"], timeout=5, token=hist.unfinished()[0].token)
while time.time() - t0 < ARGS["wait"]:  # the job ends on the backend while no Blender listens
    if client.status(ARGS["job"])["state"] in ("done", "failed", "cancelled"):
        break
    time.sleep(0.5)
client.close()
before = set(object_names())
res = bpy.ops.gen3d.history_fetch()
new = [bpy.data.objects[n] for n in object_names() if n not in before and bpy.data.objects[n].type == "MESH"]
e = hist.entries()[0]
emit(waiting=waiting, result=sorted(res), objects=[o.name for o in new], seeds=[o.get("gen3d_seed") for o in new],
     entry_seed=e.seed,
     state=e.state, glb=bool(hist.file(e.glb)), unfinished=len(hist.unfinished()), outcome=mgr.outcome.state,
     message=mgr.outcome.message)
'''


def test_a_queue_of_three_imports_in_order_with_history_and_fetches_a_job_left_running(blender, backend_server):
    endpoint, stub = need(backend_server, "text_to_3d")
    wait = 120 if stub else 600
    r = blender.run(QUEUE_SCRIPT, {"endpoint": endpoint, "extra": fast(stub), "wait": wait}, user="artist",
                    timeout=SESSION_TIMEOUT + wait)
    d = r.data
    assert [x[0] for x in d["submitted"]] == [["FINISHED"]] * 3 and max(x[1] for x in d["submitted"]) < 0.5
    assert d["phases"][1:] == ["queued", "queued"] and d["queued"] == 2
    # all three imported, in the order they were queued, each where the cursor was when it was sent
    assert [e[0] for e in d["ended"]] == ["done"] * 3, d["ended"]
    by_name = {o["name"]: o for o in d["objects"]}
    assert len(by_name) == 3
    objs = [by_name[e[2][0]] for e in d["ended"]]  # in the order the jobs ended
    assert [o["prompt"] for o in objs] == ["a red chair", "a blue vase", "a green lamp"]
    assert [o["seed"] for o in objs] == [10, 11, 12]
    for i, o in enumerate(objs):
        assert o["min_z"] == pytest.approx(0.25 * i, abs=1e-4)  # standing on the cursor's height
        assert o["height"] == pytest.approx(0.5 + 0.5 * i, rel=0.01)  # the Height setting at the time
    # each with its own history entry, newest first, its model and thumbnail kept
    es = d["entries"]
    assert [e["label"] for e in es] == ["a green lamp", "a blue vase", "a red chair"]
    assert all(e["state"] == "done" and e["glb"] and e["thumb"] and e["job"] and e["imports"] == 1 for e in es)
    assert len({e["job"] for e in es}) == 3 and [e["seed"] for e in es] == [12, 11, 10]
    ri = d["reimport"]
    assert ri["result"] == ["FINISHED"] and len(ri["objects"]) == 1 and ri["imports"] == 2
    o = ri["objects"][0]
    assert o["prompt"] == "a red chair" and o["min_z"] == pytest.approx(1.0, abs=1e-4)
    assert o["height"] == pytest.approx(2.0, rel=0.01)
    rg = d["regenerate"]
    assert rg["result"] == ["FINISHED"] and rg["label"] == "a red chair"
    assert rg["seed"] != rg["old_seed"] and rg["same_settings"]
    assert d["left_job"]
    assert "Traceback" not in r.stderr, r.stderr

    # Blender again (the same user folders): the result of the regenerated job left running is fetched by its id
    r2 = blender.run(FETCH_SCRIPT, {"endpoint": endpoint, "job": d["left_job"], "wait": wait}, user="artist",
                     timeout=SESSION_TIMEOUT + wait)
    f = r2.data
    assert f["waiting"] == [{"label": "a red chair", "job": d["left_job"], "state": "running"}]
    assert f["result"] == ["FINISHED"] and f["outcome"] == "done", f
    assert len(f["objects"]) == 1 and f["objects"][0].startswith("gen3d_a_red_chair")
    assert f["seeds"] == [rg["seed"]] == [f["entry_seed"]], "placed with the new seed it was regenerated with"
    assert f["state"] == "done" and f["glb"] and f["unfinished"] == 0
    assert "Traceback" not in r2.stderr, r2.stderr


# --------------------------------------------------------------------------- errors where the user looks

UNREACHABLE_SCRIPT = r'''
enable_source_addon()
mod = addon_module()
mgr = mod.manager.MANAGER
p = prefs(); p.endpoint = ARGS["endpoint"]; p.timeout = 1.0
bpy.context.scene.gen3d.prompt = "anything"
before = object_names()
out = {}
t0 = time.time()
try:
    res = bpy.ops.gen3d.generate_from_text()
    out["blocking"] = dict(result=sorted(res))
except RuntimeError as exc:
    out["blocking"] = dict(error=str(exc))
out["blocking"].update(seconds=time.time() - t0, outcome=mgr.outcome.state, code=mgr.outcome.code,
                       message=mgr.outcome.message, hint=mgr.outcome.hint, panel=mgr.outcome.panel)
# the UI path: the error arrives in the timer and goes to the status bar (the report operator) and the panel
mgr.blocking = False
reports = []
orig_notify = mgr.notify
mgr.notify = lambda o: (reports.append([o.state, o.message]), orig_notify(o))
t0 = time.time()
res = bpy.ops.gen3d.generate_from_text()
op_seconds = time.time() - t0
while mgr.job is not None and time.time() - t0 < 10:
    mod.manager._timer(); time.sleep(0.05)
out["async"] = dict(result=sorted(res), op_seconds=op_seconds, seconds=time.time() - t0, outcome=mgr.outcome.state,
                    code=mgr.outcome.code, reports=reports)
mgr.blocking = None
# a remote endpoint while Blender's online access is off: refused without any connection
p.endpoint = "tcp://192.0.2.10:5555"
try:
    bpy.ops.gen3d.generate_from_text()
    out["online"] = dict(error=None)
except RuntimeError as exc:
    out["online"] = dict(error=str(exc), code=mgr.outcome.code, online_access=bpy.app.online_access)
# no prompt: told what to do
p.endpoint = ARGS["endpoint"]
bpy.context.scene.gen3d.prompt = "  "
try:
    bpy.ops.gen3d.generate_from_text()
    out["no_prompt"] = None
except RuntimeError as exc:
    out["no_prompt"] = str(exc)
out["objects_same"] = object_names() == before
emit(**out)
'''


def test_unreachable_backend_gives_a_clear_report_and_no_traceback(blender):
    endpoint = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    r = blender.run(UNREACHABLE_SCRIPT, {"endpoint": endpoint})
    d = r.data
    b = d["blocking"]
    assert "error" in b and "No answer from the backend" in b["error"] and endpoint in b["error"]
    assert "Start the backend" in b["error"]  # what to do, in the report itself
    assert b["outcome"] == "error" and b["code"] == "unreachable" and b["panel"] == "TEXT" and b["hint"]
    assert b["seconds"] < 5.0
    a = d["async"]
    assert a["result"] == ["FINISHED"] and a["op_seconds"] < 0.5, "an unreachable backend must not freeze the UI"
    assert a["outcome"] == "error" and a["code"] == "unreachable" and a["reports"][0][0] == "error"
    assert d["online"]["error"] and "online access" in d["online"]["error"].lower()
    assert d["online"]["code"] == "online_access" and d["online"]["online_access"] is False
    assert d["no_prompt"] and "prompt" in d["no_prompt"].lower()
    assert d["objects_same"]
    assert "Traceback" not in r.stdout and "Traceback" not in r.stderr, r.stdout + r.stderr


# --------------------------------------------------------------------------- panels per state

DRAW_SCRIPT = r'''
import numpy as np
from types import SimpleNamespace
enable_source_addon()
mod = addon_module()
M = mod.manager
mgr = M.MANAGER
ui = mod.ui

class Rec:
    """A stand-in for UILayout that records what the panel draws."""
    def __init__(self, log, path):
        object.__setattr__(self, "_log", log); object.__setattr__(self, "_path", path)
        object.__setattr__(self, "attrs", {})
    def __setattr__(self, k, v):
        self.attrs[k] = v
        self._log.append(dict(call="set", path=self._path, name=k, value=v))
    def _add(self, call, **kw):
        kw = {k: (v if isinstance(v, (str, int, float, bool, type(None))) else repr(v)) for k, v in kw.items()}
        self._log.append(dict(call=call, path=self._path, **kw))
        return Rec(self._log, self._path + "/" + call)
    def label(self, text="", icon="NONE", **k): return self._add("label", text=text, icon=icon)
    def prop(self, data, prop, text=None, **k): return self._add("prop", prop=prop, enabled=self.attrs.get("enabled", True))
    def operator(self, idname, text=None, icon="NONE", **k):
        # what the panel sets on the operator's properties (entry, queue_index) is recorded as "set" under op:<idname>
        self._add("operator", idname=idname, text=text, enabled=self.attrs.get("enabled", True))
        return Rec(self._log, self._path + "/op:" + idname)
    def progress(self, factor=0.0, type="BAR", text=""): return self._add("progress", factor=factor, text=text)
    def template_icon(self, icon_value=0, scale=1.0): return self._add("template_icon", icon_value=icon_value)
    def template_ID(self, data, prop, **k): return self._add("template_ID", prop=prop, open=k.get("open"))
    def template_ID_preview(self, data, prop, **k): return self._add("template_ID_preview", prop=prop)
    def template_preview(self, *a, **k): return self._add("template_preview")
    def separator(self, **k): return self._add("separator")
    def row(self, **k): return self._add("row")
    def column(self, **k): return self._add("column")
    def box(self): return self._add("box")
    def split(self, **k): return self._add("split")
    def panel(self, idname, default_closed=False):
        self._add("panel", idname=idname)
        return Rec(self._log, self._path + "/header"), Rec(self._log, self._path + "/body")

def draw(panel_cls):
    log = []
    panel_cls.draw(SimpleNamespace(layout=Rec(log, "")), bpy.context)
    return log

def draw_prefs():
    log = []
    mod.prefs.draw_preferences(prefs(), Rec(log, ""))
    return log

out = {}
names = ("GEN3D_PT_generate_text", "GEN3D_PT_image_to_3d", "GEN3D_PT_refine_texture")
panels = [getattr(ui, n) for n in names]
bpy.ops.object.select_all(action="DESELECT")
bpy.context.view_layer.objects.active = bpy.data.objects["Cube"]
out["idle"] = {p.bl_idname: draw(p) for p in panels}
# running, with progress and a preview
png = mod.png.encode_png(np.full((16, 16, 3), 200, np.uint8))
mgr.job = M.Job(kind="text_to_3d", label="Generate from text", panel="TEXT", phase=M.RUNNING, stage="novel_views",
                fraction=0.42, message="view 3 of 8", preview_png=png, preview_serial=1)
out["running"] = {p.bl_idname: draw(p) for p in panels}
mgr.job.phase, mgr.job.stage = M.CONNECTING, "connecting"
out["connecting"] = draw(ui.GEN3D_PT_generate_text)
mgr.job = None
# an error from the backend
mgr.outcome = M.Outcome("error", "REFINE", "Refine texture", "model 'sd-turbo' is not on the server",
                        mod.hints.hint_for("model_missing"), "model_missing")
out["error"] = {p.bl_idname: draw(p) for p in panels}
mgr.outcome = M.Outcome("done", "TEXT", "Generate from text", "Imported 'gen3d_chair' (320 faces)")
out["done"] = draw(ui.GEN3D_PT_generate_text)
mgr.outcome = None
# the image panel with an image empty active
img = bpy.data.images.new("ref", 32, 32)
bpy.ops.object.empty_add(type="IMAGE")
bpy.context.active_object.data = img
out["image_empty"] = draw(ui.GEN3D_PT_image_to_3d)
bpy.context.scene.gen3d.image = img
bpy.context.view_layer.objects.active = bpy.data.objects["Cube"]
out["image_chosen"] = draw(ui.GEN3D_PT_image_to_3d)
# preferences: the connection test's result
mgr.server_info = {"endpoint": "tcp://127.0.0.1:5555", "server": "0.1.0", "protocol": 1, "preset": "tiny",
                   "device": {"device": "cuda", "gpu_name": "NVIDIA H100"}, "versions": {"torch": "2.13.0"},
                   "job_kinds": {"diagnose": {}}}
out["prefs"] = draw_prefs()
# a queue of three: one running, two waiting
mgr.job = M.Job(kind="text_to_3d", label="Generate from text", panel="TEXT", phase=M.RUNNING, stage="distill",
                fraction=0.5)
mgr.queue = [M.Job(kind="image_to_3d", label="Image to 3D", panel="IMAGE", phase=M.QUEUED, stage="queued"),
             M.Job(kind="text_to_3d", label="Generate from text", panel="TEXT", phase=M.QUEUED, stage="queued")]
out["queue"] = draw(ui.GEN3D_PT_queue_history)
out["queue_text"] = draw(ui.GEN3D_PT_generate_text)
mgr.job, mgr.queue = None, []
# the history: one done (with its thumbnail), one never seen to end, one failed
hist = mgr.history
e1 = hist.add("text_to_3d", "a red chair", {"prompt": "a red chair", "seed": 7, "quality": "draft", "faces": 5000},
              "tcp://127.0.0.1:5555", name="gen3d_a_red_chair")
hist.accepted(e1.id, "a" * 32)
hist.finished(e1.id, {"model.glb": b"glTF" + bytes(16), "reference.png": png})
e2 = hist.add("image_to_3d", "photo.png", {"seed": 1, "quality": "standard", "faces": 20000}, "tcp://127.0.0.1:5555",
              image_png=png)
hist.accepted(e2.id, "b" * 32)
e3 = hist.add("text_to_3d", "a lamp", {"prompt": "a lamp", "seed": 2}, "tcp://127.0.0.1:5555")
hist.accepted(e3.id, "c" * 32)
hist.ended(e3.id, "error", "CUDA out of memory")
out["history"] = draw(ui.GEN3D_PT_queue_history)
out["history_ids"] = [e1.id, e2.id, e3.id]
out["history_folder"] = hist.folder
emit(**out)
'''


def _calls(log, call, **match):
    return [e for e in log if e["call"] == call and all(e.get(k) == v for k, v in match.items())]


def test_panels_show_the_controls_for_each_state(blender):
    d = blender.run(DRAW_SCRIPT).data
    text, image, refine = "GEN3D_PT_generate_text", "GEN3D_PT_image_to_3d", "GEN3D_PT_refine_texture"
    idle = d["idle"]
    assert _calls(idle[text], "prop", prop="prompt") and _calls(idle[text], "operator", idname="gen3d.generate_from_text")
    assert _calls(idle[text], "panel", idname="gen3d_text_settings")
    assert {e["prop"] for e in _calls(idle[text], "prop")} >= {"prompt", "quality", "faces", "texture_size", "refine",
                                                                "seed", "negative_prompt"}
    assert _calls(idle[image], "template_ID", prop="image", open="image.open")
    assert _calls(idle[image], "operator", idname="gen3d.image_to_3d")
    assert _calls(idle[image], "prop", prop="reference_elevation")
    assert _calls(idle[refine], "prop", prop="refine_prompt") and _calls(idle[refine], "prop", prop="refine_cameras")
    assert _calls(idle[refine], "template_ID", prop="refine_image")
    assert _calls(idle[refine], "label", text="Mesh: Cube (6 faces)")
    assert _calls(idle[refine], "operator", idname="gen3d.refine_texture")
    for log in idle.values():
        assert not _calls(log, "progress") and not _calls(log, "operator", idname="gen3d.cancel")

    run = d["running"]
    prog = _calls(run[text], "progress")
    assert len(prog) == 1 and prog[0]["factor"] == pytest.approx(0.42) and "Novel views" in prog[0]["text"] \
        and "42%" in prog[0]["text"]
    assert _calls(run[text], "label", text="view 3 of 8")
    assert _calls(run[text], "template_icon")  # the preview (its icon id is 0 in background mode)
    assert _calls(run[text], "operator", idname="gen3d.cancel")
    # while a job runs the button queues another one behind it
    assert _calls(run[text], "operator", idname="gen3d.generate_from_text", text="Generate (Queue)", enabled=True)
    for other in (image, refine):
        assert not _calls(run[other], "progress") and not _calls(run[other], "operator", idname="gen3d.cancel")
    conn = d["connecting"]
    assert _calls(conn, "progress") and "Connecting" in _calls(conn, "progress")[0]["text"]

    err = d["error"]
    labels = _calls(err[refine], "label")
    assert any("sd-turbo" in e["text"] and e["icon"] == "ERROR" for e in labels)
    assert any("prefetch" in e["text"] for e in labels)  # what to do
    assert any(e["call"] == "set" and e["name"] == "alert" and e["value"] is True for e in err[refine])
    assert _calls(err[refine], "operator", idname="gen3d.dismiss")
    assert not any("sd-turbo" in e.get("text", "") for e in err[text] + err[image])
    assert any(e["icon"] == "CHECKMARK" and "gen3d_chair" in e["text"] for e in _calls(d["done"], "label"))

    assert _calls(d["image_empty"], "label", text="Image empty: Empty", icon="IMAGE_REFERENCE")
    assert not _calls(d["image_empty"], "template_ID") and _calls(d["image_empty"], "template_icon")
    assert _calls(d["image_chosen"], "template_ID", prop="image")
    assert any(e["text"].startswith("ref: 32 x 32") for e in _calls(d["image_chosen"], "label"))

    prefs = d["prefs"]
    assert {e["prop"] for e in _calls(prefs, "prop")} >= {"endpoint", "timeout", "server_key", "auto_start",
                                                          "python_path", "preset", "port"}
    assert _calls(prefs, "operator", idname="gen3d.test_connection")
    assert _calls(prefs, "operator", idname="gen3d.start_backend")
    texts = " | ".join(e["text"] for e in _calls(prefs, "label"))
    assert "NVIDIA H100" in texts and "torch 2.13.0" in texts and "text_to_3d" in texts

    # the queue of three: one row each, the running one with its progress, each with its own cancel
    q = d["queue"]
    assert [e["text"] for e in _calls(q, "label") if e["icon"] in ("PLAY", "SORTTIME")] == \
        ["Generate from text", "Image to 3D", "Generate from text"]
    assert len(_calls(q, "progress")) == 1 and "50%" in _calls(q, "progress")[0]["text"]
    assert [e["value"] for e in q if e["call"] == "set" and e["name"] == "queue_index"] == [-1, 0, 1]
    assert _calls(q, "label", text="Queued (1 before it)") and _calls(q, "label", text="Queued (2 before it)")
    assert any("1 more queued" in e["text"] for e in _calls(d["queue_text"], "label"))
    # the history, newest first: each entry with what it was, its actions; the unfinished one offers Fetch
    h = d["history"]
    e1, e2, e3 = d["history_ids"]
    texts = [e["text"] for e in _calls(h, "label")]
    assert texts.index("a lamp") < texts.index("photo.png") < texts.index("a red chair")
    assert "Text - seed 7 - draft - 5000 faces" in texts and "Image - seed 1 - standard - 20000 faces" in texts
    assert any("CUDA out of memory" in t for t in texts)
    assert _calls(h, "operator", idname="gen3d.history_fetch")
    entry_of = lambda op: [e["value"] for e in h if e["call"] == "set" and e["path"].endswith("op:" + op)]
    assert entry_of("gen3d.history_import") == [e3, e2, e1] and entry_of("gen3d.history_regenerate") == [e3, e2, e1]
    assert entry_of("gen3d.history_remove") == [e3, e2, e1]
    imports = _calls(h, "operator", idname="gen3d.history_import")
    assert [i["enabled"] for i in imports] == [False, False, True], "only an entry with a model can be imported"
    assert len(_calls(h, "template_icon")) == 2  # thumbnails: the backend's front image, the reference sent
    assert d["history_folder"].endswith(os.path.join("gen3d", "history")), d["history_folder"]


# --------------------------------------------------------------------------- auto-started local backend

AUTOSTART_SCRIPT = r'''
import subprocess
enable_source_addon()
mod = addon_module()
mgr = mod.manager.MANAGER
p = prefs()
p.auto_start = True
p.python_path = ARGS["python"]; p.backend_dir = ARGS["root"]; p.preset = "tiny"; p.port = ARGS["port"]
p.start_timeout = 90.0
t0 = time.time()
res = bpy.ops.gen3d.test_connection()
out = dict(result=sorted(res), seconds=time.time() - t0, outcome=mgr.outcome.state, message=mgr.outcome.message)
info = mgr.server_info or {}
out.update(endpoint=info.get("endpoint"), preset=info.get("preset"), device=(info.get("device") or {}).get("device"),
           versions=sorted((info.get("versions") or {}).keys()), alive=mgr.backend_alive(), pid=mgr.backend.pid)
proc = mgr.backend.proc
bpy.ops.preferences.addon_disable(module=ADDON)
try:
    proc.wait(10)
except subprocess.TimeoutExpired:
    pass
out["exit_code_after_disable"] = proc.poll()
out["backend_after"] = mgr.backend is not None
emit(**out)
'''


def test_auto_start_runs_the_local_backend_and_unregister_stops_it(blender):
    port = free_port()
    r = blender.run(AUTOSTART_SCRIPT, {"python": sys.executable, "root": str(ROOT), "port": port}, timeout=180)
    d = r.data
    assert d["result"] == ["FINISHED"] and d["outcome"] == "done", d
    assert d["endpoint"] == f"tcp://127.0.0.1:{port}" and d["preset"] == "tiny" and d["device"] == "cpu"
    assert "torch" in d["versions"] and d["alive"] and d["pid"]
    assert d["exit_code_after_disable"] is not None, "disabling the add-on must stop the backend it started"
    assert not d["backend_after"]
