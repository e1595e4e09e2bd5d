"""topk_gating: the reference against the naive float64 loops (``naive.py``), its gradients by
finite differences, and every other backend against the reference (forward and backward).

Index outputs are compared exactly (rows with a true near-tie at the k / k+1 boundary excepted,
as the spec allows); weights in fp32 within :data:`~moe_kernels._tolerances.GATING_TOL`.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from naive import naive_topk_gating
from testutil import (
    backend_cases,
    backends,
    check_vs_reference,
    cpu,
    device_of,
    fits,
    gen,
    op,
    randn,
    reference_only,
)
from torch.autograd import gradcheck

import moe_kernels
from moe_kernels import reference as ref
from moe_kernels._tolerances import GATING_TOL, TOL

REF = "reference"
F64 = torch.float64
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------------
# the reference against the naive loops
# ----------------------------------------------------------------------------------------------
def check_gating(logits, top_k, min_checked=0.8, **kw):
    """Runs the reference and the naive loop and compares them row by row.

    Rows with a true near-tie at the k/k+1 boundary (or between the last kept and first dropped
    group) are skipped for ids, as the spec allows; rows whose chosen experts tie among themselves
    are compared as sets.  At least ``min_checked`` of the rows must be compared exactly.
    """
    w, ids = moe_kernels.topk_gating(logits, top_k, backend=REF, **kw)
    T = logits.shape[0]
    assert w.shape == (T, top_k) and ids.shape == (T, top_k)
    # fp32 weights whatever the logits' dtype; fp64 logits (reference only) keep fp64
    expect_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    assert w.dtype == expect_dtype, w.dtype
    assert ids.dtype == torch.int32, ids.dtype
    assert w.device == logits.device and ids.device == logits.device
    nw, nids, set_ok, order_ok = naive_topk_gating(
        logits,
        top_k,
        scoring=kw.get("scoring", "softmax"),
        renormalize=kw.get("renormalize", True),
        correction_bias=kw.get("correction_bias"),
        num_expert_groups=kw.get("num_expert_groups"),
        topk_groups=kw.get("topk_groups"),
        routed_scaling_factor=kw.get("routed_scaling_factor", 1.0),
    )
    ids64 = ids.cpu().to(torch.int64)
    w64 = w.cpu().to(torch.float64)
    scale = max(1.0, abs(kw.get("routed_scaling_factor", 1.0)))
    tol = (TOL[F64] if logits.dtype == F64 else GATING_TOL) * scale
    exact = set_ok & order_ok
    # exact rows: ids in order, weights in order
    assert torch.equal(ids64[exact], nids[exact]), "ids differ from the naive loop"
    if exact.any():
        err = (w64[exact] - nw[exact]).abs().max().item()
        assert err <= tol, f"weights differ from the naive loop by {err:.3e}"
    # rows with ties among the chosen: same set, weights matched by expert
    setrows = set_ok & ~order_ok
    if setrows.any():
        a_ids, a_perm = ids64[setrows].sort(dim=1)
        n_ids, n_perm = nids[setrows].sort(dim=1)
        assert torch.equal(a_ids, n_ids)
        aw = torch.gather(w64[setrows], 1, a_perm)
        nw_ = torch.gather(nw[setrows], 1, n_perm)
        assert (aw - nw_).abs().max().item() <= tol
    # every row: valid, distinct ids; weights finite
    assert ((ids64 >= 0) & (ids64 < logits.shape[1])).all()
    if T:
        assert (ids64.sort(dim=1).values.diff(dim=1) != 0).all(), "an expert chosen twice"
    assert torch.isfinite(w).all()
    assert set_ok.float().mean().item() >= min_checked if T else True
    return w, ids


# (name, E, k, scoring, renormalize, bias, groups, topk_groups, scale): shapes of real models plus
# the edge cases of the spec.
NAIVE_CASES = [
    # Qwen1.5-MoE-A2.7B: 60 experts, softmax, no renormalisation
    ("qwen15_e60", 60, 4, "softmax", False, False, None, None, 1.0),
    ("e60_renorm", 60, 4, "softmax", True, False, None, None, 1.0),
    # DeepSeek-V2: 160 experts in 8 groups, 3 groups kept, softmax, scaled
    ("deepseek_v2_e160", 160, 6, "softmax", False, False, 8, 3, 16.0),
    # DeepSeek-V3: sigmoid + selection bias, 8 groups of 32, 4 kept, renormalised, scaled
    ("deepseek_v3_e256", 256, 8, "sigmoid", True, True, 8, 4, 2.5),
    # Kimi K2: 384 experts, sigmoid + bias, one group
    ("kimi_k2_e384", 384, 8, "sigmoid", True, True, 1, 1, 2.827),
    ("e384_softmax", 384, 8, "softmax", True, False, None, None, 1.0),
    ("sigmoid_no_renorm", 384, 8, "sigmoid", False, False, None, None, 1.0),
    # k = 1 (Switch-style) and k = E (every expert, ordered by score)
    ("k1", 60, 1, "softmax", True, False, None, None, 1.0),
    ("k1_no_renorm", 60, 1, "softmax", False, False, None, None, 1.0),
    ("k_eq_E_softmax", 16, 16, "softmax", True, False, None, None, 1.0),
    ("k_eq_E_sigmoid_bias", 13, 13, "sigmoid", False, True, None, None, 1.0),
    ("E1", 1, 1, "softmax", True, False, None, None, 1.0),
    ("E1_sigmoid", 1, 1, "sigmoid", False, False, None, None, 1.0),
    # groups of one expert (a group's value is its single score)
    ("groups_of_one", 8, 2, "sigmoid", True, True, 8, 3, 1.0),
    # softmax with groups and a bias, k = all experts of the kept groups
    ("groups_k_all_kept", 12, 6, "softmax", True, True, 4, 2, 1.0),
]


@reference_only
@pytest.mark.parametrize("case", NAIVE_CASES, ids=[c[0] for c in NAIVE_CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_reference_vs_naive(case, dtype):
    name, E, k, scoring, renorm, use_bias, groups, topk_groups, scale = case
    T = 37
    seed = zlib.crc32(name.encode()) % 10_000  # stable across processes (str hash is salted)
    logits = randn(T, E, seed=seed, dtype=dtype, scale=2.0)
    kw = dict(scoring=scoring, renormalize=renorm, routed_scaling_factor=scale)
    if use_bias:
        kw["correction_bias"] = randn(E, seed=seed + 1, scale=0.1)
    if groups is not None:
        kw["num_expert_groups"] = groups
        kw["topk_groups"] = topk_groups
    # bf16 logits have 8-bit mantissas: among hundreds of experts, exact ties at the k/k+1
    # boundary are common (37 rows of 384 experts, 200 seeds: a median of 89% of rows tie-free,
    # the lowest 73%)
    check_gating(logits, k, min_checked=0.6 if dtype == torch.bfloat16 else 0.8, **kw)


@reference_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=["fp16", "fp64"])
def test_reference_other_dtypes(dtype):
    logits = randn(29, 60, seed=5, dtype=dtype, scale=2.0)
    check_gating(logits, 4, scoring="softmax", renormalize=True)
    check_gating(
        logits,
        6,
        scoring="sigmoid",
        correction_bias=randn(60, seed=6, scale=0.1),
        num_expert_groups=6,
        topk_groups=2,
    )


@reference_only
def test_reference_math_in_fp32_for_bf16():
    """bf16 logits: scores and weights computed in fp32 (errors ~1e-7, not bf16's ~4e-3)."""
    logits = randn(64, 32, seed=11, dtype=torch.bfloat16, scale=3.0)
    w, ids = moe_kernels.topk_gating(logits, 5, backend=REF)
    nw, nids, ok, _ = naive_topk_gating(logits, 5)
    # GATING_TOL / 2: well below bf16's unit roundoff (3.9e-3), so bf16 math would fail
    assert (w.double() - nw)[ok].abs().max().item() < GATING_TOL / 2


@reference_only
def test_reference_ties_go_to_lower_index():
    logits = torch.tensor(
        [
            [0.5, 2.0, 2.0, 1.0, 2.0, -1.0],
            [1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
            [-3.0, 0.25, -3.0, 0.25, 0.25, 7.0],
        ]
    )
    _, ids = moe_kernels.topk_gating(logits, 3, backend=REF)
    assert ids.tolist() == [[1, 2, 4], [0, 1, 2], [5, 1, 3]]
    _, ids = moe_kernels.topk_gating(logits, 3, scoring="sigmoid", backend=REF)
    assert ids.tolist() == [[1, 2, 4], [0, 1, 2], [5, 1, 3]]


@reference_only
def test_reference_group_value_is_sum_of_two_largest():
    # 3 groups of 3.  Group 0 holds the single largest score but the smallest top-2 sum;
    # group 1 has the largest top-2 sum; group 2 the second largest.  Keeping 1 group must pick
    # group 1 (a max-based group score would pick group 0); k = 2 then comes from group 1.
    bias = torch.tensor([0.9, 0.0, 0.0, 0.7, 0.7, 0.0, 0.6, 0.6, 0.0])
    logits = torch.full((1, 9), -30.0)  # sigmoid scores ~0: selection == bias
    w, ids = moe_kernels.topk_gating(
        logits,
        2,
        scoring="sigmoid",
        correction_bias=bias,
        num_expert_groups=3,
        topk_groups=1,
        renormalize=False,
        backend=REF,
    )
    assert ids.tolist() == [[3, 4]]
    # weights are the scores without the bias
    assert torch.allclose(w.double(), torch.sigmoid(torch.tensor([[-30.0, -30.0]])).double())
    # two groups kept: groups 1 and 2 ; best 3 over them
    _, ids = moe_kernels.topk_gating(
        logits,
        3,
        scoring="sigmoid",
        correction_bias=bias,
        num_expert_groups=3,
        topk_groups=2,
        backend=REF,
    )
    assert ids.tolist() == [[3, 4, 6]]


@reference_only
def test_reference_group_ties_go_to_lower_group():
    bias = torch.tensor([0.1, 0.2, 0.5, 0.5, 0.5, 0.5, 0.3, 0.1])  # groups 1 and 2 tie at 1.0
    logits = torch.full((2, 8), -40.0)
    _, ids = moe_kernels.topk_gating(
        logits,
        2,
        scoring="sigmoid",
        correction_bias=bias,
        num_expert_groups=4,
        topk_groups=1,
        backend=REF,
    )
    assert ids.tolist() == [[2, 3], [2, 3]]


@reference_only
def test_reference_bias_is_for_selection_only():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 5.0])  # forces expert 3 in
    w, ids = moe_kernels.topk_gating(
        logits, 2, scoring="sigmoid", correction_bias=bias, renormalize=False, backend=REF
    )
    assert ids.tolist() == [[3, 0]]
    expect = torch.sigmoid(torch.tensor([[-1.0, 2.0]], dtype=torch.float64))
    assert (w.double() - expect).abs().max() < GATING_TOL


@reference_only
def test_reference_mixtral_equivalence():
    """Mixtral: softmax over the top-k logits == softmax -> top-k -> renormalise."""
    logits = randn(41, 8, seed=3, scale=2.0)
    top = logits.double().topk(2, dim=-1)
    mixtral = torch.softmax(top.values, dim=-1)
    w, ids = moe_kernels.topk_gating(logits, 2, scoring="softmax", renormalize=True, backend=REF)
    assert torch.equal(ids.long(), top.indices)
    assert (w.double() - mixtral).abs().max() < GATING_TOL


@reference_only
def test_reference_scaling():
    logits = randn(17, 20, seed=21)
    w1, i1 = moe_kernels.topk_gating(logits, 3, backend=REF)
    w2, i2 = moe_kernels.topk_gating(logits, 3, routed_scaling_factor=2.5, backend=REF)
    assert torch.equal(i1, i2)
    # one fp32 multiplication apart: a few units of fp32 roundoff
    assert torch.allclose(w2, w1 * 2.5, rtol=GATING_TOL / 2, atol=0)
    # renormalised weights sum to the scaling factor
    assert torch.allclose(w2.sum(-1), torch.full((17,), 2.5), rtol=GATING_TOL / 2)


@pytest.mark.parametrize("backend", backends())
def test_empty(backend):
    logits = torch.empty(0, 60, device=device_of(backend))
    w, ids = moe_kernels.topk_gating(logits, 4, backend=backend)
    assert w.shape == (0, 4) and ids.shape == (0, 4)
    assert w.dtype == torch.float32 and ids.dtype == torch.int32


@pytest.mark.parametrize("backend", backends())
def test_deterministic(backend):
    T, E = (50, 384) if fits(backend, False) else (6, 48)
    logits = randn(T, E, seed=8, device=device_of(backend))
    a = moe_kernels.topk_gating(logits, 8, scoring="sigmoid", backend=backend)
    b = moe_kernels.topk_gating(logits, 8, scoring="sigmoid", backend=backend)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ----------------------------------------------------------------------------------------------
# gradients of the reference (finite differences, float64)
# ----------------------------------------------------------------------------------------------
GRAD_CASES = [
    # (scoring, renormalize, bias, groups, topk_groups, scale, E, k)
    ("softmax", True, False, None, None, 1.0, 8, 2),
    ("softmax", False, False, None, None, 1.0, 8, 3),
    ("softmax", True, False, None, None, 1.0, 6, 6),  # k = E
    ("sigmoid", True, True, 4, 2, 2.5, 16, 4),  # DeepSeek-V3 style
    ("sigmoid", False, True, None, None, 1.0, 12, 3),
    ("softmax", False, True, 3, 2, 16.0, 12, 2),
]


def leaf(t):
    return t.detach().clone().requires_grad_(True)


@reference_only
@pytest.mark.parametrize("case", GRAD_CASES)
def test_reference_gradcheck(case):
    scoring, renorm, use_bias, groups, topk_groups, scale, E, k = case
    logits = leaf(randn(5, E, seed=E + k, dtype=F64, scale=1.5))
    kw = dict(scoring=scoring, renormalize=renorm, routed_scaling_factor=scale)
    if use_bias:
        kw["correction_bias"] = randn(E, seed=3, dtype=F64, scale=0.1)
    if groups:
        kw["num_expert_groups"] = groups
        kw["topk_groups"] = topk_groups

    def f(lg):
        return moe_kernels.topk_gating(lg, k, backend=REF, **kw)[0]

    assert f(logits).dtype == F64
    # float64 central differences with step 1e-6: truncation ~1e-12 x the third derivative,
    # roundoff ~u64 / 1e-6 = 1e-10 of |f|
    assert gradcheck(f, (logits,), eps=1e-6, atol=1e-7)


@reference_only
def test_reference_grad_only_through_chosen():
    """sigmoid without renormalisation: d w / d logit is zero for every unchosen expert."""
    logits = leaf(randn(6, 10, seed=1, dtype=F64))
    w, ids = moe_kernels.topk_gating(logits, 3, scoring="sigmoid", renormalize=False, backend=REF)
    w.sum().backward()
    chosen = torch.zeros(6, 10, dtype=torch.bool)
    chosen.scatter_(1, ids.long(), True)
    assert (logits.grad[~chosen] == 0).all()
    s = torch.sigmoid(logits.detach())
    assert torch.allclose(logits.grad[chosen], (s * (1 - s))[chosen], rtol=TOL[F64], atol=0)


# ----------------------------------------------------------------------------------------------
# every backend against the reference
# ----------------------------------------------------------------------------------------------
# (T, E, k, scoring, renormalize, bias, groups, topk_groups, scale, tiny)   why
CASES = [
    (7, 8, 2, "softmax", True, False, 0, 0, 1.0, True),  # Mixtral-like
    (13, 8, 2, "softmax", True, False, 0, 0, 1.0, True),  # T not a multiple of the row block
    (9, 60, 4, "softmax", False, False, 0, 0, 1.0, True),  # E not a power of two (Qwen2-MoE)
    (300, 60, 4, "softmax", False, False, 0, 0, 1.0, False),  # Qwen2-MoE width, many rows
    (5, 6, 1, "sigmoid", False, True, 0, 0, 1.0, True),  # k = 1, sigmoid with correction bias
    (13, 64, 8, "sigmoid", True, True, 8, 3, 2.5, False),  # DeepSeek-V3 groups + bias + scale
    (11, 24, 6, "sigmoid", True, True, 8, 3, 2.5, True),  # the same, small
    (6, 10, 3, "softmax", True, True, 5, 2, 1.0, True),  # grouped softmax, 2 experts per group
    (4, 7, 2, "sigmoid", True, True, 7, 2, 1.0, True),  # one expert per group
    (9, 16, 6, "softmax", True, False, 16, 2, 1.0, False),  # groups of one; k > eligible
    (1, 5, 5, "softmax", True, False, 0, 0, 1.0, True),  # k = E
    (7, 12, 12, "softmax", True, False, 0, 0, 1.0, True),  # k = E, several rows
    (4, 1, 1, "sigmoid", False, False, 0, 0, 1.0, True),  # E = 1
    (5, 160, 6, "sigmoid", True, True, 8, 4, 1.0, False),  # E = 160
    (3, 384, 8, "sigmoid", True, True, 8, 4, 2.5, True),  # E = 384 (Kimi-K2-like)
]


def near_tie_rows(sel: torch.Tensor, k: int) -> torch.Tensor:
    """Rows whose k-th and (k+1)-th selection scores are within 1e-6 relative: ids may differ
    (1e-6: a few fp32 roundoffs, the spread of two fp32 evaluations of the same score)."""
    if k >= sel.shape[1]:
        return torch.zeros(sel.shape[0], dtype=torch.bool)
    v = sel.sort(dim=1, descending=True).values
    return (v[:, k - 1] - v[:, k]).abs() <= 1e-6 * v[:, k - 1].abs().clamp_min(1e-30)


def _case_id(c):
    return f"T{c[0]}-E{c[1]}-k{c[2]}-{c[3]}-g{c[6]}"


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("backend,case", backend_cases(CASES, lambda c: c[9], _case_id))
def test_backend_vs_reference(backend, case, dtype, debug_mode):
    T, E, k, scoring, renorm, use_bias, G, TG, scale, _ = case
    dev = device_of(backend)
    logits = randn(T, E, seed=T * 1000 + E, dtype=dtype, scale=2.0)
    bias = randn(E, seed=E + 7, scale=0.1) if use_bias else None
    args = (k, scoring, renorm, bias, G, TG, scale)
    w, ids = op("topk_gating", backend)(*(t.to(dev) if torch.is_tensor(t) else t
                                           for t in (logits, *args)))  # fmt: skip
    rw, rids = ref.topk_gating(logits, *args)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    assert ids.shape == (T, k) and w.shape == (T, k)
    w, ids = cpu(w, ids)
    scores = (
        torch.softmax(logits.float(), -1) if scoring == "softmax" else torch.sigmoid(logits.float())
    )
    sel = scores + (bias if bias is not None else 0)
    ok = ~near_tie_rows(sel, k) if G == 0 else torch.ones(T, dtype=torch.bool)
    assert torch.equal(ids[ok], rids[ok])
    torch.testing.assert_close(w[ok], rw[ok], rtol=GATING_TOL, atol=GATING_TOL / 10)
    # backward
    gw = torch.randn(T, k, generator=gen(T + k))
    gl = op("topk_gating_backward", backend)(
        gw.to(dev), logits.to(dev), rids.to(dev), scoring, renorm, scale
    )
    rgl = ref.topk_gating_backward(gw, logits, rids, scoring, renorm, scale)
    truth = ref.topk_gating_backward(gw.double(), logits.double(), rids, scoring, renorm, scale)
    check_vs_reference(gl.cpu(), rgl, truth, dtype, "grad_logits")


@pytest.mark.parametrize("backend", backends(reference=False))
def test_backend_ties_go_to_lower_index(backend):
    logits = torch.zeros(3, 9, device=device_of(backend))
    logits[1, 4] = 1.0
    _, ids = op("topk_gating", backend)(logits, 3, "softmax", False, None, 0, 0, 1.0)
    assert ids.cpu().tolist() == [[0, 1, 2], [4, 0, 1], [0, 1, 2]]


@pytest.mark.parametrize("backend", backends(reference=False))
def test_backend_grads_match_reference(backend):
    """Through autograd (the public API): fp32 gradients against the float64 reference's."""
    dev = device_of(backend)
    logits, go = randn(13, 5, seed=28), randn(13, 2, seed=99)
    grads = {}
    for name, b, t in (("got", backend, logits.to(dev)), ("fp32", REF, logits),
                       ("fp64", REF, logits.double())):  # fmt: skip
        t = leaf(t)
        moe_kernels.topk_gating(t, 2, backend=b)[0].backward(go.to(t.device, t.dtype))
        grads[name] = t.grad.cpu()
    check_vs_reference(grads["got"], grads["fp32"], grads["fp64"], torch.float32, "grad_logits")


@pytest.mark.parametrize("backend", backends(reference=False))
def test_kernel_checks(backend):
    """The op called directly (below the public API) keeps its own checks: a compiled kernel's
    TORCH_CHECK raises RuntimeError, the Triton launcher the public API's ValueError."""
    x = randn(4, 10, seed=1, device=device_of(backend))
    err = ValueError if backend == "triton" else RuntimeError
    with pytest.raises(err, match="top_k"):
        op("topk_gating", backend)(x, 11, "softmax", True, None, 0, 0, 1.0)
    with pytest.raises(err, match="num_expert_groups"):
        op("topk_gating", backend)(x, 2, "sigmoid", True, None, 3, 1, 1.0)
    if backend != "triton":
        with pytest.raises(err, match="scoring"):
            op("topk_gating", backend)(x, 2, "tanh", True, None, 0, 0, 1.0)


# ----------------------------------------------------------------------------------------------
# Triton-only: the counts computed in the gating pass
# ----------------------------------------------------------------------------------------------
@pytest.mark.skipif("triton" not in backends(), reason="triton is not under test here")
def test_triton_counts_in_same_pass():
    from moe_kernels.triton_kernels import ops as triton_ops

    logits = randn(37, 12, seed=11, device=device_of("triton"))
    w, ids, counts = triton_ops.topk_gating_with_counts(logits, 3)
    expect = torch.bincount(ids.cpu().view(-1).long(), minlength=12).to(torch.int32)
    assert torch.equal(counts.cpu(), expect)
