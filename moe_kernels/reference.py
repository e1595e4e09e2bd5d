"""Pure-PyTorch reference of every moe_kernels op: the specification all backends are tested against.

Written for clarity, not speed. Each function has exactly the arguments of its op schema
(:mod:`moe_kernels._schemas`) and is registered as ``moe_kernels::<name>_reference``.

Numerics: inputs in float32, bfloat16 or float16 are computed in float32; float64 inputs are computed
in float64 (so the reference is exact enough to check itself and the other backends). Outputs are in
the dtype the public API documents (usually the input's).

Symbols: T tokens, E experts, k = top_k, H hidden, I expert intermediate size, TK = T * k.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .plan import num_rows as plan_num_rows

__all__ = [
    "compute_dtype",
    "topk_gating",
    "topk_gating_backward",
    "route",
    "permute",
    "unpermute",
    "unpermute_backward",
    "grouped_gemm",
    "grouped_gemm_backward",
    "moe_ffn",
    "moe_ffn_backward",
    "activation",
    "gated_activation",
    "activation_backward",
]


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 if any input is float64, else float32 (what every op accumulates in)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _empty(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0)


# --------------------------------------------------------------------------------------------------
# top-k gating
# --------------------------------------------------------------------------------------------------


def _scores(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    if scoring == "softmax":
        return torch.softmax(logits, dim=-1)
    if scoring == "sigmoid":
        return torch.sigmoid(logits)
    raise ValueError(f"scoring must be 'softmax' or 'sigmoid', got {scoring!r}")


def _gather_weights(
    scores: torch.Tensor, ids: torch.Tensor, renormalize: bool, scale: float
) -> torch.Tensor:
    w = scores.gather(1, ids.long())
    if renormalize:
        w = w / w.sum(dim=-1, keepdim=True)
    return w * scale


def topk_gating(
    router_logits: torch.Tensor,
    top_k: int,
    scoring: str,
    renormalize: bool,
    correction_bias: torch.Tensor | None,
    num_expert_groups: int,
    topk_groups: int,
    routed_scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Select ``top_k`` experts per token.

    Args:
        router_logits: [T, E] float (fp32/bf16/fp16/fp64).
        top_k: k, 1 <= k <= E.
        scoring: ``"softmax"`` (over all E) or ``"sigmoid"``.
        renormalize: divide the chosen scores by their sum.
        correction_bias: [E] or None, added to the scores for *selection only*.
        num_expert_groups: G > 0 to restrict selection to the ``topk_groups`` best of G contiguous
            groups (group value = sum of its two largest selection scores); 0 for no groups.
        topk_groups: number of groups kept (ignored when G == 0).
        routed_scaling_factor: multiplies the final weights.

    Returns:
        ``(topk_weights [T, k] float32 (float64 for float64 logits), topk_ids [T, k] int32)``,
        ordered by descending selection score; ties go to the lower expert (or group) index.

    Order of the selection (every backend returns these ids): the selection scores (the scores,
    plus ``correction_bias`` when given, in fp32 -- fp64 for fp64 logits) sorted as
    ``torch.sort(descending=True, stable=True)`` sorts them: NaN ranks above +inf, ties (and NaN
    against NaN) go to the lower index, -0.0 ties +0.0. Groups likewise: a group's value is the sum
    of its two first scores in that order (NaN if either is NaN, so a NaN group ranks first), and
    experts of dropped groups rank as -inf, after the kept groups' experts of equal value in index
    order. Hence the ids of a row are always k distinct experts in [0, E), whatever the values
    (NaN, +-inf, a row of -inf, NaN in the bias); the weights are whatever the scores give (NaN
    allowed: softmax of a row holding NaN or +inf, or of a row of -inf, is NaN everywhere).
    """
    T, E = router_logits.shape
    scores = _scores(router_logits.to(compute_dtype(router_logits.dtype)), scoring)
    sel = scores
    if correction_bias is not None:
        sel = sel + correction_bias.to(scores.dtype)
    if num_expert_groups > 0:
        G = num_expert_groups
        per = E // G
        grouped = sel.view(T, G, per)
        if per >= 2:
            group_value = grouped.topk(2, dim=-1).values.sum(dim=-1)
        else:
            group_value = grouped[..., 0]
        # stable descending sort: equal values keep ascending index order (ties -> lower index)
        keep = torch.sort(group_value, dim=-1, descending=True, stable=True).indices[
            :, :topk_groups
        ]
        group_mask = torch.zeros(T, G, dtype=torch.bool, device=sel.device)
        group_mask.scatter_(1, keep, True)
        sel = sel.masked_fill(~group_mask.repeat_interleave(per, dim=1), float("-inf"))
    ids = torch.sort(sel, dim=-1, descending=True, stable=True).indices[:, :top_k]
    weights = _gather_weights(scores, ids, renormalize, routed_scaling_factor)
    return weights.contiguous(), ids.to(torch.int32).contiguous()


def topk_gating_backward(
    grad_weights: torch.Tensor,
    router_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    scoring: str,
    renormalize: bool,
    routed_scaling_factor: float,
) -> torch.Tensor:
    """d(loss)/d(router_logits) [T, E] (logits' dtype) given d(loss)/d(topk_weights) [T, k].

    With p = scores[ids] and S = sum(p): w = c * p / S (renormalize) or c * p, so
    dp = c * (g / S - <g, p> / S^2) or c * g; dp is scattered onto the chosen experts and taken
    through the scoring: softmax ds -> s * (ds - <ds, s>), sigmoid ds -> ds * s * (1 - s).
    """
    cdt = compute_dtype(router_logits.dtype)
    s = _scores(router_logits.to(cdt), scoring)
    ids = topk_ids.long()
    p = s.gather(1, ids)
    g = grad_weights.to(cdt)
    if renormalize:
        total = p.sum(dim=-1, keepdim=True)
        dp = g / total - (g * p).sum(dim=-1, keepdim=True) / total**2
    else:
        dp = g
    ds = torch.zeros_like(s).scatter_add_(1, ids, dp * routed_scaling_factor)
    if scoring == "softmax":
        dl = s * (ds - (ds * s).sum(dim=-1, keepdim=True))
    else:
        dl = ds * s * (1 - s)
    return dl.to(router_logits.dtype)


# --------------------------------------------------------------------------------------------------
# routing
# --------------------------------------------------------------------------------------------------


def route(
    topk_ids: torch.Tensor, num_experts: int, block_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Expert-sorted layout of the TK (token, slot) pairs (a stable counting sort).

    Returns ``(tokens_per_expert [E], offs [E], row_of_slot [T, k], slot_of_row [num_rows],
    block_expert [num_rows // block_size] or [0])``, all int32. See :class:`moe_kernels.RoutingPlan`.
    """
    T, k = topk_ids.shape
    E, TK = num_experts, T * k
    dev = topk_ids.device
    flat = topk_ids.reshape(-1).long()
    valid = (flat >= 0) & (flat < E)
    key = torch.where(valid, flat, torch.full_like(flat, E))  # dropped pairs sort last
    # a scatter-add histogram: torch.bincount would synchronise with the host on CUDA
    counts = torch.zeros(E + 1, dtype=torch.long, device=dev).scatter_add_(
        0, key, torch.ones_like(key)
    )
    tokens_per_expert = counts[:E]
    order = torch.sort(key, stable=True).indices  # flat pair ids in expert order
    sorted_key = key[order]
    pos = torch.arange(TK, device=dev)
    start = torch.cumsum(tokens_per_expert, 0) - tokens_per_expert  # unpadded segment starts
    if block_size > 0:
        padded = (tokens_per_expert + block_size - 1) // block_size * block_size
    else:
        padded = tokens_per_expert
    num_rows = plan_num_rows(TK, E, block_size)
    offs = torch.cumsum(padded, 0)
    pstart = offs - padded
    sorted_valid = sorted_key < E
    ekey = sorted_key.clamp(max=max(E - 1, 0))
    row = pstart[ekey] - start[ekey] + pos if E > 0 else pos
    row = torch.where(sorted_valid, row, torch.full_like(row, num_rows))  # dummy row for dropped
    slot_of_row = torch.full((num_rows + 1,), -1, dtype=torch.long, device=dev)
    slot_of_row[row] = order
    slot_of_row = slot_of_row[:num_rows]
    row_of_slot = torch.full((TK,), -1, dtype=torch.long, device=dev)
    row_of_slot[order] = torch.where(sorted_valid, row, torch.full_like(row, -1))
    if block_size > 0:
        block_start = torch.arange(num_rows // block_size, device=dev) * block_size
        be = torch.searchsorted(offs, block_start, right=True)
        block_expert = torch.where(be < E, be, torch.full_like(be, -1))
    else:
        block_expert = torch.empty(0, dtype=torch.long, device=dev)
    i32 = torch.int32
    return (
        tokens_per_expert.to(i32),
        offs.to(i32),
        row_of_slot.view(T, k).to(i32),
        slot_of_row.to(i32),
        block_expert.to(i32),
    )


# --------------------------------------------------------------------------------------------------
# permute / unpermute
# --------------------------------------------------------------------------------------------------


def permute(x: torch.Tensor, row_of_slot: torch.Tensor, slot_of_row: torch.Tensor) -> torch.Tensor:
    """``out[r] = x[slot_of_row[r] // k]``, zeros where ``slot_of_row[r] == -1``. [num_rows, H]."""
    k = row_of_slot.shape[1]
    slot = slot_of_row.long()
    used = slot >= 0
    token = torch.where(used, slot // max(k, 1), torch.zeros_like(slot))
    rows = x[token] if x.shape[0] > 0 else x.new_zeros(slot.shape[0], x.shape[1])
    return torch.where(used[:, None], rows, torch.zeros((), dtype=x.dtype, device=x.device))


def unpermute(
    y: torch.Tensor,
    row_of_slot: torch.Tensor,
    slot_of_row: torch.Tensor,
    topk_weights: torch.Tensor | None,
) -> torch.Tensor:
    """``out[t] = sum_s w[t, s] * y[row_of_slot[t, s]]`` over kept pairs, in slot order, in fp32.

    Returns [T, H] in y's dtype.
    """
    T, k = row_of_slot.shape
    cdt = compute_dtype(y.dtype, *(() if topk_weights is None else (topk_weights.dtype,)))
    acc = torch.zeros(T, y.shape[1], dtype=cdt, device=y.device)
    rows = row_of_slot.long()
    for s in range(k):  # fixed slot order: bitwise reproducible
        kept = rows[:, s] >= 0
        contrib = y[rows[:, s].clamp(min=0)].to(cdt) if y.shape[0] > 0 else acc
        if topk_weights is not None:
            contrib = contrib * topk_weights[:, s, None].to(cdt)
        acc = acc + torch.where(kept[:, None], contrib, torch.zeros((), dtype=cdt, device=y.device))
    return acc.to(y.dtype)


def unpermute_backward(
    grad_out: torch.Tensor,
    y: torch.Tensor,
    row_of_slot: torch.Tensor,
    slot_of_row: torch.Tensor,
    topk_weights: torch.Tensor | None,
    need_grad_y: bool,
    need_grad_weights: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of :func:`unpermute`: ``(grad_y [num_rows, H], grad_weights [T, k])``.

    ``grad_y[r] = w[slot] * grad_out[slot // k]`` (zero for unused rows);
    ``grad_weights[t, s] = <grad_out[t], y[row_of_slot[t, s]]>`` (zero for dropped pairs).
    """
    k = row_of_slot.shape[1]
    cdt = compute_dtype(grad_out.dtype, y.dtype)
    grad_y = _empty(y)
    grad_w = _empty(grad_out) if topk_weights is None else _empty(topk_weights)
    if need_grad_y:
        g = permute(grad_out.to(cdt), row_of_slot, slot_of_row)
        if topk_weights is not None:
            slot = slot_of_row.long()
            w = topk_weights.reshape(-1).to(cdt)
            w_row = torch.where(slot >= 0, w[slot.clamp(min=0)] if w.numel() else slot.to(cdt), 0)
            g = g * w_row[:, None]
        grad_y = g.to(y.dtype)
    if need_grad_weights and topk_weights is not None:
        rows = row_of_slot.long()
        picked = (
            y[rows.clamp(min=0)].to(cdt)
            if y.shape[0] > 0
            else grad_out.new_zeros(*rows.shape, y.shape[1], dtype=cdt)
        )
        dots = (picked * grad_out.to(cdt)[:, None, :]).sum(-1)
        grad_w = torch.where(rows >= 0, dots, 0).to(topk_weights.dtype)
    del k
    return grad_y, grad_w


# --------------------------------------------------------------------------------------------------
# grouped GEMM
# --------------------------------------------------------------------------------------------------


def _segments(offs: torch.Tensor) -> list[tuple[int, int, int]]:
    """(expert, start, end) of each non-empty segment. Reads ``offs`` on the host: the reference
    is a specification, not a fast path."""
    ends = offs.tolist()  # sync-ok: reference only
    out, start = [], 0
    for e, end in enumerate(ends):
        if end > start:
            out.append((e, start, end))
        start = max(start, end)
    return out


def _expert_matrix(b: torch.Tensor, e: int, trans_b: bool, cdt: torch.dtype) -> torch.Tensor:
    """b[e] as a [K, N] matrix in the compute dtype."""
    m = b[e].to(cdt)
    return m.t() if trans_b else m


def grouped_gemm(
    a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, trans_b: bool
) -> torch.Tensor:
    """Segment-wise ``a[rows of e] @ b[e]`` (``b[e].T`` when ``trans_b``).

    Args:
        a: [M, K]; b: [E, K, N] (or [E, N, K] with ``trans_b``); offs: [E] int32 cumulative row ends.

    Returns:
        [M, N] in a's dtype; rows past ``offs[-1]`` are zero.
    """
    cdt = compute_dtype(a.dtype, b.dtype)
    N = b.shape[1] if trans_b else b.shape[2]
    out = torch.zeros(a.shape[0], N, dtype=cdt, device=a.device)
    for e, s, t in _segments(offs):
        out[s:t] = a[s:t].to(cdt) @ _expert_matrix(b, e, trans_b, cdt)
    return out.to(a.dtype)


def grouped_gemm_backward(
    grad_out: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    offs: torch.Tensor,
    trans_b: bool,
    need_grad_a: bool,
    need_grad_b: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``grad_a = grad_out[seg e] @ b[e]^T`` (zero past offs[-1]); ragged-K ``grad_b[e] =
    a[seg e]^T @ grad_out[seg e]`` (transposed for ``trans_b``; exactly zero for empty experts)."""
    cdt = compute_dtype(a.dtype, b.dtype, grad_out.dtype)
    grad_a = torch.zeros(a.shape, dtype=cdt, device=a.device) if need_grad_a else None
    grad_b = torch.zeros(b.shape, dtype=cdt, device=b.device) if need_grad_b else None
    for e, s, t in _segments(offs):
        g = grad_out[s:t].to(cdt)
        if grad_a is not None:
            grad_a[s:t] = g @ _expert_matrix(b, e, trans_b, cdt).t()
        if grad_b is not None:
            gb = a[s:t].to(cdt).t() @ g  # [K, N]
            grad_b[e] = gb.t() if trans_b else gb
    return (
        _empty(a) if grad_a is None else grad_a.to(a.dtype),
        _empty(b) if grad_b is None else grad_b.to(b.dtype),
    )


# --------------------------------------------------------------------------------------------------
# the expert FFN
# --------------------------------------------------------------------------------------------------


def gated_activation(
    h: torch.Tensor, activation: str, alpha: float, limit: float, interleaved: bool
) -> torch.Tensor:
    """Gated activation of GEMM 1's output ``h`` [..., 2I] -> [..., I].

    gate/up are the two halves of the last axis, or its even/odd entries when ``interleaved``.
    ``swiglu``: silu(gate) * up; ``geglu``: gelu_erf(gate) * up; ``swiglu_oai``:
    g = min(gate, limit), u = clamp(up, -limit, limit), (u + 1) * g * sigmoid(alpha * g).
    """
    gate, up = _gate_up(h, interleaved)
    if activation == "swiglu":
        return F.silu(gate) * up
    if activation == "geglu":
        return F.gelu(gate, approximate="none") * up
    if activation == "swiglu_oai":
        g = gate.clamp(max=limit)
        u = up.clamp(min=-limit, max=limit)
        return (u + 1) * g * torch.sigmoid(alpha * g)
    raise ValueError(f"activation must be 'swiglu', 'geglu' or 'swiglu_oai', got {activation!r}")


#: public name of the gated activation (the op arguments shadow it inside this module)
activation = gated_activation


def _gate_up(h: torch.Tensor, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if interleaved:
        return h[..., 0::2], h[..., 1::2]
    return h.chunk(2, dim=-1)


def activation_backward(
    h: torch.Tensor,
    grad: torch.Tensor,
    activation: str,
    alpha: float,
    limit: float,
    interleaved: bool,
) -> torch.Tensor:
    """d(loss)/dh [..., 2I] of :func:`gated_activation`, given d(loss)/d(act) [..., I].

    swiglu: d/dgate = up * sig(gate) * (1 + gate * (1 - sig(gate))), d/dup = silu(gate);
    geglu: d/dgate = up * (Phi(gate) + gate * phi(gate)), d/dup = gelu(gate);
    swiglu_oai: the clamps pass the gradient where the input lies inside them (bounds included),
    d/dg = (u + 1) * (sig(alpha g) + alpha g sig(alpha g) (1 - sig(alpha g))),
    d/du = g * sig(alpha g).
    """
    gate, up = _gate_up(h, interleaved)
    if activation == "swiglu":
        sg = torch.sigmoid(gate)
        d_gate = grad * up * sg * (1 + gate * (1 - sg))
        d_up = grad * gate * sg
    elif activation == "geglu":
        cdf = 0.5 * (1 + torch.erf(gate * 0.7071067811865476))
        pdf = torch.exp(-0.5 * gate * gate) * 0.3989422804014327
        d_gate = grad * up * (cdf + gate * pdf)
        d_up = grad * gate * cdf
    elif activation == "swiglu_oai":
        g = gate.clamp(max=limit)
        u = up.clamp(min=-limit, max=limit)
        sg = torch.sigmoid(alpha * g)
        d_gate = grad * (u + 1) * (sg + alpha * g * sg * (1 - sg)) * (gate <= limit)
        d_up = grad * g * sg * ((up >= -limit) & (up <= limit))
    else:
        raise ValueError(
            f"activation must be 'swiglu', 'geglu' or 'swiglu_oai', got {activation!r}"
        )
    if interleaved:
        return torch.stack((d_gate, d_up), dim=-1).flatten(-2)
    return torch.cat((d_gate, d_up), dim=-1)


def _expert_pairs(topk_ids: torch.Tensor, E: int):
    """(expert, flat pair indices) for every expert that has pairs. Host loop: reference only."""
    flat = topk_ids.reshape(-1).long()
    for e in range(E):
        pairs = (flat == e).nonzero().squeeze(1)
        if pairs.numel():
            yield e, pairs


def _expert_pre(xe, w_gate_up, gate_up_bias, e, cdt):
    """GEMM 1 of expert ``e`` (with its bias) on its tokens' rows ``xe``: the pre-activation."""
    h = xe @ w_gate_up[e].to(cdt).t()
    if gate_up_bias is not None:
        h = h + gate_up_bias[e].to(cdt)
    return h


def _expert_forward(x, w_gate_up, w_down, gate_up_bias, down_bias, e, tok, act_args, cdt, h=None):
    """GEMM 1 (unless its result ``h`` is given) -> activation -> GEMM 2 of expert ``e`` for the
    tokens ``tok``: (x_e, h, a, o)."""
    xe = x[tok].to(cdt)
    if h is None:
        h = _expert_pre(xe, w_gate_up, gate_up_bias, e, cdt)
    a = gated_activation(h, *act_args)
    o = a @ w_down[e].to(cdt).t()
    if down_bias is not None:
        o = o + down_bias[e].to(cdt)
    return xe, h, a, o


def moe_ffn(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    gate_up_bias: torch.Tensor | None,
    down_bias: torch.Tensor | None,
    activation: str,
    alpha: float,
    limit: float,
    interleaved: bool,
) -> torch.Tensor:
    """The routed expert MLP.

    ``out[t] = sum_s w[t, s] * (W_down[e] @ act(W_gate_up[e] @ x[t] + b_gu[e]) + b_down[e])`` with
    ``e = topk_ids[t, s]``; pairs with ids outside [0, E) are skipped (they add nothing whatever
    their weight, NaN included, and their weight gradient is 0); the sum over s runs in slot
    order in fp32 (fp64 for fp64 inputs).

    Args:
        x: [T, H]; w_gate_up: [E, 2I, H]; w_down: [E, H, I] (any strides); topk_weights: [T, k]
        float; topk_ids: [T, k] int; gate_up_bias: [E, 2I] or None; down_bias: [E, H] or None.

    Returns:
        [T, H] in x's dtype.
    """
    cdt = compute_dtype(x.dtype, w_gate_up.dtype, w_down.dtype)
    T, k = topk_ids.shape
    H = w_down.shape[1]
    y = torch.zeros(T * k, H, dtype=cdt, device=x.device)  # one output row per (token, slot)
    act_args = (activation, alpha, limit, interleaved)
    for e, pairs in _expert_pairs(topk_ids, w_gate_up.shape[0]):
        *_, o = _expert_forward(
            x, w_gate_up, w_down, gate_up_bias, down_bias, e, pairs // k, act_args, cdt
        )
        y[pairs] = o
    y = y.view(T, k, H)
    # a dropped pair contributes nothing, whatever its weight (NaN, inf)
    kept = (topk_ids >= 0) & (topk_ids < w_gate_up.shape[0])
    w = torch.where(kept, topk_weights.to(cdt), 0)
    out = torch.zeros(T, H, dtype=cdt, device=x.device)
    for s in range(k):  # the sum over slots runs in slot order
        out = out + w[:, s, None] * y[:, s]
    return out.to(x.dtype)


def _pre_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def moe_ffn_pre(x, w_gate_up, w_down, topk_weights, topk_ids, gate_up_bias, *_):
    """``pre`` of :func:`moe_ffn_train` alone (the arguments are moe_ffn's)."""
    cdt = compute_dtype(x.dtype, w_gate_up.dtype, w_down.dtype)
    k = topk_ids.shape[1]
    pre = torch.zeros(topk_ids.numel(), w_gate_up.shape[1], dtype=_pre_dtype(x), device=x.device)
    for e, pairs in _expert_pairs(topk_ids, w_gate_up.shape[0]):
        h = _expert_pre(x[pairs // k].to(cdt), w_gate_up, gate_up_bias, e, cdt)
        pre[pairs] = h.to(pre.dtype)
    return pre


def moe_ffn_train(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    gate_up_bias: torch.Tensor | None,
    down_bias: torch.Tensor | None,
    activation: str,
    alpha: float,
    limit: float,
    interleaved: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`moe_ffn`'s output and ``pre``, the pre-activation its backward needs.

    Returns:
        (out [T, H] in x's dtype, pre [T*k, 2I] float32, float64 for float64 x): row ``t*k + s``
        of pre is ``W_gate_up[e] @ x[t] + b_gu[e]`` for ``e = topk_ids[t, s]`` in [0, E), zeros
        for a dropped pair.
    """
    pre = moe_ffn_pre(x, w_gate_up, w_down, topk_weights, topk_ids, gate_up_bias)
    out = moe_ffn(
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
    )
    return out, pre


def moe_ffn_backward_saved(
    grad_out: torch.Tensor,
    pre: torch.Tensor,
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    gate_up_bias: torch.Tensor | None,
    down_bias: torch.Tensor | None,
    activation: str,
    alpha: float,
    limit: float,
    interleaved: bool,
) -> tuple[torch.Tensor, ...]:
    """:func:`moe_ffn_backward` with the pre-activation ``pre`` of :func:`moe_ffn_train` (h is
    read from it, not recomputed)."""
    T, k = topk_ids.shape
    if pre.dim() != 2 or pre.shape != (T * k, w_gate_up.shape[1]) or pre.dtype != _pre_dtype(x):
        raise ValueError(
            f"moe_kernels: pre must be moe_ffn_train's {_pre_dtype(x)} [T*k={T * k}, "
            f"2I={w_gate_up.shape[1]}], got {pre.dtype} {list(pre.shape)}"
        )
    return _moe_ffn_backward(
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
        pre,
    )


def moe_ffn_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    gate_up_bias: torch.Tensor | None,
    down_bias: torch.Tensor | None,
    activation: str,
    alpha: float,
    limit: float,
    interleaved: bool,
) -> tuple[torch.Tensor, ...]:
    """Gradients of :func:`moe_ffn` w.r.t. (x, w_gate_up, w_down, topk_weights, gate_up_bias,
    down_bias), each in its input's dtype (empty [0] for a bias that is None).

    Per expert e with pairs p (tokens t = p // k, weights w_p), recomputing h, a = act(h), o:
    go = w_p * G[t]; d w_p = <G[t], o>; dW_down[e] = go^T a; db_down[e] = sum go;
    dh = act'(h, go W_down[e]); dW_gate_up[e] = dh^T x[t]; db_gate_up[e] = sum dh;
    dx[t] += dh W_gate_up[e]. Experts without pairs get exactly zero gradients.
    """
    return _moe_ffn_backward(
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
        None,
    )


def _moe_ffn_backward(
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
    pre,
):
    cdt = compute_dtype(x.dtype, w_gate_up.dtype, w_down.dtype)
    T, k = topk_ids.shape
    G = grad_out.to(cdt)
    w = topk_weights.to(cdt).reshape(-1)
    dx = torch.zeros(x.shape, dtype=cdt, device=x.device)
    dwgu = torch.zeros(w_gate_up.shape, dtype=cdt, device=x.device)
    dwd = torch.zeros(w_down.shape, dtype=cdt, device=x.device)
    dw = torch.zeros(T * k, dtype=cdt, device=x.device)
    dbgu = (
        None
        if gate_up_bias is None
        else torch.zeros(gate_up_bias.shape, dtype=cdt, device=x.device)
    )
    dbd = None if down_bias is None else torch.zeros(down_bias.shape, dtype=cdt, device=x.device)
    act_args = (activation, alpha, limit, interleaved)
    for e, pairs in _expert_pairs(topk_ids, w_gate_up.shape[0]):
        tok = pairs // k
        kept = None if pre is None else pre[pairs].to(cdt)  # h as the forward kept it
        xe, h, a, o = _expert_forward(
            x, w_gate_up, w_down, gate_up_bias, down_bias, e, tok, act_args, cdt, kept
        )
        wgu, wd = w_gate_up[e].to(cdt), w_down[e].to(cdt)
        g = G[tok]
        dw[pairs] = (g * o).sum(dim=-1)
        go = g * w[pairs, None]
        dwd[e] = go.t() @ a
        dh = activation_backward(h, go @ wd, *act_args)
        dwgu[e] = dh.t() @ xe
        dx.index_add_(0, tok, dh @ wgu)
        if dbd is not None:
            dbd[e] = go.sum(dim=0)
        if dbgu is not None:
            dbgu[e] = dh.sum(dim=0)
    return (
        dx.to(x.dtype),
        dwgu.to(w_gate_up.dtype),
        dwd.to(w_down.dtype),
        dw.view(T, k).to(topk_weights.dtype),
        _empty(x) if dbgu is None else dbgu.to(gate_up_bias.dtype),
        _empty(x) if dbd is None else dbd.to(down_bias.dtype),
    )
