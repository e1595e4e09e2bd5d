"""The reference backend against the naive float64 loops of ``naive.py`` (the spec, read literally).

Every op is called with ``backend="reference"``; the inputs are fresh random data in the awkward
sizes the design asks for (odd sizes, E = 60 / 160 / 384, k = 1 and k = E, empty experts, dropped
ids).  Index outputs are compared exactly, floats by max relative error.
"""

# ruff: noqa: E741  (I is the expert intermediate size, as everywhere in the package)
from __future__ import annotations

import zlib

import pytest
import torch
from naive import (
    naive_grouped_gemm,
    naive_moe_ffn,
    naive_permute,
    naive_route,
    naive_topk_gating,
    naive_unpermute,
)
from testutil import TOL, assert_rel_close, gen, randn

import moe_kernels

REF = "reference"


# ----------------------------------------------------------------------------------------------
# topk_gating
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
    tol = (1e-12 if logits.dtype == torch.float64 else 2e-6) * scale
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
GATING_CASES = [
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


@pytest.mark.parametrize("case", GATING_CASES, ids=[c[0] for c in GATING_CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_topk_gating_vs_naive(case, dtype):
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


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=["fp16", "fp64"])
def test_topk_gating_other_dtypes(dtype):
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


def test_topk_gating_math_in_fp32_for_bf16():
    """bf16 logits: scores and weights computed in fp32 (errors ~1e-7, not bf16's ~4e-3)."""
    logits = randn(64, 32, seed=11, dtype=torch.bfloat16, scale=3.0)
    w, ids = moe_kernels.topk_gating(logits, 5, backend=REF)
    nw, nids, ok, _ = naive_topk_gating(logits, 5)
    assert (w.double() - nw)[ok].abs().max().item() < 1e-6


def test_topk_gating_ties_go_to_lower_index():
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


def test_topk_gating_group_value_is_sum_of_two_largest():
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


def test_topk_gating_group_ties_go_to_lower_group():
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


def test_topk_gating_bias_is_for_selection_only():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 5.0])  # forces expert 3 in
    w, ids = moe_kernels.topk_gating(
        logits, 2, scoring="sigmoid", correction_bias=bias, renormalize=False, backend=REF
    )
    assert ids.tolist() == [[3, 0]]
    expect = torch.sigmoid(torch.tensor([[-1.0, 2.0]], dtype=torch.float64))
    assert (w.double() - expect).abs().max() < 1e-6


def test_topk_gating_mixtral_equivalence():
    """Mixtral: softmax over the top-k logits == softmax -> top-k -> renormalise."""
    logits = randn(41, 8, seed=3, scale=2.0)
    top = logits.double().topk(2, dim=-1)
    mixtral = torch.softmax(top.values, dim=-1)
    w, ids = moe_kernels.topk_gating(logits, 2, scoring="softmax", renormalize=True, backend=REF)
    assert torch.equal(ids.long(), top.indices)
    assert (w.double() - mixtral).abs().max() < 2e-6


def test_topk_gating_scaling():
    logits = randn(17, 20, seed=21)
    w1, i1 = moe_kernels.topk_gating(logits, 3, backend=REF)
    w2, i2 = moe_kernels.topk_gating(logits, 3, routed_scaling_factor=2.5, backend=REF)
    assert torch.equal(i1, i2)
    assert torch.allclose(w2, w1 * 2.5, rtol=1e-6, atol=0)
    # renormalised weights sum to the scaling factor
    assert torch.allclose(w2.sum(-1), torch.full((17,), 2.5), rtol=1e-6)


def test_topk_gating_empty():
    logits = torch.empty(0, 60)
    w, ids = moe_kernels.topk_gating(logits, 4, backend=REF)
    assert w.shape == (0, 4) and ids.shape == (0, 4)
    assert w.dtype == torch.float32 and ids.dtype == torch.int32


def test_topk_gating_deterministic():
    logits = randn(50, 384, seed=8)
    a = moe_kernels.topk_gating(logits, 8, scoring="sigmoid", backend=REF)
    b = moe_kernels.topk_gating(logits, 8, scoring="sigmoid", backend=REF)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ----------------------------------------------------------------------------------------------
# route
# ----------------------------------------------------------------------------------------------
def random_ids(T, k, E, seed, drop=0.0):
    """Distinct-per-token ids (like a router) with a fraction replaced by out-of-range ids."""
    g = gen(seed)
    if T == 0:
        return torch.empty(0, k, dtype=torch.int32)
    if k <= E:
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).reshape(T, k)
    else:
        ids = torch.randint(0, E, (T, k), generator=g)
    if drop:
        mask = torch.rand(T, k, generator=g) < drop
        bad = torch.where(torch.rand(T, k, generator=g) < 0.5, -1, E + 3)
        ids = torch.where(mask, bad, ids)
    return ids.to(torch.int32)


def check_plan(plan, T, k, E, block_size, ids):
    nv = naive_route(ids, E, block_size)
    assert plan.num_rows == nv["num_rows"]
    for field in ("tokens_per_expert", "offs", "row_of_slot", "slot_of_row"):
        got = getattr(plan, field)
        assert got.dtype == torch.int32, (field, got.dtype)
        assert got.device == ids.device, field
        assert torch.equal(got.cpu().long(), nv[field]), field
    if block_size:
        assert plan.block_expert.dtype == torch.int32
        assert torch.equal(plan.block_expert.cpu().long(), nv["block_expert"])
    else:
        be = plan.block_expert
        assert be is None or be.numel() == 0


ROUTE_CASES = [
    # (T, k, E, block_size, drop fraction)
    (13, 2, 8, None, 0.0),
    (13, 2, 8, 4, 0.0),
    (300, 8, 60, None, 0.0),
    (300, 8, 60, 16, 0.1),  # expert parallelism: some ids belong to other ranks
    (64, 8, 384, 64, 0.0),  # most experts empty
    (7, 5, 5, 1, 0.0),  # k = E
    (9, 1, 1, 3, 0.0),  # E = 1
    (17, 3, 6, 128, 0.3),
    (0, 4, 16, None, 0.0),  # T = 0
    (0, 4, 16, 8, 0.0),
]


@pytest.mark.parametrize("T,k,E,block_size,drop", ROUTE_CASES)
def test_route_vs_naive(T, k, E, block_size, drop):
    ids = random_ids(T, k, E, seed=T * 31 + E, drop=drop)
    plan = moe_kernels.route(ids, E, block_size=block_size, backend=REF)
    check_plan(plan, T, k, E, block_size, ids)


def test_route_int64_ids():
    ids = random_ids(11, 3, 7, seed=1).to(torch.int64)
    plan = moe_kernels.route(ids, 7, backend=REF)
    check_plan(plan, 11, 3, 7, None, ids)


def test_route_all_to_one_expert():
    ids = torch.full((23, 2), 4, dtype=torch.int32)
    ids[:, 1] = 4  # duplicated slots to the same expert are still distinct pairs
    plan = moe_kernels.route(ids, 6, block_size=8, backend=REF)
    check_plan(plan, 23, 2, 6, 8, ids)


# ----------------------------------------------------------------------------------------------
# permute / unpermute
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("block_size", [None, 8])
def test_permute_unpermute_vs_naive(dtype, block_size, debug_mode):
    T, k, E, H = 29, 3, 7, 24
    ids = random_ids(T, k, E, seed=2, drop=0.15)
    plan = moe_kernels.route(ids, E, block_size=block_size, backend=REF)
    x = randn(T, H, seed=3, dtype=dtype)
    y = moe_kernels.permute(x, plan, backend=REF)
    assert y.dtype == dtype and y.shape == (plan.num_rows, H)
    # a gather: bit-exact, zeros in padding and unused rows (NaN-poisoned in debug mode)
    assert torch.equal(y.double(), naive_permute(x, plan.slot_of_row, k))

    yy = randn(plan.num_rows, H, seed=4, dtype=dtype)
    w = torch.rand(T, k, generator=gen(5))
    for weights in (None, w):
        out = moe_kernels.unpermute(yy, plan, weights, backend=REF)
        assert out.dtype == dtype and out.shape == (T, H)
        check_unpermute(out, yy, plan.row_of_slot, weights)


def check_unpermute(out, y, row_of_slot, weights):
    """Error bound of fp32 (fp64 for fp64 inputs) accumulation plus one rounding to y.dtype."""
    expect = naive_unpermute(y, row_of_slot, weights)
    mag = naive_unpermute(y.abs(), row_of_slot, None if weights is None else weights.abs())
    u_out = torch.finfo(y.dtype).eps / 2
    u_acc = min(2.0**-24, u_out)
    k = row_of_slot.shape[1]
    bound = u_out * expect.abs() + (k + 1) * u_acc * mag + 1e-300
    assert not torch.isnan(out).any(), "NaN in unpermute output"
    err = (out.double() - expect).abs()
    assert (err <= bound).all(), f"unpermute error {(err / bound).max():.2f}x the bound"


def test_unpermute_accumulates_in_fp32():
    """k = 8 bf16 terms: a bf16 accumulator would be visibly worse than fp32 + one rounding."""
    T, k, E, H = 64, 8, 8, 32
    ids = torch.stack([torch.randperm(E, generator=gen(t)) for t in range(T)]).to(torch.int32)
    plan = moe_kernels.route(ids, E, backend=REF)
    y = randn(plan.num_rows, H, seed=9, dtype=torch.bfloat16)
    w = torch.rand(T, k, generator=gen(10))
    out = moe_kernels.unpermute(y, plan, w, backend=REF)
    check_unpermute(out, y, plan.row_of_slot, w)
    # the bound discriminates: summing the same terms in bf16 would break it
    terms = y[plan.row_of_slot.long()] * w.to(torch.bfloat16)[..., None]  # [T, k, H] bf16
    acc = terms[:, 0]
    for s in range(1, k):
        acc = acc + terms[:, s]
    with pytest.raises(AssertionError):
        check_unpermute(acc, y, plan.row_of_slot, w)


def test_unpermute_without_weights_sums_slots():
    T, E, H = 10, 4, 6
    ids = torch.stack([torch.randperm(E, generator=gen(t)) for t in range(T)]).to(torch.int32)
    plan = moe_kernels.route(ids, E, backend=REF)
    x = randn(T, H, seed=1, dtype=torch.float64)
    out = moe_kernels.unpermute(moe_kernels.permute(x, plan, backend=REF), plan, backend=REF)
    assert torch.allclose(out, 4 * x, rtol=1e-15, atol=0)


# ----------------------------------------------------------------------------------------------
# grouped_gemm
# ----------------------------------------------------------------------------------------------
def make_offs(sizes):
    return torch.tensor(sizes, dtype=torch.int64).cumsum(0).to(torch.int32)


GG_CASES = [
    # (segment sizes, extra unused rows, K, N): each row says why it exists
    ([5, 3, 9], 0, 16, 8),  # plain
    ([0, 7, 0, 0, 6, 0], 0, 13, 7),  # empty experts first, middle and last; odd K and N
    ([4, 4], 5, 8, 12),  # rows past offs[-1] must be zero
    ([11], 0, 7, 5),  # E = 1
    ([0, 0, 0], 4, 8, 8),  # every expert empty: all rows zero
    ([0, 0], 0, 8, 4),  # M = 0
    ([33, 1, 17, 2], 3, 32, 24),
]


@pytest.mark.parametrize("sizes,extra,K,N", GG_CASES)
@pytest.mark.parametrize("trans_b", [False, True], ids=["b_EKN", "b_ENK"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_grouped_gemm_vs_naive(sizes, extra, K, N, trans_b, dtype, debug_mode):
    E = len(sizes)
    offs = make_offs(sizes)
    M = sum(sizes) + extra
    a = randn(M, K, seed=M + K, dtype=dtype)
    b = randn(E, N, K, seed=E + N, dtype=dtype) if trans_b else randn(E, K, N, seed=N, dtype=dtype)
    out = moe_kernels.grouped_gemm(a, b, offs, trans_b=trans_b, backend=REF)
    assert out.dtype == dtype and out.shape == (M, N)
    expect = naive_grouped_gemm(a, b, offs, trans_b)
    assert_rel_close(out, expect, TOL[dtype] * max(1, K / 8), "grouped_gemm")
    tail = out[sum(sizes) :]
    assert torch.equal(tail, torch.zeros_like(tail)), "rows past offs[-1] are not zero"


def test_grouped_gemm_strided_b():
    """A transposed view of b (no copy) gives the same answer as the contiguous tensor."""
    offs = make_offs([3, 0, 6])
    a = randn(9, 10, seed=1)
    b_store = randn(3, 12, 10, seed=2)  # [E, N, K]
    b_view = b_store.transpose(1, 2)  # [E, K, N], non-contiguous
    out = moe_kernels.grouped_gemm(a, b_view, offs, backend=REF)
    assert_rel_close(out, naive_grouped_gemm(a, b_view, offs), TOL[torch.float32], "strided b")


# ----------------------------------------------------------------------------------------------
# moe_ffn
# ----------------------------------------------------------------------------------------------
def ffn_inputs(T, H, I, E, k, seed, dtype=torch.float32, bias=False, gpt_oss=False, drop=0.0):
    x = randn(T, H, seed=seed, dtype=dtype)
    if gpt_oss:  # stored [E, H, 2I] and [E, I, H]; passed as transposed views
        w_gu = randn(E, H, 2 * I, seed=seed + 1, dtype=dtype, scale=0.6).transpose(1, 2)
        w_d = randn(E, I, H, seed=seed + 2, dtype=dtype, scale=0.4).transpose(1, 2)
        assert not w_gu.is_contiguous() and not w_d.is_contiguous()
    else:
        w_gu = randn(E, 2 * I, H, seed=seed + 1, dtype=dtype, scale=0.6)
        w_d = randn(E, H, I, seed=seed + 2, dtype=dtype, scale=0.4)
    ids = random_ids(T, k, E, seed=seed + 3, drop=drop)
    tw = torch.rand(T, k, generator=gen(seed + 4)) + 0.1
    b_gu = randn(E, 2 * I, seed=seed + 5, dtype=dtype) if bias else None
    b_d = randn(E, H, seed=seed + 6, dtype=dtype) if bias else None
    return x, w_gu, w_d, tw, ids, b_gu, b_d


FFN_CASES = [
    # (activation, interleaved, bias, gpt_oss strided views, drop fraction, limit)
    ("swiglu", False, False, False, 0.0, 7.0),  # Mixtral / Qwen / DeepSeek experts
    ("swiglu", False, True, False, 0.2, 7.0),  # biases + expert-parallel drops
    ("geglu", False, False, False, 0.0, 7.0),
    ("geglu", True, True, False, 0.1, 7.0),
    ("swiglu_oai", True, True, True, 0.0, 7.0),  # gpt-oss exactly
    ("swiglu_oai", True, True, True, 0.25, 1.5),  # small limit: the clamps are active
    ("swiglu_oai", False, False, False, 0.0, 0.7),
    ("swiglu", True, False, True, 0.0, 7.0),
]


@pytest.mark.parametrize(
    "activation,interleaved,bias,gpt_oss,drop,limit",
    FFN_CASES,
    ids=[f"{c[0]}-il{int(c[1])}-b{int(c[2])}-oss{int(c[3])}-d{c[4]}-l{c[5]}" for c in FFN_CASES],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_moe_ffn_vs_naive(activation, interleaved, bias, gpt_oss, drop, limit, dtype, debug_mode):
    T, H, I, E, k = 11, 16, 12, 5, 2
    x, w_gu, w_d, tw, ids, b_gu, b_d = ffn_inputs(
        T, H, I, E, k, seed=7, dtype=dtype, bias=bias, gpt_oss=gpt_oss, drop=drop
    )
    kw = dict(
        activation=activation,
        gate_up_bias=b_gu,
        down_bias=b_d,
        alpha=1.702,
        limit=limit,
        interleaved=interleaved,
    )
    out = moe_kernels.moe_ffn(x, w_gu, w_d, tw, ids, backend=REF, **kw)
    assert out.dtype == dtype and out.shape == (T, H)
    expect = naive_moe_ffn(x, w_gu, w_d, tw, ids, **kw)
    assert_rel_close(out, expect, 10 * TOL[dtype], "moe_ffn")
    # tokens whose every pair was dropped get exactly zero
    all_dropped = ((ids < 0) | (ids >= E)).all(dim=1)
    assert (out[all_dropped] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_moe_ffn_low_precision(dtype):
    T, H, I, E, k = 9, 32, 16, 4, 2
    x, w_gu, w_d, tw, ids, b_gu, b_d = ffn_inputs(T, H, I, E, k, seed=13, dtype=dtype, bias=True)
    out = moe_kernels.moe_ffn(x, w_gu, w_d, tw, ids, gate_up_bias=b_gu, down_bias=b_d, backend=REF)
    assert out.dtype == dtype
    expect = naive_moe_ffn(x, w_gu, w_d, tw, ids, gate_up_bias=b_gu, down_bias=b_d)
    assert_rel_close(out, expect, 3e-2, "moe_ffn low precision")


def test_moe_ffn_matches_pipeline():
    """moe_ffn == permute -> grouped_gemm -> act -> grouped_gemm -> unpermute (same spec)."""
    T, H, I, E, k = 21, 16, 8, 6, 3
    x, w_gu, w_d, tw, ids, _, _ = ffn_inputs(T, H, I, E, k, seed=17, dtype=torch.float64)
    plan = moe_kernels.route(ids, E, backend=REF)
    xp = moe_kernels.permute(x, plan, backend=REF)
    h = moe_kernels.grouped_gemm(xp, w_gu, plan.offs, trans_b=True, backend=REF)
    act = torch.nn.functional.silu(h[:, :I]) * h[:, I:]
    o = moe_kernels.grouped_gemm(act, w_d, plan.offs, trans_b=True, backend=REF)
    pipe = moe_kernels.unpermute(o, plan, tw, backend=REF)
    out = moe_kernels.moe_ffn(x, w_gu, w_d, tw, ids, backend=REF)
    assert_rel_close(out, pipe, 1e-12, "moe_ffn vs pipeline")


def test_moe_ffn_empty():
    x, w_gu, w_d, tw, ids, _, _ = ffn_inputs(0, 8, 4, 3, 2, seed=1)
    out = moe_kernels.moe_ffn(x, w_gu, w_d, tw, ids, backend=REF)
    assert out.shape == (0, 8) and out.dtype == torch.float32


@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_gemm_offs_match_torch_grouped_mm(trans_b, dtype):
    """``offs`` means what it means for torch.nn.functional.grouped_mm (rows < offs[-1])."""
    grouped_mm = getattr(torch.nn.functional, "grouped_mm", None)
    if grouped_mm is None:
        pytest.skip("torch.nn.functional.grouped_mm is not in this torch")
    offs = make_offs([3, 0, 9, 1, 0, 6])
    a = randn(22, 32, seed=1, dtype=dtype)
    b = randn(6, 16, 32, seed=2, dtype=dtype) if trans_b else randn(6, 32, 16, seed=2, dtype=dtype)
    want = grouped_mm(a, b.transpose(1, 2) if trans_b else b, offs=offs)[:19]
    got = moe_kernels.grouped_gemm(a, b, offs, trans_b=trans_b, backend=REF)
    assert_rel_close(got[:19], want, 2 * TOL[dtype], "grouped_gemm vs torch grouped_mm")
