"""``torch.nn`` modules built on the moe_kernels ops: the MoE layer, for inference and training."""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from . import _api, reference
from .losses import _load_balancing, _tokens_per_expert, _z_loss, cka

__all__ = [
    "MoE",
    "MoEAux",
    "SharedExperts",
    "capacity_keep_mask",
    "get_aux_loss_scale",
    "set_aux_loss_scale",
]

DROP_POLICIES = ("position", "priority")

# The factor the injected auxiliary-loss gradients are multiplied by (set_aux_loss_scale).
_aux_loss_scale: float | torch.Tensor = 1.0


def set_aux_loss_scale(scale: float | torch.Tensor) -> None:
    """Scale the gradients that every :class:`MoE` layer injects for its auxiliary losses.

    The layers add ``coef · loss`` to the backward pass themselves, with gradient ``coef``, as if
    the user's loss were ``main + coef · loss``.  When the main loss is scaled before
    ``backward()`` -- divided by the number of micro-batches in gradient accumulation, multiplied
    by a ``torch.amp.GradScaler``'s scale -- call this with the same factor so the auxiliary
    losses are scaled alike (Megatron-LM's ``MoEAuxLossAutoScaler.set_loss_scale`` plays this
    role).  The value is read when a layer's forward runs: set it before the forward pass whose
    backward it should scale.

    Args:
        scale: a finite float (default 1.0), or a 0-d floating tensor (used on the device,
            never read on the host; under ``torch.compile`` a new tensor value never recompiles,
            a new float value may).
    """
    global _aux_loss_scale
    if isinstance(scale, torch.Tensor):
        if scale.dim() != 0 or not scale.is_floating_point():
            raise ValueError(
                f"scale must be a 0-d floating tensor, got shape {tuple(scale.shape)} "
                f"and dtype {scale.dtype}"
            )
        _aux_loss_scale = scale.detach()
    else:
        _aux_loss_scale = _api._finite("scale", scale)


def get_aux_loss_scale() -> float | torch.Tensor:
    """The factor set by :func:`set_aux_loss_scale` (1.0 by default)."""
    return _aux_loss_scale


class _AttachLoss(torch.autograd.Function):
    """Identity on ``t`` (a copy) whose backward also seeds the gradient of ``loss`` (0-d) with 1:
    a loss computed in the forward pass reaches the parameters it depends on whenever ``t`` is
    back-propagated, with nothing stored outside the autograd graph.

    The layer applies it to the routing weights [T, k], which every backward pass of its output
    goes through: the copy costs T·k elements, and the layer's output stays an ordinary tensor
    (a view returned by a custom Function could not be modified in place)."""

    @staticmethod
    def forward(t: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        return t.clone()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        loss = inputs[1]
        ctx.loss_dtype = loss.dtype
        ctx.loss_device = loss.device

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        seed = torch.ones((), dtype=ctx.loss_dtype, device=ctx.loss_device)
        return grad, seed


@dataclasses.dataclass
class MoEAux:
    """Routing statistics of one :class:`MoE` forward, for logging (every tensor detached).

    Attributes:
        router_logits: [T, E] float, the logits the selection used (noise and jitter included).
        topk_ids: [T, k] int32, the selected experts (before capacity drops).
        topk_weights: [T, k] float32, the routing weights as selected (dropped slots keep theirs;
            the kept ones are not renormalised).
        kept: [T, k] bool, False for the (token, slot) assignments dropped by the capacity.
        tokens_per_expert: [E] int64, assignments per expert before drops.
        dropped: 0-d int64, the number of dropped assignments.
        load_balancing_loss: 0-d float32 (:func:`moe_kernels.losses.load_balancing_loss`).
        z_loss: 0-d float32 (:func:`moe_kernels.losses.z_loss`).
        similarity_loss: 0-d float32, SimSMoE's summed CKAs of this call
            (:meth:`MoE.similarity_loss`, before ``similarity_loss_coef``); 0 when the option is
            off, outside training, or when no tracked pair exceeds the threshold.
    """

    router_logits: torch.Tensor
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    kept: torch.Tensor
    tokens_per_expert: torch.Tensor
    dropped: torch.Tensor
    load_balancing_loss: torch.Tensor
    z_loss: torch.Tensor
    similarity_loss: torch.Tensor


def capacity_keep_mask(
    topk_ids: torch.Tensor,
    num_experts: int,
    capacity: int,
    priority: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which (token, slot) assignments fit in experts of ``capacity`` assignments each.

    Assignments are taken in slot order -- every token's first choice before any second choice
    -- and within a slot by token position (``priority=None``; Switch Transformer, GShard) or by
    descending ``priority``, ties to the earlier token (V-MoE's batch-prioritised routing); each
    expert keeps the first ``capacity`` of its assignments in that order.  Computed on the device
    with sorts and binary searches (no host synchronisation, deterministic).

    Args:
        topk_ids: [T, k] int32/int64; ids outside [0, E) are never kept.
        num_experts: E.
        capacity: C >= 0, the assignments each expert keeps.
        priority: [T] float or None.

    Returns:
        ``kept`` [T, k] bool and ``tokens_per_expert`` [E] int64 (assignments before drops).
    """
    _api._tensor("topk_ids", topk_ids, 2)
    _api._index("topk_ids", topk_ids)
    if capacity < 0:
        raise ValueError(f"capacity must be >= 0, got {capacity}")
    if priority is not None:
        _api._tensor("priority", priority, 1)
        _api._shape("priority", priority, (topk_ids.shape[0],))
    T, k = topk_ids.shape
    n = T * k
    stride = max(n, 1)
    device = topk_ids.device
    valid = (topk_ids >= 0) & (topk_ids < num_experts)
    ids = torch.where(valid, topk_ids.to(torch.int64), -1)  # any out-of-range id sorts as -1
    if priority is None:
        token_rank = torch.arange(T, dtype=torch.int64, device=device)
    else:
        order = torch.argsort(priority, descending=True, stable=True)
        token_rank = torch.empty(T, dtype=torch.int64, device=device)
        token_rank[order] = torch.arange(T, dtype=torch.int64, device=device)
    # position of each assignment in the keep order, then one key per (expert, position)
    position = token_rank[:, None] + torch.arange(k, dtype=torch.int64, device=device) * T
    key = (ids * stride + position).reshape(-1)
    sorted_key, index = torch.sort(key, stable=True)
    # rank of an assignment among its expert's: its index minus the index of the expert's first
    first = torch.searchsorted(
        sorted_key, torch.div(sorted_key, stride, rounding_mode="floor") * stride
    )
    rank = torch.arange(n, dtype=torch.int64, device=device) - first
    kept = torch.empty(n, dtype=torch.bool, device=device)
    kept[index] = rank < capacity
    ends = torch.searchsorted(
        sorted_key, torch.arange(num_experts + 1, dtype=torch.int64, device=device) * stride
    )
    return kept.view(T, k) & valid, ends[1:] - ends[:-1]


class SharedExperts(nn.Module):
    """The shared experts of DeepSeek-MoE / Qwen2-MoE: one dense gated FFN applied to every token.

    ``out = down_proj · act(gate_up_proj · x)`` with ``gate_up_proj`` [2·Is, H] (gate rows, then
    up rows) and ``down_proj`` [H, Is], no biases; ``act`` is one of :func:`moe_kernels.moe_ffn`'s
    gated activations (:func:`moe_kernels.reference.gated_activation`), computed in float32.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(2 * intermediate_size, hidden_size, **factory))
        self.down_proj = nn.Parameter(torch.empty(hidden_size, intermediate_size, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's default weight initialisation."""
        for w in (self.gate_up_proj, self.down_proj):
            bound = 1.0 / math.sqrt(w.shape[-1])
            nn.init.uniform_(w, -bound, bound)

    def forward(
        self,
        x: torch.Tensor,
        activation: str = "swiglu",
        alpha: float = 1.702,
        limit: float = 7.0,
    ) -> torch.Tensor:
        """``x`` [T, H] -> [T, H] in x's dtype."""
        dtype = self.gate_up_proj.dtype
        h = F.linear(x.to(dtype), self.gate_up_proj)
        a = reference.gated_activation(h.float(), activation, alpha, limit, False)
        return F.linear(a.to(dtype), self.down_proj).to(x.dtype)

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}"


def _nonneg_finite(name: str, value) -> float:
    v = _api._finite(name, value)
    if v < 0:
        raise ValueError(f"{name} must be >= 0, got {v}")
    return v


class MoE(nn.Module):
    """A routed Mixture-of-Experts feed-forward layer: router, top-k gating and the expert FFN,
    with the routing schemes, capacity limits, auxiliary losses and shared experts of the MoE
    literature for training.

    ``forward(x)`` computes ``router_logits = router(x)``, ``(topk_weights, topk_ids) =
    topk_gating(router_logits, ...)`` and ``moe_ffn(x, gate_up_proj, down_proj, topk_weights,
    topk_ids, ...)``; the options mirror those of :func:`moe_kernels.topk_gating` and
    :func:`moe_kernels.moe_ffn`.  With the defaults the layer is dropless, noiseless and adds no
    loss.

    Parameters use Hugging Face transformers' expert layout, so weights load from (or copy into)
    HF experts modules without reshaping:

    * ``router.weight`` [E, H] (and ``router.bias`` [E] if ``router_bias``), an ``nn.Linear``;
    * ``gate_up_proj`` [E, 2I, H]: gate rows then up rows (alternating rows if ``interleaved``);
    * ``down_proj`` [E, H, I];
    * ``gate_up_proj_bias`` [E, 2I] and ``down_proj_bias`` [E, H] if ``bias``;
    * buffer ``e_score_correction_bias`` [E] (float32, zeros) if ``correction_bias``
      (DeepSeek-V3's selection-only bias);
    * ``router_noise.weight`` [E, H] (zeros, router dtype) if ``noisy_gating``;
    * ``shared_experts.gate_up_proj`` [2·Is, H] and ``shared_experts.down_proj`` [H, Is] if
      ``num_shared_experts``, and ``shared_expert_gate.weight`` [1, H] if ``shared_expert_gate``.

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
        noisy_gating: Shazeer et al. 2017's noisy top-k gating: in training, ``router_logits =
            x·W_g + ε ⊙ softplus(x·W_noise)``, ε ~ N(0, 1) from torch's default generator,
            ``W_noise`` = ``self.router_noise`` (``nn.Linear(H, E, bias=False)``, initialised to
            zeros); no noise in eval mode.
        router_jitter: eps of the Switch Transformer's multiplicative jitter: in training the
            router's input (not the experts') is multiplied element-wise by U[1 - eps, 1 + eps]
            noise; 0 <= eps < 1.
        capacity_factor: None (dropless) or > 0: each expert keeps at most ``C = ceil(
            capacity_factor · T · k / E)`` of the T·k (token, slot) assignments of a call, in
            training and in eval; the others are dropped (they add nothing, the kept weights are
            not renormalised; a token with every slot dropped gets a zero routed output).
        drop_policy: which assignments an expert keeps: all first choices before any second
            choice, and within a slot ``"position"`` (Switch / GShard: earlier tokens first) or
            ``"priority"`` (V-MoE's batch-prioritised routing: larger ``topk_weights[:, 0]``
            first, ties to the earlier token).
        aux_loss_coef: weight of the load-balancing loss (Switch Transformer;
            :func:`moe_kernels.losses.load_balancing_loss`, on the routing's own logits, ids and
            scoring).
        z_loss_coef: weight of ST-MoE's router z-loss (:func:`moe_kernels.losses.z_loss`).
        num_shared_experts: DeepSeek-MoE / Qwen2-MoE shared experts: a dense gated FFN
            (:class:`SharedExperts`, same activation as the routed experts, no bias) on every
            token, added to the routed output; 0: none.
        shared_intermediate_size: Is, the shared FFN's total width (default
            ``num_shared_experts · intermediate_size``).
        shared_expert_gate: scale the shared output by ``sigmoid(self.shared_expert_gate(x))``
            (``nn.Linear(H, 1, bias=False)``), as Qwen2-MoE does.
        similarity_loss_coef: weight of SimSMoE's similarity loss (Do, Le, Tran, "SimSMoE:
            Toward Efficient Training Mixture of Experts via Solving Representational Collapse",
            Findings of NAACL 2025; :meth:`similarity_loss`): experts often selected together
            are penalised for similar outputs (CKA through the projection head
            ``self.similarity_head``, ``nn.Linear(H, E)``).  0: off (no head, no tracker, no
            cost).  Training only; not supported under expert parallelism.
        similarity_threshold: a tracked pair's CKA enters the loss only above this (0.5, the
            value of the paper's published training scripts).
        pair_frequency_threshold: a pair is tracked when its accumulated co-selection fraction
            (buffer ``pair_frequency`` [E, E], upper triangle) exceeds this (16.0, the paper's
            scripts' checking frequency).
        cka: "rbf" (kernel CKA, the paper's default) or "linear".
        cka_sigma: the RBF kernel's width (0.8, the paper's scripts).

    Every option is an attribute of the same name read at every forward (``m.aux_loss_coef =
    0.0`` takes effect at the next call), except ``shared_expert_gate``, whose attribute is the
    gate module itself (None when absent).  ``noisy_gating=True`` needs ``router_noise``: a layer
    built without it raises ``RuntimeError`` when the flag is set later.

    Losses: when ``aux_loss_coef`` or ``z_loss_coef`` is non-zero and the module is training
    with grad enabled, ``coef · loss`` enters the backward pass through autograd (an identity on
    the routing weights, which every backward pass of the output goes through, whose backward
    also seeds the losses' gradient): the caller adds nothing to its loss.  The gradients are
    multiplied by :func:`set_aux_loss_scale`'s factor (gradient accumulation, ``GradScaler``).
    They flow whenever the layer's output is back-propagated, and ``torch.utils.checkpoint``
    keeps them.  :meth:`forward_with_experts` runs all of this around an expert computation
    supplied by the caller (e.g. experts on other ranks).

    Input ``x`` is ``[..., H]``; the output has the same shape and dtype. With
    ``return_router_logits=True`` forward returns ``(out, router_logits [T, E])``; with
    ``return_aux=True`` it returns ``(out, aux)`` (or ``(out, router_logits, aux)``), ``aux`` a
    :class:`MoEAux`.
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
        noisy_gating: bool = False,
        router_jitter: float = 0.0,
        capacity_factor: float | None = None,
        drop_policy: str = "position",
        aux_loss_coef: float = 0.0,
        z_loss_coef: float = 0.0,
        num_shared_experts: int = 0,
        shared_intermediate_size: int | None = None,
        shared_expert_gate: bool = False,
        similarity_loss_coef: float = 0.0,
        similarity_threshold: float = 0.5,
        pair_frequency_threshold: float = 16.0,
        cka: str = "rbf",
        cka_sigma: float = 0.8,
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
        if not isinstance(num_shared_experts, int) or num_shared_experts < 0:
            raise ValueError(f"num_shared_experts must be an int >= 0, got {num_shared_experts!r}")
        if num_shared_experts == 0 and (shared_intermediate_size is not None or shared_expert_gate):
            raise ValueError(
                "shared_intermediate_size and shared_expert_gate need num_shared_experts >= 1"
            )
        if shared_intermediate_size is None and num_shared_experts:
            shared_intermediate_size = num_shared_experts * intermediate_size
        if shared_intermediate_size is not None and (
            not isinstance(shared_intermediate_size, int) or shared_intermediate_size < 1
        ):
            raise ValueError(
                f"shared_intermediate_size must be a positive int, got {shared_intermediate_size!r}"
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
        self.noisy_gating = bool(noisy_gating)
        self.router_jitter = router_jitter
        self.capacity_factor = capacity_factor
        self.drop_policy = drop_policy
        self.aux_loss_coef = aux_loss_coef
        self.z_loss_coef = z_loss_coef
        self.num_shared_experts = num_shared_experts
        self.shared_intermediate_size = shared_intermediate_size
        self.similarity_loss_coef = similarity_loss_coef
        self.similarity_threshold = similarity_threshold
        self.pair_frequency_threshold = pair_frequency_threshold
        self.cka = cka
        self.cka_sigma = cka_sigma
        self._training_options()  # the new options' values, checked now as at every forward
        self._similarity_options()

        factory = {"device": device, "dtype": dtype}
        r_dtype = router_dtype if router_dtype is not None else dtype
        self.router = nn.Linear(
            hidden_size, num_experts, bias=router_bias, device=device, dtype=r_dtype
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
        # modules of the training options, created after the layer's original parameters so that
        # a layer without them initialises exactly as before
        self.router_noise = (
            nn.Linear(H, E, bias=False, device=device, dtype=r_dtype) if noisy_gating else None
        )
        self.shared_experts = (
            SharedExperts(H, shared_intermediate_size, **factory) if num_shared_experts else None
        )
        self.shared_expert_gate = (
            nn.Linear(H, 1, bias=False, **factory) if shared_expert_gate else None
        )
        # SimSMoE: the projection head and the co-selection tracker (module state, saved with
        # state_dict), only when the similarity loss is on at construction
        if similarity_loss_coef:
            self.similarity_head = nn.Linear(H, E, device=device, dtype=r_dtype)
            self.register_buffer(
                "pair_frequency", torch.zeros(E, E, device=device, dtype=torch.float32)
            )
        else:
            self.similarity_head = None
            self.pair_frequency = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's default initialisation, applied to every expert; ``router_noise`` to zeros
        (Shazeer et al. 2017)."""
        self.router.reset_parameters()
        for w, b in (
            (self.gate_up_proj, self.gate_up_proj_bias),
            (self.down_proj, self.down_proj_bias),
        ):
            bound = 1.0 / math.sqrt(w.shape[-1])
            nn.init.uniform_(w, -bound, bound)
            if b is not None:
                nn.init.uniform_(b, -bound, bound)
        if self.router_noise is not None:
            nn.init.zeros_(self.router_noise.weight)
        if self.shared_experts is not None:
            self.shared_experts.reset_parameters()
        if self.shared_expert_gate is not None:
            self.shared_expert_gate.reset_parameters()
        if self.similarity_head is not None:
            self.similarity_head.reset_parameters()

    def _training_options(self) -> tuple[float, float | None, float, float]:
        """The training options, checked: (router_jitter, capacity_factor, aux_loss_coef,
        z_loss_coef) as floats."""
        jitter = _nonneg_finite("router_jitter", self.router_jitter)
        if jitter >= 1.0:
            raise ValueError(f"router_jitter must be < 1, got {jitter}")
        cf = self.capacity_factor
        if cf is not None:
            cf = _api._finite("capacity_factor", cf)
            if cf <= 0:
                raise ValueError(f"capacity_factor must be None (dropless) or > 0, got {cf}")
        if self.drop_policy not in DROP_POLICIES:
            raise ValueError(
                f"drop_policy must be one of {DROP_POLICIES}, got {self.drop_policy!r}"
            )
        aux = _api._finite("aux_loss_coef", self.aux_loss_coef)
        z = _api._finite("z_loss_coef", self.z_loss_coef)
        return jitter, cf, aux, z

    def _similarity_options(self) -> float:
        """SimSMoE's options, checked; returns ``similarity_loss_coef`` as a float."""
        coef = _nonneg_finite("similarity_loss_coef", self.similarity_loss_coef)
        _api._finite("similarity_threshold", self.similarity_threshold)
        _nonneg_finite("pair_frequency_threshold", self.pair_frequency_threshold)
        if self.cka not in ("rbf", "linear"):
            raise ValueError(f"cka must be 'rbf' or 'linear', got {self.cka!r}")
        sigma = _api._finite("cka_sigma", self.cka_sigma)
        if sigma <= 0:
            raise ValueError(f"cka_sigma must be > 0, got {sigma}")
        return coef

    def similarity_loss(self, x: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """SimSMoE's similarity loss of one training call (Do, Le, Tran, Findings of NAACL 2025),
        before its coefficient: 0-d float32, differentiable in the experts' weights and
        ``similarity_head``.

        Tracking: for every pair of experts i < j, ``pair_frequency[i, j]`` accumulates the
        fraction of the call's T tokens whose selected experts (``topk_ids``, before capacity
        drops) include both; a pair whose accumulated value exceeds ``pair_frequency_threshold``
        is tracked in this call and its accumulator resets to 0.  For each tracked pair with at
        least two tokens routed to both experts, the two experts' outputs on those tokens (the
        routed FFN without routing weight, both experts in one :func:`moe_kernels.moe_ffn` call)
        are mapped through ``similarity_head`` and compared with :func:`moe_kernels.losses.cka`
        (``cka``, ``cka_sigma``); the CKAs above ``similarity_threshold`` are summed.

        Host synchronisation: the tracked pairs are read once; when some are tracked, their
        token counts are read too (the loss's extra work is on those tokens only).
        """
        if self.similarity_head is None or self.pair_frequency is None:
            raise RuntimeError(
                "similarity_loss_coef is set but the layer has no similarity_head: build it with "
                "similarity_loss_coef > 0"
            )
        E = self.num_experts
        T = topk_ids.shape[0]
        zero = torch.zeros((), dtype=torch.float32, device=x.device)
        if T == 0:
            return zero
        ids = topk_ids.to(torch.int64)
        valid = (ids >= 0) & (ids < E)
        sel = torch.zeros(T, E, dtype=torch.float32, device=x.device)
        sel.scatter_(1, ids.clamp(0, E - 1), valid.to(torch.float32))
        with torch.no_grad():
            self.pair_frequency += torch.triu(sel.t() @ sel, diagonal=1) / T
            tracked = self.pair_frequency > float(self.pair_frequency_threshold)
            self.pair_frequency.masked_fill_(tracked, 0.0)
        pairs = tracked.nonzero()  # sync-ok: SimSMoE's documented read of the tracked pairs
        if pairs.shape[0] == 0:
            return zero
        both = (sel[:, pairs[:, 0]] * sel[:, pairs[:, 1]]).t() > 0  # [P, T]
        counts = both.sum(dim=1).tolist()  # sync-ok: token counts, only when pairs are tracked
        order = torch.sort(both.to(torch.int8), dim=1, descending=True, stable=True).indices
        toks, experts_i, experts_j, spans = [], [], [], []
        for p, n in enumerate(counts):
            if n < 2:  # CKA needs two samples
                continue
            toks.append(order[p, :n])
            experts_i.append(pairs[p, 0].expand(n))
            experts_j.append(pairs[p, 1].expand(n))
            spans.append(n)
        if not spans:
            return zero
        tok = torch.cat(toks)
        xs = x.index_select(0, tok)
        ids2 = torch.cat([torch.cat(experts_i), torch.cat(experts_j)]).to(torch.int32)[:, None]
        ones = torch.ones(ids2.shape[0], 1, dtype=torch.float32, device=x.device)
        y = self.experts(torch.cat([xs, xs]), ones, ids2)
        z = self.similarity_head(y.to(self.similarity_head.weight.dtype))
        N = tok.shape[0]
        total, start = zero, 0
        sigma = float(self.cka_sigma) if self.cka == "rbf" else None
        for n in spans:
            c = cka(
                z[start : start + n], z[N + start : N + start + n], kernel=self.cka, sigma=sigma
            )
            total = total + torch.where(c > float(self.similarity_threshold), c, 0.0)
            start += n
        return total

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The router's logits [T, E] of ``x`` [T, H], in the router's dtype.

        In training, with ``router_jitter`` eps > 0 the router's input is first multiplied by
        ``torch.empty_like(x_router).uniform_(1 - eps, 1 + eps)`` and with ``noisy_gating``
        ``torch.randn_like(logits) * softplus(router_noise(x_router))`` is added, drawn in that
        order from torch's default generator.
        """
        xr = x.to(self.router.weight.dtype)
        if self.training:
            jitter = _nonneg_finite("router_jitter", self.router_jitter)
            if jitter > 0.0:
                xr = xr * torch.empty_like(xr).uniform_(1.0 - jitter, 1.0 + jitter)
        logits = self.router(xr)
        if self.training and self.noisy_gating:
            if self.router_noise is None:
                raise RuntimeError(
                    "noisy_gating is set but the layer has no router_noise: build it with "
                    "noisy_gating=True"
                )
            logits = logits + torch.randn_like(logits) * F.softplus(self.router_noise(xr))
        return logits

    def gate(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`moe_kernels.topk_gating` with the layer's options: (topk_weights f32 [T, k],
        topk_ids i32 [T, k])."""
        return _api.topk_gating(
            router_logits,
            self.top_k,
            scoring=self.scoring,
            renormalize=self.renormalize,
            correction_bias=self.e_score_correction_bias,
            num_expert_groups=self.num_expert_groups,
            topk_groups=self.topk_groups,
            routed_scaling_factor=self.routed_scaling_factor,
            backend=self.backend,
        )

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router of ``x`` [T, H]: (router_logits [T, E], topk_weights f32 [T, k], topk_ids i32 [T, k])
        (noise and jitter included in training; capacity drops are not applied here, see
        :meth:`capacity_mask`)."""
        logits = self.router_logits(x)
        weights, ids = self.gate(logits)
        return logits, weights, ids

    def capacity(self, num_tokens: int) -> int | None:
        """C = ceil(capacity_factor · T · k / E) for T = ``num_tokens`` (None when dropless)."""
        cf = self.capacity_factor
        if cf is None:
            return None
        return math.ceil(cf * num_tokens * self.top_k / self.num_experts)

    def capacity_mask(
        self, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's capacity drops for a routing of T tokens: (kept [T, k] bool,
        tokens_per_expert [E] int64 before drops); every assignment is kept when dropless."""
        C = self.capacity(topk_ids.shape[0])
        if C is None:
            kept = torch.ones(topk_ids.shape, dtype=torch.bool, device=topk_ids.device)
            return kept, _tokens_per_expert(topk_ids, self.num_experts)
        priority = topk_weights[:, 0] if self.drop_policy == "priority" else None
        return capacity_keep_mask(topk_ids, self.num_experts, C, priority)

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

    def shared(self, x: torch.Tensor) -> torch.Tensor | None:
        """The shared experts' output for ``x`` [T, H] (gated if ``shared_expert_gate``), or None."""
        if self.shared_experts is None:
            return None
        out = self.shared_experts(x, self.activation, self.alpha, self.limit)
        if self.shared_expert_gate is not None:
            g = self.shared_expert_gate(x.to(self.shared_expert_gate.weight.dtype))
            out = out * torch.sigmoid(g).to(out.dtype)
        return out

    def forward(
        self, x: torch.Tensor, return_router_logits: bool = False, return_aux: bool = False
    ):
        return self.forward_with_experts(x, self.experts, return_router_logits, return_aux)

    def forward_with_experts(
        self,
        x: torch.Tensor,
        experts,
        return_router_logits: bool = False,
        return_aux: bool = False,
    ):
        """:meth:`forward` with the routed expert computation replaced by ``experts`` (e.g. one
        that sends the tokens to experts on other ranks): everything else -- router, noise,
        capacity drops, the injected losses, shared experts, ``aux`` -- is the layer's.

        ``experts(x [T, H], topk_weights [T, k] f32, topk_ids [T, k] int32) -> [T, H]`` in x's
        dtype, with the semantics of :meth:`experts`: dropped assignments have id -1 and must
        contribute nothing; the losses' gradient reaches the router through ``topk_weights``, so
        ``experts`` must be differentiable in them (as :func:`moe_kernels.moe_ffn` is).
        """
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"x must be [..., {self.hidden_size}], got {tuple(x.shape)}")
        _, cf, aux_coef, z_coef = self._training_options()
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.hidden_size)
        logits, weights, ids = self.route(flat)

        kept = counts = None
        expert_ids = ids
        if cf is not None:
            kept, counts = self.capacity_mask(weights, ids)
            # dropped assignments get id -1: the kernels skip them (no expert compute)
            expert_ids = ids.masked_fill(~kept, -1)

        sim_coef = self._similarity_options()
        sim_loss = None
        if sim_coef != 0.0 and self.training and torch.is_grad_enabled():
            if experts != self.experts:
                raise RuntimeError(
                    "similarity_loss_coef (SimSMoE) needs the layer's own experts: it is not "
                    "supported with an expert function supplied by the caller (expert parallelism)"
                )
            sim_loss = self.similarity_loss(flat, ids)
        inject = (aux_coef != 0.0 or z_coef != 0.0) and self.training and torch.is_grad_enabled()
        lb = zl = None
        expert_weights = weights
        if inject or return_aux:
            if counts is None:
                counts = _tokens_per_expert(ids, self.num_experts)
            src = logits if inject else logits.detach()
            lb = _load_balancing(src, counts, self.scoring)
            zl = _z_loss(src)
            if inject:
                terms = []
                if aux_coef != 0.0:
                    terms.append(lb * aux_coef)
                if z_coef != 0.0:
                    terms.append(zl * z_coef)
                total = terms[0] if len(terms) == 1 else terms[0] + terms[1]
                # the losses' gradient enters the backward pass with the routing weights'
                expert_weights = _AttachLoss.apply(weights, total * _aux_loss_scale)

        if sim_loss is not None:
            expert_weights = _AttachLoss.apply(
                expert_weights, sim_loss * sim_coef * _aux_loss_scale
            )
        out = experts(flat, expert_weights, expert_ids)
        shared = self.shared(flat)
        if shared is not None:
            out = out + shared

        out = out.reshape(*lead, self.hidden_size)
        if not return_aux:
            return (out, logits) if return_router_logits else out
        T = flat.shape[0]
        if kept is None:
            kept = torch.ones(T, self.top_k, dtype=torch.bool, device=ids.device)
            dropped = torch.zeros((), dtype=torch.int64, device=ids.device)
        else:
            dropped = (~kept).sum()
        aux = MoEAux(
            router_logits=logits.detach(),
            topk_ids=ids,
            topk_weights=weights.detach(),
            kept=kept,
            tokens_per_expert=counts,
            dropped=dropped,
            load_balancing_loss=lb.detach(),
            z_loss=zl.detach(),
            similarity_loss=(
                sim_loss.detach()
                if sim_loss is not None
                else torch.zeros((), dtype=torch.float32, device=ids.device)
            ),
        )
        return (out, logits, aux) if return_router_logits else (out, aux)

    @torch.no_grad()
    def update_correction_bias(self, tokens_per_expert: torch.Tensor, rate: float = 1e-3) -> None:
        """DeepSeek-V3's auxiliary-loss-free balancing: ``e_score_correction_bias += rate ·
        sign(mean load - load)`` (overloaded experts become less likely to be selected).

        Args:
            tokens_per_expert: [E] int or float, the load of each expert (e.g.
                ``aux.tokens_per_expert``, summed over a step and over data-parallel ranks).
            rate: the bias update speed (DeepSeek-V3's gamma).

        Raises:
            RuntimeError: the layer has no correction bias (build it with ``correction_bias=True``).
        """
        bias = self.e_score_correction_bias
        if bias is None:
            raise RuntimeError(
                "update_correction_bias needs e_score_correction_bias: build the layer with "
                "correction_bias=True"
            )
        _api._tensor("tokens_per_expert", tokens_per_expert, 1)
        _api._shape("tokens_per_expert", tokens_per_expert, (self.num_experts,))
        rate = _api._finite("rate", rate)
        load = tokens_per_expert.to(device=bias.device, dtype=torch.float32)
        bias.add_(torch.sign(load.mean() - load), alpha=rate)

    def extra_repr(self) -> str:
        s = (
            f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, "
            f"num_experts={self.num_experts}, top_k={self.top_k}, scoring={self.scoring!r}, "
            f"activation={self.activation!r}, backend={self.backend!r}"
        )
        for name, default in (
            ("noisy_gating", False),
            ("router_jitter", 0.0),
            ("capacity_factor", None),
            ("drop_policy", "position"),
            ("aux_loss_coef", 0.0),
            ("z_loss_coef", 0.0),
            ("num_shared_experts", 0),
        ):
            value = getattr(self, name)
            if value != default:
                s += f", {name}={value!r}"
        return s
