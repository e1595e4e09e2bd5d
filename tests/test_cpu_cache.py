"""The cpu backend's cache of large tensors (``moe_kernels.cpu_cache_info`` / ``empty_cpu_cache``).

Tensors of 4 MiB or more that the CPU kernels allocate (weight gradients, large outputs and
scratch) come from a cache of the blocks such tensors freed.  Checked here: a freed gradient's
block serves the next call of that size, and the reused block's results are right on fresh random
data each call; debug mode poisons a reused block too (stale values of the previous call must not
pass for written elements); the limit (``MOE_KERNELS_CPU_CACHE_MB``, 0: off) holds; what
autograd, resizing, shared memory and serialisation do with such a tensor works.
"""

# ruff: noqa: E741  (I is the expert intermediate size, as everywhere in the package)
from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from testutil import check_vs_reference, randn

import moe_kernels
from moe_kernels import reference

pytestmark = pytest.mark.skipif(
    not moe_kernels.available_backends()["cpu"][0], reason="the compiled CPU backend is not built"
)

MIB = 1 << 20
# grouped_gemm with b [E, K, N] fp32 of 16 MiB: its gradient comes from the cache
E, K, N = 4, 1024, 1024


def _gemm_case(seed: int):
    M = 40
    a = randn(M, K, seed=seed, scale=0.05)
    b = randn(E, K, N, seed=seed + 1, scale=0.05)
    offs = torch.tensor([10, 10, 25, 40], dtype=torch.int32)  # expert 1 has no rows
    return a, b, offs


def _grad_b(a, b, offs, seed):
    bb = b.clone().requires_grad_()
    out = moe_kernels.grouped_gemm(a, bb, offs, backend="cpu")
    out.backward(randn(*out.shape, seed=seed + 7))
    return bb.grad


def _grad_b_reference(a, b, offs, seed):
    g = randn(a.shape[0], N, seed=seed + 7)
    out = {}
    for dt in (torch.float32, torch.float64):
        bb = b.detach().to(dt).clone().requires_grad_()
        reference.grouped_gemm(a.to(dt), bb, offs, False).backward(g.to(dt))
        out[dt] = bb.grad
    return out[torch.float32], out[torch.float64]


def test_freed_gradient_block_serves_the_next_call():
    moe_kernels.empty_cpu_cache()
    info = moe_kernels.cpu_cache_info()
    assert info["min_bytes"] <= E * K * N * 4 and info["limit_bytes"] >= E * K * N * 4
    a, b, offs = _gemm_case(1)
    g1 = _grad_b(a, b, offs, 1)
    ptr = g1.data_ptr()
    check_vs_reference(g1, *_grad_b_reference(a, b, offs, 1), torch.float32, "grad_b, call 1")
    assert torch.equal(g1[1], torch.zeros_like(g1[1])), "an expert without rows: zero gradient"
    del g1
    info = moe_kernels.cpu_cache_info()
    assert info["cached_blocks"] >= 1 and info["cached_bytes"] >= E * K * N * 4
    a, b, offs = _gemm_case(2)  # fresh data: the reused block holds call 1's gradient
    g2 = _grad_b(a, b, offs, 2)
    assert g2.data_ptr() == ptr, "the freed block of the same size was not reused"
    check_vs_reference(g2, *_grad_b_reference(a, b, offs, 2), torch.float32, "grad_b, call 2")
    assert torch.equal(g2[1], torch.zeros_like(g2[1])), "stale values in an empty expert's rows"
    moe_kernels.empty_cpu_cache()
    assert moe_kernels.cpu_cache_info()["cached_bytes"] == 0


def test_debug_mode_poisons_a_reused_block(debug_mode):
    """moe_ffn's output of 16 MiB, its last token row left unwritten by the test fault: on the
    second call, in a block holding the first call's finite values, that row must read NaN."""
    from moe_kernels import _C

    T, H, I, E2, k = 2048, 2048, 8, 2, 1
    x = randn(T, H, seed=3, scale=0.5)
    wgu, wd = randn(E2, 2 * I, H, seed=4, scale=0.05), randn(E2, H, I, seed=5, scale=0.2)
    tw = torch.ones(T, k)
    ids = torch.randint(0, E2, (T, k), generator=torch.Generator().manual_seed(6))
    moe_kernels.empty_cpu_cache()
    first = moe_kernels.moe_ffn(x, wgu, wd, tw, ids, backend="cpu")
    assert torch.isfinite(first).all()
    ptr = first.data_ptr()
    del first
    _C._set_test_fault("moe_ffn")
    try:
        out = moe_kernels.moe_ffn(x, wgu, wd, tw, ids, backend="cpu")
    finally:
        _C._set_test_fault("")
    assert out.data_ptr() == ptr, "the test needs the block reused"
    assert torch.isnan(out[-1]).all(), "the reused block was not poisoned"
    assert torch.isfinite(out[:-1]).all()


def test_cached_tensors_behave_as_tensors():
    """Autograd accumulation into .grad, resize_, share_memory_ and torch.save of a tensor whose
    block came from the cache."""
    a, b, offs = _gemm_case(4)
    bb = b.clone().requires_grad_()
    for _ in range(2):  # the second backward accumulates into the first's gradient
        moe_kernels.grouped_gemm(a, bb, offs, backend="cpu").backward(randn(40, N, seed=11))
    one, exact = _grad_b_reference(a, b, offs, 4)
    check_vs_reference(bb.grad, 2 * one, 2 * exact, torch.float32, "accumulated .grad")
    g = bb.grad.detach().clone()  # torch's allocator
    t = bb.grad.detach()
    buf = io.BytesIO()
    torch.save(t, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf), g)
    t.share_memory_()
    assert t.is_shared() and torch.equal(t, g)
    t2 = _grad_b(a, b, offs, 4).detach()
    before = t2.clone()
    t2.resize_(E * K * N + 1000)
    assert torch.equal(t2[: E * K * N].view(E, K, N), before)


def _run(code: str, env: dict) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


CHILD = """
import torch, moe_kernels
b = torch.randn(4, 1024, 1024)
a, offs = torch.randn(40, 1024), torch.tensor([10, 20, 30, 40], dtype=torch.int32)
grads = []
for _ in range(3):  # three gradients alive at once, then all freed
    bb = b.clone().requires_grad_()
    moe_kernels.grouped_gemm(a, bb, offs, backend="cpu").sum().backward()
    grads.append(bb.grad)
del grads, bb
i = moe_kernels.cpu_cache_info()
print(i["cached_bytes"], i["cached_blocks"], i["limit_bytes"])
"""


@pytest.mark.parametrize("limit_mb,blocks", [(40, 2), (0, 0), (None, 3)])
def test_cache_limit(limit_mb, blocks):
    """MOE_KERNELS_CPU_CACHE_MB: at most that many MiB stay cached (the oldest blocks unmapped
    first); 0 turns the cache off; the default (2048) keeps all three 16 MiB gradients."""
    env = dict(os.environ)
    env.pop("MOE_KERNELS_CPU_CACHE_MB", None)
    if limit_mb is not None:
        env["MOE_KERNELS_CPU_CACHE_MB"] = str(limit_mb)
    cached, n, limit = map(int, _run(CHILD, env).split())
    assert n == blocks and cached == blocks * 16 * MIB
    assert limit == (2048 if limit_mb is None else limit_mb) * MIB
