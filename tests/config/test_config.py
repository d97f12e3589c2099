from pathlib import Path

import pytest

from gce.config import load_config
from gce.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


MINIMAL = "data: {dataset: emoji, root: data/emoji}\n"


def test_every_shipped_config_validates():
    import yaml

    from gce.ablation import load_ablation, run_config

    files = sorted(CONFIGS.rglob("*.yaml"))
    experiments = [p for p in files if "variants" not in yaml.safe_load(p.read_text())]
    ablations = [p for p in files if p not in experiments]
    assert len(experiments) >= 9 and len(ablations) >= 2
    for path in experiments:
        cfg = load_config(path)
        assert cfg.model.embedding_dim % cfg.model.num_learners == 0, path
    for path in ablations:
        ablation, tree = load_ablation(path)
        for variant in ablation.variants:
            for seed in ablation.seeds:
                assert run_config(ablation, tree, variant, seed).train.seed == seed


def test_extends_merges_sections_and_overrides_win():
    cfg = load_config(CONFIGS / "ablation" / "emoji_dac.yaml", ["train.epochs=3", "optim.lr=0.5"])
    assert cfg.model.head == "linear_split" and cfg.metaclass.strategy == "samples"
    assert cfg.model.backbone == "mobilenet_v2"  # inherited from emoji.yaml
    assert cfg.train.epochs == 3 and cfg.optim.lr == 0.5


@pytest.mark.parametrize(
    "text, overrides, expected",
    [
        (MINIMAL + "modle: {}\n", [], "unknown config key 'modle'"),
        (MINIMAL, ["model.num_learnrs=2"], "unknown config key 'model.num_learnrs'"),
        (MINIMAL, ["model.num_learners=abc"], "bad value for 'model.num_learners'"),
        (MINIMAL, ["train.epochs=0"], "bad value for 'train.epochs'"),
        (MINIMAL, ["model.embedding_dim=100", "model.num_learners=3"], "model.embedding_dim=100 is not divisible"),
        (MINIMAL, ["metaclass.strategy=none"], "needs model.num_learners=1"),
        (MINIMAL, ["model.backbone=vgg"], "bad value for 'model.backbone'"),
        ("model: {}\n", [], "missing config key 'data'"),
        (MINIMAL, ["train.epochs"], "not of the form key=value"),
    ],
)
def test_bad_config_is_one_line_naming_the_key(tmp_path, text, overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), overrides)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_missing_file_and_cyclic_extends(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("extends: b.yaml\n")
    b.write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(a)
