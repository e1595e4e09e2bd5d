"""The CPU GEMM engine's kernels for every ISA, including AVX-512 on machines without it.

``tests/cpp/gemm_check.cpp`` drives ``gemm_nt`` (the engine behind ``grouped_gemm`` and
``moe_ffn``) through random shapes, dtypes and operand layouts against a float64 loop.  It is
compiled from the source tree with ``MOE_KERNELS_SIMDE`` defined, so the AVX-512 kernels are
built against SIMDe's portable implementations of the intrinsics (pip package ``cmeel-simde``,
part of the ``test`` extra) and run here even though this CPU has no AVX-512; the scalar and AVX2
kernel sets run natively in the same program.  ``amx`` is the ISA level of CPUs with
AVX-512-BF16 (and AMX): the AVX-512 kernels plus the ``vdpbf16ps`` dot kernel for bf16 weights.  ``test_cpu_isa.py`` covers the full ops on every
ISA the CPU has.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sysconfig

import pytest
from testutil import cpu_has

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
SOURCES = ["cpu/gemm.cpp", "cpu/gemm_scalar.cpp", "cpu/gemm_avx2.cpp", "cpu/gemm_avx512.cpp"]


def _simde_include() -> str | None:
    """The include directory holding simde/x86/avx512.h, if SIMDe is installed."""
    candidates = [
        os.path.join(sysconfig.get_paths()["purelib"], "cmeel.prefix", "include"),
        os.path.join(sysconfig.get_paths()["platlib"], "cmeel.prefix", "include"),
        "/usr/include",
        "/usr/local/include",
    ]
    for c in candidates:
        if os.path.exists(os.path.join(c, "simde", "x86", "avx512.h")):
            return c
    return None


def _host_flags() -> list[str]:
    # SIMDe emulates AVX-512 with the host's AVX2 when the compiler may use it (much faster).
    return ["-mavx2", "-mfma", "-mf16c"] if cpu_has("avx2", "fma", "f16c") else []


@functools.lru_cache(maxsize=1)
def _build(tmpdir: str) -> str:
    from torch.utils import cpp_extension

    simde = _simde_include()
    if simde is None:
        msg = "SIMDe headers not found (pip install cmeel-simde, part of the test extra)"
        if os.environ.get("MOE_KERNELS_TEST_INSTALLED"):
            pytest.fail(msg)  # the CI configuration installs the extra: missing is a failure
        pytest.skip(msg)
    torch_lib = os.path.join(os.path.dirname(cpp_extension.__file__), "..", "lib")
    exe = os.path.join(tmpdir, "gemm_check")
    cmd = [
        os.environ.get("CXX", "g++"),
        "-std=c++20",
        "-O2",
        "-DMOE_KERNELS_SIMDE",
        *_host_flags(),
        "-I",
        CSRC,
        "-I",
        simde,
        *[f"-I{p}" for p in cpp_extension.include_paths()],
        os.path.join(ROOT, "tests", "cpp", "gemm_check.cpp"),
        *[os.path.join(CSRC, s) for s in SOURCES],
        "-o",
        exe,
        f"-L{torch_lib}",
        "-lc10",
        f"-Wl,-rpath,{os.path.abspath(torch_lib)}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"building gemm_check failed:\n{proc.stderr[-6000:]}"
    return exe


@pytest.fixture(scope="module")
def gemm_check(tmp_path_factory) -> str:
    if not os.path.isdir(CSRC):
        pytest.skip("needs the source tree (csrc/)")
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("no C++ compiler")
    return _build(str(tmp_path_factory.mktemp("gemm_check")))


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512", "amx"])
def test_gemm_kernels(gemm_check, isa):
    if isa == "avx2" and not cpu_has("avx2", "fma", "f16c"):
        pytest.skip("this CPU lacks AVX2/FMA/F16C (the AVX2 kernels are not emulated)")
    proc = subprocess.run([gemm_check, isa, "400"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{isa}:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    assert "400 cases ok" in proc.stdout


def test_gemm_check_catches_errors(gemm_check):
    # The checker itself must be able to fail: an unknown ISA is refused, not silently passed.
    proc = subprocess.run([gemm_check, "sse9"], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
