"""Image-to-3D's 3D stage: score distillation on Gaussians (backend.pipeline.distill), view
confidence, iterative view updates, mesh topology.

The truth is a textured box rendered by our rasterizer (no Blender), in the generation
rig's frame (object at the origin, the reference camera at azimuth 0, distance RADIUS). The
oracle denoiser knows it; the degraded oracle views carry Zero-1-to-3-like faults."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from backend.common import cameras as cam
from backend.common.dataset import PosedViews
from backend.common.metrics import psnr_union
from backend.gaussians.model import Gaussians
from backend.gaussians.train import TrainSettings, train_gaussians
from backend.mesh.clean import mesh_topology
from backend.mesh.textured import TexturedMesh, render_mesh_rgba
from backend.pipeline.distill import DistillSettings, distill_gaussians
from backend.pipeline.generate import rig_views
from backend.pipeline.novel_views import RADIUS, plan_views, view_weights
from backend.pipeline.sds import OracleGuidance
from evaluation.oracle import DegradedOracleViews, OracleViews, RigTruth, ViewFaults

SIZE = 48
FOV = 49.1
HELD_OUT = [(el, az) for el in (0.0, 35.0) for az in (60.0, 90.0, 150.0, 210.0, 270.0)]


def _box() -> TexturedMesh:
    import trimesh

    from backend.mesh.uv import unwrap

    m = trimesh.creation.box((1.1, 0.45, 0.8))  # wide, shallow, tall: the reference (front) hides the depth
    vm, f, uv = unwrap(np.asarray(m.vertices), np.asarray(m.faces), 64)
    yy, xx = np.mgrid[0:64, 0:64] / 63.0
    tex = np.stack([0.15 + 0.75 * xx, 0.25 + 0.6 * yy, 0.85 - 0.7 * xx * yy], -1).astype(np.float32)
    return TexturedMesh(np.asarray(m.vertices)[vm], f.astype(np.int64), uv.astype(np.float32), tex)


@pytest.fixture(scope="module")
def box():
    return _box()


def _k(size=SIZE):
    return cam.Intrinsics.from_fov(math.radians(FOV), size, size)


def _reference(box):
    c2w = cam.spherical_to_c2w(0.0, 0.0, RADIUS)
    return render_mesh_rgba(box, c2w, _k(), supersample=3).astype(np.float32), c2w


def _ball(n=1000, radius=0.6, seed=0) -> Gaussians:
    rng = np.random.default_rng(seed)
    d = rng.normal(size=(n, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    pts = d * radius * rng.uniform(0, 1, (n, 1)) ** (1 / 3)
    return Gaussians.create(torch.tensor(pts, dtype=torch.float32), torch.full((n, 3), 0.5), 0.03, opacity=0.5)


@torch.no_grad()
def _held_out(g: Gaussians, box, size: int = SIZE) -> tuple[float, float]:
    """Mean mask IoU and union PSNR (on white) of the Gaussians against the truth."""
    ious, psnrs = [], []
    for el, az in HELD_OUT:
        c2w = cam.spherical_to_c2w(el, az, RADIUS)
        t = render_mesh_rgba(box, c2w, _k(size), supersample=3)
        col, al, _ = g.render(c2w[None], _k(size), background=None)
        a = al[0].numpy()
        pred = np.concatenate([col[0].numpy() / np.maximum(a, 1e-6), a], -1).clip(0, 1)
        m, tm = a[..., 0] > 0.5, t[..., 3] > 0.5
        ious.append((m & tm).sum() / max(1, (m | tm).sum()))
        psnrs.append(psnr_union(pred, t))
    return float(np.mean(ious)), float(np.mean(psnrs))


def test_mesh_topology_finds_holes_and_bad_edges():
    import trimesh

    m = trimesh.creation.icosphere(2)
    v, f = np.asarray(m.vertices), np.asarray(m.faces)
    t = mesh_topology(v, f)
    assert t["watertight"] and t["components"] == 1 and t["boundary_edges"] == 0
    holed = mesh_topology(v, f[1:])
    assert not holed["watertight"] and holed["boundary_edges"] == 3
    flipped = f.copy()
    flipped[0] = flipped[0, ::-1]
    assert mesh_topology(v, flipped)["flipped_edges"] == 3
    fin = np.concatenate([f, [[f[0, 0], f[0, 1], len(v)]]])  # a third face on one edge
    bad = mesh_topology(np.concatenate([v, [[2.0, 0, 0]]]), fin)
    assert bad["non_manifold_edges"] == 1 and not bad["watertight"]
    two = mesh_topology(np.concatenate([v, v + 3]), np.concatenate([f, f + len(v)]))
    assert two["components"] == 2 and two["watertight"]
    assert t["genus"] == 0 and two["genus"] == 0 and holed["genus"] is None
    torus = trimesh.creation.torus(1.0, 0.3)
    assert mesh_topology(np.asarray(torus.vertices), np.asarray(torus.faces))["genus"] == 1


def test_view_plan_sees_the_top_and_trusts_the_reference_side_most():
    poses = plan_views(12)
    top = [p for p in poses if p[0] >= 50]
    assert len(top) == 2 and len({round(p[1]) for p in top}) == 2
    w = view_weights(poses)
    assert np.all(w > 0) and np.all(w < 1.0)  # every generated view below the reference's 1
    az = np.array([p[1] for p in poses])
    facing = np.cos(np.radians(az))
    assert w[np.argmax(facing)] > 2 * w[np.argmin(facing)]  # beside the reference >> opposite it


@pytest.mark.parametrize("seed", [0, 1])
def test_the_views_common_elevation_error_is_found_from_their_silhouettes(box, seed):
    """Views made 6 degrees higher than asked (and 2 degrees of jitter each): the visual hull's
    agreement with their masks finds the shared error within 1.5 degrees of the views' mean
    error, and moving the cameras by it raises the agreement; perfect views are left where
    they are."""
    from backend.pipeline.generate import rig_views
    from backend.pipeline.view_pose import MIN_DEGREES, estimate_elevation_offset, hull_agreement, with_elevation_offset

    ref, _ = _reference(box)
    poses = plan_views(8)
    faults = ViewFaults(jitter_deg=2.0, elevation_bias_deg=6.0, scale_drift=0.0, blur_px=(0.0, 0.0), gain=0.0,
                        brightness=0.0, unseen=0.0)
    oracle = DegradedOracleViews("box", np.zeros(3), RADIUS, size=SIZE, mesh=box, seed=seed, faults=faults)
    rng = np.random.default_rng(seed)
    mean_error = float(np.mean([faults.draw(rng)["d_el"] for _ in poses]))
    views = rig_views(ref, oracle(ref, 0.0, poses), poses, 0.0)
    est = estimate_elevation_offset(views, np.zeros(3), range(1, len(views)))
    print("elevation offset", est.to_dict(), "views' mean error", mean_error)
    assert est.used and abs(est.degrees - mean_error) < 1.5, (est.to_dict(), mean_error)
    moved = with_elevation_offset(views.resized(96), est.value, np.zeros(3), range(1, len(views)))
    assert hull_agreement(moved, 96, range(1, len(views))) > est.agreement_at_zero + 0.005
    perfect = rig_views(ref, OracleViews("box", np.zeros(3), RADIUS, size=SIZE, mesh=box)(ref, 0.0, poses), poses, 0.0)
    still = estimate_elevation_offset(perfect, np.zeros(3), range(1, len(perfect)))
    assert abs(still.degrees) < MIN_DEGREES and not still.used and still.value == 0.0, still.to_dict()


def test_registering_the_generated_views_finds_each_ones_own_camera_error():
    """Views made from cameras 5 degrees off each (and 5 % nearer or farther), at random: the
    common offset cannot explain that, but registering each view to the Gaussians fitted so far,
    a few times during the fit, moves its camera toward the true one, and the Gaussians fitted
    from the moved cameras are sharper than those fitted from the asked ones. A box with a
    noisy texture at 64 px and 10 views (at 48 px and 8 views registration wanders off: the
    preset that fits such sizes, draft, does not register)."""
    import trimesh
    from scipy.ndimage import gaussian_filter

    from backend.mesh.uv import unwrap
    from backend.pipeline.view_pose import register_views

    size = 64
    m = trimesh.creation.box((1.1, 0.45, 0.8))
    vm, f, uv = unwrap(np.asarray(m.vertices), np.asarray(m.faces), 64)
    rng = np.random.default_rng(0)
    tex = np.stack([gaussian_filter(rng.uniform(0, 1, (128, 128)), 3) for _ in range(3)], -1)
    noisy = TexturedMesh(np.asarray(m.vertices)[vm], f.astype(np.int64), uv.astype(np.float32),
                         ((tex - tex.min()) / np.ptp(tex)).astype(np.float32))
    faults = ViewFaults(jitter_deg=5.0, elevation_bias_deg=0.0, scale_drift=0.05, blur_px=(0.0, 0.0), gain=0.0,
                        brightness=0.0, unseen=0.0)
    oracle = DegradedOracleViews("box", np.zeros(3), RADIUS, size=size, mesh=noisy, seed=0, faults=faults)
    ref = render_mesh_rgba(noisy, cam.spherical_to_c2w(0.0, 0.0, RADIUS), _k(size), supersample=3).astype(np.float32)
    poses = plan_views(10)
    rng = np.random.default_rng(0)
    draws = [faults.draw(rng) for _ in poses]
    views = rig_views(ref, oracle(ref, 0.0, poses), poses, 0.0, view_weights(poses))
    true = [cam.spherical_to_c2w(el + d["d_el"], az + d["d_az"], RADIUS * d["scale"]) for (el, az, _), d in zip(poses, draws)]

    def angle_rms(c2w):
        errs = []
        for M, T in zip(c2w[1:], true):
            (e0, a0, _), (e1, a1, _) = cam.c2w_to_spherical(M), cam.c2w_to_spherical(T)
            errs += [(a1 - a0 + 180) % 360 - 180, e1 - e0]
        return float(np.sqrt(np.mean(np.square(errs))))

    found = []

    def pose_update(g, v):
        c2w, reg = register_views(g, v, range(1, len(v)), np.zeros(3), origin=views.c2w)
        found.append(reg)
        return c2w

    ts = TrainSettings(iterations=300, init_points=1500, hull_resolution=32, hull_consistency=0.75)
    plain = train_gaussians(views, ts)
    ts.pose_update_at = (0.2, 0.3, 0.4, 0.5, 0.6)
    moved = train_gaussians(views, ts, pose_update=pose_update)
    assert len(found) == 5 and np.array_equal(moved.c2w[0], views.c2w[0])  # the reference stays where it is
    before, after = angle_rms(views.c2w), angle_rms(moved.c2w)

    (iou0, psnr0), (iou1, psnr1) = _held_out(plain.gaussians, noisy, size), _held_out(moved.gaussians, noisy, size)
    print("registration: camera error rms", before, "->", after, "held-out", (iou0, psnr0), "->", (iou1, psnr1),
          [r.to_dict() for r in found])
    # measured: 4.14 -> 2.49 degrees; IoU 0.908 -> 0.921, 17.48 -> 18.81 dB
    assert after < 0.75 * before, (before, after)
    assert iou1 >= iou0 and psnr1 >= psnr0 + 0.6, (iou0, psnr0, iou1, psnr1)


def test_score_distillation_pulls_a_wrong_shape_toward_the_truth(box):
    """From a ball and the front view alone, the oracle prior over random views must make
    the Gaussians box-shaped (IoU from the sides and above rises); the same stage without
    the prior (reference only) must not."""
    ref, c2w = _reference(box)
    views = PosedViews(ref[None], c2w[None], [_k()])
    init = _ball()
    iou0, _ = _held_out(init, box)
    prior = [OracleGuidance(RigTruth(box, np.zeros(3), 1.0), size=SIZE)]
    s = DistillSettings(steps=60, render_size=SIZE, views_weight=0.0)
    with_prior = distill_gaussians(init, views, prior, s)
    without = distill_gaussians(init, views, prior, DistillSettings(steps=60, render_size=SIZE, views_weight=0.0,
                                                                     prior_weight=0.0))
    iou1, _ = _held_out(with_prior.gaussians, box)
    iou_ctrl, _ = _held_out(without.gaussians, box)
    assert with_prior.report.prior_views["oracle"] == 60
    print("ball -> box: IoU", iou0, "with prior", iou1, "without", iou_ctrl)
    assert iou1 >= iou0 + 0.1 and iou1 >= iou_ctrl + 0.08, (iou0, iou1, iou_ctrl)


def test_the_wiener_oracle_keeps_what_the_noise_leaves_and_the_exact_one_does_not(box):
    """An SDEdit pass through the oracle from a render 8 degrees off: the exact posterior
    answers with the truth at any strength; the Wiener posterior, like a trained denoiser,
    keeps more of the input the less noise is added and moves toward the truth as it is
    raised, and leaves the background white."""
    from backend.pipeline.sds import View, sdedit_images

    truth = RigTruth(box, np.zeros(3), 1.0)
    view = View(cam.spherical_to_c2w(20.0, 120.0, RADIUS), _k(), 20.0, 120.0, RADIUS)
    target = truth([view])
    off = truth([View(cam.spherical_to_c2w(28.0, 128.0, RADIUS), _k(), 28.0, 128.0, RADIUS)])

    def psnr(a, b):
        return float(-10 * torch.log10(((a - b) ** 2).mean()))

    def edit(post, strength):
        g = OracleGuidance(truth, size=SIZE, posterior=post)
        return sdedit_images(g, off, [view], strength, 8, torch.Generator().manual_seed(0))

    start = psnr(off, target)
    assert psnr(edit("exact", 0.1), target) > 60 and psnr(edit("exact", 0.6), target) > 60
    low, mid, high = (edit("wiener", s) for s in (0.1, 0.35, 0.8))
    print("wiener: input vs truth", start, "to input", [psnr(x, off) for x in (low, mid, high)],
          "to truth", [psnr(x, target) for x in (low, mid, high)])
    assert psnr(low, off) > psnr(mid, off) + 1 > psnr(high, off) + 2  # less noise, more of the input kept
    assert start < psnr(low, target) < psnr(mid, target) < psnr(high, target) - 3
    empty = ((off < 0.999) | (target < 0.999)).any(1, keepdim=True).float()
    empty = torch.nn.functional.max_pool2d(empty, 9, 1, 4) == 0  # far from either object
    assert empty.sum() > 200 and float((1 - mid).abs().masked_select(empty.expand_as(mid)).max()) < 0.03
    with pytest.raises(ValueError, match="posterior"):
        OracleGuidance(truth, posterior="nearest")


def _degraded_views(box, n=6, seed=0):
    oracle = DegradedOracleViews("box", np.zeros(3), RADIUS, size=SIZE, mesh=box, seed=seed,
                                 faults=ViewFaults(jitter_deg=6.0, elevation_bias_deg=6.0, unseen=0.5))
    ref, _ = _reference(box)
    poses = plan_views(n)
    novel = oracle(ref, 0.0, poses)
    return rig_views(ref, novel, poses, 0.0, view_weights(poses)), oracle


def test_degraded_views_do_better_with_the_prior(box):
    """Views that disagree (pose jitter, elevation bias, blur, colour drift, a different
    unseen side each): the prior's Gaussians beat the same number of steps fitted to the
    views alone, in shape and in colour."""
    views, _ = _degraded_views(box)
    fit = train_gaussians(views, TrainSettings(iterations=60, init_points=1000, hull_resolution=32))
    prior = [OracleGuidance(RigTruth(box, np.zeros(3), 1.0), size=SIZE)]
    a = distill_gaussians(fit.gaussians, views, prior, DistillSettings(steps=90, render_size=SIZE))
    b = distill_gaussians(fit.gaussians, views, prior, DistillSettings(steps=90, render_size=SIZE, prior_weight=0.0,
                                                                      views_weight=0.5, views_mask_weight=1.0))
    iou_a, psnr_a = _held_out(a.gaussians, box)
    iou_b, psnr_b = _held_out(b.gaussians, box)
    print("degraded: with prior", iou_a, psnr_a, "without", iou_b, psnr_b)
    assert iou_a >= iou_b + 0.025 and psnr_a >= psnr_b + 1.5, (iou_a, psnr_a, iou_b, psnr_b)


def test_distillation_follows_the_prior_not_the_samples_it_was_fitted_to(box):
    """The Gaussians were fitted to the disagreeing samples already; during distillation
    their colours and outlines (each from a camera a few degrees off) would pull against the
    prior, which answers for the camera it was asked about. The defaults keep only a faint
    silhouette term, and do better than the old pull (colour 0.5, silhouettes 1.0) in colour
    without losing shape (the image-to-3D bench, degraded views: +0.65 to +2.81 dB)."""
    views, _ = _degraded_views(box)
    fit = train_gaussians(views, TrainSettings(iterations=60, init_points=1000, hull_resolution=32))
    prior = [OracleGuidance(RigTruth(box, np.zeros(3), 1.0), size=SIZE)]
    now = distill_gaussians(fit.gaussians, views, prior, DistillSettings(steps=90, render_size=SIZE))
    old = distill_gaussians(fit.gaussians, views, prior, DistillSettings(steps=90, render_size=SIZE, views_weight=0.5,
                                                                        views_mask_weight=1.0))
    iou_now, psnr_now = _held_out(now.gaussians, box)
    iou_old, psnr_old = _held_out(old.gaussians, box)
    print("prior over samples: now", iou_now, psnr_now, "old pull", iou_old, psnr_old)
    # measured: now 0.892 / 18.25 dB, the old pull 0.889 / 17.25 dB
    assert iou_now >= iou_old and psnr_now >= psnr_old + 0.6, (iou_now, psnr_now, iou_old, psnr_old)


def test_view_updates_bring_the_views_to_one_object(box):
    """Re-rendering the generated poses and passing them back through the prior replaces
    the disagreeing samples by views of one object: their disagreement with the Gaussians
    falls, and the updated targets sit closer to the truth than the samples did."""
    views, _ = _degraded_views(box, seed=1)
    fit = train_gaussians(views, TrainSettings(iterations=40, init_points=1000, hull_resolution=32))
    prior = [OracleGuidance(RigTruth(box, np.zeros(3), 1.0), size=SIZE)]
    s = DistillSettings(steps=30, render_size=SIZE, updates=2, update_start=0.2, update_strength=0.5, update_steps=4)
    r = distill_gaussians(fit.gaussians, views, prior, s)
    assert r.report.updates == 2
    assert r.report.view_disagreement < r.report.initial_disagreement, r.report
    clean = OracleViews("box", np.zeros(3), RADIUS, size=SIZE, mesh=box)
    truth = clean(views.images[0], 0.0, plan_views(6))
    before = np.mean([psnr_union(v, t) for v, t in zip(views.images[1:], truth)])
    after = np.mean([psnr_union(v, t) for v, t in zip(r.views.images[1:], truth)])
    print("view updates: disagreement", r.report.initial_disagreement, r.report.view_disagreement, "psnr", before, after)
    assert after >= before + 5.0, (before, after)
    assert np.array_equal(r.views.images[0], views.images[0])  # the reference is never replaced


def test_distillation_is_deterministic_for_a_seed(box):
    ref, c2w = _reference(box)
    views = PosedViews(ref[None], c2w[None], [_k()])
    prior = [OracleGuidance(RigTruth(box, np.zeros(3), 1.0), size=32)]
    s = DistillSettings(steps=5, render_size=32, seed=3)
    a = distill_gaussians(_ball(300), views, prior, s).gaussians
    torch.rand(10)  # the caller's random state must not matter
    b = distill_gaussians(_ball(300), views, prior, s).gaussians
    for k in a.params:
        assert torch.equal(a.params[k], b.params[k]), k


def test_image_to_3d_of_a_closed_object_is_watertight_and_keeps_the_reference(box):
    """The whole job on the box, with the degraded views and the oracle prior at small
    settings: one closed, manifold part, and the side the reference saw shows the reference."""
    from backend.common.metrics import mask_iou
    from backend.pipeline.generate import GenerateSettings, image_to_3d
    from evaluation.oracle import ViewFaults

    oracle = DegradedOracleViews("box", np.zeros(3), RADIUS, size=256, mesh=box, seed=2)
    ref_c2w = cam.spherical_to_c2w(0.0, 0.0, RADIUS)
    reference = render_mesh_rgba(box, ref_c2w, _k(128), supersample=3).astype(np.float32)
    s = GenerateSettings(views=6, refine=False, resolution=SIZE, view_updates=1)
    s.reconstruct.train.iterations = 60
    s.reconstruct.train.init_points = 1500
    s.reconstruct.train.max_gaussians = 4000
    s.distill.steps = 40
    s.distill.render_size = SIZE
    s.reconstruct.mesh.grid_resolution = 64
    s.reconstruct.mesh.carve_views = 8
    s.reconstruct.mesh.clean.target_faces = 3000
    s.reconstruct.bake.texture_size = 256

    def prior(ref_rgba, elevation):
        return [OracleGuidance(RigTruth(box, np.zeros(3), 1.0, ViewFaults(), seed=3), size=SIZE)]

    res = image_to_3d(reference, oracle, s, prior=prior)
    st = res.stats
    assert st["watertight"] and st["components"] == 1, st
    # at these settings (48 px, 40 steps) the Gaussians' shell still has gaps: measured genus 34 with the solid's
    # small dents and tunnels filled (MeshSettings.fill_voxels 2), 70 without (107 when one view's depth could
    # carve); bench/image_to_3d.py's degraded suzanne at `standard`: 0 (25 without)
    assert st["genus"] <= 50, st
    assert st["view_updates"] == 1 and st["prior"] == ["oracle"]
    # back in the rig's frame (the box is framed there as the reference shows it)
    n = res.normalization
    mesh = res.mesh.copy(vertices=res.mesh.vertices / n["scale"] + np.asarray(n["center"]))
    seen = render_mesh_rgba(mesh, ref_c2w, _k(128), supersample=2)
    assert mask_iou(seen[..., 3], reference[..., 3]) > 0.9
    # the outline is held to the reference's mask (snapped): few pixels of surface where it shows background
    spill = int(((seen[..., 3] > 0.5) & (reference[..., 3] < 0.5)).sum())
    print("genus", st["genus"], "snapped", st["snapped_vertices"], "pixels outside the reference's mask", spill, "offset", st["view_elevation_offset"])
    # the views' shared elevation error (+5 degrees and jitter: 5.14 on average here) is found and applied
    # (measured 2.37 at these 48 px views)
    assert st["view_elevation_offset"]["used"] and 1.5 <= st["view_elevation_offset"]["degrees"] <= 8.0, st
    # (measured: 0 such pixels with snapping, 34 without)
    assert st["snapped_vertices"] > 0 and spill < 10, (st["snapped_vertices"], spill)
    good = psnr_union(seen, reference)
    # the same mesh with its texture scrambled (half a texture off in u and v): what the bar must reject
    scrambled = mesh.copy(texture=np.roll(mesh.texture, (mesh.texture.shape[0] // 2, mesh.texture.shape[1] // 2), (0, 1)))
    bad = psnr_union(render_mesh_rgba(scrambled, ref_c2w, _k(128), supersample=2), reference)
    # ... and the same mesh in one flat colour, the texture's mean: a blurred-out texture's limit
    flat = mesh.copy(texture=np.broadcast_to(mesh.texture.reshape(-1, mesh.texture.shape[-1]).mean(0), mesh.texture.shape).copy())
    plain = psnr_union(render_mesh_rgba(flat, ref_c2w, _k(128), supersample=2), reference)
    print("reference view PSNR", good, "scrambled texture", bad, "flat", plain)
    # measured: 32.07, scrambled 18.55, flat 20.82 (the bar was 20 once, which the flat colour passed)
    assert good > 26.0 and max(bad, plain) < 26.0 - 3.0, (good, bad, plain)
