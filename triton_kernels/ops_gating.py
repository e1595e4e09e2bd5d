"""Launchers of top-k gating (forward, with optional per-expert counts, and backward)."""

from __future__ import annotations

import torch
import triton

from . import _gating
from .ops_common import _alloc, _check_float, _ctx


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
