"""Gradients.

* ``torch.autograd.gradcheck`` in float64 on the reference backend, for every differentiable input
  of every op (finite differences: independent of any hand-written backward formula).
* Experts that receive no rows get exactly zero weight (and bias) gradient; dropped pairs get
  exactly zero routing-weight gradient; tokens never routed get exactly zero input gradient.
* Every usable CPU backend's float32 gradients match the float64 reference gradients.
"""

# ruff: noqa: E741  (I is the expert intermediate size, as everywhere in the package)
from __future__ import annotations

import pytest
import torch
from testutil import available_backends_list, gen, max_rel_err, randn
from torch.autograd import gradcheck

import moe_kernels

REF = "reference"
BACKENDS = available_backends_list("cpu")
F64 = torch.float64


def leaf(t):
    return t.detach().clone().requires_grad_(True)


def distinct_ids(T, k, E, seed, drop=0.0):
    g = gen(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).reshape(T, k)
    if drop:
        mask = torch.rand(T, k, generator=g) < drop
        ids = torch.where(mask, torch.where(torch.rand(T, k, generator=g) < 0.5, -1, E), ids)
    return ids.to(torch.int32)


# ----------------------------------------------------------------------------------------------
# topk_gating
# ----------------------------------------------------------------------------------------------
GATING_GRAD_CASES = [
    # (scoring, renormalize, bias, groups, topk_groups, scale, E, k)
    ("softmax", True, False, None, None, 1.0, 8, 2),
    ("softmax", False, False, None, None, 1.0, 8, 3),
    ("softmax", True, False, None, None, 1.0, 6, 6),  # k = E
    ("sigmoid", True, True, 4, 2, 2.5, 16, 4),  # DeepSeek-V3 style
    ("sigmoid", False, True, None, None, 1.0, 12, 3),
    ("softmax", False, True, 3, 2, 16.0, 12, 2),
]


@pytest.mark.parametrize("case", GATING_GRAD_CASES)
def test_topk_gating_gradcheck(case):
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
    assert gradcheck(f, (logits,), eps=1e-6, atol=1e-7)


def test_topk_gating_grad_only_through_chosen():
    """sigmoid without renormalisation: d w / d logit is zero for every unchosen expert."""
    logits = leaf(randn(6, 10, seed=1, dtype=F64))
    w, ids = moe_kernels.topk_gating(logits, 3, scoring="sigmoid", renormalize=False, backend=REF)
    w.sum().backward()
    chosen = torch.zeros(6, 10, dtype=torch.bool)
    chosen.scatter_(1, ids.long(), True)
    assert (logits.grad[~chosen] == 0).all()
    s = torch.sigmoid(logits.detach())
    assert torch.allclose(logits.grad[chosen], (s * (1 - s))[chosen], rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------------------------
# permute / unpermute
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("block_size", [None, 4])
def test_permute_gradcheck(block_size):
    ids = distinct_ids(6, 2, 5, seed=2, drop=0.25)
    plan = moe_kernels.route(ids, 5, block_size=block_size, backend=REF)
    x = leaf(randn(6, 3, seed=4, dtype=F64))
    assert gradcheck(lambda x: moe_kernels.permute(x, plan, backend=REF), (x,))


@pytest.mark.parametrize("block_size", [None, 4])
@pytest.mark.parametrize("with_weights", [True, False])
def test_unpermute_gradcheck(block_size, with_weights):
    ids = distinct_ids(6, 3, 5, seed=5, drop=0.25)
    plan = moe_kernels.route(ids, 5, block_size=block_size, backend=REF)
    y = leaf(randn(plan.num_rows, 4, seed=6, dtype=F64))
    if with_weights:
        w = leaf(torch.rand(6, 3, generator=gen(7), dtype=F64))
        assert gradcheck(lambda y, w: moe_kernels.unpermute(y, plan, w, backend=REF), (y, w))
    else:
        assert gradcheck(lambda y: moe_kernels.unpermute(y, plan, backend=REF), (y,))


def test_unpermute_zero_grads_where_unused(debug_mode):
    ids = distinct_ids(8, 2, 6, seed=8, drop=0.3)
    plan = moe_kernels.route(ids, 6, block_size=4, backend=REF)
    y = leaf(randn(plan.num_rows, 5, seed=9, dtype=F64))
    w = leaf(torch.rand(8, 2, generator=gen(10), dtype=F64))
    out = moe_kernels.unpermute(y, plan, w, backend=REF)
    out.backward(randn(*out.shape, seed=11, dtype=F64))
    unused = plan.slot_of_row < 0
    dropped = plan.row_of_slot < 0
    assert unused.any() and dropped.any()
    assert (y.grad[unused] == 0).all(), "padding/unused rows got a gradient"
    assert (w.grad[dropped] == 0).all(), "dropped pairs got a routing-weight gradient"
    assert not torch.isnan(y.grad).any() and not torch.isnan(w.grad).any()


# ----------------------------------------------------------------------------------------------
# grouped_gemm
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("sizes,extra", [([2, 0, 3, 1], 2), ([4], 0), ([0, 0], 3)])
def test_grouped_gemm_gradcheck(trans_b, sizes, extra):
    E, K, N = len(sizes), 3, 4
    offs = torch.tensor(sizes).cumsum(0).to(torch.int32)
    M = sum(sizes) + extra
    a = leaf(randn(M, K, seed=M, dtype=F64))
    b = leaf(randn(E, N, K, seed=E, dtype=F64) if trans_b else randn(E, K, N, seed=E, dtype=F64))

    def f(a, b):
        return moe_kernels.grouped_gemm(a, b, offs, trans_b=trans_b, backend=REF)

    assert gradcheck(f, (a, b))


@pytest.mark.parametrize("trans_b", [False, True])
def test_grouped_gemm_empty_expert_grad_exactly_zero(trans_b, debug_mode):
    sizes = [0, 5, 0, 3, 0]
    offs = torch.tensor(sizes).cumsum(0).to(torch.int32)
    a = leaf(randn(10, 6, seed=1))  # 2 rows past offs[-1]
    b = leaf(randn(5, 7, 6, seed=2) if trans_b else randn(5, 6, 7, seed=2))
    out = moe_kernels.grouped_gemm(a, b, offs, trans_b=trans_b, backend=REF)
    out.backward(randn(*out.shape, seed=3))
    for e in (0, 2, 4):
        assert torch.equal(b.grad[e], torch.zeros_like(b.grad[e])), f"empty expert {e}"
    assert torch.equal(a.grad[8:], torch.zeros_like(a.grad[8:])), "rows past offs[-1]"
    assert not torch.isnan(b.grad).any() and not torch.isnan(a.grad).any()


# ----------------------------------------------------------------------------------------------
# moe_ffn
# ----------------------------------------------------------------------------------------------
FFN_GRAD_CASES = [
    # (activation, interleaved, biases, gpt-oss strided views, limit)
    ("swiglu", False, False, False, 7.0),
    ("swiglu", False, True, False, 7.0),
    ("geglu", True, True, False, 7.0),
    ("swiglu_oai", True, True, True, 7.0),
    ("swiglu_oai", False, True, False, 0.8),  # clamps active
]


@pytest.mark.parametrize("case", FFN_GRAD_CASES)
def test_moe_ffn_gradcheck(case):
    activation, interleaved, biases, gpt_oss, limit = case
    T, H, I, E, k = 4, 5, 3, 4, 2
    ids = distinct_ids(T, k, E, seed=12)
    ids[1, 1] = -1  # a dropped pair
    x = leaf(randn(T, H, seed=13, dtype=F64))
    if gpt_oss:  # storage [E, H, 2I] and [E, I, H]; the op sees the transposed views
        wgu = leaf(randn(E, H, 2 * I, seed=14, dtype=F64, scale=0.7))
        wd = leaf(randn(E, I, H, seed=15, dtype=F64, scale=0.7))
    else:
        wgu = leaf(randn(E, 2 * I, H, seed=14, dtype=F64, scale=0.7))
        wd = leaf(randn(E, H, I, seed=15, dtype=F64, scale=0.7))
    tw = leaf(torch.rand(T, k, generator=gen(16), dtype=F64) + 0.1)
    inputs = [x, wgu, wd, tw]
    if biases:
        inputs += [leaf(randn(E, 2 * I, seed=17, dtype=F64)), leaf(randn(E, H, seed=18, dtype=F64))]

    def f(x, wgu, wd, tw, bgu=None, bd=None):
        if gpt_oss:
            wgu, wd = wgu.transpose(1, 2), wd.transpose(1, 2)
        return moe_kernels.moe_ffn(
            x,
            wgu,
            wd,
            tw,
            ids,
            activation=activation,
            gate_up_bias=bgu,
            down_bias=bd,
            limit=limit,
            interleaved=interleaved,
            backend=REF,
        )

    assert gradcheck(f, tuple(inputs), eps=1e-6, atol=1e-6)


def test_moe_ffn_unused_experts_get_exactly_zero_grad(debug_mode):
    T, H, I, E, k = 6, 8, 4, 6, 2
    ids = torch.tensor([[0, 3], [3, 0], [0, -1], [3, 6], [0, 3], [-1, -1]], dtype=torch.int32)
    x = leaf(randn(T, H, seed=1))
    wgu = leaf(randn(E, 2 * I, H, seed=2, scale=0.5))
    wd = leaf(randn(E, H, I, seed=3, scale=0.5))
    tw = leaf(torch.rand(T, k, generator=gen(4)) + 0.1)
    bgu = leaf(randn(E, 2 * I, seed=5))
    bd = leaf(randn(E, H, seed=6))
    out = moe_kernels.moe_ffn(x, wgu, wd, tw, ids, gate_up_bias=bgu, down_bias=bd, backend=REF)
    out.backward(randn(T, H, seed=7))
    for e in (1, 2, 4, 5):
        for name, g in (("w_gate_up", wgu.grad), ("w_down", wd.grad)):
            assert torch.equal(g[e], torch.zeros_like(g[e])), f"{name} grad of unused expert {e}"
        for name, g in (("gate_up_bias", bgu.grad), ("down_bias", bd.grad)):
            assert torch.equal(g[e], torch.zeros_like(g[e])), f"{name} grad of unused expert {e}"
    dropped = (ids < 0) | (ids >= E)
    assert (tw.grad[dropped] == 0).all(), "dropped pairs got a routing-weight gradient"
    assert (x.grad[5] == 0).all(), "a token with every pair dropped got an input gradient"
    for g in (x.grad, wgu.grad, wd.grad, tw.grad, bgu.grad, bd.grad):
        assert not torch.isnan(g).any()


# ----------------------------------------------------------------------------------------------
# every backend's float32 gradients against the float64 reference
# ----------------------------------------------------------------------------------------------
def _grads(fn, inputs):
    leaves = [leaf(t) for t in inputs]
    out = fn(*leaves)
    out.backward(randn(*out.shape, seed=99, dtype=out.dtype))
    return [t.grad for t in leaves]


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_grads_match_reference(backend):
    T, H, I, E, k = 13, 16, 8, 5, 2
    ids = distinct_ids(T, k, E, seed=21, drop=0.2)
    x = randn(T, H, seed=22)
    wgu = randn(E, 2 * I, H, seed=23, scale=0.4)
    wd = randn(E, H, I, seed=24, scale=0.4)
    tw = torch.rand(T, k, generator=gen(25)) + 0.1
    bgu, bd = randn(E, 2 * I, seed=26), randn(E, H, seed=27)
    logits = randn(T, E, seed=28)

    def ffn(b):
        return lambda x, wgu, wd, tw, bgu, bd: moe_kernels.moe_ffn(
            x, wgu, wd, tw, ids, gate_up_bias=bgu, down_bias=bd, backend=b
        )

    def gate(b):
        return lambda lg: moe_kernels.topk_gating(lg, 2, backend=b)[0]

    plan = moe_kernels.route(ids, E, block_size=4, backend=REF)

    def unperm(b):
        return lambda y, w: moe_kernels.unpermute(y, plan, w, backend=b)

    def perm(b):
        return lambda x: moe_kernels.permute(x, plan, backend=b)

    offs = torch.tensor([3, 3, 9, 12, 12], dtype=torch.int32)

    def gg(b):
        return lambda a, w: moe_kernels.grouped_gemm(a, w, offs, trans_b=True, backend=b)

    checks = [
        ("moe_ffn", ffn, [x, wgu, wd, tw, bgu, bd]),
        ("topk_gating", gate, [logits]),
        ("unpermute", unperm, [randn(plan.num_rows, H, seed=29), tw]),
        ("permute", perm, [x]),
        ("grouped_gemm", gg, [randn(13, H, seed=30), wgu]),
    ]
    for name, make, inputs in checks:
        got = _grads(make(backend), inputs)
        want = _grads(make(REF), [t.double() for t in inputs])
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert g.dtype == inputs[i].dtype, (name, i, g.dtype)
            err = max_rel_err(g, w)
            assert err < 1e-4, f"{name}: grad of input {i} off by {err:.2e} on {backend}"


# ----------------------------------------------------------------------------------------------
# backward under a TorchDispatchMode (FlopCounterMode, profilers, debug modes)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_under_dispatch_mode(backend):
    """Backward kernels run below autograd: they must not rely on autograd recording inside them
    (under a dispatch mode such as FlopCounterMode nothing would be recorded)."""
    from torch.utils.flop_counter import FlopCounterMode

    T, H, I, E, k = 7, 8, 4, 4, 2
    ids = distinct_ids(T, k, E, seed=31)
    x = leaf(randn(T, H, seed=32))
    wgu = leaf(randn(E, 2 * I, H, seed=33, scale=0.5))
    wd = leaf(randn(E, H, I, seed=34, scale=0.5))
    logits = leaf(randn(T, E, seed=35))
    with FlopCounterMode(display=False):
        w, _ = moe_kernels.topk_gating(logits, k, backend=backend)
        out = moe_kernels.moe_ffn(x, wgu, wd, w, ids, backend=backend)
        out.sum().backward()
    for t in (x, wgu, wd, logits):
        assert t.grad is not None and torch.isfinite(t.grad).all()
