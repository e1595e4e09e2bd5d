"""Routing (stable counting sort) and permute / unpermute kernels against the reference."""

from __future__ import annotations

import pytest
import torch
from triton_helpers import DEVICE, DTYPES, check_close, randint, randn

# (T, k, E, block_size, low id, high id): why each row exists
ROUTE_CASES = [
    (13, 2, 5, 0, 0, 5),  # unpadded, T not a multiple of anything
    (13, 2, 5, 16, 0, 5),  # padded layout for the GEMM
    (50, 3, 7, 16, -2, 9),  # several chunks; ids out of range dropped (expert parallelism)
    (9, 4, 4, 8, 0, 4),  # k = E (ids random, so duplicates and empty experts)
    (20, 1, 3, 0, 0, 1),  # all tokens to one expert, k = 1, other experts empty
    (6, 2, 1, 4, 0, 1),  # E = 1
    (0, 2, 6, 16, 0, 6),  # T = 0: only padding rows / no rows
    (17, 2, 60, 0, 0, 60),  # E not a power of two, most experts empty
]


@pytest.mark.parametrize("case", ROUTE_CASES, ids=lambda c: "T{}-k{}-E{}-bs{}".format(*c[:4]))
def test_route(ops, ref, case, debug_mode):
    T, k, E, bs, lo, hi = case
    ids = randint(lo, hi, (T, k), seed=T + E)
    out = ops.route(ids, E, bs)
    exp = ref.route(ids.cpu(), E, bs)
    names = ("tokens_per_expert", "offs", "row_of_slot", "slot_of_row", "block_expert")
    for name, a, b in zip(names, out, exp):
        assert a.dtype == torch.int32, name
        assert torch.equal(a.cpu(), b), f"{name}: {a.cpu().tolist()} != {b.tolist()}"


def test_route_many_chunks_int64_ids(ops, ref, monkeypatch):
    """Small chunks so several chunks hold pairs of the same expert (the cross-chunk scan)."""
    monkeypatch.setitem(ops.ROUTE_CHUNK, "interpreter", 16)
    monkeypatch.setitem(ops.ROUTE_CHUNK, "gpu", 16)
    ids = randint(0, 3, (40, 2), seed=4).long()
    ids[5, 1] = 2**40  # out of range even for int32: dropped, not wrapped
    for bs in (0, 8):
        for a, b in zip(ops.route(ids, 3, bs), ref.route(ids.cpu(), 3, bs)):
            assert torch.equal(a.cpu(), b)


def _plan(ref, T, k, E, bs, seed):
    ids = randint(-1, E, (T, k), seed=seed)
    return [t.to(DEVICE) for t in ref.route(ids.cpu(), E, bs)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_permute(ops, ref, dtype, debug_mode):
    T, k, E, H = 13, 3, 5, 40
    plan = _plan(ref, T, k, E, 16, seed=1)
    x = randn(T, H, seed=2, dtype=dtype)
    y = ops.permute(x, plan[2], plan[3])
    assert y.dtype == dtype
    assert torch.equal(y.cpu(), ref.permute(x.cpu(), plan[2].cpu(), plan[3].cpu()))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weighted", [True, False])
def test_unpermute_poisoned_padding(ops, ref, dtype, weighted, debug_mode):
    T, k, E, H = 11, 2, 4, 24
    plan = _plan(ref, T, k, E, 8, seed=3)
    y = randn(plan[3].shape[0], H, seed=4, dtype=dtype)
    y[plan[3] < 0] = float("nan")  # padding / unused rows must never be read
    w = randn(T, k, seed=5).abs() if weighted else None
    out = ops.unpermute(y, plan[2], plan[3], w)
    exp = ref.unpermute(y.cpu(), plan[2].cpu(), plan[3].cpu(), None if w is None else w.cpu())
    assert out.dtype == dtype
    tol = (
        0 if dtype == torch.float32 and not weighted else (1e-6 if dtype == torch.float32 else 1e-2)
    )
    check_close(out.cpu(), exp, tol, "unpermute")
    again = ops.unpermute(y, plan[2], plan[3], w)
    assert torch.equal(out, again)  # deterministic: no atomics


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unpermute_backward(ops, ref, dtype, debug_mode):
    T, k, E, H = 9, 3, 5, 40
    plan = _plan(ref, T, k, E, 0, seed=6)
    y = randn(plan[3].shape[0], H, seed=7, dtype=dtype)
    g = randn(T, H, seed=8, dtype=dtype)
    w = randn(T, k, seed=9)
    gy, gw = ops.unpermute_backward(g, y, plan[2], plan[3], w, True, True)
    ey, ew = ref.unpermute_backward(
        g.cpu(), y.cpu(), plan[2].cpu(), plan[3].cpu(), w.cpu(), True, True
    )
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    check_close(gy.cpu(), ey, tol, "grad_y")
    check_close(gw.cpu(), ew, 1e-5, "grad_weights")
    assert gy.dtype == dtype and gw.dtype == w.dtype
    gy2, gw2 = ops.unpermute_backward(g, y, plan[2], plan[3], None, True, True)
    assert gw2.numel() == 0
    check_close(
        gy2.cpu(),
        ref.unpermute_backward(g.cpu(), y.cpu(), plan[2].cpu(), plan[3].cpu(), None, True, False)[
            0
        ],
        0,
        "grad_y no weights",
    )
