"""Every CPU instruction-set path of the compiled kernels, each in its own process.

The ISA is chosen once per process (``MOE_KERNELS_CPU_ISA``), so each path runs
``test_cpu_ops.py`` in a subprocess, with ``MOE_KERNELS_DEBUG=1`` so that every output starts
NaN-filled and an element a kernel forgot to write fails the finite checks there.
Paths the CPU cannot run are skipped with the reason; the AVX-512 GEMM kernels (the only
ISA-specific code) still run on such a CPU, emulated, in ``test_cpu_isa_emulated.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import moe_kernels

HERE = os.path.dirname(os.path.abspath(__file__))


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


NEEDS = {
    "scalar": set(),
    "avx2": {"avx2", "fma", "f16c"},
    "avx512": {"avx512f", "avx512bw", "avx512vl"},
    "amx": {"avx512f", "avx512bw", "avx512vl", "avx512_bf16", "amx_bf16"},
}


@pytest.mark.parametrize("isa", [*NEEDS, "brgemm"])
def test_isa_path(isa):
    """``brgemm``: the machine's ISA with bf16 weights of many rows forced onto oneDNN's brgemm
    (``MOE_KERNELS_CPU_BRGEMM=1``; VNNI-packed where oneDNN has the kernel, the plain layout
    through torch's reference brgemm elsewhere)."""
    if not moe_kernels.available_backends()["cpu"][0]:
        pytest.skip("the compiled CPU backend is not built")
    missing = NEEDS.get(isa, set()) - _cpu_flags()
    if missing:
        pytest.skip(f"this CPU lacks {', '.join(sorted(missing))}: the {isa} path cannot run here")
    if isa == "brgemm":
        env = dict(os.environ, MOE_KERNELS_CPU_BRGEMM="1", MOE_KERNELS_DEBUG="1")
        env.pop("MOE_KERNELS_CPU_ISA", None)
    else:
        env = dict(os.environ, MOE_KERNELS_CPU_ISA=isa, MOE_KERNELS_DEBUG="1")
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-x",
        "-p",
        "no:cacheprovider",
        os.path.join(HERE, "test_cpu_ops.py"),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{isa} path failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
