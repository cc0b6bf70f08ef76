"""``Intrinsics.from_blender`` proven against Blender itself.

For cameras of every sensor fit, portrait and landscape, with and without lens
shift, Blender (the bpy module, in a subprocess: bpy never shares a process
with torch) reports where known 3D points land, two independent ways:

* ``bpy_extras.object_utils.world_to_camera_view`` (Blender's own projection,
  normalized frame coordinates with (0, 0) at the bottom left) for random
  points, some outside the frame;
* for a few cameras, a real Cycles render of small emissive squares on an
  empty (transparent) film: the coverage (alpha) centroid of each square.

Our ``cameras.project(points, cam_obj.matrix_world, Intrinsics.from_blender(...))``
must land on both. Square pixels, resolution_percentage 100.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from backend.common import cameras as cam

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.blender,
    pytest.mark.skipif(importlib.util.find_spec("bpy") is None, reason="needs the bpy module"),
]

# name, (w, h), lens mm, sensor (w, h) mm, fit, shift (x, y), Euler XYZ degrees, location, render with Cycles
CAMERAS = [
    dict(name="portrait_auto", w=64, h=96, lens=50.0, sensor=(36.0, 24.0), fit="AUTO", shift=(0.0, 0.0),
         rot=(80.0, 0.0, 20.0), loc=(1.0, -4.0, 1.2), render=True),
    dict(name="landscape_auto", w=96, h=64, lens=35.0, sensor=(36.0, 24.0), fit="AUTO", shift=(0.0, 0.0),
         rot=(70.0, 5.0, -30.0), loc=(-2.0, -3.0, 2.0), render=False),
    dict(name="landscape_auto_shift", w=96, h=64, lens=35.0, sensor=(36.0, 24.0), fit="AUTO", shift=(-0.09, 0.13),
         rot=(70.0, 5.0, -30.0), loc=(-2.0, -3.0, 2.0), render=False),
    dict(name="landscape_vertical_shift", w=96, h=64, lens=40.0, sensor=(36.0, 24.0), fit="VERTICAL", shift=(0.12, -0.08),
         rot=(95.0, -10.0, 140.0), loc=(3.0, 2.0, 0.5), render=True),
    dict(name="portrait_horizontal_shift", w=64, h=96, lens=45.0, sensor=(36.0, 24.0), fit="HORIZONTAL", shift=(-0.1, 0.15),
         rot=(60.0, 0.0, 250.0), loc=(-3.0, 1.0, 3.0), render=True),
    dict(name="portrait_auto_shift", w=64, h=96, lens=50.0, sensor=(32.0, 18.0), fit="AUTO", shift=(0.07, 0.11),
         rot=(85.0, 3.0, 10.0), loc=(0.5, -5.0, 0.8), render=True),
    dict(name="portrait_vertical_shift", w=64, h=96, lens=30.0, sensor=(36.0, 20.0), fit="VERTICAL", shift=(0.05, -0.06),
         rot=(75.0, 0.0, 45.0), loc=(2.0, -2.0, 1.5), render=False),
    dict(name="landscape_horizontal_shift", w=120, h=80, lens=28.0, sensor=(30.0, 24.0), fit="HORIZONTAL", shift=(-0.05, -0.1),
         rot=(100.0, 0.0, -120.0), loc=(-2.5, 1.5, -0.5), render=False),
    dict(name="square_auto_shift", w=80, h=80, lens=60.0, sensor=(36.0, 24.0), fit="AUTO", shift=(0.1, 0.1),
         rot=(90.0, 0.0, 0.0), loc=(0.0, -4.0, 0.0), render=False),
]
BY_NAME = {c["name"]: c for c in CAMERAS}
SAMPLES = 16
# Where the squares go, as fractions of the frame (0, 0 = bottom left), and their depth along the view.
SQUARE_FRACTIONS = [(0.22, 0.2), (0.78, 0.24), (0.5, 0.5), (0.25, 0.8), (0.76, 0.78)]
SQUARE_DEPTH = 4.0
SQUARE_HALF_PX = 3.0  # half the side of a square, in pixels of the fitted dimension (about)

BLENDER_SCRIPT = r'''
import json, math, sys
import numpy as np
import bpy
from mathutils import Euler, Vector
from bpy_extras.object_utils import world_to_camera_view
from evaluation.groundtruth import configure_render, reset_scene

spec = json.load(open(sys.argv[1]))
out_dir = sys.argv[2]
scene = reset_scene()
configure_render(scene, samples=spec["samples"], width=64, height=64)
mat = bpy.data.materials.new("emit")
mat.use_nodes = True
nt = mat.node_tree
nt.nodes.clear()
em = nt.nodes.new("ShaderNodeEmission")
em.inputs["Color"].default_value = (1.0, 1.0, 1.0, 1.0)
em.inputs["Strength"].default_value = 1.0
outn = nt.nodes.new("ShaderNodeOutputMaterial")
nt.links.new(em.outputs["Emission"], outn.inputs["Surface"])
rng = np.random.default_rng(0)
results = {}
for c in spec["cameras"]:
    data = bpy.data.cameras.new(c["name"])
    data.type = "PERSP"
    data.lens = c["lens"]
    data.sensor_width, data.sensor_height = c["sensor"]
    data.sensor_fit = c["fit"]
    data.shift_x, data.shift_y = c["shift"]
    data.clip_start, data.clip_end = 0.01, 1000.0
    ob = bpy.data.objects.new(c["name"], data)
    scene.collection.objects.link(ob)
    ob.location = c["loc"]
    ob.rotation_euler = Euler([math.radians(a) for a in c["rot"]], "XYZ")
    scene.camera = ob
    r = scene.render
    r.resolution_x, r.resolution_y = c["w"], c["h"]
    r.resolution_percentage = 100
    r.pixel_aspect_x = r.pixel_aspect_y = 1.0
    bpy.context.view_layer.update()
    M = np.array(ob.matrix_world, dtype=np.float64)
    # the frame in camera-local coordinates (the camera looks down -Z): top right, bottom right,
    # bottom left, top left
    fr = [np.array(v, dtype=np.float64) for v in data.view_frame(scene=scene)]
    x0, x1, y0, y1, z = fr[2][0], fr[1][0], fr[1][1], fr[0][1], fr[0][2]
    # random points in front of the camera, about half of them outside the frame
    depth = rng.uniform(1.0, 8.0, 40)
    a, b = rng.uniform(-0.25, 1.25, (2, 40))
    local = np.stack([x0 + a * (x1 - x0), y0 + b * (y1 - y0), np.full(40, z)], 1) * (depth / -z)[:, None]
    world = local @ M[:3, :3].T + M[:3, 3]
    ndc = [list(world_to_camera_view(scene, ob, Vector(p.tolist()))) for p in world]
    entry = {"c2w": M.tolist(), "points": world.tolist(), "ndc": ndc}
    if c["render"]:
        half = spec["square_half_px"] * (x1 - x0) / c["w"] * spec["depth"] / -z
        centres, objs = [], []
        for k, (a, b) in enumerate(spec["fractions"]):
            p = np.array([x0 + a * (x1 - x0), y0 + b * (y1 - y0), z]) * (spec["depth"] / -z)
            quad = p + np.array([[-half, -half, 0], [half, -half, 0], [half, half, 0], [-half, half, 0]])
            wq = quad @ M[:3, :3].T + M[:3, 3]
            me = bpy.data.meshes.new(f"sq{k}")
            me.from_pydata(wq.tolist(), [], [(0, 1, 2, 3)])
            me.materials.append(mat)
            o = bpy.data.objects.new(f"sq{k}", me)
            scene.collection.objects.link(o)
            objs.append(o)
            centres.append((p @ M[:3, :3].T + M[:3, 3]).tolist())
        path = f"{out_dir}/{c['name']}.png"
        r.filepath = path
        bpy.ops.render.render(write_still=True)
        for o in objs:
            bpy.data.objects.remove(o, do_unlink=True)
        entry.update(render=path, centres=centres,
                     centres_ndc=[list(world_to_camera_view(scene, ob, Vector(p))) for p in centres])
    ob.hide_render = True
    results[c["name"]] = entry
json.dump(results, open(f"{out_dir}/results.json", "w"))
'''


@pytest.fixture(scope="module")
def blender(tmp_path_factory):
    """Blender's projections (and Cycles renders) of every camera in CAMERAS, from one subprocess."""
    from evaluation.groundtruth import subprocess_env

    out = tmp_path_factory.mktemp("blender_cams")
    spec = {"cameras": CAMERAS, "samples": SAMPLES, "fractions": SQUARE_FRACTIONS, "depth": SQUARE_DEPTH,
            "square_half_px": SQUARE_HALF_PX}
    (out / "spec.json").write_text(json.dumps(spec))
    (out / "script.py").write_text(BLENDER_SCRIPT)
    proc = subprocess.run([sys.executable, str(out / "script.py"), str(out / "spec.json"), str(out)], cwd=str(ROOT),
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


def intrinsics(c) -> cam.Intrinsics:
    return cam.Intrinsics.from_blender(c["lens"], c["sensor"][0], c["sensor"][1], c["fit"], c["w"], c["h"], *c["shift"])


def ndc_to_pixels(ndc, w, h) -> np.ndarray:
    """world_to_camera_view's (0, 0) bottom-left frame coordinates -> pixels (x right, y down)."""
    ndc = np.asarray(ndc, np.float64)
    return np.stack([ndc[:, 0] * w, (1.0 - ndc[:, 1]) * h], -1)


@pytest.mark.parametrize("name", list(BY_NAME))
def test_projection_matches_world_to_camera_view(blender, name):
    c, d = BY_NAME[name], blender[name]
    uv, z = cam.project(np.array(d["points"]), np.array(d["c2w"]), intrinsics(c))
    expect = ndc_to_pixels(d["ndc"], c["w"], c["h"])
    np.testing.assert_allclose(z, np.asarray(d["ndc"])[:, 2], rtol=1e-5)
    inside = ((expect >= 0) & (expect <= [c["w"], c["h"]])).all(1)
    assert inside.sum() >= 10 and (~inside).sum() >= 3  # points in the frame and outside it
    err = np.abs(uv - expect).max()
    assert err < 0.01, f"{name}: off Blender's projection by up to {err:.3f} px"


def alpha_centroids(png, around, radius: int = 8) -> tuple[np.ndarray, float]:
    """Coverage (alpha) centroid of the blob near each of ``around`` (pixels), and the share of
    all the image's alpha those windows hold."""
    from PIL import Image

    with Image.open(png) as im:
        assert im.mode == "RGBA"
        a = np.asarray(im, np.float64)[..., 3] / 255.0
    H, W = a.shape
    ys, xs = np.mgrid[0:H, 0:W] + 0.5  # pixel centres
    out, held = [], 0.0
    for x, y in around:
        win = (np.abs(xs - x) <= radius) & (np.abs(ys - y) <= radius)
        m = a * win
        held += m.sum()
        out.append([(m * xs).sum() / m.sum(), (m * ys).sum() / m.sum()])
    return np.array(out), held / a.sum()


@pytest.mark.parametrize("name", [c["name"] for c in CAMERAS if c["render"]])
def test_projection_matches_cycles_render(blender, name):
    c, d = BY_NAME[name], blender[name]
    # the windows are placed by Blender's own projection, not by the code under test
    guess = ndc_to_pixels(d["centres_ndc"], c["w"], c["h"])
    seen, share = alpha_centroids(d["render"], guess)
    assert share > 0.995, f"{name}: squares outside the expected windows ({share:.3f} of the coverage inside)"
    uv, _ = cam.project(np.array(d["centres"]), np.array(d["c2w"]), intrinsics(c))
    err = np.abs(uv - seen).max()
    assert err < 0.5, f"{name}: rendered squares off our projection by up to {err:.2f} px:\n{seen}\nvs\n{uv}"
    # and bpy_extras agrees with Cycles (the render is the independent witness)
    assert np.abs(guess - seen).max() < 0.5
