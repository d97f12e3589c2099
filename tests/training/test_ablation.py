"""The ablation runner on a tiny dataset: summary table, plots, and restart of unfinished runs only."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gce.ablation import mean_std, run_lock, summary_table
from gce.cli import main

ABLATION = """
base: base.yaml
out_dir: {out}
seeds: [0, 1]
overrides: [train.epochs=1, sampler.batches_per_epoch=2, train.eval_test_every=0]
variants:
  single: [model.head=linear_split, model.num_learners=1, metaclass.strategy=none]
  gce: []
"""

BASE = """
data: {{dataset: folder, root: {root}, image_size: 32, test_resize: 32, workers: 0, options: {{test_fraction: 0.25}}}}
model: {{backbone: resnet18, head: gce, num_learners: 2, embedding_dim: 16, pretrained: false, freeze_bn: false}}
sampler: {{classes_per_batch: 3, samples_per_class: 2}}
eval: {{clustering: false}}
"""


@pytest.mark.slow
def test_ablation_runs_summarises_and_skips_finished(tmp_path, shape_folder, capsys):
    out = tmp_path / "abl"
    (tmp_path / "base.yaml").write_text(BASE.format(root=shape_folder))
    path = tmp_path / "abl.yaml"
    path.write_text(ABLATION.format(out=out))
    assert main(["ablate", str(path), "--quiet"]) == 0
    summary = (out / "summary.md").read_text()
    assert "| single | 2 |" in summary and "| gce | 2 |" in summary
    for png in ("recall_at_1.png", "classes_per_learner.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    # Simulate a killed ablation: one run lost its final metrics -> only that one is redone.
    (out / "gce" / "seed1" / "final_metrics.json").unlink()
    before = (out / "single" / "seed0" / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(["ablate", str(path), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("finished earlier, skipped") == 3
    assert "[gce seed 1] resuming" in printed
    assert (out / "single" / "seed0" / "metrics.jsonl").read_text() == before
    assert json.loads((out / "gce" / "seed1" / "final_metrics.json").read_text())["num_classes"] == 2


def test_summary_table_mean_and_sample_std():
    runs = {"a": [{"final": {"recall@1": 0.5}}, {"final": {"recall@1": 0.7}}]}
    table = summary_table(runs, metrics=("recall@1",))
    mean, std = mean_std([50.0, 70.0])
    assert f"{mean:.1f} ± {std:.1f}" in table and "| a | 2 |" in table
    assert std == pytest.approx(14.142, abs=1e-3)
    one = summary_table({"b": [{"final": {"recall@1": 0.5}}]}, metrics=("recall@1",))
    assert "| b | 1 | 50.0 |" in one and "±" not in one


def test_unknown_variant_is_a_clear_error(tmp_path, shape_folder, capsys):
    (tmp_path / "base.yaml").write_text(BASE.format(root=shape_folder))
    path = tmp_path / "abl.yaml"
    path.write_text(ABLATION.format(out=tmp_path / "abl"))
    assert main(["ablate", str(path), "--only", "nope"]) == 1
    assert "unknown variant" in capsys.readouterr().err


def test_run_lock_skips_live_owner_and_takes_over_stale(tmp_path):
    folder = tmp_path / "run"
    with run_lock(folder) as owned:
        assert owned and (folder / "running.lock").read_text() == str(os.getpid())
    assert not (folder / "running.lock").exists()  # released
    # A live process (our parent) holds it: skipped, lock untouched.
    (folder / "running.lock").write_text(str(os.getppid()))
    with run_lock(folder) as owned:
        assert not owned
    assert (folder / "running.lock").read_text() == str(os.getppid())
    # Its process died: taken over.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (folder / "running.lock").write_text(str(dead.pid))
    with run_lock(folder) as owned:
        assert owned
    assert not (folder / "running.lock").exists()


def test_locked_run_is_skipped_by_a_second_process(tmp_path, shape_folder, capsys):
    out = tmp_path / "abl"
    (tmp_path / "base.yaml").write_text(BASE.format(root=shape_folder))
    path = tmp_path / "abl.yaml"
    path.write_text(ABLATION.format(out=out))
    for variant in ("single", "gce"):
        for seed in (0, 1):
            (out / variant / f"seed{seed}").mkdir(parents=True)
            (out / variant / f"seed{seed}" / "running.lock").write_text(str(os.getppid()))
    assert main(["ablate", str(path), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("being trained by another process, skipped") == 4
    assert not list(out.glob("*/seed*/last.pt"))


def test_every_runs_data_is_checked_before_the_first_run_trains(tmp_path, shape_folder, capsys):
    # The last variant reads a folder that is not there: before, the first runs trained first.
    (tmp_path / "base.yaml").write_text(BASE.format(root=shape_folder))
    path = tmp_path / "abl.yaml"
    missing = tmp_path / "no-such-data"
    path.write_text(ABLATION.format(out=tmp_path / "abl") + f"  elsewhere: [data.root={missing}]\n")
    assert main(["ablate", str(path), "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(missing) in err[0]
    assert not list((tmp_path / "abl").rglob("*.pt"))  # no run trained
