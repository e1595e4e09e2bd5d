"""The error metric and every tolerance of the package, with the reason for each size.

Used by the tests (every backend against the reference) and by ``moe-bench``'s error column (the
installed CLI cannot import ``tests/``), so that one number serves both.

The metric is :func:`max_rel_err`, ``max |actual - expected| / max |expected|`` in float64: an
error relative to the output's scale, which is what a rounding error of a sum of products is
proportional to.
"""

from __future__ import annotations

import torch

__all__ = [
    "FFN_TOL",
    "FP32_AGREE",
    "FP32_AGREE_GRAD",
    "GATING_TOL",
    "GRAD_FACTOR",
    "KERNEL_TOL",
    "ROUNDING_TOL",
    "SAME_DTYPE_GRAD_TOL",
    "SAME_DTYPE_TOL",
    "GPU_FP32_TOL",
    "LAYER_TOL",
    "TOL",
    "TWO_X_FLOOR",
    "UNIT_ROUNDOFF",
    "max_rel_err",
    "within_2x",
]

# Every tolerance below is a bound on ``max_rel_err(actual, exact)``: the error relative to the
# output's largest value.  The sizes follow from the unit roundoff u of the dtype (half its
# machine epsilon), the accumulation length of the op and the error of the reference itself.

#: unit roundoff u (eps / 2) of each floating dtype
UNIT_ROUNDOFF = {
    dt: torch.finfo(dt).eps / 2
    for dt in (torch.float64, torch.float32, torch.bfloat16, torch.float16)
}

#: one op (a GEMM row, a weighted sum of k slots, an activation) in ``dtype`` against the exact
#: (float64) result, for the test shapes (reductions of at most ~300 terms):
#:
#: * float64: a sum of n <= 300 products has error <= n u = 3e-14 in the worst case; 1e-12 keeps a
#:   30x margin for the naive loops, which round differently;
#: * float32: the worst case n u over 300 terms is 2e-5; blocked sums stay far below it;
#: * float16 (u = 4.9e-4): the inputs and output are rounded to fp16 (accumulation is fp32), so
#:   about 3 u from the rounding of inputs, intermediate and output, x2 margin: 3e-3;
#: * bfloat16 (u = 3.9e-3): the same 3 roundings, x2 margin: 2e-2.
TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}

#: the fused expert FFN (two chained GEMMs with an activation between them, whose intermediate is
#: rounded to ``dtype``), against the exact result: the error of GEMM 1 is amplified by the
#: activation's slope (up to ~2 for SwiGLU / GeGLU / gpt-oss's clamped variant) and summed again
#: by GEMM 2, and the output's largest value can be several times below the intermediate's.
#: float64 / float32: 10x the single-op :data:`TOL`; bfloat16 / float16: ~8 u (3e-2 / 4e-3),
#: where the rounding of the intermediate and the output dominate (the reference measures ~1 u
#: against the float64 loops on the test shapes).  Two independent computations of the same layer
#: (a backend and the reference, both in ``dtype``) are at most 2x this apart.
FFN_TOL = {torch.float64: 1e-11, torch.float32: 2e-4, torch.bfloat16: 3e-2, torch.float16: 4e-3}

#: two fp32 computations of the same small layer or graph that differ only in the order of their
#: sums (eager against compiled, the fused layer against a naive loop, a model's experts against
#: Hugging Face's eager ones): each within a few u of the exact result over sums of <= ~64 terms
#: (64 u = 4e-6); 1e-5 keeps a 2.5x margin.
FP32_AGREE = 1e-5

#: the same for gradients: the weight gradients sum over every token and both GEMMs (two chained
#: reductions of T k and H terms, a few hundred in the tests), 10x the forward's.
FP32_AGREE_GRAD = 1e-4

#: gating weights: softmax / sigmoid in fp32 whatever the logits' dtype; a softmax normalises by
#: a sum over E <= 384 exponentials whose error grows like log2(E) u in a pairwise or vectorised
#: sum (9 u = 5e-7); 2e-6 keeps a 4x margin for the renormalisation's extra division.
GATING_TOL = 2e-6

#: fp32 on a GPU: the Triton and CUDA GEMMs use TF32 tensor cores (10-bit mantissa, u = 4.9e-4)
#: unless full fp32 is asked for; about 10 u over the test reductions.
GPU_FP32_TOL = 5e-3

#: the smallest error scale the "2x PyTorch's own error" rule (:func:`within_2x`) is applied at,
#: per dtype: below it both errors are the output's own rounding (a few u) and their ratio is
#: noise.  float32: 2e-6 (~30 u); bfloat16: 4e-3 (~1 u); float16: 5e-4 (~1 u).
TWO_X_FLOOR = {torch.float32: 2e-6, torch.bfloat16: 4e-3, torch.float16: 5e-4}

#: the fixed form of the 2x rule, for kernels checked against float64 alone (the Triton kernels'
#: GPU tests, and the fused FFN of backends that do not meet the 2x rule in bf16 / fp16): about
#: twice PyTorch's own error in that dtype -- fp32: a few u over <= 64-term reductions; fp16 /
#: bf16: the rounding of the inputs, the intermediate and the output (~3 u: 1.5e-3 / 1.2e-2)
#: x ~2.5.  Gradients chain two products (the output gradient times a weight, then a reduction
#: over rows), so they get :data:`GRAD_FACTOR` times this.  fp32 on a GPU: :data:`GPU_FP32_TOL`.
KERNEL_TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
GRAD_FACTOR = 2

#: ``moe-bench``'s error column: a whole MoE layer (gating + two chained GEMMs of model size,
#: K = H or I in the thousands) in ``dtype`` against the reference in the same dtype.  The
#: reference's own error is of the same size as the backend's, so the bound is about twice
#: :data:`FFN_TOL` scaled for reductions ~10x longer than the tests' (errors of blocked fp32
#: sums grow like sqrt(K) in practice): float32 1e-4, float16 1e-2, bfloat16 5e-2.
LAYER_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


#: a tiny layer (H = 32, I = 16, a few tokens, as in tests/test_values.py) run by a backend and by
#: the reference in the same dtype.  float32: both sum H- and I-term fp32 products in different
#: orders, plus the activation's exp: a few u (1.2e-7 each) times the terms, 2e-5 as :data:`TOL`;
#: bfloat16: both round the output (and the intermediate) at the same points, so they differ by at
#: most one bf16 ulp of the largest value, 2 u = 7.8e-3 -> 8e-3.
SAME_DTYPE_TOL = {torch.float32: 2e-5, torch.bfloat16: 8e-3}

#: gradients of that layer: with bf16 inputs a backend may round the activation's gradient to
#: bf16 (the GEMM's operand dtype) before the product with ``w_gate_up``, while the reference
#: keeps it in fp32: two chained bf16 roundings through an I-term sum, as :data:`KERNEL_TOL`.
SAME_DTYPE_GRAD_TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}

#: a value computed in fp32 and rounded once to ``dtype`` (a weight gradient returned in
#: ``topk_weights``' dtype): 2 u of that dtype (bf16 7.8e-3, fp16 9.8e-4), rounded up.
ROUNDING_TOL = {torch.bfloat16: 8e-3, torch.float16: 1e-3}


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max |actual - expected| / max |expected|`` in float64.

    0.0 for empty tensors; ``inf`` when the shapes differ or ``actual`` holds a NaN where
    ``expected`` does not (a NaN never passes a tolerance); the absolute error when ``expected``
    is all zeros.
    """
    if tuple(actual.shape) != tuple(expected.shape):
        return float("inf")
    if expected.numel() == 0:
        return 0.0
    a = actual.detach().to(device="cpu", dtype=torch.float64)
    e = expected.detach().to(device="cpu", dtype=torch.float64)
    if bool((torch.isnan(a) & ~torch.isnan(e)).any()):
        return float("inf")
    both_nan = torch.isnan(a) & torch.isnan(e)
    diff = (a - e).abs().masked_fill(both_nan, 0.0)
    scale = e.abs().masked_fill(torch.isnan(e), 0.0).max()
    d, s = float(diff.max()), float(scale)
    return d / s if s > 0 else d


def within_2x(
    actual: torch.Tensor,
    torch_same_dtype: torch.Tensor,
    exact: torch.Tensor,
    floor: float,
) -> tuple[bool, float, float]:
    """The "2x PyTorch's own error" rule: ``actual``'s error against ``exact`` (float64) is at most
    twice the error PyTorch makes computing the same thing in the same dtype
    (``torch_same_dtype``, usually the reference backend run on the low-precision inputs), or
    ``floor`` where that error is below the noise of the output's rounding.

    Returns ``(ok, actual's error, PyTorch's error)``.
    """
    e_actual = max_rel_err(actual, exact)
    e_torch = max_rel_err(torch_same_dtype, exact)
    return e_actual <= 2 * max(e_torch, floor), e_actual, e_torch
