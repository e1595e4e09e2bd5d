"""Launcher of ``route``: the device-side stable counting sort of (token, slot) pairs, in five
launches whose count depends on shapes only (no host sync)."""

from __future__ import annotations

import torch
import triton

from ..plan import num_rows as plan_num_rows
from . import _config, _routing
from .ops_common import _alloc, _ctx

#: pairs per program of the routing kernels (a power of two); small under the interpreter
ROUTE_CHUNK = {"gpu": 256, "interpreter": 64}


def route(topk_ids, num_experts, block_size):
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be [T, k], got shape {tuple(topk_ids.shape)}")
    if topk_ids.dtype.is_floating_point or topk_ids.dtype == torch.bool:
        raise TypeError(f"topk_ids must be an integer tensor, got {topk_ids.dtype}")
    E = int(num_experts)
    if E < 1:
        raise ValueError(f"num_experts must be >= 1, got {E}")
    if block_size < 0:
        raise ValueError(f"block_size must be >= 0, got {block_size}")
    T, k = topk_ids.shape
    TK = T * k
    dev = topk_ids.device
    num_rows = plan_num_rows(TK, E, block_size)
    i32 = torch.int32
    counts = _alloc((E,), i32, dev)
    offs = _alloc((E,), i32, dev)
    row_of_slot = _alloc((T, k), i32, dev)
    slot_of_row = _alloc((num_rows,), i32, dev)
    block_expert = _alloc((num_rows // block_size if block_size > 0 else 0,), i32, dev)
    chunk = ROUTE_CHUNK["interpreter" if _config.interpreting() else "gpu"]
    num_chunks = triton.cdiv(TK, chunk)
    ids = topk_ids.contiguous().view(-1)
    hist = torch.empty((max(num_chunks, 1), E), dtype=i32, device=dev)
    base = torch.empty((max(num_chunks, 1), E), dtype=i32, device=dev)
    pstart = torch.empty((E,), dtype=i32, device=dev)
    block_e = triton.next_power_of_2(E)
    scan_e = min(block_e, 64)
    with _ctx(topk_ids):
        if num_chunks > 0:
            _routing.route_hist_kernel[(num_chunks,)](
                ids, hist, TK, E, CHUNK=chunk, BLOCK_E=block_e, num_warps=4
            )
        _routing.route_scan_kernel[(triton.cdiv(E, scan_e),)](
            hist, base, counts, num_chunks, E, BLOCK_C=32, BLOCK_E=scan_e, num_warps=4
        )
        _routing.route_offs_kernel[(1,)](
            counts, offs, pstart, E, block_size, BLOCK_E=min(block_e, 1024), num_warps=4
        )
        if num_chunks > 0:
            _routing.route_scatter_kernel[(num_chunks,)](
                ids,
                base,
                pstart,
                row_of_slot,
                slot_of_row,
                TK,
                E,
                CHUNK=chunk,
                BLOCK_E=min(block_e, 4096 // chunk),
                num_warps=4,
            )
        if num_rows > 0:
            block_r = 64 if _config.interpreting() else 128
            _routing.route_fill_kernel[(triton.cdiv(num_rows, block_r),)](
                counts,
                offs,
                pstart,
                slot_of_row,
                block_expert,
                num_rows,
                E,
                block_size,
                BLOCK_R=block_r,
                BLOCK_E=min(block_e, 64),
                num_warps=4,
            )
    return counts, offs, row_of_slot, slot_of_row, block_expert
