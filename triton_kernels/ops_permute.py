"""Launchers of permute / unpermute (forward and backward): fp32 row copies and weighted sums in
slot order (no atomics), and the routing-weight gradient (one dot product per slot)."""

from __future__ import annotations

import triton

from . import _permute
from .ops_common import _alloc, _check_float, _ctx, _empty, _row_block


def _permute_rows(x, slot_of_row, k, weights, out_dtype):
    num_rows, H = slot_of_row.shape[0], x.shape[1]
    out = _alloc((num_rows, H), out_dtype, x.device)
    if num_rows == 0 or H == 0:
        return out
    br, bh = _row_block(H)
    with _ctx(x):
        _permute.permute_kernel[(triton.cdiv(num_rows, br), triton.cdiv(H, bh))](
            x,
            slot_of_row,
            out,
            weights if weights is not None else x,
            num_rows,
            H,
            k,
            x.stride(0),
            x.stride(1),
            out.stride(0),
            out.stride(1),
            HAS_W=weights is not None,
            BLOCK_R=br,
            BLOCK_H=bh,
            num_warps=4,
        )
    return out


def _unpermute_rows(y, row_of_slot, weights, out_dtype):
    T, k = row_of_slot.shape
    H = y.shape[1]
    out = _alloc((T, H), out_dtype, y.device)
    if T == 0 or H == 0:
        return out
    br, bh = _row_block(H)
    with _ctx(y):
        _permute.unpermute_kernel[(triton.cdiv(T, br), triton.cdiv(H, bh))](
            y,
            row_of_slot.contiguous(),
            weights if weights is not None else y,
            out,
            T,
            H,
            k,
            y.stride(0),
            y.stride(1),
            out.stride(0),
            out.stride(1),
            HAS_W=weights is not None,
            BLOCK_T=br,
            BLOCK_H=bh,
            num_warps=4,
        )
    return out


def permute(x, row_of_slot, slot_of_row):
    _check_float("x", x)
    return _permute_rows(x, slot_of_row.contiguous(), row_of_slot.shape[1], None, x.dtype)


def unpermute(y, row_of_slot, slot_of_row, topk_weights):
    _check_float("y", y)
    w = topk_weights.contiguous() if topk_weights is not None else None
    return _unpermute_rows(y, row_of_slot, w, y.dtype)


def _slot_dot(g, y, row_of_slot, out_dtype):
    T, k = row_of_slot.shape
    out = _alloc((T, k), out_dtype, g.device)
    if T == 0:
        return out
    H = g.shape[1]
    bh = min(triton.next_power_of_2(max(H, 1)), 128)
    bt = max(1, min(64, 2048 // bh))
    with _ctx(g):
        _permute.slot_dot_kernel[(triton.cdiv(T, bt),)](
            g,
            y,
            row_of_slot.contiguous(),
            out,
            T,
            H,
            k,
            g.stride(0),
            g.stride(1),
            y.stride(0),
            y.stride(1),
            BLOCK_T=bt,
            BLOCK_H=bh,
            num_warps=4,
        )
    return out


def unpermute_backward(
    grad_out, y, row_of_slot, slot_of_row, topk_weights, need_grad_y, need_grad_weights
):
    k = row_of_slot.shape[1]
    grad_y = _empty(y)
    grad_w = _empty(grad_out) if topk_weights is None else _empty(topk_weights)
    w = topk_weights.contiguous() if topk_weights is not None else None
    if need_grad_y:
        grad_y = _permute_rows(grad_out, slot_of_row.contiguous(), k, w, y.dtype)
    if need_grad_weights and topk_weights is not None:
        grad_w = _slot_dot(grad_out, y, row_of_slot, topk_weights.dtype)
    return grad_y, grad_w
