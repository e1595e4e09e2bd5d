"""The fp32 GEMM precision of the GPU backends (one switch for the Triton and CUDA kernels)."""

from __future__ import annotations

import importlib
import sys

_PRECISIONS = ("tf32", "ieee")


def set_fp32_precision(precision: str) -> None:
    """How the GPU backends multiply float32 matrices (the grouped GEMM, the expert FFN).

    ``"tf32"`` (the default): tensor cores with TF32 inputs (10-bit mantissa, fp32 accumulation),
    relative error around 1e-3, as ``torch.backends.cuda.matmul.allow_tf32 = True`` gives.
    ``"ieee"``: full fp32 FMA (the cuda backend's exact SIMT kernels, Triton's ``ieee`` dot).

    Applies to the ``triton`` and ``cuda`` backends of this process; their initial values come from
    ``MOE_KERNELS_TRITON_FP32`` and ``MOE_KERNELS_CUDA_FP32``.  The CPU backends always compute in
    fp32.  bf16 / fp16 inputs are not affected.
    """
    if precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {_PRECISIONS}, got {precision!r}")
    try:
        ops_common = importlib.import_module("moe_kernels.triton_kernels.ops_common")
    except ImportError:  # triton is not installed
        ops_common = None
    if ops_common is not None:
        ops_common.set_fp32_precision(precision)
    cuda = sys.modules.get("moe_kernels._C_cuda")  # loaded at import when it was built
    if cuda is not None and hasattr(cuda, "set_fp32_precision"):
        cuda.set_fp32_precision(precision)
