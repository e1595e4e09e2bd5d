"""The public operations: argument checks, backend choice, then the backend's torch op."""

from __future__ import annotations

import math

import torch

from ._backends import call_op, call_train_op, needs_grad
from ._debug import debug_mode
from .plan import RoutingPlan, num_rows

__all__ = ["topk_gating", "route", "permute", "unpermute", "grouped_gemm", "moe_ffn"]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_INDEX_DTYPES = (torch.int32, torch.int64)
_ACTIVATIONS = ("swiglu", "geglu", "swiglu_oai")
_INT32_MAX = 2**31 - 1


# --------------------------------------------------------------------------------------------------
# checks (raise ValueError for shapes/values, TypeError for types)
# --------------------------------------------------------------------------------------------------


def _tensor(name: str, t, ndim: int | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    return t


def _float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {t.dtype}")


def _index(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")


def _shape(name: str, t: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(t.shape)}")


def _int(name: str, v, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


def _finite(name: str, v) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a float, got {type(v).__name__}") from None
    if not -math.inf < f < math.inf:  # comparisons, not math.isfinite: torch.compile traces them
        raise ValueError(f"{name} must be finite, got {f}")
    return f


def _same_device(**tensors: torch.Tensor | None) -> torch.device:
    items = [(n, t) for n, t in tensors.items() if t is not None]
    device = items[0][1].device
    for n, t in items[1:]:
        if t.device != device:
            raise ValueError(
                f"{n} is on {t.device} but {items[0][0]} is on {device}: all tensors must share a device"
            )
    return device


def _same_dtype(**tensors: torch.Tensor) -> torch.dtype:
    items = list(tensors.items())
    dtype = items[0][1].dtype
    for n, t in items[1:]:
        if t.dtype != dtype:
            raise TypeError(
                f"{n} has dtype {t.dtype} but {items[0][0]} has {dtype}: they must match"
            )
    return dtype


def _values_checked(t: torch.Tensor) -> bool:
    """Checks that read tensor values run on CPU always, elsewhere only in debug mode (never
    while torch.compile traces: values are unknown then)."""
    if torch.compiler.is_compiling():
        return False
    return t.device.type == "cpu" or (t.device.type != "meta" and debug_mode())


def _check_offs_values(offs: torch.Tensor, rows: int) -> None:
    if not _values_checked(offs) or offs.numel() == 0:
        return
    if bool((offs[1:] < offs[:-1]).any()) or bool((offs < 0).any()):  # sync-ok: CPU or debug only
        raise ValueError("offs must be non-decreasing and non-negative")
    if int(offs[-1]) > rows:  # sync-ok: CPU or debug only
        raise ValueError(f"offs[-1] = {int(offs[-1])} exceeds the {rows} rows of a")


# --------------------------------------------------------------------------------------------------
# ops
# --------------------------------------------------------------------------------------------------


def topk_gating(
    router_logits: torch.Tensor,
    top_k: int,
    *,
    scoring: str = "softmax",
    renormalize: bool = True,
    correction_bias: torch.Tensor | None = None,
    num_expert_groups: int | None = None,
    topk_groups: int | None = None,
    routed_scaling_factor: float = 1.0,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the ``top_k`` experts of each token and their routing weights.

    All math runs in fp32 whatever the logits' dtype (fp64 logits are computed in fp64 by the
    reference backend).

    Args:
        router_logits: [T, E] float32 / bfloat16 / float16 (float64: reference only).
        top_k: k, with 1 <= k <= E.
        scoring: ``"softmax"`` (over all E experts) or ``"sigmoid"`` (DeepSeek-V3).
        renormalize: divide the chosen experts' scores by their sum. Mixtral's "softmax over the
            top-k logits" is ``scoring="softmax", renormalize=True``.
        correction_bias: [E] float, added to the scores for selection only (DeepSeek-V3).
        num_expert_groups: split the E experts into this many contiguous groups (must divide E);
            a group's value is the sum of its two largest selection scores.
        topk_groups: keep only this many best groups (ties to the lower group index).
        routed_scaling_factor: multiplies the final weights; must be finite (else ValueError).
        backend: ``None`` (automatic) or one of ``"reference"``, ``"cpu"``, ``"triton"``, ``"cuda"``.

    Returns:
        ``topk_weights`` [T, k] float32 (float64 for float64 logits, which only the reference
        backend takes, so that it can check itself in float64) and ``topk_ids`` [T, k] int32,
        ordered by descending selection score (ties to the lower expert index). Gradients flow
        from ``topk_weights`` to ``router_logits``.

    Non-finite values: every backend selects as ``torch.sort(descending=True, stable=True)``
    orders the fp32 selection scores -- NaN above +inf, ties and NaNs to the lower index (see
    :func:`moe_kernels.reference.topk_gating`) -- so the ids are always k distinct experts in
    [0, E); the weights of such rows may be NaN.
    """
    _tensor("router_logits", router_logits, 2)
    _float("router_logits", router_logits)
    T, E = router_logits.shape
    if E < 1:
        raise ValueError("router_logits must have at least one expert (E >= 1)")
    _int("top_k", top_k, 1)
    if top_k > E:
        raise ValueError(f"top_k = {top_k} exceeds the number of experts E = {E}")
    if scoring not in ("softmax", "sigmoid"):
        raise ValueError(f"scoring must be 'softmax' or 'sigmoid', got {scoring!r}")
    routed_scaling_factor = _finite("routed_scaling_factor", routed_scaling_factor)
    if correction_bias is not None:
        _tensor("correction_bias", correction_bias, 1)
        _float("correction_bias", correction_bias)
        _shape("correction_bias", correction_bias, (E,))
    device = _same_device(router_logits=router_logits, correction_bias=correction_bias)
    groups = 0
    if num_expert_groups is None:
        if topk_groups is not None:
            raise ValueError("topk_groups requires num_expert_groups")
    else:
        groups = _int("num_expert_groups", num_expert_groups, 1)
        if E % groups:
            raise ValueError(f"num_expert_groups = {groups} does not divide the E = {E} experts")
        if topk_groups is None:
            raise ValueError("num_expert_groups requires topk_groups")
        _int("topk_groups", topk_groups, 1)
        if topk_groups > groups:
            raise ValueError(f"topk_groups = {topk_groups} exceeds num_expert_groups = {groups}")
        if topk_groups * (E // groups) < top_k:
            raise ValueError(
                f"top_k = {top_k} exceeds the {topk_groups * (E // groups)} experts of the "
                f"{topk_groups} kept groups"
            )
    return call_op(
        "topk_gating",
        device,
        router_logits.dtype,
        backend,
        (
            router_logits,
            top_k,
            scoring,
            bool(renormalize),
            correction_bias,
            groups,
            topk_groups or 0,
            float(routed_scaling_factor),
        ),
    )


def route(
    topk_ids: torch.Tensor,
    num_experts: int,
    *,
    block_size: int | None = None,
    backend: str | None = None,
) -> RoutingPlan:
    """Group the T·k (token, slot) pairs by expert (a stable counting sort).

    Args:
        topk_ids: [T, k] int32/int64 expert ids. Ids < 0 or >= ``num_experts`` are not errors:
            those pairs are dropped (e.g. experts that live on another rank).
        num_experts: E >= 1.
        block_size: pad each expert's segment to a multiple of this many rows and describe the
            blocks (``block_expert``), as block-tiled grouped GEMMs want; None for no padding.
        backend: see :func:`topk_gating`.

    Returns:
        A :class:`RoutingPlan`. Its sizes depend only on T, k, E and ``block_size``.
    """
    _tensor("topk_ids", topk_ids, 2)
    _index("topk_ids", topk_ids)
    _int("num_experts", num_experts, 1)
    bs = 0 if block_size is None else _int("block_size", block_size, 1)
    T, k = topk_ids.shape
    if num_rows(T * k, num_experts, bs) > _INT32_MAX:
        raise ValueError("T * top_k (plus block padding) must stay below 2**31 rows")
    tpe, offs, row_of_slot, slot_of_row, block_expert = call_op(
        "route", topk_ids.device, None, backend, (topk_ids, num_experts, bs)
    )
    return RoutingPlan(
        tokens_per_expert=tpe,
        offs=offs,
        row_of_slot=row_of_slot,
        slot_of_row=slot_of_row,
        block_expert=block_expert if bs else None,
        num_experts=num_experts,
        block_size=block_size,
    )


def _plan(plan) -> RoutingPlan:
    if not isinstance(plan, RoutingPlan):
        raise TypeError(
            f"plan must be a RoutingPlan (from moe_kernels.route), got {type(plan).__name__}"
        )
    return plan


def permute(x: torch.Tensor, plan: RoutingPlan, *, backend: str | None = None) -> torch.Tensor:
    """Gather token rows into expert order: ``out[r] = x[slot_of_row[r] // k]``.

    Args:
        x: [T, H] float activations.
        plan: the :class:`RoutingPlan` of the same T tokens.

    Returns:
        [num_rows, H] in x's dtype; padding and unused rows are zero. Differentiable in x.
    """
    _tensor("x", x, 2)
    _float("x", x)
    plan = _plan(plan)
    if x.shape[0] != plan.num_tokens:
        raise ValueError(f"x has {x.shape[0]} tokens but the plan has {plan.num_tokens}")
    device = _same_device(x=x, plan=plan.row_of_slot)
    return call_op("permute", device, x.dtype, backend, (x, plan.row_of_slot, plan.slot_of_row))


def unpermute(
    y: torch.Tensor,
    plan: RoutingPlan,
    topk_weights: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Weighted combine of each token's k expert rows: ``out[t] = Σ_s w[t, s]·y[row_of_slot[t, s]]``.

    The sum runs over kept pairs in slot order in fp32, without atomics (bitwise reproducible).

    Args:
        y: [num_rows, H] float, in the plan's expert order.
        plan: the :class:`RoutingPlan` used to permute.
        topk_weights: [T, k] float, or None for weights of 1.

    Returns:
        [T, H] in y's dtype. Differentiable in y and topk_weights.
    """
    _tensor("y", y, 2)
    _float("y", y)
    plan = _plan(plan)
    if y.shape[0] != plan.num_rows:
        raise ValueError(f"y has {y.shape[0]} rows but the plan has {plan.num_rows}")
    if topk_weights is not None:
        _tensor("topk_weights", topk_weights, 2)
        _float("topk_weights", topk_weights)
        _shape("topk_weights", topk_weights, tuple(plan.row_of_slot.shape))
    device = _same_device(y=y, plan=plan.row_of_slot, topk_weights=topk_weights)
    return call_op(
        "unpermute", device, y.dtype, backend, (y, plan.row_of_slot, plan.slot_of_row, topk_weights)
    )


def grouped_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    offs: torch.Tensor,
    *,
    trans_b: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """Grouped (segment-wise) matrix product, as ``torch.nn.functional.grouped_mm``.

    Rows ``[offs[e-1], offs[e])`` of ``a`` are multiplied by ``b[e]``.

    Args:
        a: [M, K] float.
        b: [E, K, N], or [E, N, K] with ``trans_b=True`` (the nn.Linear layout); same dtype as a.
        offs: [E] int32 cumulative row ends (non-decreasing, offs[-1] <= M).
        trans_b: whether ``b`` is stored [E, N, K].

    Returns:
        [M, N] in a's dtype; rows past ``offs[-1]`` are zero. Differentiable in a and b (the
        gradient of b is a ragged-K product; experts with no rows get exactly zero).

    Subnormals: as in :func:`moe_ffn`, bf16 operands on CPUs with AVX-512-BF16 or AMX may have
    their subnormal values treated as zero by the cpu backend (hardware behaviour).
    """
    _tensor("a", a, 2)
    _tensor("b", b, 3)
    _tensor("offs", offs, 1)
    _float("a", a)
    _same_dtype(a=a, b=b)
    if offs.dtype != torch.int32:
        raise TypeError(f"offs must be int32, got {offs.dtype}")
    E = b.shape[0]
    _shape("offs", offs, (E,))
    K = b.shape[2] if trans_b else b.shape[1]
    if a.shape[1] != K:
        raise ValueError(
            f"a has K = {a.shape[1]} columns but b expects K = {K} (trans_b={bool(trans_b)})"
        )
    device = _same_device(a=a, b=b, offs=offs)
    _check_offs_values(offs, a.shape[0])
    return call_op("grouped_gemm", device, a.dtype, backend, (a, b, offs, bool(trans_b)))


def moe_ffn(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    activation: str = "swiglu",
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    alpha: float = 1.702,
    limit: float = 7.0,
    interleaved: bool = False,
    backend: str | None = None,
    recompute: bool = False,
) -> torch.Tensor:
    """The whole routed expert MLP of a MoE layer.

    ``out[t] = Σ_s w[t, s] · (W_down[e] · act(W_gate_up[e] · x[t] + b_gate_up[e]) + b_down[e])``
    with ``e = topk_ids[t, s]``; pairs whose id is outside [0, E) are skipped; the sum over the k
    slots runs in slot order in fp32.

    Args:
        x: [T, H] float32 / bfloat16 / float16.
        w_gate_up: [E, 2I, H], Hugging Face's expert layout (nn.Linear out x in); any strides (a
            ``.transpose(1, 2)`` view of gpt-oss's [E, H, 2I] works as it is). Same dtype as x.
        w_down: [E, H, I], any strides. Same dtype as x.
        topk_weights: [T, k] float32 / bfloat16 / float16 / float64 routing weights (read in
            fp32; a dropped pair's weight is never read, so a NaN there is harmless).
        topk_ids: [T, k] int32/int64 expert ids.
        activation: ``"swiglu"`` silu(gate)·up; ``"geglu"`` gelu_erf(gate)·up; ``"swiglu_oai"``
            (gpt-oss) g = min(gate, limit), u = clamp(up, ±limit), (u + 1)·g·sigmoid(alpha·g).
        gate_up_bias: [E, 2I] or None.  down_bias: [E, H] or None.
        alpha, limit: parameters of ``"swiglu_oai"``; must be finite (else ValueError) whatever
            the activation.
        interleaved: gate/up alternate along the 2I axis (gpt-oss) instead of being its halves.
        backend: see :func:`topk_gating`.
        recompute: for a call that records gradients: on the cpu backend the forward keeps the
            pre-activation of the first GEMM for the backward (``[T*k, 2I]`` float32, 8·k·I
            bytes per token, held until the backward), so the backward does not re-run that GEMM;
            ``True`` re-runs it instead (less memory, one more GEMM).  The other backends always
            re-run it.

    Returns:
        [T, H] in x's dtype. Differentiable in x, both weights, both biases and topk_weights.

    Subnormals: on CPUs with AVX-512-BF16 or AMX, the cpu backend multiplies bf16 weights with
    instructions that treat subnormal inputs (magnitude below ~1.2e-38) as zero (``vdpbf16ps``,
    the AMX tiles: hardware behaviour), so such values of x, the activations or the weights count
    as 0 there; every other path keeps them.  With bf16 weights, those CPUs round the activation
    to bf16 before the down projection in the forward, as the GPU backends do (fp32 intermediates
    otherwise).
    """
    args = (
        x,
        w_gate_up,
        w_down,
        topk_weights,
        topk_ids,
        gate_up_bias,
        down_bias,
        activation,
        float(alpha),
        float(limit),
        bool(interleaved),
    )
    if not recompute and needs_grad(args):
        device, dtype = _check_moe_ffn(*args[:10])
        out = call_train_op("moe_ffn", device, dtype, backend, args)
        return call_op("moe_ffn", device, dtype, backend, args) if out is NotImplemented else out
    if isinstance(x, torch.Tensor):
        # A backend whose op checks every argument itself runs without the Python checks below
        # (with caches evicted, as in decode, they are a measurable part of a call: bench/NOTES.md,
        # "Per-call cost of the public ops").  If anything
        # fails, the Python checks run to raise their typed error (TypeError / ValueError, as on
        # every other backend); when they find nothing wrong, the op's own error stands.
        try:
            out = call_op("moe_ffn", x.device, x.dtype, backend, args, checked=False)
        except Exception:
            try:
                _check_moe_ffn(*args[:10])
            except (TypeError, ValueError) as typed:
                raise typed from None
            raise
        if out is not NotImplemented:
            return out
    device, dtype = _check_moe_ffn(*args[:10])
    return call_op("moe_ffn", device, dtype, backend, args)


def _check_moe_ffn(
    x, w_gate_up, w_down, topk_weights, topk_ids, gate_up_bias, down_bias, activation, alpha, limit
) -> tuple[torch.device, torch.dtype]:
    _tensor("x", x, 2)
    _tensor("w_gate_up", w_gate_up, 3)
    _tensor("w_down", w_down, 3)
    _tensor("topk_weights", topk_weights, 2)
    _tensor("topk_ids", topk_ids, 2)
    _float("x", x)
    dtype = _same_dtype(x=x, w_gate_up=w_gate_up, w_down=w_down)
    _float("topk_weights", topk_weights)
    _index("topk_ids", topk_ids)
    T, H = x.shape
    E, two_i, h_in = w_gate_up.shape
    if h_in != H:
        raise ValueError(f"w_gate_up must be [E, 2I, H] with H = {H}, got {tuple(w_gate_up.shape)}")
    if two_i % 2:
        raise ValueError(f"w_gate_up's 2I axis must be even, got {two_i}")
    _shape("w_down", w_down, (E, H, two_i // 2))
    if topk_ids.shape[0] != T:
        raise ValueError(f"topk_ids has {topk_ids.shape[0]} tokens but x has {T}")
    _shape("topk_weights", topk_weights, tuple(topk_ids.shape))
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
    _finite("alpha", alpha)
    _finite("limit", limit)
    if gate_up_bias is not None:
        _tensor("gate_up_bias", gate_up_bias, 2)
        _same_dtype(x=x, gate_up_bias=gate_up_bias)
        _shape("gate_up_bias", gate_up_bias, (E, two_i))
    if down_bias is not None:
        _tensor("down_bias", down_bias, 2)
        _same_dtype(x=x, down_bias=down_bias)
        _shape("down_bias", down_bias, (E, H))
    device = _same_device(
        x=x,
        w_gate_up=w_gate_up,
        w_down=w_down,
        topk_weights=topk_weights,
        topk_ids=topk_ids,
        gate_up_bias=gate_up_bias,
        down_bias=down_bias,
    )
    return device, dtype
