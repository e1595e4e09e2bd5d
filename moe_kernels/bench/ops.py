"""The inputs of one benchmark case and every op's contender on our backends.

A :class:`Case` holds the tensors of one (shape, T, dtype, device, routing): router logits whose
top-k follows the routing distribution, the routing the reference's ``topk_gating`` derives from
them, the tokens, the expert weights (shared by every T of a shape), the reference's routing plan
and its permuted rows. Every contender of every op reads these same tensors.

Routing distributions (``--routing``, ``--skew``): expert ``e`` gets probability ``p_e`` and each
token draws its k distinct experts without replacement in proportion to ``p`` (the Gumbel top-k
trick: the logits are ``log p_e`` plus Gumbel noise):

* ``uniform``: ``p_e = 1 / E``;
* ``zipf``: ``p_e`` proportional to ``(e + 1) ** -s`` (``--skew s``, default 1.2): expert 0 is the
  hottest;
* ``one``: every token picks experts ``0 .. k-1`` (all tokens on one expert when k = 1): the
  worst load imbalance.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable

import torch

from .. import _tolerances as tols
from .presets import MoEShape
from .roofline import FORWARD_ONLY

__all__ = ["ROUTINGS", "Case", "compare", "contender", "make_case", "make_weights", "tolerance"]

ROUTINGS = ("uniform", "zipf", "one")


def routing_label(routing: str, skew: float) -> str:
    return f"zipf(s={skew:g})" if routing == "zipf" else routing


def _log_probs(routing: str, experts: int, top_k: int, skew: float) -> torch.Tensor:
    e = torch.arange(experts, dtype=torch.float64)
    if routing == "uniform":
        return torch.zeros(experts, dtype=torch.float32)
    if routing == "zipf":
        lp = -skew * torch.log(e + 1)
        return (lp - torch.logsumexp(lp, 0)).float()
    if routing == "one":
        # far below any Gumbel sample: experts >= k are never chosen
        return torch.where(e < top_k, 0.0, -1e3).float()
    raise ValueError(f"unknown routing {routing!r}; choose from {', '.join(ROUTINGS)}")


@dataclasses.dataclass
class Case:
    shape: MoEShape
    T: int
    dtype: torch.dtype
    device: torch.device
    routing: str  # label, e.g. zipf(s=1.2)
    routing_bias: torch.Tensor  # fp32 [E]: log p, added to the layer's router logits
    logits: torch.Tensor  # fp32 [T, E]
    correction_bias: torch.Tensor | None  # fp32 [E]
    topk_weights: torch.Tensor  # fp32 [T, k]
    topk_ids: torch.Tensor  # int32 [T, k]
    x: torch.Tensor  # [T, H]
    w_gate_up: torch.Tensor  # [E, 2I, H]
    w_down: torch.Tensor  # [E, H, I]
    gate_up_bias: torch.Tensor | None  # [E, 2I]
    down_bias: torch.Tensor | None  # [E, H]
    plan: object  # RoutingPlan
    xs: torch.Tensor  # [num_rows, H]: x permuted (grouped_gemm's input)
    y: torch.Tensor  # [num_rows, H]: expert outputs (unpermute's input)
    active_experts: int
    seed: int
    layer: torch.nn.Module | None = None
    layer_note: str = ""
    shared_ran: int = 0  # the shared experts' width the layer runs (0: none)


def make_weights(shape: MoEShape, dtype, device, seed: int) -> dict[str, torch.Tensor | None]:
    """Expert weights in the Hugging Face layout (one expert at a time keeps the fp32 staging
    small), scaled so activations stay of order one; biases when the shape has them."""
    gen = torch.Generator().manual_seed(seed)
    H, inter, E = shape.hidden, shape.intermediate, shape.experts
    wgu = torch.empty(E, 2 * inter, H, dtype=dtype, device=device)
    wd = torch.empty(E, H, inter, dtype=dtype, device=device)
    for e in range(E):
        wgu[e].copy_(torch.randn(2 * inter, H, generator=gen).mul_(H**-0.5))
        wd[e].copy_(torch.randn(H, inter, generator=gen).mul_(inter**-0.5))
    out: dict[str, torch.Tensor | None] = {"w_gate_up": wgu, "w_down": wd}
    out["gate_up_bias"] = out["down_bias"] = None
    if shape.bias:
        out["gate_up_bias"] = (0.1 * torch.randn(E, 2 * inter, generator=gen)).to(device, dtype)
        out["down_bias"] = (0.1 * torch.randn(E, H, generator=gen)).to(device, dtype)
    return out


def make_case(
    shape: MoEShape,
    T: int,
    *,
    dtype: torch.dtype,
    device: torch.device,
    routing: str = "uniform",
    skew: float = 1.2,
    seed: int = 0,
    weights: dict | None = None,
) -> Case:
    import moe_kernels

    E, k, H = shape.experts, shape.top_k, shape.hidden
    gen = torch.Generator().manual_seed(seed * 1_000_003 + T)
    log_p = _log_probs(routing, E, k, skew)
    gumbel = -torch.log(-torch.log(torch.rand(T, E, generator=gen).clamp_(1e-20, 1 - 1e-7)))
    logits = (log_p + gumbel).to(device)
    cbias = None
    if shape.correction_bias:
        cbias = (0.01 * torch.randn(E, generator=gen)).to(device)
    tw, ti = moe_kernels.topk_gating(
        logits, k, correction_bias=cbias, backend="reference", **shape.gating_kwargs()
    )
    # rounded to the activation dtype: transformers takes them in that dtype, so every
    # contender sees the same values
    tw = tw.to(dtype).float()
    if weights is None:
        weights = make_weights(shape, dtype, device, seed)
    x = torch.randn(T, H, generator=gen).to(device, dtype)
    plan = moe_kernels.route(ti, E, backend="reference")
    xs = moe_kernels.permute(x, plan, backend="reference")
    y = torch.randn(xs.shape, generator=gen).to(device, dtype)
    ids = ti.flatten().long()
    active = int(torch.unique(ids[(ids >= 0) & (ids < E)]).numel())
    return Case(
        shape=shape,
        T=T,
        dtype=dtype,
        device=device,
        routing=routing_label(routing, skew),
        routing_bias=log_p.to(device),
        logits=logits,
        correction_bias=cbias,
        topk_weights=tw,
        topk_ids=ti,
        x=x,
        w_gate_up=weights["w_gate_up"],
        w_down=weights["w_down"],
        gate_up_bias=weights["gate_up_bias"],
        down_bias=weights["down_bias"],
        plan=plan,
        xs=xs,
        y=y,
        active_experts=active,
        seed=seed,
    )


# ---------------------------------------------------------------------------------- the layer

#: options of the layer that ``moe_kernels.MoE`` may lack (older builds): MoE keyword -> the
#: shape's field
SHARED_OPTIONS = {
    "num_shared_experts": "num_shared_experts",
    "shared_intermediate_size": "shared_intermediate_size",
    "shared_expert_gate": "shared_expert_gate",
}


def build_layer(case: Case) -> tuple[torch.nn.Module, str, int]:
    """``moe_kernels.MoE`` for the case's shape, sharing the case's expert weights.

    Options the installed ``MoE`` does not accept (the shared experts, on builds without them) are
    left out: returns (module, note saying what was left out, shared width that runs).
    """
    import moe_kernels

    shape = case.shape
    params = inspect.signature(moe_kernels.MoE.__init__).parameters
    kwargs = dict(
        scoring=shape.scoring,
        renormalize=shape.renormalize,
        num_expert_groups=shape.num_expert_groups,
        topk_groups=shape.topk_groups,
        routed_scaling_factor=shape.routed_scaling_factor,
        correction_bias=shape.correction_bias,
        activation=shape.activation,
        alpha=shape.alpha,
        limit=shape.limit,
        interleaved=shape.interleaved,
        bias=shape.bias,
        router_bias=shape.router_bias,
    )
    notes = []
    shared = 0
    if shape.num_shared_experts:
        if all(opt in params for opt in SHARED_OPTIONS):
            for opt, field in SHARED_OPTIONS.items():
                kwargs[opt] = getattr(shape, field)
            shared = shape.shared_intermediate_size
        else:
            notes.append(
                f"shared experts ({shape.num_shared_experts}, Is {shape.shared_intermediate_size}) "
                "left out: this moe_kernels.MoE has no num_shared_experts option"
            )
    dropped = [k for k in kwargs if k not in params]
    for k in dropped:
        del kwargs[k]
    if dropped:
        notes.append(f"MoE options left out (not accepted): {', '.join(dropped)}")
    kwargs["dtype"] = case.dtype
    m = moe_kernels.MoE(
        shape.hidden, shape.intermediate, shape.experts, shape.top_k, device="meta", **kwargs
    )
    # the experts share the case's tensors (no copy: a full-size layer's experts fill the
    # memory once); every other parameter (router, shared experts, gate) gets nn.Linear's default
    # range from a fixed seed, and buffers start at zero
    nn = torch.nn
    m.gate_up_proj = nn.Parameter(case.w_gate_up)
    m.down_proj = nn.Parameter(case.w_down)
    if case.gate_up_bias is not None and getattr(m, "gate_up_proj_bias", None) is not None:
        m.gate_up_proj_bias = nn.Parameter(case.gate_up_bias)
        m.down_proj_bias = nn.Parameter(case.down_bias)
    gen = torch.Generator().manual_seed(case.seed + 17)
    for mod in m.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and p.is_meta:
                bound = 1.0 / math.sqrt(p.shape[-1])
                value = torch.rand(p.shape, generator=gen).mul_(2 * bound).sub_(bound)
                mod._parameters[name] = nn.Parameter(value.to(case.device, p.dtype))
        for name, b in list(mod._buffers.items()):
            if b is not None and b.is_meta:
                mod._buffers[name] = torch.zeros(b.shape, dtype=b.dtype, device=case.device)
    if case.correction_bias is not None and getattr(m, "e_score_correction_bias", None) is not None:
        m.e_score_correction_bias.copy_(case.correction_bias)
    # eval mode: the training-only options (router noise, jitter) are off by default anyway
    m.eval()
    if shape.approximation:
        notes.append(f"approximation: {shape.approximation}")
    if case.routing != "uniform":
        # the routing distribution enters as a bias on the router's logits (log p_e)
        bias = case.routing_bias

        def add_bias(_module, _inp, out):
            return out + bias

        m.router.register_forward_hook(add_bias)
    return m, "; ".join(notes), shared


# ------------------------------------------------------------------------------- contenders

#: a contender: (forward callable, graph builder for the backward or None, note); the graph
#: builder returns (differentiable outputs, leaves, post) as :mod:`.peers` describes
Built = tuple[Callable[[], object], Callable[[], tuple] | None, str]


def _same(grads):
    return grads


def _leaf(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().requires_grad_()


def contender(op: str, case: Case, backend: str) -> Built:
    """Our backend ``backend`` running ``op`` on ``case``."""
    import moe_kernels

    shape = case.shape
    k, E = shape.top_k, shape.experts
    b = backend
    note = ""
    if op == "gating":
        gk = shape.gating_kwargs()
        logits, cb = case.logits, case.correction_bias

        def fwd():
            return moe_kernels.topk_gating(logits, k, correction_bias=cb, backend=b, **gk)

        def graph():
            leaf = _leaf(logits)
            w, _ = moe_kernels.topk_gating(leaf, k, correction_bias=cb, backend=b, **gk)
            return [w], [leaf], _same

        return fwd, graph, note
    if op == "route":
        ids = case.topk_ids
        return (lambda: moe_kernels.route(ids, E, backend=b)), None, note
    if op == "permute":
        x, plan = case.x, case.plan

        def graph():
            leaf = _leaf(x)
            return [moe_kernels.permute(leaf, plan, backend=b)], [leaf], _same

        return (lambda: moe_kernels.permute(x, plan, backend=b)), graph, note
    if op == "unpermute":
        y, plan, tw = case.y, case.plan, case.topk_weights

        def graph():
            ly, lw = _leaf(y), _leaf(tw)
            return [moe_kernels.unpermute(ly, plan, lw, backend=b)], [ly, lw], _same

        return (lambda: moe_kernels.unpermute(y, plan, tw, backend=b)), graph, note
    if op == "grouped_gemm":
        a, w, offs = case.xs, case.w_gate_up, case.plan.offs

        def graph():
            la, lw = _leaf(a), _leaf(w)
            return (
                [moe_kernels.grouped_gemm(la, lw, offs, trans_b=True, backend=b)],
                [la, lw],
                _same,
            )

        return (
            lambda: moe_kernels.grouped_gemm(a, w, offs, trans_b=True, backend=b),
            graph,
            note,
        )
    if op == "moe_ffn":
        fk = shape.ffn_kwargs()
        x, wgu, wd = case.x, case.w_gate_up, case.w_down
        tw, ti, gub, db = case.topk_weights, case.topk_ids, case.gate_up_bias, case.down_bias

        def fwd():
            return moe_kernels.moe_ffn(
                x, wgu, wd, tw, ti, gate_up_bias=gub, down_bias=db, backend=b, **fk
            )

        def graph():
            leaves = [_leaf(t) for t in (x, wgu, wd, tw)]
            lb = [_leaf(gub), _leaf(db)] if gub is not None else [None, None]
            out = moe_kernels.moe_ffn(
                *leaves, ti, gate_up_bias=lb[0], down_bias=lb[1], backend=b, **fk
            )
            return [out], leaves + [t for t in lb if t is not None], _same

        return fwd, graph, note
    if op == "layer":
        if case.layer is None:
            case.layer, case.layer_note, case.shared_ran = build_layer(case)
        m, x = case.layer, case.x

        def fwd():
            m.backend = b
            return m(x)

        def graph():
            m.backend = b
            lx = _leaf(x)
            params = [p for p in m.parameters() if p.is_floating_point()]
            for p in params:
                p.requires_grad_(True)
            return [m(lx)], [lx, *params], _same

        return fwd, graph, case.layer_note
    raise ValueError(f"unknown op {op!r}")


#: the registered ops (moe_kernels._registry.FORWARD_OPS) each benchmarked op calls: a backend
#: without a kernel for one of them cannot run it
KERNELS = {
    "gating": ("topk_gating",),
    "route": ("route",),
    "permute": ("permute",),
    "unpermute": ("unpermute",),
    "grouped_gemm": ("grouped_gemm",),
    "moe_ffn": ("moe_ffn",),
    "layer": ("topk_gating", "moe_ffn"),
}


def why_not(backend: str, op: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why ``backend`` cannot run ``op`` on ``device`` / ``dtype``, or None if it can."""
    from moe_kernels import _backends

    b = _backends._BACKENDS[backend]
    for kernel in KERNELS[op]:
        why = _backends._why_not(b, kernel, device, dtype)
        if why is not None:
            return why
    return None


def has_backward(op: str) -> bool:
    return op not in FORWARD_ONLY


# ---------------------------------------------------------------------------------- errors


def _plan_fields(plan) -> list:
    return [getattr(plan, f) for f in ("tokens_per_expert", "offs", "row_of_slot", "slot_of_row")]


def compare(op: str, pass_: str, out, ref) -> float:
    """max_rel_err of ``out`` against the reference's ``ref`` (the largest over every output or
    gradient; integer outputs must match exactly, else inf)."""
    if pass_ == "bwd":
        worst = 0.0
        for g, r in zip(out, ref):
            if g is None and r is None:
                continue
            if g is None or r is None:
                return math.inf
            worst = max(worst, tols.max_rel_err(g, r))
        return worst
    if op == "route":
        same = all(torch.equal(a, b) for a, b in zip(_plan_fields(out), _plan_fields(ref)))
        return 0.0 if same else math.inf
    if op == "gating":
        (w, ids), (rw, rids) = out, ref
        if not torch.equal(ids, rids):
            return math.inf
        return tols.max_rel_err(w, rw)
    return tols.max_rel_err(out, ref)


def tolerance(op: str, pass_: str, dtype: torch.dtype, device: torch.device) -> float:
    """The bound on ``max_rel_err`` against the reference (sizes and reasons in
    moe_kernels/_tolerances.py):

    * gating: the weights are fp32 whatever the dtype: ``GATING_TOL`` (bwd: ``GRAD_FACTOR`` x);
    * route: integer outputs, exact (0);
    * permute: a copy, exact forward; its backward sums k rows in fp32 and rounds once: ``TOL``;
    * unpermute: a weighted sum of k rows in fp32, rounded once: ``TOL`` (bwd: ``GRAD_FACTOR`` x);
    * grouped_gemm, moe_ffn, layer: model-sized reductions in ``dtype`` against the reference in
      the same dtype: ``LAYER_TOL`` (fp32 on a GPU: ``GPU_FP32_TOL``, TF32); bwd ``GRAD_FACTOR``
      x, since the gradients chain two products.
    """
    grad = tols.GRAD_FACTOR if pass_ == "bwd" else 1
    if op == "gating":
        return tols.GATING_TOL * grad
    if op == "route":
        return 0.0
    if op == "permute":
        return 0.0 if pass_ == "fwd" else tols.TOL[dtype]
    if op == "unpermute":
        return tols.TOL[dtype] * grad
    tol = tols.LAYER_TOL[dtype]
    if dtype == torch.float32 and device.type == "cuda":
        tol = max(tol, tols.GPU_FP32_TOL)
    return tol * grad
