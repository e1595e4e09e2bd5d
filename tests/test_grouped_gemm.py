"""grouped_gemm: the reference against the naive loops (``naive.py``), against
``torch.nn.functional.grouped_mm`` and by finite differences, and every other backend against the
reference (forward, backward, gradients through autograd), with poisoned outputs.

Rows past ``offs[-1]`` belong to no expert: their output is zero and their input is never read
(the backend tests fill them with NaN); experts without rows get exactly zero weight gradient.
"""

from __future__ import annotations

import pytest
import torch
from naive import naive_grouped_gemm
from testutil import (
    assert_rel_close,
    backend_cases,
    backends,
    check_vs_reference,
    device_of,
    fits,
    gen,
    op,
    randn,
    reference_only,
    to64,
)
from torch.autograd import gradcheck

import moe_kernels
from moe_kernels import reference as ref
from moe_kernels._tolerances import TOL

REF = "reference"
F64 = torch.float64
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def make_offs(sizes):
    return torch.tensor(sizes, dtype=torch.int64).cumsum(0).to(torch.int32)


def leaf(t):
    return t.detach().clone().requires_grad_(True)


# ----------------------------------------------------------------------------------------------
# the reference against the naive loops, torch's grouped_mm, finite differences
# ----------------------------------------------------------------------------------------------
NAIVE_CASES = [
    # (segment sizes, extra unused rows, K, N): each row says why it exists
    ([5, 3, 9], 0, 16, 8),  # plain
    ([0, 7, 0, 0, 6, 0], 0, 13, 7),  # empty experts first, middle and last; odd K and N
    ([4, 4], 5, 8, 12),  # rows past offs[-1] must be zero
    ([11], 0, 7, 5),  # E = 1
    ([0, 0, 0], 4, 8, 8),  # every expert empty: all rows zero
    ([0, 0], 0, 8, 4),  # M = 0
    ([33, 1, 17, 2], 3, 32, 24),
]


@reference_only
@pytest.mark.parametrize("sizes,extra,K,N", NAIVE_CASES)
@pytest.mark.parametrize("trans_b", [False, True], ids=["b_EKN", "b_ENK"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_reference_vs_naive(sizes, extra, K, N, trans_b, dtype):
    E = len(sizes)
    offs = make_offs(sizes)
    M = sum(sizes) + extra
    a = randn(M, K, seed=M + K, dtype=dtype)
    b = randn(E, N, K, seed=E + N, dtype=dtype) if trans_b else randn(E, K, N, seed=N, dtype=dtype)
    out = moe_kernels.grouped_gemm(a, b, offs, trans_b=trans_b, backend=REF)
    assert out.dtype == dtype and out.shape == (M, N)
    expect = naive_grouped_gemm(a, b, offs, trans_b)
    assert_rel_close(out, expect, TOL[dtype], "grouped_gemm")
    tail = out[sum(sizes) :]
    assert torch.equal(tail, torch.zeros_like(tail)), "rows past offs[-1] are not zero"


@reference_only
def test_reference_strided_b():
    """A transposed view of b (no copy) gives the same answer as the contiguous tensor."""
    offs = make_offs([3, 0, 6])
    a = randn(9, 10, seed=1)
    b_store = randn(3, 12, 10, seed=2)  # [E, N, K]
    b_view = b_store.transpose(1, 2)  # [E, K, N], non-contiguous
    out = moe_kernels.grouped_gemm(a, b_view, offs, backend=REF)
    assert_rel_close(out, naive_grouped_gemm(a, b_view, offs), TOL[torch.float32], "strided b")


@reference_only
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_offs_match_torch_grouped_mm(trans_b, dtype):
    """``offs`` means what it means for torch.nn.functional.grouped_mm (rows < offs[-1])."""
    grouped_mm = getattr(torch.nn.functional, "grouped_mm", None)
    if grouped_mm is None:
        pytest.skip("torch.nn.functional.grouped_mm is not in this torch")
    offs = make_offs([3, 0, 9, 1, 0, 6])
    a = randn(22, 32, seed=1, dtype=dtype)
    b = randn(6, 16, 32, seed=2, dtype=dtype) if trans_b else randn(6, 32, 16, seed=2, dtype=dtype)
    want = grouped_mm(a, b.transpose(1, 2) if trans_b else b, offs=offs)[:19]
    got = moe_kernels.grouped_gemm(a, b, offs, trans_b=trans_b, backend=REF)
    # both are within TOL of the exact product: 2 TOL apart at most
    assert_rel_close(got[:19], want, 2 * TOL[dtype], "grouped_gemm vs torch grouped_mm")


@reference_only
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("sizes,extra", [([2, 0, 3, 1], 2), ([4], 0), ([0, 0], 3)])
def test_reference_gradcheck(trans_b, sizes, extra):
    E, K, N = len(sizes), 3, 4
    offs = torch.tensor(sizes).cumsum(0).to(torch.int32)
    M = sum(sizes) + extra
    a = leaf(randn(M, K, seed=M, dtype=F64))
    b = leaf(randn(E, N, K, seed=E, dtype=F64) if trans_b else randn(E, K, N, seed=E, dtype=F64))

    def f(a, b):
        return moe_kernels.grouped_gemm(a, b, offs, trans_b=trans_b, backend=REF)

    assert gradcheck(f, (a, b))


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("trans_b", [False, True])
def test_empty_expert_grad_exactly_zero(backend, trans_b, debug_mode):
    dev = device_of(backend)
    sizes = [0, 5, 0, 3, 0]
    offs = torch.tensor(sizes).cumsum(0).to(torch.int32).to(dev)
    a = leaf(randn(10, 6, seed=1, device=dev))  # 2 rows past offs[-1]
    b = leaf(randn(5, 7, 6, seed=2, device=dev) if trans_b else randn(5, 6, 7, seed=2, device=dev))
    out = moe_kernels.grouped_gemm(a, b, offs, trans_b=trans_b, backend=backend)
    out.backward(randn(*out.shape, seed=3, device=dev))
    for e in (0, 2, 4):
        assert torch.equal(b.grad[e], torch.zeros_like(b.grad[e])), f"empty expert {e}"
    assert torch.equal(a.grad[8:], torch.zeros_like(a.grad[8:])), "rows past offs[-1]"
    assert not torch.isnan(b.grad).any() and not torch.isnan(a.grad).any()


# ----------------------------------------------------------------------------------------------
# every backend against the reference
# ----------------------------------------------------------------------------------------------
def random_offs(used, E, g, empty=(), one=None):
    if one is not None:
        counts = torch.zeros(E, dtype=torch.long)
        counts[one] = used
    else:
        w = torch.rand(E, generator=g)
        for e in empty:
            w[e] = 0
        counts = (w / w.sum() * used).floor().long()
        counts[int(w.argmax())] += used - counts.sum()
    return counts.cumsum(0).to(torch.int32)


# (M, K, N, offs: a list of segment ends or (rows used, E, empty experts, one expert), tiny)  why
# tiny: True runs under the Triton interpreter, "fwd" runs its forward only there
CASES = [
    (40, 37, 45, (40, 4, (), None), False),  # K, N not multiples of 8/16
    (300, 64, 96, (290, 6, (1, 4), None), False),  # rows past offs[-1], empty experts, packed
    (7, 16, 33, (7, 1, (), None), False),  # E = 1
    (200, 48, 20, (200, 5, (), 2), False),  # all rows on one expert (row blocks split)
    (3, 24, 40, (3, 8, (), None), False),  # few rows: dot path, most experts empty
    (50, 40, 48, [10, 10, 30, 33, 45], True),  # an empty expert, a 3-row expert, rows past end
    (40, 40, 48, [0, 17, 17, 40], True),  # leading empty expert, segments crossing tiles
    (20, 40, 48, [20], "fwd"),  # E = 1 (forward only under the interpreter)
    (5, 40, 48, [0, 0, 0], True),  # every expert empty: zero output, zero weight gradients
]


def _offs(case, g):
    spec = case[3]
    if isinstance(spec, list):
        return torch.tensor(spec, dtype=torch.int32)
    used, E, empty, one = spec
    return random_offs(used, E, g, empty, one)


def _case_id(c):
    spec = c[3]
    E = len(spec) if isinstance(spec, list) else spec[1]
    return f"M{c[0]}-K{c[1]}-N{c[2]}-E{E}"


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("trans_b", [False, True], ids=["b_EKN", "b_ENK"])
@pytest.mark.parametrize("backend,case", backend_cases(CASES, lambda c: bool(c[4]), _case_id))
def test_backend_vs_reference(backend, case, trans_b, dtype, debug_mode):
    check_against_reference(
        op("grouped_gemm", backend),
        op("grouped_gemm_backward", backend),
        case,
        trans_b,
        dtype,
        device_of(backend),
        backward=case[4] is True or fits(backend, False),
    )


def check_against_reference(fwd, bwd, case, trans_b, dtype, dev, *, backward=True):
    """A backend's grouped_gemm (fwd) and grouped_gemm_backward (bwd) ops on one case of CASES
    against the reference (also run on the emulated CUDA kernels, tests/test_cuda_emulated.py)."""
    M, K, N = case[:3]
    g = gen(M * 7 + K + N + trans_b)
    offs = _offs(case, g)
    E, used = offs.shape[0], int(offs[-1])
    a = torch.randn(M, K, generator=g).to(dtype)
    a[used:] = float("nan")  # rows past offs[-1] belong to no expert: never read
    shape = (E, N, K) if trans_b else (E, K, N)
    b = (torch.randn(*shape, generator=g) / K**0.5).to(dtype)
    da, db, doffs = a.to(dev), b.to(dev), offs.to(dev)

    out = fwd(da, db, doffs, trans_b).cpu()
    exact = ref.grouped_gemm(*to64(a, b), offs, trans_b)
    on = torch.device(dev).type
    check_vs_reference(
        out, ref.grouped_gemm(a, b, offs, trans_b), exact, dtype, "out", device_type=on
    )
    assert torch.equal(out[used:], torch.zeros_like(out[used:])), "rows past offs[-1] not zero"

    if not backward:
        return  # interpreter time: this row's backward runs on the other backends only
    go = torch.randn(M, N, generator=g).to(dtype)
    go[used:] = float("nan")
    dgo = go.to(dev)
    ga, gb = bwd(dgo, da, db, doffs, trans_b, True, True)
    rga, rgb = ref.grouped_gemm_backward(go, a, b, offs, trans_b, True, True)
    tga, tgb = ref.grouped_gemm_backward(*to64(go, a, b), offs, trans_b, True, True)
    check_vs_reference(ga.cpu()[:used], rga[:used], tga[:used], dtype, "grad_a", device_type=on)
    assert torch.equal(ga.cpu()[used:], torch.zeros_like(ga.cpu()[used:])), "grad_a past end"
    check_vs_reference(gb.cpu(), rgb, tgb, dtype, "grad_b", device_type=on)
    ends = offs.tolist()
    for e in range(E):
        if ends[e] == (ends[e - 1] if e else 0):
            assert torch.equal(gb[e].cpu(), torch.zeros_like(gb[e].cpu())), f"empty expert {e}"
    ga2, gb2 = bwd(dgo, da, db, doffs, trans_b, False, True)
    assert ga2.numel() == 0 and torch.equal(gb2, gb), "grad_b is not bitwise reproducible"
    ga3, gb3 = bwd(dgo, da, db, doffs, trans_b, False, False)
    assert ga3.numel() == 0 and gb3.numel() == 0


@pytest.mark.parametrize("backend", backends(reference=False))
def test_backend_strided_b(backend):
    """b as a transposed view (no copy): the strides reach the kernel."""
    dev = device_of(backend)
    offs = torch.tensor([7, 7, 20], dtype=torch.int32)
    b_nk = randn(3, 32, 24, seed=3)  # [E, N, K]
    a = randn(20, 24, seed=4)
    out = op("grouped_gemm", backend)(a.to(dev), b_nk.to(dev).transpose(1, 2), offs.to(dev), False)
    exact = ref.grouped_gemm(a.double(), b_nk.double(), offs, True)
    check_vs_reference(
        out.cpu(),
        ref.grouped_gemm(a, b_nk, offs, True),
        exact,
        torch.float32,
        "b",
        device_type=torch.device(dev).type,
    )


@pytest.mark.parametrize("backend", backends(reference=False))
def test_backend_grads_match_reference(backend):
    """Through autograd (the public API): fp32 gradients against the float64 reference's."""
    dev = device_of(backend)
    offs = torch.tensor([3, 3, 9, 12, 12], dtype=torch.int32)
    a, w = randn(13, 16, seed=30), randn(5, 16, 16, seed=23, scale=0.4)
    go = randn(13, 16, seed=99)

    def grads(b, dtype, d):
        al, wl = leaf(a.to(d, dtype)), leaf(w.to(d, dtype))
        out = moe_kernels.grouped_gemm(al, wl, offs.to(d), trans_b=True, backend=b)
        out.backward(go.to(d, dtype))
        return [t.grad.cpu() for t in (al, wl)]

    got = grads(backend, torch.float32, dev)
    same, exact = grads(REF, torch.float32, "cpu"), grads(REF, F64, "cpu")
    for name, gt, s, e in zip(("a", "b"), got, same, exact, strict=True):
        check_vs_reference(
            gt, s, e, torch.float32, f"grad of {name}", device_type=torch.device(dev).type
        )


@pytest.mark.parametrize("backend", backends(reference=False))
def test_backend_long_k_in_chunks(backend):
    """bf16 weights with a K long enough that the cpu backend's brgemm route (AMX, or
    ``MOE_KERNELS_CPU_BRGEMM=1``) splits it into chunks whose partial sums it adds into the output
    (256 rows, in tasks of up to 96, at K 6144: chunks of 5440 and 704); the other expert's 44 rows
    take one chunk."""
    dev = device_of(backend)
    K, N = 6144, 48
    offs = torch.tensor([256, 300], dtype=torch.int32)
    a = randn(300, K, seed=11).to(torch.bfloat16)
    b = (randn(2, N, K, seed=12) / K**0.5).to(torch.bfloat16)
    out = op("grouped_gemm", backend)(a.to(dev), b.to(dev), offs.to(dev), True)
    check_vs_reference(
        out.cpu(),
        ref.grouped_gemm(a, b, offs, True),
        ref.grouped_gemm(*to64(a, b), offs, True),
        torch.bfloat16,
        "out",
        device_type=torch.device(dev).type,
    )


@pytest.mark.parametrize("backend", backends(reference=False))
def test_backend_many_weight_runs(backend):
    """bf16 weights whose rows form many 32-row runs with K = 320 (the cpu backend's AMX kernel:
    K chunks of 256 and 64, each run prefetching the next one's first chunk, token blocks of 32
    and a short one of 8), N = 2048 split across tasks, and an expert with fewer rows than a block,
    against the reference on fresh values."""
    dev = device_of(backend)
    K, N = 320, 2048
    offs = torch.tensor([104, 120], dtype=torch.int32)
    a = randn(120, K, seed=21).to(torch.bfloat16)
    b = (randn(2, N, K, seed=22) / K**0.5).to(torch.bfloat16)
    out = op("grouped_gemm", backend)(a.to(dev), b.to(dev), offs.to(dev), True)
    check_vs_reference(
        out.cpu(),
        ref.grouped_gemm(a, b, offs, True),
        ref.grouped_gemm(*to64(a, b), offs, True),
        torch.bfloat16,
        "out",
        device_type=torch.device(dev).type,
    )
