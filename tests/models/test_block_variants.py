"""Issue 14's variants of the group channel-wise block: learner-owned trunk layers, block shapes.

Each variant must keep the learners apart (a loss on learner k never reaches learner j's
weights), start from what the pretrained trunk computes, and survive a save/load cycle.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F

from gce.config import ModelConfig, load_config
from gce.errors import ConfigError
from gce.models import GroupChannelwiseHead, build_model, build_trunk
from gce.models.grouped_trunk import GroupedTrunk, trunk_layers
from helpers.learner_isolation import learner_backward
from helpers.numerics import RESNET18_LONGEST_SUM, THREADS, reordered

torch.set_num_threads(THREADS)  # 1 (the test machine's cores are shared) unless GCE_TEST_THREADS says otherwise


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _randomise_batchnorm(module: torch.nn.Module) -> None:
    """Non-trivial BN statistics and affine values, so that slicing them wrongly would show."""
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)


# --- the grouped trunk -----------------------------------------------------------------------


def test_trunk_layers_open_the_last_sequential() -> None:
    mobilenet, _ = build_trunk("mobilenet_v2", pretrained=False)
    assert len(trunk_layers(mobilenet)) == 19  # features.0 .. features.18
    resnet, _ = build_trunk("resnet18", pretrained=False)
    names = [type(m).__name__ for m in trunk_layers(resnet)]
    assert names[-2:] == ["BasicBlock", "BasicBlock"] and names[0] == "Conv2d"  # layer4 opened


@pytest.mark.parametrize("backbone,layers", [("mobilenet_v2", 1), ("mobilenet_v2", 3), ("resnet18", 1)])
def test_grouped_trunk_computes_the_plain_trunk_at_start(backbone: str, layers: int) -> None:
    trunk, channels = build_trunk(backbone, pretrained=False)
    _randomise_batchnorm(trunk)
    trunk.eval()
    grouped = GroupedTrunk(copy.deepcopy(trunk), channels, num_learners=4, layers=layers).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = trunk(images)
        # The opened layers run as grouped convolutions, other kernels: <= 3 sums (of <= 3 * 3 * 512)
        # per opened block, relative to the features' size; the layers before are the same computation.
        torch.testing.assert_close(
            grouped(images),
            expected,
            rtol=0,
            atol=reordered(RESNET18_LONGEST_SUM, 3 * layers) * float(expected.abs().max()),
        )
    # Each copy is its own module: changing one does not change another.
    first = next(grouped.branches[0].parameters())
    assert first.data_ptr() != next(grouped.branches[1].parameters()).data_ptr()


def test_mobilenet_last_conv_is_sliced_not_recomputed() -> None:
    trunk, channels = build_trunk("mobilenet_v2", pretrained=False)
    grouped = GroupedTrunk(trunk, channels, num_learners=8, layers=2)
    last_conv = grouped.branches[3][-1][0]
    assert tuple(last_conv.weight.shape) == (160, 320, 1, 1)  # 1280 / 8 output channels per learner


@pytest.mark.parametrize("backbone,layers", [("mobilenet_v2", 2), ("resnet18", 1)])
def test_learner_gradient_never_reaches_other_learners_trunk_copies(backbone: str, layers: int) -> None:
    k_total = 4
    model = build_model(
        ModelConfig(
            backbone=backbone,
            head="gce",
            num_learners=k_total,
            embedding_dim=32,
            pretrained=False,
            freeze_bn=True,
            grouped_trunk_layers=layers,
            block_channels=None if backbone == "mobilenet_v2" else 512,
        )
    )
    model.train()
    images = torch.randn(3, 3, 32, 32)
    params = dict(model.named_parameters())
    for k, out_slice in enumerate(model.learner_slices()):
        model.zero_grad()
        z = model(images)
        (z[:, out_slice] * torch.randn_like(z[:, out_slice])).sum().backward()
        for j in range(k_total):
            for name, rows in model.learner_parameter_slices(j).items():
                grad = params[name].grad
                if not params[name].requires_grad:
                    continue
                if j == k:
                    continue
                mask = torch.ones(params[name].shape[0], dtype=torch.bool)
                mask[rows] = False
                if name.startswith("trunk."):
                    assert grad is None or torch.count_nonzero(grad) == 0, f"learner {k} leaks into {name}"
                else:
                    assert torch.count_nonzero(grad[~mask]) == 0, f"learner {k} leaks into {name}"
        own_trunk = [n for n in model.learner_parameter_slices(k) if n.startswith("trunk.")]
        assert own_trunk and all(params[n].grad is not None for n in own_trunk if params[n].requires_grad)
        assert sum(params[n].grad.abs().sum() for n in own_trunk if params[n].requires_grad) > 0
        # The shared layers are trained by every learner.
        shared_grads = [p.grad for p in model.trunk.shared.parameters() if p.requires_grad]
        assert any(g is not None and g.abs().sum() > 0 for g in shared_grads)


def test_grouped_trunk_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"model\.grouped_trunk_layers=2 .*head='gce'.*input_mixing='grouped'"):
        build_model(
            ModelConfig(
                backbone="mobilenet_v2",
                head="linear_split",
                num_learners=4,
                embedding_dim=32,
                pretrained=False,
                freeze_bn=True,
                grouped_trunk_layers=2,
            )
        )
    with pytest.raises(ConfigError, match=r"model\.grouped_trunk_layers=19 must be between 1 and 18"):
        build_model(
            ModelConfig(
                backbone="mobilenet_v2",
                head="gce",
                num_learners=4,
                embedding_dim=32,
                pretrained=False,
                freeze_bn=True,
                grouped_trunk_layers=19,
            )
        )
    with pytest.raises(ConfigError, match="grouped_trunk_layers"):
        load_config(None, ["data.dataset=emoji", "data.root=x", "model.grouped_trunk_layers=-1"])


def test_grouped_trunk_copies_have_frozen_batchnorm_and_train_at_the_trunk_rate() -> None:
    model = build_model(
        ModelConfig(
            backbone="mobilenet_v2",
            head="gce",
            num_learners=4,
            embedding_dim=32,
            pretrained=False,
            freeze_bn=True,
            grouped_trunk_layers=2,
        )
    )
    bns = [m for m in model.trunk.branches.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not m.training and not m.weight.requires_grad for m in bns)
    model.train()
    assert all(not m.training for m in bns)
    groups = {g["name"]: g for g in model.param_groups(backbone_lr=1e-4, head_lr=1e-3, weight_decay=0.0)}
    branch_ids = {id(p) for p in model.trunk.branches.parameters() if p.requires_grad}
    assert branch_ids <= {id(p) for p in groups["backbone"]["params"]}


# --- block shapes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "block,residual", [("conv3x3", True), ("bottleneck", False), ("bottleneck", True), ("none", False)]
)
def test_block_variant_keeps_learners_apart(block: str, residual: bool) -> None:
    k_total, channels = 4, 32
    head = GroupChannelwiseHead(channels, k_total, 16, block=block, block_residual=residual).train()
    if residual:  # its last BN scale starts at 0, which blocks the conv's gradient until the first step
        torch.nn.init.ones_(head.block[-1].weight)
    expected_layers = {"conv3x3": 1, "bottleneck": 2, "none": 0}[block]
    assert sum(isinstance(m, torch.nn.Conv2d) for m in head.block) == expected_layers
    for k in range(k_total):
        owned, feature_grad = learner_backward(head, k, channels)
        assert len(owned) == 2 + 3 * expected_layers  # per layer: conv weight, BN weight and bias
        in_rows = slice(k * channels // k_total, (k + 1) * channels // k_total)
        assert torch.count_nonzero(feature_grad) == torch.count_nonzero(feature_grad[in_rows]) > 0


def test_residual_block_starts_as_the_identity() -> None:
    head = GroupChannelwiseHead(32, 4, 16, block_residual=True).train()
    plain = GroupChannelwiseHead(32, 4, 16, block="none")
    plain.embed.load_state_dict(head.embed.state_dict())
    features = torch.rand(5, 32, 3, 3)  # non-negative, like a ReLU/ReLU6 trunk's output
    torch.testing.assert_close(F.relu(features + head.block(features)), features)
    torch.testing.assert_close(head(features), plain(features))


def test_wide_and_bottleneck_blocks_have_the_requested_channels() -> None:
    head = GroupChannelwiseHead(64, 4, 16, block_channels=128, block="bottleneck")
    convs = [m for m in head.block if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.groups) for c in convs] == [
        (64, 128, (1, 1), 4),
        (128, 128, (3, 3), 4),
    ]
    assert head(torch.rand(2, 64, 3, 3)).shape == (2, 16)


def test_block_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"model\.block_residual=true needs a block"):
        build_model(
            ModelConfig(
                backbone="resnet18",
                head="gce",
                num_learners=4,
                embedding_dim=32,
                pretrained=False,
                freeze_bn=True,
                block="none",
                block_residual=True,
            )
        )
    with pytest.raises(ConfigError, match=r"model\.block_residual=true .*block_channels unset or 512"):
        build_model(
            ModelConfig(
                backbone="resnet18",
                head="gce",
                num_learners=4,
                embedding_dim=32,
                pretrained=False,
                freeze_bn=True,
                block_channels=256,
                block_residual=True,
            )
        )
    with pytest.raises(ConfigError, match=r"model\.block"):
        load_config(None, ["data.dataset=emoji", "data.root=x", "model.block=deep"])


def test_default_head_layout_is_unchanged() -> None:
    # Checkpoints of the original head must still load: same parameter names and shapes.
    head = GroupChannelwiseHead(32, 4, 16)
    shapes = {n: tuple(p.shape) for n, p in head.state_dict().items()}
    assert shapes == {
        "block.0.weight": (32, 8, 3, 3),
        "block.1.weight": (32,),
        "block.1.bias": (32,),
        "block.1.running_mean": (32,),
        "block.1.running_var": (32,),
        "block.1.num_batches_tracked": (),
        "embed.weight": (16, 8, 1, 1),
        "embed.bias": (16,),
    }


# --- state survives a save/load cycle ----------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"grouped_trunk_layers": 2, "block": "bottleneck"},
        {"block_residual": True},
        {"block": "none", "grouped_trunk_layers": 3},
    ],
)
def test_variant_state_survives_save_and_load(options: dict) -> None:
    model = build_model(
        ModelConfig(
            backbone="mobilenet_v2",
            head="gce",
            num_learners=4,
            embedding_dim=32,
            pretrained=False,
            freeze_bn=True,
            **options,
        )
    ).train()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    images = torch.randn(4, 3, 32, 32)
    for _ in range(2):  # move the weights and BN statistics away from their initial values
        optimiser.zero_grad()
        model(images).pow(3).sum().backward()
        optimiser.step()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    torch.manual_seed(123)  # a different initialisation, overwritten by the load
    restored = build_model(
        ModelConfig(
            backbone="mobilenet_v2",
            head="gce",
            num_learners=4,
            embedding_dim=32,
            pretrained=False,
            freeze_bn=True,
            **options,
        )
    )
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    model.eval(), restored.eval()
    with torch.no_grad():
        assert torch.equal(model(images), restored(images))


# --- a run with the variants resumes bit-exactly ----------------------------------------------

RESUME_CONFIG = """
name: tiny-variants
data: {{dataset: folder, root: {root}, image_size: 32, test_resize: 32, workers: 0,
        options: {{test_fraction: 0.25, seed: 0}}}}
model: {{backbone: resnet18, head: gce, num_learners: 2, embedding_dim: 16, pretrained: false,
         freeze_bn: true, grouped_trunk_layers: 1, block: bottleneck, block_residual: true}}
metaclass: {{strategy: class_proxy, update_every: 1}}
sampler: {{classes_per_batch: 3, samples_per_class: 2, batches_per_epoch: 3}}
optim: {{name: adam, lr: 1.0e-3}}
train: {{epochs: 2, seed: 0, out_dir: {out}, eval_test_every: 1, num_threads: 1}}
eval: {{batch_size: 16, clustering: false}}
"""


@pytest.mark.slow
def test_run_with_grouped_trunk_and_residual_bottleneck_resumes_bit_exactly(tmp_path, shape_folder) -> None:
    from gce.cli import main
    from gce.training.checkpoint import load_checkpoint

    outs = {}
    for name in ("full", "resumed"):
        outs[name] = tmp_path / name
        (tmp_path / f"{name}.yaml").write_text(RESUME_CONFIG.format(root=shape_folder, out=outs[name]))
    assert main(["train", str(tmp_path / "full.yaml"), "--quiet"]) == 0
    resumed_config = str(tmp_path / "resumed.yaml")
    assert main(["train", resumed_config, "--quiet", "train.epochs=1"]) == 0  # checkpoint after epoch 0
    assert main(["train", resumed_config, "--quiet", "--resume"]) == 0
    full, _ = load_checkpoint(outs["full"])
    resumed, _ = load_checkpoint(outs["resumed"])
    assert any(key.startswith("trunk.branches.1.") for key in full["model"])
    for key, tensor in full["model"].items():
        assert torch.equal(tensor, resumed["model"][key]), key
