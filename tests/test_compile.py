"""torch.compile(fullgraph=True) traces the public ops without graph breaks.

Two functions: the unfused pipeline topk_gating -> route -> permute -> grouped_gemm -> act ->
grouped_gemm -> unpermute, and the fused moe_ffn.  Each is compiled with ``fullgraph=True`` (any
graph break is an error), run, and compared with eager; on the reference backend and with the
backend chosen automatically; forward and backward; with dynamic T.  One run goes through
Inductor, the others through ``aot_eager`` (same tracing, fake kernels and autograd, much less
compile time on a 2-core machine).
"""

# ruff: noqa: E741  (I is the expert intermediate size, as everywhere in the package)
from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing
from testutil import gen, max_rel_err, randn

import moe_kernels
from moe_kernels._tolerances import FP32_AGREE, FP32_AGREE_GRAD

T, E, k, H, I = 24, 8, 2, 32, 16


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def inputs(T=T, seed=0, grad=False):
    logits = randn(T, E, seed=seed)
    x = randn(T, H, seed=seed + 1)
    w_gu = randn(E, 2 * I, H, seed=seed + 2, scale=0.3)
    w_d = randn(E, H, I, seed=seed + 3, scale=0.3)
    if grad:
        for t in (logits, x, w_gu, w_d):
            t.requires_grad_(True)
    return logits, x, w_gu, w_d


def make_pipeline(backend, block_size=None):
    def pipeline(logits, x, w_gu, w_d):
        w, ids = moe_kernels.topk_gating(logits, k, backend=backend)
        plan = moe_kernels.route(ids, E, block_size=block_size, backend=backend)
        xp = moe_kernels.permute(x, plan, backend=backend)
        h = moe_kernels.grouped_gemm(xp, w_gu, plan.offs, trans_b=True, backend=backend)
        act = torch.nn.functional.silu(h[:, :I]) * h[:, I:]
        o = moe_kernels.grouped_gemm(act, w_d, plan.offs, trans_b=True, backend=backend)
        return moe_kernels.unpermute(o, plan, w, backend=backend)

    return pipeline


def make_ffn(backend):
    def ffn(logits, x, w_gu, w_d):
        w, ids = moe_kernels.topk_gating(logits, k, backend=backend)
        return moe_kernels.moe_ffn(x, w_gu, w_d, w, ids, backend=backend)

    return ffn


def check(fn, compiler, *, grad=False, dynamic=None, sizes=(T,)):
    compiled = torch.compile(fn, fullgraph=True, backend=compiler, dynamic=dynamic)
    for n, t in enumerate(sizes):
        args = inputs(t, seed=n, grad=grad)
        got = compiled(*args)
        want_args = [a.detach().clone().requires_grad_(grad) for a in args]
        want = fn(*want_args)
        assert got.shape == (t, H)
        assert not torch.isnan(got).any()
        assert max_rel_err(got, want) < FP32_AGREE
        if grad:
            go = torch.randn(t, H, generator=gen(n))
            got.backward(go)
            want.backward(go)
            for a, b in zip(args, want_args, strict=True):
                assert max_rel_err(a.grad, b.grad) < FP32_AGREE_GRAD


def test_pipeline_inductor_reference():
    check(make_pipeline("reference"), "inductor")


@pytest.mark.parametrize("backend", ["reference", None], ids=["reference", "auto"])
@pytest.mark.parametrize("block_size", [None, 16])
def test_pipeline_fullgraph(backend, block_size):
    check(make_pipeline(backend, block_size), "aot_eager", grad=True)


@pytest.mark.parametrize("backend", ["reference", None], ids=["reference", "auto"])
def test_moe_ffn_fullgraph(backend):
    check(make_ffn(backend), "aot_eager", grad=True)


def test_moe_ffn_inductor_auto():
    check(make_ffn(None), "inductor")


@pytest.mark.parametrize("make", [make_pipeline, make_ffn], ids=["pipeline", "moe_ffn"])
def test_dynamic_tokens(make):
    """Output sizes depend only on T, k, E: one graph serves every T, no data-dependent shapes."""
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(make("reference"), fullgraph=True, backend=counter, dynamic=True)
    first = None
    for n, t in enumerate((17, 40, 9)):
        args = inputs(t, seed=n)
        got = compiled(*args)
        assert max_rel_err(got, make("reference")(*args)) < FP32_AGREE
        if first is None:
            first = counter.frame_count
    assert counter.frame_count == first, f"recompiled {counter.frame_count - first} times"


def test_no_graph_breaks_reported():
    explanation = torch._dynamo.explain(make_pipeline(None, 16))(*inputs())
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_moe_ffn_bad_input_is_typed_under_compile():
    """Traced, moe_ffn keeps its Python checks (they cost nothing per call once compiled): a bad
    shape is seen while tracing, and raises the same ValueError as in eager mode."""
    logits, x, w_gu, w_d = inputs()
    bad_w_d = randn(E, H, I + 1, seed=9)
    # fullgraph: dynamo reports the ValueError observed while tracing as Unsupported, the
    # ValueError (with its message) as the cause
    with pytest.raises(torch._dynamo.exc.Unsupported, match="w_down must have shape") as info:
        torch.compile(make_ffn(None), backend="eager", fullgraph=True)(logits, x, w_gu, bad_w_d)
    assert "ValueError" in repr(info.value.__cause__)
    torch._dynamo.reset()
    with pytest.raises(ValueError, match="w_down must have shape"):
        torch.compile(make_ffn(None), backend="eager")(logits, x, w_gu, bad_w_d)
