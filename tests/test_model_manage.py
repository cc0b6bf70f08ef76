"""The backend's model manager (backend.models.manage, the ``models`` job): presence, size
on disk, download with files and bytes as progress, cancel, remove. The hub is replaced by
a listing and a per-file fetch that write the Hugging Face cache's real layout; the tiny
preset is built for real."""

from __future__ import annotations

import json

import pytest

from backend.common.errors import ModelMissing
from backend.models import manage
from backend.models.presets import Preset, resolve
from backend.models.store import DownloadPlan, _cached

REPO = "org/model"
REV = "0123456789abcdef0123456789abcdef01234567"
FILES = {"model_index.json": json.dumps({"_class_name": "X", "unet": ["diffusers", "UNet2DConditionModel"],
                                         "scheduler": ["diffusers", "DDIMScheduler"]}).encode(),
         "unet/config.json": b"{}", "unet/diffusion_pytorch_model.safetensors": b"w" * 5000,
         "scheduler/scheduler_config.json": b"{}"}


def _plan(name):
    assert name == REPO
    return DownloadPlan(name, REV, [(f, len(b)) for f, b in FILES.items()])


def _fetch_into_cache(written):
    def fetch(name, revision, filename, cache_dir, cancelled, tick):
        repo = manage.hub_repo_folder(name, cache_dir)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(revision)
        dest = repo / "snapshots" / revision / filename
        dest.parent.mkdir(parents=True, exist_ok=True)
        tick(len(FILES[filename]) // 2)
        dest.write_bytes(FILES[filename])
        written.append(filename)

    return fetch


def _hub_preset():
    return Preset("hubby", text_to_image=REPO, novel_view=REPO)


@pytest.fixture
def online(monkeypatch):
    """The suite runs with HF_HUB_OFFLINE=1 (no test reaches the hub); these replace the hub, so may 'download'."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def test_download_reports_files_and_bytes_and_makes_the_model_present(tmp_path, online):
    cache = tmp_path / "hub"
    preset = _hub_preset()
    assert [s.present for s in manage.states(preset, cache)] == [False, False]
    seen, written = [], []
    after = manage.download(preset, lambda *a: seen.append(a), cache_dir=cache, plan_fn=_plan,
                            fetch_fn=_fetch_into_cache(written))
    total = sum(len(b) for b in FILES.values())
    # both roles name the same repo: planned twice, the second fetch rewrites the same files (the hub's cache dedups)
    assert seen[0] == (0, 8, 0, 2 * total, "") and seen[-1][:4] == (8, 8, 2 * total, 2 * total)
    assert any(0 < s[2] < 2 * total and s[2] % len(FILES["unet/diffusion_pytorch_model.safetensors"]) for s in seen)
    done_files = [s[0] for s in seen]
    assert done_files == sorted(done_files), "files done never go back"
    assert all(s.present and s.bytes == total and s.source == "hub" for s in after)
    removed = manage.remove(preset, cache_dir=cache)
    assert [s.present for s in removed] == [False, False] and not manage.hub_repo_folder(REPO, cache).exists()


def test_a_snapshot_without_its_weights_is_not_present(tmp_path):
    cache = tmp_path / "hub"
    fetch = _fetch_into_cache([])
    for f in ("model_index.json", "unet/config.json", "scheduler/scheduler_config.json"):
        fetch(REPO, REV, f, cache, lambda: False, lambda n: None)
    assert _cached(REPO, cache) is None, "a stopped download (config, no weights) is not a model"
    fetch(REPO, REV, "unet/diffusion_pytorch_model.safetensors", cache, lambda: False, lambda n: None)
    assert _cached(REPO, cache) is not None


def test_cancel_stops_between_files_and_a_new_download_finishes(tmp_path, online):
    cache = tmp_path / "hub"
    written = []
    fetch = _fetch_into_cache(written)
    after = manage.download(_hub_preset(), lambda *a: None, cancelled=lambda: len(written) >= 2, cache_dir=cache,
                            plan_fn=_plan, fetch_fn=fetch)
    assert len(written) == 2 and not any(s.present for s in after)
    after = manage.download(_hub_preset(), lambda *a: None, cache_dir=cache, plan_fn=_plan, fetch_fn=fetch)
    assert all(s.present for s in after)


def test_offline_and_unreachable_hub_are_clear_errors(tmp_path, monkeypatch, online):
    def no_network(name):
        raise OSError("Name or service not known")

    with pytest.raises(ModelMissing, match="could not reach the model hub.*offline.*prefetch"):
        manage.download(_hub_preset(), lambda *a: None, cache_dir=tmp_path, plan_fn=no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelMissing, match="HF_HUB_OFFLINE"):
        manage.download(_hub_preset(), lambda *a: None, cache_dir=tmp_path, plan_fn=_plan)


def test_a_folder_the_user_gave_is_never_removed(tmp_path):
    folder = tmp_path / "my_model"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    preset = Preset("mine", text_to_image=str(folder), novel_view=str(tmp_path / "absent"))
    first, second = manage.states(preset)
    assert first.present and first.source == "folder" and not first.removable and first.bytes == 2
    assert not second.present
    manage.remove(preset)
    assert (folder / "model_index.json").is_file()
    with pytest.raises(ModelMissing, match="folder"):
        manage.download(preset, lambda *a: None)


def test_the_models_job_builds_and_removes_the_tiny_preset(tmp_path, monkeypatch):
    from backend.kinds import models as K
    from backend.models.store import ModelStore
    from backend.service.jobs import JobContext, Limits
    from backend.common.progress import Progress

    monkeypatch.setenv("GEN3D_HOME", str(tmp_path))
    events = []
    ctx = JobContext(Progress(lambda *a: events.append(a)), "cpu", ModelStore("tiny"), None, Limits())
    run = lambda **p: K.SPEC.handler(K.SPEC.validate(p, [], Limits()), ctx).metadata  # noqa: E731
    listing = run(action="status", preset="*")
    assert listing["server_preset"] == "tiny" and listing["presets"][0]["preset"] == "tiny"
    assert not listing["presets"][0]["present"]
    meta = run(action="download")
    assert meta["present"] and meta["bytes"] > 1_000_000 and all(m["path"].startswith(str(tmp_path))
                                                                   for m in meta["models"])
    msgs = [e[3] for e in events if e[0] == "download"]
    assert any("1/2 files" in m for m in msgs) and any("2/2 files" in m for m in msgs)
    meta = run(action="remove", roles=["novel_view"])
    assert [m["present"] for m in meta["models"]] == [True, False]
    with pytest.raises(Exception, match="status only"):
        run(action="download", preset="*")
    with pytest.raises(Exception, match="roles"):
        run(action="remove", roles=["everything"])
    assert resolve("tiny").models() == ModelStore("tiny").preset.models()


def test_the_real_per_file_fetch_runs_in_a_subprocess_and_reports_its_failure(tmp_path):
    # HF_HUB_OFFLINE=1 (the suite's setting) makes hf_hub_download fail at once, in the child
    with pytest.raises(ModelMissing, match="downloading unet/config.json of 'org/model' failed"):
        manage.fetch_file_subprocess(REPO, REV, "unet/config.json", tmp_path, lambda: False, lambda n: None)
