"""PBR material on the CPU: tangent frames, the normal-map bake, the field normals it
bakes from, the GLB's normalTexture/TANGENT/factors, the prompt's material words.
(Blender's reading of the same maps: tests/test_pbr_blender.py.)"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from backend.mesh.bake import BakeSettings, bake_normal_map, decode_tangent_normals, vertex_tangents
from backend.mesh.extract import FieldNormals
from backend.mesh.gltf import read_glb, write_glb
from backend.mesh.textured import TexturedMesh, vertex_normals
from backend.mesh.uv import unwrap
from backend.kinds.material import apply_material
from backend.pipeline.material import DEFAULT_METALLIC, DEFAULT_ROUGHNESS, material_factors
from tests.addon_helpers import icosphere
from tests.test_pbr_blender import _angles, detail_normals


@pytest.fixture(scope="module")
def sphere():
    v, f = icosphere(3)
    n = vertex_normals(v, f)
    vmap, uf, uv = unwrap(v, f, 256, normals=n)
    return v[vmap], uf, uv, n[vmap]


def _at_centroids(mesh, image):
    """Per face: the centroid's position, normal, tangent and the image's texel there."""
    v, f, uv, n = mesh
    t = vertex_tangents(v, f, uv, n)
    c = v[f].mean(1)
    cn = n[f].mean(1)
    ct = t[f].mean(1)
    cuv = uv[f].mean(1)
    S = image.shape[0]
    x = np.clip((cuv[:, 0] * S).astype(int), 0, S - 1)
    y = np.clip(((1.0 - cuv[:, 1]) * S).astype(int), 0, S - 1)
    return c, cn, ct, image[y, x]


def test_tangent_frames_are_orthonormal_and_follow_the_uvs(sphere):
    v, f, uv, n = sphere
    t = vertex_tangents(v, f, uv, n)
    assert t.shape == (len(v), 4) and set(np.unique(t[:, 3])) <= {-1.0, 1.0}
    np.testing.assert_allclose(np.linalg.norm(t[:, :3], axis=1), 1.0, atol=1e-5)
    assert np.abs((t[:, :3] * n).sum(1)).max() < 1e-5
    # along each face, the tangent points where u grows and cross(n, t) * w where v grows
    tf = t[f].mean(1)
    e1, e2 = v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]]
    d1, d2 = uv[f[:, 1]] - uv[f[:, 0]], uv[f[:, 2]] - uv[f[:, 0]]
    det = d1[:, 0] * d2[:, 1] - d2[:, 0] * d1[:, 1]
    ok = np.abs(det) > 1e-9
    du = ((e1 * d2[:, 1:2] - e2 * d1[:, 1:2]) / det[:, None])[ok]
    dv = ((e2 * d1[:, 0:1] - e1 * d2[:, 0:1]) / det[:, None])[ok]
    nf = n[f].mean(1)[ok]
    assert ((tf[ok, :3] * du).sum(1) > 0).mean() > 0.99
    assert ((np.cross(nf, tf[ok, :3]) * tf[ok, 3:] * dv).sum(1) > 0).mean() > 0.99


def test_normal_map_bake_encodes_the_detail_normals(sphere):
    nmap, charts = bake_normal_map(*sphere, detail_normals, 256)
    assert nmap.shape == (256, 256, 3) and 0.3 < charts.mean() < 0.9
    c, cn, ct, rgb = _at_centroids(sphere, nmap)
    back = decode_tangent_normals(rgb, cn, ct)
    err = _angles(back, detail_normals(c))
    own = _angles(cn / np.linalg.norm(cn, axis=1, keepdims=True), detail_normals(c))
    assert np.median(err) < 2.0 and np.median(own) > 10.0, (np.median(err), np.median(own))


def test_normal_map_of_the_mesh_itself_is_flat(sphere):
    nmap, charts = bake_normal_map(*sphere, lambda p, n: n, 128)
    np.testing.assert_allclose(nmap[charts], np.broadcast_to([0.5, 0.5, 1.0], nmap[charts].shape), atol=2e-3)
    # unknown detail (NaN rows) keeps the face's own normal too
    nan_map, _ = bake_normal_map(*sphere, lambda p, n: np.full_like(p, np.nan), 128)
    np.testing.assert_allclose(nan_map[charts], nmap[charts], atol=1e-6)


def test_field_normals_point_out_of_a_ball_and_refuse_the_other_side():
    R = 48
    ax = (np.arange(R) - (R - 1) / 2) * (2.0 / R)
    x, y, z = np.meshgrid(ax, ax, ax, indexing="ij")
    r = np.sqrt(x * x + y * y + z * z)
    values = 1.0 / (1.0 + np.exp((r - 0.6) / 0.05))  # a soft ball of radius 0.6, level 0.5 on its surface
    fn = FieldNormals(values, np.array([ax[0]] * 3), float(ax[1] - ax[0]), 0.5)
    rng = np.random.default_rng(0)
    d = rng.normal(size=(500, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    got = fn(0.6 * d, d, 0.3)
    assert np.isfinite(got).all()
    assert np.percentile(_angles(got, d), 95) < 3.0
    assert np.isnan(fn(0.6 * d, -d, 0.3)).all()  # a sheet facing the other way is not this surface


def _glb_json(data: bytes) -> dict:
    (n,) = struct.unpack_from("<I", data, 12)
    return json.loads(data[20:20 + n])


def test_glb_carries_the_pbr_material_and_reads_it_back(sphere):
    v, f, uv, n = sphere
    nmap, _ = bake_normal_map(*sphere, detail_normals, 64)
    tex = np.full((32, 32, 3), 0.5, np.float32)
    data = write_glb(TexturedMesh(v, f, uv, tex, n, normal_map=nmap, metallic=1.0, roughness=0.35))
    g = _glb_json(data)
    mat = g["materials"][0]
    assert "normalTexture" in mat and mat["normalTexture"]["index"] != mat["pbrMetallicRoughness"]["baseColorTexture"]["index"]
    assert mat["pbrMetallicRoughness"]["metallicFactor"] == 1.0 and mat["pbrMetallicRoughness"]["roughnessFactor"] == 0.35
    prim = g["meshes"][0]["primitives"][0]
    assert g["accessors"][prim["attributes"]["TANGENT"]]["type"] == "VEC4"
    p = read_glb(data)[0]
    assert p.metallic == 1.0 and p.roughness == pytest.approx(0.35)
    assert np.abs(p.normal_map - nmap).max() <= 0.5 / 255 + 1e-6  # 8-bit PNG
    # tangents as stored: the Z-up frame mapped to glTF's Y-up, handedness kept
    t = vertex_tangents(v, f, uv, n)
    np.testing.assert_allclose(p.tangents[:, :3], np.stack([t[:, 0], t[:, 2], -t[:, 1]], 1), atol=1e-6)
    np.testing.assert_array_equal(p.tangents[:, 3], t[:, 3])
    # without a normal map: the plain base-colour material of before
    g2 = _glb_json(write_glb(TexturedMesh(v, f, uv, tex, n)))
    assert "normalTexture" not in g2["materials"][0]
    assert "TANGENT" not in g2["meshes"][0]["primitives"][0]["attributes"]


def test_refine_keeps_a_meshs_normal_map_and_tangents(sphere):
    from backend.pipeline.refine import mesh_from_glb

    v, f, uv, n = sphere
    nmap, _ = bake_normal_map(*sphere, detail_normals, 64)
    data = write_glb(TexturedMesh(v, f, uv, np.full((32, 32, 3), 0.5, np.float32), n, normal_map=nmap, roughness=0.4))
    mesh, source = mesh_from_glb(data)
    assert source == "input" and mesh.normal_map is not None and mesh.roughness == pytest.approx(0.4)
    again = read_glb(write_glb(mesh))[0]
    np.testing.assert_array_equal(again.tangents, read_glb(data)[0].tangents)
    assert np.abs(again.normal_map - read_glb(data)[0].normal_map).max() == 0.0


@pytest.mark.parametrize("prompt,metallic,roughness,source", [
    ("a red wooden chair", 0.0, 0.7, "wooden"),
    ("a wooden chair with steel legs", 0.0, 0.7, "wooden"),
    ("an old rusty steel robot", 1.0, 0.7, "rusty"),
    ("Chrome teapot", 1.0, 0.15, "chrome"),
    ("a pile of stones", 0.0, 0.9, "stone"),
    ("a cute cat", DEFAULT_METALLIC, DEFAULT_ROUGHNESS, "default"),
    ("", DEFAULT_METALLIC, DEFAULT_ROUGHNESS, "default"),
])
def test_material_words_of_the_prompt(prompt, metallic, roughness, source):
    f = material_factors(prompt)
    assert (f.metallic, f.roughness, f.source) == (metallic, roughness, source)


def test_explicit_factors_win_and_albedo_keeps_the_old_material():
    f = material_factors("a steel robot", metallic=-1.0, roughness=0.9)
    assert (f.metallic, f.roughness) == (1.0, 0.9)
    f = material_factors("a steel robot", metallic=0.0, roughness=0.2)
    assert (f.metallic, f.roughness, f.source) == (0.0, 0.2, "request")
    b = BakeSettings()
    info = apply_material(b, {"material": "albedo", "prompt": "a steel robot", "metallic": -1.0, "roughness": -1.0})
    assert (b.normal_map, b.metallic, b.roughness) == (False, 0.0, 1.0) and info["kind"] == "albedo"
    info = apply_material(b, {"material": "pbr", "prompt": "a steel robot", "metallic": -1.0, "roughness": -1.0})
    assert (b.normal_map, b.metallic, b.roughness) == (True, 1.0, 0.35) and info["from"] == "steel"


def test_no_background_shows_through_the_seams_at_four_times_the_texel_density(sphere):
    """A texture baked onto xatlas charts (128 px, 4 texels between charts), rendered so that
    a texel covers about 4 x 4 pixels: no pixel inside the silhouette has the background's
    white or an empty texel's black. The control, the same texture with its gutters
    emptied, shows them along the seams."""
    import torch

    from backend.common import cameras as cam
    from backend.common.metrics import seam_pixels
    from backend.mesh.bake import BakeView, bake_texture, sphere_cameras
    from backend.mesh.raster import interpolate, rasterize_mesh, rasterize_uv
    from backend.mesh.textured import render_mesh_rgba

    v, f, uv, n = sphere
    V, F = torch.as_tensor(v, dtype=torch.float32), torch.as_tensor(f)

    def colour(p):  # a smooth colour field well away from black and white
        return 0.3 + 0.2 * (np.sin(3 * p) + 1.0)

    views = []
    for c2w, k in sphere_cameras(np.zeros(3), 3.0, 40.0, 96):
        r = rasterize_mesh(V, F, c2w, k)
        pos = interpolate(r, V, F).numpy()
        rgba = np.concatenate([colour(pos), r.mask.numpy()[..., None]], -1).astype(np.float32)
        views.append(BakeView(c2w, k, rgba))
    S = 128
    tex, _ = bake_texture(v, f, uv, n, views, BakeSettings(texture_size=S))
    charts = rasterize_uv(torch.as_tensor(uv, dtype=torch.float32), F, S).mask.numpy()
    mesh = TexturedMesh(v, f, uv, tex, n)
    # charts hold ~0.5 of 128^2 texels over the sphere's 4 pi: a texel ~0.04 wide, ~5 px here (measured: 0
    # such pixels; 48-52 in the control)
    size = 320
    k = cam.Intrinsics.from_fov(np.radians(40.0), size, size)
    bad = {"white": [1.0, 1.0, 1.0], "black": [0.0, 0.0, 0.0]}
    counts, control = [], []
    for el, az in ((20.0, 30.0), (-35.0, 160.0), (70.0, 250.0)):
        c2w = cam.spherical_to_c2w(el, az, 3.2)
        counts.append(seam_pixels(render_mesh_rgba(mesh, c2w, k, 1), np.array(list(bad.values()))))
        empty = mesh.copy(texture=tex * charts[..., None])
        control.append(seam_pixels(render_mesh_rgba(empty, c2w, k, 1), np.array(list(bad.values()))))
    assert max(counts) <= 3, counts
    assert min(control) > 30, control


def test_a_material_factor_out_of_range_is_a_clear_error(sphere):
    from backend.common.errors import InputError

    v, f, uv, n = sphere
    data = write_glb(TexturedMesh(v, f, uv, np.full((8, 8, 3), 0.5, np.float32), n, roughness=0.5))
    bad = data.replace(b'"roughnessFactor":0.5', b'"roughnessFactor":7.0')
    assert bad != data
    with pytest.raises(InputError, match="outside"):
        read_glb(bad)
