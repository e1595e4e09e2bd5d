"""Every CPU instruction-set path of the compiled kernels, each in its own process.

The ISA is chosen once per process (``MOE_KERNELS_CPU_ISA``), so each path runs the op modules
restricted to the cpu backend (``MOE_KERNELS_TEST_BACKENDS=cpu``) in a subprocess: every case
against the reference and the exact-zero / empty / dropped-pair tests (:data:`SELECT`; the
Hypothesis properties run once, in the main process), with ``MOE_KERNELS_DEBUG=1`` so that every
output starts NaN-filled and an element a kernel forgot to write fails the finite checks.
The subprocess also runs ``test_cpu_isa_env.py``, which checks the process took the path asked
for.
Paths the CPU cannot run are skipped with the reason; the AVX-512 GEMM kernels (the only
ISA-specific code) still run on such a CPU, emulated, in ``test_cpu_isa_emulated.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from testutil import cpu_flags

import moe_kernels

HERE = os.path.dirname(os.path.abspath(__file__))
#: the op modules, and the tests of theirs each ISA path runs (``pytest -k``)
SELECT = "backend or zero_grad or empty or dropped"
GEMM_MODULES = ("test_grouped_gemm.py", "test_moe_ffn.py")
OP_MODULES = ("test_gating.py", "test_routing.py", "test_permute.py", "test_grouped_gemm.py",
              "test_moe_ffn.py")  # fmt: skip


NEEDS = {
    "scalar": set(),
    "avx2": {"avx2", "fma", "f16c"},
    "avx512": {"avx512f", "avx512bw", "avx512vl"},
    "amx": {"avx512f", "avx512bw", "avx512vl", "avx512_bf16", "amx_bf16"},
}


@pytest.mark.parametrize("isa", [*NEEDS, "brgemm", "brgemm-avx2"])
def test_isa_path(isa):
    """``brgemm``: the machine's ISA with bf16 weights of many rows forced onto oneDNN's brgemm
    (``MOE_KERNELS_CPU_BRGEMM=1``; VNNI-packed where oneDNN has the kernel, the plain layout
    through torch's reference brgemm elsewhere); ``brgemm-avx2``: the same at the ``avx2`` level
    (the plain layout, and the route's store of its results without AVX-512)."""
    if not moe_kernels.available_backends()["cpu"][0]:
        pytest.skip("the compiled CPU backend is not built")
    missing = NEEDS.get(isa.removeprefix("brgemm-"), set()) - cpu_flags()
    if missing:
        pytest.skip(f"this CPU lacks {', '.join(sorted(missing))}: the {isa} path cannot run here")
    env = dict(os.environ, MOE_KERNELS_DEBUG="1", MOE_KERNELS_TEST_BACKENDS="cpu")
    if isa.startswith("brgemm"):
        env["MOE_KERNELS_CPU_BRGEMM"] = "1"
        # passes of two token blocks: the tests' small K would put every block in one pass
        env["MOE_KERNELS_CPU_BRGEMM_PASS_TOKENS"] = "64"
        env.pop("MOE_KERNELS_CPU_ISA", None)
        if isa == "brgemm-avx2":
            env["MOE_KERNELS_CPU_ISA"] = "avx2"
    else:
        env["MOE_KERNELS_CPU_ISA"] = isa
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-x",
        "-p",
        "no:cacheprovider",
        "-k",
        SELECT,
        # the brgemm route changes the GEMMs only
        *[
            os.path.join(HERE, m)
            for m in (GEMM_MODULES if isa.startswith("brgemm") else OP_MODULES)
        ],
        os.path.join(HERE, "test_cpu_isa_env.py"),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{isa} path failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
