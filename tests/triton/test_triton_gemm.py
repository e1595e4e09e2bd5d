"""Grouped GEMM (forward, data and ragged-K weight gradients) against the reference."""

from __future__ import annotations

import pytest
import torch
from triton_helpers import DEVICE, DTYPES, check_close, gemm_tol, randn

# (offs, M): why each row exists
OFFS_CASES = [
    ([10, 10, 30, 33, 45], 50),  # an empty expert, a 3-row expert, rows past offs[-1] (must be 0)
    ([0, 17, 17, 40], 40),  # leading empty expert, segments crossing tile boundaries
    ([20], 20),  # E = 1
    ([0, 0, 0], 5),  # every expert empty: output all zeros, weight gradients exactly zero
]


def _inputs(offs, M, K, N, E, dtype, trans_b, seed):
    a = randn(M, K, seed=seed, dtype=dtype)
    b = (
        randn(E, N, K, seed=seed + 1, dtype=dtype)
        if trans_b
        else randn(E, K, N, seed=seed + 1, dtype=dtype)
    )
    return a, b, torch.tensor(offs, dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("case", OFFS_CASES, ids=lambda c: f"E{len(c[0])}-M{c[1]}")
def test_grouped_gemm(ops, ref, case, trans_b, dtype, debug_mode):
    offs, M = case
    E, K, N = len(offs), 40, 48
    a, b, o = _inputs(offs, M, K, N, E, dtype, trans_b, seed=M)
    a[offs[-1] :] = float("nan")  # rows past offs[-1] belong to no expert: never read
    out = ops.grouped_gemm(a, b, o, trans_b)
    exp = ref.grouped_gemm(a.cpu().double(), b.cpu().double(), o.cpu(), trans_b)
    assert out.dtype == dtype
    assert torch.equal(out[offs[-1] :].cpu(), torch.zeros_like(out[offs[-1] :].cpu()))
    check_close(out.cpu(), exp, gemm_tol(dtype), "grouped_gemm")


def test_grouped_gemm_strided_b(ops, ref):
    """b as a transposed view (no copy): the strides reach the kernel."""
    offs = [7, 7, 20]
    base = randn(3, 32, 24, seed=3)
    b = base.transpose(1, 2)  # [E, 24, 32] view, K = 24 rows strided
    a = randn(20, 24, seed=4)
    o = torch.tensor(offs, dtype=torch.int32, device=DEVICE)
    out = ops.grouped_gemm(a, b, o, False)
    check_close(
        out.cpu(),
        ref.grouped_gemm(a.cpu().double(), b.cpu().double(), o.cpu(), False),
        gemm_tol(torch.float32),
        "strided b",
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("case", OFFS_CASES[:2], ids=lambda c: f"E{len(c[0])}-M{c[1]}")
def test_grouped_gemm_backward(ops, ref, case, trans_b, dtype, debug_mode):
    offs, M = case
    E, K, N = len(offs), 40, 48
    a, b, o = _inputs(offs, M, K, N, E, dtype, trans_b, seed=M + 5)
    g = randn(M, N, seed=M + 9, dtype=dtype)
    a[offs[-1] :] = float("nan")
    g[offs[-1] :] = float("nan")
    ga, gb = ops.grouped_gemm_backward(g, a, b, o, trans_b, True, True)
    ea, eb = ref.grouped_gemm_backward(
        g.cpu().double(), a.cpu().double(), b.cpu().double(), o.cpu(), trans_b, True, True
    )
    assert ga.dtype == dtype and gb.dtype == dtype
    check_close(ga.cpu(), ea, gemm_tol(dtype), "grad_a")
    check_close(gb.cpu(), eb, gemm_tol(dtype), "grad_b")
    empty = [e for e in range(E) if offs[e] == (offs[e - 1] if e else 0)]
    for e in empty:
        assert torch.equal(gb[e].cpu(), torch.zeros_like(gb[e].cpu())), "empty expert gradient"
    ga2, gb2 = ops.grouped_gemm_backward(g, a, b, o, trans_b, False, True)
    assert ga2.numel() == 0 and torch.equal(gb2, gb)  # deterministic


def test_grouped_gemm_all_empty_backward(ops):
    a, b, o = _inputs([0, 0, 0], 5, 16, 16, 3, torch.float32, False, seed=1)
    g = randn(5, 16, seed=2)
    ga, gb = ops.grouped_gemm_backward(g, a, b, o, False, True, True)
    assert torch.equal(ga.cpu(), torch.zeros(5, 16)) and torch.equal(
        gb.cpu(), torch.zeros(3, 16, 16)
    )
