"""The instruction-set and brgemm choices follow the environment (run by test_cpu_isa.py in a
process per path, with the variables set; in the main suite they check the defaults)."""

from __future__ import annotations

import os

import pytest

import moe_kernels

pytestmark = pytest.mark.skipif(
    not moe_kernels.available_backends()["cpu"][0], reason="the compiled CPU backend is not built"
)


def test_backend_isa_env_is_honoured():
    want = os.environ.get("MOE_KERNELS_CPU_ISA")
    if not want:
        pytest.skip("MOE_KERNELS_CPU_ISA not set (the ISA runner sets it)")
    assert moe_kernels._C.cpu_isa() == want


def test_backend_brgemm_route_env_is_honoured():
    """MOE_KERNELS_CPU_BRGEMM=1 (set by the ISA runner) must put bf16 weights with many rows on
    oneDNN's brgemm: packed (VNNI) where oneDNN has the kernel, the plain layout elsewhere."""
    want = os.environ.get("MOE_KERNELS_CPU_BRGEMM")
    route = moe_kernels._C.cpu_brgemm_route()
    if want == "1":
        # the packed kernel only at the amx level (MOE_KERNELS_CPU_ISA below it: the plain layout)
        packs = moe_kernels._C.cpu_brgemm_usable("bf16") and moe_kernels._C.cpu_isa() == "amx"
        assert route == ("vnni" if packs else "plain")
    elif want == "0" or moe_kernels._C.cpu_isa() != "amx":
        assert route == "off"


def test_backend_amx_kernel_where_the_route_packs():
    """The packed (AMX) route must run the package's own AMX kernel -- it passed its self-check
    against exact products -- unless MOE_KERNELS_CPU_AMX_KERNEL=0; every other route never does."""
    own = moe_kernels._C.cpu_amx_kernel()
    if moe_kernels._C.cpu_brgemm_route() != "vnni":
        assert not own
    else:
        assert own == (os.environ.get("MOE_KERNELS_CPU_AMX_KERNEL") != "0")
