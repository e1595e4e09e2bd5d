"""Per-op micro-benchmarks (pytest-benchmark), one per public op, every available CPU backend.

Not part of the test run (``testpaths = tests``); run them explicitly::

    pytest bench/test_bench_ops.py                              # all ops, all backends
    pytest bench/test_bench_ops.py -k "grouped_gemm and cpu"    # a subset
    pytest bench/test_bench_ops.py --benchmark-json=bench/ops.json --benchmark-columns=median,iqr

Sizes: the Qwen3-30B-A3B layer (H 2048, I 768, k 8) with its 128 experts for the index ops, and
16 experts for the GEMM-like ops so a CPU run stays short; T = 1 (decode) and 512 (prefill).
Every benchmark first checks its result against the reference, so a fast wrong kernel fails
instead of being timed.
"""

from __future__ import annotations

import pytest
import torch

import moe_kernels

pytest.importorskip("pytest_benchmark")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = [
    name
    for name, (ok, _) in moe_kernels.available_backends().items()
    if ok and (name == "reference" or (name in ("cpu",) if DEVICE == "cpu" else name != "cpu"))
]
DTYPE = torch.bfloat16
H, INTER, K = 2048, 768, 8
E_ROUTE, E_GEMM = 128, 16
TOKENS = [1, 512]


def _routing(T: int, E: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=gen)
    w, ids = torch.topk(torch.softmax(logits, -1), K, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    return logits.to(DEVICE), w.to(DEVICE), ids.to(device=DEVICE, dtype=torch.int32)


def _close(out, ref, tol=2e-2):
    if isinstance(out, tuple):
        for o, r in zip(out, ref, strict=True):
            _close(o, r, tol)
        return
    if not out.is_floating_point():
        assert torch.equal(out, ref)
        return
    err = (out.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)
    assert err <= tol, f"max relative error {err.item():.3g} > {tol}"


def _bench(benchmark, fn, ref_fn, rounds):
    with torch.inference_mode():
        _close(fn(), ref_fn())
        benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1, iterations=1)


def _rounds(T):
    return 20 if T == 1 else 5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", TOKENS)
def test_topk_gating(benchmark, backend, T):
    benchmark.group = f"topk_gating T={T} E={E_ROUTE} k={K}"
    logits, _, _ = _routing(T, E_ROUTE)

    def run(b=backend):
        return moe_kernels.topk_gating(logits, K, backend=b)

    _bench(benchmark, run, lambda: run("reference"), _rounds(T))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", TOKENS)
def test_route(benchmark, backend, T):
    benchmark.group = f"route T={T} E={E_ROUTE} k={K}"
    _, _, ids = _routing(T, E_ROUTE)

    def run(b=backend):
        p = moe_kernels.route(ids, E_ROUTE, backend=b)
        return (p.tokens_per_expert, p.offs, p.row_of_slot, p.slot_of_row)

    _bench(benchmark, run, lambda: run("reference"), _rounds(T))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", TOKENS)
def test_permute(benchmark, backend, T):
    benchmark.group = f"permute T={T} H={H} k={K}"
    _, _, ids = _routing(T, E_ROUTE)
    plan = moe_kernels.route(ids, E_ROUTE, backend="reference")
    x = torch.randn(T, H).to(device=DEVICE, dtype=DTYPE)

    def run(b=backend):
        return moe_kernels.permute(x, plan, backend=b)

    _bench(benchmark, run, lambda: run("reference"), _rounds(T))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", TOKENS)
def test_unpermute(benchmark, backend, T):
    benchmark.group = f"unpermute T={T} H={H} k={K}"
    _, w, ids = _routing(T, E_ROUTE)
    plan = moe_kernels.route(ids, E_ROUTE, backend="reference")
    y = torch.randn(T * K, H).to(device=DEVICE, dtype=DTYPE)

    def run(b=backend):
        return moe_kernels.unpermute(y, plan, w, backend=b)

    _bench(benchmark, run, lambda: run("reference"), _rounds(T))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", TOKENS)
def test_grouped_gemm(benchmark, backend, T):
    """GEMM 1 of the expert FFN: [T*k, H] x [E, 2I, H]^T (nn.Linear layout, trans_b=True)."""
    benchmark.group = f"grouped_gemm T={T} E={E_GEMM} [{T * K},{H}]x[{2 * INTER},{H}]^T"
    _, _, ids = _routing(T, E_GEMM)
    plan = moe_kernels.route(ids, E_GEMM, backend="reference")
    a = torch.randn(T * K, H).to(device=DEVICE, dtype=DTYPE)
    b = (torch.randn(E_GEMM, 2 * INTER, H) * H**-0.5).to(device=DEVICE, dtype=DTYPE)

    def run(bk=backend):
        return moe_kernels.grouped_gemm(a, b, plan.offs, trans_b=True, backend=bk)

    _bench(benchmark, run, lambda: run("reference"), _rounds(T))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", TOKENS)
def test_moe_ffn(benchmark, backend, T):
    benchmark.group = f"moe_ffn T={T} H={H} I={INTER} E={E_GEMM} k={K}"
    _, w, ids = _routing(T, E_GEMM)
    x = torch.randn(T, H).to(device=DEVICE, dtype=DTYPE)
    w_gate_up = (torch.randn(E_GEMM, 2 * INTER, H) * H**-0.5).to(device=DEVICE, dtype=DTYPE)
    w_down = (torch.randn(E_GEMM, H, INTER) * INTER**-0.5).to(device=DEVICE, dtype=DTYPE)

    def run(b=backend):
        return moe_kernels.moe_ffn(x, w_gate_up, w_down, w, ids, backend=b)

    _bench(benchmark, run, lambda: run("reference"), _rounds(T))
