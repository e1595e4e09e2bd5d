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

import os
import subprocess
import sysconfig

import pytest
from testutil import build_cpp_check, cpu_has, require_cpp_toolchain

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


@pytest.fixture(scope="module")
def gemm_check(tmp_path_factory) -> str:
    from torch.utils import cpp_extension

    require_cpp_toolchain()
    simde = _simde_include()
    if simde is None:
        msg = "SIMDe headers not found (pip install cmeel-simde, part of the test extra)"
        if os.environ.get("MOE_KERNELS_TEST_INSTALLED"):
            pytest.fail(msg)  # the CI configuration installs the extra: missing is a failure
        pytest.skip(msg)
    torch_lib = os.path.join(os.path.dirname(cpp_extension.__file__), "..", "lib")
    flags = [
        "-DMOE_KERNELS_SIMDE",
        *_host_flags(),
        "-I",
        simde,
        *[f"-I{p}" for p in cpp_extension.include_paths()],
    ]
    libs = [f"-L{torch_lib}", "-lc10", f"-Wl,-rpath,{os.path.abspath(torch_lib)}"]
    out = str(tmp_path_factory.mktemp("gemm_check"))
    return build_cpp_check(out, "gemm_check", SOURCES, flags, libs)


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
