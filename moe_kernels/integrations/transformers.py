"""moe_kernels as a Hugging Face transformers (>= 5) experts implementation.

transformers 5 routes the forward of every experts module decorated with
``@use_experts_implementation`` (Qwen2/3-MoE, OLMoE, Mixtral, DeepSeek-V3, gpt-oss, ...) through a
registry, ``transformers.integrations.moe.ExpertsInterface``, keyed by the config's
``experts_implementation`` (``"eager"``, ``"grouped_mm"``, ``"batched_mm"``, ...).
:func:`register` adds ``moe_kernels.moe_ffn`` to that registry::

    import moe_kernels.integrations.transformers as mkt

    mkt.register()  # registers "moe_kernels" (automatic backend choice)
    model = AutoModelForCausalLM.from_pretrained(path, experts_implementation="moe_kernels")
    # or, on a loaded model: model.set_experts_implementation("moe_kernels")

``register("moe_kernels_cpu", backend="cpu")`` registers a name pinned to one backend. transformers
is imported only when these functions are called.

Supported experts modules: gated experts (``gate_up_proj``, ``down_proj``), concatenated or
interleaved gate/up, transposed (``[E, H, 2I]``) or not, with or without biases, with a SiLU
(``"swiglu"``) or exact-GELU (``"geglu"``) activation, or gpt-oss's clamped SwiGLU (a custom
``_apply_gate`` with ``alpha``/``limit`` attributes: ``"swiglu_oai"``). Other variants (no gate,
post-expert norm, other activations) raise ``NotImplementedError`` naming what is missing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .. import _api

__all__ = ["experts_forward", "make_experts_forward", "register", "experts_activation"]

DEFAULT_NAME = "moe_kernels"


def _default_apply_gate() -> Callable | None:
    try:
        from transformers.integrations import moe
    except ImportError:
        return None
    return getattr(moe, "_default_apply_gate", None)


def experts_activation(module: nn.Module) -> tuple[str, dict]:
    """The ``moe_ffn`` activation (and its keyword arguments) equivalent to ``module``'s gate.

    Raises ``NotImplementedError`` for an activation moe_ffn does not have.
    """
    if not getattr(module, "has_gate", True):
        raise NotImplementedError(
            f"{type(module).__name__} has ungated experts (up_proj only); moe_kernels.moe_ffn "
            "implements gated activations only"
        )
    if getattr(module, "has_post_expert_norm", False):
        raise NotImplementedError(
            f"{type(module).__name__} applies a post-expert norm, which moe_kernels.moe_ffn lacks"
        )
    apply_gate = getattr(type(module), "_apply_gate", None)
    default = _default_apply_gate()
    if apply_gate is not None and default is not None and apply_gate is not default:
        if hasattr(module, "alpha") and hasattr(module, "limit"):
            # gpt-oss: g = min(gate, limit), u = clamp(up, -limit, limit), (u + 1) g sigmoid(alpha g)
            return "swiglu_oai", {"alpha": float(module.alpha), "limit": float(module.limit)}
        raise NotImplementedError(
            f"{type(module).__name__} has a custom gate ({type(module).__name__}._apply_gate) "
            "that moe_kernels does not recognise"
        )
    act = getattr(module, "act_fn", None)
    if act is None:
        raise NotImplementedError(f"{type(module).__name__} has no act_fn")
    if isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation":
        return "swiglu", {}
    if isinstance(act, nn.GELU) and act.approximate == "none":
        return "geglu", {}
    if type(act).__name__ == "GELUActivation" and getattr(act, "act", None) in (
        nn.functional.gelu,
        getattr(act, "_gelu_python", None),
    ):
        return "geglu", {}
    raise NotImplementedError(
        f"{type(module).__name__}'s activation {type(act).__name__} is not one of moe_ffn's "
        "(SiLU -> 'swiglu', exact GELU -> 'geglu')"
    )


def make_experts_forward(backend: str | None = None) -> Callable[..., torch.Tensor]:
    """An experts forward ``fn(module, hidden_states, top_k_index, top_k_weights)`` for
    transformers' ``ExpertsInterface`` that runs :func:`moe_kernels.moe_ffn` on ``backend``."""

    def forward(
        self: nn.Module,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
    ) -> torch.Tensor:
        activation, kwargs = experts_activation(self)
        w_gate_up, w_down = self.gate_up_proj, self.down_proj
        if getattr(self, "is_transposed", False):
            # stored [E, H, 2I] / [E, I, H]: moe_ffn takes the transposed views without a copy
            w_gate_up, w_down = w_gate_up.transpose(1, 2), w_down.transpose(1, 2)
        gate_up_bias = down_bias = None
        if getattr(self, "has_bias", False):
            gate_up_bias = self.gate_up_proj_bias
            down_bias = self.down_proj_bias
        out = _api.moe_ffn(
            hidden_states.to(w_gate_up.dtype),
            w_gate_up,
            w_down,
            top_k_weights.float(),
            top_k_index,
            activation=activation,
            gate_up_bias=gate_up_bias,
            down_bias=down_bias,
            interleaved=not getattr(self, "is_concatenated", True),
            backend=backend,
            **kwargs,
        )
        return out.to(hidden_states.dtype)

    forward.__name__ = f"moe_kernels_experts_forward_{backend or 'auto'}"
    return forward


#: the experts forward with the automatic backend choice
experts_forward = make_experts_forward(None)


def register(name: str = DEFAULT_NAME, backend: str | None = None) -> str:
    """Register moe_kernels as transformers experts implementation ``name``; returns ``name``.

    After this, ``experts_implementation=name`` works in ``from_pretrained`` and
    ``model.set_experts_implementation(name)`` (and in a config). Registering the same name again
    replaces the previous entry. Raises ``ImportError`` when transformers >= 5 is not installed.
    """
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError as exc:
        raise ImportError(
            "moe_kernels.integrations.transformers needs transformers >= 5 with "
            "transformers.integrations.moe.ExpertsInterface"
        ) from exc
    if not isinstance(name, str) or not name or name == "eager":
        raise ValueError(f"name must be a non-empty string other than 'eager', got {name!r}")
    fn = experts_forward if backend is None else make_experts_forward(backend)
    ExpertsInterface.register(name, fn)
    return name
