"""The CPU backend's activation rows (``csrc/cpu/activation_rows.cpp``) against float64.

``tests/cpp/act_check.cpp`` is compiled with the kernels' source and run at each ISA level the
rows have code for (``scalar``: act_forward / act_backward element by element; ``avx2``: swiglu
and swiglu_oai 8 lanes at a time with a polynomial e^x).  It sweeps the gate value over
[-100, 100], past both ends of e^x's float range, checks every pair of special values (infinities,
NaN, the ends of the range, the clamp limit) against the scalar code's NaN / infinite / finite
outcome, and checks that no value depends on where a row is split.  The fused FFN's tests check
the rows inside ``moe_ffn`` against the reference.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess

import pytest
from testutil import cpu_has

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")


@functools.lru_cache(maxsize=1)
def _build(tmpdir: str) -> str:
    exe = os.path.join(tmpdir, "act_check")
    cmd = [
        os.environ.get("CXX", "g++"),
        "-std=c++20",
        "-O2",
        "-I",
        CSRC,
        os.path.join(ROOT, "tests", "cpp", "act_check.cpp"),
        os.path.join(CSRC, "cpu", "activation_rows.cpp"),
        "-o",
        exe,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"building act_check failed:\n{proc.stderr[-6000:]}"
    return exe


@pytest.fixture(scope="module")
def act_check(tmp_path_factory) -> str:
    if not os.path.isdir(CSRC):
        pytest.skip("needs the source tree (csrc/)")
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("no C++ compiler")
    return _build(str(tmp_path_factory.mktemp("act_check")))


@pytest.mark.parametrize("isa", ["scalar", "avx2"])
def test_activation_rows(act_check, isa):
    if isa == "avx2" and not cpu_has("avx2", "fma"):
        pytest.skip("this CPU lacks AVX2/FMA")
    proc = subprocess.run([act_check, isa], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{isa}:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    assert proc.stdout.strip().endswith("ok")


def test_act_check_refuses_unknown_isa(act_check):
    # The checker must be able to fail: an unknown level is refused, not silently passed.
    proc = subprocess.run([act_check, "sse9"], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
