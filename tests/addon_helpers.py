"""Helpers of the add-on tests: Blender sessions in subprocesses, and stand-in
job kinds ``text_to_3d``, ``image_to_3d`` and ``refine_texture`` that
implement the contract of docs/jobs.md on small data (no models).

Which backend the live tests use is chosen by the environment variable
``GEN3D_ADDON_BACKEND``:

* unset or ``real``: ``python -m backend serve --port 0 --preset tiny`` in a
  subprocess, with the backend's own job kinds (the proof the issue asks for;
  the scenes pass small step counts through Scene.gen3d.extra_params);
* ``stub``: an in-process :class:`backend.server.Server` with the stand-in
  kinds below (fast, deterministic, for work on the add-on itself);
* a ``tcp://host:port`` endpoint: a backend that is already running.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULT_MARK = "@@GEN3D_RESULT@@ "

# --------------------------------------------------------------------------- stand-in job kinds

STUB_JOB_SECONDS = float(os.environ.get("GEN3D_STUB_JOB_SECONDS", "1.2"))
GEN_STAGES = ("text_to_image", "segment", "novel_views", "gaussians", "mesh", "uv", "texture", "refine", "export")


def _png(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(rgb, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def icosphere(subdivisions: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Unit icosphere: vertices [V, 3] float64 on the unit sphere, faces [F, 3] (outward, CCW)."""
    t = (1.0 + 5 ** 0.5) / 2.0
    v = [(-1, t, 0), (1, t, 0), (-1, -t, 0), (1, -t, 0), (0, -1, t), (0, 1, t), (0, -1, -t), (0, 1, -t),
         (t, 0, -1), (t, 0, 1), (-t, 0, -1), (-t, 0, 1)]
    f = [(0, 11, 5), (0, 5, 1), (0, 1, 7), (0, 7, 10), (0, 10, 11), (1, 5, 9), (5, 11, 4), (11, 10, 2), (10, 7, 6),
         (7, 1, 8), (3, 9, 4), (3, 4, 2), (3, 2, 6), (3, 6, 8), (3, 8, 9), (4, 9, 5), (2, 4, 11), (6, 2, 10),
         (8, 6, 7), (9, 8, 1)]
    verts = [np.asarray(p, np.float64) / np.linalg.norm(p) for p in v]
    faces = list(f)
    for _ in range(subdivisions):
        cache: dict = {}

        def mid(a: int, b: int) -> int:
            key = (min(a, b), max(a, b))
            if key not in cache:
                m = verts[a] + verts[b]
                verts.append(m / np.linalg.norm(m))
                cache[key] = len(verts) - 1
            return cache[key]

        nf = []
        for a, b, c in faces:
            ab, bc, ca = mid(a, b), mid(b, c), mid(c, a)
            nf += [(a, ab, ca), (b, bc, ab), (c, ca, bc), (ab, bc, ca)]
        faces = nf
    return np.asarray(verts), np.asarray(faces, np.int64)


def _texture(seed: int, size: int = 32) -> np.ndarray:
    """A small texture: front half (v < 0.5 in our UVs) reddish, the rest bluish, shade from the seed."""
    y, x = np.mgrid[0:size, 0:size]
    tex = np.zeros((size, size, 3), np.float32)
    tex[..., 0] = np.where(x < size // 2, 0.9, 0.2)
    tex[..., 1] = (seed % 7) / 7.0
    tex[..., 2] = np.where(x < size // 2, 0.2, 0.9)
    return tex


def _run_stages(ctx, stages, preview_stages=("text_to_image", "novel_views"), seconds: float | None = None) -> None:
    seconds = STUB_JOB_SECONDS if seconds is None else seconds
    plan = ctx.progress.stages({s: 1.0 for s in stages})
    steps = 3
    for s in stages:
        pr = plan[s]
        for i in range(steps):
            time.sleep(seconds / (len(stages) * steps))
            preview = None
            if s in preview_stages and i == steps - 1:
                shade = 60 + 20 * stages.index(s)
                preview = _png(np.full((32, 32, 3), shade, np.uint8))
            pr.update((i + 1) / steps, f"{s} {i + 1}/{steps}", preview_png=preview)


def _generated_mesh(seed: int, faces_budget: int, material: str = "pbr"):
    from backend.mesh.gltf import write_glb
    from backend.mesh.textured import TexturedMesh

    verts, faces = icosphere(2 if faces_budget >= 320 else 1)
    az = np.arctan2(verts[:, 0], -verts[:, 1])  # 0 at the front (-Y)
    uv = np.stack([(az / (2 * np.pi)) % 1.0 * 0.98 + 0.01, (verts[:, 2] + 1) / 2 * 0.98 + 0.01], -1).astype(np.float32)
    pbr = material == "pbr"
    flat = np.broadcast_to(np.float32([0.5, 0.5, 1.0]), (16, 16, 3)).copy() if pbr else None
    mesh = TexturedMesh(verts, faces, uv, _texture(seed), normals=verts.copy(), name="gen3d", normal_map=flat,
                        metallic=0.0, roughness=0.8 if pbr else 1.0)
    return write_glb(mesh), len(faces), mesh


def _with_quads(files: list, mesh, p: dict, meta: dict) -> list:
    from backend.kinds.material import quads_attachment

    att, extra = quads_attachment(mesh, p)
    meta.update(extra)
    return files + ([att] if att is not None else [])


def _t2i(inputs, ctx):
    from backend.service.jobs import JobOutput
    from gen3d_wire.protocol import Attachment

    p = inputs.params
    _run_stages(ctx, GEN_STAGES)
    data, nf, mesh = _generated_mesh(p["seed"], p["faces"], p["material"])
    meta = {"front": [0, -1, 0], "up": [0, 0, 1], "radius": 1.0, "faces": nf, "prompt": p["prompt"],
            "seed": p["seed"], "quality": p["quality"], "texture_size": p["texture_size"], "refine": p["refine"],
            "stub": True}
    front = inputs.attachments.get("image")  # a chosen front view: the stand-in echoes it as the reference
    if front is not None:
        meta["front_view"] = "chosen"
    files = [Attachment("model.glb", "model/gltf-binary", data),
             Attachment("reference.png", "image/png", front or _png(np.full((16, 16, 3), 128, np.uint8)))]
    return JobOutput(_with_quads(files, mesh, p, meta), meta)


def _fronts(inputs, ctx):
    from backend.service.jobs import JobOutput
    from gen3d_wire.protocol import Attachment

    p = inputs.params
    seeds = [p["seed"] + i for i in range(p["count"])]
    _run_stages(ctx, [f"front {i + 1}" for i in range(len(seeds))], preview_stages=())
    files = [Attachment(f"front_{i}.png", "image/png", _png(np.full((16, 16, 3), 40 * i % 256, np.uint8)))
             for i in range(len(seeds))]
    return JobOutput(files, {"prompt": p["prompt"], "seeds": seeds, "stub": True})


def _i2t(inputs, ctx):
    from PIL import Image

    from backend.service.jobs import JobOutput
    from gen3d_wire.protocol import Attachment

    p = inputs.params
    im = Image.open(io.BytesIO(inputs.attachments["image"]))
    im.load()
    arr = np.asarray(im)
    _run_stages(ctx, ("segment",) + GEN_STAGES[2:], preview_stages=("segment", "novel_views"))
    data, nf, mesh = _generated_mesh(p["seed"], p["faces"], p["material"])
    meta = {"front": [0, -1, 0], "up": [0, 0, 1], "radius": 1.0, "faces": nf, "image_size": list(im.size),
            "image_mode": im.mode, "image_mean": [float(x) for x in arr.reshape(-1, arr.shape[-1]).mean(0)],
            "reference_elevation": p["reference_elevation"], "prompt": p["prompt"], "stub": True}
    return JobOutput(_with_quads([Attachment("model.glb", "model/gltf-binary", data)], mesh, p, meta), meta)


def _refine(inputs, ctx):
    from backend.mesh.gltf import read_glb, write_glb
    from backend.mesh.textured import TexturedMesh
    from backend.service.jobs import InputError, JobOutput
    from gen3d_wire.protocol import Attachment

    p = inputs.params
    prims = read_glb(inputs.attachments["mesh"])
    if len(prims) != 1:
        raise InputError(f"expected one mesh, got {len(prims)}")
    prim = prims[0]
    cams = json.loads(inputs.attachments["cameras"]) if "cameras" in inputs.attachments else {"frames": []}
    _run_stages(ctx, ("uv", "refine", "export"), preview_stages=("refine",))
    verts = prim.world_vertices()  # float64, exact inverse of the GLB's float32 (x, z, -y)
    if prim.uv is not None:
        uv, source = prim.uv, "input"
    else:  # per-corner planar UVs (stand-in for xatlas)
        lo, hi = verts.min(0), verts.max(0)
        uv = ((verts[:, [0, 2]] - lo[[0, 2]]) / np.maximum(hi - lo, 1e-9)[[0, 2]] * 0.9 + 0.05).astype(np.float32)
        source = "xatlas"
    size = 16
    tex = np.zeros((size, size, 3), np.float32)
    tex[...] = (0.1, 0.8, 0.3) if "green" in p["prompt"] else (0.9, 0.6, 0.1)
    mesh = TexturedMesh(verts, prim.indices, uv, tex, name="refined")
    meta = {"uv_source": source, "triangles": int(len(prim.indices)), "had_texture": prim.texture is not None,
            "had_uv": prim.uv is not None, "cameras": cams.get("frames", []), "has_image": "image" in inputs.attachments,
            "prompt": p["prompt"], "texture_size": p["texture_size"], "stub": True}
    return JobOutput([Attachment("model.glb", "model/gltf-binary", write_glb(mesh))], meta)


def _need_prompt(inputs) -> None:
    if not inputs.params["prompt"].strip():
        raise ValueError("'text_to_3d' needs a non-empty 'prompt'")


def stub_specs():
    """Stand-ins for the three kinds, with the parameter names of docs/jobs.md."""
    from backend.service.jobs import AttachmentSpec, JobSpec, Param

    gen = (
        Param("negative_prompt", str, ""), Param("seed", int, 0, min=0), Param("quality", str, "standard",
                                                                                choices=("draft", "standard", "high")),
        Param("steps", int, 0, min=0), Param("guidance", float, 7.5, min=0.0), Param("views", int, 0, min=0),
        Param("view_steps", int, 0, min=0), Param("iterations", int, 0, min=0),
        Param("faces", int, 20000, min=100, max=1_000_000), Param("texture_size", int, 1024, min=64, max=8192),
        Param("reference_elevation", float, None, min=-90.0, max=90.0, nullable=True), Param("refine", bool, True),
        Param("refine_steps", int, 0, min=0), Param("material", str, "pbr", choices=("pbr", "albedo")),
        Param("metallic", float, -1.0, min=-1.0, max=1.0), Param("roughness", float, -1.0, min=-1.0, max=1.0),
        Param("topology", str, "tri", choices=("tri", "quad")),
    )
    return [
        JobSpec("text_to_3d", "stand-in: textured icosphere", _t2i,
                params=(Param("prompt", str, ""), Param("method", str, "image", choices=("image", "sds")),
                        Param("anchor", str, "front", choices=("front", "none")),
                        Param("dream_steps", int, 0, min=0)) + gen,
                attachments=(AttachmentSpec("image", "image", False, "a chosen front view"),), check=_need_prompt),
        JobSpec("text_to_image", "stand-in: flat grey front views", _fronts,
                params=(Param("prompt", str, ""), Param("negative_prompt", str, ""), Param("seed", int, 0, min=0),
                        Param("quality", str, "standard", choices=("draft", "standard", "high")),
                        Param("steps", int, 0, min=0), Param("guidance", float, 7.5, min=0.0),
                        Param("count", int, 4, min=1, max=8)), check=_need_prompt),
        JobSpec("image_to_3d", "stand-in: textured icosphere from an image", _i2t,
                params=(Param("prompt", str, ""),) + gen,
                attachments=(AttachmentSpec("image", "image", True, "reference image"),)),
        JobSpec("refine_texture", "stand-in: same triangles, new flat texture", _refine,
                params=(Param("prompt", str, ""), Param("negative_prompt", str, ""), Param("seed", int, 0, min=0),
                        Param("steps", int, 0, min=0), Param("texture_size", int, 1024, min=64, max=8192),
                        Param("guidance", float, 7.5, min=0.0), Param("update", str, "sds", choices=("sds", "sdedit")),
                        Param("reference_weight", float, 1.0, min=0.0)),
                attachments=(AttachmentSpec("mesh", "glb", True, "the mesh"),
                             AttachmentSpec("image", "image", False, "reference image"),
                             AttachmentSpec("cameras", "json", False, "cameras"))),
    ]


class StubServer:
    """In-process backend with the stand-in kinds (and diagnose)."""

    def __init__(self, jobs_dir: Path):
        from backend.kinds import diagnose
        from backend.service.jobs import Registry
        from backend.service.server import Server, ServerConfig

        self.server = Server(ServerConfig(host="127.0.0.1", port=0, jobs_dir=jobs_dir, device="cpu"),
                             Registry([diagnose.SPEC, *stub_specs()]))
        self.endpoint = self.server.start_background()

    def stop(self) -> None:
        self.server.stop()


def start_backend(jobs_dir: Path):
    """(endpoint, stop function, is_stub) per GEN3D_ADDON_BACKEND."""
    mode = os.environ.get("GEN3D_ADDON_BACKEND", "real").strip()
    if mode.startswith(("tcp://", "ipc://")):
        return mode, (lambda: None), False
    if mode == "real":
        from conftest import ServerProcess

        sp = ServerProcess(["--jobs-dir", str(jobs_dir), "--preset", "tiny"], timeout=120.0)
        return sp.endpoint, sp.stop, False
    srv = StubServer(jobs_dir)
    return srv.endpoint, srv.stop, True


# --------------------------------------------------------------------------- Blender sessions

PRELUDE = r'''
import json, os, sys, time, traceback
ROOT = {root!r}
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
import bpy, addon_utils
ARGS = json.loads(os.environ.get("GEN3D_TEST_ARGS", "{{}}"))
ADDON = "bl_ext.user_default.gen3d"

def emit(**data):
    print({mark!r} + json.dumps(data), flush=True)

def enable_source_addon():
    """The add-on from the source tree, as an extension of the user_default repository (symlinked)."""
    repo = bpy.utils.user_resource("EXTENSIONS", path="user_default", create=True)
    link = os.path.join(repo, "gen3d")
    if not os.path.lexists(link):
        os.symlink(os.path.join(ROOT, "blender_addon"), link)
    addon_utils.extensions_refresh(ensure_wheels=False)
    mod = addon_utils.enable(ADDON, default_set=True, handle_error=lambda ex: traceback.print_exc())
    assert mod is not None, "the add-on did not enable"
    return mod

def prefs():
    return bpy.context.preferences.addons[ADDON].preferences

def addon_module():
    return sys.modules[ADDON]

def undo_redo(before):
    """One undo step takes the scene back to ``before`` (object names); redo brings the result back."""
    after = object_names()
    bpy.ops.ed.undo()
    undone = object_names()
    bpy.ops.ed.redo()
    return dict(undo_restores=undone == sorted(before), redo_restores=object_names() == after)

def clear_objects(keep=()):
    for o in list(bpy.data.objects):
        if o.name not in keep:
            bpy.data.objects.remove(o)

def object_names():
    return sorted(o.name for o in bpy.data.objects)
'''


@dataclass
class SessionResult:
    data: dict
    stdout: str
    stderr: str
    seconds: float


class BlenderSessions:
    """Runs Python scripts in fresh Blender (bpy module) processes with isolated user folders."""

    def __init__(self, base: Path, env: dict | None = None):
        self.base = Path(base)
        self.env = dict(env or {})
        self.count = 0

    def user_env(self, name: str) -> dict:
        d = self.base / name
        env = dict(os.environ)
        env.update({
            "BLENDER_USER_CONFIG": str(d / "config"),
            "BLENDER_USER_SCRIPTS": str(d / "scripts"),
            "BLENDER_USER_RESOURCES": str(d / "resources"),
            "BLENDER_USER_DATAFILES": str(d / "datafiles"),
            "GEN3D_HOME": str(d / "gen3d_home"),
            "PYTHONUNBUFFERED": "1",
        })
        env.update(self.env)
        return env

    def run(self, script: str, args: dict | None = None, user: str | None = None, timeout: float = 120.0,
            check: bool = True) -> SessionResult:
        self.count += 1
        user = user or f"user{self.count}"
        path = self.base / f"session{self.count}.py"
        self.base.mkdir(parents=True, exist_ok=True)
        path.write_text(PRELUDE.format(root=str(ROOT), mark=RESULT_MARK) + textwrap.dedent(script), encoding="utf-8")
        env = self.user_env(user)
        env["GEN3D_TEST_ARGS"] = json.dumps(args or {})
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, str(path)], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)
        seconds = time.monotonic() - t0
        data = None
        for line in proc.stdout.splitlines():
            if line.startswith(RESULT_MARK):
                data = json.loads(line[len(RESULT_MARK):])
        if check and (proc.returncode != 0 or data is None):
            raise AssertionError(f"Blender session {path} failed (exit {proc.returncode}):\n--- stdout\n"
                                 f"{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}")
        return SessionResult(data or {}, proc.stdout, proc.stderr, seconds)


def find_cached_wheel(name: str) -> Path | None:
    """The pinned Linux wheel from the build cache, if any earlier build or test fetched it."""
    import build_addon

    for folder in (build_addon.default_cache(), ROOT / "build" / "wheels"):
        if (folder / name).is_file():
            return folder / name
    return None
