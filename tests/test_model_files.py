"""What `prefetch` fetches and what the loaders read: only the weight set the pipeline
loads (fp16 where the repository has it), no safety checker, no non-EMA or single-file
checkpoints. Fake hub listings; no network."""

import fnmatch
import json
import shutil

import pytest
import torch

from backend.service.jobs import ModelMissing
from backend.models import files, store
from backend.models.presets import resolve
from backend.models.tiny import build_tiny

GB = 1e9
MB = 1e6

# stable-diffusion-v1-5/stable-diffusion-v1-5 as the hub lists it (sizes rounded)
SD15 = {
    ".gitattributes": 1500, "README.md": 14_000, "model_index.json": 541, "v1-inference.yaml": 1900,
    "v1-5-pruned.ckpt": 7.70 * GB, "v1-5-pruned.safetensors": 7.70 * GB,
    "v1-5-pruned-emaonly.ckpt": 4.27 * GB, "v1-5-pruned-emaonly.safetensors": 4.27 * GB,
    "feature_extractor/preprocessor_config.json": 342,
    "safety_checker/config.json": 4700, "safety_checker/model.safetensors": 1.22 * GB,
    "safety_checker/model.fp16.safetensors": 608 * MB, "safety_checker/pytorch_model.bin": 1.22 * GB,
    "safety_checker/pytorch_model.fp16.bin": 608 * MB,
    "scheduler/scheduler_config.json": 308,
    "text_encoder/config.json": 617, "text_encoder/model.safetensors": 492 * MB,
    "text_encoder/model.fp16.safetensors": 246 * MB, "text_encoder/pytorch_model.bin": 492 * MB,
    "text_encoder/pytorch_model.fp16.bin": 246 * MB,
    "tokenizer/merges.txt": 525_000, "tokenizer/special_tokens_map.json": 472,
    "tokenizer/tokenizer_config.json": 806, "tokenizer/vocab.json": 1_060_000,
    "unet/config.json": 743, "unet/diffusion_pytorch_model.safetensors": 3.44 * GB,
    "unet/diffusion_pytorch_model.fp16.safetensors": 1.72 * GB,
    "unet/diffusion_pytorch_model.non_ema.safetensors": 3.44 * GB,
    "unet/diffusion_pytorch_model.bin": 3.44 * GB, "unet/diffusion_pytorch_model.fp16.bin": 1.72 * GB,
    "unet/diffusion_pytorch_model.non_ema.bin": 3.44 * GB,
    "vae/config.json": 547, "vae/diffusion_pytorch_model.safetensors": 335 * MB,
    "vae/diffusion_pytorch_model.fp16.safetensors": 167 * MB, "vae/diffusion_pytorch_model.bin": 335 * MB,
    "vae/diffusion_pytorch_model.fp16.bin": 167 * MB,
}
SD15_INDEX = {
    "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.6.0",
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
    "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
SD15_WANTED = {
    "model_index.json", "feature_extractor/preprocessor_config.json", "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder/model.fp16.safetensors",
    "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json", "unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.fp16.safetensors",
}
# the patterns the store used before (every *.safetensors of every sub-folder)
OLD_ALLOW = ["model_index.json", "*/*.json", "*/*.txt", "*/*.safetensors", "*/*.model"]


def test_stable_diffusion_fetches_only_the_fp16_pipeline():
    plan = store.plan_from_listing("sd", SD15, SD15_INDEX)
    assert {f for f, _ in plan.files} == SD15_WANTED
    assert 2.1 * GB < plan.total_bytes < 2.2 * GB  # unet 1.72 + text encoder 0.25 + vae 0.17
    old = [f for f in SD15 if any(fnmatch.fnmatch(f, p) for p in OLD_ALLOW)]
    assert sum(SD15[f] for f in old) > 11 * GB  # what the old patterns pulled
    lines = plan.describe()
    assert lines[-1] == "  13 files, 2.13 GB in all"
    assert "  unet/diffusion_pytorch_model.fp16.safetensors  1.72 GB" in lines


def test_without_model_index_skips_the_safety_checker_and_root_checkpoints():
    chosen = set(files.select_files(SD15, want_fp16=True))
    assert chosen == SD15_WANTED
    fp32 = set(files.select_files(SD15, want_fp16=False))  # a CPU-only fetch: default weights, still no extras
    assert "unet/diffusion_pytorch_model.safetensors" in fp32
    assert not any("fp16" in f or "non_ema" in f or f.startswith("safety_checker") or f.endswith(".bin") for f in fp32)


def test_repository_without_fp16_takes_its_one_weight_set():
    listing = {"model_index.json": 1, "unet/config.json": 1, "unet/diffusion_pytorch_model.safetensors": 3.4 * GB,
               "unet/diffusion_pytorch_model.fp16_ema.safetensors": 1.7 * GB,
               "image_encoder/config.json": 1, "image_encoder/pytorch_model.bin": 1.2 * GB,
               "clip_camera_projection/config.json": 1,
               "clip_camera_projection/diffusion_pytorch_model.safetensors": 2 * MB,
               "feature_extractor/preprocessor_config.json": 1, "zero123.ckpt": 15 * GB}
    chosen = set(files.select_files(listing, want_fp16=True))
    assert chosen == {"model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                      "image_encoder/config.json", "image_encoder/pytorch_model.bin",  # pickles when that is all
                      "clip_camera_projection/config.json", "clip_camera_projection/diffusion_pytorch_model.safetensors",
                      "feature_extractor/preprocessor_config.json"}


def test_sharded_fp16_weights_come_with_their_index_only():
    listing = {"text_encoder/config.json": 1,
               "text_encoder/model.safetensors.index.json": 1,
               "text_encoder/model-00001-of-00002.safetensors": 5 * GB,
               "text_encoder/model-00002-of-00002.safetensors": 5 * GB,
               "text_encoder/model.safetensors.index.fp16.json": 1,
               "text_encoder/model.fp16-00001-of-00002.safetensors": 2.5 * GB,
               "text_encoder/model.fp16-00002-of-00002.safetensors": 2.5 * GB,
               "onnx/text_encoder/model.onnx": 1 * GB, "flax/config.json": 1}
    assert set(files.select_files(listing, True, components={"text_encoder"})) == {
        "text_encoder/config.json", "text_encoder/model.safetensors.index.fp16.json",
        "text_encoder/model.fp16-00001-of-00002.safetensors", "text_encoder/model.fp16-00002-of-00002.safetensors"}


def test_components_of_model_index():
    assert files.components_of(SD15_INDEX) == {"feature_extractor", "scheduler", "text_encoder", "tokenizer",
                                               "unet", "vae"}
    assert files.components_of({"safety_checker": [None, None], "unet": ["diffusers", "X"]}) == {"unet"}
    assert files.components_of(None) is None


def test_prefetch_prints_the_plan_and_total_before_downloading(monkeypatch, tmp_path):
    printed, fetched = [], []
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(store, "_cached", lambda name: None)
    monkeypatch.setattr(store, "_hub_listing", lambda name: (SD15, SD15_INDEX, "abc123"))

    def download(plan):
        assert any("2.13 GB in all" in line for line in printed)  # said before the download starts
        fetched.append((plan.name, plan.revision, sorted(f for f, _ in plan.files)))
        return tmp_path

    monkeypatch.setattr(store, "_download", download)
    preset = resolve("default", text_to_image="some/sd15", novel_view="tiny:zero123")
    out = store.prefetch(preset, progress=printed.append)
    assert fetched == [("some/sd15", "abc123", sorted(SD15_WANTED))]
    assert out["text_to_image"] == tmp_path
    assert printed[0] == "text_to_image: some/sd15"
    assert "  13 files, 2.13 GB in all" in printed


def test_offline_and_not_cached_never_asks_the_hub(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(store, "_cached", lambda name: None)
    monkeypatch.setattr(store, "_hub_listing", lambda name: pytest.fail("asked the hub while offline"))
    with pytest.raises(ModelMissing, match="prefetch --preset default"):
        store.local_path("some/model")


def _fake_cache(root, name, files_):
    repo = root / ("models--" + name.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snap = repo / "snapshots" / ("0" * 40)
    for rel, text in files_.items():
        (snap / rel).parent.mkdir(parents=True, exist_ok=True)
        (snap / rel).write_text(text)
    return snap


def test_cached_snapshot_is_found_offline_and_an_interrupted_one_is_not(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    index = json.dumps({"_class_name": "X", "unet": ["diffusers", "U"], "safety_checker": ["a", "b"]})
    snap = _fake_cache(tmp_path, "org/full", {"model_index.json": index, "unet/config.json": "{}",
                                              "unet/diffusion_pytorch_model.safetensors": "w"})
    _fake_cache(tmp_path, "org/partial", {"model_index.json": index})
    _fake_cache(tmp_path, "org/no_weights", {"model_index.json": index, "unet/config.json": "{}"})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert store.local_path("org/full") == snap
    for name in ("org/partial", "org/no_weights"):  # stopped before a component, or before its weights
        with pytest.raises(ModelMissing, match="not on this machine"):
            store.local_path(name)


def _fp16_copy(src, dst, parts, keep_default):
    """``src``'s layout with ``parts`` saved as fp16 variants (the default weights kept or not)."""
    from diffusers.models.modeling_utils import ModelMixin
    from transformers import PreTrainedModel

    shutil.copytree(src, dst)
    for part in parts:
        folder = dst / part
        config = json.loads((folder / "config.json").read_text())
        if "architectures" in config:
            import transformers
            cls = getattr(transformers, config["architectures"][0])
        else:
            import diffusers

            from backend.models import zero123
            cls = getattr(diffusers, config["_class_name"], None) or getattr(zero123, config["_class_name"])
        assert issubclass(cls, (ModelMixin, PreTrainedModel))
        model = cls.from_pretrained(folder)
        if not keep_default:
            for f in folder.glob("*.safetensors"):
                f.unlink()
        model.half().save_pretrained(folder, variant="fp16")
    return dst


def test_loaders_read_fp16_only_folders_and_prefer_fp32_on_cpu(tmp_path):
    sd = build_tiny("stable-diffusion")
    only16 = _fp16_copy(sd, tmp_path / "sd16", ["unet", "vae", "text_encoder"], keep_default=False)
    assert files.weights_variant(only16 / "unet", want_fp16=False) == "fp16"
    assert files.pipeline_variant(only16, want_fp16=False) == "fp16"
    pipe = store.ModelStore("tiny", text_to_image=str(only16)).stable_diffusion()  # CPU: upcast
    assert pipe.unet.dtype == torch.float32

    both = _fp16_copy(sd, tmp_path / "sdboth", ["unet"], keep_default=True)
    assert files.weights_variant(both / "unet", want_fp16=True) == "fp16"
    assert files.weights_variant(both / "unet", want_fp16=False) is None
    assert files.pipeline_variant(both, want_fp16=False) is None
    reference = store.ModelStore("tiny").stable_diffusion().unet.state_dict()
    loaded = store.ModelStore("tiny", text_to_image=str(both)).stable_diffusion().unet.state_dict()
    assert all(torch.equal(reference[k], loaded[k]) for k in reference)  # the fp32 files, not the rounded ones

    z = build_tiny("zero123")
    z16 = _fp16_copy(z, tmp_path / "z16", ["unet", "vae", "image_encoder", "clip_camera_projection"],
                     keep_default=False)
    zero = store.ModelStore("tiny", novel_view=str(z16)).zero123()
    assert zero.parts.unet.dtype == torch.float32 and zero.parts.projection.proj.weight.dtype == torch.float32
