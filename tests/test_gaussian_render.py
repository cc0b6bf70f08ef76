"""The PyTorch Gaussian renderer against a brute-force reference, its gradient
against finite differences, and (on a GPU) against gsplat."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from backend.common import cameras as cam
from backend.gaussians.model import Gaussians, load_ply, save_ply
from backend.gaussians import render as R
from backend.gaussians.render import covariances, project, rasterize, rasterize_torch


def scene(n=60, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(n, 3, generator=g, dtype=dtype) * 0.3
    quats = torch.randn(n, 4, generator=g, dtype=dtype)
    log_scales = torch.log(torch.rand(n, 3, generator=g, dtype=dtype) * 0.08 + 0.02)
    opac_logit = torch.randn(n, generator=g, dtype=dtype)
    colors = torch.rand(n, 3, generator=g, dtype=dtype)
    return means, quats, log_scales, opac_logit, colors


def cameras(dtype=torch.float32, w=20, h=14):
    c2w = np.stack([cam.spherical_to_c2w(10, 20, 2.5), cam.spherical_to_c2w(-30, 200, 3.0)])
    vm = torch.tensor(cam.c2w_to_viewmat(c2w), dtype=dtype)
    K = torch.tensor([[[22.0, 0, 9.0], [0, 23.0, 7.5], [0, 0, 1]], [[18.0, 0, 10.0], [0, 18.0, 7.0], [0, 0, 1]]], dtype=dtype)
    return vm, K, w, h


def brute_force(means, quats, scales, opac, colors, vm, K, w, h, bg):
    """Every pixel, every Gaussian, sorted by depth, in float64 loops."""
    covs = covariances(quats.double(), scales.double())
    m2d, con, dep, _, valid = project(means.double(), covs, vm.double(), K.double(), w, h)
    out = np.zeros((len(vm), h, w, 3))
    acc = np.zeros((len(vm), h, w))
    for c in range(len(vm)):
        order = torch.argsort(dep[c]).tolist()
        for y in range(h):
            for x in range(w):
                T, col = 1.0, np.zeros(3)
                for i in order:
                    if not valid[c, i]:
                        continue
                    dx, dy = x + 0.5 - float(m2d[c, i, 0]), y + 0.5 - float(m2d[c, i, 1])
                    a_, b_, c_ = con[c, i].tolist()
                    s = 0.5 * (a_ * dx * dx + c_ * dy * dy) + b_ * dx * dy
                    if s < 0:
                        continue
                    alpha = min(0.999, float(opac[i]) * math.exp(-s))
                    if alpha < 1 / 255:
                        continue
                    col += alpha * T * colors[i].double().numpy()
                    T *= 1 - alpha
                out[c, y, x] = col + T * bg[c].numpy()
                acc[c, y, x] = 1 - T
    return out, acc


def test_matches_brute_force():
    means, quats, log_scales, opac_logit, colors = scene()
    vm, K, w, h = cameras()
    bg = torch.tensor([[1.0, 1.0, 1.0], [0.2, 0.4, 0.6]])
    img, alpha, meta = rasterize_torch(means, quats, log_scales.exp(), torch.sigmoid(opac_logit), colors, vm, K, w, h,
                                       backgrounds=bg)
    ref, ref_a = brute_force(means, quats, log_scales.exp(), torch.sigmoid(opac_logit), colors, vm, K, w, h, bg)
    assert img.shape == (2, h, w, 3) and alpha.shape == (2, h, w, 1)
    np.testing.assert_allclose(img.numpy(), ref, atol=2e-5)
    np.testing.assert_allclose(alpha[..., 0].numpy(), ref_a, atol=2e-5)
    assert ref_a.max() > 0.9 and ref_a.min() < 0.05  # the scene is neither empty nor full
    # what gsplat's strategies read
    assert meta["radii"].shape == (2, len(means), 2) and meta["means2d"].shape == (2, len(means), 2)
    assert meta["width"] == w and meta["height"] == h and meta["n_cameras"] == 2


def test_expected_depth_of_an_opaque_blob():
    means = torch.tensor([[0.0, 0.0, 0.0]])
    g = Gaussians.create(means, torch.tensor([[0.5, 0.5, 0.5]]), 0.3, opacity=0.999)
    c2w = cam.spherical_to_c2w(0, 0, 2.0)
    k = cam.Intrinsics.from_fov(math.radians(40), 16, 16)
    col, al, _ = g.render(c2w[None], k, background=None, render_mode="ED")
    assert float(col[0, 8, 8, 0]) == pytest.approx(2.0, abs=1e-4)
    assert float(al[0, 8, 8, 0]) > 0.95  # half a pixel off the centre of a 0.999-opaque blob


def test_gradient_matches_finite_differences():
    torch.manual_seed(0)
    means, quats, log_scales, opac_logit, colors = scene(n=8, seed=3, dtype=torch.float64)
    vm, K, w, h = cameras(torch.float64, 12, 10)
    weights = torch.rand(2, h, w, 4, dtype=torch.float64)
    bg = torch.tensor([[0.3, 0.2, 0.1], [0.9, 0.5, 0.4]], dtype=torch.float64)

    def loss(m, q, ls, ol, c):
        img, a, _ = rasterize_torch(m, q, ls.exp(), torch.sigmoid(ol), c, vm, K, w, h, backgrounds=bg)
        return (torch.cat([img, a], -1) * weights).sum()

    params = [t.clone().requires_grad_(True) for t in (means, quats, log_scales, opac_logit, colors)]
    loss(*params).backward()
    eps = 1e-6
    rng = np.random.default_rng(0)
    checked = 0
    for pi, p in enumerate(params):
        for _ in range(4):
            idx = tuple(int(rng.integers(0, s)) for s in p.shape)
            plus = [t.detach().clone() for t in params]
            minus = [t.detach().clone() for t in params]
            plus[pi][idx] += eps
            minus[pi][idx] -= eps
            fd = (loss(*plus) - loss(*minus)).item() / (2 * eps)
            an = p.grad[idx].item()
            assert an == pytest.approx(fd, rel=1e-3, abs=1e-6), (pi, idx, an, fd)
            checked += abs(fd) > 1e-4
    assert checked >= 8  # most probes hit Gaussians that matter


def test_ply_round_trip(tmp_path):
    means, quats, log_scales, opac_logit, colors = scene(n=30)
    g = Gaussians({"means": means, "quats": quats, "scales": log_scales, "opacities": opac_logit,
                   "sh0": torch.randn(30, 1, 3), "shN": torch.randn(30, 3, 3)}, sh_degree=1)
    save_ply(g, tmp_path / "g.ply")
    raw = (tmp_path / "g.ply").read_bytes()
    assert raw.startswith(b"ply\nformat binary_little_endian 1.0\nelement vertex 30\n")
    assert b"property float f_rest_44\n" in raw and b"property float rot_3\n" in raw
    h = load_ply(tmp_path / "g.ply", sh_degree=1)
    for k in ("means", "scales", "opacities", "sh0", "shN"):
        np.testing.assert_allclose(h.params[k].numpy(), g.params[k].numpy(), rtol=1e-6, atol=1e-6)
    q = g.params["quats"] / g.params["quats"].norm(dim=1, keepdim=True)
    np.testing.assert_allclose(h.params["quats"].numpy(), q.numpy(), atol=1e-6)


def test_depth_modes_take_colour_backgrounds():
    """One contract on both paths (gsplat's): ``backgrounds`` names the colour
    channels only, the renderer gives depth a background of 0 itself."""
    means, quats, log_scales, opac_logit, colors = scene()
    vm, K, w, h = cameras()
    args = (means, quats, log_scales.exp(), torch.sigmoid(opac_logit), colors, vm, K, w, h)
    bg = torch.tensor([[1.0, 1.0, 1.0], [0.2, 0.4, 0.6]])
    rgb, a, _ = rasterize_torch(*args, backgrounds=bg)
    ed, _, _ = rasterize_torch(*args, render_mode="ED")
    for mode in ("RGB+D", "RGB+ED"):
        out, a2, _ = rasterize_torch(*args, backgrounds=bg, render_mode=mode)
        assert out.shape == (2, h, w, 4)
        np.testing.assert_allclose(out[..., :3].numpy(), rgb.numpy(), atol=1e-6)
        if mode == "RGB+ED":
            np.testing.assert_allclose(out[..., 3].numpy(), ed[..., 0].numpy(), atol=1e-5)
        else:
            np.testing.assert_allclose(out[..., 3].numpy(), (ed * a)[..., 0].numpy(), atol=1e-5)
    d, _, _ = rasterize_torch(*args, backgrounds=bg, render_mode="ED")
    np.testing.assert_allclose(d.numpy(), ed.numpy(), atol=1e-6)
    # and through the model, which passes its background as colour only
    g = Gaussians({"means": means, "quats": quats, "scales": log_scales, "opacities": opac_logit,
                   "sh0": ((colors - 0.5) / R._SH_C0)[:, None, :]})
    c2w = cam.viewmat_to_c2w(vm.numpy())
    k = cam.Intrinsics(22.0, 23.0, 9.0, 7.5, w, h)
    col, al, _ = g.render(c2w[:1], k, background=(0.2, 0.4, 0.6), render_mode="RGB+ED")
    plain, _, _ = g.render(c2w[:1], k, background=(0.2, 0.4, 0.6))
    assert col.shape[-1] == 4
    np.testing.assert_allclose(col[..., :3].numpy(), plain.numpy(), atol=1e-6)
    assert float(col[..., 3].max()) > 1.5  # depths, not a background colour


class _FakeBackend:
    """Stands in for ``gsplat.cuda._backend`` in ``sys.modules``."""

    def __init__(self, ext):
        self._C = ext


@pytest.fixture
def fresh_gsplat_probe():
    R.reset_gsplat_status()
    yield
    R.reset_gsplat_status()


def test_gsplat_without_its_compiled_extension_falls_back(monkeypatch, fresh_gsplat_probe, caplog):
    """gsplat imports fine without a CUDA toolkit but sets its extension to None;
    then the PyTorch renderer must run, and say so once."""
    import sys

    pytest.importorskip("gsplat")
    monkeypatch.setitem(sys.modules, "gsplat.cuda._backend", _FakeBackend(None))
    with caplog.at_level("WARNING", logger="gen3d.render"):
        assert R.gsplat_available("cuda") is False
        assert R.gsplat_available("cuda:0") is False
        info = R.renderer_info("cuda")
    assert info["renderer"] == "torch" and "not available" in info["gsplat"]
    assert R.renderer_name("cuda") == "torch"
    lines = [r for r in caplog.records if "PyTorch renderer" in r.getMessage()]
    assert len(lines) == 1
    assert R.renderer_info("cpu")["renderer"] == "torch"


def test_gsplat_decision_is_probed_once(monkeypatch, fresh_gsplat_probe):
    import sys

    pytest.importorskip("gsplat")
    monkeypatch.setitem(sys.modules, "gsplat.cuda._backend", _FakeBackend(object()))
    assert R.gsplat_status(check=False) == (None, "not checked yet")
    assert R.renderer_info("cuda", check=False)["renderer"] == "undecided"
    assert R.gsplat_available("cuda") is True
    assert R.renderer_info("cuda")["renderer"] == "gsplat"
    # cached: a later change of the module is not seen until reset
    monkeypatch.setitem(sys.modules, "gsplat.cuda._backend", _FakeBackend(None))
    assert R.gsplat_available("cuda") is True
    assert R.gsplat_available("cpu") is False


def test_gsplat_build_failure_falls_back(monkeypatch, fresh_gsplat_probe):
    import builtins

    pytest.importorskip("gsplat")
    real_import = builtins.__import__

    def failing(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "gsplat.cuda" and fromlist and "_backend" in fromlist:
            raise RuntimeError("Error building extension 'gsplat_cuda'\nninja: build stopped")
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.setattr(builtins, "__import__", failing)
    usable, why = R.gsplat_status()
    assert usable is False and "failed to build or load" in why and "gsplat_cuda" in why


def test_diagnose_reports_the_renderer():
    from backend.kinds.diagnose import diagnose

    rep = diagnose("cpu")
    assert rep.renderer == {"renderer": "torch", "gsplat": "not used off CUDA"}


needs_gsplat_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or not R.gsplat_status()[0],
    reason="parity with gsplat needs a CUDA GPU and gsplat's compiled extension")


def _gpu_scene(requires_grad=False):
    means, quats, log_scales, opac_logit, colors = [t.cuda() for t in scene(n=2000, seed=5)]
    means = means * 2
    vm, K, w, h = [x.cuda() if torch.is_tensor(x) else x for x in cameras(w=96, h=64)]
    K = K * 4
    K[:, 2, 2] = 1
    params = [means, quats, log_scales, opac_logit, colors]
    if requires_grad:
        params = [p.clone().requires_grad_(True) for p in params]
    return params, vm, K, w, h


@pytest.mark.gpu
@needs_gsplat_cuda
def test_parity_with_gsplat():
    from gsplat import rasterization

    (means, quats, log_scales, opac_logit, colors), vm, K, w, h = _gpu_scene()
    args = (means, quats, log_scales.exp(), torch.sigmoid(opac_logit), colors, vm, K, w, h)
    bg = torch.tensor([[1.0, 1.0, 1.0], [0.2, 0.4, 0.6]], device="cuda")
    ours, oa, _ = rasterize_torch(*args, backgrounds=bg)
    ref, ra, _ = rasterization(*args, backgrounds=bg, packed=False)
    print(f"gsplat parity: colour mean |d| {(ours - ref).abs().mean().item():.2e} max {(ours - ref).abs().max().item():.2e}, "
          f"alpha mean |d| {(oa - ra).abs().mean().item():.2e}")
    assert (ours - ref).abs().mean().item() < 1e-3
    assert (oa - ra).abs().mean().item() < 1e-3
    assert (ours - ref).abs().max().item() < 2e-2


@pytest.mark.gpu
@needs_gsplat_cuda
def test_depth_contract_on_gsplat():
    """rasterize() gives the same RGB+D / RGB+ED / ED on both paths with colour-only backgrounds."""
    (means, quats, log_scales, opac_logit, colors), vm, K, w, h = _gpu_scene()
    args = (means, quats, log_scales.exp(), torch.sigmoid(opac_logit), colors, vm, K, w, h)
    bg = torch.tensor([[1.0, 1.0, 1.0], [0.2, 0.4, 0.6]], device="cuda")
    for mode in ("RGB+D", "RGB+ED", "ED"):
        a, aa, _ = rasterize(*args, backgrounds=bg, render_mode=mode, backend="torch")
        b, ba, _ = rasterize(*args, backgrounds=bg, render_mode=mode, backend="gsplat")
        assert a.shape == b.shape, mode
        d = (a - b).abs()
        rel = d[..., -1].mean().item() / b[..., -1].abs().mean().item()
        print(f"{mode}: mean |d| colour {d[..., :-1].mean().item() if a.shape[-1] > 1 else 0:.2e}, depth rel {rel:.2e}")
        assert rel < 2e-3, mode
        if a.shape[-1] > 1:
            assert d[..., :-1].mean().item() < 1e-3, mode


@pytest.mark.gpu
@needs_gsplat_cuda
def test_gradients_match_gsplat():
    from gsplat import rasterization

    weights = torch.rand(2, 64, 96, 4, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    grads = []
    for fn in (lambda *a: rasterize_torch(*a), lambda *a: rasterization(*a, packed=False)):
        params, vm, K, w, h = _gpu_scene(requires_grad=True)
        means, quats, log_scales, opac_logit, colors = params
        img, al, _ = fn(means, quats, log_scales.exp(), torch.sigmoid(opac_logit), colors, vm, K, w, h)
        (torch.cat([img, al], -1) * weights).sum().backward()
        grads.append([p.grad.detach() for p in params])
    for name, a, b in zip(("means", "quats", "scales", "opacities", "colors"), *grads):
        cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()
        rel = ((a - b).norm() / b.norm().clamp_min(1e-12)).item()
        print(f"grad {name}: cosine {cos:.5f}, relative difference {rel:.2e}")
        assert cos > 0.99, name


def test_a_binding_view_vetoes_the_hull_outside_its_mask_and_frame():
    """The user's reference is right where generated views are not: a point outside its
    mask, or outside its frame, is not inside the hull, whatever the other views say."""
    from backend.common.dataset import PosedViews
    from backend.gaussians.init import inside_hull

    k = cam.Intrinsics.from_fov(math.radians(40.0), 32, 32)
    c2w = np.stack([cam.spherical_to_c2w(0.0, az, 3.0) for az in (0.0, 90.0, 180.0)])
    images = np.ones((3, 32, 32, 4), np.float32)
    images[0, ..., 3] = 0.0
    images[0, 8:24, 8:24, 3] = 1.0  # the reference's mask: the middle of its frame
    views = PosedViews(images, c2w, [k] * 3)
    pts = np.array([[0.0, 0.0, 0.0],  # inside every mask
                    [0.0, 0.0, 0.8],  # above the reference's mask, inside the others'
                    [0.0, -2.5, 0.9]], np.float32)  # in front of the reference, outside its frame
    np.testing.assert_array_equal(inside_hull(pts, views, 0.6, dilate=0), [True, True, True])
    np.testing.assert_array_equal(inside_hull(pts, views, 0.6, dilate=0, binding=(0,)), [True, False, False])


def test_moved_gaussians_look_the_same_from_the_moved_camera():
    """``Gaussians.moved`` (the mesh's normalisation, applied to the PLY a generate job returns)
    is a similarity: the moved Gaussians seen from the camera moved alike render the same image,
    and the unmoved ones from that camera do not."""
    torch.manual_seed(0)
    g = Gaussians.create(torch.randn(200, 3) * 0.3 + torch.tensor([0.4, -0.2, 0.3]), torch.rand(200, 3), 0.06, 0.8)
    center, scale = np.array([0.4, -0.2, 0.3]), 2.5
    c2w = cam.spherical_to_c2w(15.0, 30.0, 3.0, center)
    moved_c2w = c2w.copy()
    moved_c2w[:3, 3] = (c2w[:3, 3] - center) * scale
    k = cam.Intrinsics.from_fov(math.radians(40), 48, 48)
    a, _, _ = g.render(c2w[None], k)
    b, _, _ = g.moved(center, scale).render(moved_c2w[None], k)
    c, _, _ = g.render(moved_c2w[None], k)
    assert float((a - b).abs().max()) < 1e-3
    assert float((a - c).abs().mean()) > 0.02
    m = g.moved(center, scale)
    np.testing.assert_allclose(m.means.numpy(), (g.means.numpy() - center) * scale, atol=1e-5)
    np.testing.assert_allclose(m.scales.numpy(), g.scales.numpy() * scale, rtol=1e-5)
