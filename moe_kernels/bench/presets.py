"""MoE layer shapes of well-known models (``moe-bench``'s presets), custom shapes and scaling.

Each preset holds one MoE layer of the model as its published ``config.json`` defines it (the URL
is the preset's ``source``): hidden size H, expert intermediate size I, routed experts E, experts
per token k, the routing (softmax or sigmoid scores, renormalisation, DeepSeek-V3's groups,
correction bias and scaling), the experts' activation (gpt-oss's clamped SwiGLU with interleaved
gate/up rows and biases) and the shared experts. What ``moe_ffn`` cannot express exactly is
approximated and said in ``approximation``.

The shared experts are a dense gated FFN on every token beside the routed ones
(``moe_kernels.MoE``'s ``num_shared_experts`` / ``shared_intermediate_size`` /
``shared_expert_gate``: the total width Is of all shared experts).
"""

from __future__ import annotations

import dataclasses
import math

__all__ = [
    "SHAPES",
    "MoEShape",
    "custom_shape",
    "get_shape",
    "parse_shapes",
    "scale_to_budget",
]


@dataclasses.dataclass(frozen=True)
class MoEShape:
    """One MoE layer: ``E`` experts of ``H -> 2I -> I -> H``, top-``k`` routing, shared experts.

    The routing and expert fields mirror the options of :func:`moe_kernels.topk_gating`,
    :func:`moe_kernels.moe_ffn` and :class:`moe_kernels.MoE`.
    """

    name: str
    hidden: int  # H
    intermediate: int  # I
    experts: int  # E
    top_k: int  # k
    model: str = ""
    source: str = ""
    # routing (topk_gating)
    scoring: str = "softmax"
    renormalize: bool = True
    num_expert_groups: int | None = None
    topk_groups: int | None = None
    routed_scaling_factor: float = 1.0
    correction_bias: bool = False
    router_bias: bool = False
    # experts (moe_ffn)
    activation: str = "swiglu"
    interleaved: bool = False
    bias: bool = False
    alpha: float = 1.702
    limit: float = 7.0
    # shared experts (moe_kernels.MoE): total width Is of all of them
    num_shared_experts: int = 0
    shared_intermediate_size: int = 0
    shared_expert_gate: bool = False
    # what moe_ffn / MoE compute differently from the model, if anything
    approximation: str = ""

    def expert_bytes(self, element_size: int) -> int:
        """Bytes of one expert's weights (gate_up [2I, H] and down [H, I])."""
        return 3 * self.hidden * self.intermediate * element_size

    def weight_bytes(self, element_size: int) -> int:
        """Bytes of all routed experts' weights."""
        return self.experts * self.expert_bytes(element_size)

    def shared_bytes(self, element_size: int) -> int:
        """Bytes of the shared experts' weights (gate_up [2Is, H] and down [H, Is])."""
        return 3 * self.hidden * self.shared_intermediate_size * element_size

    def flops(self, tokens: int) -> int:
        """FLOPs of the routed expert FFN for ``tokens`` tokens: ``2 * T * k * 3 * H * I``."""
        return 2 * tokens * self.top_k * 3 * self.hidden * self.intermediate

    def describe(self) -> str:
        text = f"H {self.hidden}, I {self.intermediate}, E {self.experts}, k {self.top_k}"
        if self.num_shared_experts:
            text += f", shared {self.num_shared_experts} (Is {self.shared_intermediate_size})"
        return text

    def routing_description(self) -> str:
        """The routing in words, e.g. ``sigmoid, 8 groups / top 4, bias, renorm, x2.5``."""
        parts = [self.scoring]
        if self.num_expert_groups:
            parts.append(f"{self.num_expert_groups} groups / top {self.topk_groups}")
        if self.correction_bias:
            parts.append("correction bias")
        parts.append("renorm" if self.renormalize else "no renorm")
        if self.routed_scaling_factor != 1.0:
            parts.append(f"x{self.routed_scaling_factor:g}")
        if self.router_bias:
            parts.append("router bias")
        return ", ".join(parts)

    def expert_description(self) -> str:
        parts = [self.activation]
        if self.interleaved:
            parts.append("interleaved")
        if self.bias:
            parts.append("biases")
        return ", ".join(parts)

    def gating_kwargs(self) -> dict:
        """Keyword arguments of :func:`moe_kernels.topk_gating` (``correction_bias`` apart)."""
        return {
            "scoring": self.scoring,
            "renormalize": self.renormalize,
            "num_expert_groups": self.num_expert_groups,
            "topk_groups": self.topk_groups,
            "routed_scaling_factor": self.routed_scaling_factor,
        }

    def ffn_kwargs(self) -> dict:
        """Keyword arguments of :func:`moe_kernels.moe_ffn` (biases apart)."""
        return {
            "activation": self.activation,
            "alpha": self.alpha,
            "limit": self.limit,
            "interleaved": self.interleaved,
        }


_HF = "https://huggingface.co/{}/blob/main/config.json"

#: Expert-layer shapes of real model layers (the benchmark presets), from each model's config.json.
SHAPES: dict[str, MoEShape] = {
    s.name: s
    for s in (
        MoEShape(
            "mixtral-8x7b",
            4096,
            14336,
            8,
            2,
            "Mixtral-8x7B",
            _HF.format("mistralai/Mixtral-8x7B-v0.1"),
        ),
        MoEShape(
            "mixtral-8x22b",
            6144,
            16384,
            8,
            2,
            "Mixtral-8x22B",
            _HF.format("mistralai/Mixtral-8x22B-v0.1"),
        ),
        MoEShape(
            "deepseek-v3",
            7168,
            2048,
            256,
            8,
            "DeepSeek-V3",
            _HF.format("deepseek-ai/DeepSeek-V3"),
            scoring="sigmoid",
            renormalize=True,
            num_expert_groups=8,
            topk_groups=4,
            routed_scaling_factor=2.5,
            correction_bias=True,
            num_shared_experts=1,
            shared_intermediate_size=2048,
        ),
        MoEShape(
            "qwen3-30b-a3b",
            2048,
            768,
            128,
            8,
            "Qwen3-30B-A3B",
            _HF.format("Qwen/Qwen3-30B-A3B"),
        ),
        MoEShape(
            "qwen3-235b-a22b",
            4096,
            1536,
            128,
            8,
            "Qwen3-235B-A22B",
            _HF.format("Qwen/Qwen3-235B-A22B"),
        ),
        # gpt-oss: top-k of the router logits, then a softmax over the k chosen (the same weights
        # as softmax, top-k, renormalise); the router has a bias
        MoEShape(
            "gpt-oss-20b",
            2880,
            2880,
            32,
            4,
            "gpt-oss-20b",
            _HF.format("openai/gpt-oss-20b"),
            router_bias=True,
            activation="swiglu_oai",
            interleaved=True,
            bias=True,
        ),
        MoEShape(
            "gpt-oss-120b",
            2880,
            2880,
            128,
            4,
            "gpt-oss-120b",
            _HF.format("openai/gpt-oss-120b"),
            router_bias=True,
            activation="swiglu_oai",
            interleaved=True,
            bias=True,
        ),
        # OLMoE: norm_topk_prob false (the k softmax probabilities are used as they are)
        MoEShape(
            "olmoe-1b-7b",
            2048,
            1024,
            64,
            8,
            "OLMoE-1B-7B",
            _HF.format("allenai/OLMoE-1B-7B-0924"),
            renormalize=False,
        ),
        # DBRX: d_model 6144, ffn_config.ffn_hidden_size 10752, 16 experts, top 4, the k weights
        # normalised by their sum (moe_normalize_expert_weights = 1)
        MoEShape("dbrx", 6144, 10752, 16, 4, "DBRX", _HF.format("databricks/dbrx-base")),
        # Llama 4 Scout: top-1 of the router logits, score sigmoid(logit), one shared expert of the
        # experts' intermediate size
        MoEShape(
            "llama-4-scout",
            5120,
            8192,
            16,
            1,
            "Llama-4-Scout-17B-16E",
            _HF.format("meta-llama/Llama-4-Scout-17B-16E"),
            scoring="sigmoid",
            renormalize=False,
            num_shared_experts=1,
            shared_intermediate_size=8192,
            approximation="Llama 4 multiplies the routed expert's input by the router score; "
            "moe_ffn multiplies its output (the same FLOPs and bytes, a different value)",
        ),
        MoEShape("small", 512, 256, 16, 4, "small test layer"),
    )
}


def _key(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def get_shape(name: str) -> MoEShape:
    """Look a preset up by name (case-insensitive, ``_`` and ``-`` interchangeable)."""
    key = _key(name)
    if key not in SHAPES:
        raise ValueError(
            f"unknown shape preset {name!r}; choose from {', '.join(SHAPES)} or give four "
            "integers H,I,E,k"
        )
    return SHAPES[key]


def custom_shape(hidden: int, intermediate: int, experts: int, top_k: int) -> MoEShape:
    """A softmax / SwiGLU layer of the given sizes (``H,I,E,k`` on the command line)."""
    for what, v in (("H", hidden), ("I", intermediate), ("E", experts), ("k", top_k)):
        if v < 1:
            raise ValueError(f"custom shape: {what} must be >= 1, got {v}")
    if top_k > experts:
        raise ValueError(f"custom shape: k = {top_k} > E = {experts}")
    name = f"custom-{hidden}-{intermediate}-{experts}-{top_k}"
    return MoEShape(name, hidden, intermediate, experts, top_k, "custom shape")


def parse_shapes(text: str | None) -> list[MoEShape]:
    """``--shape`` / ``--shapes``: comma-separated preset names and custom shapes, each custom
    shape four consecutive integers ``H,I,E,k`` (``qwen3-30b-a3b,1024,512,16,4`` is two shapes)."""
    tokens = [t.strip() for t in (text or "").split(",") if t.strip()]
    shapes: list[MoEShape] = []
    numbers: list[int] = []
    for tok in tokens:
        if tok.isdigit():
            numbers.append(int(tok))
            if len(numbers) == 4:
                shapes.append(custom_shape(*numbers))
                numbers = []
            continue
        if numbers:
            break  # a name inside a custom shape's four integers: reported below
        shapes.append(get_shape(tok))
    if numbers:
        raise ValueError(
            f"--shape: a custom shape is four integers H,I,E,k; got {','.join(map(str, numbers))}"
        )
    return shapes


def _min_experts(shape: MoEShape) -> int:
    """The fewest experts a scaled copy keeps: ``2k`` (so routing still chooses), and with expert
    groups a multiple of the group count whose ``topk_groups`` groups hold at least k experts."""
    low = min(shape.experts, 2 * shape.top_k)
    g = shape.num_expert_groups
    if g:
        per_group = max(1, math.ceil(shape.top_k / shape.topk_groups))
        low = max(low, g * per_group)
    return low


def scale_to_budget(shape: MoEShape, budget_bytes: int, element_size: int) -> MoEShape:
    """A smaller version of ``shape`` whose routed experts' weights fit in ``budget_bytes``.

    H and k stay as they are (they set the per-token work) and so does the routing; E is halved
    first, but not below ``2k`` (so routing still chooses) and, with expert groups, not below a
    multiple of the group count that keeps ``topk_groups`` groups holding k experts; then I is
    halved (kept a multiple of 64, at least 64). The shared experts' width follows I's factor.
    """
    experts, inter = shape.experts, shape.intermediate
    per_expert = 3 * shape.hidden * element_size
    min_experts = _min_experts(shape)
    g = shape.num_expert_groups or 1
    while experts > min_experts and experts * inter * per_expert > budget_bytes:
        halved = max(min_experts, experts // 2)
        if halved % g:
            halved = max(min_experts, halved // g * g)
        if halved == experts:
            break
        experts = halved
    while inter > 64 and experts * inter * per_expert > budget_bytes:
        inter = max(64, (inter // 2) // 64 * 64 or 64)
    if (experts, inter) == (shape.experts, shape.intermediate):
        return shape
    shared = shape.shared_intermediate_size
    if shared:
        shared = max(64, shared * inter // shape.intermediate // 64 * 64 or 64)
    return dataclasses.replace(
        shape, experts=experts, intermediate=inter, shared_intermediate_size=shared
    )
