"""The poisoned tests can fail: with a Triton launcher broken on purpose (every kernel launch drops
its last program along the first grid axis, so the rows that program owns are never written),
the op modules' backend tests must fail on the poisoned (NaN-filled) outputs.  (With the real
launcher the same tests pass: they are part of this run.)

Runs in the Triton process (``make test-triton``); the compiled backend's equivalent, with a fault
hook in the C++ kernels, is test_poison.py.
"""

from __future__ import annotations

import pytest
import test_grouped_gemm
import test_moe_ffn
import test_permute
import torch
from testutil import backends

pytestmark = pytest.mark.skipif("triton" not in backends(), reason="triton is not under test here")


def _drop_last_program(grid):
    def shrink(g):
        g = tuple(g) if isinstance(g, (tuple, list)) else (g,)
        return (max(g[0] - 1, 0), *g[1:])

    if callable(grid):
        return lambda meta: shrink(grid(meta))
    return shrink(grid)


@pytest.fixture
def broken_launcher(monkeypatch):
    """Every Triton kernel launched from now on skips its last program."""
    from triton.runtime import jit

    classes = [jit.JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction

        classes.append(InterpretedFunction)
    except ImportError:
        pass
    launched = []
    for cls in classes:
        real = cls.run

        def run(self, *args, grid, warmup, _real=real, **kwargs):
            launched.append(getattr(self, "__name__", "kernel"))
            return _real(self, *args, grid=_drop_last_program(grid), warmup=warmup, **kwargs)

        monkeypatch.setattr(cls, "run", run)
    return launched


def _case(module, tiny_index):
    """The first (or given) tiny case of a module's backend table."""
    return [c for c in module.CASES if c[-1]][tiny_index]


def test_permute_test_fails_on_a_dropped_program(debug_mode, broken_launcher):
    with pytest.raises(AssertionError):
        test_permute.test_backend_vs_reference(
            "triton", _case(test_permute, 0), torch.float32, None
        )
    assert broken_launcher, "no Triton kernel was launched"


def test_grouped_gemm_test_fails_on_a_dropped_program(debug_mode, broken_launcher):
    with pytest.raises(AssertionError, match="non-finite"):
        test_grouped_gemm.test_backend_vs_reference(
            "triton", _case(test_grouped_gemm, 0), False, torch.float32, None
        )
    assert broken_launcher, "no Triton kernel was launched"


def test_moe_ffn_test_fails_on_a_dropped_program(debug_mode, broken_launcher):
    """The failure is the poisoned output's: the check that every element is finite."""
    with pytest.raises(AssertionError, match="non-finite"):
        test_moe_ffn.test_backend_vs_reference(
            "triton", _case(test_moe_ffn, 0), torch.float32, None
        )
    assert broken_launcher, "no Triton kernel was launched"
