"""Run the tests that compare floats across code paths under every CPU kernel set and thread count.

Each variant is one pytest run with ``ATEN_CPU_CAPABILITY`` (which of torch's vectorised CPU kernels
run: ``default`` = none, ``avx2``, or unset = the machine's own, e.g. AVX-512) and
``GCE_TEST_THREADS`` (torch threads of every process in these tests, tests/helpers/numerics.py). The
tolerances of these tests come from the arithmetic (float32 epsilon, sizes of the sums, lr x steps),
so every variant must pass. Exits non-zero if any variant fails.

    python tests/helpers/numerics_matrix.py              # the whole matrix: 3 kernel sets x 1 and 2 threads
    python tests/helpers/numerics_matrix.py --ci         # the part for CI: fewer tests, 2 variants
    python tests/helpers/numerics_matrix.py --list       # the variants and tests, without running them
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Every test that compares floats computed along two code paths (processes, threads, kernels,
# batch sizes, runtimes), with a tolerance from tests/helpers/numerics.py.
CROSS_PATH = [
    "tests/distributed/test_distributed_loss.py",
    "tests/distributed/test_distributed_sharding.py",
    "tests/distributed/test_distributed_training.py",
    "tests/training/test_training.py::test_channels_last_and_compile_compute_the_plain_step",
    "tests/models/test_block_variants.py::test_grouped_trunk_computes_the_plain_trunk_at_start",
    "tests/retrieval/test_retrieval_api.py::test_embedder_normalises_each_learner_and_matches_paths",
    "tests/retrieval/test_retrieval_export.py::test_exported_model_matches_pytorch_on_real_images",
    "tests/retrieval/test_retrieval_cli.py::test_sigkilled_embed_resumes_to_the_same_result",
    "tests/serve/test_serve.py::test_padded_embedding_batches_give_each_image_its_own_embedding",
    "tests/evaluation/test_eval_knn.py::test_faiss_backend_equals_torch_backend",
    "tests/losses/test_losses_zoo.py::test_two_processes_train_proxies_like_one",
    "tests/retrieval/test_retrieval_api.py::test_build_time_exact_truth_is_evaluations_knn_chunk_by_chunk",
]
# The part for CI (about 3 minutes on a 2-core machine): 1 vs 2 processes of the loss, the
# BatchNorm and the trainer's steps and weights (not its kill and restart tests), and the grouped
# trunk's kernels against the plain ones.
CI = [
    "tests/distributed/test_distributed_loss.py",
    "tests/distributed/test_distributed_sharding.py::test_global_batchnorm_equals_one_process",
    "tests/distributed/test_distributed_training.py::test_every_step_of_two_processes_equals_one_process_to_rounding",
    "tests/distributed/test_distributed_training.py::test_two_processes_end_with_the_weights_of_one_under_sgd",
    "tests/models/test_block_variants.py::test_grouped_trunk_computes_the_plain_trunk_at_start",
    "tests/losses/test_losses_zoo.py::test_two_processes_train_proxies_like_one",
]
CAPABILITIES = ["default", "avx2", None]  # None: unset, the machine's own
THREADS = [1, 2]
# CI: the two variants furthest from the usual run (1 thread, the machine's kernels).
CI_VARIANTS = [("default", 2), ("avx2", 1)]


def run(capability: str | None, threads: int, tests: list[str], extra: list[str], cache: str) -> tuple[bool, float]:
    # torch.compile's kernel cache: its own per variant. Inductor's on-disk cache does not key on
    # ATEN_CPU_CAPABILITY (torch 2.14): kernels compiled for AVX-512 were reused under avx2 (the loss
    # came out NaN) and under default (a C++ compile error).
    env = {**os.environ, "GCE_TEST_THREADS": str(threads), "TORCHINDUCTOR_CACHE_DIR": cache}
    env.pop("ATEN_CPU_CAPABILITY", None)
    if capability:
        env["ATEN_CPU_CAPABILITY"] = capability
    src = str(ROOT / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env["PYTHONPATH"]]) if env.get("PYTHONPATH") else src
    probe = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
        env=env,
        capture_output=True,
        text=True,
    )
    label = f"ATEN_CPU_CAPABILITY={capability or '(unset)'} -> {probe.stdout.strip()}, {threads} thread(s)"
    print(f"=== {label}", flush=True)
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *extra, *tests], env=env, cwd=ROOT
    )
    seconds = time.monotonic() - start
    print(f"=== {label}: {'passed' if done.returncode == 0 else 'FAILED'} in {seconds:.0f} s", flush=True)
    return done.returncode == 0, seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ci", action="store_true", help="the CI part: fewer tests and variants")
    parser.add_argument("--list", action="store_true", help="print the variants and tests, run nothing")
    parser.add_argument("pytest_args", nargs="*", help="passed on to pytest (after --)")
    args = parser.parse_args()
    tests = CI if args.ci else CROSS_PATH
    variants = CI_VARIANTS if args.ci else [(c, t) for c in CAPABILITIES for t in THREADS]
    if args.list:
        print("variants:", ", ".join(f"{c or 'native'} x {t}" for c, t in variants))
        print("\n".join(tests))
        return 0
    with tempfile.TemporaryDirectory(prefix="gce-numerics-") as caches:
        results = [(c, t, *run(c, t, tests, args.pytest_args, os.path.join(caches, f"{c}-{t}"))) for c, t in variants]
    print("\nvariant                         result   seconds")
    for capability, threads, ok, seconds in results:
        name = f"{capability or 'native'} x {threads} thread(s)"
        print(f"{name:<31} {'passed' if ok else 'FAILED':<8} {seconds:>7.0f}")
    return 0 if all(ok for _, _, ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
