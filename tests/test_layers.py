"""moe_kernels.layers.MoE and the Hugging Face transformers experts integration.

The layer is checked against a deliberately naive float64 loop over tokens and slots written here;
the integration against transformers' own ``eager`` experts on tiny random configs (skipped when
transformers is not installed).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import moe_kernels
from moe_kernels._tolerances import FFN_TOL, FP32_AGREE, TWO_X_FLOOR, max_rel_err, within_2x
from moe_kernels.layers import MoE

# backends that can run on CPU tensors here (the reference always; cpu when it is built)
CPU_BACKENDS = [
    name
    for name, (ok, _) in moe_kernels.available_backends().items()
    if ok and name in ("reference", "cpu")
]


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Fresh random values in every parameter and buffer (never zeros)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in list(module.parameters()) + list(module.buffers()):
            if p.is_floating_point():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def _act(h: torch.Tensor, activation: str, interleaved: bool, alpha: float, limit: float):
    if interleaved:
        gate, up = h[..., 0::2], h[..., 1::2]
    else:
        gate, up = h.chunk(2, dim=-1)
    if activation == "swiglu":
        return gate * torch.sigmoid(gate) * up
    if activation == "geglu":
        return 0.5 * gate * (1 + torch.erf(gate / math.sqrt(2.0))) * up
    g = gate.clamp(max=limit)
    u = up.clamp(-limit, limit)
    return (u + 1) * g * torch.sigmoid(alpha * g)


def _naive_moe(m: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token-by-token float64 MoE: softmax/sigmoid, optional bias/groups, top-k, expert MLPs."""
    xd = x.reshape(-1, m.hidden_size).double()
    logits = xd @ m.router.weight.double().t()
    if m.router.bias is not None:
        logits = logits + m.router.bias.double()
    scores = torch.softmax(logits, -1) if m.scoring == "softmax" else torch.sigmoid(logits)
    sel = scores.clone()
    if m.e_score_correction_bias is not None:
        sel = sel + m.e_score_correction_bias.double()
    out = torch.zeros_like(xd)
    E = m.num_experts
    for t in range(xd.shape[0]):
        eligible = list(range(E))
        if m.num_expert_groups:
            size = E // m.num_expert_groups
            group_val = []
            for g in range(m.num_expert_groups):
                vals = sorted(sel[t, g * size : (g + 1) * size].tolist(), reverse=True)
                group_val.append(sum(vals[:2]))
            best = sorted(range(m.num_expert_groups), key=lambda g: (-group_val[g], g))
            keep = best[: m.topk_groups]
            eligible = [e for e in range(E) if e // size in keep]
        chosen = sorted(eligible, key=lambda e: (-sel[t, e].item(), e))[: m.top_k]
        w = scores[t, chosen]
        if m.renormalize:
            w = w / w.sum()
        w = w * m.routed_scaling_factor
        for s, e in enumerate(chosen):
            h = m.gate_up_proj[e].double() @ xd[t]
            if m.gate_up_proj_bias is not None:
                h = h + m.gate_up_proj_bias[e].double()
            a = _act(h, m.activation, m.interleaved, m.alpha, m.limit)
            o = m.down_proj[e].double() @ a
            if m.down_proj_bias is not None:
                o = o + m.down_proj_bias[e].double()
            out[t] += w[s] * o
    return out.reshape(x.shape)


_rel = max_rel_err


# each row: (options, why the row exists)
LAYER_CASES = [
    ({}, "Qwen3/OLMoE style: softmax, renormalised, SwiGLU"),
    ({"renormalize": False, "router_bias": True}, "Mixtral-like router with a bias, no renorm"),
    ({"activation": "geglu", "bias": True}, "exact-GELU gate and both expert biases"),
    (
        {"activation": "swiglu_oai", "interleaved": True, "bias": True, "alpha": 1.5, "limit": 0.4},
        "gpt-oss: interleaved gate/up, clamped SwiGLU (small limit so the clamp bites)",
    ),
    (
        {
            "scoring": "sigmoid",
            "correction_bias": True,
            "num_expert_groups": 4,
            "topk_groups": 2,
            "routed_scaling_factor": 2.5,
        },
        "DeepSeek-V3: sigmoid, selection bias, grouped top-k, scaling factor",
    ),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("opts", [c[0] for c in LAYER_CASES], ids=[c[1] for c in LAYER_CASES])
def test_moe_layer_matches_naive_loop(backend, opts):
    torch.manual_seed(0)
    m = MoE(24, 20, 8, 3, backend=backend, **opts)  # H, I not multiples of 16
    _randomize(m, seed=1)
    x = torch.randn(2, 5, 24)
    out = m(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    ref = _naive_moe(m, x)
    assert _rel(out, ref) < FP32_AGREE


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_moe_layer_bf16_and_router_logits(backend):
    m = MoE(32, 16, 6, 2, backend=backend, dtype=torch.bfloat16)
    _randomize(m, seed=2)
    assert m.router.weight.dtype == torch.float32  # the router stays fp32 by default
    x = torch.randn(7, 32).to(torch.bfloat16)
    out, logits = m(x, return_router_logits=True)
    assert out.dtype == torch.bfloat16 and logits.shape == (7, 6)
    ref = _naive_moe(m, x)
    assert _rel(out, ref) < FFN_TOL[torch.bfloat16]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_moe_layer_gradients(backend):
    """Gradients reach x, both expert weights, the biases and (through the weights) the router;
    float32 layer against the same math in float64 plain torch ops."""
    m = MoE(16, 12, 5, 2, bias=True, backend=backend)
    _randomize(m, seed=3)
    x = torch.randn(6, 16, requires_grad=True)
    m(x).square().sum().backward()

    x2 = x.detach().double().requires_grad_()
    m2 = MoE(16, 12, 5, 2, bias=True, backend="reference", dtype=torch.float64, router_dtype=None)
    m2.load_state_dict(m.state_dict())
    # the same math written with plain torch ops (same top-k choice: ids are constants)
    logits = m2.router(x2)
    w, ids = torch.topk(torch.softmax(logits, -1), 2, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    out = torch.zeros_like(x2)
    for s in range(2):
        e = ids[:, s]
        h = torch.einsum("th,tnh->tn", x2, m2.gate_up_proj[e]) + m2.gate_up_proj_bias[e]
        gate, up = h.chunk(2, -1)
        o = torch.einsum("ti,thi->th", F.silu(gate) * up, m2.down_proj[e]) + m2.down_proj_bias[e]
        out = out + w[:, s, None] * o
    out.square().sum().backward()
    assert _rel(x.grad, x2.grad) < FP32_AGREE
    for (name, p), p2 in zip(m.named_parameters(), m2.parameters(), strict=True):
        assert p.grad is not None, name
        assert p.grad.abs().max() > 0, name
        assert _rel(p.grad, p2.grad) < FP32_AGREE, name


def test_moe_layer_bad_arguments():
    with pytest.raises(ValueError, match="top_k"):
        MoE(8, 8, 4, 5)
    with pytest.raises(ValueError, match="top_k"):
        MoE(8, 8, 4, 0)
    with pytest.raises(ValueError, match="hidden_size"):
        MoE(0, 8, 4, 1)
    m = MoE(8, 8, 4, 2)
    with pytest.raises(ValueError, match=r"\[\.\.\., 8\]"):
        m(torch.randn(3, 9))


def test_moe_layer_empty_input():
    m = MoE(8, 4, 4, 2, backend="reference")
    out = m(torch.randn(0, 8))
    assert out.shape == (0, 8)


# ----------------------------------------------------------------------------- transformers

transformers = pytest.importorskip("transformers", minversion="5.0", reason="needs transformers 5")
mkt = pytest.importorskip("moe_kernels.integrations.transformers")


def _hf_experts(cls, config, seed, dtype=torch.float32):
    module = cls(config).to(dtype)
    _randomize(module, seed)
    return module


def _routing(T, E, k, seed):
    gen = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(T, E, generator=gen), -1)
    w, ids = torch.topk(probs, k, dim=-1)
    return w / w.sum(-1, keepdim=True), ids


def _run(module, impl, x, ids, w):
    module.config._experts_implementation = impl
    with torch.no_grad():
        return module(x, ids, w)


@pytest.fixture(scope="module")
def registered():
    names = {b: mkt.register(f"moe_kernels_test_{b}", backend=b) for b in CPU_BACKENDS}
    names["auto"] = mkt.register()
    return names


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("model", ["qwen3_moe", "olmoe", "mixtral"])
def test_hf_experts_match_eager(registered, backend, model):
    if model == "qwen3_moe":
        from transformers import Qwen3MoeConfig as Cfg
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts as Experts

        config = Cfg(
            hidden_size=40, moe_intermediate_size=24, num_experts=10, num_experts_per_tok=3
        )
    elif model == "olmoe":
        from transformers import OlmoeConfig as Cfg
        from transformers.models.olmoe.modeling_olmoe import OlmoeExperts as Experts

        config = Cfg(hidden_size=40, intermediate_size=24, num_experts=10, num_experts_per_tok=3)
    else:
        from transformers import MixtralConfig as Cfg
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts as Experts

        config = Cfg(
            hidden_size=40, intermediate_size=24, num_local_experts=10, num_experts_per_tok=3
        )
    module = _hf_experts(Experts, config, seed=4)
    E = module.gate_up_proj.shape[0]
    w, ids = _routing(13, E, 3, seed=5)
    x = torch.randn(13, 40)
    ref = _run(module, "eager", x, ids, w)
    out = _run(module, registered[backend], x, ids, w)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert _rel(out, ref) < FP32_AGREE


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_hf_gpt_oss_experts_match_eager(registered, backend):
    """Transposed [E, H, 2I] weights, interleaved gate/up, biases, clamped SwiGLU."""
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    config = GptOssConfig(
        hidden_size=36, intermediate_size=20, num_local_experts=6, num_experts_per_tok=2
    )
    module = _hf_experts(GptOssExperts, config, seed=6)
    module.limit = 0.5  # small enough that the clamps act on these random values
    w, ids = _routing(9, 6, 2, seed=7)
    x = torch.randn(9, 36)
    ref = _run(module, "eager", x, ids, w)
    out = _run(module, registered[backend], x, ids, w)
    assert _rel(out, ref) < FP32_AGREE


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_hf_experts_bf16(registered, backend):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    config = Qwen3MoeConfig(
        hidden_size=64, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2
    )
    module = _hf_experts(Qwen3MoeExperts, config, seed=8, dtype=torch.bfloat16)
    w, ids = _routing(11, 8, 2, seed=9)
    x = torch.randn(11, 64).to(torch.bfloat16)
    w = w.to(torch.bfloat16)  # HF passes routing weights in the activation dtype
    ref32 = _run(module.float(), "eager", x.float(), ids, w.float())
    module.to(torch.bfloat16)
    eager = _run(module, "eager", x, ids, w)
    out = _run(module, registered[backend], x, ids, w)
    assert out.dtype == torch.bfloat16
    # within 2x of transformers' own bf16 error against the fp32 computation (plus a floor)
    ok, e, e_eager = within_2x(out, eager, ref32, TWO_X_FLOOR[torch.bfloat16])
    assert ok, f"error {e:.3g} vs Hugging Face eager's {e_eager:.3g} in bf16"


def test_hf_whole_model_uses_registered_implementation(registered, monkeypatch):
    """A tiny Qwen3-MoE model built with experts_implementation="moe_kernels" gives eager's logits
    and really calls moe_kernels.moe_ffn."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        num_experts=6,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        experts_implementation=registered["auto"],
    )
    torch.manual_seed(10)
    model = Qwen3MoeForCausalLM(config).eval()
    assert model.config._experts_implementation == registered["auto"]
    ids = torch.randint(0, 50, (2, 7))

    calls = []
    real = mkt._api.moe_ffn

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(mkt._api, "moe_ffn", counting)
    with torch.no_grad():
        ours = model(ids).logits
    assert len(calls) == 2  # one call per MoE layer
    model.set_experts_implementation("eager")
    with torch.no_grad():
        eager = model(ids).logits
    assert len(calls) == 2
    assert _rel(ours, eager) < FP32_AGREE


def test_hf_unsupported_activation_raises(registered):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    config = Qwen3MoeConfig(
        hidden_size=16,
        moe_intermediate_size=8,
        num_experts=4,
        num_experts_per_tok=2,
        hidden_act="gelu_pytorch_tanh",
    )
    module = _hf_experts(Qwen3MoeExperts, config, seed=11)
    w, ids = _routing(3, 4, 2, seed=12)
    with pytest.raises(NotImplementedError, match="GELUTanh"):
        _run(module, registered["auto"], torch.randn(3, 16), ids, w)


def test_moe_layer_weights_load_into_hf_experts():
    """MoE's parameters use HF's layout: copied into Qwen3MoeExperts they give the same FFN."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    m = MoE(24, 12, 5, 2, backend="reference")
    _randomize(m, seed=13)
    config = Qwen3MoeConfig(hidden_size=24, moe_intermediate_size=12, num_experts=5)
    hf = Qwen3MoeExperts(config)
    hf.load_state_dict({"gate_up_proj": m.gate_up_proj, "down_proj": m.down_proj})
    x = torch.randn(8, 24)
    with torch.no_grad():
        _, w, ids = m.route(x)
        ours = m.experts(x, w, ids)
        ref = _run(hf, "eager", x, ids.long(), w)
    assert _rel(ours, ref) < FP32_AGREE
