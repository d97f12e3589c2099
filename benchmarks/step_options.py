"""What ``train.channels_last``, ``train.compile`` and ``train.amp`` do to the speed of a GCE training step.

One training step = forward + triplet loss + backward + Adam on a P x M batch (the step of
``benchmarks/head_step_ratio.py``: the emoji config's optimiser and loss). One GCE model per
option, all from the same initial weights, take turns step by step (machine load hits them alike);
the table gives median seconds per step, images/s and the speed-up over the plain model, measured
in one run. ``torch.compile``'s first steps compile (tens of seconds): the warm-up steps absorb
them and their time is printed separately. bf16 autocast (``amp``) is a CUDA option (on CPU gce
ignores it) and is measured only with ``--device cuda``, as is ``cudnn.benchmark`` (cuDNN times its
convolution algorithms on the first step of each shape and keeps the fastest). On CUDA the last
column is the GiB one process training that model alone peaks at (weights, gradients, Adam state
and the step's largest allocation on top).

    python benchmarks/step_options.py                                   # mobilenet_v2, 64 px, K=8, CPU
    python benchmarks/step_options.py --device cuda --backbone resnet50 --size 224 --k 4
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from gce.runtime import flush_denormals
from head_step_ratio import Stepper, batch, build  # a sibling script: python puts benchmarks/ on the path


def options(device: str) -> dict[str, dict[str, bool]]:
    chosen = {
        "plain": {},
        "channels_last": {"channels_last": True},
        "compile": {"compile": True},
        "channels_last + compile": {"channels_last": True, "compile": True},
    }
    if device.startswith("cuda"):
        chosen.update(
            {
                "amp (bf16)": {"amp": True},
                "amp + channels_last": {"amp": True, "channels_last": True},
                "cudnn.benchmark": {"cudnn_benchmark": True},
                "amp + channels_last + cudnn.benchmark": {"amp": True, "channels_last": True, "cudnn_benchmark": True},
            }
        )
    return chosen


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="mobilenet_v2", choices=["resnet18", "resnet50", "googlenet", "mobilenet_v2"])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--k", type=int, default=8, help="learners")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument(
        "--pretrained", action="store_true", help="ImageNet weights (default: random; speed does not depend on them)"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--classes", type=int, default=16, help="P")
    p.add_argument("--per-class", type=int, default=4, help="M")
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data", help="emoji dataset folder for real images (default: Gaussian noise)")
    p.add_argument("--only", nargs="+", help="measure only these options")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    flush_denormals(torch.device(args.device))  # what gce train does
    images, labels = batch(args)
    chosen = {n: o for n, o in options(args.device).items() if not args.only or n in args.only}
    steppers = {
        name: Stepper(
            build(args.backbone, "gce", args.k, args.dim, args.pretrained),
            images,
            labels,
            args.k,
            device=args.device,
            **opts,
        )
        for name, opts in chosen.items()
    }
    warmup: dict[str, float] = dict.fromkeys(steppers, 0.0)
    times: dict[str, list[float]] = {n: [] for n in steppers}
    for i in range(args.warmup + args.steps):
        for name, stepper in steppers.items():
            seconds = stepper.step()
            if i < args.warmup:
                warmup[name] += seconds
            else:
                times[name].append(seconds)
    n = args.classes * args.per_class
    print(
        f"{args.backbone} + GCE head K={args.k}, D={args.dim}, {args.size} px, batch {args.classes}x{args.per_class}, "
        f"{args.device}, {args.threads} thread(s), median of {args.steps} steps after {args.warmup} warm-up "
        f"(PyTorch {torch.__version__})"
    )
    print(f"{'option':<38} {'s/step':>8} {'img/s':>8} {'speed-up':>9} {'warm-up s':>10} {'peak GiB':>9}")
    plain = statistics.median(times["plain"]) if "plain" in times else None
    for name in steppers:
        median = statistics.median(times[name])
        speedup = f"{plain / median:.2f}x" if plain else "-"
        stepper = steppers[name]
        peak = f"{stepper.peak_gib():.2f}" if stepper.device.type == "cuda" else "-"
        print(f"{name:<38} {median:>8.3f} {n / median:>8.1f} {speedup:>9} {warmup[name]:>10.1f} {peak:>9}")


if __name__ == "__main__":
    sys.exit(main())
