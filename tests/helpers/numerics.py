"""Tolerances of the tests that compare floats computed along two code paths, from the arithmetic.

Two paths that compute the same function in float32 (1 process or N, 1 thread or 2, the AVX-512 or
the AVX2 kernels, ...) differ only in the order of their sums. Nothing here is fitted to a machine:

- ``EPS`` is float32's machine epsilon (2**-23 = 1.19e-7); rounding one result costs <= EPS/2 of it.
- A sum of n terms, evaluated in another order, moves by about ``sqrt(n) * EPS`` times the size of
  its terms (rounding errors add like a random walk: Higham & Mary, "A new approach to
  probabilistic rounding error analysis", SISC 2019; the worst case, ``n * EPS``, needs every error
  to have the same sign). Through a chain of ``depth`` such sums (a network's layers, forward and
  backward) the relative differences add: :func:`reordered`.
- Adam's step is at most ``lr * adam_step_bound(t)`` per entry at step t, whatever the gradients
  (Cauchy-Schwarz on the bias-corrected moments); see :func:`adam_step_bound`.

``GCE_TEST_THREADS`` (default 1) is the number of torch threads of every process in these tests:
``tests/helpers/numerics_matrix.py`` runs them with 1 and 2 threads and each ``ATEN_CPU_CAPABILITY``.
"""

from __future__ import annotations

import math
import os

import torch

EPS = torch.finfo(torch.float32).eps  # 1.1920929e-07
THREADS = int(os.environ.get("GCE_TEST_THREADS", "1"))

# resnet18 + GCE head: the longest dot product is a 3x3 convolution over 512 channels (the head's
# grouped block sums over 9 * 512 / K); 20 weight layers, and the head's block and embedding: 22.
RESNET18_LONGEST_SUM = 3 * 3 * 512
RESNET18_GCE_DEPTH = 22
# mobilenet_v2 + GCE head: 52 convolutions and the head's 2; the longest sum is the head's grouped
# 3x3 block over 1280 / K channels, 5760 at K=2 (the trunk's longest, a 1x1 over 960, is shorter).
MOBILENET_V2_LONGEST_SUM = 3 * 3 * 1280 // 2
MOBILENET_V2_GCE_DEPTH = 54


def reordered(n: int, depth: int = 1) -> float:
    """Relative difference (to the size of the summed terms) that reordering the sums of a chain of
    ``depth`` reductions of at most ``n`` terms can cause in float32: ``depth * sqrt(n) * EPS``."""
    return depth * math.sqrt(n) * EPS


def triplet_loss_atol(longest: int, depth: int) -> float:
    """A triplet loss's value, computed along two paths: each triplet's ``d_ap - d_an + margin``, from
    distances between unit vectors (<= 2) that went through the network (``depth`` sums of at most
    ``longest`` terms): each distance moves by <= 2 * reordered(...), the difference by twice that."""
    return 4 * reordered(longest, depth)


def triplet_grad_rtol(longest: int, depth: int, margin: float) -> float:
    """A gradient of a triplet loss, per tensor, normwise, along two paths: the forward and the
    backward chain (2 * ``depth`` sums) relative to the terms summed; a semihard triplet's gradient is
    the difference of two unit directions whose distances differ by < ``margin``, which cancels up to
    1/margin of them."""
    return reordered(longest, 2 * depth) / margin


def adam_step_bound(t: int, betas: tuple[float, float] = (0.9, 0.999)) -> float:
    """Largest possible ``|m_hat / (sqrt(v_hat) + eps)|`` of Adam at step ``t`` (1-based).

    ``m_hat = sum_i a_i g_i`` and ``v_hat = sum_i b_i g_i**2`` with
    ``a_i = (1 - b1) b1**(t-i) / (1 - b1**t)`` and ``b_i = (1 - b2) b2**(t-i) / (1 - b2**t)``, so by
    Cauchy-Schwarz ``|m_hat| <= sqrt(sum a_i**2 / b_i) * sqrt(v_hat)``: 1.0 at t=1, 1.043 at t=10.
    """
    b1, b2 = betas
    return math.sqrt(
        sum(
            ((1 - b1) * b1 ** (t - i) / (1 - b1**t)) ** 2 / ((1 - b2) * b2 ** (t - i) / (1 - b2**t))
            for i in range(1, t + 1)
        )
    )


def ulp(x: torch.Tensor) -> float:
    """The spacing of float32 numbers at the largest magnitude in ``x`` (0 for an all-zero ``x``)."""
    top = float(x.abs().max()) if x.numel() else 0.0
    return 2.0 ** (math.frexp(top)[1] - 24) if top else 0.0


def ulps(x: torch.Tensor) -> torch.Tensor:
    """The spacing of float32 numbers at each entry of ``x`` (float64; 0 where ``x`` is 0)."""
    _, exponent = torch.frexp(x.detach().float())
    return torch.where(x == 0, 0.0, torch.pow(2.0, exponent.double() - 24))
