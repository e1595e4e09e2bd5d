"""The Triton backend's op table: ``IMPLS`` maps each op schema (:mod:`moe_kernels._schemas`) to
its launcher, a function whose parameters are exactly the schema's arguments; the registry wraps
each one as ``moe_kernels::<name>_triton``. Importing this module launches nothing and needs no GPU.

The launchers live by op family: ``ops_gating`` (topk_gating), ``ops_routing`` (route),
``ops_permute`` (permute, unpermute), ``ops_gemm`` (grouped_gemm), ``ops_moe_ffn`` (moe_ffn), with
what they share (allocation, checks, the GEMM launch helpers) in ``ops_common``.

Numerics: routing, gating and reductions are fp32 and deterministic (no float atomics). GEMMs
accumulate in fp32; fp32 inputs use TF32 tensor cores on a GPU by default (relative error about
1e-3, like ``torch.backends.cuda.matmul.allow_tf32 = True``); call :func:`set_fp32_precision`
("ieee") or set ``MOE_KERNELS_TRITON_FP32=ieee`` for full fp32. Under ``TRITON_INTERPRET=1`` bf16
tiles are converted to fp32 right after loading (the interpreter's bf16 arithmetic is broken) and
fp32 dots are full fp32.

No launcher reads tensor values on the host: output sizes depend on shapes only, and every
launch count is fixed by the shapes (no host sync; CUDA-graph friendly).
"""

from __future__ import annotations

from collections.abc import Callable

try:
    import triton  # noqa: F401
except ImportError as exc:  # the registry catches this and reports the backend unavailable
    raise ImportError(f"the Triton backend needs the triton package: {exc}") from exc

from .ops_common import available, set_fp32_precision
from .ops_gating import topk_gating, topk_gating_backward, topk_gating_with_counts
from .ops_gemm import grouped_gemm, grouped_gemm_backward
from .ops_moe_ffn import moe_ffn, moe_ffn_backward
from .ops_permute import permute, unpermute, unpermute_backward
from .ops_routing import ROUTE_CHUNK, route

__all__ = [
    "IMPLS",
    "ROUTE_CHUNK",
    "available",
    "set_fp32_precision",
    "topk_gating_with_counts",
]

IMPLS: dict[str, Callable] = {
    "topk_gating": topk_gating,
    "topk_gating_backward": topk_gating_backward,
    "route": route,
    "permute": permute,
    "unpermute": unpermute,
    "unpermute_backward": unpermute_backward,
    "grouped_gemm": grouped_gemm,
    "grouped_gemm_backward": grouped_gemm_backward,
    "moe_ffn": moe_ffn,
    "moe_ffn_backward": moe_ffn_backward,
}
