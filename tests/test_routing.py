"""route and RoutingPlan: the reference against the naive loop (``naive.py``), Hypothesis
properties on every backend, and every other backend's plan against the reference's (bitwise).

Properties checked on random routings, including the awkward ones (T = 0, E = 1, k = E, every pair
to one expert, empty experts, ids out of range, block_size 1 .. 128): counts equal bincount, offs
are the (padded) cumulative ends, row_of_slot and slot_of_row are inverse, stable order within an
expert, padding rows are -1, block_expert names each block's expert, outputs are deterministic.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from naive import naive_num_rows, naive_route
from testutil import (
    backend_cases,
    backends,
    device_of,
    fits,
    gen,
    op,
    random_ids,
    reference_only,
)
from torch.utils import _pytree as pytree

import moe_kernels
from moe_kernels import reference as ref

REF = "reference"
PLAN_FIELDS = ("tokens_per_expert", "offs", "row_of_slot", "slot_of_row")


def router_ids(T, k, E, seed, drop=0.0):
    """Distinct-per-token ids (like a router) with a fraction replaced by out-of-range ids."""
    g = gen(seed)
    if T == 0:
        return torch.empty(0, k, dtype=torch.int32)
    if k <= E:
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).reshape(T, k)
    else:
        ids = torch.randint(0, E, (T, k), generator=g)
    if drop:
        mask = torch.rand(T, k, generator=g) < drop
        bad = torch.where(torch.rand(T, k, generator=g) < 0.5, -1, E + 3)
        ids = torch.where(mask, bad, ids)
    return ids.to(torch.int32)


# ----------------------------------------------------------------------------------------------
# the reference against the naive loop
# ----------------------------------------------------------------------------------------------
def check_plan(plan, T, k, E, block_size, ids):
    nv = naive_route(ids, E, block_size)
    assert plan.num_rows == nv["num_rows"]
    for field in PLAN_FIELDS:
        got = getattr(plan, field)
        assert got.dtype == torch.int32, (field, got.dtype)
        assert got.device == ids.device, field
        assert torch.equal(got.cpu().long(), nv[field]), field
    if block_size:
        assert plan.block_expert.dtype == torch.int32
        assert torch.equal(plan.block_expert.cpu().long(), nv["block_expert"])
    else:
        be = plan.block_expert
        assert be is None or be.numel() == 0


NAIVE_CASES = [
    # (T, k, E, block_size, drop fraction)
    (13, 2, 8, None, 0.0),
    (13, 2, 8, 4, 0.0),
    (300, 8, 60, None, 0.0),
    (300, 8, 60, 16, 0.1),  # expert parallelism: some ids belong to other ranks
    (64, 8, 384, 64, 0.0),  # most experts empty
    (7, 5, 5, 1, 0.0),  # k = E
    (9, 1, 1, 3, 0.0),  # E = 1
    (17, 3, 6, 128, 0.3),
    (0, 4, 16, None, 0.0),  # T = 0
    (0, 4, 16, 8, 0.0),
]


@reference_only
@pytest.mark.parametrize("T,k,E,block_size,drop", NAIVE_CASES)
def test_reference_vs_naive(T, k, E, block_size, drop):
    ids = router_ids(T, k, E, seed=T * 31 + E, drop=drop)
    plan = moe_kernels.route(ids, E, block_size=block_size, backend=REF)
    check_plan(plan, T, k, E, block_size, ids)


@reference_only
def test_reference_int64_ids():
    ids = router_ids(11, 3, 7, seed=1).to(torch.int64)
    plan = moe_kernels.route(ids, 7, backend=REF)
    check_plan(plan, 11, 3, 7, None, ids)


@reference_only
def test_reference_all_to_one_expert():
    ids = torch.full((23, 2), 4, dtype=torch.int32)
    ids[:, 1] = 4  # duplicated slots to the same expert are still distinct pairs
    plan = moe_kernels.route(ids, 6, block_size=8, backend=REF)
    check_plan(plan, 23, 2, 6, 8, ids)


@reference_only
def test_routing_plan_is_frozen_pytree():
    ids = torch.tensor([[0, 2], [1, 2], [2, 0]], dtype=torch.int32)
    plan = moe_kernels.route(ids, 3, block_size=2, backend=REF)
    assert isinstance(plan, moe_kernels.RoutingPlan)
    assert dataclasses.is_dataclass(plan)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.offs = plan.offs  # type: ignore[misc]
    leaves, spec = pytree.tree_flatten(plan)
    assert any(leaf is plan.row_of_slot for leaf in leaves)
    rebuilt = pytree.tree_unflatten(leaves, spec)
    assert isinstance(rebuilt, moe_kernels.RoutingPlan)
    assert torch.equal(rebuilt.slot_of_row, plan.slot_of_row)
    assert rebuilt.num_rows == plan.num_rows
    assert type(plan).__doc__, "RoutingPlan needs a docstring"
    for name in PLAN_FIELDS:
        assert name in type(plan).__doc__, f"RoutingPlan docstring does not document {name}"


# ----------------------------------------------------------------------------------------------
# Hypothesis properties, every backend (the Triton interpreter runs the case table below instead)
# ----------------------------------------------------------------------------------------------
SETTINGS = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@st.composite
def routings(draw):
    """(ids int32 [T, k], E, block_size) with a mix of layouts."""
    E = draw(st.sampled_from([1, 2, 3, 5, 8, 16, 60]))
    k = draw(st.sampled_from(sorted({1, min(E, 2), min(E, 4), E})))
    T = draw(st.integers(0, 40))
    mode = draw(st.sampled_from(["uniform", "one_expert", "few_experts", "out_of_range", "dupes"]))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    if mode == "uniform":  # distinct experts per token, like a router
        ids = np.stack([rng.permutation(E)[:k] for _ in range(T)]) if T else np.zeros((0, k))
    elif mode == "one_expert":  # every pair to the same expert
        ids = np.full((T, k), draw(st.integers(0, E - 1)))
    elif mode == "few_experts":  # most experts empty
        ids = rng.choice(np.array(sorted({0, E // 2, E - 1})), size=(T, k))
    elif mode == "out_of_range":  # expert parallelism: -1 and >= E mean "not here"
        ids = rng.integers(-3, E + 3, size=(T, k))
    else:  # repeated ids inside a token: still distinct pairs
        ids = rng.integers(0, E, size=(T, k))
    block_size = draw(st.sampled_from([None, None, 1, 2, 3, 16, 64, 128]))
    return torch.from_numpy(np.asarray(ids, dtype=np.int32).reshape(T, k)), E, block_size


def expected_counts(ids, E):
    flat = ids.reshape(-1).long()
    valid = flat[(flat >= 0) & (flat < E)]
    return torch.bincount(valid, minlength=E)


def check_plan_properties(plan, ids, E, block_size):
    T, k = ids.shape
    counts = expected_counts(ids, E)
    bs = block_size or 0
    num_rows = naive_num_rows(T, k, E, bs)
    assert plan.num_rows == num_rows
    for name in PLAN_FIELDS:
        assert getattr(plan, name).dtype == torch.int32, name
    tpe = plan.tokens_per_expert.long()
    offs = plan.offs.long()
    ros = plan.row_of_slot.long()
    sor = plan.slot_of_row.long()
    assert tpe.shape == (E,) and offs.shape == (E,)
    assert ros.shape == (T, k) and sor.shape == (num_rows,)
    assert torch.equal(tpe, counts), "tokens_per_expert != bincount of the valid ids"
    seg = counts if not bs else (counts + bs - 1) // bs * bs
    assert torch.equal(offs, seg.cumsum(0)), "offs are not the (padded) cumulative ends"
    assert int(offs[-1]) <= num_rows

    flat_ids = ids.reshape(-1).long()
    kept = (flat_ids >= 0) & (flat_ids < E)
    flat_rows = ros.reshape(-1)
    assert torch.equal(flat_rows[~kept], torch.full_like(flat_rows[~kept], -1)), "dropped pair row"
    # inverse maps
    kept_slots = torch.nonzero(kept).reshape(-1)
    assert torch.equal(sor[flat_rows[kept]], kept_slots), "slot_of_row[row_of_slot] != slot"
    used = sor >= 0
    assert int(used.sum()) == int(kept.sum()), "rows used != pairs kept"
    assert torch.equal(flat_rows[sor[used]], torch.nonzero(used).reshape(-1))
    # each pair sits in its expert's segment, in the first counts[e] rows, in flat order
    starts = offs - seg
    for e in range(E):
        slots = torch.nonzero(flat_ids == e).reshape(-1)
        rows = flat_rows[slots]
        expect_rows = torch.arange(int(starts[e]), int(starts[e]) + len(slots))
        assert torch.equal(rows, expect_rows), f"expert {e}: rows not packed in stable order"
    # block_expert
    if bs:
        be = plan.block_expert.long()
        assert plan.block_expert.dtype == torch.int32
        assert be.shape == (num_rows // bs,)
        block_start = torch.arange(num_rows // bs) * bs
        expect_be = torch.full_like(be, -1)
        for e in range(E):
            inside = (block_start >= starts[e]) & (block_start < offs[e])
            expect_be[inside] = e
        assert torch.equal(be, expect_be)
    else:
        assert plan.block_expert is None or plan.block_expert.numel() == 0


def _i32(rows):
    return torch.tensor(rows, dtype=torch.int32)


# the awkward cases, always run (Hypothesis may or may not draw them)
EXAMPLES = [
    (torch.empty(0, 2, dtype=torch.int32), 4, None),  # T = 0
    (torch.empty(0, 3, dtype=torch.int32), 5, 16),  # T = 0, padded
    (_i32([[0], [0], [0]]), 1, None),  # E = 1
    (_i32([[0], [-1], [1]]), 1, 2),  # E = 1 with dropped ids
    (_i32([[2, 0, 1], [1, 2, 0]]), 3, None),  # k = E
    (_i32([[3, 3], [3, 3], [3, 3]]), 8, 4),  # all pairs to one expert, others empty
    (_i32([[-1, 9], [8, -7]]), 8, 4),  # every pair dropped
]

#: backends for the Hypothesis tests: every one but the interpreted Triton (too slow there)
PROPERTY_BACKENDS = [b for b in backends() if fits(b, False)]


def _plan_on(backend, ids, E, block_size):
    plan = moe_kernels.route(ids.to(device_of(backend)), E, block_size=block_size, backend=backend)
    return pytree.tree_map(lambda t: t.cpu() if torch.is_tensor(t) else t, plan)


@pytest.mark.parametrize("backend", PROPERTY_BACKENDS)
@SETTINGS
@given(r=routings())
@example(r=EXAMPLES[0])
@example(r=EXAMPLES[1])
@example(r=EXAMPLES[2])
@example(r=EXAMPLES[3])
@example(r=EXAMPLES[4])
@example(r=EXAMPLES[5])
@example(r=EXAMPLES[6])
def test_properties(backend, r):
    ids, E, block_size = r
    plan = _plan_on(backend, ids, E, block_size)
    check_plan_properties(plan, ids, E, block_size)
    again = _plan_on(backend, ids, E, block_size)
    for name in PLAN_FIELDS:
        assert torch.equal(getattr(plan, name), getattr(again, name))
    # int64 ids give the same plan
    plan64 = _plan_on(backend, ids.long(), E, block_size)
    assert torch.equal(plan64.row_of_slot, plan.row_of_slot)
    assert torch.equal(plan64.slot_of_row, plan.slot_of_row)


# ----------------------------------------------------------------------------------------------
# every backend's plan equals the reference's, bitwise
# ----------------------------------------------------------------------------------------------
# (T, k, E, block_size, ids, tiny)   why; ids: ("router", drop, one expert) draws distinct ids
# per token, ("uniform", low, high) draws each id uniformly (duplicates, out of range)
CASES = [
    (7, 2, 8, 0, ("router", 0.0, None), True),
    (300, 4, 60, 16, ("router", 0.1, None), False),  # padded, dropped ids, many empty blocks
    (1, 3, 3, 4, ("router", 0.0, None), True),  # T = 1, k = E
    (13, 1, 1, 0, ("router", 0.2, None), True),  # E = 1 with drops
    (50, 2, 16, 8, ("router", 0.0, 5), True),  # all tokens on one expert
    (0, 2, 4, 4, ("router", 0.0, None), True),  # T = 0
    (13, 2, 5, 0, ("uniform", 0, 5), True),  # unpadded, T not a multiple of anything
    (13, 2, 5, 16, ("uniform", 0, 5), True),  # padded layout for the GEMM
    (50, 3, 7, 16, ("uniform", -2, 9), True),  # several chunks; ids out of range dropped
    (9, 4, 4, 8, ("uniform", 0, 4), True),  # k = E (ids random: duplicates, empty experts)
    (20, 1, 3, 0, ("uniform", 0, 1), True),  # all tokens to one expert, k = 1
    (6, 2, 1, 4, ("uniform", 0, 1), True),  # E = 1
    (0, 2, 6, 16, ("uniform", 0, 6), True),  # T = 0: no rows
    (17, 2, 60, 0, ("uniform", 0, 60), True),  # E not a power of two, most experts empty
    (257, 8, 60, 0, ("uniform", -1, 61), False),  # many tokens, ids out of range both sides
    (257, 8, 60, 4, ("uniform", -1, 61), False),
]


def case_ids(case, seed):
    T, k, E, _, (kind, a, b), _ = case
    if kind == "router":
        return random_ids(T, k, E, seed, drop=a, one_expert=b)
    return torch.randint(a, b, (T, k), generator=gen(seed), dtype=torch.int32)


@pytest.mark.parametrize(
    "backend,case",
    backend_cases(CASES, lambda c: c[5], lambda c: "T{}-k{}-E{}-bs{}-{}".format(*c[:4], c[4][0])),
)
def test_backend_vs_reference(backend, case, debug_mode):
    T, k, E, bs = case[:4]
    ids = case_ids(case, seed=T + 17 * k + E)
    got = op("route", backend)(ids.to(device_of(backend)), E, bs)
    want = ref.route(ids, E, bs)
    names = (*PLAN_FIELDS, "block_expert")
    for name, a, b in zip(names, got, want, strict=True):
        assert a.dtype == torch.int32, name
        assert torch.equal(a.cpu(), b), f"{name}: {a.cpu().tolist()} != {b.tolist()}"


@pytest.mark.skipif("triton" not in backends(), reason="triton is not under test here")
def test_triton_many_chunks_int64_ids(monkeypatch):
    """Small chunks so several chunks hold pairs of the same expert (the cross-chunk scan)."""
    from moe_kernels.triton_kernels import ops as triton_ops

    monkeypatch.setitem(triton_ops.ROUTE_CHUNK, "interpreter", 16)
    monkeypatch.setitem(triton_ops.ROUTE_CHUNK, "gpu", 16)
    ids = torch.randint(0, 3, (40, 2), generator=gen(4))
    ids[5, 1] = 2**40  # out of range even for int32: dropped, not wrapped
    for bs in (0, 8):
        got = op("route", "triton")(ids.to(device_of("triton")), 3, bs)
        for a, b in zip(got, ref.route(ids, 3, bs), strict=True):
            assert torch.equal(a.cpu(), b)
