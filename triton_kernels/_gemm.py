"""Grouped GEMM kernels: the expert matmuls of an MoE layer.

``grouped_mm_kernel`` computes ``C[r] = epilogue(A[row(r)] @ B[e(r)])`` for the rows r of one
BLOCK_M x BLOCK_N tile, where every row of a tile belongs to one expert e:

* ragged schedule (``PADDED=False``, for :func:`grouped_gemm` with arbitrary ``offs``): a tile is
  (expert, BLOCK_M rows of its segment); program ``pid_m`` finds its expert from the per-expert
  tile counts ``cdiv(rows_e, BLOCK_M)`` read from ``offs`` on the device (no host sync; the grid is
  the bound ``cdiv(M, BLOCK_M) + E + 1``). Tiles past the last expert zero the rows past
  ``offs[-1]``, so no output row is left uninitialised.
* padded schedule (``PADDED=True``, for ``moe_ffn``): the routing plan padded each expert segment
  to a multiple of BLOCK_M; ``block_expert[pid_m]`` names the tile's expert (-1: unused block).

``GATHER`` loads A rows through the routing plan (``A[slot_of_row[r] // k]``: the permutation is
fused into the loads, no permuted copy of the tokens), ``ACT`` fuses the gated activation into the
epilogue (the kernel then accumulates the gate and the up columns of B side by side), ``scale``
multiplies each row by its routing weight (GEMM 2 of ``moe_ffn``). Programs are ordered in groups
of ``GROUP_M`` row tiles so the B tiles they share stay in L2.

``ragged_k_kernel`` computes the weight gradient ``out[e] = P[seg e]^T @ Q[seg e]``, a GEMM whose
reduction runs over the rows of each expert's segment (ragged K); empty experts get exact zeros.

Addresses are computed in int64 (row index times stride can pass 2^31 for long prefills).
``DOT_DTYPE`` is the dtype tiles are converted to right after loading: the input dtype on a GPU,
fp32 for bf16 under Triton's interpreter (whose bf16 dot is broken). ``PRECISION`` is the fp32 dot
precision: "tf32" (tensor cores, the default on GPUs) or "ieee" (full fp32).
"""

from __future__ import annotations

import triton
import triton.language as tl

# activation ids (the ACT constexpr)
ACT_NONE, ACT_SWIGLU, ACT_GEGLU, ACT_SWIGLU_OAI = 0, 1, 2, 3
ACTIVATIONS = {"swiglu": ACT_SWIGLU, "geglu": ACT_GEGLU, "swiglu_oai": ACT_SWIGLU_OAI}


@triton.jit
def _glu(g, u, alpha, limit, ACT: tl.constexpr):
    if ACT == 1:
        out = g * tl.sigmoid(g) * u
    elif ACT == 2:
        out = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476)) * u
    else:
        gc = tl.minimum(g, limit)
        uc = tl.minimum(tl.maximum(u, -limit), limit)
        out = (uc + 1.0) * gc * tl.sigmoid(alpha * gc)
    return out


@triton.jit
def _glu_grad(g, u, da, alpha, limit, ACT: tl.constexpr):
    """(d gate, d up) of ``_glu`` given d act."""
    if ACT == 1:
        sg = tl.sigmoid(g)
        dg = da * u * sg * (1.0 + g * (1.0 - sg))
        du = da * g * sg
    elif ACT == 2:
        cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
        pdf = tl.exp(-0.5 * g * g) * 0.3989422804014327
        dg = da * u * (cdf + g * pdf)
        du = da * g * cdf
    else:
        gc = tl.minimum(g, limit)
        uc = tl.minimum(tl.maximum(u, -limit), limit)
        sg = tl.sigmoid(alpha * gc)
        dg = tl.where(g <= limit, da * (uc + 1.0) * (sg + gc * alpha * sg * (1.0 - sg)), 0.0)
        du = tl.where((u >= -limit) & (u <= limit), da * gc * sg, 0.0)
    return dg, du


@triton.jit
def _find_tile(offs_ptr, E, pid_m, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """Ragged schedule: (expert, first row, row end) of row tile ``pid_m``; expert -1 past the
    last tile, with the first row then counted on from ``offs[E-1]`` (a zero-fill tile)."""
    before = 0
    expert = -1
    row0 = 0
    row_end = 0
    last_end = 0
    for e0 in range(0, E, BLOCK_E):
        ex = e0 + tl.arange(0, BLOCK_E)
        em = ex < E
        end = tl.load(offs_ptr + ex, mask=em, other=0)
        start = tl.load(offs_ptr + ex - 1, mask=em & (ex > 0), other=0)
        n = tl.where(em, (tl.maximum(end - start, 0) + BLOCK_M - 1) // BLOCK_M, 0)
        incl = tl.cumsum(n, axis=0) + before
        excl = incl - n
        hit = (excl <= pid_m) & (pid_m < incl) & em
        found = tl.sum(hit.to(tl.int32), axis=0) > 0
        expert = tl.where(found, tl.sum(tl.where(hit, ex, 0), axis=0), expert)
        row0 = tl.where(
            found, tl.sum(tl.where(hit, start + (pid_m - excl) * BLOCK_M, 0), axis=0), row0
        )
        row_end = tl.where(found, tl.sum(tl.where(hit, end, 0), axis=0), row_end)
        last_end = tl.max(tl.where(em, end, last_end), axis=0)
        before += tl.sum(n, axis=0)
    # zero-fill tiles: rows [offs[E-1] + j * BLOCK_M, ...) for j = pid_m - total tiles
    row0 = tl.where(expert >= 0, row0, last_end + (pid_m - before) * BLOCK_M)
    return expert, row0, row_end


@triton.jit(do_not_specialize=["M", "num_m_tiles", "top_k"])
def grouped_mm_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    offs_ptr,
    block_expert_ptr,
    slot_ptr,
    w_ptr,
    bias_ptr,
    M,
    N,
    K,
    E,
    top_k,
    num_m_tiles,
    stride_am,
    stride_ak,
    stride_be,
    stride_bk,
    stride_bn,
    stride_cm,
    stride_cn,
    stride_bias_e,
    stride_bias_n,
    up_offset,
    col_mult,
    alpha,
    limit,
    has_bias,
    use_scale,
    PADDED: tl.constexpr,
    GATHER: tl.constexpr,
    ACT: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    pid = tl.program_id(0)
    num_n_tiles = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n_tiles
    group = pid // per_group
    first_m = group * GROUP_M
    group_rows = tl.minimum(num_m_tiles - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    if PADDED:
        expert = tl.load(block_expert_ptr + pid_m)
        row0 = pid_m * BLOCK_M
        row_end = row0 + BLOCK_M
    else:
        expert, row0, row_end = _find_tile(offs_ptr, E, pid_m, BLOCK_M, BLOCK_E)
        row_end = tl.where(expert >= 0, row_end, M)
    active = expert >= 0
    rows = row0 + tl.arange(0, BLOCK_M)
    rmask = (rows < row_end) & (rows < M)
    rows64 = rows.to(tl.int64)
    if PADDED:
        # routing-plan rows: slot_of_row names each row's (token, slot) pair, -1 for padding
        slot = tl.load(slot_ptr + rows64, mask=rmask, other=-1)
        a_mask = rmask & (slot >= 0) & active
    else:
        slot = rows
        a_mask = rmask & active
    if GATHER:
        a_rows = tl.where(a_mask, slot // top_k, 0).to(tl.int64)  # 32-bit division
    else:
        a_rows = rows64
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    e64 = tl.where(active, expert, 0).to(tl.int64)
    if ACT != 0:
        gate_cols = cols.to(tl.int64) * col_mult
        up_cols = gate_cols + up_offset
    else:
        gate_cols = cols.to(tl.int64)
        up_cols = gate_cols

    a_base = a_ptr + a_rows[:, None] * stride_am
    b_base = b_ptr + e64 * stride_be
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    k_tiles = tl.where(active, tl.cdiv(K, BLOCK_K), 0)
    for kt in range(0, k_tiles):
        kk = kt * BLOCK_K + tl.arange(0, BLOCK_K)
        kmask = kk < K
        kk64 = kk.to(tl.int64)
        a = tl.load(
            a_base + kk64[None, :] * stride_ak, mask=a_mask[:, None] & kmask[None, :], other=0.0
        )
        a = a.to(DOT_DTYPE)
        b = tl.load(
            b_base + kk64[:, None] * stride_bk + gate_cols[None, :] * stride_bn,
            mask=kmask[:, None] & cmask[None, :],
            other=0.0,
        ).to(DOT_DTYPE)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if ACT != 0:
            bu = tl.load(
                b_base + kk64[:, None] * stride_bk + up_cols[None, :] * stride_bn,
                mask=kmask[:, None] & cmask[None, :],
                other=0.0,
            ).to(DOT_DTYPE)
            acc_up = tl.dot(a, bu, acc_up, input_precision=PRECISION)

    if has_bias != 0:
        bias_base = bias_ptr + e64 * stride_bias_e
        bmask = cmask & active
        acc += tl.load(bias_base + gate_cols * stride_bias_n, mask=bmask, other=0.0).to(tl.float32)[
            None, :
        ]
        if ACT != 0:
            acc_up += tl.load(bias_base + up_cols * stride_bias_n, mask=bmask, other=0.0).to(
                tl.float32
            )[None, :]
    if ACT != 0:
        out = _glu(acc, acc_up, alpha, limit, ACT)
    else:
        out = acc
    if use_scale != 0:
        # the routing weight of the row's (token, slot) pair; 0 for padding rows
        w = tl.load(w_ptr + tl.where(a_mask, slot, 0), mask=a_mask, other=0.0).to(tl.float32)
        out = out * w[:, None]
    out = tl.where(active, out, 0.0)
    # padded schedule: unused blocks are never read back, so they are not written either
    if PADDED:
        store_rows = rmask & active
    else:
        store_rows = rmask
    tl.store(
        c_ptr + rows64[:, None] * stride_cm + cols[None, :] * stride_cn,
        out.to(c_ptr.dtype.element_ty),
        mask=store_rows[:, None] & cmask[None, :],
    )


@triton.jit(do_not_specialize=["top_k"])
def ragged_k_kernel(
    p_ptr,
    q_ptr,
    out_ptr,
    offs_ptr,
    slot_ptr,
    MO,
    NO,
    top_k,
    stride_pr,
    stride_pm,
    stride_qr,
    stride_qn,
    stride_oe,
    stride_om,
    stride_on,
    GATHER_Q: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``out[e] [MO, NO] = P[rows of e]^T @ Q[rows of e]``, the rows of e being
    ``[offs[e-1], offs[e])``. With GATHER_Q (routing-plan rows), row r of Q is
    ``Q[slot_of_row[r] // k]`` and padding rows (``slot_of_row < 0``) are skipped."""
    pid = tl.program_id(0)  # output tiles on the unbounded grid axis, experts on the second
    e = tl.program_id(1)
    num_n = tl.cdiv(NO, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = m < MO
    nmask = n < NO
    end = tl.load(offs_ptr + e)
    start = tl.load(offs_ptr + e - 1, mask=e > 0, other=0)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for r0 in range(start, end, BLOCK_K):
        r = r0 + tl.arange(0, BLOCK_K)
        r64 = r.to(tl.int64)
        rm = r < end
        if GATHER_Q:
            slot = tl.load(slot_ptr + r64, mask=rm, other=-1)
            rm = rm & (slot >= 0)
            q_rows = tl.where(rm, slot // top_k, 0).to(tl.int64)
        else:
            q_rows = r64
        pt = tl.load(
            p_ptr + m[:, None].to(tl.int64) * stride_pm + r64[None, :] * stride_pr,
            mask=mmask[:, None] & rm[None, :],
            other=0.0,
        ).to(DOT_DTYPE)
        q = tl.load(
            q_ptr + q_rows[:, None] * stride_qr + n[None, :].to(tl.int64) * stride_qn,
            mask=rm[:, None] & nmask[None, :],
            other=0.0,
        ).to(DOT_DTYPE)
        acc = tl.dot(pt, q, acc, input_precision=PRECISION)
    tl.store(
        out_ptr
        + e.to(tl.int64) * stride_oe
        + m[:, None].to(tl.int64) * stride_om
        + n[None, :].to(tl.int64) * stride_on,
        acc.to(out_ptr.dtype.element_ty),
        mask=mmask[:, None] & nmask[None, :],
    )


@triton.jit(do_not_specialize=["R"])
def glu_kernel(
    h_ptr,
    da_ptr,
    out_ptr,
    R,
    NI,
    stride_hr,
    stride_dr,
    stride_or,
    up_offset,
    col_mult,
    alpha,
    limit,
    ACT: tl.constexpr,
    BACKWARD: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    """Forward: ``out[r, j] = act(h[r, gate j], h[r, up j])``. Backward: ``out`` [R, 2I] gets
    (d gate, d up) at the gate/up columns from ``da`` [R, I]."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    j = tl.program_id(1).to(tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = (r < R)[:, None] & (j < NI)[None, :]
    gcol = j * col_mult
    ucol = gcol + up_offset
    g = tl.load(h_ptr + r[:, None] * stride_hr + gcol[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(h_ptr + r[:, None] * stride_hr + ucol[None, :], mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        da = tl.load(da_ptr + r[:, None] * stride_dr + j[None, :], mask=mask, other=0.0)
        dg, du = _glu_grad(g, u, da.to(tl.float32), alpha, limit, ACT)
        ty = out_ptr.dtype.element_ty
        tl.store(out_ptr + r[:, None] * stride_or + gcol[None, :], dg.to(ty), mask=mask)
        tl.store(out_ptr + r[:, None] * stride_or + ucol[None, :], du.to(ty), mask=mask)
    else:
        a = _glu(g, u, alpha, limit, ACT)
        tl.store(
            out_ptr + r[:, None] * stride_or + j[None, :], a.to(out_ptr.dtype.element_ty), mask=mask
        )
