"""Camera conventions: every conversion between the project's frames lives here.

World: Blender's, right-handed, Z up, metres.

Camera-to-world ("c2w"), the convention on the wire and on disk: a 4x4 matrix
exactly like a Blender camera's ``matrix_world`` and a NeRF-synthetic
``transform_matrix``: the camera looks down its local -Z axis, +Y is up, +X is
right (OpenGL).

gsplat wants world-to-camera ("viewmat") in the OpenCV convention: x right,
y down, z forward. The two camera frames differ by a rotation of 180 degrees
about X: ``diag(1, -1, -1)``.

Spherical poses: elevation in degrees, positive above the XY plane; azimuth in
degrees, 0 = camera on -Y looking toward +Y (Blender's front view), growing
counter-clockwise seen from above (azimuth 90 puts the camera on +X); radius
in metres from the target.

glTF is Y up: export maps (x, y, z) -> (x, z, -y); Blender's importer maps it
back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# OpenGL/Blender camera axes -> OpenCV camera axes
GL_TO_CV = np.diag([1.0, -1.0, -1.0, 1.0])


def _as_mats(m) -> np.ndarray:
    a = np.asarray(m, dtype=np.float64)
    if a.shape[-2:] != (4, 4):
        raise ValueError(f"expected 4x4 matrices, got shape {a.shape}")
    return a


def check_c2w(c2w, what: str = "camera") -> np.ndarray:
    """Validate camera-to-world matrices: finite, rigid rotation, last row 0 0 0 1.
    Raises ValueError with a readable message."""
    m = _as_mats(c2w)
    flat = m.reshape(-1, 4, 4)
    if not np.all(np.isfinite(flat)):
        bad = int(np.where(~np.isfinite(flat).all(axis=(1, 2)))[0][0])
        raise ValueError(f"{what} {bad}: matrix has NaN or infinite entries")
    for i, M in enumerate(flat):
        if not np.allclose(M[3], [0, 0, 0, 1], atol=1e-5):
            raise ValueError(f"{what} {i}: last row must be 0 0 0 1, got {M[3].tolist()}")
        R = M[:3, :3]
        scale = np.linalg.norm(R, axis=0)
        if np.any(scale < 1e-8):
            raise ValueError(f"{what} {i}: rotation part is degenerate")
        Rn = R / scale
        if not np.allclose(Rn.T @ Rn, np.eye(3), atol=1e-3) or np.linalg.det(Rn) < 0:
            raise ValueError(f"{what} {i}: rotation part is not a rotation")
    return m


def orthonormalize_c2w(c2w) -> np.ndarray:
    """Remove scale/shear from the rotation part (Blender cameras may carry object scale)."""
    m = _as_mats(c2w).copy()
    flat = m.reshape(-1, 4, 4)
    for M in flat:
        u, _, vt = np.linalg.svd(M[:3, :3])
        R = u @ vt
        if np.linalg.det(R) < 0:
            u[:, -1] *= -1
            R = u @ vt
        M[:3, :3] = R
    return m


def c2w_to_viewmat(c2w) -> np.ndarray:
    """Blender/OpenGL camera-to-world -> OpenCV world-to-camera (gsplat's ``viewmats``)."""
    return np.linalg.inv(_as_mats(c2w) @ GL_TO_CV)


def viewmat_to_c2w(viewmat) -> np.ndarray:
    """OpenCV world-to-camera -> Blender/OpenGL camera-to-world."""
    return np.linalg.inv(_as_mats(viewmat)) @ GL_TO_CV


def camera_center(c2w) -> np.ndarray:
    return _as_mats(c2w)[..., :3, 3]


def look_at_c2w(eye, target, up=(0.0, 0.0, 1.0)) -> np.ndarray:
    """c2w of a camera at ``eye`` looking at ``target`` with ``up`` as screen up."""
    eye = np.asarray(eye, np.float64)
    target = np.asarray(target, np.float64)
    fwd = target - eye
    n = np.linalg.norm(fwd)
    if n < 1e-12:
        raise ValueError("camera position equals its target")
    fwd /= n
    up = np.asarray(up, np.float64)
    right = np.cross(fwd, up)
    if np.linalg.norm(right) < 1e-8:  # looking straight up or down: pick another up
        right = np.cross(fwd, np.array([0.0, 1.0, 0.0]) if abs(fwd[1]) < 0.9 else np.array([1.0, 0.0, 0.0]))
    right /= np.linalg.norm(right)
    cam_up = np.cross(right, fwd)
    m = np.eye(4)
    m[:3, 0] = right
    m[:3, 1] = cam_up
    m[:3, 2] = -fwd  # the camera looks down -Z
    m[:3, 3] = eye
    return m


def spherical_to_position(elevation_deg, azimuth_deg, radius, target=(0.0, 0.0, 0.0)) -> np.ndarray:
    el = np.radians(np.asarray(elevation_deg, np.float64))
    az = np.radians(np.asarray(azimuth_deg, np.float64))
    r = np.asarray(radius, np.float64)
    offset = np.stack([np.cos(el) * np.sin(az), -np.cos(el) * np.cos(az), np.sin(el)], -1) * r[..., None]
    return offset + np.asarray(target, np.float64)


def spherical_to_c2w(elevation_deg: float, azimuth_deg: float, radius: float, target=(0.0, 0.0, 0.0)) -> np.ndarray:
    """c2w of a camera on the sphere around ``target``, looking at it, Z up."""
    eye = spherical_to_position(elevation_deg, azimuth_deg, radius, target)
    return look_at_c2w(eye, target)


def c2w_to_spherical(c2w, target=(0.0, 0.0, 0.0)) -> tuple[float, float, float]:
    """(elevation_deg, azimuth_deg in [0, 360), radius) of a camera's position around ``target``."""
    d = camera_center(c2w) - np.asarray(target, np.float64)
    r = float(np.linalg.norm(d))
    if r < 1e-12:
        raise ValueError("camera is at the target")
    el = math.degrees(math.asin(max(-1.0, min(1.0, d[2] / r))))
    az = math.degrees(math.atan2(d[0], -d[1])) % 360.0
    return el, az, r


# ---------------------------------------------------------------------------
# intrinsics


@dataclass(frozen=True)
class Intrinsics:
    """Pinhole intrinsics in pixels; pixel centres at +0.5 (gsplat's convention)."""

    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int

    @classmethod
    def from_fov(cls, fov_x_rad: float, width: int, height: int) -> "Intrinsics":
        if not (0 < fov_x_rad < math.pi):
            raise ValueError(f"horizontal field of view {fov_x_rad} rad is not in (0, pi)")
        f = 0.5 * width / math.tan(0.5 * fov_x_rad)
        return cls(f, f, width / 2.0, height / 2.0, int(width), int(height))

    @classmethod
    def from_blender(cls, lens_mm: float, sensor_width_mm: float, sensor_height_mm: float, sensor_fit: str,
                     width: int, height: int, shift_x: float = 0.0, shift_y: float = 0.0) -> "Intrinsics":
        """Blender camera data (lens, sensor, fit, shift) -> pixels, as Blender and Cycles project.

        ``width``/``height`` are the rendered size (resolution times resolution_percentage);
        pixels are square (pixel_aspect_x == pixel_aspect_y; other aspects are not modelled).
        The sensor fit picks one sensor dimension and the image side it spans, S pixels:

        * AUTO: ``sensor_width`` across the larger side, whatever the orientation
          (S = max(width, height); ``sensor_height`` is unused);
        * HORIZONTAL: ``sensor_width`` across the width (S = width), also for portrait frames;
        * VERTICAL: ``sensor_height`` across the height (S = height), also for landscape frames.

        Then f = lens / sensor * S, and lens shift is measured in units of S:
        cx = width/2 - shift_x*S, cy = height/2 + shift_y*S (image y grows downwards, so a
        positive shift_y moves the view up and the scene down the image). Proven against
        ``world_to_camera_view`` and Cycles renders in tests/test_cameras_blender.py.
        """
        fit = str(sensor_fit).upper()
        if fit == "AUTO":
            sensor, size = sensor_width_mm, max(width, height)
        elif fit == "HORIZONTAL":
            sensor, size = sensor_width_mm, width
        elif fit == "VERTICAL":
            sensor, size = sensor_height_mm, height
        else:
            raise ValueError(f"sensor_fit must be AUTO, HORIZONTAL or VERTICAL, got {sensor_fit!r}")
        f = lens_mm / sensor * size
        return cls(f, f, width / 2.0 - shift_x * size, height / 2.0 + shift_y * size, int(width), int(height))

    @property
    def fov_x(self) -> float:
        return 2.0 * math.atan(0.5 * self.width / self.fx)

    @property
    def fov_y(self) -> float:
        return 2.0 * math.atan(0.5 * self.height / self.fy)

    def K(self) -> np.ndarray:
        return np.array([[self.fx, 0, self.cx], [0, self.fy, self.cy], [0, 0, 1]], np.float64)

    def scaled(self, width: int, height: int) -> "Intrinsics":
        sx, sy = width / self.width, height / self.height
        return Intrinsics(self.fx * sx, self.fy * sy, self.cx * sx, self.cy * sy, int(width), int(height))


def project(points, c2w, intr: Intrinsics) -> tuple[np.ndarray, np.ndarray]:
    """World points -> (pixel coordinates [N,2] with centres at +0.5, depth along the view [N])."""
    pts = np.asarray(points)
    dt = pts.dtype if pts.dtype in (np.float32, np.float64) else np.float64  # float32 in, float32 math
    vm = c2w_to_viewmat(c2w).astype(dt)
    p = pts.astype(dt, copy=False) @ vm[:3, :3].T + vm[:3, 3]
    z = p[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        uv = np.stack([intr.fx * p[:, 0] / z + intr.cx, intr.fy * p[:, 1] / z + intr.cy], -1)
    return uv, z


# ---------------------------------------------------------------------------
# Zero-1-to-3 camera vectors


def zero123_camera_vector(cond_elevation_deg: float, cond_azimuth_deg: float, cond_radius: float,
                          target_elevation_deg: float, target_azimuth_deg: float, target_radius: float) -> np.ndarray:
    """Zero-1-to-3's relative camera vector ``[d_polar (rad), sin d_az, cos d_az, d_radius]``.

    Derivation (Zero-1-to-3's training code): a camera position (x, y, z) in the
    object's Z-up frame has polar angle ``theta = atan2(sqrt(x^2 + y^2), z)``
    (measured from +Z, so ``theta = 90 deg - elevation``) and azimuth
    ``phi = atan2(y, x)`` (counter-clockwise seen from above). The vector is
    target minus conditioning view:

    * ``d_polar = theta_t - theta_c = -(elevation_t - elevation_c)`` in radians:
      a target camera *above* the reference gives a *negative* first entry;
    * ``d_az = (phi_t - phi_c) mod 2 pi``: our azimuth also grows
      counter-clockwise seen from above and differs from ``phi`` by a constant
      offset, which cancels in the difference; a target camera moved
      counter-clockwise (toward +X from the front view) has ``d_az`` in (0, pi);
    * ``d_radius = r_t - r_c`` in the units of the training data (the published
      models were trained with radii in [1.5, 2.2]; 0 keeps the distance).
    """
    d_polar = math.radians(-(target_elevation_deg - cond_elevation_deg))
    d_az = math.radians((target_azimuth_deg - cond_azimuth_deg) % 360.0)
    return np.array([d_polar, math.sin(d_az), math.cos(d_az), target_radius - cond_radius], np.float64)


def stable_zero123_camera_vector(cond_elevation_deg: float, cond_azimuth_deg: float,
                                 target_elevation_deg: float, target_azimuth_deg: float) -> np.ndarray:
    """Stable Zero123's variant: the same first three entries as
    :func:`zero123_camera_vector`, the fourth replaced by the absolute polar angle
    of the conditioning view, ``radians(90 - cond_elevation)``."""
    v = zero123_camera_vector(cond_elevation_deg, cond_azimuth_deg, 0.0, target_elevation_deg, target_azimuth_deg, 0.0)
    v[3] = math.radians(90.0 - cond_elevation_deg)
    return v


# ---------------------------------------------------------------------------
# glTF axes


def blender_to_gltf(points) -> np.ndarray:
    """Z-up world (x, y, z) -> glTF Y-up (x, z, -y)."""
    p = np.asarray(points)
    return np.stack([p[..., 0], p[..., 2], -p[..., 1]], -1)


def gltf_to_blender(points) -> np.ndarray:
    """glTF Y-up (x, y, z) -> Z-up world (x, -z, y)."""
    p = np.asarray(points)
    return np.stack([p[..., 0], -p[..., 2], p[..., 1]], -1)
