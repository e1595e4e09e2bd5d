"""moe_kernels: fused Mixture-of-Experts kernels for PyTorch.

The three hot steps of a sparse MoE layer -- top-k gating, token permutation (with the weighted
combine) and the grouped expert GEMM with its gated activation -- forward and backward, with
interchangeable backends checked against one PyTorch reference:

========== ==================================================================================
reference  pure PyTorch (:mod:`moe_kernels.reference`): the specification; any device
cpu        C++ kernels (``moe_kernels._C``), AVX2 / AVX-512 / AMX, multi-threaded
triton     Triton kernels (:mod:`moe_kernels.triton_kernels`), CUDA devices
cuda       CUDA kernels (``moe_kernels._C_cuda``)
========== ==================================================================================

Example::

    import torch, moe_kernels as mk
    T, E, k, H, I = 16, 8, 2, 64, 32
    x = torch.randn(T, H)
    w_gate_up, w_down = torch.randn(E, 2 * I, H) / 8, torch.randn(E, H, I) / 6
    weights, ids = mk.topk_gating(torch.randn(T, E), k)
    out = mk.moe_ffn(x, w_gate_up, w_down, weights, ids)   # [T, H]

:class:`moe_kernels.MoE` is the whole layer (router, gating, experts) with the routing schemes,
capacity limits, auxiliary losses and shared experts used to train MoE models;
:mod:`moe_kernels.losses` holds its load-balancing and z-losses as functions.
"""

from . import (
    _registry,  # noqa: F401  (loads the extensions and registers every op)
    losses,
)
from ._api import grouped_gemm, moe_ffn, permute, route, topk_gating, unpermute
from ._backends import BackendUnavailableError, available_backends, use_backend
from ._memory import cpu_cache_info, empty_cpu_cache
from ._precision import set_fp32_precision
from .layers import MoE
from .plan import RoutingPlan

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "MoE",
    "RoutingPlan",
    "available_backends",
    "cpu_cache_info",
    "empty_cpu_cache",
    "grouped_gemm",
    "losses",
    "moe_ffn",
    "permute",
    "route",
    "set_fp32_precision",
    "topk_gating",
    "unpermute",
    "use_backend",
]
