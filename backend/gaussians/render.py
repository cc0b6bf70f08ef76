"""3D Gaussian rasterization: gsplat on CUDA, a PyTorch renderer everywhere else.

:func:`rasterize` takes and returns what ``gsplat.rasterization`` does
(``means, quats, scales, opacities, colors, viewmats, Ks, width, height`` ->
``render_colors [C,H,W,D], render_alphas [C,H,W,1], meta``), so the trainer
and gsplat's densification strategy work unchanged on either path.

The PyTorch path (:func:`rasterize_torch`) follows gsplat's maths: EWA
projection with the same Jacobian clamping, ``eps2d`` blur, conics, pixel
centres at +0.5, ``alpha = min(0.999, o * exp(-sigma))`` with contributions
under 1/255 dropped, front-to-back compositing in depth order. It lists every
(gaussian, pixel) pair that contributes, ordered by pixel and depth, and
composites them with segmented scans; the compositing step has an analytic
backward (as in 3DGS) and autograd does the rest, so gradients reach means,
quats, scales, opacities and colours. As in gsplat, a pixel stops before the
contribution that would take its transmittance under 1e-4: behind an opaque
surface most pairs are dropped before the backward pass.
"""

from __future__ import annotations

import logging
import threading
from typing import Literal

import torch
import torch.nn.functional as F

log = logging.getLogger("gen3d.render")

ALPHA_MIN = 1.0 / 255.0
ALPHA_MAX = 0.999
T_MIN = 1e-4  # a pixel is done once its transmittance would fall under this (gsplat's rule)


def quat_to_rotmat(quats: torch.Tensor) -> torch.Tensor:
    """(w, x, y, z) quaternions (normalised here) -> rotation matrices [..., 3, 3]."""
    q = F.normalize(quats, dim=-1)
    w, x, y, z = q.unbind(-1)
    return torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        -1,
    ).reshape(q.shape[:-1] + (3, 3))


def covariances(quats: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Sigma = R S S^T R^T, [N, 3, 3]."""
    M = quat_to_rotmat(quats) * scales[..., None, :]
    return M @ M.transpose(-1, -2)


def project(
    means: torch.Tensor,
    covars: torch.Tensor,
    viewmats: torch.Tensor,
    Ks: torch.Tensor,
    width: int,
    height: int,
    eps2d: float = 0.3,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
):
    """EWA projection of N Gaussians into C cameras.

    Returns means2d [C,N,2], conics [C,N,3] (a, b, c of the inverse 2D
    covariance), depths [C,N], cov2d diagonal [C,N,2] and a validity mask [C,N].
    """
    R = viewmats[:, :3, :3]
    t = viewmats[:, :3, 3]
    mc = torch.einsum("cij,nj->cni", R, means) + t[:, None, :]  # [C,N,3]
    cc = torch.einsum("cij,njk,clk->cnil", R, covars, R)  # [C,N,3,3]
    tx, ty, tz = mc.unbind(-1)
    fx, fy = Ks[:, 0, 0, None], Ks[:, 1, 1, None]
    cx, cy = Ks[:, 0, 2, None], Ks[:, 1, 2, None]
    tz_safe = torch.where(tz.abs() < 1e-6, torch.full_like(tz, 1e-6), tz)
    tan_fovx = 0.5 * width / fx
    tan_fovy = 0.5 * height / fy
    lim_x_pos = (width - cx) / fx + 0.3 * tan_fovx
    lim_x_neg = cx / fx + 0.3 * tan_fovx
    lim_y_pos = (height - cy) / fy + 0.3 * tan_fovy
    lim_y_neg = cy / fy + 0.3 * tan_fovy
    txc = tz_safe * torch.clamp(tx / tz_safe, min=-lim_x_neg, max=lim_x_pos)
    tyc = tz_safe * torch.clamp(ty / tz_safe, min=-lim_y_neg, max=lim_y_pos)
    zero = torch.zeros_like(tz)
    J = torch.stack([fx / tz_safe, zero, -fx * txc / tz_safe**2, zero, fy / tz_safe, -fy * tyc / tz_safe**2], -1)
    J = J.reshape(tz.shape + (2, 3))
    cov2d = J @ cc @ J.transpose(-1, -2)
    means2d = torch.stack([fx * tx / tz_safe + cx, fy * ty / tz_safe + cy], -1)
    a = cov2d[..., 0, 0] + eps2d
    b = 0.5 * (cov2d[..., 0, 1] + cov2d[..., 1, 0])
    c = cov2d[..., 1, 1] + eps2d
    det = a * c - b * b
    valid = (det > 0) & (tz > near_plane) & (tz < far_plane)
    det = det.clamp_min(1e-10)
    conics = torch.stack([c / det, -b / det, a / det], -1)
    return means2d, conics, tz, torch.stack([a, c], -1), valid


_SH_C0 = 0.28209479177387814
_SH_C1 = 0.4886025119029199
_SH_C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396)
_SH_C3 = (-0.5900435899266435, 2.890611442640554, -0.4570457994644658, 0.3731763325901154, -0.4570457994644658,
          1.445305721320277, -0.5900435899266435)


def eval_sh(degree: int, coeffs: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
    """Real spherical harmonics as in 3DGS: coeffs [..., K, 3], unit dirs [..., 3] -> RGB [..., 3] (+0.5, >= 0)."""
    out = _SH_C0 * coeffs[..., 0, :]
    if degree >= 1:
        x, y, z = dirs[..., 0:1], dirs[..., 1:2], dirs[..., 2:3]
        out = out - _SH_C1 * y * coeffs[..., 1, :] + _SH_C1 * z * coeffs[..., 2, :] - _SH_C1 * x * coeffs[..., 3, :]
        if degree >= 2:
            xx, yy, zz, xy, yz, xz = x * x, y * y, z * z, x * y, y * z, x * z
            out = (out + _SH_C2[0] * xy * coeffs[..., 4, :] + _SH_C2[1] * yz * coeffs[..., 5, :]
                   + _SH_C2[2] * (2 * zz - xx - yy) * coeffs[..., 6, :] + _SH_C2[3] * xz * coeffs[..., 7, :]
                   + _SH_C2[4] * (xx - yy) * coeffs[..., 8, :])
            if degree >= 3:
                out = (out + _SH_C3[0] * y * (3 * xx - yy) * coeffs[..., 9, :] + _SH_C3[1] * xy * z * coeffs[..., 10, :]
                       + _SH_C3[2] * y * (4 * zz - xx - yy) * coeffs[..., 11, :]
                       + _SH_C3[3] * z * (2 * zz - 3 * xx - 3 * yy) * coeffs[..., 12, :]
                       + _SH_C3[4] * x * (4 * zz - xx - yy) * coeffs[..., 13, :] + _SH_C3[5] * z * (xx - yy) * coeffs[..., 14, :]
                       + _SH_C3[6] * x * (xx - 3 * yy) * coeffs[..., 15, :])
    return torch.clamp_min(out + 0.5, 0.0)


def _pairs(means2d, conics, opacities, depths, radii, width: int, height: int):
    """Every (gaussian, pixel) pair whose alpha reaches 1/255, grouped by pixel and
    front to back within a pixel. Returns (gaussian ids [M], pixel ids [M])."""
    device = means2d.device
    vis = (radii > 0).all(-1) & (opacities >= ALPHA_MIN)
    ids = torch.nonzero(vis).squeeze(1)
    ids = ids[torch.argsort(depths[ids])]  # pairs are generated front to back...
    # opacity-aware extent: beyond it alpha < 1/255 and the pair is dropped anyway
    k = torch.sqrt(2.0 * torch.log((opacities[ids] / ALPHA_MIN).clamp_min(1.0))).clamp(max=3.33)
    cn = conics[ids]
    det = (cn[:, 0] * cn[:, 2] - cn[:, 1] ** 2).clamp_min(1e-20)
    ext = torch.sqrt(torch.stack([cn[:, 2] / det, cn[:, 0] / det], -1).clamp_min(0)) * k[:, None]
    m = means2d[ids]
    x0 = torch.ceil(m[:, 0] - ext[:, 0] - 0.5).clamp(0, width).long()
    x1 = torch.floor(m[:, 0] + ext[:, 0] - 0.5).clamp(-1, width - 1).long()
    y0 = torch.ceil(m[:, 1] - ext[:, 1] - 0.5).clamp(0, height).long()
    y1 = torch.floor(m[:, 1] + ext[:, 1] - 0.5).clamp(-1, height - 1).long()
    nx = (x1 - x0 + 1).clamp_min(0)
    cnt = nx * (y1 - y0 + 1).clamp_min(0)
    owner = torch.repeat_interleave(torch.arange(len(ids), device=device), cnt)
    j = torch.arange(len(owner), device=device) - (torch.cumsum(cnt, 0) - cnt)[owner]
    nxo = nx[owner]
    px = x0[owner] + j % nxo
    py = y0[owner] + torch.div(j, nxo, rounding_mode="floor")
    g = ids[owner]
    dx = px.to(means2d.dtype) + 0.5 - means2d[g, 0]
    dy = py.to(means2d.dtype) + 0.5 - means2d[g, 1]
    c = conics[g]
    sigma = 0.5 * (c[:, 0] * dx * dx + c[:, 2] * dy * dy) + c[:, 1] * dx * dy
    keep = (opacities[g] * torch.exp(-sigma) >= ALPHA_MIN) & (sigma >= 0)
    g, pix = g[keep], (py * width + px)[keep]
    order = torch.argsort(pix, stable=True)  # ...so a stable sort by pixel keeps depth order
    return g[order], pix[order]


def _pair_terms(g, pix, means2d, conics, opacities, width: int):
    px = (pix % width).to(means2d.dtype) + 0.5
    py = torch.div(pix, width, rounding_mode="floor").to(means2d.dtype) + 0.5
    dx = px - means2d[g, 0]
    dy = py - means2d[g, 1]
    c = conics[g]
    sigma = 0.5 * (c[:, 0] * dx * dx + c[:, 2] * dy * dy) + c[:, 1] * dx * dy
    e = torch.exp(-sigma)
    raw = opacities[g] * e
    return dx, dy, e, raw, raw.clamp_max(ALPHA_MAX)


class _Composite(torch.autograd.Function):
    """Front-to-back alpha compositing of per-pixel pair lists, with the analytic
    3DGS backward. Segmented (per pixel) scans use float64 global cumsums."""

    @staticmethod
    def forward(ctx, means2d, conics, opacities, feats, g, pix, width, height):
        n_pix = width * height
        dx, dy, e, raw, alpha = _pair_terms(g, pix, means2d, conics, opacities, width)
        log1m = torch.log1p(-alpha).double()
        excl = torch.cumsum(log1m, 0) - log1m
        counts = torch.bincount(pix, minlength=n_pix)
        starts = torch.cumsum(counts, 0) - counts
        T = torch.exp(excl - excl[starts[pix]]).to(alpha.dtype)  # transmittance before each pair
        # gsplat stops a pixel before the pair that would take its transmittance under T_MIN:
        # within a pixel T only falls, so what stays is a prefix of each pixel's list
        live = T * (1.0 - alpha) > T_MIN
        if not bool(live.all()):
            g, pix, dx, dy, e, raw, alpha, T = (x[live] for x in (g, pix, dx, dy, e, raw, alpha, T))
            counts = torch.bincount(pix, minlength=n_pix)
        w = alpha * T
        D = feats.shape[-1]
        out = feats.new_zeros(n_pix, D).index_add_(0, pix, w[:, None] * feats[g])
        acc = feats.new_zeros(n_pix).index_add_(0, pix, w)
        ctx.save_for_backward(conics, feats, g, pix, counts, T, alpha, raw, e, dx, dy)
        ctx.shapes = (means2d.shape, opacities.shape, width, height)
        return out.reshape(height, width, D), acc.reshape(height, width, 1)

    @staticmethod
    def backward(ctx, g_out, g_acc):
        conics, feats, g, pix, counts, T, alpha, raw, e, dx, dy = ctx.saved_tensors
        means_shape, opac_shape, width, height = ctx.shapes
        n_pix = width * height
        gC = g_out.reshape(n_pix, -1)[pix]
        gk = (gC * feats[g]).sum(-1) + g_acc.reshape(n_pix)[pix]  # dL/dC . f + dL/dA
        w = alpha * T
        cum = torch.cumsum((w * gk).double(), 0)
        ends = torch.cumsum(counts, 0)
        suffix = (cum[ends[pix] - 1] - cum).to(w.dtype)  # sum over the pixel's later pairs
        d_alpha = T * gk - suffix / (1.0 - alpha)
        d_alpha = torch.where(raw < ALPHA_MAX, d_alpha, torch.zeros_like(d_alpha))
        d_sigma = -raw * d_alpha
        c = conics[g]
        d_means = torch.zeros(means_shape, dtype=w.dtype, device=w.device).index_add_(
            0, g, torch.stack([-d_sigma * (c[:, 0] * dx + c[:, 1] * dy), -d_sigma * (c[:, 1] * dx + c[:, 2] * dy)], -1))
        d_conics = torch.zeros_like(conics).index_add_(
            0, g, torch.stack([0.5 * d_sigma * dx * dx, d_sigma * dx * dy, 0.5 * d_sigma * dy * dy], -1))
        d_opac = torch.zeros(opac_shape, dtype=w.dtype, device=w.device).index_add_(0, g, e * d_alpha)
        d_feats = torch.zeros_like(feats).index_add_(0, g, w[:, None] * gC)
        return d_means, d_conics, d_opac, d_feats, None, None, None, None


def _composite_camera(means2d, conics, opacities, feats, depths, radii, width: int, height: int):
    with torch.no_grad():
        g, pix = _pairs(means2d.detach(), conics.detach(), opacities.detach(), depths.detach(), radii, width, height)
    return _Composite.apply(means2d, conics, opacities, feats, g, pix, width, height)


def rasterize_torch(
    means: torch.Tensor,  # [N,3]
    quats: torch.Tensor,  # [N,4] (w,x,y,z), any norm
    scales: torch.Tensor,  # [N,3] (activated)
    opacities: torch.Tensor,  # [N] (activated)
    colors: torch.Tensor,  # [N,D] or [C,N,D], or SH [N,K,3] with sh_degree
    viewmats: torch.Tensor,  # [C,4,4] world-to-camera, OpenCV
    Ks: torch.Tensor,  # [C,3,3]
    width: int,
    height: int,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    eps2d: float = 0.3,
    sh_degree: int | None = None,
    backgrounds: torch.Tensor | None = None,  # [C,D] colour channels only, as gsplat: depth gets 0
    render_mode: Literal["RGB", "D", "ED", "RGB+D", "RGB+ED"] = "RGB",
    **unused,
):
    """Same contract as ``gsplat.rasterization`` (unpacked meta), in PyTorch."""
    C = viewmats.shape[0]
    N = means.shape[0]
    covars = covariances(quats, scales)
    means2d, conics, depths, cov_diag, valid = project(means, covars, viewmats, Ks, width, height, eps2d, near_plane, far_plane)
    with torch.no_grad():
        radius = torch.ceil(3.33 * torch.sqrt(cov_diag))
        inside = ((means2d[..., 0] + radius[..., 0] > 0) & (means2d[..., 0] - radius[..., 0] < width)
                  & (means2d[..., 1] + radius[..., 1] > 0) & (means2d[..., 1] - radius[..., 1] < height))
        radius = torch.where((valid & inside)[..., None], radius, torch.zeros_like(radius))
        radii = radius.int()

    if sh_degree is not None:
        campos = torch.linalg.inv(viewmats)[:, :3, 3]  # [C,3]
        dirs = F.normalize(means[None] - campos[:, None, :], dim=-1)  # [C,N,3]
        coeffs = colors if colors.dim() == 4 else colors[None].expand(C, *colors.shape)
        feats = eval_sh(sh_degree, coeffs, dirs)  # [C,N,3]
    else:
        feats = colors if colors.dim() == 3 else colors[None].expand(C, *colors.shape)

    want_color = render_mode in ("RGB", "RGB+D", "RGB+ED")
    want_depth = render_mode != "RGB"
    outs, alphas = [], []
    for ci in range(C):
        f = feats[ci] if want_color else feats.new_zeros(N, 0)
        if want_depth:
            f = torch.cat([f, depths[ci][:, None]], -1)
        img, a = _composite_camera(means2d[ci], conics[ci], opacities, f, depths[ci], radii[ci], width, height)
        if render_mode in ("ED", "RGB+ED"):
            img = torch.cat([img[..., :-1], img[..., -1:] / a.clamp_min(1e-10)], -1)
        outs.append(img)
        alphas.append(a)
    render_colors = torch.stack(outs)
    render_alphas = torch.stack(alphas)
    if backgrounds is not None:
        # gsplat's contract: backgrounds name the colour channels only; depth's background is 0
        if render_mode in ("RGB+D", "RGB+ED"):
            backgrounds = torch.cat([backgrounds, backgrounds.new_zeros(C, 1)], -1)
        elif render_mode in ("D", "ED"):
            backgrounds = backgrounds.new_zeros(C, 1)
        render_colors = render_colors + backgrounds[:, None, None, :] * (1.0 - render_alphas)
    meta = {
        "means2d": means2d,
        "conics": conics,
        "depths": depths,
        "radii": radii,
        "opacities": opacities[None].expand(C, N),
        "width": width,
        "height": height,
        "n_cameras": C,
        "gaussian_ids": None,
        "camera_ids": None,
    }
    return render_colors, render_alphas, meta


_gsplat_lock = threading.Lock()
_gsplat_probe: tuple[bool, str] | None = None  # (usable, why), decided once per process
_fallback_logged = False


def _probe_gsplat() -> tuple[bool, str]:
    """Can gsplat's CUDA kernels actually run here? ``import gsplat`` always works
    (its kernels load lazily); what matters is its compiled extension
    ``gsplat.cuda._backend._C``: a prebuilt one, or one JIT-compiled on this
    import (minutes, needs nvcc). Without a CUDA toolkit gsplat sets it to
    ``None`` and every rasterization call would raise ``AttributeError``."""
    try:
        import gsplat
    except Exception as exc:  # noqa: BLE001 - any import failure means "not usable"
        return False, f"gsplat is not installed ({type(exc).__name__}: {exc})"
    version = getattr(gsplat, "__version__", "?")
    try:
        from gsplat.cuda import _backend
    except Exception as exc:  # noqa: BLE001 - a failed JIT build raises all sorts
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        return False, f"gsplat {version}: its CUDA extension failed to build or load ({type(exc).__name__}: {first})"
    if getattr(_backend, "_C", None) is None:
        return False, (f"gsplat {version}: its CUDA extension is not available (no prebuilt kernels, and no CUDA "
                       "toolkit with nvcc to compile them)")
    return True, f"gsplat {version} with its CUDA extension"


def gsplat_status(check: bool = True) -> tuple[bool | None, str]:
    """(usable, reason) of gsplat on CUDA, probed once and cached. With
    ``check=False`` nothing is probed (a first probe may compile for minutes):
    ``(None, "not checked yet")`` until some caller has probed."""
    global _gsplat_probe
    if _gsplat_probe is None and check:
        with _gsplat_lock:
            if _gsplat_probe is None:
                _gsplat_probe = _probe_gsplat()
    return _gsplat_probe if _gsplat_probe is not None else (None, "not checked yet")


def reset_gsplat_status() -> None:
    """Forget the cached probe (tests)."""
    global _gsplat_probe, _fallback_logged
    with _gsplat_lock:
        _gsplat_probe = None
        _fallback_logged = False


def gsplat_available(device: torch.device | str) -> bool:
    """True when rasterization on ``device`` can use gsplat: a CUDA device and a
    gsplat whose compiled extension loaded. On CUDA without it, logs one line
    saying so and that the PyTorch renderer is used instead."""
    global _fallback_logged
    if torch.device(device).type != "cuda":
        return False
    usable, reason = gsplat_status()
    if not usable and not _fallback_logged:
        _fallback_logged = True
        log.warning("gsplat cannot run here (%s); rendering Gaussians with the PyTorch renderer on CUDA (slower)", reason)
    return bool(usable)


def renderer_name(device: torch.device | str) -> str:
    """``"gsplat"`` or ``"torch"``: which rasterizer runs on ``device`` (probes gsplat once)."""
    return "gsplat" if gsplat_available(device) else "torch"


def renderer_info(device: torch.device | str, check: bool = True) -> dict:
    """For capabilities, diagnose and job metadata: the renderer on ``device`` and why."""
    if torch.device(device).type != "cuda":
        return {"renderer": "torch", "gsplat": "not used off CUDA"}
    usable, reason = gsplat_status(check)
    if usable is None:
        return {"renderer": "undecided", "gsplat": reason}
    if not usable:
        gsplat_available(device)  # the one log line
    return {"renderer": "gsplat" if usable else "torch", "gsplat": reason}


def rasterize(means, quats, scales, opacities, colors, viewmats, Ks, width, height, *, backend: str = "auto", **kw):
    """gsplat on CUDA, :func:`rasterize_torch` otherwise (or as ``backend`` says)."""
    use_gsplat = backend == "gsplat" or (backend == "auto" and gsplat_available(means.device))
    if use_gsplat:
        from gsplat import rasterization

        return rasterization(means, quats, scales, opacities, colors, viewmats, Ks, width, height, packed=False, **kw)
    return rasterize_torch(means, quats, scales, opacities, colors, viewmats, Ks, width, height, **kw)
