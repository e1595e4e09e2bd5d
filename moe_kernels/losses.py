"""Auxiliary losses of MoE routers, for people who route with their own code.

:class:`moe_kernels.MoE` computes the same two losses (``aux_loss_coef``, ``z_loss_coef``) and
adds them to the backward pass itself; these functions are the definitions it uses.

* :func:`load_balancing_loss` -- the Switch Transformer's auxiliary load-balancing loss (Fedus et
  al. 2021, eq. 4-6), as Hugging Face transformers' ``load_balancing_loss_func`` computes it:
  ``E · Σ_e f_e · P_e``, with ``f_e`` the fraction of the T tokens that selected expert e (counting
  each of a token's k slots, so a uniform routing gives f_e = k / E and a loss of k) and ``P_e`` the
  mean router probability of expert e. For sigmoid scoring, ``P_e`` is the mean over tokens of the
  per-token normalised scores ``s_te / Σ_j s_tj`` (DeepSeek-V3's sequence-wise balance loss, without
  its constant factor E / k on f).
* :func:`z_loss` -- ST-MoE's router z-loss (Zoph et al. 2022, eq. 5): the mean over tokens of
  ``logsumexp(logits)²``, which keeps the router's logits small.

Both return a 0-d float32 tensor computed in float32 (0 for T = 0 tokens), differentiable in
``router_logits``, without host synchronisation (token counts stay on the device).
"""

from __future__ import annotations

import torch

from ._api import _float, _index, _int, _same_device, _tensor

__all__ = ["load_balancing_loss", "z_loss"]


def _tokens_per_expert(topk_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] int64: how many (token, slot) pairs of ``topk_ids`` [T, k] name each expert; ids outside
    [0, E) count for none.  A sort and a binary search: no atomics (deterministic), no host sync,
    fixed output size (torch.compile traces it)."""
    flat = topk_ids.reshape(-1).to(torch.int64).sort().values
    bounds = torch.arange(num_experts + 1, dtype=torch.int64, device=flat.device)
    ends = torch.searchsorted(flat, bounds)
    return ends[1:] - ends[:-1]


def _load_balancing(router_logits: torch.Tensor, counts: torch.Tensor, scoring: str):
    """E · Σ_e (counts_e / T) · P_e in float32 (``counts`` [E] from :func:`_tokens_per_expert`)."""
    T, E = router_logits.shape
    logits = router_logits.float()
    if scoring == "softmax":
        probs = torch.softmax(logits, dim=-1)
    else:
        scores = torch.sigmoid(logits)
        # a row whose scores all underflow to 0 contributes 0 instead of NaN
        probs = scores / scores.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    denom = max(T, 1)
    f = counts.to(torch.float32) / denom
    p = probs.sum(dim=0) / denom
    return (f * p).sum() * E


def _z_loss(router_logits: torch.Tensor) -> torch.Tensor:
    T = router_logits.shape[0]
    return torch.logsumexp(router_logits.float(), dim=-1).square().sum() / max(T, 1)


def load_balancing_loss(
    router_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    num_experts: int,
    *,
    scoring: str = "softmax",
) -> torch.Tensor:
    """The Switch Transformer's load-balancing loss ``E · Σ_e f_e · P_e``.

    Args:
        router_logits: [T, E] float, the logits the routing used.
        topk_ids: [T, k] int32/int64, the experts each token selected (before any capacity drop);
            ids outside [0, E) count for no expert.
        num_experts: E, which must equal ``router_logits.shape[1]``.
        scoring: ``"softmax"``: ``P_e`` is the mean of ``softmax(router_logits)[:, e]``, exactly
            transformers' ``load_balancing_loss_func`` on the same logits and selection;
            ``"sigmoid"``: the mean of ``s_te / Σ_j s_tj`` with ``s = sigmoid(router_logits)``.

    Returns:
        0-d float32 tensor, differentiable in ``router_logits`` (``f_e`` is a count: no gradient).
        Equals k for a perfectly balanced routing (f_e = k / E, P_e = 1 / E).
    """
    _tensor("router_logits", router_logits, 2)
    _tensor("topk_ids", topk_ids, 2)
    _float("router_logits", router_logits)
    _index("topk_ids", topk_ids)
    _int("num_experts", num_experts, 1)
    if router_logits.shape[1] != num_experts:
        raise ValueError(
            f"router_logits has {router_logits.shape[1]} experts but num_experts = {num_experts}"
        )
    if topk_ids.shape[0] != router_logits.shape[0]:
        raise ValueError(
            f"topk_ids has {topk_ids.shape[0]} tokens but router_logits has "
            f"{router_logits.shape[0]}"
        )
    if scoring not in ("softmax", "sigmoid"):
        raise ValueError(f"scoring must be 'softmax' or 'sigmoid', got {scoring!r}")
    _same_device(router_logits=router_logits, topk_ids=topk_ids)
    return _load_balancing(router_logits, _tokens_per_expert(topk_ids, num_experts), scoring)


def z_loss(router_logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's router z-loss: ``mean_t logsumexp(router_logits[t])²``.

    Args:
        router_logits: [T, E] float.

    Returns:
        0-d float32 tensor, differentiable in ``router_logits``.
    """
    _tensor("router_logits", router_logits, 2)
    _float("router_logits", router_logits)
    return _z_loss(router_logits)
