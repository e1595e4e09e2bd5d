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
* :func:`cka` -- centered kernel alignment of two representations (Kornblith et al. 2019), the
  similarity SimSMoE (Do, Le, Tran, Findings of NAACL 2025) penalises between co-selected experts.

Both return a 0-d float32 tensor computed in float32 (0 for T = 0 tokens), differentiable in
``router_logits``, without host synchronisation (token counts stay on the device).
"""

from __future__ import annotations

import torch

from ._api import _float, _index, _int, _same_device, _tensor

__all__ = ["cka", "load_balancing_loss", "z_loss"]


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


def _centered_gram(g: torch.Tensor) -> torch.Tensor:
    """H G H with H = I - 11ᵀ/n: the Gram matrix with its row and column means removed."""
    return g - g.mean(dim=0, keepdim=True) - g.mean(dim=1, keepdim=True) + g.mean()


def _rbf_gram(x: torch.Tensor, sigma: float | None) -> torch.Tensor:
    """exp(-‖a - b‖² / (2σ²)) over the rows of x; σ = sqrt(median of the non-zero squared
    distances) when ``sigma`` is None (the median is taken as a constant: no gradient through it)."""
    sq = (x * x).sum(dim=1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (x @ x.t())).clamp_min(0.0)
    d2 = d2 * (1.0 - torch.eye(x.shape[0], dtype=x.dtype, device=x.device))  # exact zero diagonal
    if sigma is None:
        with torch.no_grad():
            nz = d2[d2 > 0]
            s2 = nz.median() if nz.numel() else torch.ones((), dtype=x.dtype, device=x.device)
    else:
        s2 = torch.as_tensor(float(sigma) ** 2, dtype=x.dtype, device=x.device)
    return torch.exp(-d2 / (2.0 * s2))


def cka(
    x: torch.Tensor, y: torch.Tensor, *, kernel: str = "linear", sigma: float | None = None
) -> torch.Tensor:
    """Centered kernel alignment of two representations of the same n samples.

    ``CKA = HSIC(K, L) / sqrt(HSIC(K, K) · HSIC(L, L))`` with ``HSIC(K, L) = tr(K H L H)`` (the
    (n - 1)² normalisation cancels), ``H = I - 11ᵀ/n``, and K, L the Gram matrices of the rows of
    x and y: ``x xᵀ`` (``kernel="linear"``) or ``exp(-‖a - b‖² / (2σ²))`` (``kernel="rbf"``; σ =
    ``sigma``, or when None the square root of the median of the non-zero squared pairwise
    distances of that matrix, computed for x and y separately).

    Args:
        x: [n, d1] float.  y: [n, d2] float (same n; n >= 2).
        kernel: "linear" or "rbf".  sigma: the RBF width, > 0, or None.

    Returns:
        0-d float32 in [0, 1] (computed in float32, float64 inputs in float64 then cast),
        differentiable in x and y.  1 when the representations match up to what the kernel
        ignores (for linear CKA: an orthogonal transform and an isotropic scaling); 0 when a
        centred Gram matrix vanishes (a constant representation).
    """
    _tensor("x", x, 2)
    _tensor("y", y, 2)
    _float("x", x)
    _float("y", y)
    _same_device(x=x, y=y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"x and y must have the same number of rows, got {x.shape[0]} and {y.shape[0]}"
        )
    if x.shape[0] < 2:
        raise ValueError(f"cka needs at least 2 samples, got {x.shape[0]}")
    if kernel not in ("linear", "rbf"):
        raise ValueError(f"kernel must be 'linear' or 'rbf', got {kernel!r}")
    if sigma is not None and not (float(sigma) > 0 and float(sigma) < float("inf")):
        raise ValueError(f"sigma must be a positive finite float or None, got {sigma!r}")
    cdt = torch.float64 if torch.float64 in (x.dtype, y.dtype) else torch.float32
    xf, yf = x.to(cdt), y.to(cdt)
    if kernel == "linear":
        k, l_ = xf @ xf.t(), yf @ yf.t()
    else:
        k, l_ = _rbf_gram(xf, sigma), _rbf_gram(yf, sigma)
    kc, lc = _centered_gram(k), _centered_gram(l_)
    hsic_kl = (kc * lc).sum()
    denom = ((kc * kc).sum() * (lc * lc).sum()).sqrt()
    tiny = torch.finfo(cdt).tiny
    return torch.where(denom > tiny, hsic_kl / denom.clamp_min(tiny), 0.0).to(torch.float32)
