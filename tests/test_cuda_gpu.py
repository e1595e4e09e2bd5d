"""The cuda backend (``moe_kernels._C_cuda``) on a GPU (``gpu`` marker; skipped without a device).

The op modules already run their case tables on the cuda backend where a device is present; this
module adds what only a device can show about the CUDA kernels:

* every part-1 op (``topk_gating``, ``route``, ``permute``, ``unpermute`` and their backward
  ops) against the reference run on CPU, in bf16, fp16 and fp32, on edge cases: T = 0 and 1,
  E from 1 to 1024 (512 is the largest the kernels promise a fast path for), k up to 32, expert
  groups, sigmoid scoring with a correction bias, NaN / inf logits, padded routes, ids outside
  [0, E) (int64 ones past 2**32 included: a kernel that truncated them to 32 bits would keep
  them), odd H and misaligned views of x for the 16-byte vectorised copies;
* the cuda backend against the Triton one on the same inputs;
* two runs give the same bits;
* no host synchronisation on any op path (``torch.cuda.set_sync_debug_mode("error")``, debug
  mode off);
* autograd and ``torch.compile`` through the real engine on CUDA tensors;
* a 64-bit offset case (T*k*H > 2**31 elements), skipped when the device lacks the memory.

Outputs are allocated NaN-filled (the ``debug_mode`` fixture) where they are compared, so an
element a kernel never writes fails.  ``make test-sanitizer`` runs this module (with the other
``gpu`` tests) under compute-sanitizer's memcheck and racecheck; there
``MOE_KERNELS_TEST_SANITIZER=1`` skips the model-sized and 64-bit cases (hours under the tools;
the smaller cases run the same kernels).
"""

# ruff: noqa: E741  (I is the expert intermediate size, as everywhere in the package)
from __future__ import annotations

import os

import pytest
import torch
from testutil import check_vs_reference, cuda_backend_marks, gen, op, randn, random_ids

import moe_kernels
from moe_kernels import _debug
from moe_kernels import reference as ref
from moe_kernels._tolerances import (
    FP32_AGREE,
    FP32_AGREE_GRAD,
    GATING_TOL,
    ROUNDING_TOL,
    max_rel_err,
)

CUDA = "cuda"
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
DTYPE_IDS = ["bf16", "fp16", "fp32"]
SANITIZER = os.environ.get("MOE_KERNELS_TEST_SANITIZER", "0") not in ("", "0")
NAN, INF = float("nan"), float("inf")


pytestmark = cuda_backend_marks()

big = pytest.mark.skipif(SANITIZER, reason="model-sized: too slow under compute-sanitizer")


def _triton_ok() -> bool:
    return moe_kernels.available_backends()["triton"][0]


def dev(*ts, device=CUDA):
    out = [None if t is None else t.to(device) for t in ts]
    return out[0] if len(out) == 1 else out


# ----------------------------------------------------------------------------------------------
# topk_gating
# ----------------------------------------------------------------------------------------------
def ambiguous_rows(logits, bias, k, scoring, G, TG) -> torch.Tensor:
    """Rows whose ids the spec leaves to rounding: two selection scores next to each other in
    the order (within the chosen k or across its boundary), or two group values across the kept
    groups' boundary, within 1e-6 relative (a few fp32 roundoffs: two fp32 evaluations of the
    same formula may order them either way).  Ties of identical inputs are not ambiguous: every
    backend computes the same value for them and keeps the lower index."""
    x = logits.float()
    s = torch.softmax(x, -1) if scoring == "softmax" else torch.sigmoid(x)
    b = torch.zeros(x.shape[1]) if bias is None else bias.float()
    sel = s + b
    T, E = sel.shape

    def near(vals, same, upto):
        if upto <= 0:
            return torch.zeros(T, dtype=torch.bool)
        a, c = vals[:, :upto], vals[:, 1 : upto + 1]
        close = (a - c).abs() <= 1e-6 * a.abs().clamp_min(1e-30)
        return (close & ~same[:, :upto]).any(1)

    def same_inputs(idx):  # idx [T, n]: whether each adjacent pair has identical (logit, bias)
        xi, bi = x.gather(1, idx), b[idx]
        return (xi[:, :-1] == xi[:, 1:]) & (bi[:, :-1] == bi[:, 1:])

    amb = torch.zeros(T, dtype=torch.bool)
    if G:
        gsz = E // G
        top = sel.view(T, G, gsz).topk(min(2, gsz), dim=-1)
        gval = top.values.sum(-1)
        gv, gi = gval.sort(dim=1, descending=True, stable=True)
        # identical groups: the same (logit, bias) pairs as their top-2
        members = top.indices + (torch.arange(G) * gsz)[None, :, None]  # [T, G, 2] expert ids
        key_x, key_b = x.gather(1, members.view(T, -1)).view(T, G, -1), b[members]
        kx, kb = (
            key_x.gather(1, gi[..., None].expand_as(key_x)),
            key_b.gather(1, gi[..., None].expand_as(key_b)),
        )
        same_g = ((kx[:, :-1] == kx[:, 1:]) & (kb[:, :-1] == kb[:, 1:])).all(-1)
        amb |= near(gv, same_g, min(TG, G - 1))
        kept = torch.zeros(T, G, dtype=torch.bool).scatter_(1, gi[:, :TG], True)
        sel = sel.masked_fill(~kept.repeat_interleave(gsz, dim=1), -INF)
    v, i = sel.sort(dim=1, descending=True, stable=True)
    amb |= near(v, same_inputs(i), min(k, E - 1))
    return amb


def check_gating(backend, device, logits, k, scoring, renorm, bias, G, TG, scale, what=""):
    """One topk_gating call (forward and backward op) against the CPU reference."""
    T, E = logits.shape
    w, ids = moe_kernels.topk_gating(
        dev(logits, device=device),
        k,
        scoring=scoring,
        renormalize=renorm,
        correction_bias=dev(bias, device=device),
        num_expert_groups=G or None,
        topk_groups=TG or None,
        routed_scaling_factor=scale,
        backend=backend,
    )
    assert w.device.type == device and ids.device.type == device
    assert w.dtype == torch.float32 and ids.dtype == torch.int32
    assert tuple(w.shape) == tuple(ids.shape) == (T, k)
    w, ids = w.cpu(), ids.cpu()
    rw, rids = ref.topk_gating(logits, k, scoring, renorm, bias, G, TG, scale)
    # every row: k distinct valid experts
    assert bool(((ids >= 0) & (ids < E)).all()), f"{what}: ids outside [0, {E})"
    if T and k > 1:
        assert bool((ids.sort(1).values.diff(1) != 0).all()), f"{what}: an expert chosen twice"
    ok = ~ambiguous_rows(logits, bias, k, scoring, G, TG)
    assert T == 0 or ok.float().mean() >= 0.8, f"{what}: too few unambiguous rows to test"
    bad = (ids[ok] != rids[ok]).any(1)
    assert not bad.any(), f"{what}: {int(bad.sum())} rows with other ids than the reference's"
    torch.testing.assert_close(w[ok], rw[ok], rtol=GATING_TOL, atol=GATING_TOL / 10)
    # backward on the reference's ids
    gw = torch.randn(T, k, generator=gen(T + k))
    gl = op("topk_gating_backward", backend)(
        *dev(gw, logits, rids, device=device), scoring, renorm, scale
    )
    assert gl.dtype == logits.dtype and gl.device.type == device
    rgl = ref.topk_gating_backward(gw, logits, rids, scoring, renorm, scale)
    truth = ref.topk_gating_backward(gw.double(), logits.double(), rids, scoring, renorm, scale)
    check_vs_reference(gl.cpu(), rgl, truth, logits.dtype, f"{what} grad_logits")
    return w, ids


# (T, E, k, scoring, renormalize, bias, groups, topk_groups, scale, model-sized)   why
GATING_CASES = [
    (0, 64, 4, "softmax", True, False, 0, 0, 1.0, False),  # T = 0
    (1, 8, 2, "softmax", True, False, 0, 0, 1.0, False),  # T = 1 (decode)
    (1, 512, 32, "sigmoid", True, True, 0, 0, 2.5, False),  # T = 1 at the largest E and k
    (7, 1, 1, "sigmoid", False, False, 0, 0, 1.0, False),  # E = 1
    (5, 16, 16, "softmax", True, False, 0, 0, 1.0, False),  # k = E
    (1000, 8, 2, "softmax", True, False, 0, 0, 1.0, False),  # Mixtral: several rows per warp
    (257, 31, 3, "softmax", False, False, 0, 0, 1.0, False),  # E just under a warp
    (257, 32, 4, "sigmoid", True, True, 0, 0, 1.0, False),  # one expert per lane
    (129, 33, 5, "softmax", True, False, 0, 0, 1.0, False),  # E just over a warp
    (300, 60, 4, "softmax", False, False, 0, 0, 1.0, False),  # Qwen1.5-MoE
    (100, 128, 8, "softmax", True, False, 0, 0, 1.0, False),  # Qwen3-MoE
    (64, 160, 6, "softmax", False, False, 8, 3, 16.0, False),  # DeepSeek-V2: softmax groups
    (64, 256, 8, "sigmoid", True, True, 8, 4, 2.5, False),  # DeepSeek-V3
    (33, 384, 8, "sigmoid", True, True, 1, 1, 2.827, False),  # Kimi K2
    (17, 512, 32, "softmax", True, False, 0, 0, 1.0, False),  # the largest promised E, k
    (9, 512, 32, "sigmoid", True, True, 16, 8, 1.0, False),  # ... with groups and a bias
    (12, 96, 12, "sigmoid", True, True, 96, 20, 1.0, False),  # groups of one expert
    (5, 1024, 8, "softmax", True, False, 0, 0, 1.0, False),  # larger E (may take a slower path)
    (3, 1024, 32, "sigmoid", True, True, 32, 8, 1.0, False),  # ... with groups and a bias
    (8192, 256, 8, "sigmoid", True, True, 8, 4, 2.5, True),  # a prefill batch, DeepSeek-V3
]


def _gating_id(c):
    return f"T{c[0]}-E{c[1]}-k{c[2]}-{c[3]}-g{c[6]}"


def _gating_params():
    return [pytest.param(c, marks=[big] if c[9] else [], id=_gating_id(c)) for c in GATING_CASES]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", _gating_params())
def test_gating_vs_reference(case, dtype, debug_mode):
    T, E, k, scoring, renorm, use_bias, G, TG, scale, _ = case
    logits = randn(T, E, seed=T * 7 + E, dtype=dtype, scale=2.0)
    bias = randn(E, seed=E + 3, scale=0.1) if use_bias else None
    check_gating(CUDA, CUDA, logits, k, scoring, renorm, bias, G, TG, scale, _gating_id(case))


def special_logits(T: int, E: int, dtype) -> torch.Tensor:
    """[T, E] logits with NaN, +inf and -inf at positions spread over the lanes of a warp and
    over the elements each lane holds (E > 32), rows all NaN / +inf / -inf / equal."""
    x = randn(T, E, seed=E, dtype=torch.float32)
    g = gen(E + 1)
    for r in range(4, T):
        n = int(torch.randint(1, 4, (1,), generator=g))
        cols = torch.randperm(E, generator=g)[:n]
        vals = torch.tensor([NAN, INF, -INF])[torch.randint(0, 3, (n,), generator=g)]
        x[r, cols] = vals
    x[0] = NAN
    x[1] = INF
    x[2] = -INF
    x[3] = 0.25
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize(
    "E,k,G,TG", [(8, 3, 0, 0), (64, 6, 8, 3), (512, 32, 0, 0), (1024, 8, 0, 0)]
)
@pytest.mark.parametrize("bias", ["none", "nan"])
def test_gating_nonfinite_logits(E, k, G, TG, scoring, dtype, bias, debug_mode):
    """The NaN/inf policy (the reference's order: NaN above +inf, ties to the lower index) at
    every E: ids equal to the reference's, NaN weights exactly where the reference's are."""
    T = 40
    logits = special_logits(T, E, dtype)
    b = None
    if bias == "nan":
        b = randn(E, seed=5, scale=0.1)
        b[1], b[E // 2] = NAN, INF
    kw = dict(
        scoring=scoring,
        correction_bias=b,
        num_expert_groups=G or None,
        topk_groups=TG or None,
    )
    w, ids = moe_kernels.topk_gating(dev(logits), k, backend=CUDA, **dev_kw(kw))
    rw, rids = moe_kernels.topk_gating(logits, k, backend="reference", **kw)
    w, ids = w.cpu(), ids.cpu()
    assert torch.equal(ids, rids), f"ids differ from the reference's:\n{ids}\n{rids}"
    assert bool(((ids >= 0) & (ids < E)).all())
    assert torch.equal(torch.isnan(w), torch.isnan(rw))
    assert max_rel_err(w, rw) <= GATING_TOL


def dev_kw(kw):
    return {n: (v.to(CUDA) if isinstance(v, torch.Tensor) else v) for n, v in kw.items()}


# ----------------------------------------------------------------------------------------------
# route
# ----------------------------------------------------------------------------------------------
# (T, k, E, block_size, drop, one_expert, model-sized)   why
ROUTE_CASES = [
    (0, 4, 8, None, 0.0, None, False),  # T = 0
    (0, 4, 8, 16, 0.0, None, False),  # T = 0, padded: every row is padding
    (1, 1, 1, None, 0.0, None, False),  # the smallest plan
    (1, 8, 64, 16, 0.0, None, False),  # decode, padded
    (37, 4, 60, None, 0.3, None, False),  # dropped ids (-1 and >= E)
    (37, 4, 60, 8, 0.3, None, False),  # ... padded
    (500, 2, 8, 64, 0.0, 3, False),  # every pair on one expert
    (512, 32, 512, None, 0.1, None, False),  # the largest promised E and k
    (333, 8, 1024, 128, 0.1, None, False),  # larger E, padded
    (4096, 8, 256, 128, 0.05, None, False),  # a prefill batch: several scan blocks
    (65536, 8, 128, 64, 0.01, None, True),  # 512 Ki pairs
]


def _route_id(c):
    return f"T{c[0]}-k{c[1]}-E{c[2]}-bs{c[3]}-drop{c[4]}-one{c[5]}"


def check_route(backend, device, ids, E, bs, what=""):
    plan = moe_kernels.route(dev(ids, device=device), E, block_size=bs, backend=backend)
    want = ref.route(ids, E, bs or 0)
    names = ["tokens_per_expert", "offs", "row_of_slot", "slot_of_row", "block_expert"]
    for name, r in zip(names, want, strict=True):
        got = getattr(plan, name)
        if name == "block_expert" and not bs:
            assert got is None
            continue
        assert got.device.type == device and got.dtype == torch.int32, (what, name)
        assert torch.equal(got.cpu(), r), f"{what}: {name} differs from the reference's"
    return plan


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=[big] if c[6] else [], id=_route_id(c)) for c in ROUTE_CASES]
)
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64], ids=["i32", "i64"])
def test_route_vs_reference(case, id_dtype, debug_mode):
    T, k, E, bs, drop, one, _ = case
    ids = random_ids(T, k, E, seed=T + k + E, drop=drop, one_expert=one).to(id_dtype)
    check_route(CUDA, CUDA, ids, E, bs, _route_id(case))


@pytest.mark.parametrize("bs", [None, 4])
def test_route_int64_ids_past_2_pow_32(bs, debug_mode):
    """int64 ids that equal a valid id modulo 2**32 (or 2**31) are out of range: dropped."""
    E = 6
    ids = random_ids(50, 3, E, seed=9).to(torch.int64)
    ids[::3, 0] = 2**32 + 1
    ids[1::4, 1] = -(2**32) + 2
    ids[2::5, 2] = 2**31 + 3
    plan = check_route(CUDA, CUDA, ids, E, bs, "int64 ids")
    assert bool((plan.row_of_slot.cpu()[ids >= E] == -1).all())


# ----------------------------------------------------------------------------------------------
# permute / unpermute / unpermute_backward
# ----------------------------------------------------------------------------------------------
# (T, k, E, H, block_size, drop, model-sized)   why
PERMUTE_CASES = [
    (0, 2, 4, 64, None, 0.0, False),  # T = 0
    (0, 2, 4, 64, 8, 0.0, False),  # T = 0, padded
    (1, 1, 1, 8, None, 0.0, False),  # one row of one 16-byte bf16 vector
    (1, 8, 64, 1, 16, 0.0, False),  # H = 1: the scalar path only
    (9, 2, 6, 33, 4, 0.2, False),  # odd H: vectors and a scalar tail, padded, dropped ids
    (13, 4, 8, 4095, None, 0.1, False),  # odd H, long rows
    (64, 8, 60, 2048, 8, 0.0, False),  # Qwen1.5-MoE width
    (300, 32, 512, 520, 32, 0.05, False),  # the largest promised E and k
    (4096, 8, 256, 7168, 128, 0.0, True),  # DeepSeek-V3 prefill (bf16: 470 MB permuted)
]


def _permute_id(c):
    return f"T{c[0]}-k{c[1]}-E{c[2]}-H{c[3]}-bs{c[4]}"


def permute_inputs(case, dtype, layout):
    """Ids, the reference plan, and x [T, H] in ``layout``: "contiguous", "offset" (contiguous
    rows starting one element into the storage: no 16-byte alignment) or "strided" (rows H + 1
    apart: every row misaligned differently)."""
    T, k, E, H, bs, drop, _ = case
    ids = random_ids(T, k, E, seed=T + E + H, drop=drop)
    plan = ref.route(ids, E, bs or 0)
    x = randn(T, H, seed=H, dtype=dtype)
    return ids, plan, x, layout


def placed(t: torch.Tensor, layout: str, device: str = CUDA) -> torch.Tensor:
    """``t`` copied to ``device`` in ``layout`` (see :func:`permute_inputs`)."""
    rows, cols = t.shape
    if layout == "contiguous":
        return t.to(device)
    if layout == "offset":
        base = torch.full((rows * cols + 1,), NAN, dtype=t.dtype, device=device)
        view = base[1:].view(rows, cols)
    else:
        base = torch.full((rows, cols + 1), NAN, dtype=t.dtype, device=device)
        view = base[:, 1:]
    view.copy_(t)
    return view


def check_permute(backend, device, case, dtype, layout, what=""):
    T, k, E, H, bs, drop, _ = case
    ids, (tpe, offs, ros, sor, be), x, _ = permute_inputs(case, dtype, layout)
    dros, dsor = dev(ros, sor, device=device)

    p = op("permute", backend)(placed(x, layout, device), dros, dsor)
    assert p.dtype == dtype and p.device.type == device and p.is_contiguous()
    assert torch.equal(p.cpu(), ref.permute(x, ros, sor)), f"{what}: permute is not the gather"

    g = gen(T + H)
    y = torch.randn(sor.shape[0], H, generator=g).to(dtype)
    y[sor < 0] = NAN  # padding and unused rows must never be read
    w = torch.rand(T, k, generator=g)
    w[ros < 0] = NAN  # a dropped slot contributes nothing, whatever its weight
    for wdt in (None, torch.float32, torch.bfloat16, torch.float64):
        tw = None if wdt is None else w.to(wdt)
        dtw = dev(tw, device=device)
        out = op("unpermute", backend)(placed(y, layout, device), dros, dsor, dtw)
        assert out.dtype == dtype and out.device.type == device
        rout = ref.unpermute(y, ros, sor, tw)
        truth = ref.unpermute(y.double(), ros, sor, None if tw is None else tw.double())
        check_vs_reference(out.cpu(), rout, truth, dtype, f"{what} unpermute w={wdt}")
        if tw is None and dtype == torch.float32:  # fp32 sums in slot order: the same bits
            assert torch.equal(out.cpu(), rout), f"{what}: unweighted fp32 unpermute differs"

        go = torch.randn(T, H, generator=g).to(dtype)
        yb = torch.randn(sor.shape[0], H, generator=g).to(dtype)
        gy, gw = op("unpermute_backward", backend)(
            placed(go, layout, device), placed(yb, layout, device), dros, dsor, dtw, True, True
        )
        rgy, rgw = ref.unpermute_backward(go, yb, ros, sor, tw, True, True)
        tgy, tgw = ref.unpermute_backward(
            go.double(), yb.double(), ros, sor, None if tw is None else tw.double(), True, True
        )
        check_vs_reference(gy.cpu(), rgy, tgy, dtype, f"{what} grad_y w={wdt}")
        if tw is None:
            assert gw.numel() == 0
        else:
            assert gw.dtype == tw.dtype
            # a dot over H of two dtype rows, accumulated in fp32
            floor = torch.float32 if dtype == torch.float32 else dtype
            check_vs_reference(gw.cpu(), rgw, tgw, floor, f"{what} grad_w w={wdt}")


def _permute_params():
    out = []
    for c in PERMUTE_CASES:
        for layout in ("contiguous", "offset", "strided"):
            if c[6] and layout != "contiguous":
                continue
            out.append(
                pytest.param(
                    c, layout, marks=[big] if c[6] else [], id=f"{_permute_id(c)}-{layout}"
                )
            )
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case,layout", _permute_params())
def test_permute_unpermute_vs_reference(case, layout, dtype, debug_mode):
    check_permute(CUDA, CUDA, case, dtype, layout, f"{_permute_id(case)}-{layout}")


# ----------------------------------------------------------------------------------------------
# the cuda backend against the Triton one
# ----------------------------------------------------------------------------------------------
def _same(a, b, tol, what):
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert torch.equal(torch.isnan(a), torch.isnan(b)), what
    err = max_rel_err(a, b)
    assert err <= tol, f"{what}: cuda and triton differ by {err:.3e} > {tol:.1e}"


def _rounding(dtype) -> float:
    """Two backends' outputs that are each one rounding to ``dtype`` of an fp32 result are at most
    one unit of ``dtype`` apart (fp32 outputs: a few units from the order of short sums)."""
    return FP32_AGREE if dtype == torch.float32 else ROUNDING_TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cuda_vs_triton(dtype, debug_mode):
    """Both GPU backends on the same inputs: the same ids, plans and permuted rows; floats one
    rounding apart.  Every step after gating takes the cuda backend's ids, so a near-tie row
    (ids either way) changes no later comparison."""
    if not _triton_ok():
        pytest.skip(
            f"the Triton backend is not available: {moe_kernels.available_backends()['triton'][1]}"
        )
    T, E, k, H = 777, 256, 8, 1000
    logits = randn(T, E, seed=1, dtype=dtype, scale=2.0).to(CUDA)
    bias = randn(E, seed=2, scale=0.1).to(CUDA)
    kw = dict(scoring="sigmoid", correction_bias=bias, num_expert_groups=8, topk_groups=4)
    w, ids = moe_kernels.topk_gating(logits, k, backend="cuda", **kw)
    w2, ids2 = moe_kernels.topk_gating(logits, k, backend="triton", **kw)
    ok = (~ambiguous_rows(logits.cpu(), bias.cpu(), k, "sigmoid", 8, 4)).to(CUDA)
    assert ok.float().mean() >= 0.8
    assert torch.equal(ids[ok], ids2[ok]), "ids differ between cuda and triton"
    torch.testing.assert_close(w[ok], w2[ok], rtol=GATING_TOL, atol=GATING_TOL / 10)
    gl, gl2 = (
        op("topk_gating_backward", b)(w, logits, ids, "sigmoid", True, 1.0)
        for b in ("cuda", "triton")
    )
    _same(gl, gl2, _rounding(dtype), "grad_logits")

    plan = moe_kernels.route(ids, E, block_size=64, backend="cuda")
    plan2 = moe_kernels.route(ids, E, block_size=64, backend="triton")
    for name in ("tokens_per_expert", "offs", "row_of_slot", "slot_of_row", "block_expert"):
        assert torch.equal(getattr(plan, name), getattr(plan2, name)), name
    ros, sor = plan.row_of_slot, plan.slot_of_row
    x = randn(T, H, seed=3, dtype=dtype).to(CUDA)
    xp = moe_kernels.permute(x, plan, backend="cuda")
    assert torch.equal(xp, moe_kernels.permute(x, plan, backend="triton")), "permute differs"
    out, out2 = (moe_kernels.unpermute(xp, plan, w, backend=b) for b in ("cuda", "triton"))
    _same(out, out2, _rounding(dtype), "unpermute")
    go = randn(T, H, seed=4, dtype=dtype).to(CUDA)
    (gy, gw), (gy2, gw2) = (
        op("unpermute_backward", b)(go, xp, ros, sor, w, True, True) for b in ("cuda", "triton")
    )
    _same(gy, gy2, _rounding(dtype), "grad_y")
    # fp32 dots over H = 1000 products summed in different orders
    _same(gw, gw2, FP32_AGREE_GRAD, "grad_w")


# ----------------------------------------------------------------------------------------------
# reproducibility, no host sync, autograd and compile on the device
# ----------------------------------------------------------------------------------------------
def _all_calls(dtype, T=3000, E=256, k=8, H=1030):
    """Every part-1 op of the cuda backend (forward and backward ops), each as a thunk returning
    a tuple of its outputs; inputs made once, on the device."""
    logits = randn(T, E, seed=1, dtype=dtype, scale=2.0).to(CUDA)
    bias = randn(E, seed=2, scale=0.1).to(CUDA)
    _, gating_ids = moe_kernels.topk_gating(logits, k, backend=CUDA)
    ids = random_ids(T, k, E, seed=3, drop=0.05).to(CUDA)
    x = randn(T, H, seed=4, dtype=dtype).to(CUDA)
    plan = moe_kernels.route(ids, E, block_size=64, backend=CUDA)
    y = randn(plan.num_rows, H, seed=5, dtype=dtype).to(CUDA)
    tw = torch.rand(T, k, generator=gen(6)).to(CUDA)
    go = randn(T, H, seed=7, dtype=dtype).to(CUDA)
    gw = randn(T, k, seed=8).to(CUDA)
    ros, sor = plan.row_of_slot, plan.slot_of_row

    def gating():
        return moe_kernels.topk_gating(
            logits,
            k,
            scoring="sigmoid",
            correction_bias=bias,
            num_expert_groups=8,
            topk_groups=4,
            routed_scaling_factor=2.5,
            backend=CUDA,
        )

    def gating_backward():
        return (op("topk_gating_backward", CUDA)(gw, logits, gating_ids, "softmax", True, 1.0),)

    return {
        "topk_gating": gating,
        "topk_gating_backward": gating_backward,
        "route": lambda: plan_tensors(moe_kernels.route(ids, E, backend=CUDA)),
        "route-padded": lambda: plan_tensors(
            moe_kernels.route(ids, E, block_size=128, backend=CUDA)
        ),
        "permute": lambda: (moe_kernels.permute(x, plan, backend=CUDA),),
        "unpermute": lambda: (moe_kernels.unpermute(y, plan, tw, backend=CUDA),),
        "unpermute_backward": lambda: op("unpermute_backward", CUDA)(
            go, y, ros, sor, tw, True, True
        ),
    }


def plan_tensors(plan) -> tuple:
    ts = (plan.tokens_per_expert, plan.offs, plan.row_of_slot, plan.slot_of_row)
    return ts + (() if plan.block_expert is None else (plan.block_expert,))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype.is_floating_point else t


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_bitwise_reproducible(dtype):
    """Two runs of every op on the same inputs give the same bits (no atomics in any sum)."""
    for name, call in _all_calls(dtype).items():
        a, b = call(), call()
        assert len(a) == len(b)
        for i, (u, v) in enumerate(zip(a, b, strict=True)):
            assert torch.equal(_bits(u), _bits(v)), f"{name} output {i} differs between two runs"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_no_host_sync(dtype, monkeypatch):
    """No op of the cuda backend synchronises with the host (debug mode off: its value checks
    may), forward and backward through autograd."""
    monkeypatch.delenv("MOE_KERNELS_BACKEND", raising=False)
    before = _debug.debug_mode()
    _debug.set_debug_mode(False)
    calls = _all_calls(dtype)
    T, E, k, H = 64, 32, 4, 72
    logits = randn(T, E, seed=11, dtype=dtype).to(CUDA).requires_grad_()
    x = randn(T, H, seed=12, dtype=dtype).to(CUDA).requires_grad_()

    def through_autograd():
        w, ids = moe_kernels.topk_gating(logits, k, backend=CUDA)
        plan = moe_kernels.route(ids, E, block_size=16, backend=CUDA)
        out = moe_kernels.unpermute(
            moe_kernels.permute(x, plan, backend=CUDA), plan, w, backend=CUDA
        )
        out.float().square().sum().backward()
        return (out,)

    calls["autograd"] = through_autograd
    try:
        for call in calls.values():  # warm up: first calls load modules, allocate
            call()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        for name, call in calls.items():
            try:
                call()
            except RuntimeError as exc:
                raise AssertionError(f"{name} on cuda synchronises with the host: {exc}") from exc
    finally:
        torch.cuda.set_sync_debug_mode("default")
        _debug.set_debug_mode(before)


def test_autograd_and_compile_on_device(debug_mode):
    """The public pipeline (gating -> route -> permute -> unpermute) on cuda through autograd,
    eager and compiled (fullgraph, aot_eager), against the CPU reference's gradients."""
    T, E, k, H = 50, 16, 4, 40
    logits0, x0 = randn(T, E, seed=21, scale=2.0), randn(T, H, seed=22)
    go = randn(T, H, seed=23)

    def pipeline(logits, x, backend):
        w, ids = moe_kernels.topk_gating(logits, k, backend=backend)
        plan = moe_kernels.route(ids, E, block_size=8, backend=backend)
        xp = moe_kernels.permute(x, plan, backend=backend)
        return moe_kernels.unpermute(xp * 1.5, plan, w, backend=backend)

    def grads(fn, device, backend):
        logits = logits0.clone().to(device).requires_grad_()
        x = x0.clone().to(device).requires_grad_()
        out = fn(logits, x, backend)
        out.backward(go.to(device))
        return out.detach().cpu(), logits.grad.cpu(), x.grad.cpu()

    want = grads(pipeline, "cpu", "reference")
    eager = grads(pipeline, CUDA, CUDA)
    torch._dynamo.reset()
    try:
        compiled = grads(torch.compile(pipeline, fullgraph=True, backend="aot_eager"), CUDA, CUDA)
    finally:
        torch._dynamo.reset()
    for got in (eager, compiled):
        for name, a, b in zip(("out", "grad_logits", "grad_x"), got, want, strict=True):
            assert max_rel_err(a, b) <= FP32_AGREE, name


# ----------------------------------------------------------------------------------------------
# 64-bit offsets
# ----------------------------------------------------------------------------------------------
@big
def test_offsets_past_2_pow_31(debug_mode):
    """permute (padded), unpermute and unpermute_backward with T*k*H > 2**31 elements: the rows
    at the far end, where a 32-bit offset would wrap, against torch's own indexing."""
    T, k, E, H, bs = 32768, 8, 64, 8208, 64  # T*k*H = 2_151_677_952 > 2**31
    rows = T * k + E * (bs - 1)
    need = 2 * (3 * rows * H + 2 * T * H)  # bf16 permuted x, y and grad_y; x and grad_out
    free, _ = torch.cuda.mem_get_info()
    if free < need * 1.2:
        pytest.skip(f"needs ~{need / 2**30:.0f} GiB of free GPU memory, {free / 2**30:.0f} free")
    g = torch.Generator(device=CUDA).manual_seed(0)
    ids = torch.randint(0, E, (T, k), device=CUDA, generator=g, dtype=torch.int32)
    plan = moe_kernels.route(ids, E, block_size=bs, backend=CUDA)
    sor, ros = plan.slot_of_row.long(), plan.row_of_slot.long()
    used = int(plan.offs[-1])
    far = torch.arange(used - 64, used, device=CUDA)  # offsets past 2**31 elements
    assert far[0] * H > 2**31

    x = torch.randn(T, H, device=CUDA, generator=g, dtype=torch.bfloat16)
    xp = moe_kernels.permute(x, plan, backend=CUDA)
    src = sor[far]
    want = torch.where((src >= 0)[:, None], x[src.clamp_min(0) // k], 0)
    assert torch.equal(xp[far], want), "permute: wrong rows at the far end"
    tail = torch.arange(xp.shape[0] - 8, xp.shape[0], device=CUDA)
    assert torch.equal(xp[tail], torch.zeros_like(xp[tail])), "unused rows are not zero"

    w = torch.rand(T, k, device=CUDA, generator=g)
    out = moe_kernels.unpermute(xp, plan, w, backend=CUDA)
    tokens = torch.arange(T - 8, T, device=CUDA)
    ref_out = (xp[ros[tokens]].double() * w[tokens, :, None]).sum(1)
    # bf16 output: one rounding (u = 3.9e-3) of an fp32 sum of k terms
    assert max_rel_err(out[tokens], ref_out) <= ROUNDING_TOL[torch.bfloat16]
    del out

    go = torch.randn(T, H, device=CUDA, generator=g, dtype=torch.bfloat16)
    gy, gw = op("unpermute_backward", CUDA)(
        go, xp, plan.row_of_slot, plan.slot_of_row, w, True, True
    )
    slot = sor[far]
    want_gy = torch.where(
        (slot >= 0)[:, None],
        go[slot.clamp_min(0) // k].double() * w.view(-1)[slot.clamp_min(0)][:, None],
        0,
    )
    assert max_rel_err(gy[far], want_gy) <= ROUNDING_TOL[torch.bfloat16], "grad_y at the far end"
    want_gw = (go[tokens, None, :].double() * xp[ros[tokens]].double()).sum(-1)
    # an fp32 dot over H = 8208 products: sqrt(H) u32 relative in practice, well below 1e-4
    assert max_rel_err(gw[tokens], want_gw) <= 1e-4, "grad_w at the last tokens"
