"""Shared helpers of the Triton tests (see conftest.py for how these tests run)."""

from __future__ import annotations

import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
ENABLED = INTERPRET or torch.cuda.is_available()
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def gemm_tol(dtype: torch.dtype) -> float:
    """Max |error| / max |exact| allowed for a GEMM-like output in ``dtype`` (the exact value is
    the float64 reference): about twice PyTorch's own rounding error in that dtype. fp32 on a GPU
    uses TF32 tensor cores (10-bit mantissa) unless full fp32 is asked for."""
    if dtype == torch.float32:
        return 1e-5 if INTERPRET else 5e-3
    return {torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    if e.numel() == 0:
        return 0.0
    return float((a - e).abs().max() / e.abs().max().clamp_min(1e-30))


def check_close(actual, expected, tol, what=""):
    assert tuple(actual.shape) == tuple(expected.shape), (what, actual.shape, expected.shape)
    assert torch.isfinite(actual).all(), f"{what}: non-finite values (an element never written?)"
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: max relative error {err:.3e} > {tol:.1e}"


def randn(*shape, seed, dtype=torch.float32, scale=1.0, device=None):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(*shape, generator=g, dtype=torch.float64) * scale
    return t.to(dtype).to(device or DEVICE)


def randint(low, high, shape, seed, device=None):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randint(low, high, shape, generator=g, dtype=torch.int64)
        .to(torch.int32)
        .to(device or DEVICE)
    )
