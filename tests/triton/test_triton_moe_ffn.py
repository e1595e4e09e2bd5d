"""The fused expert FFN (gather + GEMM 1 + activation epilogue, GEMM 2 + routing weight, combine)
and its backward, against the reference."""

from __future__ import annotations

import pytest
import torch
from triton_helpers import DEVICE, DTYPES, check_close, gemm_tol, randint, randn

# (T, E, k, H, isz, activation, interleaved, biases, layout): why each row exists
CASES = [
    (13, 5, 2, 40, 24, "swiglu", False, False, "hf"),  # E not a power of two, T odd
    (9, 4, 1, 32, 16, "geglu", False, True, "hf"),  # k = 1, exact-erf GELU, biases
    (6, 3, 3, 24, 40, "swiglu", False, True, "hf"),  # k = E, isz > H
    (10, 6, 2, 40, 24, "swiglu_oai", True, True, "gpt-oss"),  # gpt-oss: interleaved, clamp,
    # transposed weight views used without a copy
]


def _weights(E, H, isz, dtype, layout, biases, seed):
    if layout == "hf":
        wgu = randn(E, 2 * isz, H, seed=seed, dtype=dtype, scale=H**-0.5)
        wd = randn(E, H, isz, seed=seed + 1, dtype=dtype, scale=isz**-0.5)
    else:  # stored [E, H, 2I] / [E, isz, H]; the op receives their transposes
        wgu = randn(E, H, 2 * isz, seed=seed, dtype=dtype, scale=H**-0.5).transpose(1, 2)
        wd = randn(E, isz, H, seed=seed + 1, dtype=dtype, scale=isz**-0.5).transpose(1, 2)
    bgu = randn(E, 2 * isz, seed=seed + 2, dtype=dtype, scale=0.1) if biases else None
    bd = randn(E, H, seed=seed + 3, dtype=dtype, scale=0.1) if biases else None
    return wgu, wd, bgu, bd


def _routing(T, E, k, seed, drop=True):
    ids = torch.stack(
        [torch.randperm(E, generator=torch.Generator().manual_seed(seed + t))[:k] for t in range(T)]
    ).to(torch.int32)
    if drop and T > 2:
        ids[1, 0] = -1  # a pair routed to another rank: skipped
        ids[2, k - 1] = E  # out of range: skipped
    w = torch.rand(T, k, generator=torch.Generator().manual_seed(seed))
    return ids.to(DEVICE), w.to(DEVICE)


def _cpu64(t):
    return None if t is None else t.detach().cpu().double()


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[5]}-E{c[1]}-k{c[2]}-{c[8]}")
@pytest.mark.parametrize("dtype", DTYPES)
def test_moe_ffn(ops, ref, case, dtype, debug_mode):
    T, E, k, H, isz, act, inter, biases, layout = case
    x = randn(T, H, seed=1, dtype=dtype)
    wgu, wd, bgu, bd = _weights(E, H, isz, dtype, layout, biases, seed=10)
    ids, w = _routing(T, E, k, seed=3)
    out = ops.moe_ffn(x, wgu, wd, w, ids, bgu, bd, act, 1.702, 7.0, inter)
    exp = ref.moe_ffn(
        _cpu64(x),
        _cpu64(wgu),
        _cpu64(wd),
        _cpu64(w),
        ids.cpu(),
        _cpu64(bgu),
        _cpu64(bd),
        act,
        1.702,
        7.0,
        inter,
    )
    assert out.dtype == dtype
    check_close(out.cpu(), exp, gemm_tol(dtype), "moe_ffn")


def test_moe_ffn_oai_clamp_active(ops, ref):
    """Large pre-activations so swiglu_oai's clamps (limit) are hit on both sides."""
    T, E, k, H, isz = 8, 3, 2, 16, 16
    x = randn(T, H, seed=2, scale=4.0)
    wgu, wd, bgu, bd = _weights(E, H, isz, torch.float32, "hf", True, seed=4)
    ids, w = _routing(T, E, k, seed=5, drop=False)
    out = ops.moe_ffn(x, wgu, wd, w, ids, bgu, bd, "swiglu_oai", 1.702, 1.5, False)
    exp = ref.moe_ffn(
        *(_cpu64(t) for t in (x, wgu, wd, w)),
        ids.cpu(),
        _cpu64(bgu),
        _cpu64(bd),
        "swiglu_oai",
        1.702,
        1.5,
        False,
    )
    check_close(out.cpu(), exp, gemm_tol(torch.float32), "swiglu_oai clamped")


def test_moe_ffn_all_to_one_expert_and_empty(ops, ref):
    T, E, k, H, isz = 20, 4, 1, 16, 16
    x = randn(T, H, seed=6)
    wgu, wd, _, _ = _weights(E, H, isz, torch.float32, "hf", False, seed=7)
    ids = torch.full((T, k), 2, dtype=torch.int32, device=DEVICE)
    w = torch.ones(T, k, device=DEVICE)
    out = ops.moe_ffn(x, wgu, wd, w, ids, None, None, "swiglu", 1.702, 7.0, False)
    exp = ref.moe_ffn(
        _cpu64(x),
        _cpu64(wgu),
        _cpu64(wd),
        _cpu64(w),
        ids.cpu(),
        None,
        None,
        "swiglu",
        1.702,
        7.0,
        False,
    )
    check_close(out.cpu(), exp, gemm_tol(torch.float32), "one expert")
    empty = ops.moe_ffn(x[:0], wgu, wd, w[:0], ids[:0], None, None, "swiglu", 1.702, 7.0, False)
    assert empty.shape == (0, H)
    grads = ops.moe_ffn_backward(
        x[:0], x[:0], wgu, wd, w[:0], ids[:0], None, None, "swiglu", 1.702, 7.0, False
    )
    for g, t in zip(grads[:4], (x[:0], wgu, wd, w[:0])):
        assert g.shape == t.shape and g.is_contiguous() and not g.any()


BWD_CASES = [
    (11, 5, 2, 32, 16, "swiglu", False, True, "hf", torch.float32),
    (8, 3, 3, 24, 16, "geglu", False, False, "hf", torch.float32),  # k = E, no biases
    (9, 4, 2, 32, 16, "swiglu_oai", True, True, "gpt-oss", torch.float32),
    (11, 5, 2, 32, 16, "swiglu", False, True, "hf", torch.bfloat16),
    (11, 5, 2, 32, 16, "swiglu", True, False, "hf", torch.float16),
]


@pytest.mark.parametrize("case", BWD_CASES, ids=lambda c: f"{c[5]}-k{c[2]}-{c[8]}-{c[9]}")
def test_moe_ffn_backward(ops, ref, case, debug_mode):
    T, E, k, H, isz, act, inter, biases, layout, dtype = case
    x = randn(T, H, seed=1, dtype=dtype)
    wgu, wd, bgu, bd = _weights(E, H, isz, dtype, layout, biases, seed=20)
    ids, w = _routing(T, E, k, seed=8)
    g = randn(T, H, seed=9, dtype=dtype)
    limit = 1.0  # small: the clamp gradients are exercised
    got = ops.moe_ffn_backward(g, x, wgu, wd, w, ids, bgu, bd, act, 1.702, limit, inter)
    exp = ref.moe_ffn_backward(
        _cpu64(g),
        _cpu64(x),
        _cpu64(wgu),
        _cpu64(wd),
        _cpu64(w),
        ids.cpu(),
        _cpu64(bgu),
        _cpu64(bd),
        act,
        1.702,
        limit,
        inter,
    )
    names = (
        "grad_x",
        "grad_w_gate_up",
        "grad_w_down",
        "grad_topk_weights",
        "grad_gate_up_bias",
        "grad_down_bias",
    )
    inputs = (x, wgu, wd, w, bgu, bd)
    for name, a, e, inp in zip(names, got, exp, inputs):
        if inp is None:
            assert a.numel() == 0, name
            continue
        assert a.dtype == inp.dtype and a.shape == inp.shape, name
        check_close(a.cpu(), e, 2 * gemm_tol(dtype), name)
    again = ops.moe_ffn_backward(g, x, wgu, wd, w, ids, bgu, bd, act, 1.702, limit, inter)
    for a, b in zip(got, again):
        assert torch.equal(a, b)  # deterministic


def test_moe_ffn_via_registered_op(ops, ref):
    """The registry exposes these kernels as moe_kernels::moe_ffn_triton."""
    import moe_kernels  # noqa: F401  (registers the ops)

    op = getattr(torch.ops.moe_kernels, "moe_ffn_triton", None)
    if op is None:
        pytest.skip("moe_kernels::moe_ffn_triton is not registered in this build")
    T, E, k, H, isz = 7, 3, 2, 16, 16
    x = randn(T, H, seed=1)
    wgu, wd, _, _ = _weights(E, H, isz, torch.float32, "hf", False, seed=2)
    ids = randint(0, E, (T, k), seed=3)
    w = randn(T, k, seed=4)
    out = op(x, wgu, wd, w, ids, None, None, "swiglu", 1.702, 7.0, False)
    exp = ref.moe_ffn(
        _cpu64(x),
        _cpu64(wgu),
        _cpu64(wd),
        _cpu64(w),
        ids.cpu(),
        None,
        None,
        "swiglu",
        1.702,
        7.0,
        False,
    )
    check_close(out.cpu(), exp, gemm_tol(torch.float32), "registered op")
