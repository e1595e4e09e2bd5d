"""Debug switches shared by every backend.

``MOE_KERNELS_DEBUG=1`` in the environment when ``moe_kernels`` is imported, or
:func:`set_debug_mode` at any time later, turns on:

* value checks on GPU tensors too (``offs`` monotone and in range; on CPU tensors they always run);
* poisoned outputs: the compiled and Triton backends allocate every output NaN-filled (integers:
  a negative sentinel), so an element a kernel fails to write shows up in the tests.

The flag is process state read on each call from memory (no environment read on the hot path);
the compiled extension keeps its own copy, set through ``moe_kernels._C.set_debug_mode``.
"""

from __future__ import annotations

import os

__all__ = ["debug_mode", "set_debug_mode"]

_state = [os.environ.get("MOE_KERNELS_DEBUG", "0") not in ("", "0")]


def debug_mode() -> bool:
    """Whether debug mode is on (see the module docstring)."""
    return _state[0]


def set_debug_mode(on: bool) -> None:
    """Turn debug mode on or off for every backend of this process."""
    _state[0] = bool(on)
    try:
        from . import _C
    except ImportError:  # no compiled extension: nothing else to switch
        return
    setter = getattr(_C, "set_debug_mode", None)
    if setter is not None:
        setter(bool(on))
