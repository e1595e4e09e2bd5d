"""The CPU backend (``torch.ops.moe_kernels.X`` on CPU tensors) against the reference.

Index outputs must match exactly; GEMM-like outputs must be within 2x the error that PyTorch's own
computation in the same dtype makes (the reference run on inputs of that dtype), both measured
against the reference in float64.  Every output is checked finite: run this module with
``MOE_KERNELS_DEBUG=1`` (outputs start NaN-filled) to prove every element is written -- the ISA
runner (test_cpu_isa.py) does so for every instruction-set path.
"""

from __future__ import annotations

import os

import pytest
import torch

import moe_kernels
from moe_kernels import reference as ref

ops = torch.ops.moe_kernels
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# smallest error scale the 2x rule is applied at (below it both errors are pure output rounding)
FLOOR = {torch.float32: 2e-6, torch.bfloat16: 4e-3, torch.float16: 5e-4}

pytestmark = pytest.mark.skipif(
    moe_kernels.available_backends()["cpu"][0] is False,
    reason="the compiled CPU backend is not built",
)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rel_err(x: torch.Tensor, truth: torch.Tensor) -> float:
    scale = truth.abs().max().item() if truth.numel() else 1.0
    if x.numel() == 0:
        return 0.0
    return (x.double() - truth).abs().max().item() / max(scale, 1e-30)


def assert_2x(
    ours: torch.Tensor, torch_same_dtype: torch.Tensor, truth: torch.Tensor, dtype, what=""
):
    assert ours.shape == truth.shape, (what, ours.shape, truth.shape)
    assert ours.dtype == torch_same_dtype.dtype, (what, ours.dtype, torch_same_dtype.dtype)
    assert torch.isfinite(ours).all(), f"{what}: non-finite output (unwritten element?)"
    e_ours, e_torch = rel_err(ours, truth), rel_err(torch_same_dtype, truth)
    assert e_ours <= 2 * max(e_torch, FLOOR[dtype]), (
        f"{what}: error {e_ours:.3g} vs torch {e_torch:.3g}"
    )


def to64(*ts):
    return [None if t is None else t.double() for t in ts]


# --------------------------------------------------------------------------------------------------
# top-k gating
# --------------------------------------------------------------------------------------------------

GATING_CASES = [
    # (T, E, k, scoring, renormalize, bias, groups, topk_groups, scale)   why
    (7, 8, 2, "softmax", True, False, 0, 0, 1.0),  # Mixtral-like
    (300, 60, 4, "softmax", False, False, 0, 0, 1.0),  # Qwen2-MoE width, no renorm
    (13, 64, 8, "sigmoid", True, True, 8, 3, 2.5),  # DeepSeek-V3 style groups + bias + scale
    (1, 5, 5, "softmax", True, False, 0, 0, 1.0),  # k = E
    (4, 1, 1, "sigmoid", False, False, 0, 0, 1.0),  # E = 1
    (9, 16, 6, "softmax", True, False, 16, 2, 1.0),  # groups of one expert; k > eligible
    (5, 160, 6, "sigmoid", True, True, 8, 4, 1.0),  # E = 160
]


def near_tie_rows(sel: torch.Tensor, k: int) -> torch.Tensor:
    if k >= sel.shape[1]:
        return torch.zeros(sel.shape[0], dtype=torch.bool)
    v = sel.sort(dim=1, descending=True).values
    return (v[:, k - 1] - v[:, k]).abs() <= 1e-6 * v[:, k - 1].abs().clamp_min(1e-30)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", GATING_CASES)
def test_topk_gating(case, dtype):
    T, E, k, scoring, renorm, use_bias, G, TG, scale = case
    g = gen(T * 1000 + E)
    logits = (torch.randn(T, E, generator=g) * 2).to(dtype)
    bias = torch.randn(E, generator=g) * 0.1 if use_bias else None
    w, ids = ops.topk_gating(logits, k, scoring, renorm, bias, G, TG, scale)
    rw, rids = ref.topk_gating(logits, k, scoring, renorm, bias, G, TG, scale)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    assert ids.shape == (T, k) and w.shape == (T, k)
    scores = (
        torch.softmax(logits.float(), -1) if scoring == "softmax" else torch.sigmoid(logits.float())
    )
    sel = scores + (bias if bias is not None else 0)
    ok = ~near_tie_rows(sel, k) if G == 0 else torch.ones(T, dtype=torch.bool)
    assert torch.equal(ids[ok], rids[ok])
    torch.testing.assert_close(w[ok], rw[ok], rtol=2e-6, atol=2e-7)
    # backward
    gw = torch.randn(T, k, generator=g)
    gl = ops.topk_gating_backward(gw, logits, rids, scoring, renorm, scale)
    rgl = ref.topk_gating_backward(gw, logits, rids, scoring, renorm, scale)
    truth = ref.topk_gating_backward(gw.double(), logits.double(), rids, scoring, renorm, scale)
    assert_2x(gl, rgl, truth, dtype, "grad_logits")


def test_topk_gating_errors():
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="top_k"):
        ops.topk_gating(x, 9, "softmax", True, None, 0, 0, 1.0)
    with pytest.raises(RuntimeError, match="num_expert_groups"):
        ops.topk_gating(x, 2, "softmax", True, None, 3, 1, 1.0)
    with pytest.raises(RuntimeError, match="scoring"):
        ops.topk_gating(x, 2, "tanh", True, None, 0, 0, 1.0)


# --------------------------------------------------------------------------------------------------
# routing, permute, unpermute
# --------------------------------------------------------------------------------------------------


def random_ids(T, k, E, g, drop=0.0, one_expert=None):
    if one_expert is not None:
        ids = torch.full((T, k), one_expert, dtype=torch.int32)
    elif k <= E:
        ids = torch.rand(T, E, generator=g).argsort(dim=1)[:, :k].to(torch.int32)
    else:
        ids = torch.randint(0, E, (T, k), generator=g, dtype=torch.int32)
    if drop > 0:
        mask = torch.rand(T, k, generator=g) < drop
        bad = torch.where(torch.rand(T, k, generator=g) < 0.5, -1, E).to(torch.int32)
        ids = torch.where(mask, bad, ids)
    return ids


ROUTE_CASES = [
    # (T, k, E, block_size, drop, one_expert)   why
    (7, 2, 8, 0, 0.0, None),
    (300, 4, 60, 16, 0.1, None),  # padded, dropped ids, many empty blocks
    (1, 3, 3, 4, 0.0, None),  # T = 1, k = E
    (13, 1, 1, 0, 0.2, None),  # E = 1 with drops
    (50, 2, 16, 8, 0.0, 5),  # all tokens on one expert
    (0, 2, 4, 4, 0.0, None),  # T = 0
]


@pytest.mark.parametrize("case", ROUTE_CASES)
def test_route_permute_unpermute(case):
    T, k, E, bs, drop, one = case
    g = gen(T + 17 * k + E)
    ids = random_ids(T, k, E, g, drop, one)
    got = ops.route(ids, E, bs)
    want = ref.route(ids, E, bs)
    for a, b in zip(got, want):
        assert a.dtype == torch.int32 and torch.equal(a, b)
    _, _, ros, sor, _ = want
    for dtype in DTYPES:
        H = 37
        x = torch.randn(T, H, generator=g).to(dtype)
        p = ops.permute(x, ros, sor)
        assert torch.equal(p, ref.permute(x, ros, sor))
        y = torch.randn(sor.shape[0], H, generator=g).to(dtype)
        w = torch.rand(T, k, generator=g)
        for tw in (w, None):
            out = ops.unpermute(y, ros, sor, tw)
            rout = ref.unpermute(y, ros, sor, tw)
            truth = ref.unpermute(y.double(), ros, sor, None if tw is None else tw.double())
            assert_2x(out, rout, truth, dtype, "unpermute")
            go = torch.randn(T, H, generator=g).to(dtype)
            gy, gw = ops.unpermute_backward(go, y, ros, sor, tw, True, True)
            rgy, rgw = ref.unpermute_backward(go, y, ros, sor, tw, True, True)
            tgy, tgw = ref.unpermute_backward(
                go.double(), y.double(), ros, sor, None if tw is None else tw.double(), True, True
            )
            assert_2x(gy, rgy, tgy, dtype, "grad_y")
            if tw is None:
                assert gw.numel() == 0
            else:
                assert gw.dtype == tw.dtype
                assert_2x(
                    gw, rgw, tgw, torch.float32 if dtype == torch.float32 else dtype, "grad_w"
                )
            gy2, gw2 = ops.unpermute_backward(go, y, ros, sor, tw, False, False)
            assert gy2.numel() == 0 and gw2.numel() == 0


# --------------------------------------------------------------------------------------------------
# grouped GEMM
# --------------------------------------------------------------------------------------------------


def random_offs(M_used, E, g, empty=(), one=None):
    if one is not None:
        counts = torch.zeros(E, dtype=torch.long)
        counts[one] = M_used
    else:
        w = torch.rand(E, generator=g)
        for e in empty:
            w[e] = 0
        counts = (w / w.sum() * M_used).floor().long()
        counts[int(w.argmax())] += M_used - counts.sum()
    return counts.cumsum(0).to(torch.int32)


GG_CASES = [
    # (M, used, E, K, N, empty, one)   why
    (40, 40, 4, 37, 45, (), None),  # K, N not multiples of 8/16
    (300, 290, 6, 64, 96, (1, 4), None),  # rows past offs[-1], empty experts, packed path
    (7, 7, 1, 16, 33, (), None),  # E = 1
    (200, 200, 5, 48, 20, (), 2),  # all rows on one expert (row blocks split)
    (3, 3, 8, 24, 40, (), None),  # few rows: dot path, most experts empty
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("case", GG_CASES)
def test_grouped_gemm(case, trans_b, dtype):
    M, used, E, K, N, empty, one = case
    g = gen(M * 7 + K + N + trans_b)
    offs = random_offs(used, E, g, empty, one)
    a = torch.randn(M, K, generator=g).to(dtype)
    b = (
        torch.randn(E, N, K, generator=g) if trans_b else torch.randn(E, K, N, generator=g)
    ) / K**0.5
    b = b.to(dtype)
    out = ops.grouped_gemm(a, b, offs, trans_b)
    assert_2x(
        out,
        ref.grouped_gemm(a, b, offs, trans_b),
        ref.grouped_gemm(*to64(a, b), offs, trans_b),
        dtype,
        "out",
    )
    assert (out[used:] == 0).all()
    go = torch.randn(M, N, generator=g).to(dtype)
    ga, gb = ops.grouped_gemm_backward(go, a, b, offs, trans_b, True, True)
    rga, rgb = ref.grouped_gemm_backward(go, a, b, offs, trans_b, True, True)
    tga, tgb = ref.grouped_gemm_backward(*to64(go, a, b), offs, trans_b, True, True)
    assert_2x(ga, rga, tga, dtype, "grad_a")
    assert_2x(gb, rgb, tgb, dtype, "grad_b")
    for e in empty:
        assert (gb[e] == 0).all()
    ga2, gb2 = ops.grouped_gemm_backward(go, a, b, offs, trans_b, False, False)
    assert ga2.numel() == 0 and gb2.numel() == 0


def test_grouped_gemm_strided_b():
    # a transposed view of b must be used as is (strides), not assumed contiguous
    g = gen(3)
    a = torch.randn(50, 24, generator=g)
    b_nk = torch.randn(3, 40, 24, generator=g)
    offs = torch.tensor([10, 30, 50], dtype=torch.int32)
    out = ops.grouped_gemm(a, b_nk.transpose(1, 2), offs, False)
    torch.testing.assert_close(out, ref.grouped_gemm(a, b_nk, offs, True), rtol=1e-5, atol=1e-5)


def test_grouped_gemm_errors():
    a, b = torch.randn(10, 8), torch.randn(2, 8, 4)
    with pytest.raises(RuntimeError, match="offs"):
        ops.grouped_gemm(a, b, torch.tensor([6, 4], dtype=torch.int32), False)
    with pytest.raises(RuntimeError, match="offs"):
        ops.grouped_gemm(a, b, torch.tensor([4, 11], dtype=torch.int32), False)
    with pytest.raises(RuntimeError, match="offs"):
        ops.grouped_gemm(a, b, torch.tensor([10], dtype=torch.int32), False)
    with pytest.raises(RuntimeError, match="K"):
        ops.grouped_gemm(a, torch.randn(2, 7, 4), torch.tensor([4, 10], dtype=torch.int32), False)


# --------------------------------------------------------------------------------------------------
# the fused expert FFN
# --------------------------------------------------------------------------------------------------

FFN_CASES = [
    # (T, H, I, E, k, activation, interleaved, biases, drop, one, transposed)   why
    (7, 40, 24, 4, 2, "swiglu", False, False, 0.0, None, False),  # H, I not multiples of 16
    (1, 64, 48, 8, 2, "geglu", False, True, 0.0, None, False),  # decode, biases
    (300, 48, 40, 4, 2, "swiglu_oai", True, True, 0.05, None, True),  # gpt-oss: packed path, views
    (13, 32, 20, 1, 1, "swiglu", False, False, 0.2, None, False),  # E = 1, dropped ids
    (9, 24, 16, 3, 3, "geglu", True, False, 0.0, None, False),  # k = E
    (150, 40, 36, 6, 2, "swiglu", False, True, 0.0, 3, False),  # all on one expert (split rows)
    (5, 16, 8, 16, 2, "swiglu_oai", False, False, 0.0, None, True),  # most experts empty
    (30, 264, 72, 2, 1, "swiglu", False, False, 0.0, None, False),  # 12-18 rows/expert, K % 16 = 8
]


def ffn_inputs(case, dtype, seed):
    T, H, I, E, k, act, inter, biases, drop, one, transposed = case  # noqa: E741
    g = gen(seed)
    x = torch.randn(T, H, generator=g).to(dtype)
    if transposed:  # gpt-oss storage [E, H, 2I] / [E, I, H], passed as transposed views
        wgu = (torch.randn(E, H, 2 * I, generator=g) / H**0.5).to(dtype).transpose(1, 2)
        wd = (torch.randn(E, I, H, generator=g) / I**0.5).to(dtype).transpose(1, 2)
    else:
        wgu = (torch.randn(E, 2 * I, H, generator=g) / H**0.5).to(dtype)
        wd = (torch.randn(E, H, I, generator=g) / I**0.5).to(dtype)
    tw = torch.rand(T, k, generator=g)
    ids = random_ids(T, k, E, g, drop, one)
    bgu = (torch.randn(E, 2 * I, generator=g) * 0.1).to(dtype) if biases else None
    bd = (torch.randn(E, H, generator=g) * 0.1).to(dtype) if biases else None
    return x, wgu, wd, tw, ids, bgu, bd, act, inter


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", FFN_CASES)
def test_moe_ffn(case, dtype):
    x, wgu, wd, tw, ids, bgu, bd, act, inter = ffn_inputs(case, dtype, sum(case[:5]))
    # swiglu_oai clamps at limit; a small limit makes the clamp matter at these scales
    alpha, limit = 1.702, 1.5
    args = (act, alpha, limit, inter)
    out = ops.moe_ffn(x, wgu, wd, tw, ids, bgu, bd, *args)
    rout = ref.moe_ffn(x, wgu, wd, tw, ids, bgu, bd, *args)
    x64, wgu64, wd64, tw64, bgu64, bd64 = to64(x, wgu, wd, tw, bgu, bd)
    truth = ref.moe_ffn(x64, wgu64, wd64, tw64, ids, bgu64, bd64, *args)
    assert_2x(out, rout, truth, dtype, "out")

    go = torch.randn(out.shape, generator=gen(5)).to(dtype)
    grads = ops.moe_ffn_backward(go, x, wgu, wd, tw, ids, bgu, bd, *args)
    rgrads = ref.moe_ffn_backward(go, x, wgu, wd, tw, ids, bgu, bd, *args)
    tgrads = ref.moe_ffn_backward(go.double(), x64, wgu64, wd64, tw64, ids, bgu64, bd64, *args)
    names = (
        "grad_x",
        "grad_w_gate_up",
        "grad_w_down",
        "grad_topk_weights",
        "grad_gate_up_bias",
        "grad_down_bias",
    )
    for name, gr, rg, tg in zip(names, grads, rgrads, tgrads):
        if rg.numel() == 0:
            assert gr.numel() == 0, name
            continue
        assert_2x(gr, rg, tg, torch.float32 if name == "grad_topk_weights" else dtype, name)
    # experts with no rows get exactly zero weight gradients
    used = set(ids[(ids >= 0) & (ids < wgu.shape[0])].tolist())
    for e in range(wgu.shape[0]):
        if e not in used:
            assert (grads[1][e] == 0).all() and (grads[2][e] == 0).all()


def test_moe_ffn_matches_unfused_pipeline():
    # moe_ffn == route -> permute -> grouped_gemm -> activation -> grouped_gemm -> unpermute
    g = gen(11)
    T, H, I, E, k = 33, 48, 32, 5, 2  # noqa: E741
    x = torch.randn(T, H, generator=g)
    wgu = torch.randn(E, 2 * I, H, generator=g) / H**0.5
    wd = torch.randn(E, H, I, generator=g) / I**0.5
    ids = random_ids(T, k, E, g)
    tw = torch.rand(T, k, generator=g)
    counts, offs, ros, sor, _ = ops.route(ids, E, 0)
    h = ops.grouped_gemm(ops.permute(x, ros, sor), wgu, offs, True)
    y = ops.grouped_gemm(ref.gated_activation(h, "swiglu", 1.702, 7.0, False), wd, offs, True)
    want = ops.unpermute(y, ros, sor, tw)
    got = ops.moe_ffn(x, wgu, wd, tw, ids, None, None, "swiglu", 1.702, 7.0, False)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_moe_ffn_deterministic_and_threads():
    x, wgu, wd, tw, ids, bgu, bd, act, inter = ffn_inputs(FFN_CASES[2], torch.bfloat16, 1)
    args = (x, wgu, wd, tw, ids, bgu, bd, act, 1.702, 7.0, inter)
    a = ops.moe_ffn(*args)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        b = ops.moe_ffn(*args)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(a, ops.moe_ffn(*args)) and torch.equal(a, b)


def test_moe_ffn_empty_and_errors():
    x, wgu, wd = torch.randn(0, 16), torch.randn(2, 8, 16), torch.randn(2, 16, 4)
    tw, ids = torch.rand(0, 1), torch.zeros(0, 1, dtype=torch.int32)
    assert ops.moe_ffn(x, wgu, wd, tw, ids, None, None, "swiglu", 1.702, 7.0, False).shape == (
        0,
        16,
    )
    x = torch.randn(3, 16)
    ids = torch.full((3, 1), -1, dtype=torch.int32)  # every pair dropped: zeros
    out = ops.moe_ffn(x, wgu, wd, torch.rand(3, 1), ids, None, None, "swiglu", 1.702, 7.0, False)
    assert (out == 0).all()
    with pytest.raises(RuntimeError, match="activation"):
        ops.moe_ffn(x, wgu, wd, torch.rand(3, 1), ids, None, None, "relu", 1.702, 7.0, False)
    with pytest.raises(RuntimeError, match="w_down"):
        ops.moe_ffn(
            x,
            wgu,
            torch.randn(2, 16, 5),
            torch.rand(3, 1),
            ids,
            None,
            None,
            "swiglu",
            1.702,
            7.0,
            False,
        )
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        ops.moe_ffn(
            x.double(), wgu, wd, torch.rand(3, 1), ids, None, None, "swiglu", 1.702, 7.0, False
        )


def test_isa_env_is_honoured():
    want = os.environ.get("MOE_KERNELS_CPU_ISA")
    if not want:
        pytest.skip("MOE_KERNELS_CPU_ISA not set (the ISA runner sets it)")
    assert moe_kernels._C.cpu_isa() == want


def test_brgemm_route_env_is_honoured():
    """MOE_KERNELS_CPU_BRGEMM=1 (set by the ISA runner) must put bf16 weights with many rows on
    oneDNN's brgemm: packed (VNNI) where oneDNN has the kernel, the plain layout elsewhere."""
    want = os.environ.get("MOE_KERNELS_CPU_BRGEMM")
    route = moe_kernels._C.cpu_brgemm_route()
    if want == "1":
        packs = moe_kernels._C.cpu_brgemm_usable("bf16")
        assert route == ("vnni" if packs else "plain")
    elif want == "0" or moe_kernels._C.cpu_isa() != "amx":
        assert route == "off"
