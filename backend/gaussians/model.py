"""3D Gaussians as trainable tensors, rendering helpers and the standard 3DGS ``.ply``.

Parameter names and activations follow gsplat's examples so that its
densification strategies apply unchanged: ``means`` [N,3], ``quats`` [N,4]
(w, x, y, z, unnormalised), ``scales`` [N,3] (log), ``opacities`` [N]
(logit), ``sh0`` [N,1,3] (degree-0 spherical harmonics, colour = 0.5 +
C0 * sh0) and optionally ``shN`` [N,K-1,3].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..common import cameras as cam
from .render import _SH_C0, rasterize

PARAM_NAMES = ("means", "quats", "scales", "opacities", "sh0", "shN")


def rgb_to_sh0(rgb: torch.Tensor) -> torch.Tensor:
    return (rgb - 0.5) / _SH_C0


def sh0_to_rgb(sh0: torch.Tensor) -> torch.Tensor:
    return (sh0 * _SH_C0 + 0.5).clamp(0.0, 1.0)


@dataclass
class Gaussians:
    params: dict[str, torch.Tensor]
    sh_degree: int = 0

    @classmethod
    def create(cls, means, rgb, scale, opacity: float = 0.5, sh_degree: int = 0) -> "Gaussians":
        """New Gaussians at ``means`` with colour ``rgb`` (in [0,1]) and isotropic ``scale``."""
        means = torch.as_tensor(means, dtype=torch.float32)
        n = len(means)
        rgb = torch.as_tensor(rgb, dtype=torch.float32).reshape(n, 3)
        scale = torch.as_tensor(scale, dtype=torch.float32)
        scales = torch.log(scale.reshape(-1, 1).expand(n, 3) if scale.numel() in (1, n) else scale.reshape(n, 3))
        quats = torch.zeros(n, 4)
        quats[:, 0] = 1.0
        p = {
            "means": means.clone(),
            "quats": quats,
            "scales": scales.clone(),
            "opacities": torch.full((n,), float(torch.logit(torch.tensor(opacity)))),
            "sh0": rgb_to_sh0(rgb)[:, None, :].clone(),
        }
        k = (sh_degree + 1) ** 2 - 1
        if k > 0:
            p["shN"] = torch.zeros(n, k, 3)
        return cls(p, sh_degree)

    def __len__(self) -> int:
        return int(self.params["means"].shape[0])

    @property
    def device(self) -> torch.device:
        return self.params["means"].device

    def to(self, device) -> "Gaussians":
        return Gaussians({k: v.detach().to(device) for k, v in self.params.items()}, self.sh_degree)

    def detach(self) -> "Gaussians":
        return Gaussians({k: v.detach().clone() for k, v in self.params.items()}, self.sh_degree)

    def moved(self, center, scale: float) -> "Gaussians":
        """The Gaussians under ``x -> (x - center) * scale`` (a mesh's normalisation):
        means moved, sizes scaled, orientations and colours kept."""
        p = {k: v.detach().clone() for k, v in self.params.items()}
        c = torch.as_tensor(np.asarray(center, np.float64), dtype=p["means"].dtype, device=p["means"].device)
        p["means"] = (p["means"] - c) * float(scale)
        p["scales"] = p["scales"] + math.log(float(scale))
        return Gaussians(p, self.sh_degree)

    # activated values
    @property
    def means(self) -> torch.Tensor:
        return self.params["means"]

    @property
    def scales(self) -> torch.Tensor:
        return torch.exp(self.params["scales"])

    @property
    def opacities(self) -> torch.Tensor:
        return torch.sigmoid(self.params["opacities"])

    @property
    def quats(self) -> torch.Tensor:
        return self.params["quats"]

    def sh_coeffs(self) -> torch.Tensor:
        if "shN" in self.params:
            return torch.cat([self.params["sh0"], self.params["shN"]], 1)
        return self.params["sh0"]

    def base_rgb(self) -> torch.Tensor:
        return sh0_to_rgb(self.params["sh0"][:, 0, :])

    def render(self, c2w, intrinsics: list[cam.Intrinsics] | cam.Intrinsics, background=(1.0, 1.0, 1.0),
               render_mode: str = "RGB", backend: str = "auto"):
        """Render from Blender-convention cameras: c2w [C,4,4] (numpy or tensor).
        Returns (colors [C,H,W,D], alphas [C,H,W,1], meta)."""
        dev = self.device
        c2w = np.asarray(c2w if not torch.is_tensor(c2w) else c2w.cpu().numpy(), np.float64).reshape(-1, 4, 4)
        intr = intrinsics if isinstance(intrinsics, list) else [intrinsics] * len(c2w)
        if len({(k.width, k.height) for k in intr}) != 1:
            raise ValueError("all cameras of one render call must share an image size")
        viewmats = torch.as_tensor(cam.c2w_to_viewmat(c2w), dtype=torch.float32, device=dev)
        Ks = torch.as_tensor(np.stack([k.K() for k in intr]), dtype=torch.float32, device=dev)
        W, H = intr[0].width, intr[0].height
        bg = None
        if background is not None:
            bgt = torch.as_tensor(background, dtype=torch.float32, device=dev)
            bg = bgt.reshape(-1, bgt.shape[-1]).expand(len(c2w), -1)  # colour channels only: see rasterize
        return rasterize(self.means, self.quats, self.scales, self.opacities, self.sh_coeffs(), viewmats, Ks, W, H,
                         sh_degree=self.sh_degree, backgrounds=bg, render_mode=render_mode, backend=backend)


# ---------------------------------------------------------------------------
# standard 3DGS .ply


def save_ply(g: Gaussians, path) -> None:
    """Write :func:`ply_bytes` to ``path``."""
    with open(path, "wb") as fh:
        fh.write(ply_bytes(g))


def ply_bytes(g: Gaussians) -> bytes:
    """The Gaussians as a standard 3DGS ``.ply`` (binary little endian):
    x y z nx ny nz f_dc_0..2 f_rest_0..44 opacity scale_0..2 rot_0..3, the
    layout common splat viewers read (degree-3 slots, zero where unused).
    Coordinates are the project's world frame (Z up)."""
    p = {k: v.detach().cpu().float().numpy() for k, v in g.params.items()}
    n = len(p["means"])
    f_dc = p["sh0"].reshape(n, 3)
    rest = np.zeros((n, 15, 3), np.float32)
    if "shN" in p:
        k = p["shN"].shape[1]
        rest[:, :k] = p["shN"]
    # 3DGS stores f_rest channel-major: all R coefficients, then G, then B
    f_rest = rest.transpose(0, 2, 1).reshape(n, 45)
    q = p["quats"] / np.linalg.norm(p["quats"], axis=1, keepdims=True).clip(1e-12)
    cols = [p["means"], np.zeros((n, 3), np.float32), f_dc, f_rest, p["opacities"].reshape(n, 1), p["scales"], q]
    data = np.concatenate(cols, 1).astype("<f4")
    names = (["x", "y", "z", "nx", "ny", "nz"] + [f"f_dc_{i}" for i in range(3)] + [f"f_rest_{i}" for i in range(45)]
             + ["opacity"] + [f"scale_{i}" for i in range(3)] + [f"rot_{i}" for i in range(4)])
    header = "ply\nformat binary_little_endian 1.0\n" + f"element vertex {n}\n"
    header += "".join(f"property float {nm}\n" for nm in names) + "end_header\n"
    return header.encode("ascii") + data.tobytes()


def load_ply(path, sh_degree: int | None = None) -> Gaussians:
    """Read a standard 3DGS ``.ply`` (as written by :func:`save_ply` or 3DGS trainers)."""
    with open(path, "rb") as fh:
        raw = fh.read()
    end = raw.index(b"end_header\n") + len(b"end_header\n")
    header = raw[:end].decode("ascii").splitlines()
    if "format binary_little_endian 1.0" not in header:
        raise ValueError(f"{path}: only binary little-endian PLY is supported")
    n = next(int(l.split()[2]) for l in header if l.startswith("element vertex"))
    names = [l.split()[2] for l in header if l.startswith("property float")]
    data = np.frombuffer(raw[end:end + n * len(names) * 4], dtype="<f4").reshape(n, len(names))
    col = {nm: i for i, nm in enumerate(names)}

    def get(prefix, count):
        return data[:, [col[f"{prefix}{i}"] for i in range(count)]]

    n_rest = sum(1 for nm in names if nm.startswith("f_rest_"))
    deg = int(round(math.sqrt(n_rest / 3 + 1))) - 1 if sh_degree is None else sh_degree
    params = {
        "means": torch.from_numpy(data[:, [col["x"], col["y"], col["z"]]].copy()),
        "quats": torch.from_numpy(get("rot_", 4).copy()),
        "scales": torch.from_numpy(get("scale_", 3).copy()),
        "opacities": torch.from_numpy(data[:, col["opacity"]].copy()),
        "sh0": torch.from_numpy(get("f_dc_", 3).copy())[:, None, :],
    }
    k = (deg + 1) ** 2 - 1
    if k > 0 and n_rest:
        rest = get("f_rest_", n_rest).reshape(n, 3, n_rest // 3).transpose(0, 2, 1)
        params["shN"] = torch.from_numpy(rest[:, :k].copy())
    return Gaussians(params, deg if "shN" in params else 0)
