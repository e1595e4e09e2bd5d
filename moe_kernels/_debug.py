"""Debug switches shared by every backend.

``MOE_KERNELS_DEBUG=1`` in the environment when ``moe_kernels`` is imported, or
:func:`set_debug_mode` at any time later, turns on:

* value checks on GPU tensors too (``offs`` monotone and in range; on CPU tensors they always run);
* poisoned outputs: the compiled and Triton backends allocate every output NaN-filled (integers:
  a negative sentinel), so an element a kernel fails to write shows up in the tests.

The flag is process state read on each call from memory (no environment read on the hot path);
each compiled extension keeps its own copy, set by :func:`set_debug_mode` through
``moe_kernels._C.set_debug_mode`` (CPU kernels) and ``moe_kernels._C_cuda.set_debug_mode`` (CUDA
kernels), for those of them that are loaded.
"""

from __future__ import annotations

import os
import sys

__all__ = ["debug_mode", "set_debug_mode"]

#: the compiled extensions, each with its own copy of the flag
_EXTENSIONS = ("moe_kernels._C", "moe_kernels._C_cuda")

_state = [os.environ.get("MOE_KERNELS_DEBUG", "0") not in ("", "0")]


def debug_mode() -> bool:
    """Whether debug mode is on (see the module docstring)."""
    return _state[0]


def set_debug_mode(on: bool) -> None:
    """Turn debug mode on or off for every backend of this process."""
    _state[0] = bool(on)
    # moe_kernels' import loads the extensions that were built (moe_kernels._registry); one that
    # is not in sys.modules was not built or failed to load: nothing to switch there.
    for name in _EXTENSIONS:
        setter = getattr(sys.modules.get(name), "set_debug_mode", None)
        if setter is not None:
            setter(bool(on))
