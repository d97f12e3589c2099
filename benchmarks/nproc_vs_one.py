"""N processes against 1 process, next to the seed-to-seed spread: what "N processes train like one"
means in practice.

For each seed, the same config is trained twice with ``gce train``: in 1 process (``--threads``
torch threads) and with ``--nproc N`` (1 thread each), on the same global batches. The exact claim
(tests/distributed/test_distributed_training.py) is that every step computes the same function up to float
rounding; Adam and mining then amplify rounding-level differences (docs/scale.md). This benchmark
shows how far apart the two runs end, against how far apart two seeds of the same setting end.

Rows ``lr x S``: the config's learning rates times S (``--lr-scales``). At a tiny S the two runs
stay together (the exact claim, visible); at S=1 (the config's rates) they part, and the question is
whether the difference is larger than the seed-to-seed spread.

    python benchmarks/nproc_vs_one.py --data data/emoji --classes 250   # docs/scale.md: ~15 min on 2 cores
    python benchmarks/nproc_vs_one.py --data data/emoji --seeds 0 1 2 3 4 --epochs 4 --steps 40

Needs the emoji dataset (``gce data emoji --out data/emoji``) and the MobileNetV2 ImageNet weights
(``gce weights install``) for the default config.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METRICS = ("recall@1", "map@r")


def emoji_subset(data: Path, classes: int, folder: Path) -> Path:
    """The emoji dataset cut to its first ``classes`` classes of each split (its images linked)."""
    lines = (data / "manifest.csv").read_text().splitlines()
    kept: dict[str, list[str]] = {}
    rows = []
    for line in lines[1:]:
        label, split = line.split(",")[1], line.split(",")[3]
        names = kept.setdefault(split, [])
        if label not in names and len(names) < classes:
            names.append(label)
        if label in names:
            rows.append(line)
    out = folder / "emoji-subset"
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.csv").write_text("\n".join([lines[0], *rows]) + "\n")
    if not (out / "images").exists():
        (out / "images").symlink_to((data / "images").resolve())
    return out


def train(args: argparse.Namespace, out: Path, seed: int, scale: float, nproc: int) -> dict:
    """Final test metrics, per-epoch losses and triplets per step, and wall seconds of one run."""
    lr, backbone_lr = args.lr * scale, args.backbone_lr * scale
    overrides = [
        f"data.root={args.data}",
        "data.workers=0",
        f"train.epochs={args.epochs}",
        f"sampler.batches_per_epoch={args.steps}",
        f"train.seed={seed}",
        f"train.out_dir={out}",
        "train.eval_test_every=0",
        "eval.clustering=false",
        f"optim.lr={lr}",
        f"optim.backbone_lr={backbone_lr}",
        f"train.num_threads={1 if nproc > 1 else args.threads}",
        *args.override,
    ]
    command = [sys.executable, "-m", "gce", "train", args.config, *overrides, "--quiet"]
    if nproc > 1:
        command += ["--nproc", str(nproc)]
    env = {**os.environ, "OMP_NUM_THREADS": "1" if nproc > 1 else str(args.threads)}
    start = time.monotonic()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train_rows = [r for r in rows if r["event"] == "train"]
    final = json.loads((out / "final_metrics.json").read_text())
    return {
        "seconds": time.monotonic() - start,
        "final": {m: 100 * final[m] for m in METRICS},
        "loss": [r["loss"] for r in train_rows],
        "triplets": [r["triplets_per_step"] for r in train_rows],
    }


def spread(values: list[float]) -> str:
    return f"{statistics.stdev(values):>6.2f}" if len(values) > 1 else f"{'-':>6}"


def loss_gap(one: dict, many: dict) -> float:
    """The largest difference of the per-epoch training losses."""
    return max(abs(a - b) for a, b in zip(one["loss"], many["loss"], strict=False))


def first_parting(one: dict, many: dict) -> str:
    """The first epoch whose mean number of mined triplets per step differs ("-": none)."""
    for epoch, (a, b) in enumerate(zip(one["triplets"], many["triplets"], strict=False)):
        if a != b:
            return str(epoch)
    return "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/emoji.yaml")
    parser.add_argument("--data", default="data/emoji")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the 1-process run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="steps per epoch")
    parser.add_argument("--lr", type=float, default=1e-3, help="head learning rate at scale 1 (the config's)")
    parser.add_argument("--backbone-lr", type=float, default=1e-4, help="trunk learning rate at scale 1")
    parser.add_argument("--lr-scales", type=float, nargs="+", default=[1e-3, 1.0])
    parser.add_argument(
        "--small-scale-seeds",
        type=int,
        default=1,
        help="seeds run at scales < 1 (they only show that the runs stay together)",
    )
    parser.add_argument(
        "--classes", type=int, default=0, help="emoji: keep the first C classes of each split (0: all 935 of each)"
    )
    parser.add_argument("--override", nargs="*", default=[], help="more key=value config overrides")
    parser.add_argument("--out", default=None, help="keep the run folders here (default: a temporary folder)")
    args = parser.parse_args()

    folder = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="nproc-vs-one-"))
    if args.classes:
        args.data = str(emoji_subset(Path(args.data), args.classes, folder))
    print(
        f"{args.config} ({args.data}), {args.epochs} epochs x {args.steps} steps, "
        f"1 process x {args.threads} threads against {args.nproc} processes x 1 thread; "
        "R@1 and MAP@R in % on the test split; loss: max |1p - Np| of the epoch means; "
        "triplets: mined per step in the last epoch, and the first epoch where they differ"
    )
    header = (
        f"{'lr x':>6} {'seed':>4} | {'R@1 1p':>7} {'R@1 Np':>7} {'diff':>6} | {'MAP@R 1p':>8} {'MAP@R Np':>8} "
        f"{'diff':>6} | {'loss diff':>9} | {'triplets 1p / Np':>17} {'differ':>6} | s 1p/Np"
    )
    print(header, flush=True)
    table: dict[float, list[tuple[dict, dict]]] = {}
    for scale in args.lr_scales:
        seeds = args.seeds if scale >= 1 else args.seeds[: args.small_scale_seeds]
        for seed in seeds:
            one = train(args, folder / f"s{scale:g}-seed{seed}-1p", seed, scale, 1)
            many = train(args, folder / f"s{scale:g}-seed{seed}-{args.nproc}p", seed, scale, args.nproc)
            table.setdefault(scale, []).append((one, many))
            d = {m: many["final"][m] - one["final"][m] for m in METRICS}
            print(
                f"{scale:>6g} {seed:>4} | {one['final']['recall@1']:>7.2f} {many['final']['recall@1']:>7.2f} "
                f"{d['recall@1']:>+6.2f} | {one['final']['map@r']:>8.2f} {many['final']['map@r']:>8.2f} "
                f"{d['map@r']:>+6.2f} | {loss_gap(one, many):>9.1e} | "
                f"{one['triplets'][-1]:>8.1f} / {many['triplets'][-1]:<6.1f} {first_parting(one, many):>6} | "
                f"{one['seconds']:.0f}/{many['seconds']:.0f}",
                flush=True,
            )

    print(
        "\nSummary per learning-rate scale (metric points): mean |1p - Np| over seeds against "
        "the seed-to-seed standard deviation of the 1-process and the N-process runs"
    )
    columns = (f"{m + ' |1p-Np|':>14} {'sd 1p':>6} {'sd Np':>6}" for m in METRICS)
    print(f"{'lr x':>6} {'seeds':>5} | " + " | ".join(columns))
    for scale, pairs in table.items():
        cells = []
        for m in METRICS:
            ones, manys = [p[0]["final"][m] for p in pairs], [p[1]["final"][m] for p in pairs]
            gap = statistics.fmean(abs(a - b) for a, b in zip(ones, manys, strict=False))
            cells.append(f"{gap:>14.2f} {spread(ones)} {spread(manys)}")
        print(f"{scale:>6g} {len(pairs):>5} | " + " | ".join(cells))


if __name__ == "__main__":
    main()
