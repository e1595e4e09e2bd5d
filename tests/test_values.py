"""Values at the edges, on every backend available for CPU tensors, against the reference.

* topk_gating with NaN, +inf, -inf, all-equal and all -inf rows (fp32 and bf16 logits, softmax
  and sigmoid, with and without a correction bias -- NaN in it included -- and expert groups):
  the ids are the reference's, always k distinct experts in [0, E);
* top_k = 1 with renormalisation gives exactly 1.0 (bit for bit the reference's weights);
* every float dtype of topk_weights (fp32, bf16, fp16, fp64) on moe_ffn and unpermute, forward
  and backward (the weight gradient comes back in topk_weights' dtype);
* a dropped slot (id outside [0, E)) adds nothing whatever its weight (NaN, inf), and its weight
  gradient is 0;
* non-finite alpha / limit / routed_scaling_factor raise ValueError.

The shapes are tiny so that the same file runs under ``TRITON_INTERPRET=1`` (where the backend
list includes ``triton``).
"""

from __future__ import annotations

import pytest
import torch
from testutil import backends, device_of, randn

import moe_kernels as mk
from moe_kernels._tolerances import (
    GATING_TOL,
    ROUNDING_TOL,
    SAME_DTYPE_GRAD_TOL,
    SAME_DTYPE_TOL,
    max_rel_err,
)

# the inputs are CPU tensors: the backends that run on them (on a GPU machine the cuda and Triton
# backends take CUDA tensors; test_cuda_gpu.py checks these values there)
BACKENDS = [b for b in backends() if device_of(b) == "cpu"]
NAN, INF = float("nan"), float("inf")
T, E, H, I = 12, 8, 32, 16  # noqa: E741

# Tolerances (reasons in moe_kernels/_tolerances.py): outputs and gradients of the same tiny
# layer computed by a backend and the reference in the same dtype; gating weights.
TOL_OUT = SAME_DTYPE_TOL
TOL_GRAD = SAME_DTYPE_GRAD_TOL
TOL_WEIGHTS = GATING_TOL


def _special_logits(dtype: torch.dtype) -> torch.Tensor:
    """[T, E] logits: random rows and rows of NaN, +-inf, equal values and -inf."""
    x = randn(T, E, seed=11, dtype=torch.float32)
    x[1, 3] = NAN
    x[2, 5] = INF
    x[3, 1:3] = -INF
    x[4] = 0.5  # all equal
    x[5] = -INF  # all -inf
    x[6, 2], x[6, 6] = NAN, NAN
    x[7, 0], x[7, 7] = INF, -INF
    x[8, 1], x[8, 4], x[8, 6] = -INF, NAN, INF
    x[9] = NAN  # all NaN
    x[10, 4:] = x[10, :4]  # equal pairs
    x[11] = INF  # all +inf
    return x.to(dtype)


def _bias(kind: str) -> torch.Tensor | None:
    if kind == "none":
        return None
    b = randn(E, seed=12, scale=0.1)
    if kind == "nan":
        b[2] = NAN
        b[6] = INF
    return b


def _check_ids(ids: torch.Tensor, k: int) -> None:
    assert ids.dtype == torch.int32 and tuple(ids.shape) == (T, k)
    assert bool(((ids >= 0) & (ids < E)).all()), f"ids outside [0, {E}):\n{ids}"
    for row in ids.tolist():
        assert len(set(row)) == k, f"repeated id in a row: {row}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("bias", ["none", "finite", "nan"])
@pytest.mark.parametrize("groups", [(0, 0, 3), (4, 2, 3), (2, 1, 4), (0, 0, 1)])
def test_gating_special_values(backend, dtype, scoring, bias, groups):
    G, TG, k = groups
    logits = _special_logits(dtype)
    kwargs = dict(scoring=scoring, renormalize=True, correction_bias=_bias(bias))
    if G:
        kwargs.update(num_expert_groups=G, topk_groups=TG)
    w, ids = mk.topk_gating(logits, k, backend=backend, **kwargs)
    w_ref, ids_ref = mk.topk_gating(logits, k, backend="reference", **kwargs)
    _check_ids(ids, k)
    _check_ids(ids_ref, k)
    assert torch.equal(ids, ids_ref), f"ids differ from the reference's:\n{ids}\n{ids_ref}"
    assert w.dtype == torch.float32
    assert torch.equal(torch.isnan(w), torch.isnan(w_ref)), (w, w_ref)
    assert max_rel_err(w, w_ref) <= TOL_WEIGHTS


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_gating_top1_renormalised_is_exact(backend, scoring, scale):
    logits = randn(256, E, seed=13, scale=3.0)
    kwargs = dict(scoring=scoring, renormalize=True, routed_scaling_factor=scale)
    w, ids = mk.topk_gating(logits, 1, backend=backend, **kwargs)
    w_ref, ids_ref = mk.topk_gating(logits, 1, backend="reference", **kwargs)
    assert torch.equal(ids, ids_ref)
    assert torch.equal(w_ref, torch.full_like(w_ref, scale))
    assert torch.equal(w, w_ref), f"{int((w != w_ref).sum())} weights differ from {scale}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_gating_nonfinite_scale_raises(backend, bad):
    logits = randn(T, E, seed=14)
    with pytest.raises(ValueError, match="routed_scaling_factor"):
        mk.topk_gating(logits, 2, routed_scaling_factor=bad, backend=backend)


def _ffn_inputs(x_dtype: torch.dtype, w_dtype: torch.dtype, k: int = 3, seed: int = 20):
    x = randn(T, H, seed=seed, dtype=x_dtype)
    wgu = randn(E, 2 * I, H, seed=seed + 1, dtype=x_dtype, scale=H**-0.5)
    wd = randn(E, H, I, seed=seed + 2, dtype=x_dtype, scale=I**-0.5)
    ids = torch.randint(0, E, (T, k), generator=torch.Generator().manual_seed(seed + 3))
    ids = ids.to(torch.int32)
    tw = torch.rand(T, k, generator=torch.Generator().manual_seed(seed + 4)).to(w_dtype)
    return x, wgu, wd, tw, ids


W_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
W_IDS = ["w32", "wbf16", "wfp16", "wfp64"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=["x32", "xbf16"])
@pytest.mark.parametrize("w_dtype", W_DTYPES, ids=W_IDS)
def test_moe_ffn_topk_weights_dtypes(backend, x_dtype, w_dtype):
    x, wgu, wd, tw, ids = _ffn_inputs(x_dtype, w_dtype)
    tw.requires_grad_(True)
    x.requires_grad_(True)
    out = mk.moe_ffn(x, wgu, wd, tw, ids, backend=backend)
    assert out.dtype == x_dtype
    g = randn(T, H, seed=30, dtype=x_dtype)
    gx, gw = torch.autograd.grad(out, (x, tw), g)
    assert gw.dtype == w_dtype

    tw_ref = tw.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    ref = mk.moe_ffn(x_ref, wgu, wd, tw_ref, ids, backend="reference")
    gx_ref, gw_ref = torch.autograd.grad(ref, (x_ref, tw_ref), g)
    tol = TOL_OUT[x_dtype]
    assert max_rel_err(out, ref) <= tol
    assert max_rel_err(gx, gx_ref) <= TOL_GRAD[x_dtype]
    # the weight gradient is an H-term dot product rounded to topk_weights' dtype
    tol_w = max(tol, ROUNDING_TOL.get(w_dtype, 0.0))
    assert max_rel_err(gw, gw_ref) <= tol_w


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("w_dtype", W_DTYPES, ids=W_IDS)
def test_unpermute_topk_weights_dtypes(backend, w_dtype):
    _, _, _, tw, ids = _ffn_inputs(torch.float32, w_dtype)
    plan = mk.route(ids, E, backend=backend)
    y = randn(plan.num_rows, H, seed=31).requires_grad_(True)
    tw.requires_grad_(True)
    out = mk.unpermute(y, plan, tw, backend=backend)
    g = randn(T, H, seed=32)
    gy, gw = torch.autograd.grad(out, (y, tw), g)
    assert out.dtype == torch.float32 and gw.dtype == w_dtype

    y_ref = y.detach().clone().requires_grad_(True)
    tw_ref = tw.detach().clone().requires_grad_(True)
    ref = mk.unpermute(y_ref, plan, tw_ref, backend="reference")
    gy_ref, gw_ref = torch.autograd.grad(ref, (y_ref, tw_ref), g)
    # fp64 weights: the reference sums in fp64, the kernels in fp32 (k = 3 terms)
    assert max_rel_err(out, ref) <= TOL_OUT[torch.float32]
    assert max_rel_err(gy, gy_ref) <= TOL_OUT[torch.float32]
    tol_w = ROUNDING_TOL.get(w_dtype, TOL_OUT[torch.float32])
    assert max_rel_err(gw, gw_ref) <= tol_w


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad_weight", [NAN, INF])
def test_dropped_slot_adds_nothing(backend, bad_weight):
    x, wgu, wd, tw, ids = _ffn_inputs(torch.float32, torch.float32, seed=40)
    ids[0, 1] = -1
    ids[3, 0] = E  # another rank's expert
    ids[5, 2] = -7
    for t, s in ((0, 1), (3, 0), (5, 2)):
        tw[t, s] = bad_weight
    tw.requires_grad_(True)
    out = mk.moe_ffn(x, wgu, wd, tw, ids, backend=backend)
    assert not torch.isnan(out).any() and bool(torch.isfinite(out).all())
    (gw,) = torch.autograd.grad(out, (tw,), randn(T, H, seed=41))
    for t, s in ((0, 1), (3, 0), (5, 2)):
        assert gw[t, s].item() == 0.0
    tw_ref = tw.detach().clone()
    ref = mk.moe_ffn(x, wgu, wd, tw_ref, ids, backend="reference")
    assert max_rel_err(out, ref) <= TOL_OUT[torch.float32]

    plan = mk.route(ids, E, backend=backend)
    y = randn(plan.num_rows, H, seed=42)
    u = mk.unpermute(y, plan, tw.detach(), backend=backend)
    u_ref = mk.unpermute(y, plan, tw.detach(), backend="reference")
    assert bool(torch.isfinite(u).all())
    assert max_rel_err(u, u_ref) <= TOL_OUT[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["alpha", "limit"])
@pytest.mark.parametrize("bad", [NAN, INF, -INF])
@pytest.mark.parametrize("activation", ["swiglu_oai", "swiglu"])
def test_moe_ffn_nonfinite_params_raise(backend, name, bad, activation):
    x, wgu, wd, tw, ids = _ffn_inputs(torch.float32, torch.float32, seed=50)
    with pytest.raises(ValueError, match=name):
        mk.moe_ffn(x, wgu, wd, tw, ids, activation=activation, backend=backend, **{name: bad})


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend is not available")
def test_cpu_ops_check_finite_params():
    """The public moe_ffn runs the cpu op before its Python checks: the op itself must raise."""
    x, wgu, wd, tw, ids = _ffn_inputs(torch.float32, torch.float32, seed=60)
    ops = torch.ops.moe_kernels
    for alpha, limit in ((NAN, 7.0), (1.702, INF), (1.702, NAN)):
        with pytest.raises(ValueError):
            ops.moe_ffn(x, wgu, wd, tw, ids, None, None, "swiglu_oai", alpha, limit, False)
        g = randn(T, H, seed=61)
        args = (None, None, "swiglu", alpha, limit, False)
        with pytest.raises(ValueError):
            ops.moe_ffn_backward(g, x, wgu, wd, tw, ids, *args)
    logits = randn(T, E, seed=62)
    with pytest.raises(ValueError):
        ops.topk_gating(logits, 2, "softmax", True, None, 0, 0, NAN)
    with pytest.raises(ValueError):
        ops.topk_gating_backward(
            torch.ones(T, 2), logits, torch.zeros(T, 2, dtype=torch.int32), "softmax", True, INF
        )
