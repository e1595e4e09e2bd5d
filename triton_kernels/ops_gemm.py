"""Launchers of the grouped GEMM and its backward (the data gradient is a grouped GEMM on the
transposed weight view, the weight gradient a ragged-K GEMM)."""

from __future__ import annotations

import torch

from . import _config
from .ops_common import (
    _alloc,
    _b_view,
    _check_float,
    _check_same_dtype,
    _empty,
    _family,
    _launch_mm,
    _launch_ragged_k,
)


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
    M, K, N = a.shape[0], view.K, view.N
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
