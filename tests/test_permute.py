"""permute / unpermute: the reference against the naive loops (``naive.py``) and by finite
differences, Hypothesis properties on every backend, and every other backend against the
reference (forward, backward, gradients through autograd), with poisoned outputs.

permute is a gather: compared bit for bit.  unpermute sums the k slots of a token in fp32 in slot
order: within an error bound derived from the dtype, bitwise reproducible.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from naive import naive_permute, naive_unpermute
from test_routing import EXAMPLES, PROPERTY_BACKENDS, SETTINGS, router_ids, routings
from testutil import (
    backend_cases,
    backends,
    check_vs_reference,
    device_of,
    gen,
    op,
    randn,
    random_ids,
    reference_only,
)
from torch.autograd import gradcheck

import moe_kernels
from moe_kernels import reference as ref
from moe_kernels._tolerances import UNIT_ROUNDOFF

REF = "reference"
F64 = torch.float64
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def leaf(t):
    return t.detach().clone().requires_grad_(True)


def check_unpermute(out, y, row_of_slot, weights):
    """Error bound of fp32 (fp64 for fp64 inputs) accumulation plus one rounding to y.dtype."""
    expect = naive_unpermute(y, row_of_slot, weights)
    mag = naive_unpermute(y.abs(), row_of_slot, None if weights is None else weights.abs())
    u_out = UNIT_ROUNDOFF[y.dtype]
    u_acc = min(UNIT_ROUNDOFF[torch.float32], u_out)
    k = row_of_slot.shape[1]
    bound = u_out * expect.abs() + (k + 1) * u_acc * mag + 1e-300
    assert not torch.isnan(out).any(), "NaN in unpermute output"
    err = (out.double() - expect).abs()
    assert (err <= bound).all(), f"unpermute error {(err / bound).max():.2f}x the bound"


# ----------------------------------------------------------------------------------------------
# the reference against the naive loops, and its gradients
# ----------------------------------------------------------------------------------------------
@reference_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("block_size", [None, 8])
def test_reference_vs_naive(dtype, block_size):
    T, k, E, H = 29, 3, 7, 24
    ids = router_ids(T, k, E, seed=2, drop=0.15)
    plan = moe_kernels.route(ids, E, block_size=block_size, backend=REF)
    x = randn(T, H, seed=3, dtype=dtype)
    y = moe_kernels.permute(x, plan, backend=REF)
    assert y.dtype == dtype and y.shape == (plan.num_rows, H)
    # a gather: bit-exact, zeros in padding and unused rows
    assert torch.equal(y.double(), naive_permute(x, plan.slot_of_row, k))

    yy = randn(plan.num_rows, H, seed=4, dtype=dtype)
    w = torch.rand(T, k, generator=gen(5))
    for weights in (None, w):
        out = moe_kernels.unpermute(yy, plan, weights, backend=REF)
        assert out.dtype == dtype and out.shape == (T, H)
        check_unpermute(out, yy, plan.row_of_slot, weights)


@reference_only
def test_reference_unpermute_accumulates_in_fp32():
    """k = 8 bf16 terms: a bf16 accumulator would be visibly worse than fp32 + one rounding."""
    T, k, E, H = 64, 8, 8, 32
    ids = torch.stack([torch.randperm(E, generator=gen(t)) for t in range(T)]).to(torch.int32)
    plan = moe_kernels.route(ids, E, backend=REF)
    y = randn(plan.num_rows, H, seed=9, dtype=torch.bfloat16)
    w = torch.rand(T, k, generator=gen(10))
    out = moe_kernels.unpermute(y, plan, w, backend=REF)
    check_unpermute(out, y, plan.row_of_slot, w)
    # the bound discriminates: summing the same terms in bf16 would break it
    terms = y[plan.row_of_slot.long()] * w.to(torch.bfloat16)[..., None]  # [T, k, H] bf16
    acc = terms[:, 0]
    for s in range(1, k):
        acc = acc + terms[:, s]
    with pytest.raises(AssertionError):
        check_unpermute(acc, y, plan.row_of_slot, w)


@reference_only
def test_reference_unpermute_without_weights_sums_slots():
    T, E, H = 10, 4, 6
    ids = torch.stack([torch.randperm(E, generator=gen(t)) for t in range(T)]).to(torch.int32)
    plan = moe_kernels.route(ids, E, backend=REF)
    x = randn(T, H, seed=1, dtype=F64)
    out = moe_kernels.unpermute(moe_kernels.permute(x, plan, backend=REF), plan, backend=REF)
    # x + x + x + x in float64 is exact
    assert torch.equal(out, 4 * x)


@reference_only
@pytest.mark.parametrize("block_size", [None, 4])
def test_reference_permute_gradcheck(block_size):
    ids = router_ids(6, 2, 5, seed=2, drop=0.25)
    plan = moe_kernels.route(ids, 5, block_size=block_size, backend=REF)
    x = leaf(randn(6, 3, seed=4, dtype=F64))
    assert gradcheck(lambda x: moe_kernels.permute(x, plan, backend=REF), (x,))


@reference_only
@pytest.mark.parametrize("block_size", [None, 4])
@pytest.mark.parametrize("with_weights", [True, False])
def test_reference_unpermute_gradcheck(block_size, with_weights):
    ids = router_ids(6, 3, 5, seed=5, drop=0.25)
    plan = moe_kernels.route(ids, 5, block_size=block_size, backend=REF)
    y = leaf(randn(plan.num_rows, 4, seed=6, dtype=F64))
    if with_weights:
        w = leaf(torch.rand(6, 3, generator=gen(7), dtype=F64))
        assert gradcheck(lambda y, w: moe_kernels.unpermute(y, plan, w, backend=REF), (y, w))
    else:
        assert gradcheck(lambda y: moe_kernels.unpermute(y, plan, backend=REF), (y,))


@pytest.mark.parametrize("backend", backends())
def test_unpermute_zero_grads_where_unused(backend, debug_mode):
    """Padding / unused rows get exactly zero gradient, dropped pairs exactly zero weight
    gradient (poisoned outputs on the compiled and Triton backends: each must be written)."""
    dev = device_of(backend)
    dtype = F64 if backend == REF else torch.float32
    ids = router_ids(8, 2, 6, seed=8, drop=0.3)
    plan = moe_kernels.route(ids.to(dev), 6, block_size=4, backend=REF)
    y = leaf(randn(plan.num_rows, 5, seed=9, dtype=dtype).to(dev))
    w = leaf(torch.rand(8, 2, generator=gen(10), dtype=dtype).to(dev))
    out = moe_kernels.unpermute(y, plan, w, backend=backend)
    out.backward(randn(*out.shape, seed=11, dtype=dtype).to(dev))
    unused = plan.slot_of_row < 0
    dropped = plan.row_of_slot < 0
    assert unused.any() and dropped.any()
    assert (y.grad[unused] == 0).all(), "padding/unused rows got a gradient"
    assert (w.grad[dropped] == 0).all(), "dropped pairs got a routing-weight gradient"
    assert not torch.isnan(y.grad).any() and not torch.isnan(w.grad).any()


# ----------------------------------------------------------------------------------------------
# Hypothesis properties, every backend (not the interpreted Triton)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", PROPERTY_BACKENDS)
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
def test_properties(backend, r, H, dtype, seed, debug_mode):
    ids, E, block_size = r
    T, k = ids.shape
    dev = device_of(backend)
    if dtype == F64 and backend != REF:
        dtype = torch.float32  # float64 is a reference-only dtype
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(T, H, generator=g) + 0.5).to(dtype)
    plan = moe_kernels.route(ids, E, block_size=block_size, backend=REF)
    y = moe_kernels.permute(x.to(dev), _on(plan, dev), backend=backend).cpu()
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
    back = moe_kernels.unpermute(y.to(dev), _on(plan, dev), w.to(dev), backend=backend).cpu()
    assert back.dtype == dtype and back.shape == (T, H)
    expect = torch.where(kept.any(1, keepdim=True), x, torch.zeros_like(x))
    assert torch.equal(back, expect), "unpermute(permute(x)) with one-hot weights != x"

    # no weights: each token gets (its number of kept slots) * x, up to one rounding
    back1 = moe_kernels.unpermute(y.to(dev), _on(plan, dev), backend=backend).cpu()
    nkept = kept.sum(1, keepdim=True).to(F64)
    want = x.double() * nkept
    tol = torch.finfo(dtype).eps * nkept * want.abs() + 1e-300
    assert ((back1.double() - want).abs() <= tol).all()
    # bitwise deterministic
    assert torch.equal(
        back1, moe_kernels.unpermute(y.to(dev), _on(plan, dev), backend=backend).cpu()
    )


def _on(plan, dev):
    from torch.utils import _pytree as pytree

    return pytree.tree_map(lambda t: t.to(dev) if torch.is_tensor(t) else t, plan)


# ----------------------------------------------------------------------------------------------
# every backend against the reference
# ----------------------------------------------------------------------------------------------
# (T, k, E, block_size, drop, one_expert, H, tiny)   why
CASES = [
    (7, 2, 8, 0, 0.0, None, 37, True),  # H odd
    (300, 4, 60, 16, 0.1, None, 37, False),  # padded, dropped ids, many empty blocks
    (1, 3, 3, 4, 0.0, None, 37, True),  # T = 1, k = E
    (13, 1, 1, 0, 0.2, None, 37, True),  # E = 1 with drops
    (50, 2, 16, 8, 0.0, 5, 37, False),  # all tokens on one expert
    (0, 2, 4, 4, 0.0, None, 37, True),  # T = 0
    (13, 3, 5, 16, 0.2, None, 40, True),  # padded, a row block of 40 columns
    (11, 2, 4, 8, 0.2, None, 24, True),  # padded, dropped pairs
    (9, 3, 5, 0, 0.2, None, 40, True),  # unpadded, dropped pairs
]


def _case_id(c):
    return "T{}-k{}-E{}-bs{}-H{}".format(*c[:4], c[6])


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("backend,case", backend_cases(CASES, lambda c: c[7], _case_id))
def test_backend_vs_reference(backend, case, dtype, debug_mode):
    T, k, E, bs, drop, one, H, _ = case
    dev = device_of(backend)
    g = gen(T + 17 * k + E)
    ids = random_ids(T, k, E, seed=T + 17 * k + E, drop=drop, one_expert=one)
    _, _, ros, sor, _ = ref.route(ids, E, bs)
    dros, dsor = ros.to(dev), sor.to(dev)

    x = torch.randn(T, H, generator=g).to(dtype)
    p = op("permute", backend)(x.to(dev), dros, dsor)
    assert p.dtype == dtype
    assert torch.equal(p.cpu(), ref.permute(x, ros, sor)), "permute is not an exact gather"

    y = torch.randn(sor.shape[0], H, generator=g).to(dtype)
    y[sor < 0] = float("nan")  # padding / unused rows must never be read
    w = torch.rand(T, k, generator=g)
    for tw in (w, None):
        dtw = None if tw is None else tw.to(dev)
        out = op("unpermute", backend)(y.to(dev), dros, dsor, dtw)
        rout = ref.unpermute(y, ros, sor, tw)
        truth = ref.unpermute(y.double(), ros, sor, None if tw is None else tw.double())
        check_vs_reference(out.cpu(), rout, truth, dtype, "unpermute")
        if tw is None and dtype == torch.float32:  # fp32 sums in slot order: the same bits
            assert torch.equal(out.cpu(), rout), "unweighted fp32 unpermute differs from reference"
        again = op("unpermute", backend)(y.to(dev), dros, dsor, dtw)
        assert torch.equal(out, again), "unpermute is not bitwise reproducible"

        yb = torch.randn(sor.shape[0], H, generator=g).to(dtype)
        go = torch.randn(T, H, generator=g).to(dtype)
        gy, gw = op("unpermute_backward", backend)(
            go.to(dev), yb.to(dev), dros, dsor, dtw, True, True
        )
        rgy, rgw = ref.unpermute_backward(go, yb, ros, sor, tw, True, True)
        tgy, tgw = ref.unpermute_backward(
            go.double(), yb.double(), ros, sor, None if tw is None else tw.double(), True, True
        )
        check_vs_reference(gy.cpu(), rgy, tgy, dtype, "grad_y")
        if tw is None:
            assert gw.numel() == 0
        else:
            assert gw.dtype == tw.dtype
            # a dot over H of two dtype rows, accumulated in fp32, output fp32
            floor_dtype = torch.float32 if dtype == torch.float32 else dtype
            check_vs_reference(gw.cpu(), rgw, tgw, floor_dtype, "grad_w")
        gy2, gw2 = op("unpermute_backward", backend)(
            go.to(dev), yb.to(dev), dros, dsor, dtw, False, False
        )
        assert gy2.numel() == 0 and gw2.numel() == 0


@pytest.mark.parametrize("backend", backends(reference=False))
def test_backend_grads_match_reference(backend):
    """Through autograd (the public API): fp32 gradients of permute and unpermute against the
    float64 reference's."""
    dev = device_of(backend)
    T, H, E, k = 13, 16, 5, 2
    ids = router_ids(T, k, E, seed=21, drop=0.2)
    plan = moe_kernels.route(ids, E, block_size=4, backend=REF)
    tw = torch.rand(T, k, generator=gen(25)) + 0.1
    x, y = randn(T, H, seed=22), randn(plan.num_rows, H, seed=29)
    go_p, go_u = randn(plan.num_rows, H, seed=99), randn(T, H, seed=98)

    def grads(b, dtype, d):
        pl = _on(plan, d)
        xl = leaf(x.to(d, dtype))
        moe_kernels.permute(xl, pl, backend=b).backward(go_p.to(d, dtype))
        yl, wl = leaf(y.to(d, dtype)), leaf(tw.to(d, dtype))
        moe_kernels.unpermute(yl, pl, wl, backend=b).backward(go_u.to(d, dtype))
        return [t.grad.cpu() for t in (xl, yl, wl)]

    got = grads(backend, torch.float32, dev)
    same = grads(REF, torch.float32, "cpu")
    exact = grads(REF, F64, "cpu")
    for name, g, s, e in zip(("x", "y", "topk_weights"), got, same, exact, strict=True):
        check_vs_reference(g, s, e, torch.float32, f"grad of {name}")
