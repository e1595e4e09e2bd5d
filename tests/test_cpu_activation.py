"""The CPU backend's activation rows (``csrc/cpu/activation_rows.cpp``) against float64.

``tests/cpp/act_check.cpp`` is compiled with the kernels' source and run at each ISA level the
rows have code for (``scalar``: act_forward / act_backward element by element; ``avx2``: 8 lanes
at a time with polynomial e^x and erf; ``avx512``: SwiGLU's forward 16 lanes at a time, checked
to give the avx2 level's bits).  It sweeps the gate value over
[-100, 100], past both ends of e^x's float range, checks every pair of special values (infinities,
NaN, the ends of the range, the clamp limit) against the scalar code's NaN / infinite / finite
outcome, and checks that no value depends on where a row is split.  The fused FFN's tests check
the rows inside ``moe_ffn`` against the reference.
"""

from __future__ import annotations

import subprocess

import pytest
from testutil import build_cpp_check, cpu_has


@pytest.fixture(scope="module")
def act_check(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("act_check"))
    return build_cpp_check(out, "act_check", ["cpu/activation_rows.cpp"], [])


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
def test_activation_rows(act_check, isa):
    if isa == "avx2" and not cpu_has("avx2", "fma"):
        pytest.skip("this CPU lacks AVX2/FMA")
    if isa == "avx512" and not cpu_has("avx512f", "avx512dq", "avx2", "fma"):
        pytest.skip("this CPU lacks AVX-512")
    proc = subprocess.run([act_check, isa], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{isa}:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    assert proc.stdout.strip().endswith("ok")


def test_act_check_refuses_unknown_isa(act_check):
    # The checker must be able to fail: an unknown level is refused, not silently passed.
    proc = subprocess.run([act_check, "sse9"], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
