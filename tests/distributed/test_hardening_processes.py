"""Processes of a training run (issue 23): workers die with their launcher, one training per run
folder, and ``gce train --nproc`` checks what it can before it starts a single process."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import gce
from gce.cli import main

# The gce these tests import (PYTHONPATH may name another checkout): their subprocesses run it too.
SRC = Path(gce.__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; prctl is Linux's")

# Tiny: resnet18 from scratch at 16 px, 6 batches of 6 images per epoch, one thread per process.
CONFIG = """\
name: proc-test
data: {{dataset: folder, root: {root}, image_size: 16, test_resize: 16, workers: 0,
        options: {{test_fraction: 0.25, seed: 0}}}}
model: {{backbone: resnet18, head: gce, num_learners: 2, embedding_dim: 16, pretrained: false,
         freeze_bn: false}}
metaclass: {{strategy: class_proxy, update_every: 1}}
sampler: {{classes_per_batch: 3, samples_per_class: 2, batches_per_epoch: {batches}}}
train: {{epochs: {epochs}, seed: 0, out_dir: {out}, num_threads: 1}}
eval: {{batch_size: 16, clustering: false}}
"""


def write_config(tmp_path: Path, root: Path, *, epochs: int = 3, batches: int = 6, name: str = "run") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(CONFIG.format(root=root, out=tmp_path / name, epochs=epochs, batches=batches))
    return path


def _env(**extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
        **extra,
    }


def _gce(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", *args],
        env=_env(),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for init, which is not ours to hurry)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rpartition(b")")[2].split()[0] not in (b"Z", b"X")
    except FileNotFoundError:
        return False


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as fh:
                    if int(fh.read().rpartition(b")")[2].split()[1]) == pid:
                        found.append(int(entry))
            except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                continue
    return found


def _wait_for_line(process: subprocess.Popen, prefix: str) -> None:
    assert process.stdout is not None
    for line in process.stdout:  # bounded: the process ends, or the test's caller kills it
        if line.startswith(prefix):
            return
    pytest.fail(f"the run ended before {prefix!r}: {process.communicate(timeout=60)[1][-3000:]}")


def _wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(map(_running, pids)):
        time.sleep(0.05)
    return [pid for pid in pids if _running(pid)]


def _kill_all(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _records(out: Path) -> list[tuple[str, int]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(row["event"], row["epoch"]) for row in rows]


def _last_error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines, "no error printed"
    return lines[-1]


# -------------------------------------------------------------------- workers die with the launcher
@pytest.mark.slow
def test_workers_stop_when_the_launcher_is_killed_and_the_run_resumes(tmp_path, shape_folder):
    """SIGKILL of the `gce train --nproc 2` launcher: its workers (in sessions of their own) are
    gone within seconds instead of training on and writing model.pt; the lock it held does not
    block the resume, which completes."""
    config = write_config(tmp_path, shape_folder, epochs=2)
    out = tmp_path / "run"
    launcher = _gce("gce", "train", str(config), "--nproc", "2", "--quiet")
    workers: list[int] = []
    try:
        _wait_for_line(launcher, "epoch 1: meta-classes updated")  # epoch 0's checkpoint is written
        workers = _children(launcher.pid)
        assert len(workers) == 2, workers
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait(timeout=30)
        assert _wait_gone(workers, timeout_s=10) == []
    finally:
        _kill_all([launcher.pid, *workers])
        launcher.communicate(timeout=30)
    assert not (out / "model.pt").exists()  # nobody finished the run behind the dead command
    assert (out / "running.lock").read_text() == str(launcher.pid)  # the launcher held it; the kill left it
    resume = _gce("gce", "train", str(config), "--resume", "--nproc", "2", "--quiet")
    _, err = resume.communicate(timeout=300)
    assert resume.returncode == 0, err[-3000:]
    assert (out / "model.pt").exists() and not (out / "running.lock").exists()
    records = _records(out)
    assert len(records) == len(set(records))  # each (event, epoch) once: nobody else wrote the log
    assert [epoch for event, epoch in records if event == "train"] == [0, 1]


def test_torchrun_workers_stop_when_torchrun_is_killed(tmp_path, shape_folder):
    """Started by torchrun itself (no gce launcher): torchrun is the parent the workers die with."""
    config = write_config(tmp_path, shape_folder, epochs=20)
    agent = _gce("torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "gce", "train", str(config))
    workers: list[int] = []
    try:
        _wait_for_line(agent, "training proc-test")
        workers = _children(agent.pid)
        assert len(workers) == 2, workers
        os.kill(agent.pid, signal.SIGKILL)
        agent.wait(timeout=30)
        assert _wait_gone(workers, timeout_s=10) == []
    finally:
        _kill_all([agent.pid, *workers])
        agent.communicate(timeout=30)
    assert int((tmp_path / "run" / "running.lock").read_text()) in workers  # rank 0 held the run folder


PARENT_OF_A_WATCHED_CHILD = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], env={env!r})
print(child.pid, flush=True)
time.sleep(120)
"""


def _watched_child(child_code: str, **env: str) -> tuple[subprocess.Popen, int]:
    """A process that starts ``child_code`` and sleeps; returns it and its child's pid."""
    middle = subprocess.Popen(
        [sys.executable, "-c", PARENT_OF_A_WATCHED_CHILD.format(env=_env(**env)), child_code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert middle.stdout is not None
    return middle, int(middle.stdout.readline())


@pytest.mark.parametrize(
    "how",
    [
        "stop_with_launcher()",  # prctl(PR_SET_PDEATHSIG), as a worker calls it
        "watch_parent(os.getppid(), interval_s=0.05)",  # the portable fallback: a thread polling getppid
    ],
)
def test_a_worker_dies_with_its_parent(tmp_path, how):
    ready = tmp_path / "ready"
    code = textwrap.dedent(
        f"""
        import os, time
        from gce.distributed.parent_watch import stop_with_launcher, watch_parent
        {how}
        open({str(ready)!r}, "w").close()
        time.sleep(120)
        """
    )
    middle, child = _watched_child(code, TORCHELASTIC_RUN_ID="test", GCE_LAUNCHER_PID="")
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() and time.monotonic() < deadline and _running(child):
            time.sleep(0.05)
        if not ready.exists():
            _kill_all([middle.pid, child])
            pytest.fail(f"the child did not start watching: {middle.communicate(timeout=30)[1][-2000:]}")
        os.kill(middle.pid, signal.SIGKILL)
        middle.wait(timeout=30)
        assert _wait_gone([child], timeout_s=10) == []
    finally:
        _kill_all([middle.pid, child])
        middle.communicate(timeout=30)


def test_a_worker_whose_launcher_died_before_it_started_stops_at_once():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    code = "from gce.distributed.parent_watch import stop_with_launcher; stop_with_launcher(); print('survived')"
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=_env(TORCHELASTIC_RUN_ID="test", GCE_LAUNCHER_PID=str(dead.pid)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == -signal.SIGKILL and "survived" not in done.stdout
    assert f"the launcher (pid {dead.pid}) of this worker" in done.stderr
    # Outside a torchrun worker, or with a launcher pid inherited from an unrelated live process: nothing.
    for env in ({"GCE_LAUNCHER_PID": str(dead.pid)}, {"TORCHELASTIC_RUN_ID": "test", "GCE_LAUNCHER_PID": "1"}):
        done = subprocess.run(
            [sys.executable, "-c", code], env=_env(**env), capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0 and "survived" in done.stdout, done.stderr[-2000:]


# ----------------------------------------------------------------------- one training per run folder
@pytest.mark.slow
def test_a_second_train_on_a_live_run_fails_naming_its_pid(tmp_path, shape_folder, capsys):
    """The reported case: `gce train --resume` while the run lives wrote into its folder (21 log
    records instead of 13). Now it fails with one line naming the pid; the live run is untouched."""
    config = write_config(tmp_path, shape_folder)
    out = tmp_path / "run"
    live = _gce("gce", "train", str(config), "--quiet")
    try:
        _wait_for_line(live, "epoch 1: meta-classes updated")
        for extra in (["--resume"], [], ["--resume", "--nproc", "2"]):  # --nproc: the launcher, before any worker
            assert main(["train", str(config), "--quiet", *extra]) == 1
            assert _last_error(capsys) == (
                f"gce: error: train.out_dir {out} is being trained by process {live.pid} (lock file "
                f"{out / 'running.lock'}); wait for it to finish or stop it, then resume with --resume"
            )
        _, err = live.communicate(timeout=300)
    finally:
        _kill_all([live.pid])
    assert live.returncode == 0, err[-3000:]
    records = _records(out)
    assert len(records) == len(set(records))
    assert [epoch for event, epoch in records if event == "train"] == [0, 1, 2]


HOLDER = """
import sys, time
from gce.io.locks import hold_lock
with hold_lock(sys.argv[1], "test"):
    print("held", flush=True)
    time.sleep(120)
"""


def test_the_run_lock_is_reentrant_in_its_process_and_free_after_a_kill(tmp_path, shape_folder):
    from gce.ablation import run_lock
    from gce.config import load_config
    from gce.io.locks import LockedError
    from gce.run import train
    from gce.training.run_folder import hold_run_folder

    out = tmp_path / "run"
    with run_lock(out) as owned:  # the ablation runner's lock, then the trainer's in the same process
        assert owned
        with hold_run_folder(out):
            pass
        assert (out / "running.lock").read_text() == str(os.getpid())  # still the runner's
    assert not (out / "running.lock").exists()

    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out / "running.lock")], env=_env(), stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        cfg = load_config(write_config(tmp_path, shape_folder))
        with pytest.raises(LockedError, match=f"being trained by process {holder.pid} "):
            train(cfg, progress=False)  # the library's entry point
        assert sorted(p.name for p in out.iterdir()) == ["running.lock"]  # nothing written
        holder.kill()
        holder.wait(timeout=30)
        with hold_run_folder(out):  # the kernel dropped the killed holder's flock
            assert (out / "running.lock").read_text() == str(os.getpid())
    finally:
        holder.kill()
        holder.communicate(timeout=30)


# -------------------------------------------------------------------- checks before any process
@pytest.fixture
def no_launch(monkeypatch):
    """Fail the test if gce train --nproc gets to starting processes."""

    def launch(*args, **kwargs):
        raise AssertionError("workers were started")

    monkeypatch.setattr("gce.distributed.launch.launch_local", launch)


@pytest.mark.parametrize(
    ("extra", "error"),
    [
        (["--nproc", "64"], "--nproc 64 is more than the {cpus} CPU cores this process may use"),
        (
            ["--nproc", "3", "--oversubscribe", "sampler.classes_per_batch=2"],
            (
                "the global batch (sampler.classes_per_batch x sampler.samples_per_class = 4) needs at least 2 "
                "images per process; 3 processes need 6"
            ),
        ),
        (["--nproc", "2", "train.device=cuda:1"], "train.device=cuda:1"),
        (["--nproc", "2", "--resume"], "no checkpoint in {out} (expected last.pt)"),
        (["--nproc", "2", "data.root={missing}"], "folder: dataset root {missing} does not exist"),
        (["--nproc", "2", "sampler.classes_per_batch=7"], "sampler.classes_per_batch=7 is larger than the 6"),
        (["--max-restarts", "2"], "--max-restarts applies to the processes --nproc N starts; add --nproc N"),
        (["--oversubscribe"], "--oversubscribe applies to the processes --nproc N starts; add --nproc N"),
    ],
)
def test_nproc_is_checked_before_any_process_starts(tmp_path, shape_folder, capsys, no_launch, extra, error):
    from gce.distributed.run_start import usable_cpus

    if "64" in extra and usable_cpus() >= 64:
        pytest.skip("a machine with 64 cores")
    config = write_config(tmp_path, shape_folder)
    missing = tmp_path / "missing"
    extra = [e.format(missing=missing) for e in extra]
    started = time.perf_counter()
    assert main(["train", str(config), "--quiet", *extra]) == 1
    message = _last_error(capsys)
    assert message.startswith("gce: error: ")
    assert error.format(cpus=usable_cpus(), out=tmp_path / "run", missing=missing) in message
    assert time.perf_counter() - started < 30  # no start-up of any worker


def test_a_fresh_nproc_run_on_a_folder_holding_a_run_fails_in_the_launcher(tmp_path, shape_folder, capsys, no_launch):
    config = write_config(tmp_path, shape_folder)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt").write_bytes(b"")
    assert main(["train", str(config), "--quiet", "--nproc", "2"]) == 1
    assert "already holds a run; pass --resume" in _last_error(capsys)


def test_nproc_bounds_are_parsed_before_anything(capsys):
    for extra in (["--nproc", "0"], ["--nproc", "2", "--max-restarts", "-1"]):
        with pytest.raises(SystemExit) as exit_:
            main(["train", "x.yaml", *extra])
        assert exit_.value.code == 2
        assert "must be at least" in capsys.readouterr().err
