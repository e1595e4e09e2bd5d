"""Operator schemas shared by every backend.

Each public op ``X`` exists once per backend family:

* ``moe_kernels::X``            -- the compiled op (CPU kernels in ``csrc/cpu``, CUDA kernels in
  ``csrc/cuda``), dispatched on the tensors' device;
* ``moe_kernels::X_reference``  -- the pure-PyTorch specification (``moe_kernels.reference``);
* ``moe_kernels::X_triton``     -- the Triton kernels (``moe_kernels.triton_kernels``).

All of them share the argument lists below, so autograd formulas and fake (meta) kernels are
written once. This module is the only place the schemas are written: :mod:`moe_kernels._registry`
defines every family from it, the compiled one included (the C++ files only register kernels,
``TORCH_LIBRARY_IMPL``). The dispatcher checks each C++ kernel's signature, inferred from its
C++ type, against these strings when both are registered, and ``moe_kernels._C.typed.<op>``
checks its own C++ signature at its first call.

Conventions:

* ``route`` with ``block_size == 0`` means "no padding"; its ``block_expert`` output is then an
  empty int32 tensor.
* backward ops return an empty tensor (shape ``[0]``) for a gradient that was not requested or
  whose input was ``None``.
* ``moe_ffn_train`` returns ``moe_ffn``'s output and ``pre``, ``[T*k, 2I]`` float32 (float64 for
  float64 inputs): row ``t*k + s`` is ``x[t] @ w_gate_up[e]^T + gate_up_bias[e]`` (the
  pre-activation, in w_gate_up's column order) for ``e = topk_ids[t, s]`` in ``[0, E)``, zeros for
  a dropped pair.  ``moe_ffn_backward_saved`` is ``moe_ffn_backward`` given that ``pre``.
"""

from __future__ import annotations

#: op name -> (arguments, returns); the op's full schema is ``name + suffix + arguments -> returns``.
SCHEMAS: dict[str, tuple[str, str]] = {
    "topk_gating": (
        "(Tensor router_logits, int top_k, str scoring, bool renormalize, "
        "Tensor? correction_bias, int num_expert_groups, int topk_groups, "
        "float routed_scaling_factor)",
        "(Tensor, Tensor)",
    ),
    "topk_gating_backward": (
        "(Tensor grad_weights, Tensor router_logits, Tensor topk_ids, str scoring, "
        "bool renormalize, float routed_scaling_factor)",
        "Tensor",
    ),
    "route": (
        "(Tensor topk_ids, int num_experts, int block_size)",
        "(Tensor, Tensor, Tensor, Tensor, Tensor)",
    ),
    "permute": (
        "(Tensor x, Tensor row_of_slot, Tensor slot_of_row)",
        "Tensor",
    ),
    "unpermute": (
        "(Tensor y, Tensor row_of_slot, Tensor slot_of_row, Tensor? topk_weights)",
        "Tensor",
    ),
    "unpermute_backward": (
        "(Tensor grad_out, Tensor y, Tensor row_of_slot, Tensor slot_of_row, "
        "Tensor? topk_weights, bool need_grad_y, bool need_grad_weights)",
        "(Tensor, Tensor)",
    ),
    "grouped_gemm": (
        "(Tensor a, Tensor b, Tensor offs, bool trans_b)",
        "Tensor",
    ),
    "grouped_gemm_backward": (
        "(Tensor grad_out, Tensor a, Tensor b, Tensor offs, bool trans_b, bool need_grad_a, "
        "bool need_grad_b)",
        "(Tensor, Tensor)",
    ),
    "moe_ffn": (
        "(Tensor x, Tensor w_gate_up, Tensor w_down, Tensor topk_weights, Tensor topk_ids, "
        "Tensor? gate_up_bias, Tensor? down_bias, str activation, float alpha, float limit, "
        "bool interleaved)",
        "Tensor",
    ),
    "moe_ffn_backward": (
        "(Tensor grad_out, Tensor x, Tensor w_gate_up, Tensor w_down, Tensor topk_weights, "
        "Tensor topk_ids, Tensor? gate_up_bias, Tensor? down_bias, str activation, float alpha, "
        "float limit, bool interleaved)",
        "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    ),
    # moe_ffn that also returns the pre-activation its backward needs (the path of a call that
    # needs gradients, where the backend keeps it), and that backward
    "moe_ffn_train": (
        "(Tensor x, Tensor w_gate_up, Tensor w_down, Tensor topk_weights, Tensor topk_ids, "
        "Tensor? gate_up_bias, Tensor? down_bias, str activation, float alpha, float limit, "
        "bool interleaved)",
        "(Tensor, Tensor)",
    ),
    "moe_ffn_backward_saved": (
        "(Tensor grad_out, Tensor pre, Tensor x, Tensor w_gate_up, Tensor w_down, "
        "Tensor topk_weights, Tensor topk_ids, Tensor? gate_up_bias, Tensor? down_bias, "
        "str activation, float alpha, float limit, bool interleaved)",
        "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    ),
}

#: the ops a backend implements; a backend may implement a subset and auto dispatch falls back.
OP_NAMES: tuple[str, ...] = tuple(SCHEMAS)

#: suffix of each Python-registered backend family's op names.
PY_SUFFIXES: dict[str, str] = {"reference": "_reference", "triton": "_triton"}


def schema(name: str, suffix: str = "") -> str:
    """Full schema string of ``name + suffix`` (without the namespace)."""
    args, rets = SCHEMAS[name]
    return f"{name}{suffix}{args} -> {rets}"
