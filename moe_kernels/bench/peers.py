"""The peers ``moe-bench`` times beside our backends, on the same inputs.

A peer runs whenever its package is installed and it can run the case; otherwise it is listed as
skipped with the reason (never an error). Peers never change the exit code: a peer over the
tolerance is flagged in its row.

============================ ============= ==========================================================
peer                         ops           what
============================ ============= ==========================================================
``hf-eager``                 moe_ffn       transformers' experts module, its per-expert loop
``hf-grouped_mm``            moe_ffn       the same module, ``experts_implementation="grouped_mm"``
``hf-batched_mm``            moe_ffn       the same, ``"batched_mm"`` (gathers one weight copy per
                                           (token, slot): skipped where that would not fit in memory)
``torch-grouped_mm``         grouped_gemm  ``torch.nn.functional.grouped_mm`` (or ``torch._grouped_mm``)
``vllm-fused_moe``           moe_ffn       vLLM's ``fused_experts`` (CUDA, SwiGLU without biases)
``grouped_gemm-pkg``         grouped_gemm  the ``grouped_gemm`` package's ``ops.gmm`` (CUDA, bf16)
``dense-matmul``             grouped_gemm, one dense ``torch.matmul`` of the same FLOPs: ``[n, H] x [H, 2I]``
                             moe_ffn       for the grouped GEMM, ``[T, H] x [H, 3kI]`` for the FFN (the
                                           yardstick of what a dense GEMM of that work costs here;
                                           no error column: it computes something else)
============================ ============= ==========================================================

The transformers module is ``Qwen3MoeExperts`` for SwiGLU layers (Mixtral's, DBRX's, OLMoE's,
DeepSeek-V3's and Llama 4's experts compute the same function; the row's note says which class
ran) and ``GptOssExperts`` for gpt-oss's clamped, interleaved SwiGLU with biases; it shares the
benchmark's weight tensors (no copy).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable

import torch

__all__ = ["PEERS", "Peer", "PeerSkip", "available_peers", "build"]


class PeerSkip(Exception):
    """A peer cannot run this case; the message says why."""


@dataclasses.dataclass(frozen=True)
class Peer:
    name: str
    ops: tuple[str, ...]
    module: str  # the package it needs
    cuda_only: bool = False
    # False: computes something else of the same size (no error against the reference)
    checked: bool = True


PEERS: dict[str, Peer] = {
    p.name: p
    for p in (
        Peer("hf-eager", ("moe_ffn",), "transformers"),
        Peer("hf-grouped_mm", ("moe_ffn",), "transformers"),
        Peer("hf-batched_mm", ("moe_ffn",), "transformers"),
        Peer("torch-grouped_mm", ("grouped_gemm",), "torch"),
        Peer("vllm-fused_moe", ("moe_ffn",), "vllm", cuda_only=True),
        Peer("grouped_gemm-pkg", ("grouped_gemm",), "grouped_gemm", cuda_only=True),
        Peer("dense-matmul", ("grouped_gemm", "moe_ffn"), "torch", checked=False),
    )
}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def availability(name: str, device: torch.device) -> tuple[bool, str]:
    """(usable on this machine, 'available' or the reason it is skipped)."""
    peer = PEERS[name]
    if name == "dense-matmul":
        return True, "available"
    if peer.module == "torch":
        if hasattr(torch.nn.functional, "grouped_mm") or hasattr(torch, "_grouped_mm"):
            return True, "available"
        return False, f"skipped: torch {torch.__version__} has no grouped_mm"
    if not _installed(peer.module):
        return False, f"skipped: {peer.module} is not installed"
    if peer.module == "transformers":
        from .harness import transformers_version

        version = transformers_version() or "0"
        if int(version.split(".")[0]) < 5:
            return False, f"skipped: needs transformers >= 5 (installed: {version})"
    if peer.cuda_only and device.type != "cuda":
        return False, "skipped: needs a CUDA device"
    return True, "available"


def available_peers(device: torch.device) -> dict[str, tuple[bool, str]]:
    return {name: availability(name, device) for name in PEERS}


# --------------------------------------------------------------------------------- builders

#: a peer's contender: (forward callable, graph builder for the backward or None, note). The graph
#: builder returns (differentiable outputs, leaves, post): the leaves follow the order of our own
#: op's leaves (a peer may have fewer), and ``post`` maps their gradients to our layout.
Graph = tuple[list, list, Callable[[list], list]]
Built = tuple[Callable[[], object], Callable[[], Graph] | None, str]


def _same(grads: list) -> list:
    return grads


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def _hf_module(shape, w_gate_up, w_down, gate_up_bias, down_bias, implementation):
    """transformers' experts module for ``shape`` sharing the given weights, and its class name."""
    if shape.activation == "swiglu" and not shape.bias and not shape.interleaved:
        from .harness import build_hf_experts

        return build_hf_experts(shape, w_gate_up, w_down, implementation), "Qwen3MoeExperts"
    if shape.activation == "swiglu_oai" and shape.interleaved and shape.bias:
        from transformers import GptOssConfig
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

        config = GptOssConfig(
            hidden_size=shape.hidden,
            intermediate_size=shape.intermediate,
            num_local_experts=shape.experts,
            num_experts_per_tok=shape.top_k,
            num_hidden_layers=1,
            num_attention_heads=1,
            num_key_value_heads=1,
            vocab_size=8,
            swiglu_alpha=shape.alpha,
            swiglu_limit=shape.limit,
        )
        config._experts_implementation = implementation
        with torch.device("meta"):
            module = GptOssExperts(config)
        # GptOssExperts stores gate_up [E, H, 2I] and down [E, I, H]: our tensors, transposed views
        P = torch.nn.Parameter
        module.gate_up_proj = P(w_gate_up.transpose(1, 2), requires_grad=w_gate_up.requires_grad)
        module.down_proj = P(w_down.transpose(1, 2), requires_grad=w_down.requires_grad)
        module.gate_up_proj_bias = P(gate_up_bias, requires_grad=gate_up_bias.requires_grad)
        module.down_proj_bias = P(down_bias, requires_grad=down_bias.requires_grad)
        module.eval()
        return module, "GptOssExperts"
    raise PeerSkip(f"skipped: no transformers experts module computes {shape.expert_description()}")


def build(name: str, op: str, case, pass_: str) -> Built:
    """The contender of peer ``name`` for ``case`` (a :class:`moe_kernels.bench.ops.Case`);
    raises :class:`PeerSkip` when the peer cannot run it."""
    peer = PEERS[name]
    if op not in peer.ops:
        raise PeerSkip(f"skipped: {name} has no {op}")
    device, dtype, shape = case.device, case.dtype, case.shape
    if name.startswith("hf-"):
        return _build_hf(name[3:], case, pass_)
    if name == "torch-grouped_mm":
        fn = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm
        label = (
            "torch.nn.functional.grouped_mm"
            if hasattr(torch.nn.functional, "grouped_mm")
            else "torch._grouped_mm"
        )
        a, b, offs = case.xs, case.w_gate_up, case.plan.offs

        def fwd():
            return fn(a, b.transpose(-2, -1), offs=offs)

        def graph():
            la, lb = a.detach().requires_grad_(), b.detach().requires_grad_()
            return [fn(la, lb.transpose(-2, -1), offs=offs)], [la, lb], _same

        return fwd, graph, label
    if name == "dense-matmul":
        return _build_dense(op, case)
    if name == "vllm-fused_moe":
        if shape.activation != "swiglu" or shape.bias:
            raise PeerSkip("skipped: vLLM's fused_experts here runs SwiGLU without biases only")
        if pass_ == "bwd":
            raise PeerSkip("skipped: vLLM's fused_experts has no backward")
        from vllm.model_executor.layers.fused_moe import fused_experts

        x, wgu, wd, tw, ti = case.x, case.w_gate_up, case.w_down, case.topk_weights, case.topk_ids
        return (lambda: fused_experts(x, wgu, wd, tw, ti)), None, "vllm fused_experts"
    if name == "grouped_gemm-pkg":
        if dtype != torch.bfloat16:
            raise PeerSkip("skipped: the grouped_gemm package runs bf16 only")
        from grouped_gemm import ops as gg_ops

        a, b = case.xs, case.w_gate_up
        sizes = case.plan.tokens_per_expert.to("cpu", torch.int64)  # the package wants host sizes

        def fwd():
            return gg_ops.gmm(a, b, sizes, trans_b=True)

        def graph():
            la, lb = a.detach().requires_grad_(), b.detach().requires_grad_()
            return [gg_ops.gmm(la, lb, sizes, trans_b=True)], [la, lb], _same

        return fwd, graph, "grouped_gemm.ops.gmm"
    raise PeerSkip(f"skipped: unknown peer {name!r} on {device.type}")


def _build_dense(op: str, case) -> Built:
    shape = case.shape
    if op == "grouped_gemm":
        a, n_out = case.xs, 2 * shape.intermediate
    else:
        a, n_out = case.x, 3 * shape.top_k * shape.intermediate
    gen = torch.Generator().manual_seed(case.seed + 3)
    b = (torch.randn(shape.hidden, n_out, generator=gen) * shape.hidden**-0.5).to(
        case.device, case.dtype
    )

    def graph():
        la, lb = a.detach().requires_grad_(), b.detach().requires_grad_()
        return [la @ lb], [la, lb], _same

    note = f"matmul [{a.shape[0]}, {shape.hidden}] x [{shape.hidden}, {n_out}]: the same FLOPs"
    return (lambda: a @ b), graph, note


def _build_hf(implementation: str, case, pass_: str) -> Built:
    shape, device = case.shape, case.device
    esize = case.x.element_size()
    if implementation == "batched_mm":
        # batched_mm gathers one copy of the chosen expert's weights per (token, slot)
        gathered = case.T * shape.top_k * shape.expert_bytes(esize) * (2 if pass_ == "bwd" else 1)
        limit = _free_bytes(device) // 4
        if gathered > limit:
            raise PeerSkip(
                f"skipped: batched_mm would gather {gathered / 1e9:.1f} GB of expert weights "
                f"(one copy per token and slot), over a quarter of the free memory "
                f"({limit / 1e9:.1f} GB)"
            )
    x, ti_long = case.x, case.topk_ids.long()
    tw_act = case.topk_weights.to(case.dtype)  # transformers takes the weights in the act. dtype
    gub, db = case.gate_up_bias, case.down_bias
    module, cls = _hf_module(shape, case.w_gate_up, case.w_down, gub, db, implementation)
    note = f"transformers {cls} ({implementation})"

    def fwd():
        return module(x, ti_long, tw_act)

    def graph():
        xl = x.detach().requires_grad_()
        bias = (gub.detach(), db.detach()) if gub is not None else (None, None)
        m, _ = _hf_module(
            shape, case.w_gate_up.detach(), case.w_down.detach(), *bias, implementation
        )
        params = [m.gate_up_proj, m.down_proj]
        for p in params:
            p.requires_grad_(True)
        post = _same
        if cls == "GptOssExperts":  # its weights are our tensors transposed

            def post(g):
                return [g[0], *(t if t is None else t.transpose(1, 2) for t in g[1:])]

        return [m(xl, ti_long, tw_act)], [xl, *params], post

    return fwd, graph, note
