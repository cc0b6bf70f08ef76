"""transforms.json loading: every accepted variant and every kind of bad input."""

import json
import math

import numpy as np
import pytest
from PIL import Image

from backend.common import cameras as cam
from backend.common.dataset import alpha_from_background, load_transforms, save_transforms, views_from_meta
from backend.service.jobs import InputError


def write_views(tmp_path, n=3, size=(24, 16), mode="RGBA", ext=".png", meta_extra=None, frame_extra=None):
    (tmp_path / "imgs").mkdir(exist_ok=True)
    frames = []
    for i in range(n):
        arr = np.zeros((size[1], size[0], 4), np.uint8)
        arr[4:12, 6:18] = [200, 50, 20, 255]
        Image.fromarray(arr if mode == "RGBA" else arr[..., :3]).convert(mode).save(tmp_path / "imgs" / f"v{i}{ext}")
        fr = {"file_path": f"imgs/v{i}" if ext == ".png" else f"imgs/v{i}{ext}",
              "transform_matrix": cam.spherical_to_c2w(10, 40 * i, 2).tolist()}
        fr.update(frame_extra or {})
        frames.append(fr)
    meta = {"camera_angle_x": math.radians(40), "frames": frames}
    meta.update(meta_extra or {})
    p = tmp_path / "transforms.json"
    p.write_text(json.dumps(meta))
    return p


def test_load_basic(tmp_path):
    v = load_transforms(write_views(tmp_path))
    assert len(v) == 3 and v.images.shape == (3, 16, 24, 4)
    assert v.images.dtype == np.float32 and v.images.max() <= 1.0
    assert v.intrinsics[0].fov_x == pytest.approx(math.radians(40))
    np.testing.assert_allclose(v.c2w[1], cam.spherical_to_c2w(10, 40, 2), atol=1e-12)


def test_file_path_with_extension_and_per_frame_intrinsics(tmp_path):
    p = write_views(tmp_path, ext=".png", meta_extra={"camera_angle_x": None},
                    frame_extra={"fl_x": 30.0, "fl_y": 31.0, "cx": 12.5, "cy": 7.0, "w": 24, "h": 16})
    meta = json.loads(p.read_text())
    for fr in meta["frames"]:
        fr["file_path"] += ".png"
    del meta["camera_angle_x"]
    p.write_text(json.dumps(meta))
    v = load_transforms(p)
    k = v.intrinsics[0]
    assert (k.fx, k.fy, k.cx, k.cy) == (30.0, 31.0, 12.5, 7.0)


def test_intrinsics_rescaled_to_image_size(tmp_path):
    p = write_views(tmp_path, frame_extra={"fl_x": 60.0, "w": 48, "h": 32})
    k = load_transforms(p).intrinsics[0]
    assert k.fx == pytest.approx(30.0) and k.cx == pytest.approx(12.0)


def test_resize_keeps_field_of_view(tmp_path):
    v = load_transforms(write_views(tmp_path)).resized(12)
    assert v.width == 12 and v.height == 8
    assert v.intrinsics[0].fov_x == pytest.approx(math.radians(40))
    assert v.images[..., 3].max() > 0.9  # no dark halo: the object's colour survives
    assert v.images[0][4, 6, 0] == pytest.approx(200 / 255, abs=0.02)


def test_rgb_needs_a_background(tmp_path):
    p = write_views(tmp_path, mode="RGB")
    with pytest.raises(InputError, match="no alpha channel"):
        load_transforms(p)
    v = load_transforms(p, background=(0, 0, 0))
    assert v.images[0][8, 10, 3] == 1.0 and v.images[0][0, 0, 3] == 0.0


def test_alpha_from_background_soft_edges():
    rgb = np.zeros((1, 3, 3), np.float32)
    rgb[0, 1] = 0.03
    rgb[0, 2] = 0.5
    a = alpha_from_background(rgb, (0, 0, 0))
    assert a[0, 0] == 0 and 0 < a[0, 1] < 1 and a[0, 2] == 1


@pytest.mark.parametrize("mutate, msg", [
    (lambda m: m["frames"][0].update(transform_matrix=[[float("nan")] * 4] * 4), "NaN"),
    (lambda m: m["frames"][0].update(transform_matrix=[[1, 0, 0], [0, 1, 0]]), "4x4"),
    (lambda m: m["frames"][0].update(transform_matrix="identity"), "4x4"),
    (lambda m: m["frames"][1].update(file_path="imgs/missing"), "not found"),
    (lambda m: m.update(frames=m["frames"][:1]), "at least 2"),
    (lambda m: m.update(frames="all of them"), "frames"),
    (lambda m: m.pop("camera_angle_x"), "field of view"),
    (lambda m: m.update(camera_angle_x=7.0), "camera_angle_x"),
    (lambda m: m["frames"][0].pop("file_path"), "file_path"),
])
def test_bad_transforms(tmp_path, mutate, msg):
    p = write_views(tmp_path)
    meta = json.loads(p.read_text())
    mutate(meta)
    p.write_text(json.dumps(meta))
    with pytest.raises(InputError, match=msg):
        load_transforms(p)


def test_not_json_and_missing_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_transforms(tmp_path / "nope.json")
    (tmp_path / "t.json").write_text("{frames: oops")
    with pytest.raises(InputError, match="not valid JSON"):
        load_transforms(tmp_path / "t.json")


def test_broken_image_and_size_mismatch(tmp_path):
    p = write_views(tmp_path)
    (tmp_path / "imgs" / "v1.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(InputError, match="not a readable image"):
        load_transforms(p)
    p = write_views(tmp_path)
    Image.new("RGBA", (30, 20)).save(tmp_path / "imgs" / "v2.png")
    with pytest.raises(InputError, match="one size"):
        load_transforms(p)


def test_all_transparent_is_an_error(tmp_path):
    p = write_views(tmp_path)
    for i in range(3):
        Image.new("RGBA", (24, 16)).save(tmp_path / "imgs" / f"v{i}.png")
    with pytest.raises(InputError, match="transparent"):
        load_transforms(p)


def test_save_and_reload(tmp_path):
    v = load_transforms(write_views(tmp_path))
    p = save_transforms(v, tmp_path / "out")
    w = load_transforms(p)
    np.testing.assert_allclose(w.c2w, v.c2w)
    np.testing.assert_allclose(w.images, v.images, atol=1 / 255)
    assert w.intrinsics[0].fx == pytest.approx(v.intrinsics[0].fx)


def test_views_from_meta_reader():
    png = Image.new("RGBA", (10, 10), (255, 0, 0, 255))
    import io

    buf = io.BytesIO()
    png.save(buf, "PNG")
    meta = {"camera_angle_x": 0.8, "frames": [{"file_path": f"f{i}", "transform_matrix": np.eye(4).tolist()} for i in range(2)]}
    v = views_from_meta(meta, lambda fp: buf.getvalue())
    assert len(v) == 2
