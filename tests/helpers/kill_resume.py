"""Kill a tiny training run at random moments, resume it until it finishes, compare with a clean run.

1. builds a tiny shape dataset (8 classes x 6 images of 32 px) and a tiny config (resnet18 from
   scratch, K=2 learners, D=16, 32 px, ``--epochs`` epochs of ``--batches`` batches, one thread);
2. trains it once without interruption (the reference);
3. trains the same config in another folder, killing it with SIGKILL ``--kills`` times at seeded
   random moments: during start-up, after a random delay in training, the moment a checkpoint's
   temporary file ``.last.pt.tmp-*`` appears (the write is under way), or a random delay after
   that (fsync, renames, what follows). ``--sigints N`` also sends N Ctrl-Cs (SIGINT), which
   write a mid-epoch checkpoint and exit 130. After each stop the run is restarted with
   ``--resume`` (without it while the folder holds no checkpoint yet, as a user would), until
   it exits 0;
4. compares: every tensor of ``last.pt`` (model, optimiser, scheduler), of ``model.pt`` and of the
   RNG state equal (``torch.equal``) to the reference, ``metrics.jsonl`` records equal except
   their ``seconds`` field, ``final_metrics.json`` equal.

    python tests/helpers/kill_resume.py                              # 12 kills, python -m gce train
    python tests/helpers/kill_resume.py --kills 20 --sigints 3 --seed 1 --keep runs/killtest
    python tests/helpers/kill_resume.py --launcher forkserver        # faster: see below

``--launcher subprocess`` (default) starts every attempt as ``python -m gce train ...``; each
start pays the import of torch/torchvision (3-9 s on two busy cores). ``--launcher forkserver``
forks every attempt from a process that has imported gce once (``multiprocessing``'s forkserver):
the attempt is still a separate process killed with SIGKILL, so what is left on disk is the same,
but a start costs ~0.1 s. The test (tests/training/test_reliability_kill.py) uses it to stay fast.
Exit status: 0 when everything is equal, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

REPO = Path(__file__).resolve().parents[2]

CONFIG = """\
name: killtest
data: {{dataset: folder, root: {root}, image_size: 32, test_resize: 32, workers: 0,
        options: {{test_fraction: 0.25, seed: 0}}}}
model: {{backbone: resnet18, head: gce, num_learners: 2, embedding_dim: 16, pretrained: false,
         freeze_bn: false}}
metaclass: {{strategy: class_proxy, update_every: 1}}
sampler: {{classes_per_batch: 3, samples_per_class: 2, batches_per_epoch: {batches}}}
optim: {{name: adam, lr: 1.0e-3}}
train: {{epochs: {epochs}, seed: 0, out_dir: {out}, eval_test_every: 1, num_threads: 1}}
eval: {{batch_size: 16}}
"""

#: Stop moments (see _stop_once). "startup": random delay from the process start (imports, data
#: check, set-up); "training": random delay after the run reported it started training;
#: "checkpoint": as soon as a checkpoint's temporary file appears; "after-checkpoint": random delay
#: after that; "training-2": random delay after the attempt's first checkpoint is complete;
#: "finishing": while the final model.pt is written (the last kill); "batches" (SIGINT only): just
#: after an attempt starts training batches.


from gce.data.synthetic import make_pattern_folder as make_shape_folder  # noqa: E402


# ------------------------------------------------------------------------------------ launchers
def _forkserver_child(argv: list[str], log_path: str) -> None:
    """Body of a forkserver attempt: stdout/stderr to the log, then the ``gce`` command line."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    import threading

    from tqdm import tqdm

    # tqdm's default lock is a multiprocessing semaphore registered with the parent's resource
    # tracker; a killed attempt would leave it behind (and a warning at exit). Not what is tested.
    tqdm.set_lock(threading.RLock())
    from gce.cli import main

    raise SystemExit(main(argv))


def _noop() -> None:
    pass


class Attempt:
    """One started training process: pid, poll(), wait(), signal()."""

    def __init__(self, handle, forked: bool) -> None:
        self.handle, self.forked = handle, forked
        self.pid = handle.pid
        self.started = time.perf_counter()

    def poll(self) -> int | None:
        if self.forked:
            return None if self.handle.is_alive() else self.handle.exitcode
        return self.handle.poll()

    def wait(self, timeout: float | None = None) -> int | None:
        if self.forked:
            self.handle.join(timeout)
            return self.handle.exitcode
        try:
            return self.handle.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)


class Launcher:
    def __init__(self, kind: str) -> None:
        self.kind = kind
        if kind == "forkserver":
            self.ctx = multiprocessing.get_context("forkserver")
            self.ctx.set_forkserver_preload(
                ["gce.cli", "gce.commands.train", "gce.training.trainer", "torch.utils.tensorboard"]
            )
        elif kind != "subprocess":
            raise ValueError(f"unknown launcher {kind!r}")

    def warm_up(self) -> None:
        """Start the forkserver (it imports gce once) so that it is not timed as a start-up."""
        if self.kind == "forkserver":
            process = self.ctx.Process(target=_noop)
            process.start()
            process.join()

    def start(self, argv: list[str], log: Path) -> Attempt:
        if self.kind == "forkserver":
            process = self.ctx.Process(target=_forkserver_child, args=(argv, str(log)), daemon=True)
            process.start()
            return Attempt(process, forked=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        with open(log, "ab") as fh:
            handle = subprocess.Popen(
                [sys.executable, "-m", "gce", *argv],
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        return Attempt(handle, forked=False)


# ------------------------------------------------------------------------------ observing a run
def _tmp_present(out: Path, pid: int | None = None) -> bool:
    """Whether a checkpoint's temporary file exists (the one process ``pid`` writes, if given).

    A killed writer's file stays until the next checkpoint removes it, hence the pid.
    """
    try:
        names = os.listdir(out)
    except FileNotFoundError:
        return False
    if pid is not None:
        return f".last.pt.tmp-{pid}" in names
    return any(name.startswith(".last.pt.tmp-") for name in names)


def _has_checkpoint(out: Path) -> bool:
    return (out / "last.pt").exists() or (out / "prev.pt").exists()


# Not anchored: with progress bars on, a line can follow a bar's last "\r" on the same line.
_TRAINING_STARTED = re.compile(r"(training \S+: \d+ images / |resumed from \S+ at epoch )")


def _log_text(log: Path, offset: int) -> str:
    try:
        with open(log, "rb") as fh:
            fh.seek(offset)
            return fh.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def describe_phase(text: str, tmp_present: bool, exporting: bool = False) -> str:
    """Best guess of what the process was doing, from its output so far and the run folder."""
    if exporting:
        return "writing the final model.pt (.model.pt.tmp present)"
    if tmp_present:
        return "writing a checkpoint (.last.pt.tmp-* present)"
    if not _TRAINING_STARTED.search(text):
        if "checking images" in text:
            return "start-up (checking images / building the model)"
        return "start-up (imports)"
    fragments = [f.strip() for f in re.split(r"[\r\n]", text) if f.strip()]
    for fragment in reversed(fragments):
        m = re.match(r"^epoch (\d+): (proxies|test|validation)", fragment)
        if m:
            what = {"proxies": "meta-class update", "test": "test evaluation", "validation": "validation"}[m.group(2)]
            return f"{what}, epoch {m.group(1)}"
        m = re.match(r"^epoch (\d+):\s+\d+%\|.*?(\d+)/(\d+)", fragment)
        if m:
            done, total = int(m.group(2)), int(m.group(3))
            if done >= total:
                return f"end of epoch {m.group(1)} (k-means / checkpoint)"
            return f"training epoch {m.group(1)}, ~batch {done}/{total}"
        m = re.match(r"^epoch (\d+): loss", fragment)
        if m:
            return f"after epoch {m.group(1)} (checkpoint / next meta-class update)"
        m = re.match(r"^epoch (\d+): meta-classes updated", fragment)
        if m:
            return f"training epoch {m.group(1)}, batch 0"
        m = re.match(r"^resumed from \S+ at epoch (\d+), batch (\d+)", fragment)
        if m:
            return f"training epoch {m.group(1)} from batch {m.group(2)}"
        if _TRAINING_STARTED.match(fragment):
            return "set-up done, first meta-class update"
    return "training (phase not detected)"


@dataclass
class Stop:
    attempt: int
    signal: str  # SIGKILL or SIGINT
    mode: str
    seconds: float  # since the attempt's process started
    phase: str
    exit_code: int | None = None
    resumed_at: str = ""  # where the next attempt resumed


@dataclass
class Outcome:
    stops: list[Stop] = field(default_factory=list)
    attempts: int = 0
    resumes: int = 0
    fresh_restarts: int = 0
    seconds: float = 0.0
    reference_seconds: float = 0.0


class Watch:
    """Polls one attempt: its exit, its log, and each new appearance of a checkpoint temp file."""

    def __init__(self, attempt: Attempt, out: Path, log: Path) -> None:
        self.attempt, self.out, self.log = attempt, out, log
        self.tmp_seen = 0  # checkpoint writes this attempt has started
        self._tmp_now = False
        self._log_checked = 0.0
        self._training = False

    def tick(self) -> bool:
        """Update; False once the process has exited."""
        now = self.writing()
        if now and not self._tmp_now:
            self.tmp_seen += 1
        self._tmp_now = now
        return self.attempt.poll() is None

    def writing(self) -> bool:
        """Whether this attempt's checkpoint temporary file exists now."""
        return _tmp_present(self.out, self.attempt.pid)

    def training_started(self) -> bool:
        if not self._training and time.perf_counter() - self._log_checked > 0.02:
            self._log_checked = time.perf_counter()
            self._training = bool(_TRAINING_STARTED.search(_log_text(self.log, 0)))
        return self._training

    def until(self, predicate, timeout: float = 300.0) -> bool:
        """Poll every millisecond until predicate() (True) or exit / timeout (False)."""
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if not self.tick():
                return False
            if predicate():
                return True
            time.sleep(0.001)
        return False

    def sleep(self, seconds: float, max_tmp: int) -> bool:
        """Wait ``seconds``, but stop early when checkpoint write number ``max_tmp`` starts."""
        deadline = time.perf_counter() + seconds
        return self.until(lambda: time.perf_counter() >= deadline or self.tmp_seen >= max_tmp, seconds + 1)


def checkpoint_epoch(out: Path) -> int:
    """Epochs completed according to the folder's checkpoint (0 without one)."""
    import torch

    for name in ("last.pt", "prev.pt"):
        try:
            blob = torch.load(out / name, map_location="cpu", weights_only=True, mmap=True)
            return int(blob["state"]["epoch"])
        except Exception:  # absent or damaged: the trainer falls back the same way
            continue
    return 0


def interrupted_run(
    launcher: Launcher,
    config: Path,
    out: Path,
    logs: Path,
    *,
    kills: int,
    sigints: int,
    epochs: int,
    rng: random.Random,
    startup_s: float,
    epoch_s: float,
    timeout: float = 900.0,
) -> Outcome:
    """Run ``config`` in ``out`` until it exits 0, stopping it ``kills`` + ``sigints`` times.

    A stop lets the attempt complete at most one epoch's checkpoint, and only with probability
    (epochs left - 1) / (stops left), so that every planned stop happens before the run ends. The
    last planned SIGKILL waits for the final export (``model.pt``), after the last checkpoint: the
    next attempt resumes a finished run and only evaluates and exports.
    """
    outcome = Outcome()
    plan = ["SIGKILL"] * kills + ["SIGINT"] * sigints
    rng.shuffle(plan)
    bags = ModeBags()
    started = time.perf_counter()
    while True:
        if time.perf_counter() - started > timeout:
            raise RuntimeError(f"the interrupted run did not finish within {timeout:.0f} s")
        resume = _has_checkpoint(out)
        outcome.attempts += 1
        if outcome.attempts > 1:
            if resume:
                outcome.resumes += 1
            else:
                outcome.fresh_restarts += 1
        epochs_left = epochs - (checkpoint_epoch(out) if resume else 0)
        log = logs / f"attempt_{outcome.attempts:02d}.log"
        argv = ["train", str(config), "--resume"] if resume else ["train", str(config)]
        attempt = launcher.start(argv, log)
        stop = None
        if plan and plan[0] == "SIGINT" and epochs_left <= 1 and "SIGKILL" in plan:
            plan.append(plan.pop(0))  # a Ctrl-C in the last epoch may let the run finish: kills first
        if plan:
            allow_progress = rng.random() < max(0, epochs_left - 1) / len(plan)
            watch = Watch(attempt, out, log)
            if len(plan) == 1 and plan[0] == "SIGKILL" and epochs_left >= 1:
                bags.left["no-progress"] = ["finishing"]  # the last kill: during the final export
            stop = _stop_once(
                watch, plan[0], rng, bags, startup_s, epoch_s, allow_progress and len(plan) > 1, outcome.attempts
            )
        code = attempt.wait(timeout)
        if code is None:
            attempt.signal(signal.SIGKILL)
            raise RuntimeError(f"attempt {outcome.attempts} hung; see {log}")
        if outcome.stops:
            outcome.stops[-1].resumed_at = _resumed_at(_log_text(log, 0))
        if stop is not None:
            plan.pop(0)
            stop.exit_code = code
            outcome.stops.append(stop)
            expected = -signal.SIGKILL if stop.signal == "SIGKILL" else 130
            if code not in (expected, 0):
                raise RuntimeError(
                    f"attempt {outcome.attempts}: exit status {code} after {stop.signal}: {_log_text(log, 0)[-2000:]}"
                )
            if code == 0:  # the signal came after the run finished its work
                stop.phase += " (run had finished)"
                break
            continue
        if code != 0:
            raise RuntimeError(
                f"attempt {outcome.attempts} failed with exit status {code}: {_log_text(log, 0)[-2000:]}"
            )
        break
    outcome.seconds = time.perf_counter() - started
    return outcome


def _resumed_at(text: str) -> str:
    m = re.search(r"resumed from \S+ at (epoch \d+(?:, batch \d+)?)", text)
    if m:
        return m.group(1)
    return "fresh start" if _TRAINING_STARTED.search(text) else "(stopped before it reported)"


class ModeBags:
    """Draws stop modes so that each one turns up: a shuffled round of all of them, then another."""

    MODES: ClassVar[dict[str, list[str]]] = {
        "no-progress": ["startup", "training", "checkpoint", "training", "checkpoint"],
        "progress": ["after-checkpoint", "training-2"],
    }

    def __init__(self) -> None:
        self.left: dict[str, list[str]] = {k: [] for k in self.MODES}

    def draw(self, kind: str, rng: random.Random) -> str:
        if not self.left[kind]:
            self.left[kind] = list(self.MODES[kind])
            rng.shuffle(self.left[kind])
        return self.left[kind].pop()


def _tmp_present_name(out: Path, name: str) -> bool:
    """Whether a temporary file ``name`` (or ``name-<pid>``, as gce.io writes them) is in ``out``."""
    try:
        return any(entry == name or entry.startswith(name + "-") for entry in os.listdir(out))
    except OSError:
        return False


def _stop_once(
    watch: Watch,
    sig_name: str,
    rng: random.Random,
    bags: ModeBags,
    startup_s: float,
    epoch_s: float,
    allow_progress: bool,
    number: int,
) -> Stop | None:
    """Wait for a seeded random moment of this attempt and send the signal; None if it exited first.

    Without ``allow_progress`` the stop lands before this attempt's first checkpoint write has
    finished (at the latest: the moment it starts); with it, after the first write started and
    before the second one starts.
    """
    if sig_name == "SIGINT":
        # Ctrl-C once this attempt trains batches: it finishes the step and writes a mid-epoch
        # checkpoint (or, on an epoch's last batch, one at the epoch's end).
        batches_started = re.compile(r"(epoch \d+: meta-classes updated|resumed from \S+ at epoch \d+, batch \d+)")
        if not watch.until(lambda: bool(batches_started.search(_log_text(watch.log, 0))), timeout=300):
            return None
        watch.sleep(rng.uniform(0.0, 0.1), 10**6)
        mode = "batches"
    else:
        mode = bags.draw("progress" if allow_progress else "no-progress", rng)
    limit = 2 if allow_progress else 1  # stop no later than the start of this checkpoint write
    if mode == "batches":
        pass
    elif mode == "finishing":  # while the final export is written: the resume only evaluates
        if not watch.until(lambda: _tmp_present_name(watch.out, ".model.pt.tmp")):
            return None
    elif mode == "startup":
        delay = rng.uniform(0.0, startup_s) - (time.perf_counter() - watch.attempt.started)
        watch.sleep(max(0.0, delay), limit)
    elif mode in ("training", "training-2"):
        if mode == "training-2":  # after the first checkpoint of this attempt is complete
            watch.until(lambda: watch.tmp_seen >= 1)
            watch.until(lambda: not watch.writing())
        if not watch.until(watch.training_started):
            return None
        watch.sleep(rng.uniform(0.0, epoch_s), limit)
    elif mode == "checkpoint":
        watch.until(lambda: watch.tmp_seen >= 1)
    else:  # after-checkpoint: a little after the first write started (fsync, renames, what follows)
        watch.until(lambda: watch.tmp_seen >= 1)
        watch.sleep(rng.uniform(0.0, 0.6), limit)
    if not watch.tick():
        return None
    phase = describe_phase(_log_text(watch.log, 0), watch.writing(), _tmp_present_name(watch.out, ".model.pt.tmp"))
    seconds = time.perf_counter() - watch.attempt.started
    watch.attempt.signal(signal.SIGKILL if sig_name == "SIGKILL" else signal.SIGINT)
    return Stop(attempt=number, signal=sig_name, mode=mode, seconds=seconds, phase=phase)


# ---------------------------------------------------------------------------------- comparison
def compare_runs(reference: Path, candidate: Path) -> dict[str, object]:
    """Bitwise comparison of two finished run folders; returns what differs (empty lists: equal)."""
    import torch

    from gce.training.checkpoint import load_checkpoint

    def tensors(tree, prefix=""):
        if isinstance(tree, torch.Tensor):
            yield prefix, tree
        elif isinstance(tree, dict):
            for key, value in tree.items():
                yield from tensors(value, f"{prefix}.{key}" if prefix else str(key))
        elif isinstance(tree, (list, tuple)):
            for i, value in enumerate(tree):
                yield from tensors(value, f"{prefix}[{i}]")

    result: dict[str, object] = {}
    for name in ("last.pt", "model.pt"):
        a, _ = load_checkpoint(reference / name)
        b, _ = load_checkpoint(candidate / name)
        ta, tb = (
            dict(tensors({k: v for k, v in a.items() if k != "config"})),
            dict(tensors({k: v for k, v in b.items() if k != "config"})),
        )
        differ = sorted(
            k
            for k in set(ta) | set(tb)
            if k not in ta or k not in tb or ta[k].dtype != tb[k].dtype or not torch.equal(ta[k], tb[k])
        )
        result[f"{name} tensors"] = len(ta)
        result[f"{name} differing"] = differ
        if name == "last.pt":
            plain = {k: a[k] for k in ("epoch", "batch", "partial", "best_val")}
            result["last.pt counters equal"] = plain == {k: b[k] for k in plain}
            result["last.pt python rng equal"] = a["rng"]["python"] == b["rng"]["python"]

    def records(folder: Path) -> list[dict]:
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

    ra, rb = records(reference), records(candidate)
    result["metrics.jsonl records"] = len(ra)
    result["metrics.jsonl equal"] = ra == rb
    fa = json.loads((reference / "final_metrics.json").read_text())
    fb = json.loads((candidate / "final_metrics.json").read_text())
    result["final_metrics.json equal"] = fa == fb
    result["equal"] = (
        not result["last.pt differing"]
        and not result["model.pt differing"]
        and result["last.pt counters equal"]
        and result["last.pt python rng equal"]
        and result["metrics.jsonl equal"]
        and result["final_metrics.json equal"]
    )
    return result


# ---------------------------------------------------------------------------------------- main
def run_benchmark(
    workdir: Path,
    *,
    kills: int = 12,
    sigints: int = 0,
    seed: int = 0,
    epochs: int = 4,
    batches: int = 6,
    launcher: str = "subprocess",
    echo=print,
) -> dict[str, object]:
    """Everything: dataset, config, reference run, interrupted run, comparison. Returns a summary."""
    workdir = Path(workdir)
    data = make_shape_folder(workdir / "shapes")
    launch = Launcher(launcher)
    launch.warm_up()
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    configs = {}
    for name in ("reference", "interrupted"):
        configs[name] = workdir / f"{name}.yaml"
        configs[name].write_text(CONFIG.format(root=data, out=workdir / name, epochs=epochs, batches=batches))

    # The reference; its timings calibrate the random delays of the interrupted run.
    t0 = time.perf_counter()
    attempt = launch.start(["train", str(configs["reference"])], logs / "reference.log")
    started = None
    while attempt.poll() is None:
        if started is None and _TRAINING_STARTED.search(_log_text(logs / "reference.log", 0)):
            started = time.perf_counter()
        time.sleep(0.01)
    if attempt.wait() != 0:
        raise RuntimeError(f"reference run failed: {_log_text(logs / 'reference.log', 0)[-3000:]}")
    finished = time.perf_counter()
    startup_s = (started or finished) - t0
    train_s = finished - (started or t0)
    echo(f"reference run: {finished - t0:.1f} s ({startup_s:.1f} s start-up, {train_s:.1f} s training)")

    outcome = interrupted_run(
        launch,
        configs["interrupted"],
        workdir / "interrupted",
        logs,
        kills=kills,
        sigints=sigints,
        epochs=epochs,
        rng=random.Random(seed),
        startup_s=startup_s,
        epoch_s=train_s / epochs,
    )
    outcome.reference_seconds = finished - t0
    comparison = compare_runs(workdir / "reference", workdir / "interrupted")
    summary = {
        "outcome": outcome,
        "comparison": comparison,
        "launcher": launcher,
        "epochs": epochs,
        "batches": batches,
        "seed": seed,
    }
    echo(format_report(summary))
    return summary


def format_report(summary: dict[str, object]) -> str:
    outcome: Outcome = summary["outcome"]  # type: ignore[assignment]
    comparison: dict = summary["comparison"]  # type: ignore[assignment]
    lines = [
        (
            f"launcher {summary['launcher']}, {summary['epochs']} epochs x {summary['batches']} batches,"
            f" seed {summary['seed']}"
        ),
        "",
        "| # | signal | aimed at | at (s after start) | phase when it landed | exit | next attempt |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, s in enumerate(outcome.stops, 1):
        lines.append(f"| {i} | {s.signal} | {s.mode} | {s.seconds:.2f} | {s.phase} | {s.exit_code} | {s.resumed_at} |")
    kills = sum(s.signal == "SIGKILL" for s in outcome.stops)
    sigints = sum(s.signal == "SIGINT" for s in outcome.stops)
    ok = lambda v: "yes" if v else "NO"  # noqa: E731
    lines += [
        "",
        (
            f"kills: {kills}, SIGINTs: {sigints}, attempts: {outcome.attempts} "
            f"({outcome.resumes} with --resume, {outcome.fresh_restarts} fresh restarts: no checkpoint yet)"
        ),
        f"time: reference {outcome.reference_seconds:.1f} s, interrupted run {outcome.seconds:.1f} s",
        (
            f"last.pt: {comparison['last.pt tensors']} tensors (model, optimiser, scheduler, RNG), "
            f"differing: {len(comparison['last.pt differing'])}; counters/RNG equal: "
            f"{ok(comparison['last.pt counters equal'] and comparison['last.pt python rng equal'])}"
        ),
        f"model.pt: {comparison['model.pt tensors']} tensors, differing: {len(comparison['model.pt differing'])}",
        (
            f"metrics.jsonl: {comparison['metrics.jsonl records']} records, equal except 'seconds': "
            f"{ok(comparison['metrics.jsonl equal'])}; "
            f"final_metrics.json equal: {ok(comparison['final_metrics.json equal'])}"
        ),
        f"EQUAL: {ok(comparison['equal'])}",
    ]
    for name in ("last.pt differing", "model.pt differing"):
        if comparison[name]:
            lines.append(f"{name}: {', '.join(comparison[name][:10])}")  # type: ignore[index]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=12, help="SIGKILLs (default 12)")
    parser.add_argument("--sigints", type=int, default=0, help="SIGINTs (Ctrl-C) mixed in (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batches", type=int, default=6, help="batches per epoch")
    parser.add_argument("--launcher", choices=["subprocess", "forkserver"], default="subprocess")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary one)")
    args = parser.parse_args(argv)
    if args.keep:
        if args.keep.exists():
            shutil.rmtree(args.keep)
        workdir, cleanup = args.keep, None
    else:
        cleanup = tempfile.TemporaryDirectory(prefix="gce-kill-resume-")
        workdir = Path(cleanup.name)
    try:
        summary = run_benchmark(
            workdir,
            kills=args.kills,
            sigints=args.sigints,
            seed=args.seed,
            epochs=args.epochs,
            batches=args.batches,
            launcher=args.launcher,
        )
    finally:
        if cleanup is not None:
            cleanup.cleanup()
    return 0 if summary["comparison"]["equal"] else 1  # type: ignore[index]


if __name__ == "__main__":
    sys.exit(main())
