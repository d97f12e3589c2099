"""Training-step time of the GCE head against the single-metric head, and where denormals come from.

One training step = forward + triplet loss + backward + Adam, on a P x M batch of random images,
one thread. For each setting the GCE model (K learners) and the single-metric model (K = 1, same
trunk, the baseline's ``linear_split`` head unless ``--single-head gce``) take turns step by step
(so machine load hits both alike) and the table gives
the median step times and their ratio, measured in the same run, next to the ratio of their forward
FLOPs per image and the GCE head's extra parameters: the grouped 3x3 block is real arithmetic (at
64 px on MobileNetV2 with K=4 it adds ~60 % to the trunk's FLOPs), so a time ratio at or below the
FLOP ratio means no slow path (denormals) is left, while a time ratio far above it means one is.

``--flush`` chooses the denormal setting: ``off`` (torch's default), ``on``
(``torch.set_flush_denormal(True)``, what ``gce train`` does on CPU), or ``both`` (one row each).
``--find-denormals`` counts, per module, the subnormal floats in its outputs and in the gradients
flowing out of it during one step (shows which layer produces them).

    python benchmarks/head_step_ratio.py                                     # mobilenet_v2 64 px, random and ImageNet
    python benchmarks/head_step_ratio.py --backbone resnet18 --size 64 --pretrained no --flush both
    python benchmarks/head_step_ratio.py --find-denormals --pretrained no
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter

import torch
from torch import nn

from gce.config import ModelConfig
from gce.config.vocabulary import BACKBONE_NAMES
from gce.losses import GCELoss
from gce.models import build_model
from gce.runtime import set_flush_denormal_in_openmp_workers


def build(backbone: str, head: str, k: int, dim: int, pretrained: bool) -> nn.Module:
    torch.manual_seed(0)
    return build_model(
        ModelConfig(
            backbone=backbone, head=head, num_learners=k, embedding_dim=dim, pretrained=pretrained, freeze_bn=True
        )
    )


class Stepper:
    """One model, its optimiser and loss: ``step()`` runs one training step and returns seconds."""

    def __init__(
        self,
        model: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        k: int,
        device: str = "cpu",
        amp: bool = False,
        channels_last: bool = False,
        compile: bool = False,
        cudnn_benchmark: bool = False,
    ) -> None:
        memory = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(device, memory_format=memory).train()
        self.forward = torch.compile(self.model) if compile else self.model  # as gce train's train.compile
        self.images, self.labels = images.to(device, memory_format=memory), labels.to(device)
        self.device, self.amp = torch.device(device), amp
        # The emoji config's optimiser: Adam, head 1e-3, trunk 1e-4, weight decay 1e-4.
        self.optimizer = torch.optim.Adam(
            model.param_groups(backbone_lr=1e-4, head_lr=1e-3, weight_decay=1e-4), foreach=True
        )
        self.loss = GCELoss(margin=0.1, mining="semihard", full_embedding_weight=0.5 if k > 1 else 0.0)
        self.slices = model.learner_slices()
        self.k, self.count = k, 0
        self.cudnn_benchmark = cudnn_benchmark
        self.peak_extra = 0  # CUDA: most bytes a step allocated above what was resident at its start

    def step(self) -> float:
        cuda = self.device.type == "cuda"
        if cuda:
            torch.backends.cudnn.benchmark = self.cudnn_benchmark  # read at every convolution
            torch.cuda.reset_peak_memory_stats()
            resident = torch.cuda.memory_allocated()
        start = time.perf_counter()
        part = self.slices[self.count % self.k] if self.k > 1 else None
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            embeddings = self.forward(self.images)
        loss, _ = self.loss(embeddings.float(), self.labels, part)  # mining and loss in fp32
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.count += 1
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        if cuda:
            self.peak_extra = max(self.peak_extra, torch.cuda.max_memory_allocated() - resident)
        return seconds

    def peak_gib(self) -> float:
        """GiB one process training this model alone peaks at: its own weights, gradients and Adam
        state, plus the most a step allocated on top (activations, workspaces); CUDA only."""
        tensors = [t for p in self.model.parameters() for t in (p, p.grad) if t is not None]
        tensors += [v for state in self.optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
        own = sum(t.numel() * t.element_size() for t in tensors if t.is_cuda)
        return (own + self.peak_extra) / 2**30


def batch(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """P x M images: real ones from ``--data`` (an emoji dataset folder: white backgrounds, flat
    regions), else Gaussian noise."""
    labels = torch.arange(args.classes).repeat_interleave(args.per_class)
    if args.data is None:
        g = torch.Generator().manual_seed(0)
        return torch.randn(len(labels), 3, args.size, args.size, generator=g), labels
    from gce.data import load_dataset
    from gce.data.images import ImageDataset
    from gce.data.transforms import test_transform

    records = load_dataset("emoji", args.data).train
    by_class: dict[int, list[int]] = {}
    for i, c in enumerate(records.labels.tolist()):
        by_class.setdefault(c, []).append(i)
    chosen = [idx[: args.per_class] for idx in by_class.values() if len(idx) >= args.per_class][: args.classes]
    dataset = ImageDataset(records, test_transform(args.size))
    return torch.stack([dataset[i][0] for idx in chosen for i in idx]), labels


def forward_flops(model: nn.Module, size: int) -> int:
    """FLOPs of one image's forward pass (``torch.utils.flop_counter``: 2 per multiply-add of the
    convolutions and matrix products; element-wise work is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    model.train(was_training)
    return int(counter.get_total_flops())


def compute_ratio(args: argparse.Namespace, pretrained: bool, k: int) -> tuple[float, float, float]:
    """Forward GFLOPs per image of the GCE model and of the single-metric model, and the GCE model's
    extra trainable parameters (millions): the work the GCE head adds by design."""
    gce, single = (
        build(args.backbone, head, kk, args.dim, pretrained) for head, kk in (("gce", k), (args.single_head, 1))
    )
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    return (
        forward_flops(gce, args.size) / 1e9,
        forward_flops(single, args.size) / 1e9,
        (count(gce) - count(single)) / 1e6,
    )


def measure(args: argparse.Namespace, pretrained: bool, flush: bool, k: int) -> tuple[float, float, str, str]:
    """Median seconds per step of the GCE model with ``k`` learners and of the single-metric model,
    and (CUDA) the GiB each peaks at (:meth:`Stepper.peak_gib`; "-" on CPU)."""
    torch.set_flush_denormal(flush)  # this thread and (below) torch's OpenMP workers, as gce train does
    set_flush_denormal_in_openmp_workers(flush)
    images, labels = batch(args)
    options = {"device": args.device, "amp": args.amp, "channels_last": args.channels_last}
    gce = Stepper(build(args.backbone, "gce", k, args.dim, pretrained), images, labels, k, **options)
    single = Stepper(build(args.backbone, args.single_head, 1, args.dim, pretrained), images, labels, 1, **options)
    times: dict[str, list[float]] = {"gce": [], "single": []}
    for i in range(args.warmup + args.steps):
        for name, stepper in (("gce", gce), ("single", single)):
            seconds = stepper.step()
            if i >= args.warmup:
                times[name].append(seconds)
    memory = [f"{m.peak_gib():.2f}" if m.device.type == "cuda" else "-" for m in (gce, single)]
    return statistics.median(times["gce"]), statistics.median(times["single"]), memory[0], memory[1]


def _subnormal_count(t: torch.Tensor) -> int:
    if not t.is_floating_point():
        return 0
    tiny = torch.finfo(t.dtype).tiny
    a = t.detach().abs()
    return int(((a > 0) & (a < tiny)).sum())


def find_denormals(args: argparse.Namespace, pretrained: bool) -> None:
    torch.set_flush_denormal(False)
    model = build(args.backbone, "gce", args.k[0], args.dim, pretrained)
    outputs: Counter[str] = Counter()
    grads: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    for name, module in model.named_modules():
        if hasattr(module, "inplace"):
            module.inplace = False  # in-place activations cannot be combined with backward hooks
        if list(module.children()):
            continue

        def fwd(mod, inp, out, name=name):
            outputs[name] += _subnormal_count(out)
            sizes[name] = out.numel()

        def bwd(mod, grad_in, grad_out, name=name):
            grads[name] += sum(_subnormal_count(g) for g in grad_in if g is not None)

        module.register_forward_hook(fwd)
        module.register_full_backward_hook(bwd)
    images, labels = batch(args)
    stepper = Stepper(model, images, labels, args.k[0])
    for _ in range(args.warmup + 1):
        for counts in (outputs, grads):
            counts.clear()
        stepper.step()
    params = {n: _subnormal_count(p) for n, p in model.named_parameters()}
    param_grads = {n: _subnormal_count(p.grad) for n, p in model.named_parameters() if p.grad is not None}
    print(f"subnormal floats in step {args.warmup + 1}, {args.backbone} pretrained={pretrained} K={args.k[0]}:")
    rows = [(n, outputs[n], grads[n], sizes[n]) for n in sizes if outputs[n] or grads[n]]
    for name, out, grad, size in rows or [("(none)", 0, 0, 0)]:
        print(f"  {name:<32} output {out:>9,} of {size:>10,}   input-grad {grad:>9,}")
    state = {
        f"{n}.{key}": _subnormal_count(v)
        for n, p in model.named_parameters()
        for key, v in stepper.optimizer.state.get(p, {}).items()
        if isinstance(v, torch.Tensor)
    }
    for label, counts in (("parameters", params), ("parameter grads", param_grads), ("Adam state", state)):
        hit = {n: c for n, c in counts.items() if c}
        print(f"  {label}: " + (", ".join(f"{n} {c:,}" for n, c in hit.items()) if hit else "none"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="mobilenet_v2", choices=BACKBONE_NAMES)
    p.add_argument("--size", type=int, default=64, help="image size (px)")
    p.add_argument("--pretrained", choices=["yes", "no", "both"], default="both")
    p.add_argument("--flush", choices=["on", "off", "both"], default="both")
    p.add_argument("--k", type=int, nargs="+", default=[4], help="learners of the GCE model (one row each)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", action="store_true", help="bf16 autocast for the forward (loss in fp32)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument(
        "--single-head",
        choices=["linear_split", "gce"],
        default="linear_split",
        help="head of the single-metric model (K=1); linear_split is the project's baseline",
    )
    p.add_argument("--classes", type=int, default=16, help="P")
    p.add_argument("--per-class", type=int, default=4, help="M")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data", help="emoji dataset folder for real images (default: Gaussian noise)")
    p.add_argument("--find-denormals", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    pretrained = {"yes": [True], "no": [False], "both": [False, True]}[args.pretrained]
    if args.find_denormals:
        for pre in pretrained:
            find_denormals(args, pre)
        return
    flushes = {"on": [True], "off": [False], "both": [False, True]}[args.flush]
    n = args.classes * args.per_class
    print(
        f"{args.backbone}, {args.size} px, batch {args.classes}x{args.per_class}, D={args.dim}, {args.device}"
        f"{', bf16 autocast' if args.amp else ''}{', channels-last' if args.channels_last else ''}, "
        f"{args.threads} thread(s), median of {args.steps} steps after {args.warmup} warm-up"
    )
    print(
        f"{'weights':<9} {'flush denormals':<16} {'K':>3} {'GCE s/step':>11} {'single s/step':>14} "
        f"{'GCE img/s':>10} {'single img/s':>13} {'ratio':>6} {'GFLOP GCE/single':>17} {'FLOP ratio':>10} "
        f"{'extra M params':>14} {'GCE GiB':>8} {'single GiB':>10}"
    )
    for pre in pretrained:
        for flush in flushes:
            for k in args.k:
                g, s, g_gib, s_gib = measure(args, pre, flush, k)
                fg, fs, extra = compute_ratio(args, pre, k)
                print(
                    f"{'ImageNet' if pre else 'random':<9} {'on' if flush else 'off':<16} {k:>3} {g:>11.3f} "
                    f"{s:>14.3f} {n / g:>10.1f} {n / s:>13.1f} {g / s:>6.2f} {f'{fg:.3f}/{fs:.3f}':>17} "
                    f"{fg / fs:>10.2f} {extra:>14.2f} {g_gib:>8} {s_gib:>10}"
                )
    torch.set_flush_denormal(False)


if __name__ == "__main__":
    main()
