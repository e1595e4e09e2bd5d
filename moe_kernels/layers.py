"""``torch.nn`` modules built on the moe_kernels ops."""

from __future__ import annotations

import math

import torch
from torch import nn

from . import _api

__all__ = ["MoE"]


class MoE(nn.Module):
    """A routed Mixture-of-Experts feed-forward layer: router, top-k gating and the expert FFN.

    ``forward(x)`` computes ``router_logits = router(x)``, ``(topk_weights, topk_ids) =
    topk_gating(router_logits, ...)`` and ``moe_ffn(x, gate_up_proj, down_proj, topk_weights,
    topk_ids, ...)``; the options mirror those of :func:`moe_kernels.topk_gating` and
    :func:`moe_kernels.moe_ffn`.

    Parameters use Hugging Face transformers' expert layout, so weights load from (or copy into)
    HF experts modules without reshaping:

    * ``router.weight`` [E, H] (and ``router.bias`` [E] if ``router_bias``), an ``nn.Linear``;
    * ``gate_up_proj`` [E, 2I, H]: gate rows then up rows (alternating rows if ``interleaved``);
    * ``down_proj`` [E, H, I];
    * ``gate_up_proj_bias`` [E, 2I] and ``down_proj_bias`` [E, H] if ``bias``;
    * buffer ``e_score_correction_bias`` [E] (float32, zeros) if ``correction_bias``
      (DeepSeek-V3's selection-only bias).

    Args:
        hidden_size: H.  intermediate_size: I.  num_experts: E.  top_k: k (1 <= k <= E).
        scoring, renormalize, num_expert_groups, topk_groups, routed_scaling_factor: as in
            :func:`moe_kernels.topk_gating`.
        correction_bias: allocate ``e_score_correction_bias``.
        activation, alpha, limit, interleaved: as in :func:`moe_kernels.moe_ffn`.
        bias: allocate the expert biases.  router_bias: give the router a bias.
        backend: the backend of every op (``None``: automatic choice).
        device, dtype: of the parameters (the router is kept in ``router_dtype``, float32 by
            default, since routing decisions are sensitive to rounding; ``None`` uses ``dtype``).

    Input ``x`` is ``[..., H]``; the output has the same shape and dtype. With
    ``return_router_logits=True`` forward returns ``(out, router_logits [T, E])``.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        *,
        scoring: str = "softmax",
        renormalize: bool = True,
        num_expert_groups: int | None = None,
        topk_groups: int | None = None,
        routed_scaling_factor: float = 1.0,
        correction_bias: bool = False,
        activation: str = "swiglu",
        alpha: float = 1.702,
        limit: float = 7.0,
        interleaved: bool = False,
        bias: bool = False,
        router_bias: bool = False,
        backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        router_dtype: torch.dtype | None = torch.float32,
    ) -> None:
        super().__init__()
        for name, value in (
            ("hidden_size", hidden_size),
            ("intermediate_size", intermediate_size),
            ("num_experts", num_experts),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
            raise ValueError(
                f"top_k must be an int in [1, num_experts={num_experts}], got {top_k!r}"
            )
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.scoring = scoring
        self.renormalize = renormalize
        self.num_expert_groups = num_expert_groups
        self.topk_groups = topk_groups
        self.routed_scaling_factor = routed_scaling_factor
        self.activation = activation
        self.alpha = alpha
        self.limit = limit
        self.interleaved = interleaved
        self.backend = backend

        factory = {"device": device, "dtype": dtype}
        self.router = nn.Linear(
            hidden_size,
            num_experts,
            bias=router_bias,
            device=device,
            dtype=router_dtype if router_dtype is not None else dtype,
        )
        E, H, inter = num_experts, hidden_size, intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * inter, H, **factory))
        self.down_proj = nn.Parameter(torch.empty(E, H, inter, **factory))
        if bias:
            self.gate_up_proj_bias = nn.Parameter(torch.empty(E, 2 * inter, **factory))
            self.down_proj_bias = nn.Parameter(torch.empty(E, H, **factory))
        else:
            self.register_parameter("gate_up_proj_bias", None)
            self.register_parameter("down_proj_bias", None)
        if correction_bias:
            self.register_buffer(
                "e_score_correction_bias", torch.zeros(E, device=device, dtype=torch.float32)
            )
        else:
            self.e_score_correction_bias = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's default initialisation, applied to every expert."""
        self.router.reset_parameters()
        for w, b in (
            (self.gate_up_proj, self.gate_up_proj_bias),
            (self.down_proj, self.down_proj_bias),
        ):
            bound = 1.0 / math.sqrt(w.shape[-1])
            nn.init.uniform_(w, -bound, bound)
            if b is not None:
                nn.init.uniform_(b, -bound, bound)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router of ``x`` [T, H]: (router_logits [T, E], topk_weights f32 [T, k], topk_ids i32 [T, k])."""
        logits = self.router(x.to(self.router.weight.dtype))
        weights, ids = _api.topk_gating(
            logits,
            self.top_k,
            scoring=self.scoring,
            renormalize=self.renormalize,
            correction_bias=self.e_score_correction_bias,
            num_expert_groups=self.num_expert_groups,
            topk_groups=self.topk_groups,
            routed_scaling_factor=self.routed_scaling_factor,
            backend=self.backend,
        )
        return logits, weights, ids

    def experts(
        self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        """The expert FFN of ``x`` [T, H] for a given routing; [T, H] in x's dtype."""
        w_dtype = self.gate_up_proj.dtype
        out = _api.moe_ffn(
            x.to(w_dtype),
            self.gate_up_proj,
            self.down_proj,
            topk_weights,
            topk_ids,
            activation=self.activation,
            gate_up_bias=self.gate_up_proj_bias,
            down_bias=self.down_proj_bias,
            alpha=self.alpha,
            limit=self.limit,
            interleaved=self.interleaved,
            backend=self.backend,
        )
        return out.to(x.dtype)

    def forward(self, x: torch.Tensor, return_router_logits: bool = False):
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"x must be [..., {self.hidden_size}], got {tuple(x.shape)}")
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.hidden_size)
        logits, weights, ids = self.route(flat)
        out = self.experts(flat, weights, ids).reshape(*lead, self.hidden_size)
        return (out, logits) if return_router_logits else out

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, "
            f"num_experts={self.num_experts}, top_k={self.top_k}, scoring={self.scoring!r}, "
            f"activation={self.activation!r}, backend={self.backend!r}"
        )
