"""Permute / unpermute kernels and their backward.

Every output element is owned by exactly one program and reduced in a fixed order (the k slots in
order, the H columns block by block), so results are bitwise reproducible: no atomics. Values are
converted to fp32 right after loading (bf16 arithmetic is also unavailable in Triton's interpreter),
and row indices are widened to int64 before they are multiplied by a stride.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["num_rows", "top_k"])
def permute_kernel(
    x_ptr,
    slot_ptr,
    out_ptr,
    w_ptr,
    num_rows,
    H,
    top_k,
    stride_xt,
    stride_xh,
    stride_or,
    stride_oh,
    HAS_W: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """``out[r] = x[slot[r] // k]`` (times ``w[slot[r]]`` with HAS_W), 0 where ``slot[r] < 0``."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    h = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    rmask = r < num_rows
    hmask = h < H
    slot = tl.load(slot_ptr + r, mask=rmask, other=-1)  # int32: a 32-bit division below
    used = slot >= 0
    tok = tl.where(used, slot // top_k, 0).to(tl.int64)
    v = tl.load(
        x_ptr + tok[:, None] * stride_xt + h[None, :] * stride_xh,
        mask=(used & rmask)[:, None] & hmask[None, :],
        other=0.0,
    ).to(tl.float32)
    if HAS_W:
        w = tl.load(w_ptr + tl.where(used, slot, 0), mask=used & rmask, other=0.0).to(tl.float32)
        v = v * w[:, None]
    tl.store(
        out_ptr + r[:, None] * stride_or + h[None, :] * stride_oh,
        v.to(out_ptr.dtype.element_ty),
        mask=rmask[:, None] & hmask[None, :],
    )


@triton.jit(do_not_specialize=["T", "top_k"])
def unpermute_kernel(
    y_ptr,
    row_ptr,
    w_ptr,
    out_ptr,
    T,
    H,
    top_k,
    stride_yr,
    stride_yh,
    stride_ot,
    stride_oh,
    HAS_W: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """``out[t] = sum_s w[t, s] * y[row[t, s]]`` over kept pairs, s in order, in fp32."""
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    tmask = t < T
    hmask = h < H
    acc = tl.zeros([BLOCK_T, BLOCK_H], tl.float32)
    for s in range(0, top_k):
        row = tl.load(row_ptr + t * top_k + s, mask=tmask, other=-1).to(tl.int64)
        kept = (row >= 0) & tmask
        v = tl.load(
            y_ptr + tl.where(kept, row, 0)[:, None] * stride_yr + h[None, :] * stride_yh,
            mask=kept[:, None] & hmask[None, :],
            other=0.0,
        ).to(tl.float32)
        if HAS_W:
            w = tl.load(w_ptr + t * top_k + s, mask=kept, other=0.0).to(tl.float32)
            v = v * w[:, None]
        acc += v
    tl.store(
        out_ptr + t[:, None] * stride_ot + h[None, :] * stride_oh,
        acc.to(out_ptr.dtype.element_ty),
        mask=tmask[:, None] & hmask[None, :],
    )


@triton.jit(do_not_specialize=["T", "top_k"])
def slot_dot_kernel(
    g_ptr,
    y_ptr,
    row_ptr,
    out_ptr,
    T,
    H,
    top_k,
    stride_gt,
    stride_gh,
    stride_yr,
    stride_yh,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """``out[t, s] = <g[t], y[row[t, s]]>`` (0 for dropped pairs): the routing-weight gradient.
    One program owns BLOCK_T tokens and walks H in fixed blocks: deterministic."""
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < T
    for s in range(0, top_k):
        row = tl.load(row_ptr + t * top_k + s, mask=tmask, other=-1).to(tl.int64)
        kept = (row >= 0) & tmask
        row = tl.where(kept, row, 0)
        acc = tl.zeros([BLOCK_T, BLOCK_H], tl.float32)
        for h0 in range(0, H, BLOCK_H):
            h = h0 + tl.arange(0, BLOCK_H)
            hm = (h < H)[None, :]
            g = tl.load(
                g_ptr + t[:, None] * stride_gt + h[None, :] * stride_gh,
                mask=tmask[:, None] & hm,
                other=0.0,
            ).to(tl.float32)
            v = tl.load(
                y_ptr + row[:, None] * stride_yr + h[None, :] * stride_yh,
                mask=kept[:, None] & hm,
                other=0.0,
            ).to(tl.float32)
            acc += g * v
        tl.store(
            out_ptr + t * top_k + s,
            tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty),
            mask=tmask,
        )


@triton.jit(do_not_specialize=["top_k"])
def segment_sum_kernel(
    src_ptr,
    offs_ptr,
    slot_ptr,
    w_ptr,
    out_ptr,
    N,
    top_k,
    stride_sr,
    stride_sn,
    stride_oe,
    GATHER: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """``out[e] = sum over rows r of segment e of src[r]`` (fp32, fixed order; 0 for empty
    segments). With GATHER, row r reads ``w[slot[r]] * src[slot[r] // k]`` and rows with
    ``slot < 0`` (padding) are skipped: a bias gradient straight from the un-permuted gradient."""
    e = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    end = tl.load(offs_ptr + e)
    start = tl.load(offs_ptr + e - 1, mask=e > 0, other=0)
    acc = tl.zeros([BLOCK_R, BLOCK_N], tl.float32)
    for r0 in range(start, end, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        rmask = r < end
        if GATHER:
            slot = tl.load(slot_ptr + r, mask=rmask, other=-1)
            rmask = rmask & (slot >= 0)
            slot = tl.where(rmask, slot, 0)
            src_row = (slot // top_k).to(tl.int64)
            w = tl.load(w_ptr + slot, mask=rmask, other=0.0).to(tl.float32)
        else:
            src_row = r.to(tl.int64)
        v = tl.load(
            src_ptr + src_row[:, None] * stride_sr + n[None, :] * stride_sn,
            mask=rmask[:, None] & nmask[None, :],
            other=0.0,
        ).to(tl.float32)
        if GATHER:
            v = v * w[:, None]
        acc += v
    tl.store(
        out_ptr + e.to(tl.int64) * stride_oe + n,
        tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty),
        mask=nmask,
    )
