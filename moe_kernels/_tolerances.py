"""The error metric and every tolerance of the package, with the reason for each size.

Used by the tests (every backend against the reference) and by ``moe-bench``'s error column (the
installed CLI cannot import ``tests/``), so that one number serves both.

The metric is :func:`max_rel_err`, ``max |actual - expected| / max |expected|`` in float64: an
error relative to the output's scale, which is what a rounding error of a sum of products is
proportional to.
"""

from __future__ import annotations

import torch

__all__ = ["max_rel_err"]


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max |actual - expected| / max |expected|`` in float64.

    0.0 for empty tensors; ``inf`` when the shapes differ or ``actual`` holds a NaN where
    ``expected`` does not (a NaN never passes a tolerance); the absolute error when ``expected``
    is all zeros.
    """
    if tuple(actual.shape) != tuple(expected.shape):
        return float("inf")
    if expected.numel() == 0:
        return 0.0
    a = actual.detach().to(device="cpu", dtype=torch.float64)
    e = expected.detach().to(device="cpu", dtype=torch.float64)
    if bool((torch.isnan(a) & ~torch.isnan(e)).any()):
        return float("inf")
    both_nan = torch.isnan(a) & torch.isnan(e)
    diff = (a - e).abs().masked_fill(both_nan, 0.0)
    scale = e.abs().masked_fill(torch.isnan(e), 0.0).max()
    d, s = float(diff.max()), float(scale)
    return d / s if s > 0 else d
