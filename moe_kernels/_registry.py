"""Registration of every moe_kernels operator with torch.library.

* loads the compiled extensions (``moe_kernels._C``: CPU kernels; ``moe_kernels._C_cuda``: CUDA
  kernels) if they were built, remembering why not otherwise;
* defines every op schema from :mod:`moe_kernels._schemas` (their one source): the compiled family
  ``moe_kernels::X`` (the dispatcher checks the C++ kernels' signatures against it: a mismatch
  raises RuntimeError at import), then the Python-implemented families
  ``moe_kernels::X_reference`` (:mod:`moe_kernels.reference`) and ``moe_kernels::X_triton``
  (:mod:`moe_kernels.triton_kernels.ops`);
* registers one fake (meta) kernel per op for every family, and autograd for every forward op
  (its backward calls the ``X_backward`` op of the same family).
"""

from __future__ import annotations

import importlib

import torch

from . import reference
from ._schemas import PY_SUFFIXES, SCHEMAS, schema
from .plan import num_rows

FORWARD_OPS = ("topk_gating", "route", "permute", "unpermute", "grouped_gemm", "moe_ffn")

_lib = torch.library.Library("moe_kernels", "FRAGMENT")
_ext_errors: dict[str, str | None] = {}
_triton_impls: dict = {}
_triton_status: tuple[bool, str] = (False, "not loaded")


def extension_error(name: str) -> str | None:
    """Why the compiled extension ``moe_kernels.<name>`` is not loaded (None if it is)."""
    return _ext_errors.get(name, "not built")


def triton_impls() -> dict:
    return _triton_impls


def triton_status() -> tuple[bool, str]:
    return _triton_status


def _load_extension(name: str) -> None:
    try:
        importlib.import_module(f"moe_kernels.{name}")
        _ext_errors[name] = None
    except ImportError as exc:  # not built, or built against another torch
        _ext_errors[name] = f"{type(exc).__name__}: {exc}"


def _load_triton() -> None:
    global _triton_impls, _triton_status
    try:
        from .triton_kernels import ops as triton_ops
    except Exception as exc:  # no triton, or one this code cannot use: the package still imports
        _triton_status = (
            False,
            f"the Triton kernels could not be imported: {type(exc).__name__}: {exc}",
        )
        return
    _triton_impls = dict(getattr(triton_ops, "IMPLS", {}))
    status = getattr(triton_ops, "available", None)
    _triton_status = status() if status else (True, "Triton kernels")
    if not _triton_impls:
        _triton_status = (False, "no Triton kernels are registered in this version")


# --------------------------------------------------------------------------------------------------
# fake kernels (shapes only); shared by every family. Outputs are contiguous in every backend.
# --------------------------------------------------------------------------------------------------


def _none(t: torch.Tensor) -> torch.Tensor:
    return t.new_empty(0)


def _fake_topk_gating(
    router_logits,
    top_k,
    scoring,
    renormalize,
    correction_bias,
    num_expert_groups,
    topk_groups,
    routed_scaling_factor,
):
    T = router_logits.shape[0]
    wdt = torch.float64 if router_logits.dtype == torch.float64 else torch.float32
    return (
        router_logits.new_empty(T, top_k, dtype=wdt),
        router_logits.new_empty(T, top_k, dtype=torch.int32),
    )


def _fake_topk_gating_backward(
    grad_weights, router_logits, topk_ids, scoring, renormalize, routed_scaling_factor
):
    return router_logits.new_empty(router_logits.shape)


def _fake_route(topk_ids, num_experts, block_size):
    T, k = topk_ids.shape
    rows = num_rows(T * k, num_experts, block_size)
    i32 = dict(dtype=torch.int32)
    return (
        topk_ids.new_empty(num_experts, **i32),
        topk_ids.new_empty(num_experts, **i32),
        topk_ids.new_empty(T, k, **i32),
        topk_ids.new_empty(rows, **i32),
        topk_ids.new_empty(rows // block_size if block_size > 0 else 0, **i32),
    )


def _fake_permute(x, row_of_slot, slot_of_row):
    return x.new_empty(slot_of_row.shape[0], x.shape[1])


def _fake_unpermute(y, row_of_slot, slot_of_row, topk_weights):
    return y.new_empty(row_of_slot.shape[0], y.shape[1])


def _fake_unpermute_backward(
    grad_out, y, row_of_slot, slot_of_row, topk_weights, need_grad_y, need_grad_weights
):
    gy = y.new_empty(y.shape) if need_grad_y else _none(y)
    if need_grad_weights and topk_weights is not None:
        gw = topk_weights.new_empty(topk_weights.shape)
    else:
        gw = _none(grad_out if topk_weights is None else topk_weights)
    return gy, gw


def _fake_grouped_gemm(a, b, offs, trans_b):
    return a.new_empty(a.shape[0], b.shape[1] if trans_b else b.shape[2])


def _fake_grouped_gemm_backward(grad_out, a, b, offs, trans_b, need_grad_a, need_grad_b):
    return (
        a.new_empty(a.shape) if need_grad_a else _none(a),
        b.new_empty(b.shape) if need_grad_b else _none(b),
    )


def _one_device(*tensors) -> None:
    # A call mixing real tensors with meta ones dispatches to the fake kernel: refuse it as the
    # real kernels refuse mixed devices (moe_ffn's public function relies on it, see call_op).
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        names = ", ".join(sorted(str(d) for d in devices))
        raise ValueError(f"moe_kernels: all tensors must share a device, got {names}")


def _fake_moe_ffn(
    x,
    w_gate_up,
    w_down,
    topk_weights,
    topk_ids,
    gate_up_bias,
    down_bias,
    activation,
    alpha,
    limit,
    interleaved,
):
    _one_device(x, w_gate_up, w_down, topk_weights, topk_ids, gate_up_bias, down_bias)
    return x.new_empty(x.shape[0], w_down.shape[1])


def _fake_moe_ffn_backward(
    grad_out,
    x,
    w_gate_up,
    w_down,
    topk_weights,
    topk_ids,
    gate_up_bias,
    down_bias,
    activation,
    alpha,
    limit,
    interleaved,
):
    _one_device(grad_out, x, w_gate_up, w_down, topk_weights, topk_ids, gate_up_bias, down_bias)
    outs = [x, w_gate_up, w_down, topk_weights, gate_up_bias, down_bias]
    return tuple(_none(x) if t is None else t.new_empty(t.shape) for t in outs)


def _fake_moe_ffn_train(x, w_gate_up, w_down, topk_weights, topk_ids, *rest):
    out = _fake_moe_ffn(x, w_gate_up, w_down, topk_weights, topk_ids, *rest)
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    return out, x.new_empty(topk_ids.shape[0] * topk_ids.shape[1], w_gate_up.shape[1], dtype=dt)


def _fake_moe_ffn_backward_saved(grad_out, pre, *args):
    _one_device(grad_out, pre)
    return _fake_moe_ffn_backward(grad_out, *args)


_FAKES = {
    "topk_gating": _fake_topk_gating,
    "topk_gating_backward": _fake_topk_gating_backward,
    "route": _fake_route,
    "permute": _fake_permute,
    "unpermute": _fake_unpermute,
    "unpermute_backward": _fake_unpermute_backward,
    "grouped_gemm": _fake_grouped_gemm,
    "grouped_gemm_backward": _fake_grouped_gemm_backward,
    "moe_ffn": _fake_moe_ffn,
    "moe_ffn_backward": _fake_moe_ffn_backward,
    "moe_ffn_train": _fake_moe_ffn_train,
    "moe_ffn_backward_saved": _fake_moe_ffn_backward_saved,
}


# --------------------------------------------------------------------------------------------------
# autograd: one formula per op, parametrised by the family's backward ops.
# --------------------------------------------------------------------------------------------------


def _register_autograd(suffix: str) -> None:
    ns = torch.ops.moe_kernels

    def op(name):
        return getattr(ns, name + suffix)

    # topk_gating: only the weights are differentiable; the ids and the bias (selection only)
    # are constants.
    def gating_setup(ctx, inputs, output):
        logits, _, scoring, renormalize, _, _, _, scale = inputs
        ctx.save_for_backward(logits, output[1])
        ctx.args = (scoring, renormalize, scale)

    def gating_backward(ctx, grad_weights, _grad_ids):
        logits, ids = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0] and grad_weights is not None:
            grad = op("topk_gating_backward")(grad_weights, logits, ids, *ctx.args)
        return grad, None, None, None, None, None, None, None

    def permute_setup(ctx, inputs, output):
        _, row_of_slot, slot_of_row = inputs
        ctx.save_for_backward(row_of_slot, slot_of_row)

    def permute_backward(ctx, grad):
        row_of_slot, slot_of_row = ctx.saved_tensors
        gx = (
            op("unpermute")(grad, row_of_slot, slot_of_row, None)
            if ctx.needs_input_grad[0]
            else None
        )
        return gx, None, None

    def unpermute_setup(ctx, inputs, output):
        y, row_of_slot, slot_of_row, w = inputs
        ctx.has_w = w is not None
        ctx.save_for_backward(y, row_of_slot, slot_of_row, w)

    def unpermute_backward(ctx, grad):
        y, row_of_slot, slot_of_row, w = ctx.saved_tensors
        need_y = ctx.needs_input_grad[0]
        need_w = ctx.has_w and ctx.needs_input_grad[3]
        gy, gw = op("unpermute_backward")(grad, y, row_of_slot, slot_of_row, w, need_y, need_w)
        return (gy if need_y else None), None, None, (gw if need_w else None)

    def gemm_setup(ctx, inputs, output):
        a, b, offs, trans_b = inputs
        ctx.trans_b = trans_b
        ctx.save_for_backward(a, b, offs)

    def gemm_backward(ctx, grad):
        a, b, offs = ctx.saved_tensors
        na, nb = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ga, gb = op("grouped_gemm_backward")(grad, a, b, offs, ctx.trans_b, na, nb)
        return (ga if na else None), (gb if nb else None), None, None

    def ffn_setup(ctx, inputs, output):
        ctx.args = inputs[7:]
        ctx.has_bias = (inputs[5] is not None, inputs[6] is not None)
        ctx.save_for_backward(*inputs[:7])

    def ffn_backward(ctx, grad):
        saved = ctx.saved_tensors
        grads = op("moe_ffn_backward")(grad, *saved, *ctx.args)
        return ffn_grads(ctx, grads)

    # moe_ffn_train: its pre-activation output is kept for the backward (not differentiable)
    def ffn_train_setup(ctx, inputs, output):
        ctx.args = inputs[7:]
        ctx.has_bias = (inputs[5] is not None, inputs[6] is not None)
        ctx.save_for_backward(*inputs[:7], output[1])
        ctx.mark_non_differentiable(output[1])

    def ffn_train_backward(ctx, grad, _grad_pre):
        *saved, pre = ctx.saved_tensors
        if grad is None:  # the output was not used
            return (None,) * 11
        grads = op("moe_ffn_backward_saved")(grad, pre, *saved, *ctx.args)
        return ffn_grads(ctx, grads)

    def ffn_grads(ctx, grads):
        need = ctx.needs_input_grad
        gx, gwgu, gwd, gtw, gbgu, gbd = grads
        return (
            gx if need[0] else None,
            gwgu if need[1] else None,
            gwd if need[2] else None,
            gtw if need[3] else None,
            None,
            gbgu if ctx.has_bias[0] and need[5] else None,
            gbd if ctx.has_bias[1] and need[6] else None,
            None,
            None,
            None,
            None,
        )

    table = {
        "topk_gating": (gating_backward, gating_setup),
        "permute": (permute_backward, permute_setup),
        "unpermute": (unpermute_backward, unpermute_setup),
        "grouped_gemm": (gemm_backward, gemm_setup),
        "moe_ffn": (ffn_backward, ffn_setup),
        "moe_ffn_train": (ffn_train_backward, ffn_train_setup),
    }
    for name, (backward, setup) in table.items():
        torch.library.register_autograd(
            f"moe_kernels::{name}{suffix}", backward, setup_context=setup, lib=_lib
        )


def _with_train_ops(impls: dict) -> dict:
    """``impls`` with moe_ffn_train / moe_ffn_backward_saved made of its moe_ffn and
    moe_ffn_backward where it has none: ``pre`` computed as the reference does, and the backward
    re-running GEMM 1 (the same gradients as from moe_ffn_train's ``pre``).  The public functions
    take these ops only on backends whose kernels keep the activations (``cpu``)."""
    out = dict(impls)
    ffn, bwd = impls.get("moe_ffn"), impls.get("moe_ffn_backward")
    if ffn is not None and "moe_ffn_train" not in impls:

        def train(*args):
            return ffn(*args), reference.moe_ffn_pre(*args)

        out["moe_ffn_train"] = train
    if bwd is not None and "moe_ffn_backward_saved" not in impls:

        def backward_saved(grad_out, pre, *args):
            return bwd(grad_out, *args)

        out["moe_ffn_backward_saved"] = backward_saved
    return out


def _register_family(suffix: str, impls: dict) -> None:
    for name in SCHEMAS:
        _lib.define(schema(name, suffix))
        if name in impls:
            _lib.impl(name + suffix, impls[name], "CompositeExplicitAutograd")


def _register_all() -> None:
    # The compiled family's schemas come from _schemas.py like every other family's (no C++
    # copy). The extensions register their kernels when they load, before the schemas exist;
    # defining a schema then checks the C++ kernels' inferred signatures against it and raises
    # RuntimeError on a mismatch. (The other order would abort the process: the check would run
    # in the library's static initialisers, where an exception cannot be caught.) Without an
    # extension the op names still exist (no kernels: the cpu/cuda backends report unavailable).
    _load_extension("_C")
    _load_extension("_C_cuda")
    for name in SCHEMAS:
        _lib.define(schema(name))
    _register_family(PY_SUFFIXES["reference"], {name: getattr(reference, name) for name in SCHEMAS})
    _load_triton()
    _register_family(PY_SUFFIXES["triton"], _with_train_ops(_triton_impls))
    for suffix in ("", *PY_SUFFIXES.values()):
        for name, fake in _FAKES.items():
            torch.library.register_fake(f"moe_kernels::{name}{suffix}", fake, lib=_lib)
        _register_autograd(suffix)


_register_all()
