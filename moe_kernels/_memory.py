"""The CPU backend's cache of large tensors (weight gradients, large activations and scratch)."""

from __future__ import annotations

import sys


def _cpu_extension():
    return sys.modules.get("moe_kernels._C")  # loaded at import when it was built


def empty_cpu_cache() -> None:
    """Unmap the memory the cpu backend keeps for reuse.

    The cpu backend allocates its tensors of 4 MiB or more (weight gradients, large activations,
    scratch) from a cache of the blocks such tensors freed, so that the next call of the same size
    (the next training step) does not pay the first touch of fresh pages again.  The cache holds
    at most ``MOE_KERNELS_CPU_CACHE_MB`` MiB (2048 by default; ``0`` turns it off, read at the
    first allocation).  This releases what it holds now, as ``torch.cuda.empty_cache`` does for
    CUDA; tensors in use are not affected.  A no-op without the compiled CPU backend.
    """
    ext = _cpu_extension()
    if ext is not None and hasattr(ext, "cpu_cache_empty"):
        ext.cpu_cache_empty()


def cpu_cache_info() -> dict[str, int]:
    """What the cpu backend's cache holds: ``cached_bytes`` and ``cached_blocks`` (freed, kept for
    reuse), ``limit_bytes`` (``MOE_KERNELS_CPU_CACHE_MB``) and ``min_bytes`` (the smallest tensor
    it serves).  All zero without the compiled CPU backend."""
    ext = _cpu_extension()
    if ext is None or not hasattr(ext, "cpu_cache_info"):
        return {"cached_bytes": 0, "cached_blocks": 0, "limit_bytes": 0, "min_bytes": 0}
    return dict(ext.cpu_cache_info())
