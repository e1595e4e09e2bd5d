"""Launchers of the Triton kernels, one per op schema (:mod:`moe_kernels._schemas`).

``IMPLS`` maps an op name to a function whose parameters are exactly the schema's arguments; the
registry wraps each one as ``moe_kernels::<name>_triton``. Importing this module launches nothing
and needs no GPU.

Numerics: routing, gating and reductions are fp32 and deterministic (no float atomics). GEMMs
accumulate in fp32; fp32 inputs use TF32 tensor cores on a GPU by default (relative error about
1e-3, like ``torch.backends.cuda.matmul.allow_tf32 = True``); call :func:`set_fp32_precision`
("ieee") or set ``MOE_KERNELS_TRITON_FP32=ieee`` for full fp32. Under ``TRITON_INTERPRET=1`` bf16
tiles are converted to fp32 right after loading (the interpreter's bf16 arithmetic is broken) and
fp32 dots are full fp32.

No launcher reads tensor values on the host: output sizes depend on shapes only, and every
launch count is fixed by the shapes (no host sync; CUDA-graph friendly).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import torch

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # the registry catches this and reports the backend unavailable
    raise ImportError(f"the Triton backend needs the triton package: {exc}") from exc

from . import _config, _gating, _gemm, _permute, _routing

__all__ = ["IMPLS", "available", "set_fp32_precision", "topk_gating_with_counts"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}

_fp32_precision = [os.environ.get("MOE_KERNELS_TRITON_FP32", "tf32")]

#: pairs per program of the routing kernels (a power of two); small under the interpreter
ROUTE_CHUNK = {"gpu": 256, "interpreter": 64}


def available() -> tuple[bool, str]:
    """Whether the kernels can run here: triton imports (it did) and there is a CUDA device or
    Triton's interpreter is on."""
    if _config.interpreting():
        return True, f"triton {triton.__version__} (TRITON_INTERPRET=1: CPU tensors, interpreted)"
    if torch.cuda.is_available():
        return True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}"
    return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels interpreted on CPU)"


def set_fp32_precision(precision: str) -> None:
    """``"tf32"`` (default: tensor cores, ~1e-3 relative error) or ``"ieee"`` (full fp32 FMA)."""
    if precision not in ("tf32", "ieee"):
        raise ValueError(f"precision must be 'tf32' or 'ieee', got {precision!r}")
    _fp32_precision[0] = precision


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _debug() -> bool:
    return os.environ.get("MOE_KERNELS_DEBUG", "0") not in ("", "0")


def _alloc(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Output buffer; NaN-filled (or -7 for integers) under MOE_KERNELS_DEBUG=1 so that an element
    a kernel fails to write shows up."""
    if _debug():
        fill = float("nan") if dtype.is_floating_point else -7
        return torch.full(shape, fill, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _ctx(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name}: the Triton backend supports float32, float16 and bfloat16, got {t.dtype}"
        )


def _check_same_dtype(names: str, *ts: torch.Tensor) -> None:
    dts = {t.dtype for t in ts if t is not None}
    if len(dts) > 1:
        raise TypeError(f"{names}: the Triton backend needs one dtype, got {sorted(map(str, dts))}")


def _dot_dtype(dtype: torch.dtype):
    """The dtype tiles are multiplied in (see the module docstring)."""
    if dtype == torch.bfloat16 and _config.interpreting():
        return tl.float32
    return _TL_DTYPES[dtype]


def _precision(dtype: torch.dtype) -> str:
    """The fp32 dot precision; 16-bit dots ignore it, so they always get one value (one variant)."""
    if dtype != torch.float32:
        return "tf32"
    return "ieee" if _config.interpreting() else _fp32_precision[0]


def _family(t: torch.Tensor) -> str:
    return _config.gpu_family(t.device)


def _row_block(H: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_H) of the row-copy kernels: ~4K elements per program on a GPU, larger
    tiles under the interpreter (whose cost is per program)."""
    bh = min(triton.next_power_of_2(max(H, 1)), 128 if _config.interpreting() else 256)
    br = max(1, (4096 if _config.interpreting() else 2048) // bh)
    return min(br, 64), bh


def _empty(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0)


# --------------------------------------------------------------------------------------------------
# top-k gating
# --------------------------------------------------------------------------------------------------


def _gating_launch(
    router_logits,
    top_k,
    scoring,
    renormalize,
    correction_bias,
    num_expert_groups,
    topk_groups,
    routed_scaling_factor,
    counts,
):
    if router_logits.dim() != 2:
        raise ValueError(f"router_logits must be [T, E], got shape {tuple(router_logits.shape)}")
    _check_float("router_logits", router_logits)
    T, E = router_logits.shape
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k must be in [1, E={E}], got {top_k}")
    if scoring not in ("softmax", "sigmoid"):
        raise ValueError(f"scoring must be 'softmax' or 'sigmoid', got {scoring!r}")
    G = int(num_expert_groups)
    if G > 0:
        if E % G != 0:
            raise ValueError(f"num_expert_groups={G} must divide the number of experts E={E}")
        if not 1 <= topk_groups <= G:
            raise ValueError(
                f"topk_groups must be in [1, num_expert_groups={G}], got {topk_groups}"
            )
    if correction_bias is not None and tuple(correction_bias.shape) != (E,):
        raise ValueError(f"correction_bias must be [E={E}], got {tuple(correction_bias.shape)}")
    dev = router_logits.device
    weights = _alloc((T, top_k), torch.float32, dev)
    ids = _alloc((T, top_k), torch.int32, dev)
    if T == 0:
        return weights, ids
    bs = _gating.block_sizes(E, top_k, G)
    bias = correction_bias.contiguous() if correction_bias is not None else weights
    with _ctx(router_logits):
        _gating.topk_gating_kernel[(triton.cdiv(T, bs["BLOCK_T"]),)](
            router_logits,
            bias,
            weights,
            ids,
            counts if counts is not None else ids,
            T,
            E,
            top_k,
            router_logits.stride(0),
            router_logits.stride(1),
            max(E // G, 1) if G > 0 else 1,
            G,
            int(topk_groups) if G > 0 else 0,
            float(routed_scaling_factor),
            SIGMOID=scoring == "sigmoid",
            HAS_BIAS=correction_bias is not None,
            RENORM=bool(renormalize),
            GROUPED=G > 0,
            COUNTS=counts is not None,
            num_warps=4,
            **bs,
        )
    return weights, ids


def topk_gating(
    router_logits,
    top_k,
    scoring,
    renormalize,
    correction_bias,
    num_expert_groups,
    topk_groups,
    routed_scaling_factor,
):
    return _gating_launch(
        router_logits,
        top_k,
        scoring,
        renormalize,
        correction_bias,
        num_expert_groups,
        topk_groups,
        routed_scaling_factor,
        None,
    )


def topk_gating_with_counts(
    router_logits,
    top_k,
    scoring="softmax",
    renormalize=True,
    correction_bias=None,
    num_expert_groups=0,
    topk_groups=0,
    routed_scaling_factor=1.0,
):
    """:func:`topk_gating` that also returns ``tokens_per_expert`` int32 [E], counted in the same
    pass (integer atomics: deterministic)."""
    E = router_logits.shape[-1]
    counts = torch.zeros(E, dtype=torch.int32, device=router_logits.device)
    w, ids = _gating_launch(
        router_logits,
        top_k,
        scoring,
        renormalize,
        correction_bias,
        num_expert_groups,
        topk_groups,
        routed_scaling_factor,
        counts,
    )
    return w, ids, counts


def topk_gating_backward(
    grad_weights, router_logits, topk_ids, scoring, renormalize, routed_scaling_factor
):
    T, E = router_logits.shape
    k = topk_ids.shape[1]
    grad = _alloc((T, E), router_logits.dtype, router_logits.device)
    if T == 0:
        return grad
    bs = _gating.block_sizes(E, k, 0)
    with _ctx(router_logits):
        _gating.topk_gating_bwd_kernel[(triton.cdiv(T, bs["BLOCK_T"]),)](
            grad_weights,
            router_logits,
            topk_ids,
            grad,
            T,
            E,
            k,
            router_logits.stride(0),
            router_logits.stride(1),
            grad_weights.stride(0),
            grad_weights.stride(1),
            topk_ids.stride(0),
            topk_ids.stride(1),
            float(routed_scaling_factor),
            SIGMOID=scoring == "sigmoid",
            RENORM=bool(renormalize),
            BLOCK_T=bs["BLOCK_T"],
            BLOCK_E=bs["BLOCK_E"],
            num_warps=4,
        )
    return grad


# --------------------------------------------------------------------------------------------------
# routing
# --------------------------------------------------------------------------------------------------


def _num_rows(TK: int, E: int, block_size: int) -> int:
    if block_size <= 0:
        return TK
    return (TK + E * (block_size - 1) + block_size - 1) // block_size * block_size


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
    num_rows = _num_rows(TK, E, block_size)
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


# --------------------------------------------------------------------------------------------------
# permute / unpermute
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# grouped GEMM
# --------------------------------------------------------------------------------------------------


def _fma_config(cfg: _config.GemmConfig) -> _config.GemmConfig:
    """Tiles for full-fp32 (``ieee``) dots, which run on FMA units with both operand tiles in
    registers: thin K steps and at most 64 (16 for 128-row tiles) columns, so nothing spills.
    BLOCK_M is kept (it is the routing plan's block size in ``moe_ffn``)."""
    bm = cfg.BLOCK_M
    return _config.GemmConfig(
        BLOCK_M=bm,
        BLOCK_N=min(cfg.BLOCK_N, 64 if bm <= 64 else 16),
        BLOCK_K=8,
        GROUP_M=cfg.GROUP_M,
        num_warps=4 if bm <= 64 else 8,
        num_stages=2,
    )


def _launch_mm(
    a,
    b_view,
    out,
    *,
    offs=None,
    block_expert=None,
    slot=None,
    w=None,
    bias=None,
    top_k=1,
    act=0,
    up_offset=0,
    col_mult=1,
    alpha=1.0,
    limit=0.0,
    cfg,
    padded,
    gather,
    E,
):
    """``out = epilogue(A @ B[e])`` per row tile; ``b_view`` = (tensor, stride_e, stride_k,
    stride_n, K, N) describes B[e] as a [K, N] matrix whatever b's layout."""
    b, sbe, sbk, sbn, K, N = b_view
    M = out.shape[0]
    if M == 0 or N == 0:
        return out
    if _precision(b.dtype) == "ieee" and not _config.interpreting():
        cfg = _fma_config(cfg)
    if padded:
        m_tiles = M // cfg.BLOCK_M
    else:
        m_tiles = triton.cdiv(M, cfg.BLOCK_M) + E + 1
    grid = (m_tiles * triton.cdiv(N, cfg.BLOCK_N),)
    dummy = out
    with _ctx(a):
        _gemm.grouped_mm_kernel[grid](
            a,
            b,
            out,
            offs if offs is not None else dummy,
            block_expert if block_expert is not None else dummy,
            slot if slot is not None else dummy,
            w if w is not None else dummy,
            bias if bias is not None else dummy,
            M,
            N,
            K,
            E,
            top_k,
            m_tiles,
            a.stride(0),
            a.stride(1),
            sbe,
            sbk,
            sbn,
            out.stride(0),
            out.stride(1),
            bias.stride(0) if bias is not None else 0,
            bias.stride(1) if bias is not None else 0,
            up_offset,
            col_mult,
            float(alpha),
            float(limit),
            1 if bias is not None else 0,
            1 if w is not None else 0,
            PADDED=padded,
            GATHER=gather,
            ACT=act,
            DOT_DTYPE=_dot_dtype(b.dtype),
            PRECISION=_precision(b.dtype),
            BLOCK_M=cfg.BLOCK_M,
            BLOCK_N=cfg.BLOCK_N,
            BLOCK_K=cfg.BLOCK_K,
            GROUP_M=cfg.GROUP_M,
            BLOCK_E=min(triton.next_power_of_2(max(E, 1)), 128),
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
    return out


def _launch_ragged_k(p, q, out, offs, *, slot=None, top_k=1, cfg, E):
    """``out[e] = P[seg e]^T @ Q[seg e]``; ``out`` is [E, MO, NO] (any strides)."""
    _, MO, NO = out.shape
    if E == 0 or MO == 0 or NO == 0:
        return out
    if _precision(q.dtype) == "ieee" and not _config.interpreting():
        cfg = _fma_config(cfg)
    grid = (triton.cdiv(MO, cfg.BLOCK_M) * triton.cdiv(NO, cfg.BLOCK_N), E)
    with _ctx(p):
        _gemm.ragged_k_kernel[grid](
            p,
            q,
            out,
            offs,
            slot if slot is not None else offs,
            MO,
            NO,
            top_k,
            p.stride(0),
            p.stride(1),
            q.stride(0),
            q.stride(1),
            out.stride(0),
            out.stride(1),
            out.stride(2),
            GATHER_Q=slot is not None,
            DOT_DTYPE=_dot_dtype(q.dtype),
            PRECISION=_precision(q.dtype),
            BLOCK_M=cfg.BLOCK_M,
            BLOCK_N=cfg.BLOCK_N,
            BLOCK_K=cfg.BLOCK_K,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
    return out


def _b_view(b: torch.Tensor, trans_b: bool, transpose: bool = False):
    """B[e] as a [K, N] matrix: b is [E, K, N] (or [E, N, K] with trans_b); ``transpose`` views
    B[e]^T instead (the data-gradient GEMM)."""
    if trans_b:
        sk, sn, K, N = b.stride(2), b.stride(1), b.shape[2], b.shape[1]
    else:
        sk, sn, K, N = b.stride(1), b.stride(2), b.shape[1], b.shape[2]
    if transpose:
        sk, sn, K, N = sn, sk, N, K
    return (b, b.stride(0), sk, sn, K, N)


def _check_gemm(a, b, offs, trans_b):
    if a.dim() != 2:
        raise ValueError(f"a must be [M, K], got shape {tuple(a.shape)}")
    if b.dim() != 3:
        raise ValueError(f"b must be [E, K, N] (or [E, N, K]), got shape {tuple(b.shape)}")
    _check_float("a", a)
    _check_same_dtype("a, b", a, b)
    K = b.shape[2] if trans_b else b.shape[1]
    if a.shape[1] != K:
        raise ValueError(f"a has K={a.shape[1]} columns but b expects K={K}")
    if offs.dim() != 1 or offs.shape[0] != b.shape[0]:
        raise ValueError(f"offs must be [E={b.shape[0]}], got shape {tuple(offs.shape)}")


def grouped_gemm(a, b, offs, trans_b):
    _check_gemm(a, b, offs, trans_b)
    E = b.shape[0]
    view = _b_view(b, trans_b)
    M, K, N = a.shape[0], view[4], view[5]
    cfg = _config.lookup("gemm", _family(a), _config.DTYPE_NAMES[a.dtype], M / max(E, 1), N, K)
    out = _alloc((M, N), a.dtype, a.device)
    return _launch_mm(
        a,
        view,
        out,
        offs=offs.to(torch.int32).contiguous(),
        cfg=cfg,
        padded=False,
        gather=False,
        E=E,
    )


def grouped_gemm_backward(grad_out, a, b, offs, trans_b, need_grad_a, need_grad_b):
    _check_gemm(a, b, offs, trans_b)
    E = b.shape[0]
    offs32 = offs.to(torch.int32).contiguous()
    g = grad_out.to(a.dtype)
    M, K = a.shape
    N = grad_out.shape[1]
    grad_a, grad_b = _empty(a), _empty(b)
    dt = _config.DTYPE_NAMES[a.dtype]
    if need_grad_a:
        cfg = _config.lookup("gemm", _family(a), dt, M / max(E, 1), K, N)
        grad_a = _launch_mm(
            g,
            _b_view(b, trans_b, transpose=True),
            _alloc((M, K), a.dtype, a.device),
            offs=offs32,
            cfg=cfg,
            padded=False,
            gather=False,
            E=E,
        )
    if need_grad_b:
        cfg = _config.lookup("ragged_k", _family(a), dt, M / max(E, 1), N, K)
        grad_b = _alloc(tuple(b.shape), b.dtype, b.device)
        if trans_b:  # grad_b[e] [N, K] = g_e^T a_e
            _launch_ragged_k(g, a, grad_b, offs32, cfg=cfg, E=E)
        else:  # grad_b[e] [K, N] = a_e^T g_e
            _launch_ragged_k(a, g, grad_b, offs32, cfg=cfg, E=E)
    return grad_a, grad_b


# --------------------------------------------------------------------------------------------------
# the expert FFN
# --------------------------------------------------------------------------------------------------


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
    # GEMM 1 with the gather of token rows in its loads and the activation in its epilogue
    act = _alloc((p.num_rows, p.I), x.dtype, x.device)
    gu_view = (w_gate_up, w_gate_up.stride(0), w_gate_up.stride(2), w_gate_up.stride(1), H, p.I)
    _launch_mm(
        x,
        gu_view,
        act,
        block_expert=p.block_expert,
        slot=p.slot_of_row,
        bias=gate_up_bias,
        top_k=p.k,
        act=p.act,
        up_offset=p.up_offset,
        col_mult=p.col_mult,
        alpha=alpha,
        limit=limit,
        cfg=p.glu_cfg,
        padded=True,
        gather=True,
        E=p.E,
    )
    # GEMM 2 with the routing weight in its epilogue, fp32 rows; then the fp32 slot-order sum
    y = _alloc((p.num_rows, H), torch.float32, x.device)
    down_view = (w_down, w_down.stride(0), w_down.stride(2), w_down.stride(1), p.I, H)
    _launch_mm(
        act,
        down_view,
        y,
        block_expert=p.block_expert,
        slot=p.slot_of_row,
        w=w_flat,
        bias=down_bias,
        top_k=p.k,
        cfg=p.down_cfg,
        padded=True,
        gather=False,
        E=p.E,
    )
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
    gu_full = (w_gate_up, w_gate_up.stride(0), w_gate_up.stride(2), w_gate_up.stride(1), H, two_i)
    _launch_mm(
        x,
        gu_full,
        h,
        block_expert=p.block_expert,
        slot=p.slot_of_row,
        bias=gate_up_bias,
        top_k=p.k,
        cfg=p.up_cfg,
        padded=True,
        gather=True,
        E=p.E,
    )
    act = _alloc((p.num_rows, p.I), mdt, dev)
    br, bi = _row_block(p.I)
    with _ctx(x):
        _gemm.glu_kernel[(triton.cdiv(p.num_rows, br), triton.cdiv(p.I, bi))](
            h,
            h,
            act,
            p.num_rows,
            p.I,
            h.stride(0),
            0,
            act.stride(0),
            p.up_offset,
            p.col_mult,
            float(alpha),
            float(limit),
            ACT=p.act,
            BACKWARD=False,
            BLOCK_R=br,
            BLOCK_I=bi,
            num_warps=4,
        )
    y = _alloc((p.num_rows, H), torch.float32, dev)
    down_view = (w_down, w_down.stride(0), w_down.stride(2), w_down.stride(1), p.I, H)
    _launch_mm(
        act,
        down_view,
        y,
        block_expert=p.block_expert,
        slot=p.slot_of_row,
        bias=down_bias,
        top_k=p.k,
        cfg=p.down_cfg,
        padded=True,
        gather=False,
        E=p.E,
    )
    # d(topk_weights)[t, s] = <grad_out[t], y[row(t, s)]>; dy[r] = w[slot] grad_out[token]
    grad_tw = _slot_dot(g, y, p.row_of_slot, topk_weights.dtype)
    dy = _permute_rows(g, p.slot_of_row, p.k, w_flat, mdt)
    grad_db = _empty(x)
    if down_bias is not None:
        grad_db = _alloc(tuple(down_bias.shape), down_bias.dtype, dev)
        bn = min(triton.next_power_of_2(H), 128)
        with _ctx(x):
            _permute.segment_sum_kernel[(p.E, triton.cdiv(H, bn))](
                g,
                p.offs,
                p.slot_of_row,
                w_flat,
                grad_db,
                H,
                p.k,
                g.stride(0),
                g.stride(1),
                grad_db.stride(0),
                GATHER=True,
                BLOCK_R=32,
                BLOCK_N=bn,
                num_warps=4,
            )
    grad_wd = _alloc(tuple(w_down.shape), w_down.dtype, dev)
    _launch_ragged_k(dy, act, grad_wd, p.offs, cfg=p.rk_cfg, E=p.E)
    # da = dy W_d (fp32), dh = act'(h) da
    da = _alloc((p.num_rows, p.I), torch.float32, dev)
    wd_t = (w_down, w_down.stride(0), w_down.stride(1), w_down.stride(2), H, p.I)
    _launch_mm(
        dy,
        wd_t,
        da,
        block_expert=p.block_expert,
        slot=p.slot_of_row,
        top_k=p.k,
        cfg=p.da_cfg,
        padded=True,
        gather=False,
        E=p.E,
    )
    dh = _alloc((p.num_rows, two_i), mdt, dev)
    with _ctx(x):
        _gemm.glu_kernel[(triton.cdiv(p.num_rows, br), triton.cdiv(p.I, bi))](
            h,
            da,
            dh,
            p.num_rows,
            p.I,
            h.stride(0),
            da.stride(0),
            dh.stride(0),
            p.up_offset,
            p.col_mult,
            float(alpha),
            float(limit),
            ACT=p.act,
            BACKWARD=True,
            BLOCK_R=br,
            BLOCK_I=bi,
            num_warps=4,
        )
    grad_gub = _empty(x)
    if gate_up_bias is not None:
        grad_gub = _alloc(tuple(gate_up_bias.shape), gate_up_bias.dtype, dev)
        bn = min(triton.next_power_of_2(two_i), 128)
        with _ctx(x):
            _permute.segment_sum_kernel[(p.E, triton.cdiv(two_i, bn))](
                dh,
                p.offs,
                p.slot_of_row,
                w_flat,
                grad_gub,
                two_i,
                p.k,
                dh.stride(0),
                dh.stride(1),
                grad_gub.stride(0),
                GATHER=False,
                BLOCK_R=32,
                BLOCK_N=bn,
                num_warps=4,
            )
    grad_wgu = _alloc(tuple(w_gate_up.shape), w_gate_up.dtype, dev)
    _launch_ragged_k(dh, x, grad_wgu, p.offs, slot=p.slot_of_row, top_k=p.k, cfg=p.rk_cfg, E=p.E)
    # dx: dh W_gu per row (fp32), summed over the k slots in order
    dxr = _alloc((p.num_rows, H), torch.float32, dev)
    gu_t = (w_gate_up, w_gate_up.stride(0), w_gate_up.stride(1), w_gate_up.stride(2), two_i, H)
    _launch_mm(
        dh,
        gu_t,
        dxr,
        block_expert=p.block_expert,
        slot=p.slot_of_row,
        top_k=p.k,
        cfg=p.dx_cfg,
        padded=True,
        gather=False,
        E=p.E,
    )
    grad_x = _unpermute_rows(dxr, p.row_of_slot, None, x.dtype)
    return grad_x, grad_wgu, grad_wd, grad_tw, grad_gub, grad_db


IMPLS: dict[str, Callable] = {
    "topk_gating": topk_gating,
    "topk_gating_backward": topk_gating_backward,
    "route": route,
    "permute": permute,
    "unpermute": unpermute,
    "unpermute_backward": unpermute_backward,
    "grouped_gemm": grouped_gemm,
    "grouped_gemm_backward": grouped_gemm_backward,
    "moe_ffn": moe_ffn,
    "moe_ffn_backward": moe_ffn_backward,
}
