"""What every Triton launcher shares: output allocation (poisoned in debug mode), argument
checks, dtype / precision choices, the device context, and the two GEMM launch helpers
(:func:`_launch_mm`, :func:`_launch_ragged_k`) with the weight view :func:`_b_view` they take.

The per-op launchers live in ``ops_gating``, ``ops_routing``, ``ops_permute``, ``ops_gemm`` and
``ops_moe_ffn``; :mod:`.ops` collects them into ``IMPLS``. See :mod:`.ops` for the numerics.
"""

from __future__ import annotations

import contextlib
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .._debug import debug_mode
from . import _config, _gemm

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}

_fp32_precision = [os.environ.get("MOE_KERNELS_TRITON_FP32", "tf32")]


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


def _alloc(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Output buffer; NaN-filled (or -7 for integers) in debug mode
    (:func:`moe_kernels._debug.debug_mode`) so that an element a kernel fails to write shows up."""
    if debug_mode():
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
# GEMM launches
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
    """``out = epilogue(A @ B[e])`` per row tile; ``b_view`` (:class:`BView`, from :func:`_b_view`)
    describes B[e] as a [K, N] matrix whatever b's layout."""
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


class BView(NamedTuple):
    """B[e] of a grouped GEMM as a [K, N] matrix: element (e, k, n) is at
    ``b[e * stride_e + k * stride_k + n * stride_n]``."""

    b: torch.Tensor
    stride_e: int
    stride_k: int
    stride_n: int
    K: int
    N: int


def _b_view(b: torch.Tensor, trans_b: bool, transpose: bool = False) -> BView:
    """B[e] as a [K, N] matrix: b is [E, K, N] (or [E, N, K] with trans_b); ``transpose`` views
    B[e]^T instead (the data-gradient GEMM)."""
    if trans_b:
        sk, sn, K, N = b.stride(2), b.stride(1), b.shape[2], b.shape[1]
    else:
        sk, sn, K, N = b.stride(1), b.stride(2), b.shape[1], b.shape[2]
    if transpose:
        sk, sn, K, N = sn, sk, N, K
    return BView(b, b.stride(0), sk, sn, K, N)
