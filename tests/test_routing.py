"""Property tests (Hypothesis) of route / permute / unpermute on every usable CPU backend.

Properties checked on random routings, including the awkward ones (T = 0, E = 1, k = E, every pair
to one expert, empty experts, ids out of range, block_size 1 .. 128):
counts equal bincount, offs are the (padded) cumulative ends, row_of_slot and slot_of_row are
inverse, stable order within an expert, padding rows are -1, block_expert names each block's
expert, permute is an exact gather with zero padding, unpermute(permute(x)) round-trips, outputs
are bitwise deterministic.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from naive import round_up
from testutil import available_backends_list

import moe_kernels

BACKENDS = available_backends_list("cpu")

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
    num_rows = T * k if not bs else round_up(T * k + E * (bs - 1), bs)
    assert plan.num_rows == num_rows
    for name in ("tokens_per_expert", "offs", "row_of_slot", "slot_of_row"):
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


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(r=routings())
@example(r=EXAMPLES[0])
@example(r=EXAMPLES[1])
@example(r=EXAMPLES[2])
@example(r=EXAMPLES[3])
@example(r=EXAMPLES[4])
@example(r=EXAMPLES[5])
@example(r=EXAMPLES[6])
def test_route_properties(backend, r):
    ids, E, block_size = r
    plan = moe_kernels.route(ids, E, block_size=block_size, backend=backend)
    check_plan_properties(plan, ids, E, block_size)
    again = moe_kernels.route(ids, E, block_size=block_size, backend=backend)
    for name in ("tokens_per_expert", "offs", "row_of_slot", "slot_of_row"):
        assert torch.equal(getattr(plan, name), getattr(again, name))
    # int64 ids give the same plan
    plan64 = moe_kernels.route(ids.long(), E, block_size=block_size, backend=backend)
    assert torch.equal(plan64.row_of_slot, plan.row_of_slot)
    assert torch.equal(plan64.slot_of_row, plan.slot_of_row)


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(
    r=routings(),
    H=st.sampled_from([1, 3, 8, 33]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
    seed=st.integers(0, 1000),
)
@example(r=EXAMPLES[0], H=3, dtype=torch.float32, seed=0)
@example(r=EXAMPLES[3], H=8, dtype=torch.bfloat16, seed=1)
@example(r=EXAMPLES[4], H=1, dtype=torch.float32, seed=2)
@example(r=EXAMPLES[5], H=33, dtype=torch.float32, seed=3)
@example(r=EXAMPLES[6], H=8, dtype=torch.float32, seed=4)
def test_permute_unpermute_properties(backend, r, H, dtype, seed, monkeypatch):
    monkeypatch.setenv("MOE_KERNELS_DEBUG", "1")  # outputs NaN-filled: a missed write shows
    ids, E, block_size = r
    T, k = ids.shape
    if dtype == torch.float64 and backend != "reference":
        dtype = torch.float32  # float64 is a reference-only dtype
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(T, H, generator=g) + 0.5).to(dtype)
    plan = moe_kernels.route(ids, E, block_size=block_size, backend="reference")
    y = moe_kernels.permute(x, plan, backend=backend)
    assert y.shape == (plan.num_rows, H) and y.dtype == dtype
    sor = plan.slot_of_row.long()
    used = sor >= 0
    # exact gather, zeros elsewhere
    assert torch.equal(y[used], x[sor[used] // k])
    assert torch.equal(y[~used], torch.zeros_like(y[~used]))

    # round trip with one-hot weights on each token's first kept slot: exactly x (or 0)
    ros = plan.row_of_slot.long()
    kept = ros >= 0
    first = torch.zeros(T, k, dtype=torch.bool)
    if T:
        idx = torch.where(kept.any(1), kept.int().argmax(1), torch.zeros(T, dtype=torch.long))
        first[torch.arange(T), idx] = True
        first &= kept
    w = first.float()
    back = moe_kernels.unpermute(y, plan, w, backend=backend)
    assert back.dtype == dtype and back.shape == (T, H)
    expect = torch.where(kept.any(1, keepdim=True), x, torch.zeros_like(x))
    assert torch.equal(back, expect), "unpermute(permute(x)) with one-hot weights != x"

    # no weights: each token gets (its number of kept slots) * x, up to one rounding
    back1 = moe_kernels.unpermute(y, plan, backend=backend)
    nkept = kept.sum(1, keepdim=True).to(torch.float64)
    ref = x.double() * nkept
    tol = torch.finfo(dtype).eps * nkept * ref.abs() + 1e-300
    assert ((back1.double() - ref).abs() <= tol).all()
    # bitwise deterministic
    assert torch.equal(back1, moe_kernels.unpermute(y, plan, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block_size", [None, 4])
def test_backends_agree_with_reference_plan(backend, block_size):
    """Every backend's plan is identical (bitwise) to the reference's."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(-1, 61, (257, 8), generator=g, dtype=torch.int32)
    ref = moe_kernels.route(ids, 60, block_size=block_size, backend="reference")
    got = moe_kernels.route(ids, 60, block_size=block_size, backend=backend)
    assert got.num_rows == ref.num_rows
    for name in ("tokens_per_expert", "offs", "row_of_slot", "slot_of_row"):
        assert torch.equal(getattr(got, name), getattr(ref, name)), name
    if block_size:
        assert torch.equal(got.block_expert, ref.block_expert)


def test_routing_plan_is_frozen_pytree():
    import dataclasses

    from torch.utils import _pytree as pytree

    ids = torch.tensor([[0, 2], [1, 2], [2, 0]], dtype=torch.int32)
    plan = moe_kernels.route(ids, 3, block_size=2, backend="reference")
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
    for name in ("tokens_per_expert", "offs", "row_of_slot", "slot_of_row"):
        assert type(plan).__doc__, "RoutingPlan needs a docstring"
        assert name in type(plan).__doc__, f"RoutingPlan docstring does not document {name}"
