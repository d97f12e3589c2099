"""What a pip user gets: a fast start-up, the bundled configs, extras that say what to install,
and (slow) the built wheel working in a clean venv outside the source tree."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib
import yaml

from gce import __version__
from gce.cli import subcommand_names
from gce.config import load_config
from gce.config.bundled import preset_names, preset_text, presets_folder, resolve_config_path
from gce.errors import ConfigError, GceError
from gce.extras import DISTRIBUTION, EXTRAS, require_extra

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "torchvision", "numpy", "faiss", "PIL", "fastapi", "sklearn", "scipy", "matplotlib")

_IMPORTS_AFTER = """
import sys
from gce.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print("loaded:" + ",".join(m for m in {heavy!r} if m in sys.modules), file=sys.stderr)
"""


def _heavy_imports(*argv: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", _IMPORTS_AFTER.format(heavy=HEAVY), *argv], capture_output=True, text=True, timeout=120
    )
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("loaded:"), done.stderr
    return [m for m in last.removeprefix("loaded:").split(",") if m]


@pytest.mark.parametrize(
    "argv", [["--help"], ["--version"], *[[c, "--help"] for c in subcommand_names()]], ids=lambda a: " ".join(a)
)
def test_help_and_version_import_no_ml_stack(argv):
    """`gce --help` once took 5 s importing torch and the evaluation stack for its parser."""
    assert _heavy_imports(*argv) == []


def test_reading_a_config_imports_no_torch():
    code = (
        f"import sys; from gce.config import load_config; load_config({str(REPO / 'configs' / 'emoji.yaml')!r});"
        " print('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr


def test_every_bundled_config_loads():
    from gce.ablation import load_ablation

    names = preset_names()
    assert {"emoji", "cub200", "cars196", "sop", "inshop", "ablation/emoji_strategies"} <= set(names)
    for name in names:
        path = resolve_config_path(name)
        assert Path(path).is_file() and Path(path).parent.is_relative_to(presets_folder())
        tree = yaml.safe_load(preset_text(name))
        if "variants" in tree or "seeds" in tree:
            load_ablation(path, [])
        else:
            load_config(path)


def test_configs_folder_of_a_checkout_is_the_bundled_one():
    assert (REPO / "configs").resolve() == presets_folder().resolve()


def test_an_existing_file_wins_over_a_bundled_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "emoji").write_text("name: mine\n")
    assert resolve_config_path("emoji") == "emoji"
    assert resolve_config_path("not-bundled") == "not-bundled"
    with pytest.raises(ConfigError, match="no bundled config named 'nope'; bundled: ablation/"):
        preset_text("nope")


def test_gce_config_show_prints_a_config_that_loads(tmp_path, capsys):
    from gce.cli import main

    assert main(["config", "show", "emoji"]) == 0
    (tmp_path / "my.yaml").write_text(capsys.readouterr().out)
    assert load_config(tmp_path / "my.yaml") == load_config(REPO / "configs" / "emoji.yaml")
    assert main(["config", "show", "ablation/emoji_single"]) == 0
    assert "copy the whole folder" in capsys.readouterr().err


def test_pyproject_extras_list_the_modules_that_gce_asks_for():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["name"] == DISTRIBUTION
    extras = project["optional-dependencies"]
    pip_name = {"multipart": "python-multipart", "milvus_lite": "milvus-lite"}
    for extra, (_, modules) in EXTRAS.items():
        listed = {requirement.split(">")[0].split("=")[0].split("[")[0] for requirement in extras[extra]}
        assert {pip_name.get(m, m) for m in modules} == listed, extra
    assert set(EXTRAS) <= set(extras["all"][0].split("[")[1].rstrip("]").split(","))


def test_a_missing_extra_is_one_line_naming_the_pip_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    with pytest.raises(GceError) as err:
        require_extra("serve")
    assert str(err.value) == "gce serve needs uvicorn (the 'serve' extra): pip install 'gce-dml[serve]'"
    require_extra("export")  # installed by `make test`


# ------------------------------------------------------------------------------------------------
# The wheel in a clean venv, run from outside the source tree.


def _run(argv: list[str], cwd: Path, timeout: float = 600) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(map(str, argv))}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.mark.wheel
def test_the_wheel_installs_in_a_clean_venv_and_runs_train_to_search(tmp_path):
    """Builds sdist + wheel with `python -m build`, installs the wheel (and the torch pair of this
    machine's disk) in a new venv, then from a folder outside the checkout: --version, config,
    train -> eval -> embed -> index -> search on generated images. A missing package-data line or
    a module only importable from the source tree fails here."""
    import torch
    import torchvision

    from gce.data.synthetic import make_pattern_folder

    dist = tmp_path / "dist"
    source = tmp_path / "source"  # a copy: the build leaves build/ and *.egg-info behind
    top_level = {".venv", ".git", "runs", "data", "build", "dist"}  # a checkout's work, not its source
    shutil.copytree(
        REPO,
        source,
        symlinks=True,
        ignore=lambda folder, names: [
            n
            for n in names
            if (Path(folder) == REPO and n in top_level)
            or n.endswith(".egg-info")
            or n in ("__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache")
        ],
    )
    _run([sys.executable, "-m", "build", "--outdir", str(dist), str(source)], cwd=tmp_path)
    wheel = next(dist.glob("gce_dml-*.whl"))
    assert next(dist.glob("gce_dml-*.tar.gz"))
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    assert {
        "gce/config/presets/emoji.yaml",
        "gce/config/presets/ablation/emoji_strategies.yaml",
        "gce/serve/static/index.html",
        "gce/py.typed",
    } <= names
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    torch_pair = [f"torch=={torch.__version__.split('+')[0]}", f"torchvision=={torchvision.__version__.split('+')[0]}"]
    _run([*pip, *torch_pair], cwd=tmp_path, timeout=1200)
    _run([*pip, str(wheel)], cwd=tmp_path, timeout=1200)

    work = tmp_path / "user"
    work.mkdir()
    gce = str(venv / "bin" / "gce")
    assert _run([gce, "--version"], cwd=work).strip() == f"gce {__version__}"
    assert "emoji" in _run([gce, "config", "list"], cwd=work).split()
    (work / "my.yaml").write_text(_run([gce, "config", "show", "emoji"], cwd=work))
    make_pattern_folder(work / "photos", num_classes=8, per_class=6, size=32)
    quick = [
        "data.dataset=folder",
        "data.root=photos",
        "data.image_size=32",
        "data.test_resize=32",
        "data.workers=0",
        "data.options={test_fraction: 0.25}",
        "model.pretrained=false",
        "model.freeze_bn=false",
        "model.num_learners=2",
        "model.embedding_dim=32",
        "sampler.classes_per_batch=3",
        "sampler.samples_per_class=2",
        "sampler.batches_per_epoch=2",
        "train.epochs=1",
        "train.out_dir=runs/mine",
        "train.eval_test_every=0",
        "eval.clustering=false",
    ]
    _run([gce, "train", "my.yaml", *quick, "--quiet"], cwd=work)
    assert (work / "runs" / "mine" / "model.pt").is_file()
    assert "Recall@1" in _run(
        [gce, "eval", "--checkpoint", "runs/mine", "--workers", "0", "--no-clustering", "--quiet"], cwd=work
    )
    _run(
        [gce, "embed", "--checkpoint", "runs/mine", "--images", "photos", "--out", "emb", "--workers", "0", "--quiet"],
        cwd=work,
    )
    _run([gce, "index", "build", "emb", "--out", "idx", "--quiet"], cwd=work)
    query = next((work / "photos" / "class_03").glob("*.png"))
    hits = _run(
        [gce, "search", str(query), "--index", "idx", "--checkpoint", "runs/mine", "--k", "3", "--json"], cwd=work
    )
    results = yaml.safe_load(hits)["results"]
    # One epoch of two batches from scratch barely separates the images, so only what holds for any
    # model is checked: k hits of indexed files, the best being the query's own cosine of 1.
    assert len(results) == 3 and all(Path(r["path"]).is_file() for r in results)
    assert results[0]["score"] >= 1 - 1e-4
