"""Launchers of the fused expert FFN (forward and backward).

Forward: the routing plan (``route`` padded to the GEMM's row tile), GEMM 1 gathering the token
rows and applying the gated activation in its epilogue, GEMM 2 applying the routing weight in its
epilogue (fp32 rows), then the fp32 sum of each token's k rows in slot order.

Backward recomputes GEMM 1 (pre-activation, fp32) and GEMM 2 (unweighted) with the same launch
helpers, then runs the data and weight gradients through the same grouped and ragged-K GEMMs.
"""

from __future__ import annotations

import torch
import triton

from . import _config, _gemm, _permute
from .ops_common import (
    _alloc,
    _b_view,
    _check_float,
    _check_same_dtype,
    _ctx,
    _empty,
    _family,
    _launch_mm,
    _launch_ragged_k,
    _row_block,
)
from .ops_permute import _permute_rows, _slot_dot, _unpermute_rows
from .ops_routing import route


def _check_ffn(x, w_gate_up, w_down, topk_weights, topk_ids, gate_up_bias, down_bias, activation):
    if x.dim() != 2 or w_gate_up.dim() != 3 or w_down.dim() != 3:
        raise ValueError("moe_ffn: x must be [T, H], w_gate_up [E, 2I, H], w_down [E, H, I]")
    _check_float("x", x)
    _check_same_dtype(
        "x, w_gate_up, w_down, gate_up_bias, down_bias",
        x,
        w_gate_up,
        w_down,
        gate_up_bias,
        down_bias,
    )
    if activation not in _gemm.ACTIVATIONS:
        raise ValueError(
            f"activation must be one of {sorted(_gemm.ACTIVATIONS)}, got {activation!r}"
        )
    E, two_i, H = w_gate_up.shape
    if two_i % 2 != 0 or tuple(w_down.shape) != (E, H, two_i // 2) or x.shape[1] != H:
        raise ValueError(
            f"moe_ffn: inconsistent shapes x {tuple(x.shape)}, w_gate_up "
            f"{tuple(w_gate_up.shape)}, w_down {tuple(w_down.shape)}"
        )
    if topk_weights.shape != topk_ids.shape or topk_ids.shape[0] != x.shape[0]:
        raise ValueError("moe_ffn: topk_weights and topk_ids must both be [T, k]")


class _FfnPlan:
    """Shapes, configurations and the padded routing plan shared by forward and backward."""

    def __init__(self, x, w_gate_up, w_down, topk_ids, activation, interleaved):
        self.T, self.H = x.shape
        self.E, two_i, _ = w_gate_up.shape
        self.I = two_i // 2
        self.k = topk_ids.shape[1]
        fam, dt = _family(x), _config.DTYPE_NAMES[x.dtype]
        avg = self.T * self.k / max(self.E, 1)
        self.glu_cfg = _config.lookup("glu", fam, dt, avg, self.I, self.H)
        bm = self.glu_cfg.BLOCK_M
        self.down_cfg = _config.lookup("down", fam, dt, avg, self.H, self.I).with_block_m(bm)
        self.up_cfg = _config.lookup("down", fam, dt, avg, two_i, self.H).with_block_m(bm)
        self.dx_cfg = _config.lookup("down", fam, dt, avg, self.H, two_i).with_block_m(bm)
        self.da_cfg = _config.lookup("down", fam, dt, avg, self.I, self.H).with_block_m(bm)
        self.rk_cfg = _config.lookup("ragged_k", fam, dt, avg, self.H, self.I)
        (self.counts, self.offs, self.row_of_slot, self.slot_of_row, self.block_expert) = route(
            topk_ids, self.E, bm
        )
        self.num_rows = self.slot_of_row.shape[0]
        self.act = _gemm.ACTIVATIONS[activation]
        self.col_mult, self.up_offset = (2, 1) if interleaved else (1, self.I)


def _routed_mm(p: _FfnPlan, a, b_view, out, cfg, **epilogue):
    """``out = epilogue(A @ B[e])`` over the padded routing plan (one expert per row tile)."""
    return _launch_mm(
        a,
        b_view,
        out,
        block_expert=p.block_expert,
        slot=p.slot_of_row,
        top_k=p.k,
        cfg=cfg,
        padded=True,
        E=p.E,
        **epilogue,
    )


def _gemm1(p: _FfnPlan, x, w_gate_up, gate_up_bias, out, *, fused_act, alpha=1.0, limit=0.0):
    """GEMM 1 on the token rows gathered through the plan: ``x W_gu^T + b_gu``.

    ``fused_act``: the gated activation in the epilogue, ``out`` [rows, I] (each output column
    reads its gate and up columns); otherwise the pre-activation ``out`` [rows, 2I]."""
    view = _b_view(w_gate_up, trans_b=True)
    if not fused_act:
        return _routed_mm(p, x, view, out, p.up_cfg, bias=gate_up_bias, gather=True)
    return _routed_mm(
        p,
        x,
        view._replace(N=p.I),
        out,
        p.glu_cfg,
        bias=gate_up_bias,
        gather=True,
        act=p.act,
        up_offset=p.up_offset,
        col_mult=p.col_mult,
        alpha=alpha,
        limit=limit,
    )


def _gemm2(p: _FfnPlan, act, w_down, down_bias, out, w_flat=None):
    """GEMM 2 on the activation rows: ``act W_d^T + b_d``, times the slot's routing weight when
    ``w_flat`` is given; ``out`` [rows, H] fp32."""
    return _routed_mm(
        p,
        act,
        _b_view(w_down, trans_b=True),
        out,
        p.down_cfg,
        w=w_flat,
        bias=down_bias,
        gather=False,
    )


def _glu(p: _FfnPlan, h, da, out, *, backward, alpha, limit):
    """The gated activation of the fp32 pre-activation ``h`` [rows, 2I] (forward: ``out`` [rows, I]
    = act(h)) or its backward (``out`` [rows, 2I] = act'(h) ``da``)."""
    br, bi = _row_block(p.I)
    with _ctx(h):
        _gemm.glu_kernel[(triton.cdiv(p.num_rows, br), triton.cdiv(p.I, bi))](
            h,
            da if backward else h,
            out,
            p.num_rows,
            p.I,
            h.stride(0),
            da.stride(0) if backward else 0,
            out.stride(0),
            p.up_offset,
            p.col_mult,
            float(alpha),
            float(limit),
            ACT=p.act,
            BACKWARD=backward,
            BLOCK_R=br,
            BLOCK_I=bi,
            num_warps=4,
        )
    return out


def _segment_sum(p: _FfnPlan, src, w_flat, out, *, gather):
    """Per-expert bias gradient ``out[e] = sum of src over expert e's rows``; ``gather``: ``src``
    is [T, N] in token order, each row read through the plan and times its slot's weight."""
    n = out.shape[1]
    bn = min(triton.next_power_of_2(n), 128)
    with _ctx(src):
        _permute.segment_sum_kernel[(p.E, triton.cdiv(n, bn))](
            src,
            p.offs,
            p.slot_of_row,
            w_flat,
            out,
            n,
            p.k,
            src.stride(0),
            src.stride(1),
            out.stride(0),
            GATHER=gather,
            BLOCK_R=32,
            BLOCK_N=bn,
            num_warps=4,
        )
    return out


def moe_ffn(
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
    _check_ffn(x, w_gate_up, w_down, topk_weights, topk_ids, gate_up_bias, down_bias, activation)
    T, H = x.shape
    if T == 0 or topk_ids.shape[1] == 0:
        return torch.zeros((T, H), dtype=x.dtype, device=x.device)
    p = _FfnPlan(x, w_gate_up, w_down, topk_ids, activation, interleaved)
    w_flat = topk_weights.contiguous().view(-1)
    act = _alloc((p.num_rows, p.I), x.dtype, x.device)
    _gemm1(p, x, w_gate_up, gate_up_bias, act, fused_act=True, alpha=alpha, limit=limit)
    y = _alloc((p.num_rows, H), torch.float32, x.device)
    _gemm2(p, act, w_down, down_bias, y, w_flat)
    return _unpermute_rows(y, p.row_of_slot, None, x.dtype)


def moe_ffn_backward(
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
    _check_ffn(x, w_gate_up, w_down, topk_weights, topk_ids, gate_up_bias, down_bias, activation)
    T, H = x.shape
    dev = x.device
    if T == 0 or topk_ids.shape[1] == 0:
        # nothing routed: zero gradients, contiguous like every other output of this op
        def zeros(t):
            return (
                _empty(x) if t is None else torch.zeros(tuple(t.shape), dtype=t.dtype, device=dev)
            )

        return tuple(
            zeros(t) for t in (x, w_gate_up, w_down, topk_weights, gate_up_bias, down_bias)
        )
    p = _FfnPlan(x, w_gate_up, w_down, topk_ids, activation, interleaved)
    mdt = x.dtype  # dtype of the re-materialised activations fed to the tensor cores
    g = grad_out.to(x.dtype).contiguous()
    w_flat = topk_weights.contiguous().view(-1)
    two_i = 2 * p.I
    # recompute h = x W_gu^T + b (pre-activation, fp32), act(h), y = act W_d^T + b_d (unweighted)
    h = _alloc((p.num_rows, two_i), torch.float32, dev)
    _gemm1(p, x, w_gate_up, gate_up_bias, h, fused_act=False)
    act = _glu(
        p, h, None, _alloc((p.num_rows, p.I), mdt, dev), backward=False, alpha=alpha, limit=limit
    )
    y = _gemm2(p, act, w_down, down_bias, _alloc((p.num_rows, H), torch.float32, dev))
    # d(topk_weights)[t, s] = <grad_out[t], y[row(t, s)]>; dy[r] = w[slot] grad_out[token]
    grad_tw = _slot_dot(g, y, p.row_of_slot, topk_weights.dtype)
    dy = _permute_rows(g, p.slot_of_row, p.k, w_flat, mdt)
    grad_db = _empty(x)
    if down_bias is not None:
        grad_db = _alloc(tuple(down_bias.shape), down_bias.dtype, dev)
        _segment_sum(p, g, w_flat, grad_db, gather=True)
    grad_wd = _alloc(tuple(w_down.shape), w_down.dtype, dev)
    _launch_ragged_k(dy, act, grad_wd, p.offs, cfg=p.rk_cfg, E=p.E)
    # da = dy W_d (fp32), dh = act'(h) da
    da = _alloc((p.num_rows, p.I), torch.float32, dev)
    _routed_mm(p, dy, _b_view(w_down, trans_b=True, transpose=True), da, p.da_cfg, gather=False)
    dh = _glu(
        p, h, da, _alloc((p.num_rows, two_i), mdt, dev), backward=True, alpha=alpha, limit=limit
    )
    grad_gub = _empty(x)
    if gate_up_bias is not None:
        grad_gub = _alloc(tuple(gate_up_bias.shape), gate_up_bias.dtype, dev)
        _segment_sum(p, dh, w_flat, grad_gub, gather=False)
    grad_wgu = _alloc(tuple(w_gate_up.shape), w_gate_up.dtype, dev)
    _launch_ragged_k(dh, x, grad_wgu, p.offs, slot=p.slot_of_row, top_k=p.k, cfg=p.rk_cfg, E=p.E)
    # dx: dh W_gu per row (fp32), summed over the k slots in order
    dxr = _alloc((p.num_rows, H), torch.float32, dev)
    _routed_mm(p, dh, _b_view(w_gate_up, trans_b=True, transpose=True), dxr, p.dx_cfg, gather=False)
    grad_x = _unpermute_rows(dxr, p.row_of_slot, None, x.dtype)
    return grad_x, grad_wgu, grad_wd, grad_tw, grad_gub, grad_db
