"""Debug mode's poisoned outputs catch a kernel that leaves part of its output unwritten.

``moe_kernels._debug.set_debug_mode`` switches the compiled kernels' poisoning at run time (NaN /
INT_MIN-filled outputs); ``moe_kernels._C._set_test_fault`` makes one named cpu kernel skip part
of its output (tests only).  With both on, the check every op test uses (``assert_rel_close``:
no NaN, then the error against the reference) must fail; with the fault off it must pass.
"""

from __future__ import annotations

import pytest
import torch
from testutil import assert_rel_close, backends, randn

import moe_kernels as mk
from moe_kernels._debug import debug_mode, set_debug_mode
from moe_kernels._tolerances import SAME_DTYPE_TOL

pytestmark = pytest.mark.skipif("cpu" not in backends(), reason="the cpu backend is not available")

T, E, K, H, I = 9, 6, 2, 32, 16  # noqa: E741
TOL = SAME_DTYPE_TOL[torch.float32]  # reason in moe_kernels/_tolerances.py


@pytest.fixture
def fault():
    """Sets debug mode and a test fault; both are restored whatever the test does."""
    from moe_kernels import _C

    was = debug_mode()

    def set_fault(name: str, debug: bool = True) -> None:
        set_debug_mode(debug)
        _C._set_test_fault(name)

    try:
        yield set_fault
    finally:
        _C._set_test_fault("")
        set_debug_mode(was)


def _ids(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, E, (T, K), generator=g).to(torch.int32)


def test_debug_switch_reaches_the_extension(fault):
    from moe_kernels import _C

    fault("", debug=True)
    assert _C.debug_mode() and debug_mode()
    fault("", debug=False)
    assert not _C.debug_mode() and not debug_mode()


def test_unknown_fault_name_raises(fault):
    from moe_kernels import _C

    with pytest.raises(ValueError):
        _C._set_test_fault("no_such_kernel")


@pytest.mark.parametrize("faulty", [True, False])
def test_poison_catches_permute_fault(fault, faulty):
    fault("permute" if faulty else "")
    x = randn(T, H, seed=1)
    plan = mk.route(_ids(2), E, backend="cpu")
    out = mk.permute(x, plan, backend="cpu")
    ref = mk.permute(x, plan, backend="reference")
    if faulty:
        assert torch.isnan(out[-1]).all() and not torch.isnan(out[:-1]).any()
        with pytest.raises(AssertionError):
            assert_rel_close(out, ref, TOL, "permute")
    else:
        assert_rel_close(out, ref, TOL, "permute")


@pytest.mark.parametrize("faulty", [True, False])
def test_poison_catches_moe_ffn_fault(fault, faulty):
    fault("moe_ffn" if faulty else "")
    x = randn(T, H, seed=3)
    wgu = randn(E, 2 * I, H, seed=4, scale=H**-0.5)
    wd = randn(E, H, I, seed=5, scale=I**-0.5)
    tw = torch.rand(T, K, generator=torch.Generator().manual_seed(6))
    ids = _ids(7)
    out = mk.moe_ffn(x, wgu, wd, tw, ids, backend="cpu")
    ref = mk.moe_ffn(x, wgu, wd, tw, ids, backend="reference")
    if faulty:
        assert torch.isnan(out[-1]).all() and not torch.isnan(out[:-1]).any()
        with pytest.raises(AssertionError):
            assert_rel_close(out, ref, TOL, "moe_ffn")
    else:
        assert_rel_close(out, ref, TOL, "moe_ffn")
