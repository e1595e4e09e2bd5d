"""moe_kernels.MoE's training options: noisy top-k gating, router jitter, capacity with both drop
policies, the load-balancing and z-losses through autograd, shared experts, the correction-bias
update, and the properties they keep (no host reads, determinism, activation checkpointing,
torch.compile).

Every option is checked against a float64 implementation written here from its paper's
definition (never the layer's own code): the routing and the experts as plain torch ops on
float64 copies of the parameters, capacity as a loop over slots and tokens that fills each
expert up to C, the load-balancing loss also against Hugging Face transformers'
``load_balancing_loss_func``, and the loss gradients against ``torch.autograd`` on the explicit
sum ``main + coef · loss``.  Runs on the backends that take CPU tensors (reference, cpu, and
triton under ``TRITON_INTERPRET=1``); every case is small.
"""

# ruff: noqa: E741  (I is the expert intermediate size, as everywhere in the package)
from __future__ import annotations

import dataclasses
import math
import pathlib
import re
import runpy
import sys

import pytest
import torch
import torch.nn.functional as F
from testutil import backends, device_of

from moe_kernels import losses
from moe_kernels._tolerances import FP32_AGREE, FP32_AGREE_GRAD, max_rel_err
from moe_kernels.layers import (
    MoE,
    MoEAux,
    capacity_keep_mask,
    get_aux_loss_scale,
    set_aux_loss_scale,
)

BACKENDS = [b for b in backends() if device_of(b) == "cpu"]
# the backend whose ops never read values on the host in Python (the reference's moe_ffn calls
# nonzero / tolist: it is the specification, not a fast path)
COMPILED = [b for b in BACKENDS if b != "reference"]

H, I, E, K = 16, 12, 6, 2


@pytest.fixture(autouse=True)
def _default_scale():
    set_aux_loss_scale(1.0)
    yield
    set_aux_loss_scale(1.0)


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Fresh random values in every floating parameter and buffer (never zeros)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in list(module.parameters()) + list(module.buffers()):
            if p.is_floating_point():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def _x(T, seed, h=H, grad=False):
    x = torch.randn(T, h, generator=torch.Generator().manual_seed(seed))
    return x.requires_grad_(grad)


# ------------------------------------------------------------------ float64 definitions (papers)


def _act(h, activation):
    gate, up = h.chunk(2, dim=-1)
    if activation == "swiglu":
        return gate * torch.sigmoid(gate) * up
    assert activation == "geglu"
    return 0.5 * gate * (1 + torch.erf(gate / math.sqrt(2.0))) * up


def _f64_params(m: MoE) -> dict[str, torch.Tensor]:
    """float64 leaf copies of every parameter (requiring grad), by name."""
    return {n: p.detach().double().requires_grad_() for n, p in m.named_parameters()}


def _f64_logits(m, p, x, jitter_u=None, noise_eps=None):
    """Router logits: x·W_g (+ b), the input multiplied by the Switch jitter ``jitter_u`` and
    Shazeer's noise ``noise_eps ⊙ softplus(x·W_noise)`` added when given."""
    xr = x if jitter_u is None else x * jitter_u.double()
    logits = xr @ p["router.weight"].t()
    if "router.bias" in p:
        logits = logits + p["router.bias"]
    if noise_eps is not None:
        logits = logits + noise_eps.double() * F.softplus(xr @ p["router_noise.weight"].t())
    return logits


def _f64_gating(m, logits):
    """(weights [T, k] f64, ids [T, k] long): softmax / sigmoid scores, top-k by score (ties to
    the lower index), renormalised and scaled as the layer's options say."""
    scores = torch.softmax(logits, -1) if m.scoring == "softmax" else torch.sigmoid(logits)
    sel = scores.detach()
    if m.e_score_correction_bias is not None:
        sel = sel + m.e_score_correction_bias.double()
    ids = torch.sort(sel, dim=-1, descending=True, stable=True).indices[:, : m.top_k]
    w = scores.gather(1, ids)
    if m.renormalize:
        w = w / w.sum(-1, keepdim=True)
    return w * m.routed_scaling_factor, ids


def _f64_layer(m, p, x, w, ids, kept):
    """Σ over kept slots of w · expert(x), plus the (gated) shared experts: [T, H] f64."""
    out = torch.zeros_like(x)
    for s in range(ids.shape[1]):
        e = ids[:, s]
        h = torch.einsum("th,tnh->tn", x, p["gate_up_proj"][e])
        o = torch.einsum("ti,thi->th", _act(h, m.activation), p["down_proj"][e])
        out = out + torch.where(kept[:, s, None], w[:, s, None] * o, 0.0)
    if m.shared_experts is not None:
        hs = x @ p["shared_experts.gate_up_proj"].t()
        so = _act(hs, m.activation) @ p["shared_experts.down_proj"].t()
        if m.shared_expert_gate is not None:
            so = so * torch.sigmoid(x @ p["shared_expert_gate.weight"].t())
        out = out + so
    return out


def _f64_keep(ids, w0, num_experts, C, policy):
    """Capacity by definition: slot by slot, tokens in position order (or by descending w0, ties
    to the earlier token), each expert takes assignments while it has fewer than C."""
    T, k = ids.shape
    load = [0] * num_experts
    kept = torch.zeros(T, k, dtype=torch.bool)
    if policy == "position":
        order = list(range(T))
    else:
        order = sorted(range(T), key=lambda t: (-float(w0[t]), t))
    for s in range(k):
        for t in order:
            e = int(ids[t, s])
            if load[e] < C:
                kept[t, s] = True
                load[e] += 1
    return kept


def _f64_lb(logits, ids, num_experts, scoring="softmax"):
    """Switch Transformer: E · Σ_e f_e P_e, f_e = (assignments to e) / T, P_e = mean probability
    (sigmoid: mean of the per-token normalised scores)."""
    T = logits.shape[0]
    if scoring == "softmax":
        probs = torch.softmax(logits, -1)
    else:
        s = torch.sigmoid(logits)
        probs = s / s.sum(-1, keepdim=True)
    f = torch.stack([(ids == e).sum() for e in range(num_experts)]).double() / T
    return num_experts * (f * probs.mean(0)).sum()


def _f64_z(logits):
    """ST-MoE: mean over tokens of logsumexp(logits)²."""
    return (torch.logsumexp(logits, -1) ** 2).mean()


def _f64_bincount(ids, num_experts):
    return torch.bincount(ids.reshape(-1).long(), minlength=num_experts)


# ----------------------------------------------------------------------------- defaults, API


def test_defaults_unchanged():
    m = MoE(H, I, E, K)
    assert m.noisy_gating is False and m.router_jitter == 0.0
    assert m.capacity_factor is None and m.drop_policy == "position"
    assert m.aux_loss_coef == 0.0 and m.z_loss_coef == 0.0
    assert m.num_shared_experts == 0 and m.shared_intermediate_size is None
    assert m.router_noise is None and m.shared_experts is None and m.shared_expert_gate is None
    # no new parameter or buffer on a default layer (state dicts load as before)
    assert [n for n, _ in m.named_parameters()] == ["gate_up_proj", "down_proj", "router.weight"]
    assert list(m.state_dict()) == ["gate_up_proj", "down_proj", "router.weight"]
    # training mode, grad enabled: still the plain router -> gating -> experts
    _randomize(m, 1)
    x = _x(9, 2)
    out = m(x)
    with torch.no_grad():
        w, ids = m.gate(m.router(x))
        assert torch.equal(out.detach(), m.experts(x, w, ids))


@pytest.mark.parametrize("backend", BACKENDS)
def test_return_values_and_aux_fields(backend):
    m = MoE(H, I, E, K, backend=backend, capacity_factor=0.75)
    _randomize(m, 3)
    x = _x(2 * 7, 4).view(2, 7, H)
    out = m(x)
    assert isinstance(out, torch.Tensor) and out.shape == x.shape
    out2, logits = m(x, return_router_logits=True)
    assert logits.shape == (14, E) and logits.requires_grad
    out3, aux = m(x, return_aux=True)
    out4, logits4, aux4 = m(x, return_router_logits=True, return_aux=True)
    for o in (out2, out3, out4):
        assert torch.equal(o, out)
    assert torch.equal(logits4, logits)
    assert isinstance(aux, MoEAux)
    assert [f.name for f in dataclasses.fields(MoEAux)] == [
        "router_logits",
        "topk_ids",
        "topk_weights",
        "kept",
        "tokens_per_expert",
        "dropped",
        "load_balancing_loss",
        "z_loss",
        "similarity_loss",
    ]
    shapes = {
        "router_logits": ((14, E), torch.float32),
        "topk_ids": ((14, K), torch.int32),
        "topk_weights": ((14, K), torch.float32),
        "kept": ((14, K), torch.bool),
        "tokens_per_expert": ((E,), torch.int64),
        "dropped": ((), torch.int64),
        "load_balancing_loss": ((), torch.float32),
        "z_loss": ((), torch.float32),
        "similarity_loss": ((), torch.float32),
    }
    for name, (shape, dtype) in shapes.items():
        v = getattr(aux, name)
        assert tuple(v.shape) == shape and v.dtype == dtype, name
        assert not v.requires_grad, name
    assert torch.equal(aux.router_logits, logits.detach())
    assert torch.equal(aux.tokens_per_expert, _f64_bincount(aux.topk_ids, E))
    assert int(aux.dropped) == int((~aux.kept).sum()) > 0


def test_bad_options():
    with pytest.raises(ValueError, match="capacity_factor"):
        MoE(H, I, E, K, capacity_factor=0.0)
    with pytest.raises(ValueError, match="capacity_factor"):
        MoE(H, I, E, K, capacity_factor=float("nan"))
    with pytest.raises(TypeError, match="capacity_factor"):
        MoE(H, I, E, K, capacity_factor="1.0x")
    with pytest.raises(ValueError, match="drop_policy"):
        MoE(H, I, E, K, drop_policy="random")
    with pytest.raises(ValueError, match="router_jitter"):
        MoE(H, I, E, K, router_jitter=-0.1)
    with pytest.raises(ValueError, match="router_jitter"):
        MoE(H, I, E, K, router_jitter=1.0)
    with pytest.raises(ValueError, match="aux_loss_coef"):
        MoE(H, I, E, K, aux_loss_coef=float("inf"))
    with pytest.raises(ValueError, match="num_shared_experts"):
        MoE(H, I, E, K, num_shared_experts=-1)
    with pytest.raises(ValueError, match="num_shared_experts"):
        MoE(H, I, E, K, shared_expert_gate=True)
    with pytest.raises(ValueError, match="num_shared_experts"):
        MoE(H, I, E, K, shared_intermediate_size=8)
    # options are read (and checked) at every forward
    m = MoE(H, I, E, K, backend="reference")
    x = _x(4, 5)
    m.drop_policy = "random"
    with pytest.raises(ValueError, match="drop_policy"):
        m(x)
    m.drop_policy = "position"
    m.capacity_factor = -1
    with pytest.raises(ValueError, match="capacity_factor"):
        m(x)
    m.capacity_factor = None
    m.noisy_gating = True  # built without router_noise
    with pytest.raises(RuntimeError, match="router_noise"):
        m(x)
    m.eval()
    m(x)  # no noise in eval mode: the missing module is not needed


def test_set_aux_loss_scale_checks():
    set_aux_loss_scale(0.5)
    assert get_aux_loss_scale() == 0.5
    with pytest.raises(ValueError, match="finite"):
        set_aux_loss_scale(float("inf"))
    with pytest.raises(TypeError, match="scale"):
        set_aux_loss_scale("big")
    with pytest.raises(ValueError, match="0-d"):
        set_aux_loss_scale(torch.ones(2))
    with pytest.raises(ValueError, match="0-d"):
        set_aux_loss_scale(torch.tensor(2))
    assert get_aux_loss_scale() == 0.5


# ----------------------------------------------------------------------------- noise, jitter


@pytest.mark.parametrize("backend", BACKENDS)
def test_noisy_gating(backend):
    """Shazeer et al. 2017: logits = x·W_g + ε ⊙ softplus(x·W_noise) in training, ε ~ N(0, 1)
    from torch's default generator; W_noise starts at zero; no noise in eval mode."""
    m = MoE(H, I, E, K, noisy_gating=True, backend=backend)
    assert m.router_noise.weight.shape == (E, H) and not m.router_noise.weight.any()
    assert m.router_noise.weight.dtype == torch.float32 and m.router_noise.bias is None
    _randomize(m, 6)
    x = _x(11, 7)
    torch.manual_seed(8)
    out, aux = m(x, return_aux=True)
    torch.manual_seed(8)
    eps = torch.randn(11, E)
    p = _f64_params(m)
    logits = _f64_logits(m, p, x.double(), noise_eps=eps)
    assert max_rel_err(aux.router_logits, logits) < FP32_AGREE
    w, ids = _f64_gating(m, logits)
    assert torch.equal(aux.topk_ids.long(), ids)
    ref = _f64_layer(m, p, x.double(), w, ids, torch.ones_like(ids, dtype=torch.bool))
    assert max_rel_err(out, ref) < FP32_AGREE
    # the noise changes the routing of these tokens
    clean_w, clean_ids = _f64_gating(m, _f64_logits(m, p, x.double()))
    assert not torch.equal(clean_ids, ids)

    m.eval()
    out_e, aux_e = m(x, return_aux=True)
    assert torch.equal(aux_e.topk_ids.long(), clean_ids)
    assert torch.equal(aux_e.router_logits, m.router(x).detach())
    ref_e = _f64_layer(m, p, x.double(), clean_w, clean_ids, torch.ones_like(ids, dtype=torch.bool))
    assert max_rel_err(out_e, ref_e) < FP32_AGREE


@pytest.mark.parametrize("backend", BACKENDS)
def test_router_jitter(backend):
    """Switch Transformer: in training the router's input is multiplied by U[1 - eps, 1 + eps]
    noise; the experts see the clean input."""
    eps = 0.3
    m = MoE(H, I, E, K, router_jitter=eps, backend=backend)
    _randomize(m, 9)
    x = _x(10, 10)
    torch.manual_seed(11)
    out, aux = m(x, return_aux=True)
    torch.manual_seed(11)
    u = torch.empty(10, H).uniform_(1 - eps, 1 + eps)
    assert u.min() >= 1 - eps and u.max() <= 1 + eps
    p = _f64_params(m)
    logits = _f64_logits(m, p, x.double(), jitter_u=u)
    assert max_rel_err(aux.router_logits, logits) < FP32_AGREE
    w, ids = _f64_gating(m, logits)
    assert torch.equal(aux.topk_ids.long(), ids)
    ref = _f64_layer(m, p, x.double(), w, ids, torch.ones_like(ids, dtype=torch.bool))
    assert max_rel_err(out, ref) < FP32_AGREE
    assert max_rel_err(aux.router_logits, _f64_logits(m, p, x.double())) > 1e-3  # it jittered

    m.eval()
    _, aux_e = m(x, return_aux=True)
    assert torch.equal(aux_e.router_logits, m.router(x).detach())


# ----------------------------------------------------------------------------------- capacity

# Hand-built routing, E = 3, k = 2, T = 4, capacity_factor 1 -> C = ceil(1·4·2/3) = 3; H = E and
# router.weight = I, so the logits are the rows below.  renormalize=False: topk_weights[:, 0] is
# the first choice's softmax probability (priorities t2 0.918 > t3 0.798 > t1 0.786 > t0 0.705).
# Expert 0 is the first choice of t1, t3 and the second choice of t0, t2: 4 assignments for 3
# places.  Slot order keeps both first choices; "position" then keeps t0's second choice and
# drops t2's, "priority" keeps t2's (higher priority) and drops t0's.  (A token-major order would
# have dropped t3's first choice instead.)
HAND_LOGITS = [[2.0, 3.0, 0.0], [3.0, 1.5, 0.0], [2.5, 0.0, 5.0], [3.5, 0.0, 2.0]]
HAND_IDS = [[1, 0], [0, 1], [2, 0], [0, 2]]
HAND_KEPT = {
    "position": [[True, True], [True, True], [True, False], [True, True]],
    "priority": [[True, False], [True, True], [True, True], [True, True]],
}
# k = 1, E = 2, T = 5, capacity_factor 0.5 -> C = ceil(0.5·5·1/2) = 2.  Tokens 0-3 choose expert
# 0, token 4 expert 1: "position" keeps t0, t1; "priority" the two largest weights, t3 then t1.
# Dropped tokens get no routed output at all (only the shared experts').
HAND1_LOGITS = [[1.0, 0.0], [2.0, 0.0], [0.5, 0.0], [3.0, 0.0], [0.0, 1.0]]
HAND1_KEPT = {
    "position": [[True], [True], [False], [False], [True]],
    "priority": [[False], [True], [False], [True], [True]],
}


def _hand_layer(logits, k, cf, policy, backend, shared):
    n_exp = len(logits[0])
    m = MoE(
        n_exp,
        5,
        n_exp,
        k,
        renormalize=False,
        capacity_factor=cf,
        drop_policy=policy,
        backend=backend,
        num_shared_experts=1 if shared else 0,
    )
    _randomize(m, 12)
    with torch.no_grad():
        m.router.weight.copy_(torch.eye(n_exp))
    return m, torch.tensor(logits)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("policy", ["position", "priority"])
def test_capacity_hand_built_top2(backend, policy):
    m, x = _hand_layer(HAND_LOGITS, 2, 1.0, policy, backend, shared=False)
    assert m.capacity(4) == 3
    out, aux = m(x, return_aux=True)
    assert aux.topk_ids.tolist() == HAND_IDS
    assert aux.kept.tolist() == HAND_KEPT[policy]
    assert int(aux.dropped) == 1
    assert aux.tokens_per_expert.tolist() == [4, 2, 2]  # before drops
    # the kept weights are not renormalised
    p = _f64_params(m)
    w, ids = _f64_gating(m, x.double())
    ref = _f64_layer(m, p, x.double(), w, ids, torch.tensor(HAND_KEPT[policy]))
    assert max_rel_err(out, ref) < FP32_AGREE
    assert max_rel_err(aux.topk_weights, w) < FP32_AGREE


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("policy", ["position", "priority"])
def test_capacity_hand_built_top1_fully_dropped_tokens(backend, policy):
    m, x = _hand_layer(HAND1_LOGITS, 1, 0.5, policy, backend, shared=True)
    out, aux = m(x, return_aux=True)
    kept = torch.tensor(HAND1_KEPT[policy])
    assert aux.kept.tolist() == kept.tolist() and int(aux.dropped) == 2
    gone = ~kept[:, 0]
    # a token whose every slot is dropped gets exactly the shared experts' output
    with torch.no_grad():
        shared = m.shared(x)
    assert torch.equal(out[gone], shared[gone])
    p = _f64_params(m)
    w, ids = _f64_gating(m, x.double())
    assert max_rel_err(out, _f64_layer(m, p, x.double(), w, ids, kept)) < FP32_AGREE
    # without shared experts the routed output of those tokens is exactly zero
    m.shared_experts = None
    out2 = m(x)
    assert not out2[gone].any() and out2[~gone].abs().min() > 0


# (T, E, k, capacity_factor, renormalize, why)
CAPACITY_CASES = [
    (37, 5, 2, 1.0, True, "k=2, C = ceil(14.8) = 15"),
    (40, 8, 3, 0.5, True, "heavy dropping, C = 8"),
    (23, 4, 1, 1.25, True, "k=1 renormalised: every w0 = 1, priority ties -> position order"),
    (29, 6, 2, 2.0, False, "C = 20 above most loads: few or no drops"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("policy", ["position", "priority"])
@pytest.mark.parametrize("case", CAPACITY_CASES, ids=[c[-1] for c in CAPACITY_CASES])
def test_capacity_random_routings(backend, policy, case, monkeypatch):
    T, n_exp, k, cf, renorm, _ = case
    m = MoE(H, 8, n_exp, k, renormalize=renorm, capacity_factor=cf, drop_policy=policy,
            backend=backend)  # fmt: skip
    _randomize(m, 13)
    with torch.no_grad():  # inputs with a positive mean and a router that favours expert 0
        m.router.weight[0] += 0.2
    x = _x(T, 14) + 0.5
    seen = []
    real = m.experts

    def spy(xx, w, ids):
        seen.append(ids.clone())
        return real(xx, w, ids)

    monkeypatch.setattr(m, "experts", spy)
    out, aux = m(x, return_aux=True)
    C = math.ceil(cf * T * k / n_exp)
    assert m.capacity(T) == C
    kept = _f64_keep(aux.topk_ids, aux.topk_weights[:, 0], n_exp, C, policy)
    assert torch.equal(aux.kept, kept)
    assert int(aux.dropped) == int((~kept).sum())
    assert torch.equal(aux.tokens_per_expert, _f64_bincount(aux.topk_ids, n_exp))
    assert (_f64_bincount(aux.topk_ids[kept], n_exp) <= C).all()
    if case[-1].startswith("heavy"):
        assert int(aux.dropped) > 0
    # the experts receive id -1 for dropped assignments (the kernels skip them)
    assert torch.equal(seen[0], torch.where(kept, aux.topk_ids, -1))
    p = _f64_params(m)
    w, ids = _f64_gating(m, _f64_logits(m, p, x.double()))
    assert torch.equal(ids, aux.topk_ids.long())
    assert max_rel_err(out, _f64_layer(m, p, x.double(), w, ids, kept)) < FP32_AGREE


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_with_experts(backend):
    """forward_with_experts runs the given expert function in place of the layer's (what expert
    parallelism replaces), with dropped ids as -1; the rest -- losses included -- is unchanged."""
    coefs = (0.5, 0.05)
    m, x, g = _grad_case(backend, aux_loss_coef=coefs[0], z_loss_coef=coefs[1], capacity_factor=0.8)
    calls = []

    def experts(xx, w, ids):
        calls.append(ids.clone())
        return m.experts(xx, w, ids)

    out, aux = m.forward_with_experts(x, experts, return_aux=True)
    assert len(calls) == 1 and torch.equal(calls[0], torch.where(aux.kept, aux.topk_ids, -1))
    assert int(aux.dropped) > 0
    (out * g).sum().backward()
    _check_grads(m, x, _reference_grads(m, x, g, aux.kept, coefs))


def test_capacity_keep_mask_function():
    ids = torch.tensor([[0, 1], [0, -1], [2**62, 0], [0, 1]])
    kept, counts = capacity_keep_mask(ids, 3, 2)
    # slot 0: expert 0 keeps t0, t1 and drops t3; id 2^62 is out of range.  Slot 1: expert 1 keeps
    # t0, t3; expert 0 is full (t2 dropped); id -1 is never kept
    assert kept.tolist() == [[True, True], [True, False], [False, False], [False, True]]
    assert counts.tolist() == [4, 2, 0]
    kept, _ = capacity_keep_mask(ids, 3, 2, priority=torch.tensor([0.1, 0.2, 0.3, 0.4]))
    assert kept.tolist() == [[False, True], [True, False], [False, False], [True, True]]
    kept, counts = capacity_keep_mask(torch.zeros(0, 2, dtype=torch.int32), 3, 0)
    assert kept.shape == (0, 2) and counts.tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="capacity"):
        capacity_keep_mask(ids, 3, -1)
    with pytest.raises(ValueError, match="priority"):
        capacity_keep_mask(ids, 3, 2, priority=torch.ones(3))
    with pytest.raises(TypeError, match="topk_ids"):
        capacity_keep_mask(ids.float(), 3, 2)


# --------------------------------------------------------------------------------------- losses


@pytest.mark.parametrize("k", [1, 2, 3])
def test_load_balancing_loss_matches_transformers(k):
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    logits = torch.randn(33, 7, generator=torch.Generator().manual_seed(20 + k)) * 2
    ids = torch.topk(torch.softmax(logits, -1), k, dim=-1).indices
    theirs = mixtral.load_balancing_loss_func((logits,), 7, k)
    ours = losses.load_balancing_loss(logits, ids, 7)
    assert ours.shape == () and ours.dtype == torch.float32
    assert max_rel_err(ours, theirs) < FP32_AGREE
    assert max_rel_err(ours, _f64_lb(logits.double(), ids, 7)) < FP32_AGREE


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_losses_match_definitions(backend):
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    m = MoE(H, I, E, 3, backend=backend)
    _randomize(m, 21)
    _, aux = m(_x(19, 22), return_aux=True)
    theirs = mixtral.load_balancing_loss_func((aux.router_logits,), E, 3)
    assert max_rel_err(aux.load_balancing_loss, theirs) < FP32_AGREE
    assert max_rel_err(aux.z_loss, _f64_z(aux.router_logits.double())) < FP32_AGREE

    # DeepSeek-V3 style: sigmoid scores, selection bias, groups; f from the ids actually chosen
    m = MoE(H, I, 8, 2, backend=backend, scoring="sigmoid", correction_bias=True,
            num_expert_groups=4, topk_groups=2)  # fmt: skip
    _randomize(m, 23)
    _, aux = m(_x(19, 24), return_aux=True)
    ref = _f64_lb(aux.router_logits.double(), aux.topk_ids, 8, scoring="sigmoid")
    assert max_rel_err(aux.load_balancing_loss, ref) < FP32_AGREE
    direct = losses.load_balancing_loss(aux.router_logits, aux.topk_ids, 8, scoring="sigmoid")
    assert torch.equal(direct, aux.load_balancing_loss)


def test_loss_functions_dtypes_and_checks():
    logits = torch.randn(12, 5, generator=torch.Generator().manual_seed(25)) * 3
    ids = torch.topk(logits, 2, dim=-1).indices.int()
    for dt in (torch.bfloat16, torch.float16, torch.float64):
        lb = losses.load_balancing_loss(logits.to(dt), ids, 5)
        z = losses.z_loss(logits.to(dt))
        assert lb.shape == () and lb.dtype == torch.float32
        assert z.shape == () and z.dtype == torch.float32
    assert max_rel_err(losses.z_loss(logits), _f64_z(logits.double())) < FP32_AGREE
    # gradients: against autograd through the float64 definitions
    l1 = logits.clone().requires_grad_()
    l2 = logits.double().requires_grad_()
    (losses.load_balancing_loss(l1, ids, 5) + 0.5 * losses.z_loss(l1)).backward()
    (_f64_lb(l2, ids, 5) + 0.5 * _f64_z(l2)).backward()
    assert max_rel_err(l1.grad, l2.grad) < FP32_AGREE
    # balanced routing: loss = k
    uniform = torch.zeros(4, 4)
    bal = losses.load_balancing_loss(uniform, torch.tensor([[0, 1], [2, 3], [1, 0], [3, 2]]), 4)
    assert bal.item() == pytest.approx(2.0, rel=1e-6)
    # no tokens: 0, not NaN
    empty = torch.zeros(0, 4)
    assert losses.load_balancing_loss(empty, torch.zeros(0, 2, dtype=torch.int64), 4).item() == 0
    assert losses.z_loss(empty).item() == 0
    with pytest.raises(ValueError, match="num_experts"):
        losses.load_balancing_loss(logits, ids, 6)
    with pytest.raises(ValueError, match="tokens"):
        losses.load_balancing_loss(logits, ids[:3], 5)
    with pytest.raises(ValueError, match="scoring"):
        losses.load_balancing_loss(logits, ids, 5, scoring="relu")
    with pytest.raises(TypeError, match="topk_ids"):
        losses.load_balancing_loss(logits, ids.float(), 5)
    with pytest.raises(TypeError, match="router_logits"):
        losses.z_loss(ids)
    with pytest.raises(ValueError, match="2-D"):
        losses.z_loss(logits[0])


def _grad_case(backend, **opts):
    m = MoE(H, I, E, K, backend=backend, **opts)
    _randomize(m, 30)
    x = _x(13, 31, grad=True)
    g = torch.randn(13, H, generator=torch.Generator().manual_seed(32))
    return m, x, g


def _reference_grads(m, x, g, kept, coefs, scale=1.0):
    """Gradients of ``(out·g).sum() + scale · Σ coef · loss`` through float64 autograd on the
    explicit sum: {name: grad}, with x's under "x"."""
    p = _f64_params(m)
    x2 = x.detach().double().requires_grad_()
    logits = _f64_logits(m, p, x2)
    w, ids = _f64_gating(m, logits)
    total = (_f64_layer(m, p, x2, w, ids, kept) * g.double()).sum()
    aux, z = coefs
    if aux:
        total = total + scale * aux * _f64_lb(logits, ids, m.num_experts, m.scoring)
    if z:
        total = total + scale * z * _f64_z(logits)
    total.backward()
    grads = {n: t.grad for n, t in p.items()}
    grads["x"] = x2.grad
    return grads


def _check_grads(m, x, grads):
    assert max_rel_err(x.grad, grads["x"]) < FP32_AGREE_GRAD
    for n, t in m.named_parameters():
        assert t.grad is not None and t.grad.abs().max() > 0, n
        assert max_rel_err(t.grad, grads[n]) < FP32_AGREE_GRAD, n


LOSS_CASES = [
    ({}, "softmax"),
    ({"scoring": "sigmoid", "capacity_factor": 1.0}, "sigmoid with capacity drops"),
    ({"num_shared_experts": 2, "shared_expert_gate": True}, "gated shared experts"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opts", [c[0] for c in LOSS_CASES], ids=[c[1] for c in LOSS_CASES])
def test_loss_gradients_through_autograd(backend, opts):
    """The user's loss is only the main loss: the layer adds coef · loss to the backward pass,
    gradients equal float64 autograd on main + coef_aux · LB + coef_z · Z."""
    coefs = (0.5, 0.05)
    m, x, g = _grad_case(backend, aux_loss_coef=coefs[0], z_loss_coef=coefs[1], **opts)
    out, aux = m(x, return_aux=True)
    (out * g).sum().backward()
    want = _reference_grads(m, x, g, aux.kept, coefs)
    _check_grads(m, x, want)
    # the losses matter here: the router's gradient without them is clearly different
    main_only = _reference_grads(m, x, g, aux.kept, (0.0, 0.0))
    assert max_rel_err(main_only["router.weight"], want["router.weight"]) > 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_losses_with_in_place_use_of_the_output(backend):
    """The output stays an ordinary tensor with the losses attached: an in-place update of it
    (a residual added in place) back-propagates the same gradients."""
    coefs = (0.5, 0.05)
    m, x, g = _grad_case(backend, aux_loss_coef=coefs[0], z_loss_coef=coefs[1])
    out, aux = m(x, return_aux=True)
    out.mul_(2.0)
    (out * (g / 2)).sum().backward()
    _check_grads(m, x, _reference_grads(m, x, g, aux.kept, coefs))


@pytest.mark.parametrize("backend", BACKENDS)
def test_aux_loss_scale(backend):
    """set_aux_loss_scale(s) multiplies the injected gradients (read at forward) and leaves the
    logged values alone; a 0-d tensor works too."""
    coefs = (0.5, 0.05)
    m, x, g = _grad_case(backend, aux_loss_coef=coefs[0], z_loss_coef=coefs[1])
    for scale in (0.25, torch.tensor(3.0)):
        set_aux_loss_scale(scale)
        out, aux = m(x, return_aux=True)
        set_aux_loss_scale(1.0)  # the forward pass already read it
        (out * g).sum().backward()
        want = _reference_grads(m, x, g, aux.kept, coefs, scale=float(scale))
        _check_grads(m, x, want)
        assert max_rel_err(aux.z_loss, _f64_z(aux.router_logits.double())) < FP32_AGREE
        m.zero_grad()
        x.grad = None


@pytest.mark.parametrize("backend", BACKENDS)
def test_losses_only_in_training_with_grad(backend):
    """No injection in eval mode, under no_grad, or with both coefficients 0 (set at any time);
    the logged losses are computed in every case."""
    m, x, g = _grad_case(backend, aux_loss_coef=2.0, z_loss_coef=0.2)
    main_only = _reference_grads(m, x, g, torch.ones(13, K, dtype=torch.bool), (0.0, 0.0))

    def router_grad():
        m.zero_grad()
        out, aux = m(x, return_aux=True)
        (out * g).sum().backward()
        assert aux.load_balancing_loss > 0 and aux.z_loss > 0
        return m.router.weight.grad

    m.eval()
    assert max_rel_err(router_grad(), main_only["router.weight"]) < FP32_AGREE_GRAD
    m.train()
    m.aux_loss_coef = 0.0
    m.z_loss_coef = 0.0
    assert max_rel_err(router_grad(), main_only["router.weight"]) < FP32_AGREE_GRAD
    m.aux_loss_coef = 2.0
    assert max_rel_err(router_grad(), main_only["router.weight"]) > 1e-2
    with torch.no_grad():
        out, aux = m(x, return_aux=True)
    assert not out.requires_grad and aux.load_balancing_loss > 0


# -------------------------------------------------------------------------------- shared experts


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate", [False, True])
@pytest.mark.parametrize("activation", ["swiglu", "geglu"])
def test_shared_experts(backend, gate, activation):
    m = MoE(H, I, E, K, num_shared_experts=2, shared_expert_gate=gate, activation=activation,
            backend=backend)  # fmt: skip
    assert m.shared_intermediate_size == 2 * I
    assert m.shared_experts.gate_up_proj.shape == (4 * I, H)
    assert m.shared_experts.down_proj.shape == (H, 2 * I)
    if gate:
        assert m.shared_expert_gate.weight.shape == (1, H) and m.shared_expert_gate.bias is None
    else:
        assert m.shared_expert_gate is None
    _randomize(m, 40)
    x = _x(9, 41)
    out = m(x)
    p = _f64_params(m)
    w, ids = _f64_gating(m, _f64_logits(m, p, x.double()))
    ref = _f64_layer(m, p, x.double(), w, ids, torch.ones_like(ids, dtype=torch.bool))
    assert max_rel_err(out, ref) < FP32_AGREE

    m2 = MoE(H, I, E, K, num_shared_experts=3, shared_intermediate_size=20)
    assert m2.shared_experts.gate_up_proj.shape == (40, H)
    assert m2.shared_experts.down_proj.shape == (H, 20)


def test_shared_experts_bf16():
    m = MoE(H, I, E, K, num_shared_experts=1, shared_expert_gate=True, dtype=torch.bfloat16)
    assert m.shared_experts.gate_up_proj.dtype == torch.bfloat16
    x = _x(5, 42).to(torch.bfloat16)
    assert m(x).dtype == torch.bfloat16


# --------------------------------------------------------------------------- correction bias


def test_update_correction_bias():
    """DeepSeek-V3: bias += rate · sign(mean load - load)."""
    m = MoE(H, I, 5, K, scoring="sigmoid", correction_bias=True)
    start = torch.randn(5, generator=torch.Generator().manual_seed(50))
    m.e_score_correction_bias.copy_(start)
    load = torch.tensor([9, 1, 4, 4, 2])  # mean 4
    m.update_correction_bias(load, rate=0.01)
    want = start.double() + 0.01 * torch.tensor([-1.0, 1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    assert max_rel_err(m.e_score_correction_bias, want) < FP32_AGREE
    m.update_correction_bias(load.float())  # default rate 1e-3, float loads
    want = want + 1e-3 * torch.tensor([-1.0, 1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    assert max_rel_err(m.e_score_correction_bias, want) < FP32_AGREE
    assert not m.e_score_correction_bias.requires_grad
    with pytest.raises(ValueError, match="tokens_per_expert"):
        m.update_correction_bias(torch.ones(4))
    with pytest.raises(RuntimeError, match="correction_bias"):
        MoE(H, I, 5, K).update_correction_bias(load)


# ---------------------------------------------------------------- properties: sync, determinism

ALL_OPTIONS = {
    "noisy_gating": True,
    "router_jitter": 0.1,
    "capacity_factor": 0.8,
    "drop_policy": "priority",
    "aux_loss_coef": 0.1,
    "z_loss_coef": 0.01,
    "num_shared_experts": 1,
    "shared_expert_gate": True,
}


def _train_step(backend, seed=60, wrap=None, **over):
    """Forward (training, every option on) and backward; (out, aux, {name: grad}, x.grad)."""
    torch.manual_seed(0)
    opts = dict(ALL_OPTIONS, **over)
    m = MoE(H, I, E, K, backend=backend, **opts)
    _randomize(m, seed)
    x = _x(21, seed + 1, grad=True)
    g = torch.randn(21, H, generator=torch.Generator().manual_seed(seed + 2))
    torch.manual_seed(seed + 3)
    if wrap is None:
        out, aux = m(x, return_aux=True)
    else:
        out, aux = wrap(m, x)
    (out * g).sum().backward()
    return out.detach(), aux, {n: p.grad for n, p in m.named_parameters()}, x.grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    a = _train_step(backend)
    b = _train_step(backend)
    assert torch.equal(a[0], b[0]) and torch.equal(a[3], b[3])
    for f in dataclasses.fields(MoEAux):
        assert torch.equal(getattr(a[1], f.name), getattr(b[1], f.name)), f.name
    assert a[1].dropped > 0
    for n in a[2]:
        assert torch.equal(a[2][n], b[2][n]), n


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing(backend, reentrant):
    """torch.utils.checkpoint: same gradients (losses and noise included: the recomputation
    replays the same random draws)."""
    from torch.utils.checkpoint import checkpoint

    def wrap(m, x):
        out = checkpoint(m, x, use_reentrant=reentrant)
        return out, None

    plain = _train_step(backend)
    ckpt = _train_step(backend, wrap=wrap)
    assert torch.equal(plain[0], ckpt[0]) and torch.equal(plain[3], ckpt[3])
    for n in plain[2]:
        assert torch.equal(plain[2][n], ckpt[2][n]), n


@pytest.mark.parametrize("backend", COMPILED)
def test_no_host_reads(backend, monkeypatch):
    """Forward and backward with every option read no tensor value on the host (counts and
    capacity ranks stay tensors): the host-reading tensor methods raise if called."""
    step = _train_step  # resolve before patching

    def refuse(*args, **kwargs):
        raise AssertionError("host read of a tensor value")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    monkeypatch.setattr(torch, "nonzero", refuse)
    out, aux, grads, xg = step(backend)
    monkeypatch.undo()
    assert aux.dropped > 0 and all(g.abs().max() > 0 for g in grads.values())


# aten ops that read tensor values on the host (or whose output size depends on them)
HOST_READING_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "bincount",
                    "repeat_interleave")  # fmt: skip


def _recording_backend(seen: list[str]):
    """aot_eager that records the aten ops of the traced forward and backward graphs."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def compiler(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=compiler, bw_compiler=compiler)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend):
    """torch.compile(fullgraph=True) traces the training forward and backward with every option
    into graphs without host-reading ops (the moe_kernels ops are opaque there) and gives the
    eager result."""
    torch._dynamo.reset()
    try:
        det = {"noisy_gating": False, "router_jitter": 0.0}  # compare values without noise
        eager = _train_step(backend, **det)
        seen: list[str] = []

        def wrap(m, x):
            compiled = torch.compile(m, fullgraph=True, backend=_recording_backend(seen))
            return compiled(x, return_aux=True)

        comp = _train_step(backend, wrap=wrap, **det)
        assert any("moe_kernels.moe_ffn" in t for t in seen)  # forward and backward recorded
        assert any("moe_kernels.moe_ffn_backward" in t for t in seen)
        assert any("aten.sort" in t for t in seen)  # the capacity ranks
        bad = [t for t in seen if any(op in t for op in HOST_READING_OPS)]
        assert not bad, bad
        assert max_rel_err(comp[0], eager[0]) < FP32_AGREE
        assert torch.equal(comp[1].kept, eager[1].kept) and comp[1].dropped == eager[1].dropped
        assert max_rel_err(comp[1].load_balancing_loss, eager[1].load_balancing_loss) < FP32_AGREE
        for n in eager[2]:
            assert max_rel_err(comp[2][n], eager[2][n]) < FP32_AGREE_GRAD, n
        # with the noise and jitter on, it traces as well
        seen.clear()
        out, aux, grads, _ = _train_step(backend, wrap=wrap)
        assert aux.dropped > 0 and grads["router_noise.weight"].abs().max() > 0
        assert not [t for t in seen if any(op in t for op in HOST_READING_OPS)]
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("backend", COMPILED)
def test_compile_dynamic_tokens(backend):
    """Compiled with dynamic shapes, the capacity C = ceil(capacity_factor · T · k / E) follows
    the token count of each call."""
    torch._dynamo.reset()
    try:
        opts = dict(ALL_OPTIONS, noisy_gating=False, router_jitter=0.0)
        m = MoE(H, I, E, K, backend=backend, **opts)
        _randomize(m, 70)
        compiled = torch.compile(m, fullgraph=True, backend="aot_eager", dynamic=True)
        for T in (21, 13, 40):
            x = _x(T, 71 + T)
            out, aux = compiled(x, return_aux=True)
            want, want_aux = m(x, return_aux=True)
            assert torch.equal(aux.kept, want_aux.kept) and aux.dropped == want_aux.dropped
            C = math.ceil(0.8 * T * K / E)
            assert (_f64_bincount(aux.topk_ids[aux.kept], E) <= C).all()
            assert int((_f64_bincount(aux.topk_ids, E) - C).clamp(min=0).sum()) == aux.dropped
            assert max_rel_err(out, want) < FP32_AGREE
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_parameter_gets_gradient(backend):
    _, _, grads, xg = _train_step(backend)
    assert xg.abs().max() > 0
    for n, gr in grads.items():
        assert gr is not None and gr.abs().max() > 0, n


def test_empty_input_with_every_option():
    m = MoE(H, I, E, K, backend="reference", **ALL_OPTIONS)
    x = torch.randn(0, H, requires_grad=True)
    out, aux = m(x, return_aux=True)
    assert out.shape == (0, H) and aux.kept.shape == (0, K)
    assert aux.load_balancing_loss.item() == 0 and aux.z_loss.item() == 0
    assert aux.dropped.item() == 0 and aux.tokens_per_expert.tolist() == [0] * E
    out.sum().backward()


EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "train_tiny_moe.py"


@pytest.mark.skipif(not EXAMPLE.exists(), reason="examples/train_tiny_moe.py is not beside tests/")
def test_example_balances_the_load(monkeypatch, capsys):
    """The README's example: with the load-balancing loss the load of a router skewed towards
    one expert ends near uniform, without it it does not (fewer steps than its default)."""
    threads = torch.get_num_threads()
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE), "--steps", "100"])
    try:
        runpy.run_path(str(EXAMPLE), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    text = capsys.readouterr().out
    peak = {
        float(coef): float(mx)
        for coef, mx in re.findall(r"aux_loss_coef=(\S+)\s*: load .*\(max ([0-9.]+)\)", text)
    }
    assert set(peak) == {0.0, 0.05}, text
    assert peak[0.0] > 0.5 and peak[0.05] < 0.25, text
