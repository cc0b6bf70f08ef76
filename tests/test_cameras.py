"""Camera conventions: every conversion tested both ways."""

import math

import numpy as np
import pytest

from backend.common import cameras as cam


def random_c2w(rng):
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    w, x, y, z = q
    R = np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                  [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                  [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])
    m = np.eye(4)
    m[:3, :3] = R
    m[:3, 3] = rng.normal(size=3) * 3
    return m


def test_c2w_viewmat_round_trip():
    rng = np.random.default_rng(0)
    for _ in range(20):
        c2w = random_c2w(rng)
        vm = cam.c2w_to_viewmat(c2w)
        np.testing.assert_allclose(cam.viewmat_to_c2w(vm), c2w, atol=1e-12)
        # OpenCV: a point in front of the camera (its -Z in Blender terms) has positive z
        p = c2w[:3, 3] - 2.0 * c2w[:3, 2]
        pc = vm[:3, :3] @ p + vm[:3, 3]
        assert pc[2] == pytest.approx(2.0)
        # Blender's camera +Y (up) is OpenCV's -y (image rows grow downwards)
        p_up = c2w[:3, 3] - 2.0 * c2w[:3, 2] + 0.5 * c2w[:3, 1]
        assert (vm[:3, :3] @ p_up + vm[:3, 3])[1] == pytest.approx(-0.5)
        # and +X is +x
        p_right = c2w[:3, 3] - 2.0 * c2w[:3, 2] + 0.5 * c2w[:3, 0]
        assert (vm[:3, :3] @ p_right + vm[:3, 3])[0] == pytest.approx(0.5)


def test_batched_conversions():
    rng = np.random.default_rng(1)
    c2w = np.stack([random_c2w(rng) for _ in range(5)])
    vm = cam.c2w_to_viewmat(c2w)
    assert vm.shape == (5, 4, 4)
    np.testing.assert_allclose(cam.viewmat_to_c2w(vm), c2w, atol=1e-12)


@pytest.mark.parametrize("el,az", [(0, 0), (30, 45), (-20, 200), (60, 359), (89, 10), (-89, 90)])
def test_spherical_round_trip(el, az):
    target = np.array([0.3, -0.2, 0.1])
    c2w = cam.spherical_to_c2w(el, az, 2.5, target)
    el2, az2, r2 = cam.c2w_to_spherical(c2w, target)
    assert el2 == pytest.approx(el, abs=1e-9)
    assert r2 == pytest.approx(2.5)
    if abs(el) < 89.5:
        assert (az2 - az + 180) % 360 - 180 == pytest.approx(0, abs=1e-9)
    # it looks at the target: the target projects to the image centre
    k = cam.Intrinsics.from_fov(math.radians(40), 64, 48)
    uv, z = cam.project(target[None], c2w, k)
    np.testing.assert_allclose(uv[0], [32, 24], atol=1e-9)
    assert z[0] == pytest.approx(2.5)
    cam.check_c2w(c2w)


def test_azimuth_convention():
    # azimuth 0: camera on -Y looking toward +Y (Blender's front view), Z up
    front = cam.spherical_to_c2w(0, 0, 3)
    np.testing.assert_allclose(front[:3, 3], [0, -3, 0], atol=1e-12)
    np.testing.assert_allclose(-front[:3, 2], [0, 1, 0], atol=1e-12)  # looks along +Y
    np.testing.assert_allclose(front[:3, 1], [0, 0, 1], atol=1e-12)  # up is +Z
    np.testing.assert_allclose(front[:3, 0], [1, 0, 0], atol=1e-12)  # right is +X
    # azimuth grows counter-clockwise seen from above: 90 puts the camera on +X
    np.testing.assert_allclose(cam.spherical_to_c2w(0, 90, 3)[:3, 3], [3, 0, 0], atol=1e-12)
    np.testing.assert_allclose(cam.spherical_to_c2w(0, 180, 3)[:3, 3], [0, 3, 0], atol=1e-12)
    # elevation positive is above the XY plane
    assert cam.spherical_to_c2w(30, 0, 3)[2, 3] == pytest.approx(1.5)


def test_gltf_axes_round_trip():
    p = np.random.default_rng(2).normal(size=(10, 3))
    g = cam.blender_to_gltf(p)
    np.testing.assert_array_equal(g[:, 0], p[:, 0])
    np.testing.assert_array_equal(g[:, 1], p[:, 2])  # Z up becomes Y up
    np.testing.assert_array_equal(g[:, 2], -p[:, 1])
    np.testing.assert_array_equal(cam.gltf_to_blender(g), p)


def test_intrinsics():
    k = cam.Intrinsics.from_fov(math.radians(60), 200, 100)
    assert k.fov_x == pytest.approx(math.radians(60))
    assert k.fx == pytest.approx(100 / math.tan(math.radians(30)))
    assert (k.cx, k.cy) == (100, 50)
    k2 = k.scaled(100, 50)
    assert k2.fov_x == pytest.approx(k.fov_x) and k2.cx == 50
    # Blender: 50 mm lens on a 36 mm sensor (horizontal fit) at 1920 px wide
    kb = cam.Intrinsics.from_blender(50, 36, 24, "AUTO", 1920, 1080)
    assert kb.fx == pytest.approx(50 / 36 * 1920)
    assert kb.fov_x == pytest.approx(2 * math.atan(18 / 50))
    # portrait AUTO: Blender puts sensor_width (not sensor_height) across the larger side, the height
    kv = cam.Intrinsics.from_blender(50, 36, 24, "AUTO", 1080, 1920)
    assert kv.fx == kv.fy == pytest.approx(50 / 36 * 1920)
    # HORIZONTAL on a portrait frame still spans the width; VERTICAL on a landscape one, the height
    assert cam.Intrinsics.from_blender(50, 36, 24, "HORIZONTAL", 1080, 1920).fx == pytest.approx(50 / 36 * 1080)
    assert cam.Intrinsics.from_blender(50, 36, 24, "VERTICAL", 1920, 1080).fx == pytest.approx(50 / 24 * 1080)
    # lens shift is in units of the fitted side; +shift_y moves the view up (cy grows, rows go down)
    for fit, w, h, side in [("AUTO", 1080, 1920, 1920), ("HORIZONTAL", 1080, 1920, 1080), ("VERTICAL", 1920, 1080, 1080)]:
        ks = cam.Intrinsics.from_blender(50, 36, 24, fit, w, h, 0.1, 0.2)
        assert (ks.cx, ks.cy) == pytest.approx((w / 2 - 0.1 * side, h / 2 + 0.2 * side))
    with pytest.raises(ValueError, match="sensor_fit"):
        cam.Intrinsics.from_blender(50, 36, 24, "DIAGONAL", 100, 100)
    with pytest.raises(ValueError):
        cam.Intrinsics.from_fov(0.0, 10, 10)


@pytest.mark.parametrize("bad, msg", [
    (np.full((4, 4), np.nan), "NaN"),
    (np.diag([1.0, 1.0, 1.0, 2.0]), "last row"),
    (np.diag([1.0, 1.0, -1.0, 1.0]), "not a rotation"),
    (np.diag([0.0, 1.0, 1.0, 1.0]), "degenerate"),
])
def test_check_c2w_rejects(bad, msg):
    with pytest.raises(ValueError, match=msg):
        cam.check_c2w(bad)


def test_orthonormalize_removes_scale():
    m = cam.spherical_to_c2w(20, 30, 2)
    scaled = m.copy()
    scaled[:3, :3] *= 1.7
    np.testing.assert_allclose(cam.orthonormalize_c2w(scaled), m, atol=1e-12)


def test_zero123_camera_vector_signs():
    # same view: no change
    np.testing.assert_allclose(cam.zero123_camera_vector(0, 0, 2, 0, 0, 2), [0, 0, 1, 0], atol=1e-12)
    # target above the reference: polar angle shrinks -> negative first entry
    v = cam.zero123_camera_vector(0, 0, 2, 30, 0, 2)
    assert v[0] == pytest.approx(-math.radians(30))
    # counter-clockwise (toward +X from the front) by 90: sin = 1, cos = 0
    v = cam.zero123_camera_vector(0, 0, 2, 0, 90, 2)
    np.testing.assert_allclose(v[1:3], [1, 0], atol=1e-12)
    # clockwise by 90 is 270 counter-clockwise: sin = -1
    v = cam.zero123_camera_vector(10, 350, 2, 10, 260, 2)
    np.testing.assert_allclose(v, [0, -1, 0, 0], atol=1e-12)
    # radius difference is target minus reference
    assert cam.zero123_camera_vector(0, 0, 2.0, 0, 0, 1.5)[3] == pytest.approx(-0.5)
    # Stable Zero123: the fourth entry is the reference's absolute polar angle
    s = cam.stable_zero123_camera_vector(20, 0, 35, 45)
    assert s[0] == pytest.approx(-math.radians(15))
    assert s[3] == pytest.approx(math.radians(70))
