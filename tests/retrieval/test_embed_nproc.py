"""``gce embed --nproc 2`` and ``torchrun -m gce embed``: the store is the one a single process writes,
byte for byte (CPU, the same threads per process); a killed rank resumes with any process count.

Run as a script (``torchrun ... test_embed_nproc.py embed ...``) this file is ``gce`` with one
rank that dies by SIGKILL right after it renamed its second shard into place (before its part
file lists it): the worst moment, a whole shard file that nothing vouches for.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gce
from gce.commands.embed import images_under
from gce.retrieval import Embedder, embed_to_store
from helpers.numerics import THREADS
from helpers.retrieval_fixtures import make_checkpoint

SRC = Path(gce.__file__).resolve().parent.parent  # the gce under test: its subprocesses run it too
TESTS = Path(__file__).resolve().parents[1]
SHARD = 5  # 48 images: 10 shards, 5 per rank
DIE_RANK = "GCE_TEST_EMBED_DIE_RANK"


@pytest.fixture(scope="module")
def job(tmp_path_factory, shape_folder):
    """The checkpoint, the image folder and the store one process writes (the reference)."""
    folder = tmp_path_factory.mktemp("nproc")
    checkpoint = make_checkpoint(folder / "ck" / "model.pt")
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)  # what every worker gets (OMP_NUM_THREADS below)
    try:
        embed_to_store(*_inputs(checkpoint, shape_folder), folder / "one", shard_size=SHARD, progress=False)
    finally:
        torch.set_num_threads(threads)
    return checkpoint, shape_folder, folder / "one"


def _inputs(checkpoint: Path, images: Path):
    return (
        Embedder.from_checkpoint(checkpoint, batch_size=SHARD),
        [os.path.abspath(p) for p in images_under(images)],
        None,
    )


def _files(store: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(store.iterdir())}


def _run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), str(TESTS), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": str(THREADS),
        **kwargs.pop("env", {}),
    }
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, **kwargs)


def _embed_args(checkpoint: Path, images: Path, out: Path) -> list[str]:
    sizes = ["--shard-size", str(SHARD), "--batch-size", str(SHARD), "--workers", "0"]
    return ["embed", "--checkpoint", str(checkpoint), "--images", str(images), "--out", str(out), *sizes]


def _torchrun(*target: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *target]


def test_gce_embed_nproc_2_writes_the_store_of_one_process_and_rank_0_shows_the_bar(job, tmp_path):
    checkpoint, images, one = job
    done = _run([sys.executable, "-m", "gce", *_embed_args(checkpoint, images, tmp_path / "two"), "--nproc", "2"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert _files(tmp_path / "two") == _files(one)  # the shards and embeddings.json, byte for byte
    assert done.stdout.count("embedded 48 of 48 images") == 1  # rank 0 prints the summary
    bar = "embedding into two (2 processes)"
    assert done.stderr.count(f"{bar}:   0%") == 1  # one bar: rank 1 shows none
    assert f"{bar}: 100%|██████████| 48/48" in done.stderr  # rank 0's bar counts both ranks' images


def test_a_killed_rank_resumes_under_torchrun_or_one_process_to_the_same_bytes(job, tmp_path):
    checkpoint, images, one = job
    out = tmp_path / "killed"
    killed = _run([*_torchrun(__file__), *_embed_args(checkpoint, images, out)], env={DIE_RANK: "1"})
    assert killed.returncode != 0 and re.search(r"rank\s*: 1 .*\n\s*exitcode\s*: -9 ", killed.stderr), killed.stderr[
        -3000:
    ]
    # Rank 1 (shards 5..9) listed shard 5, renamed shard 6 into place and died; rank 0 was stopped.
    assert (out / "shard-00006.npz").exists() and (out / "embeddings.part-1.json").exists()
    listed = json.loads((out / "embeddings.json").read_text())["shards"]
    parts = [json.loads(p.read_text()) for p in sorted(out.glob("embeddings.part-*.json"))]
    finished = {s["file"] for s in listed} | {s["file"] for p in parts for s in p["shards"]}
    assert "shard-00005.npz" in finished and "shard-00006.npz" not in finished
    kept = sum(min(SHARD, 48 - int(name[6:11]) * SHARD) for name in finished)

    # Another process count: one process embeds only what is missing (one batch per shard here).
    other = tmp_path / "other"
    shutil.copytree(out, other)
    embedder, paths, labels = _inputs(checkpoint, images)
    calls = []
    embed_tensors = embedder.embed_tensors
    embedder.embed_tensors = lambda batch: calls.append(len(batch)) or embed_tensors(batch)  # type: ignore[method-assign]
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        info = embed_to_store(embedder, paths, labels, other, shard_size=SHARD, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert info.resumed_from == kept and sum(calls) == 48 - kept
    assert _files(other) == _files(one)

    # The same count, started by torchrun itself (no gce launcher): the same bytes.
    resumed = _run([*_torchrun("-m", "gce"), *_embed_args(checkpoint, images, out), "--quiet"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count(f"resumed after {kept}") == 1
    assert _files(out) == _files(one)


def test_process_options_are_checked_before_any_work(job, tmp_path, capsys):
    from gce.cli import main
    from gce.distributed.run_start import usable_cpus

    checkpoint, images, _one = job
    argv = _embed_args(checkpoint, images, tmp_path / "x")
    assert main([*argv, "--nproc", str(usable_cpus() + 1)]) == 1
    assert f"is more than the {usable_cpus()} CPU cores" in capsys.readouterr().err
    assert main([*argv, "--oversubscribe"]) == 1
    assert "--oversubscribe applies to the processes --nproc N starts" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def _die_after_second_commit() -> None:
    """Script mode: this rank SIGKILLs itself once its second shard file is in place."""
    import gce.retrieval.store as store

    commit, commits = store.commit_file, []

    def commit_then_maybe_die(tmp, final):
        commit(tmp, final)
        commits.append(final)
        if len(commits) == 2:
            os.kill(os.getpid(), signal.SIGKILL)

    store.commit_file = commit_then_maybe_die


if __name__ == "__main__":
    from gce.cli import entry

    if os.environ.get("RANK") == os.environ.get(DIE_RANK):
        _die_after_second_commit()
    sys.argv = ["gce", *sys.argv[1:]]
    entry()
