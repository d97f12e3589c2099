"""timm backbones (ConvNeXt-T, ViT-S/16, DINOv2 ViT-S/14) at tiny image sizes with random weights.

Each is a full-size architecture (22-28 M parameters) on 32 px (28 px for patch 14) images, so a
forward is milliseconds; building one takes seconds, hence one model per backbone per module.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gce.config import ModelConfig
from gce.config.loading import config_from_dict
from gce.config.vocabulary import BACKBONE_CHANNELS, BACKBONE_PATCH
from gce.errors import ConfigError, GceError
from gce.models import EmbeddingModel, build_model, build_trunk
from gce.models.timm_backbones import HUB_FILENAME, ViTTrunk
from helpers.numerics import EPS, reordered

timm = pytest.importorskip("timm")
torch.set_num_threads(1)  # the test machine's cores are shared

TIMM = ["timm/convnext_tiny", "timm/vit_small_patch16_224", "timm/vit_small_patch14_dinov2"]
K, D = 4, 32


def _size(name: str) -> int:
    return 2 * BACKBONE_PATCH.get(name, 16)  # a 2 x 2 patch grid; ConvNeXt (stride 32): a 1 x 1 map


def _images(name: str, batch: int = 2, seed: int = 0) -> torch.Tensor:
    s = _size(name)
    return torch.randn(batch, 3, s, s, generator=torch.Generator().manual_seed(seed))


def _config(name: str, **changes: object) -> ModelConfig:
    values: dict = {"backbone": name, "num_learners": K, "embedding_dim": D, "pretrained": False}
    return ModelConfig(**(values | {"block_residual": True} | changes))


@pytest.fixture(scope="module")
def models() -> dict[str, EmbeddingModel]:
    torch.manual_seed(0)
    return {name: build_model(_config(name)) for name in TIMM}


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache, so tests never read or write the user's."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path / "hf"


def _timm_features(name: str, model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """What gce's trunk must compute, from timm's model: ConvNeXt's feature map, a ViT's patch tokens on their grid."""
    features = model.forward_features(images)
    if name not in BACKBONE_PATCH:
        return features
    p, (b, _, h, w) = BACKBONE_PATCH[name], images.shape
    patches = features[:, model.num_prefix_tokens :]
    return torch.stack([patches[i].T.reshape(-1, h // p, w // p) for i in range(b)])  # channel c, row y, col x


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, torch.nn.Module]]:
    """Each timm model with seeded random weights, saved as timm saves it (ViT-S/16 as safetensors)."""
    from safetensors.torch import save_file

    folder, out = tmp_path_factory.mktemp("weights"), {}
    for name in TIMM:
        torch.manual_seed(123)
        kwargs = {"dynamic_img_size": True} if name in BACKBONE_PATCH else {}
        model = timm.create_model(name.removeprefix("timm/"), pretrained=False, **kwargs).eval()
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        path = folder / (f"{name[5:]}.safetensors" if "patch16" in name else f"{name[5:]}.pth")
        save_file(state, str(path)) if path.suffix == ".safetensors" else torch.save(state, path)
        out[name] = (path, model)
    return out


@pytest.mark.parametrize("name", TIMM)
def test_embeddings_have_the_shape_and_unit_learner_slices(name: str, models: dict[str, EmbeddingModel]) -> None:
    model = models[name].eval()
    assert model.trunk.out_channels == model.head.in_channels == BACKBONE_CHANNELS[name]  # timm's num_features
    images = _images(name)
    with torch.no_grad():
        fmap = model.trunk(images)
        z = model(images)
    grid = _size(name) // BACKBONE_PATCH.get(name, 32)
    assert fmap.shape == (2, BACKBONE_CHANNELS[name], grid, grid)
    assert z.shape == (2, D) and torch.isfinite(z).all()
    atol = 4 * math.sqrt(D // K) * EPS  # one rounding per squared entry of the norm, and the division
    for sl in model.learner_slices():
        torch.testing.assert_close(z[:, sl].norm(dim=1), torch.ones(2), rtol=0, atol=atol)


@pytest.mark.parametrize("name", TIMM)
def test_one_training_step_reaches_the_trunk_and_the_block(name: str, models: dict[str, EmbeddingModel]) -> None:
    model = models[name].train()
    model.zero_grad()
    z = model(_images(name, seed=1))
    (z * torch.randn(z.shape, generator=torch.Generator().manual_seed(2))).sum().backward()
    first = next(p for p in model.trunk.parameters())  # ConvNeXt's stem conv; a ViT's class token
    stem = model.trunk.vit.patch_embed.proj.weight if isinstance(model.trunk, ViTTrunk) else first
    assert stem.grad is not None and stem.grad.abs().sum() > 0
    # the residual block's BN scale starts at zero, so its scale (not yet its conv) gets the gradient
    block = [p.grad for p in model.head.block.parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert block and model.head.embed.weight.grad.abs().sum() > 0
    model.zero_grad()


# Each export takes 10-30 s here: the two ViTs share every line of gce code, so DINOv2 (patch 14) stands for both.
@pytest.mark.parametrize("name", ["timm/convnext_tiny", "timm/vit_small_patch14_dinov2"])
def test_onnx_export_matches_pytorch(name: str, models: dict[str, EmbeddingModel], tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from gce.retrieval import Embedder
    from gce.retrieval.export import PARITY_LIMIT, export_model, parity_difference

    embedder = Embedder(models[name].eval(), image_size=_size(name))
    export_model(embedder, tmp_path / "m.onnx", "onnx")
    # ViT-S: 12 blocks of 5 sums (the longest, the MLP's 1536 terms); ConvNeXt-T: 18 blocks of 3
    # (3072 terms), the stem and 3 downsampling convs; both then the head's 2.
    longest, depth = (3072, 18 * 3 + 6) if "convnext" in name else (1536, 12 * 5 + 3)
    assert parity_difference(embedder, tmp_path / "m.onnx") <= min(PARITY_LIMIT, 2 * reordered(longest, depth))


@pytest.mark.parametrize("name", TIMM)
def test_model_weights_file_is_loaded_into_the_trunk(name: str, saved: dict) -> None:
    path, reference = saved[name]
    built = []
    for seed in (1, 2):  # the trunk's values come from the file, not from the seed
        torch.manual_seed(seed)
        built.append(build_model(_config(name, pretrained=True, weights=str(path)), allow_download=False).eval())
    images = _images(name, seed=3)
    with torch.no_grad():
        expected = _timm_features(name, reference, images)
        for model in built:
            torch.testing.assert_close(model.trunk(images), expected, rtol=0, atol=0)  # same weights, same kernels


def test_wrong_keys_are_a_one_line_error_naming_them(saved: dict, tmp_path: Path) -> None:
    path, _ = saved["timm/vit_small_patch16_224"]
    from safetensors.torch import load_file, save_file

    state = load_file(str(path))
    state["blocks.0.attn.qkv.weight_renamed"] = state.pop("blocks.0.attn.qkv.weight")
    state["norm.weight"] = state["norm.weight"][:100].clone()
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad))
    with pytest.raises(GceError) as info:
        build_trunk("timm/vit_small_patch16_224", pretrained=True, weights=str(bad))
    message = str(info.value)
    assert "\n" not in message and f"model.weights={bad}" in message
    assert "missing keys: blocks.0.attn.qkv.weight;" in message
    assert "unexpected keys: blocks.0.attn.qkv.weight_renamed;" in message
    assert "wrong shapes: norm.weight (100,) (model (384,))" in message
    with pytest.raises(GceError, match=r"model\.weights=.*nothing\.pth: no such file"):
        build_trunk("timm/convnext_tiny", pretrained=True, weights=str(tmp_path / "nothing.pth"))


def test_a_torchvision_file_for_another_backbone_is_refused_in_one_line(tmp_path: Path) -> None:
    import torchvision

    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(GceError, match=r"does not fit backbone resnet50: missing keys: .*wrong shapes: ") as info:
        build_trunk("resnet50", pretrained=True, weights=str(tmp_path / "r18.pth"))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", TIMM)
def test_missing_weights_offline_say_which_file_to_put_where(name: str, hf_cache: Path) -> None:
    with pytest.raises(GceError) as info:
        build_trunk(name, pretrained=True, allow_download=False)
    message = str(info.value)
    repo = timm.models.get_pretrained_cfg(name.removeprefix("timm/")).hf_hub_id
    assert "\n" not in message and "downloads disabled" in message
    assert f"https://huggingface.co/{repo}/resolve/main/{HUB_FILENAME}" in message
    assert "set model.weights: PATH" in message and str(hf_cache) in message


def test_a_failed_download_is_the_same_one_line_message(hf_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("We couldn't connect to 'https://huggingface.co'\nmore detail")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(GceError, match=r"download failed: OSError: We couldn't connect.*set model\.weights") as info:
        build_trunk("timm/vit_small_patch16_224", pretrained=True)
    assert "\n" not in str(info.value)


def test_weights_in_the_hugging_face_cache_load_offline(saved: dict, hf_cache: Path) -> None:
    from gce.weights import weights_status

    name = "timm/vit_small_patch16_224"
    path, reference = saved[name]
    repo = timm.models.get_pretrained_cfg("vit_small_patch16_224").hf_hub_id
    folder = hf_cache / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    (folder / "snapshots" / commit).mkdir(parents=True)
    (folder / "snapshots" / commit / HUB_FILENAME).write_bytes(path.read_bytes())
    assert weights_status()[name] is True and weights_status()["timm/convnext_tiny"] is False
    trunk, channels = build_trunk(name, pretrained=True, allow_download=False)
    images = _images(name, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(trunk.eval()(images), _timm_features(name, reference, images), rtol=0, atol=0)
    assert channels == 384


def _experiment(backbone: str, size: int, **model: object) -> dict:
    return {
        "data": {"dataset": "folder", "root": "data/x", "image_size": size},
        "model": {"backbone": backbone, **model},
    }


@pytest.mark.parametrize(("name", "size", "hint"), [
    ("timm/vit_small_patch14_dinov2", 224, "use 224 or 238"),  # 224 = 16 x 14 is fine: no error
    ("timm/vit_small_patch14_dinov2", 225, "use 224 or 238"),
    ("timm/vit_small_patch16_224", 230, "use 224 or 240"),
    ("timm/vit_small_patch16_224", 12, "use 16 or 32"),
])  # fmt: skip
def test_an_image_size_off_the_patch_grid_is_a_one_line_config_error(name: str, size: int, hint: str) -> None:
    if size % BACKBONE_PATCH[name] == 0:
        assert config_from_dict(_experiment(name, size)).data.image_size == size
        return
    with pytest.raises(ConfigError, match=rf"data\.image_size={size} is not a multiple of the patch size") as info:
        config_from_dict(_experiment(name, size))
    assert hint in str(info.value) and "\n" not in str(info.value)


def test_model_weights_and_grouped_trunk_layers_are_checked_with_the_config() -> None:
    with pytest.raises(ConfigError, match=r"model\.weights=w\.pth .* but model\.pretrained=false"):
        config_from_dict(_experiment("resnet50", 224, weights="w.pth", pretrained=False))
    with pytest.raises(ConfigError, match=r"model\.backbone=timm/vit_small_patch16_224 is a vision transformer"):
        config_from_dict(_experiment("timm/vit_small_patch16_224", 224, grouped_trunk_layers=1))
    with pytest.raises(ConfigError, match=r"model\.backbone.*'timm/vit_small_patch16_224'") as info:
        config_from_dict(_experiment("vit_small_patch16_224", 224))  # timm's name without gce's prefix
    assert "\n" not in str(info.value)


def test_a_missing_timm_is_the_pip_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "timm" else real(name, *a))
    with pytest.raises(GceError, match=r"timm backbones needs timm .*pip install 'gce-dml\[timm\]'"):
        build_trunk("timm/convnext_tiny", pretrained=False)


def test_importing_the_models_and_the_config_does_not_import_timm() -> None:
    code = "import sys, gce.cli, gce.config, gce.models; print('timm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.slow
def test_a_vit_run_trains_and_its_model_file_reloads(tmp_path: Path, shape_folder: Path) -> None:
    from gce.training.checkpoint import load_model
    from helpers.tiny_training import run_train, write_config

    out = tmp_path / "run"
    config = write_config(tmp_path, shape_folder, out)
    overrides = [
        "model.backbone=timm/vit_small_patch14_dinov2",
        "data.image_size=28",
        "data.test_resize=28",
        "train.epochs=1",
        "sampler.batches_per_epoch=2",
        "train.trackers=[]",
    ]
    assert run_train(config, *overrides) == 0
    model, cfg = load_model(out / "model.pt")  # rebuilt with pretrained=false, the run's weights loaded
    assert cfg.model.backbone == "timm/vit_small_patch14_dinov2" and isinstance(model.trunk, ViTTrunk)
    images = _images("timm/vit_small_patch14_dinov2", seed=5)
    with torch.no_grad():
        z = model.eval()(images)
    assert z.shape == (2, 32) and torch.isfinite(z).all()


def test_a_vit_given_images_off_its_patch_grid_says_so(models: dict[str, EmbeddingModel]) -> None:
    trunk = models["timm/vit_small_patch14_dinov2"].trunk.eval()
    with pytest.raises(ConfigError, match=r"images of 30 x 28 px are not a multiple of the patch size 14"):
        trunk(torch.zeros(1, 3, 30, 28))


def test_model_weights_is_in_a_dump_only_when_set() -> None:
    # Configs without it dump (config.yaml, checkpoints, gce.Embedder's model id) what they did before it.
    plain = config_from_dict(_experiment("resnet50", 224))
    assert "weights" not in plain.to_dict()["model"] and "weights" not in plain.model.model_dump()
    given = config_from_dict(_experiment("resnet50", 224, weights="w.pth"))
    assert given.to_dict()["model"]["weights"] == "w.pth"
    assert config_from_dict(given.to_dict()) == given
