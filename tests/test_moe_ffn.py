"""moe_ffn (the fused expert FFN): the reference against the naive loops (``naive.py``), against
the unfused pipeline and by finite differences; every other backend against the reference
(forward, backward, gradients through autograd, under a dispatch mode), with poisoned outputs.

Experts without rows get exactly zero weight and bias gradients, dropped pairs exactly zero
routing-weight gradient, tokens never routed exactly zero output and input gradient.
"""

# ruff: noqa: E741  (I is the expert intermediate size, as everywhere in the package)
from __future__ import annotations

import pytest
import torch
from naive import naive_moe_ffn
from test_routing import router_ids
from testutil import (
    assert_rel_close,
    backend_cases,
    backends,
    check_vs_reference,
    device_of,
    fits,
    gen,
    kernel_budget,
    op,
    randn,
    random_ids,
    reference_only,
    to64,
)
from torch.autograd import gradcheck

import moe_kernels
from moe_kernels import reference as ref
from moe_kernels._tolerances import FFN_TOL, FP32_AGREE, TOL

REF = "reference"
F64 = torch.float64
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
GRAD_NAMES = (
    "grad_x",
    "grad_w_gate_up",
    "grad_w_down",
    "grad_topk_weights",
    "grad_gate_up_bias",
    "grad_down_bias",
)


def leaf(t):
    return t.detach().clone().requires_grad_(True)


# ----------------------------------------------------------------------------------------------
# the reference against the naive loops, the pipeline, finite differences
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
    ids = router_ids(T, k, E, seed=seed + 3, drop=drop)
    tw = torch.rand(T, k, generator=gen(seed + 4)) + 0.1
    b_gu = randn(E, 2 * I, seed=seed + 5, dtype=dtype) if bias else None
    b_d = randn(E, H, seed=seed + 6, dtype=dtype) if bias else None
    return x, w_gu, w_d, tw, ids, b_gu, b_d


NAIVE_CASES = [
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


@reference_only
@pytest.mark.parametrize(
    "activation,interleaved,bias,gpt_oss,drop,limit",
    NAIVE_CASES,
    ids=[f"{c[0]}-il{int(c[1])}-b{int(c[2])}-oss{int(c[3])}-d{c[4]}-l{c[5]}" for c in NAIVE_CASES],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_vs_naive(activation, interleaved, bias, gpt_oss, drop, limit, dtype):
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
    assert_rel_close(out, expect, FFN_TOL[dtype], "moe_ffn")
    # tokens whose every pair was dropped get exactly zero
    all_dropped = ((ids < 0) | (ids >= E)).all(dim=1)
    assert (out[all_dropped] == 0).all()


@reference_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reference_low_precision(dtype):
    T, H, I, E, k = 9, 32, 16, 4, 2
    x, w_gu, w_d, tw, ids, b_gu, b_d = ffn_inputs(T, H, I, E, k, seed=13, dtype=dtype, bias=True)
    out = moe_kernels.moe_ffn(x, w_gu, w_d, tw, ids, gate_up_bias=b_gu, down_bias=b_d, backend=REF)
    assert out.dtype == dtype
    expect = naive_moe_ffn(x, w_gu, w_d, tw, ids, gate_up_bias=b_gu, down_bias=b_d)
    assert_rel_close(out, expect, FFN_TOL[dtype], "moe_ffn low precision")


@reference_only
def test_reference_matches_pipeline():
    """moe_ffn == permute -> grouped_gemm -> act -> grouped_gemm -> unpermute (same spec)."""
    T, H, I, E, k = 21, 16, 8, 6, 3
    x, w_gu, w_d, tw, ids, _, _ = ffn_inputs(T, H, I, E, k, seed=17, dtype=F64)
    plan = moe_kernels.route(ids, E, backend=REF)
    xp = moe_kernels.permute(x, plan, backend=REF)
    h = moe_kernels.grouped_gemm(xp, w_gu, plan.offs, trans_b=True, backend=REF)
    act = torch.nn.functional.silu(h[:, :I]) * h[:, I:]
    o = moe_kernels.grouped_gemm(act, w_d, plan.offs, trans_b=True, backend=REF)
    pipe = moe_kernels.unpermute(o, plan, tw, backend=REF)
    out = moe_kernels.moe_ffn(x, w_gu, w_d, tw, ids, backend=REF)
    assert_rel_close(out, pipe, TOL[F64], "moe_ffn vs pipeline")


GRAD_CASES = [
    # (activation, interleaved, biases, gpt-oss strided views, limit)
    ("swiglu", False, False, False, 7.0),
    ("swiglu", False, True, False, 7.0),
    ("geglu", True, True, False, 7.0),
    ("swiglu_oai", True, True, True, 7.0),
    ("swiglu_oai", False, True, False, 0.8),  # clamps active
]


@reference_only
@pytest.mark.parametrize("case", GRAD_CASES)
def test_reference_gradcheck(case):
    activation, interleaved, biases, gpt_oss, limit = case
    T, H, I, E, k = 4, 5, 3, 4, 2
    ids = router_ids(T, k, E, seed=12)
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

    # float64 central differences with step 1e-6: truncation error ~1e-12 x the third
    # derivative, roundoff ~u64 / 1e-6 = 1e-10 of |f|; atol 1e-6 also covers the clamps' kinks
    assert gradcheck(f, tuple(inputs), eps=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# every backend (the reference included)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", backends())
def test_empty(backend):
    dev = device_of(backend)
    x, w_gu, w_d, tw, ids, _, _ = ffn_inputs(0, 8, 4, 3, 2, seed=1)
    out = moe_kernels.moe_ffn(*(t.to(dev) for t in (x, w_gu, w_d, tw, ids)), backend=backend)
    assert out.shape == (0, 8) and out.dtype == torch.float32
    grads = op("moe_ffn_backward", backend)(
        out, *(t.to(dev) for t in (x, w_gu, w_d, tw, ids)), None, None, "swiglu", 1.702, 7.0, False
    )
    for g, t in zip(grads[:4], (x, w_gu, w_d, tw)):
        assert g.shape == t.shape and g.is_contiguous() and not g.any()


@pytest.mark.parametrize("backend", backends())
def test_every_pair_dropped_gives_zeros(backend, debug_mode):
    dev = device_of(backend)
    x, wgu, wd = randn(3, 16, seed=1), randn(2, 8, 16, seed=2), randn(2, 16, 4, seed=3)
    ids = torch.tensor([[-1], [2], [-5]], dtype=torch.int32)  # every pair out of range
    tw = torch.rand(3, 1, generator=gen(4))
    out = moe_kernels.moe_ffn(*(t.to(dev) for t in (x, wgu, wd, tw, ids)), backend=backend)
    assert torch.equal(out.cpu(), torch.zeros(3, 16))


@pytest.mark.parametrize("backend", backends())
def test_unused_experts_get_exactly_zero_grad(backend, debug_mode):
    dev = device_of(backend)
    T, H, I, E, k = 6, 8, 4, 6, 2
    ids = torch.tensor([[0, 3], [3, 0], [0, -1], [3, 6], [0, 3], [-1, -1]], dtype=torch.int32)
    x = leaf(randn(T, H, seed=1, device=dev))
    wgu = leaf(randn(E, 2 * I, H, seed=2, scale=0.5, device=dev))
    wd = leaf(randn(E, H, I, seed=3, scale=0.5, device=dev))
    tw = leaf((torch.rand(T, k, generator=gen(4)) + 0.1).to(dev))
    bgu = leaf(randn(E, 2 * I, seed=5, device=dev))
    bd = leaf(randn(E, H, seed=6, device=dev))
    out = moe_kernels.moe_ffn(
        x, wgu, wd, tw, ids.to(dev), gate_up_bias=bgu, down_bias=bd, backend=backend
    )
    out.backward(randn(T, H, seed=7, device=dev))
    for e in (1, 2, 4, 5):
        for name, g in (("w_gate_up", wgu.grad), ("w_down", wd.grad)):
            assert torch.equal(g[e], torch.zeros_like(g[e])), f"{name} grad of unused expert {e}"
        for name, g in (("gate_up_bias", bgu.grad), ("down_bias", bd.grad)):
            assert torch.equal(g[e], torch.zeros_like(g[e])), f"{name} grad of unused expert {e}"
    dropped = ((ids < 0) | (ids >= E)).to(dev)
    assert (tw.grad[dropped] == 0).all(), "dropped pairs got a routing-weight gradient"
    assert (x.grad[5] == 0).all(), "a token with every pair dropped got an input gradient"
    for g in (x.grad, wgu.grad, wd.grad, tw.grad, bgu.grad, bd.grad):
        assert not torch.isnan(g).any()


# ----------------------------------------------------------------------------------------------
# every other backend against the reference
# ----------------------------------------------------------------------------------------------
# (T, H, I, E, k, activation, interleaved, biases, drop, one expert, gpt-oss views, limit, tiny)
CASES = [
    (7, 40, 24, 4, 2, "swiglu", False, False, 0.0, None, False, 1.5, False),  # H, I % 16 != 0
    (1, 64, 48, 8, 2, "geglu", False, True, 0.0, None, False, 1.5, False),  # decode, biases
    (300, 48, 40, 4, 2, "swiglu_oai", True, True, 0.05, None, True, 1.5, False),  # gpt-oss,
    # packed path, transposed views
    (13, 32, 20, 1, 1, "swiglu", False, False, 0.2, None, False, 1.5, False),  # E = 1, drops
    (9, 24, 16, 3, 3, "geglu", True, False, 0.0, None, False, 1.5, False),  # k = E
    (150, 40, 36, 6, 2, "swiglu", False, True, 0.0, 3, False, 1.5, False),  # all on one expert
    (5, 16, 8, 16, 2, "swiglu_oai", False, False, 0.0, None, True, 1.5, False),  # most empty
    (30, 264, 72, 2, 1, "swiglu", False, False, 0.0, None, False, 1.5, False),  # 12-18 rows
    # per expert, K % 16 = 8
    (13, 40, 24, 5, 2, "swiglu", False, False, 0.2, None, False, 7.0, True),  # E not 2^n, T odd
    (9, 32, 16, 4, 1, "geglu", False, True, 0.0, None, False, 7.0, True),  # k = 1, exact GELU
    (6, 24, 40, 3, 3, "swiglu", False, True, 0.0, None, False, 1.0, True),  # k = E, I > H
    (10, 40, 24, 6, 2, "swiglu_oai", True, True, 0.2, None, True, 1.0, True),  # gpt-oss:
    # interleaved, clamps active (small limit), transposed weight views without a copy
    (8, 16, 16, 3, 2, "swiglu_oai", False, True, 0.0, None, False, 1.5, True),  # clamp, big x
    (20, 16, 16, 4, 1, "swiglu", False, False, 0.0, 2, False, 7.0, True),  # all on one expert
    (230, 67, 34, 3, 2, "swiglu_oai", True, True, 0.05, None, False, 1.0, False),  # prefill:
    # 100-200 rows per expert (several token blocks of the bf16 routes), odd H, interleaved
    (180, 48, 40, 2, 2, "swiglu", False, False, 0.0, None, False, 7.0, False),  # prefill, even K
]


def case_inputs(case, dtype, seed):
    T, H, I, E, k, act, inter, biases, drop, one, transposed, limit, _ = case
    g = gen(seed)
    x = (torch.randn(T, H, generator=g) * (4.0 if act == "swiglu_oai" else 1.0)).to(dtype)
    if transposed:  # gpt-oss storage [E, H, 2I] / [E, I, H], passed as transposed views
        wgu = (torch.randn(E, H, 2 * I, generator=g) / H**0.5).to(dtype).transpose(1, 2)
        wd = (torch.randn(E, I, H, generator=g) / I**0.5).to(dtype).transpose(1, 2)
    else:
        wgu = (torch.randn(E, 2 * I, H, generator=g) / H**0.5).to(dtype)
        wd = (torch.randn(E, H, I, generator=g) / I**0.5).to(dtype)
    tw = torch.rand(T, k, generator=g)
    ids = random_ids(T, k, E, seed, drop, one)
    bgu = (torch.randn(E, 2 * I, generator=g) * 0.1).to(dtype) if biases else None
    bd = (torch.randn(E, H, generator=g) * 0.1).to(dtype) if biases else None
    return (x, wgu, wd, tw, ids, bgu, bd), (act, 1.702, limit, inter)


#: backends whose fused FFN meets the "2x PyTorch's own error" rule in every dtype.  The others
#: are held to the fixed budget of their input dtype (testutil.kernel_budget): the Triton kernels
#: do in fp32 and within that budget in bf16 / fp16, but not within 2x of PyTorch there (their
#: error is ~4x PyTorch's on the output and gradients, and their fp32 routing-weight gradient
#: from bf16 inputs carries bf16-sized errors: ~1e-4 against PyTorch's 2e-7).  So does the cuda
#: backend on a GPU, whose tensor-core GEMMs take the activation and the gradients rounded to
#: the input dtype; its exact composition (fp32 intermediates, the SIMT kernels) meets the 2x rule
#: on the emulated kernels (test_cuda_emulated.py).
TWO_X_BACKENDS = ("cpu",)


def _budget(backend, dtype, device_type, grad=False):
    if backend in TWO_X_BACKENDS or dtype == torch.float32:
        return None
    return kernel_budget(dtype, device_type, grad=grad)


def _case_id(c):
    return f"T{c[0]}-H{c[1]}-I{c[2]}-E{c[3]}-k{c[4]}-{c[5]}{'-il' if c[6] else ''}"


def _to(dev, ts):
    return [None if t is None else t.to(dev) for t in ts]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("backend,case", backend_cases(CASES, lambda c: c[12], _case_id))
def test_backend_vs_reference(backend, case, dtype, debug_mode):
    dev = device_of(backend)
    check_against_reference(
        op("moe_ffn", backend),
        op("moe_ffn_backward", backend),
        case,
        dtype,
        dev,
        budget=lambda grad: _budget(backend, dtype, dev, grad=grad),
        backward=fits(backend, False) or dtype == torch.float32 or case == CASES[8],
    )


def check_against_reference(fwd, bwd, case, dtype, dev, *, budget, backward=True):
    """A backend's moe_ffn (fwd) and moe_ffn_backward (bwd) ops on one case of CASES against the
    reference; ``budget(grad)``: the error budget (None: the 2x rule).  Also run on the emulated
    CUDA kernels (tests/test_cuda_emulated.py)."""
    tensors, params = case_inputs(case, dtype, seed=sum(case[:5]))
    x, wgu, wd, tw, ids, bgu, bd = tensors
    out = fwd(*_to(dev, tensors), *params).cpu()
    rout = ref.moe_ffn(*tensors, *params)
    x64, wgu64, wd64, tw64, bgu64, bd64 = to64(x, wgu, wd, tw, bgu, bd)
    exact = ref.moe_ffn(x64, wgu64, wd64, tw64, ids, bgu64, bd64, *params)
    on = torch.device(dev).type
    check_vs_reference(out, rout, exact, dtype, "out", budget=budget(False), device_type=on)

    if not backward:
        return  # interpreter time: bf16 / fp16 backward on the first tiny row only there
    go = torch.randn(out.shape, generator=gen(5)).to(dtype)
    grads = [g.cpu() for g in bwd(go.to(dev), *_to(dev, tensors), *params)]
    rgrads = ref.moe_ffn_backward(go, *tensors, *params)
    egrads = ref.moe_ffn_backward(go.double(), x64, wgu64, wd64, tw64, ids, bgu64, bd64, *params)
    inputs = (x, wgu, wd, tw, bgu, bd)
    for name, gr, rg, eg, inp in zip(GRAD_NAMES, grads, rgrads, egrads, inputs, strict=True):
        if inp is None:
            assert gr.numel() == 0, name
            continue
        assert gr.shape == inp.shape, name
        check_vs_reference(
            gr,
            rg,
            eg,
            torch.float32 if inp is tw else dtype,
            name,
            budget=budget(True),
            device_type=on,
        )
    # experts with no rows get exactly zero weight gradients
    used = set(ids[(ids >= 0) & (ids < wgu.shape[0])].tolist())
    for e in range(wgu.shape[0]):
        if e not in used:
            assert (grads[1][e] == 0).all() and (grads[2][e] == 0).all(), f"unused expert {e}"


@pytest.mark.parametrize("backend", backends(reference=False))
def test_backend_matches_unfused_pipeline(backend):
    """moe_ffn == route -> permute -> grouped_gemm -> activation -> grouped_gemm -> unpermute,
    each step on the same backend."""
    dev = device_of(backend)
    g = gen(11)
    T, H, I, E, k = 33, 48, 32, 5, 2
    x = torch.randn(T, H, generator=g).to(dev)
    wgu = (torch.randn(E, 2 * I, H, generator=g) / H**0.5).to(dev)
    wd = (torch.randn(E, H, I, generator=g) / I**0.5).to(dev)
    ids = random_ids(T, k, E, seed=12).to(dev)
    tw = torch.rand(T, k, generator=g).to(dev)
    _, offs, ros, sor, _ = op("route", backend)(ids, E, 0)
    h = op("grouped_gemm", backend)(op("permute", backend)(x, ros, sor), wgu, offs, True)
    a = ref.gated_activation(h, "swiglu", 1.702, 7.0, False)
    y = op("grouped_gemm", backend)(a, wd, offs, True)
    want = op("unpermute", backend)(y, ros, sor, tw).cpu()
    got = op("moe_ffn", backend)(x, wgu, wd, tw, ids, None, None, "swiglu", 1.702, 7.0, False)
    # two fp32 computations of the same sums in different blockings
    assert_rel_close(got.cpu(), want, FP32_AGREE, "fused vs unfused")


@pytest.mark.parametrize("backend", backends(reference=False))
def test_backend_deterministic_and_threads(backend):
    """Forward and backward bitwise the same on every call and with one thread (no atomics,
    fixed summation order)."""
    dev = device_of(backend)
    case = CASES[2] if device_of(backend) == "cpu" and backend != "triton" else CASES[11]
    tensors, params = case_inputs(case, torch.bfloat16, seed=1)
    args = (*_to(dev, tensors), *params)
    a = op("moe_ffn", backend)(*args)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        b = op("moe_ffn", backend)(*args)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(a, op("moe_ffn", backend)(*args)) and torch.equal(a, b)
    go = torch.randn(a.shape, generator=gen(2)).to(a.dtype).to(dev)
    grads = op("moe_ffn_backward", backend)(go, *args)
    try:
        torch.set_num_threads(1)
        again = op("moe_ffn_backward", backend)(go, *args)
    finally:
        torch.set_num_threads(n)
    for name, g1, g2 in zip(GRAD_NAMES, grads, again, strict=True):
        assert torch.equal(g1, g2), f"{name} is not bitwise reproducible"


@pytest.mark.parametrize("backend", backends(reference=False))
def test_backend_grads_match_reference(backend):
    """Through autograd (the public API): fp32 gradients of every input against the float64
    reference's."""
    dev = device_of(backend)
    T, H, I, E, k = 13, 16, 8, 5, 2
    ids = router_ids(T, k, E, seed=21, drop=0.2)
    inputs = [
        randn(T, H, seed=22),
        randn(E, 2 * I, H, seed=23, scale=0.4),
        randn(E, H, I, seed=24, scale=0.4),
        torch.rand(T, k, generator=gen(25)) + 0.1,
        randn(E, 2 * I, seed=26),
        randn(E, H, seed=27),
    ]
    go = randn(T, H, seed=99)

    def grads(b, dtype, d):
        leaves = [leaf(t.to(d, dtype)) for t in inputs]
        x, wgu, wd, tw, bgu, bd = leaves
        out = moe_kernels.moe_ffn(
            x, wgu, wd, tw, ids.to(d), gate_up_bias=bgu, down_bias=bd, backend=b
        )
        out.backward(go.to(d, dtype))
        return [t.grad.cpu() for t in leaves]

    got = grads(backend, torch.float32, dev)
    same, exact = grads(REF, torch.float32, "cpu"), grads(REF, F64, "cpu")
    for name, g, s, e in zip(GRAD_NAMES, got, same, exact, strict=True):
        check_vs_reference(g, s, e, torch.float32, name, device_type=torch.device(dev).type)


@pytest.mark.parametrize("backend", backends())
def test_backward_under_dispatch_mode(backend):
    """Backward kernels run below autograd: they must not rely on autograd recording inside them
    (under a dispatch mode such as FlopCounterMode nothing would be recorded)."""
    from torch.utils.flop_counter import FlopCounterMode

    dev = device_of(backend)
    T, H, I, E, k = 7, 8, 4, 4, 2
    ids = router_ids(T, k, E, seed=31).to(dev)
    x = leaf(randn(T, H, seed=32, device=dev))
    wgu = leaf(randn(E, 2 * I, H, seed=33, scale=0.5, device=dev))
    wd = leaf(randn(E, H, I, seed=34, scale=0.5, device=dev))
    logits = leaf(randn(T, E, seed=35, device=dev))
    with FlopCounterMode(display=False):
        w, _ = moe_kernels.topk_gating(logits, k, backend=backend)
        out = moe_kernels.moe_ffn(x, wgu, wd, w, ids, backend=backend)
        out.sum().backward()
    for t in (x, wgu, wd, logits):
        assert t.grad is not None and torch.isfinite(t.grad).all()


# --------------------------------------------------------------------------------------------------
# the training path: moe_ffn_train keeps the pre-activation, moe_ffn_backward_saved reads it
# --------------------------------------------------------------------------------------------------

TRAIN_CASES = [  # activation, interleaved, bias, dtype
    ("swiglu", False, False, torch.bfloat16),
    ("swiglu_oai", True, True, torch.float32),
    ("geglu", False, True, torch.float16),
]


def _train_inputs(bias, dtype, seed, T=19, H=24, I=12, E=6, k=3):
    ids = router_ids(T, k, E, seed=seed, drop=0.25)
    ts = [
        randn(T, H, seed=seed + 1),
        randn(E, 2 * I, H, seed=seed + 2, scale=0.4),
        randn(E, H, I, seed=seed + 3, scale=0.4),
        torch.rand(T, k, generator=gen(seed + 4)) + 0.1,
    ]
    if bias:
        ts += [randn(E, 2 * I, seed=seed + 5), randn(E, H, seed=seed + 6)]
    return [t.to(dtype) for t in ts], ids


@pytest.mark.skipif("cpu" not in backends(), reason="the cpu backend is not available")
@pytest.mark.parametrize("activation,interleaved,bias,dtype", TRAIN_CASES)
def test_cpu_keeps_pre_activation_for_backward(activation, interleaved, bias, dtype, debug_mode):
    """A cpu call that records gradients runs moe_ffn_train and its backward reads the kept
    pre-activation; output and every gradient equal, bit for bit, those of ``recompute=True``
    (GEMM 1 re-run in the backward), whose graph is plain moe_ffn's."""
    inputs, ids = _train_inputs(bias, dtype, seed=40)
    go = randn(ids.shape[0], inputs[0].shape[1], seed=49).to(dtype)
    runs = {}
    for recompute in (False, True):
        leaves = [leaf(t) for t in inputs]
        bgu, bd = (leaves[4], leaves[5]) if bias else (None, None)
        out = moe_kernels.moe_ffn(
            *leaves[:4], ids, activation=activation, interleaved=interleaved, gate_up_bias=bgu,
            down_bias=bd, alpha=1.5, limit=2.0, backend="cpu", recompute=recompute,
        )  # fmt: skip
        node = out.grad_fn.name()
        out.backward(go)
        runs[recompute] = (node, out.detach(), [t.grad for t in leaves])
    assert "moe_ffn_train" in runs[False][0] and "moe_ffn_train" not in runs[True][0]
    assert torch.equal(runs[False][1], runs[True][1])
    assert torch.isfinite(runs[False][1]).all()
    for name, g1, g2 in zip(GRAD_NAMES, runs[False][2], runs[True][2], strict=False):
        assert torch.isfinite(g1).all(), name
        assert torch.equal(g1, g2), name


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("activation,interleaved,bias,dtype", TRAIN_CASES)
def test_train_op_pre_activation(backend, activation, interleaved, bias, dtype, debug_mode):
    """moe_ffn_train: the output is moe_ffn's and ``pre`` holds each kept pair's pre-activation
    (against the float64 reference), zeros for the dropped pairs, every element written."""
    if backend == "cuda":
        pytest.skip("moe_ffn_train has no CUDA kernel: the cuda backend re-runs GEMM 1")
    dev = device_of(backend)
    inputs, ids = _train_inputs(bias, dtype, seed=50)
    args = [t.to(dev) for t in inputs]
    bgu, bd = (args[4], args[5]) if bias else (None, None)
    call = (*args[:4], ids.to(dev), bgu, bd, activation, 1.5, 2.0, interleaved)
    out, pre = op("moe_ffn_train", backend)(*call)
    assert pre.dtype == torch.float32 and pre.shape == (ids.numel(), args[1].shape[1])
    assert torch.equal(out, op("moe_ffn", backend)(*call))
    want = ref.moe_ffn_pre(*(to64(t)[0] if isinstance(t, torch.Tensor) else t for t in call))
    dropped = ((ids < 0) | (ids >= args[1].shape[0])).reshape(-1).to(dev)
    assert dropped.any() and (~dropped).any()
    assert torch.equal(pre[dropped], torch.zeros_like(pre[dropped]))
    assert_rel_close(pre.cpu().double(), want.cpu(), FP32_AGREE, "pre")


@pytest.mark.parametrize("backend", backends())
def test_backward_saved_rejects_a_foreign_pre(backend):
    """moe_ffn_backward_saved refuses a ``pre`` of the wrong shape or dtype (cpu and reference
    read it; a family that re-runs GEMM 1 instead is not asked)."""
    if backend not in ("cpu", REF):
        pytest.skip("this backend re-runs GEMM 1 and does not read pre")
    inputs, ids = _train_inputs(False, torch.float32, seed=60)
    go = randn(ids.shape[0], inputs[0].shape[1], seed=61)
    rest = (*inputs[:4], ids, None, None, "swiglu", 1.702, 7.0, False)
    good = ref.moe_ffn_pre(*rest)
    fn = op("moe_ffn_backward_saved", backend)
    for bad in (good[:-1], good.double(), good.reshape(-1)):
        with pytest.raises((RuntimeError, ValueError), match="pre"):
            fn(go, bad, *rest)


def test_reference_backward_saved_is_backward():
    """The reference's backward from moe_ffn_train's pre equals its backward that recomputes."""
    for activation, interleaved, bias, _ in TRAIN_CASES:
        inputs, ids = _train_inputs(bias, F64, seed=70)
        go = randn(ids.shape[0], inputs[0].shape[1], seed=71).double()
        bgu, bd = (inputs[4], inputs[5]) if bias else (None, None)
        rest = (*inputs[:4], ids, bgu, bd, activation, 1.5, 2.0, interleaved)
        _, pre = ref.moe_ffn_train(*rest)
        assert pre.dtype == F64
        for g1, g2 in zip(
            ref.moe_ffn_backward_saved(go, pre, *rest), ref.moe_ffn_backward(go, *rest), strict=True
        ):
            torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-12)
