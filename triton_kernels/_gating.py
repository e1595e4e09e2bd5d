"""Top-k gating kernels: scores, optional grouped (DeepSeek-V3) selection, top-k, weights, counts.

One program owns ``BLOCK_T`` router rows and keeps each whole row (``BLOCK_E`` = next power of two
>= E columns) in registers, so any E works (60, 160, 384 ...) without a power-of-two fast path.
All math is fp32 whatever the logits' dtype (a bf16 router flips near-tied experts).

Selection is an iterated arg-max over an int32 order key of the fp32 selection scores
(:func:`_order_key`): k rounds, each taking the largest remaining key and, among equal keys, the
lowest expert index. The key orders values as ``torch.sort(descending=True, stable=True)`` does
(NaN above +inf, every NaN equal, -0.0 equal to +0.0), so ids match the reference's whatever the
values (NaN, +-inf, rows of -inf) up to the rounding of the scores themselves, and are always k
distinct experts in [0, E). Groups are ranked the same way.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _scores(x, valid, SIGMOID: tl.constexpr):
    """fp32 scores of a [BLOCK_T, BLOCK_E] logits tile (``valid`` marks real columns)."""
    if SIGMOID:
        s = tl.sigmoid(x)
    else:
        xm = tl.where(valid, x, float("-inf"))
        mx = tl.max(xm, axis=1)
        p = tl.exp(xm - mx[:, None])
        p = tl.where(valid, p, 0.0)
        s = p / tl.sum(p, axis=1)[:, None]
    return tl.where(valid, s, 0.0)


# Key of a position that can never be picked: below every _order_key (the key of -inf is
# -0x7F800000 - 1).
_NO_KEY = tl.constexpr(-0x7FFFFFFF)


@triton.jit
def _order_key(v):
    """int32 key of fp32 values whose order is a stable descending sort's: NaN (any sign and
    payload) highest, -0.0 == +0.0, otherwise the order of the values."""
    bits = v.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats: reverse their order
    key = tl.where(v == 0.0, 0, key)
    return tl.where(v != v, 0x7FFFFFFF, key)


@triton.jit
def _pick(key, avail, cols, BLOCK: tl.constexpr):
    """Per row, the lowest column of the largest ``key`` among ``avail`` columns."""
    kv = tl.where(avail, key, _NO_KEY)
    mk = tl.max(kv, axis=1)
    return tl.min(tl.where(avail & (kv == mk[:, None]), cols[None, :], BLOCK), axis=1)


@triton.jit(do_not_specialize=["T", "top_k", "topk_groups"])
def topk_gating_kernel(
    logits_ptr,
    bias_ptr,
    weights_ptr,
    ids_ptr,
    counts_ptr,
    T,
    E,
    top_k,
    stride_lt,
    stride_le,
    group_size,
    num_groups,
    topk_groups,
    scale,
    SIGMOID: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RENORM: tl.constexpr,
    GROUPED: tl.constexpr,
    COUNTS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = rows < T
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_E)
    cmask = cols < E
    valid = rmask[:, None] & cmask[None, :]
    colv = cmask[None, :] & (rows >= 0)[:, None]  # real columns, every row (masked rows hold 0)

    x = tl.load(
        logits_ptr + rows64[:, None] * stride_lt + cols[None, :] * stride_le, mask=valid, other=0.0
    ).to(tl.float32)
    s = _scores(x, colv, SIGMOID)
    sel = s
    if HAS_BIAS:
        b = tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        sel = sel + b[None, :]
    sel = tl.where(colv, sel, float("-inf"))

    if GROUPED:
        # Group value = sum of the two first selection scores of each contiguous group in the
        # key order (its one score for single-expert groups); keep the topk_groups first groups
        # in the same order (NaN first, ties to the lower group index).
        key = _order_key(sel)
        gcol = cols // group_size
        garange = tl.arange(0, BLOCK_G)
        gval = tl.full([BLOCK_T, BLOCK_G], float("-inf"), tl.float32)
        for g in range(0, num_groups):
            in_g = (gcol == g)[None, :] & colv
            i1 = _pick(key, in_g, cols, BLOCK_E)
            hit1 = cols[None, :] == i1[:, None]
            val = tl.sum(tl.where(hit1, sel, 0.0), axis=1)
            if group_size >= 2:
                i2 = _pick(key, in_g & (~hit1), cols, BLOCK_E)
                val = val + tl.sum(tl.where(cols[None, :] == i2[:, None], sel, 0.0), axis=1)
            gval = tl.where(garange[None, :] == g, val[:, None], gval)
        gkey = _order_key(gval)
        gtaken = garange[None, :] < 0  # all False, [1, BLOCK_G] broadcast below
        gtaken = gtaken & (rows >= 0)[:, None]
        eligible = colv & (cols < 0)[None, :]
        for _j in range(0, topk_groups):
            gavail = (~gtaken) & (garange < num_groups)[None, :]
            ig = _pick(gkey, gavail, garange, BLOCK_G)
            gtaken = gtaken | (garange[None, :] == ig[:, None])
            eligible = eligible | (gcol[None, :] == ig[:, None])
        sel = tl.where(eligible, sel, float("-inf"))

    key = _order_key(sel)
    karange = tl.arange(0, BLOCK_K)
    taken = (cols < 0)[None, :] & (rows >= 0)[:, None]
    w_tile = tl.zeros([BLOCK_T, BLOCK_K], tl.float32)
    id_tile = tl.zeros([BLOCK_T, BLOCK_K], tl.int32)
    for j in range(0, top_k):
        idx = _pick(key, colv & (~taken), cols, BLOCK_E)
        hit = cols[None, :] == idx[:, None]
        taken = taken | hit
        wj = tl.sum(tl.where(hit, s, 0.0), axis=1)
        w_tile = tl.where(karange[None, :] == j, wj[:, None], w_tile)
        id_tile = tl.where(karange[None, :] == j, idx[:, None], id_tile)
        if COUNTS:
            # integer atomics commute: the counts are deterministic
            tl.atomic_add(counts_ptr + idx, 1, mask=rmask & (idx < E))
    if RENORM:
        w_tile = w_tile / tl.sum(w_tile, axis=1)[:, None]
    w_tile = w_tile * scale
    kmask = rmask[:, None] & (karange < top_k)[None, :]
    out_off = rows64[:, None] * top_k + karange[None, :]
    tl.store(weights_ptr + out_off, w_tile, mask=kmask)
    tl.store(ids_ptr + out_off, id_tile, mask=kmask)


@triton.jit(do_not_specialize=["T", "top_k"])
def topk_gating_bwd_kernel(
    grad_w_ptr,
    logits_ptr,
    ids_ptr,
    grad_logits_ptr,
    T,
    E,
    top_k,
    stride_lt,
    stride_le,
    stride_gt,
    stride_gk,
    stride_it,
    stride_ik,
    scale,
    SIGMOID: tl.constexpr,
    RENORM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """grad_logits = d(weights)/d(logits)^T grad_w, with weights = scale * p[ids] / (sum p[ids])."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = rows < T
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_E)
    cmask = cols < E
    valid = rmask[:, None] & cmask[None, :]
    colv = cmask[None, :] & (rows >= 0)[:, None]
    x = tl.load(
        logits_ptr + rows64[:, None] * stride_lt + cols[None, :] * stride_le, mask=valid, other=0.0
    ).to(tl.float32)
    s = _scores(x, colv, SIGMOID)

    # pass 1: S = sum_j p_j and GP = sum_j g_j p_j over the chosen experts
    p_sum = tl.zeros([BLOCK_T], tl.float32)
    gp_sum = tl.zeros([BLOCK_T], tl.float32)
    for j in range(0, top_k):
        idj = tl.load(ids_ptr + rows64 * stride_it + j * stride_ik, mask=rmask, other=0)
        gj = tl.load(grad_w_ptr + rows64 * stride_gt + j * stride_gk, mask=rmask, other=0.0)
        pj = tl.sum(tl.where(cols[None, :] == idj[:, None], s, 0.0), axis=1)
        p_sum += pj
        gp_sum += gj.to(tl.float32) * pj
    # pass 2: dL/dp over all columns (non-zero only on chosen experts)
    dp = tl.zeros([BLOCK_T, BLOCK_E], tl.float32)
    inv = 1.0 / tl.where(p_sum == 0.0, 1.0, p_sum)
    for j in range(0, top_k):
        idj = tl.load(ids_ptr + rows64 * stride_it + j * stride_ik, mask=rmask, other=0)
        gj = tl.load(grad_w_ptr + rows64 * stride_gt + j * stride_gk, mask=rmask, other=0.0)
        gj = gj.to(tl.float32) * scale
        if RENORM:
            dpj = (gj - gp_sum * scale * inv) * inv
        else:
            dpj = gj
        dp += tl.where(cols[None, :] == idj[:, None], dpj[:, None], 0.0)
    if SIGMOID:
        dz = dp * s * (1.0 - s)
    else:
        dz = s * (dp - tl.sum(dp * s, axis=1)[:, None])
    tl.store(
        grad_logits_ptr + rows64[:, None] * E + cols[None, :],
        dz.to(grad_logits_ptr.dtype.element_ty),
        mask=valid,
    )


def block_sizes(E: int, top_k: int, num_groups: int) -> dict[str, int]:
    """Tile shape of the gating kernels for E experts: about 2048 scores per program."""
    block_e = triton.next_power_of_2(max(E, 1))
    return {
        "BLOCK_E": block_e,
        "BLOCK_T": max(1, min(64, 2048 // block_e)),
        "BLOCK_K": triton.next_power_of_2(max(top_k, 1)),
        "BLOCK_G": triton.next_power_of_2(max(num_groups, 1)),
    }
