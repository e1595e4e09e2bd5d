"""64-bit indexing: element offsets past 2**31 (needs ~6 GiB of RAM; part of ``make test``).

Kernels that compute ``row * H + col`` in 32-bit wrap around once T*k*H (or M*K) passes 2**31 and
read or write the wrong rows.  These tests build tensors just past that bound and check the rows
at the far end, where a wrapped offset lands.  They run for every backend under test but the
reference (plain torch indexing) and the interpreted Triton (far too slow at this size).
"""

from __future__ import annotations

import pytest
import torch
from testutil import backends, device_of, fits

import moe_kernels

pytestmark = pytest.mark.slow

BACKENDS = [b for b in backends(reference=False) if fits(b, False)]

T, K, H = 32768, 8, 8208  # T * K * H = 2_151_677_952 > 2**31


def big_randn(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    """[rows, cols] bf16 random rows repeating with a prime period of 1021 rows (drawing 2**31
    normal numbers costs more than the kernels under test).  A 32-bit offset wrapped by 2**32
    elements lands 2**32 / cols rows away, not a multiple of the period (cols here has odd
    factors): it reads a different row."""
    base = torch.randn(1021, cols, generator=g, dtype=torch.bfloat16)
    return base.repeat(-(-rows // 1021), 1)[:rows]


@pytest.mark.parametrize("backend", BACKENDS)
def test_permute_unpermute_past_2_pow_31(backend):
    name, dev = backend, device_of(backend)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 4, (T, K), generator=g, dtype=torch.int32).to(dev)
    plan = moe_kernels.route(ids, 4, backend=name)
    x = torch.randn(T, H, generator=g, dtype=torch.bfloat16).to(dev)
    y = moe_kernels.permute(x, plan, backend=name)
    sor = plan.slot_of_row.long()
    rows = torch.arange(T * K - 64, T * K, device=dev)  # the far end: offsets past 2**31
    assert torch.equal(y[rows], x[sor[rows] // K])
    del y
    y = big_randn(T * K, H, g).to(dev)
    w = torch.rand(T, K, generator=g).to(dev)
    out = moe_kernels.unpermute(y, plan, w, backend=name)
    tokens = torch.arange(T - 8, T, device=dev)
    ros = plan.row_of_slot.long()
    want = (y[ros[tokens]].float() * w[tokens, :, None]).sum(1)
    # bf16 output: one rounding (u = 3.9e-3) of an fp32 sum of K terms; 2.5x margin
    assert torch.allclose(out[tokens].float(), want, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_gemm_past_2_pow_31(backend):
    name, dev = backend, device_of(backend)
    M, Kd, N = 262_160, 8208, 8  # M * Kd > 2**31
    g = torch.Generator().manual_seed(1)
    a = big_randn(M, Kd, g).to(dev)
    b = torch.randn(2, Kd, N, generator=g, dtype=torch.bfloat16).to(dev)
    offs = torch.tensor([M // 2, M], dtype=torch.int32, device=dev)
    out = moe_kernels.grouped_gemm(a, b, offs, backend=name)
    tail = slice(M - 16, M)
    want = a[tail].float() @ b[1].float()
    # bf16 output rounding (u = 3.9e-3, x5 margin) plus the fp32 accumulation over Kd = 8208
    # products of size ~1 summed in another order (~sqrt(Kd) u32 |terms| each: atol 0.2 keeps a
    # wide margin); a wrapped 32-bit offset reads another row: errors of 100%
    assert torch.allclose(out[tail].float(), want, rtol=2e-2, atol=2e-1)
