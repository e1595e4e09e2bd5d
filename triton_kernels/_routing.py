"""Routing kernels: a stable counting sort of the TK (token, slot) pairs by expert, on the device.

Five launches whatever the data (no host sync; sizes depend only on T, k, E and block_size). The
flat pairs are cut into chunks of ``CHUNK`` pairs:

1. ``route_hist_kernel`` (one program per chunk): ``hist[c, e]`` = pairs of chunk c routed to e.
2. ``route_scan_kernel`` (one program per block of experts): ``base[c, e]`` = pairs routed to e
   by the chunks before c (an exclusive scan over the chunks, BLOCK_C chunks per step);
   ``tokens_per_expert`` = the column totals.
3. ``route_offs_kernel`` (one program): padded segment sizes, ``offs`` (their cumulative ends) and
   ``pstart`` (segment starts).
4. ``route_scatter_kernel`` (one program per chunk): the pair goes to row
   ``pstart[e] + base[c, e] + rank``, rank being the number of earlier pairs of the chunk with the
   same expert (a scan of the chunk's one-hot matrix). Pairs of one expert therefore keep their
   flat order: the sort is stable and deterministic.
5. ``route_fill_kernel`` (one program per block of rows): -1 into ``slot_of_row`` for padding and
   unused rows, and ``block_expert``. It writes exactly the rows kernel 4 does not, so the two
   never race.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["TK"])
def route_hist_kernel(ids_ptr, hist_ptr, TK, E, CHUNK: tl.constexpr, BLOCK_E: tl.constexpr):
    c = tl.program_id(0)
    i = c.to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
    e = tl.load(ids_ptr + i, mask=i < TK, other=-1)
    valid = (e >= 0) & (e < E)
    h = tl.histogram(tl.where(valid, e, 0).to(tl.int32), BLOCK_E, mask=valid)
    ex = tl.arange(0, BLOCK_E)
    tl.store(hist_ptr + c.to(tl.int64) * E + ex, h, mask=ex < E)


@triton.jit(do_not_specialize=["num_chunks"])
def route_scan_kernel(
    hist_ptr, base_ptr, counts_ptr, num_chunks, E, BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr
):
    ex = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    em = ex < E
    cs = tl.arange(0, BLOCK_C)
    run = tl.zeros([BLOCK_E], tl.int32)
    for c0 in range(0, num_chunks, BLOCK_C):
        c = c0 + cs
        m = (c < num_chunks)[:, None] & em[None, :]
        off = c.to(tl.int64)[:, None] * E + ex[None, :]
        h = tl.load(hist_ptr + off, mask=m, other=0)
        incl = tl.cumsum(h, axis=0)
        tl.store(base_ptr + off, incl - h + run[None, :], mask=m)
        run += tl.sum(h, axis=0)
    tl.store(counts_ptr + ex, run, mask=em)


@triton.jit
def route_offs_kernel(counts_ptr, offs_ptr, pstart_ptr, E, block_size, BLOCK_E: tl.constexpr):
    carry = 0
    for e0 in range(0, E, BLOCK_E):
        ex = e0 + tl.arange(0, BLOCK_E)
        em = ex < E
        n = tl.load(counts_ptr + ex, mask=em, other=0)
        if block_size > 0:
            n = (n + block_size - 1) // block_size * block_size
        end = tl.cumsum(n, axis=0) + carry
        tl.store(offs_ptr + ex, end, mask=em)
        tl.store(pstart_ptr + ex, end - n, mask=em)
        carry += tl.sum(n, axis=0)


@triton.jit(do_not_specialize=["TK"])
def route_scatter_kernel(
    ids_ptr,
    base_ptr,
    pstart_ptr,
    row_of_slot_ptr,
    slot_of_row_ptr,
    TK,
    E,
    CHUNK: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    c = tl.program_id(0)
    pair = c.to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
    in_range = pair < TK
    e = tl.load(ids_ptr + pair, mask=in_range, other=-1)
    ok = (e >= 0) & (e < E)
    e32 = tl.where(ok, e, -1).to(tl.int32)
    # rank of each pair among the chunk's earlier pairs of the same expert: an inclusive scan of
    # the one-hot [CHUNK, BLOCK_E] matrix, one block of experts at a time
    rank = tl.zeros([CHUNK], tl.int32)
    for e0 in range(0, E, BLOCK_E):
        ex = e0 + tl.arange(0, BLOCK_E)
        oh = (e32[:, None] == ex[None, :]).to(tl.int32)
        cs = tl.cumsum(oh, axis=0)
        rank += tl.sum(oh * (cs - 1), axis=1)
    e_c = tl.where(ok, e32, 0)
    base = tl.load(base_ptr + c.to(tl.int64) * E + e_c, mask=ok, other=0)
    start = tl.load(pstart_ptr + e_c, mask=ok, other=0)
    row = start + base + rank
    tl.store(row_of_slot_ptr + pair, tl.where(ok, row, -1), mask=in_range)
    tl.store(slot_of_row_ptr + row.to(tl.int64), pair.to(tl.int32), mask=ok)


@triton.jit(do_not_specialize=["num_rows"])
def route_fill_kernel(
    counts_ptr,
    offs_ptr,
    pstart_ptr,
    slot_of_row_ptr,
    block_expert_ptr,
    num_rows,
    E,
    block_size,
    BLOCK_R: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < num_rows
    # expert of row r = number of experts whose segment ends at or before r
    e = tl.zeros([BLOCK_R], tl.int32)
    for e0 in range(0, E, BLOCK_E):
        ex = e0 + tl.arange(0, BLOCK_E)
        end = tl.load(offs_ptr + ex, mask=ex < E, other=0)
        le = (end[None, :].to(tl.int64) <= r[:, None]) & (ex < E)[None, :]
        e += tl.sum(le.to(tl.int32), axis=1)
    in_seg = e < E
    e_c = tl.where(in_seg, e, 0)
    start = tl.load(pstart_ptr + e_c, mask=rmask & in_seg, other=0)
    n = tl.load(counts_ptr + e_c, mask=rmask & in_seg, other=0)
    used = in_seg & (r - start < n)
    tl.store(slot_of_row_ptr + r, tl.full([BLOCK_R], -1, tl.int32), mask=rmask & ~used)
    if block_size > 0:
        is_head = (r % block_size) == 0
        tl.store(
            block_expert_ptr + r // block_size,
            tl.where(in_seg, e, -1),
            mask=rmask & is_head,
        )
