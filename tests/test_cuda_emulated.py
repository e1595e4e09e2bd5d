"""The CUDA kernels executed on the CPU, from their own source, against the reference.

``csrc/cuda/bindings.cpp`` (the CUDA ops' argument checks, allocation and launch set-up) is
compiled with ``MOE_KERNELS_CUDA_EMULATION`` together with ``tests/cpp/cuda_emulator.cpp``, which
runs the launch sequences and kernel bodies of ``csrc/cuda/kernels/*.h`` with every GPU thread a
fiber and warps emulated in lock step (shuffles, warp and block barriers; a barrier not reached
by every thread fails the launch).  The grid is capped at a few blocks so every grid-stride loop
runs more than once.  Every case runs with debug mode on (outputs NaN / INT_MIN-filled), so an
element the kernels fail to write shows up.  Only CUB's scan (route's step 2) is replaced by a
serial loop.

Which kernel each test executes: ``GatingForward`` / ``GatingBackward`` (every values-per-lane
bucket, the scratch path for E > 512, groups) -> ``test_gating*``; ``RouteRank``,
``RouteOffsets``, ``RouteScatter``, ``RouteBlockExpert`` -> ``test_route*``; ``PermuteRows``
(16-byte and element-wise), ``UnpermuteRows``, ``UnpermuteGradY``, ``UnpermuteGradW`` ->
``test_permute*``; ``SegmentGemm``, ``SegmentGemmRaggedK``, ``ZeroRows`` -> ``test_grouped_gemm*`` and
``test_moe_ffn*``; ``GatedAct``, ``GatedActBackward``, ``AddExpertBias``, ``ExpertColumnSum``
-> ``test_moe_ffn*``.
"""

from __future__ import annotations

import os

import pytest
import torch
from test_gating import CASES as GATING_CASES
from test_gating import near_tie_rows
from test_grouped_gemm import CASES as GEMM_CASES
from test_grouped_gemm import _case_id as gemm_case_id
from test_grouped_gemm import check_against_reference as check_gemm
from test_moe_ffn import CASES as FFN_CASES
from test_moe_ffn import _case_id as ffn_case_id
from test_moe_ffn import check_against_reference as check_ffn
from test_permute import CASES as PERMUTE_CASES
from testutil import check_vs_reference, gen, randn, random_ids

from moe_kernels import reference as ref
from moe_kernels._tolerances import GATING_TOL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DT_IDS = ["fp32", "bf16", "fp16"]


@pytest.fixture(scope="session")
def emu(tmp_path_factory):
    """The emulation build (about a minute: bindings.cpp includes torch's headers)."""
    from torch.utils.cpp_extension import load

    build = str(tmp_path_factory.mktemp("cuda_emulated"))
    mod = load(
        name="moe_kernels_cuda_emulated",
        sources=[
            os.path.join(ROOT, "csrc", "cuda", "bindings.cpp"),
            os.path.join(ROOT, "tests", "cpp", "cuda_emulator.cpp"),
        ],
        extra_include_paths=[os.path.join(ROOT, "csrc")],
        extra_cflags=[
            "-O1",
            "-std=c++20",
            "-DMOE_KERNELS_CUDA_EMULATION",
            "-Wall",
            "-Wno-unknown-pragmas",
        ],
        build_directory=build,
        verbose=False,
    )
    mod.set_debug_mode(True)  # poisoned outputs in every test
    mod.set_max_blocks(3)
    return mod


def _ids(c):
    return f"T{c[0]}-E{c[1]}-k{c[2]}-{c[3]}-g{c[6]}"


# the op suite's cases plus what only the CUDA kernels distinguish: every values-per-lane bucket
# (E up to 32, 64, 128, 256, 512), the scratch path (E > 512), k = 32, strided logits
EXTRA_GATING = [
    (6, 33, 4, "softmax", True, False, 0, 0, 1.0, True),  # VPT 2, a partial last slot
    (5, 128, 32, "softmax", False, False, 0, 0, 1.0, True),  # VPT 4, k = 32
    (5, 256, 8, "sigmoid", True, True, 8, 4, 2.5, True),  # VPT 8, DeepSeek-V3 groups
    (4, 512, 8, "softmax", True, False, 0, 0, 1.0, True),  # VPT 16
    (4, 600, 6, "sigmoid", True, True, 0, 0, 1.0, True),  # scratch path
    (3, 1024, 40, "softmax", True, False, 16, 4, 1.0, True),  # scratch path with groups, k > 32
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("case", GATING_CASES + EXTRA_GATING, ids=_ids)
def test_gating_vs_reference(emu, case, dtype):
    T, E, k, scoring, renorm, use_bias, G, TG, scale, _ = case
    T = min(T, 40)
    logits = randn(T, E, seed=T * 1000 + E, dtype=dtype, scale=2.0)
    bias = randn(E, seed=E + 7, scale=0.1) if use_bias else None
    args = (k, scoring, renorm, bias, G, TG, scale)
    w, ids = emu.topk_gating(logits, *args)
    rw, rids = ref.topk_gating(logits, *args)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    assert ((ids >= 0) & (ids < E)).all()
    scores = (
        torch.softmax(logits.float(), -1) if scoring == "softmax" else torch.sigmoid(logits.float())
    )
    sel = scores + (bias if bias is not None else 0)
    ok = ~near_tie_rows(sel, k) if G == 0 else torch.ones(T, dtype=torch.bool)
    assert ok.float().mean() >= 0.5
    assert torch.equal(ids[ok], rids[ok])
    torch.testing.assert_close(w[ok], rw[ok], rtol=GATING_TOL, atol=GATING_TOL / 10)
    # the backward of the same row set
    gw = torch.randn(T, k, generator=gen(T + k))
    gl = emu.topk_gating_backward(gw, logits, rids, scoring, renorm, scale)
    rgl = ref.topk_gating_backward(gw, logits, rids, scoring, renorm, scale)
    truth = ref.topk_gating_backward(gw.double(), logits.double(), rids, scoring, renorm, scale)
    check_vs_reference(gl, rgl, truth, dtype, "grad_logits")


def test_gating_strided_logits_and_ties(emu):
    base = randn(70, 24, seed=3)
    view = base.t()[:, ::2]  # [24, 35], element stride 70 * ... not 1
    w, ids = emu.topk_gating(view, 3, "softmax", True, None, 0, 0, 1.0)
    rw, rids = ref.topk_gating(view, 3, "softmax", True, None, 0, 0, 1.0)
    assert torch.equal(ids, rids)
    torch.testing.assert_close(w, rw, rtol=GATING_TOL, atol=GATING_TOL / 10)
    zeros = torch.zeros(3, 9)
    zeros[1, 4] = 1.0
    _, tids = emu.topk_gating(zeros, 3, "softmax", False, None, 0, 0, 1.0)
    assert tids.tolist() == [[0, 1, 2], [4, 0, 1], [0, 1, 2]]


@pytest.mark.parametrize("E", [8, 100, 700])
def test_gating_nan_inf(emu, E):
    """The reference's order (NaN first, ties to the lower index); ids always valid."""
    logits = randn(12, E, seed=E)
    logits[0, 3] = float("nan")
    logits[1, :] = float("nan")
    logits[2, 5] = float("inf")
    logits[3, 2] = float("-inf")
    logits[4, :] = float("-inf")
    for scoring, bias in (("softmax", None), ("sigmoid", randn(E, seed=1, scale=0.1))):
        w, ids = emu.topk_gating(logits, 4, scoring, False, bias, 0, 0, 1.0)
        rw, rids = ref.topk_gating(logits, 4, scoring, False, bias, 0, 0, 1.0)
        assert torch.equal(ids, rids), scoring
        torch.testing.assert_close(w, rw, equal_nan=True, rtol=GATING_TOL, atol=GATING_TOL / 10)


def test_gating_backward_out_of_range_ids(emu):
    """Slots whose id is outside [0, E) contribute nothing (without renormalisation: the same as
    a zero upstream gradient on any valid id); int64 ids are never wrapped into range."""
    logits = randn(9, 40, seed=4)
    ids = random_ids(9, 4, 40, seed=5, drop=0.3).long()
    ids[0, 0] = 2**40
    gw = randn(9, 4, seed=6)
    got = emu.topk_gating_backward(gw, logits, ids, "softmax", False, 1.0)
    bad = (ids < 0) | (ids >= 40)
    want = ref.topk_gating_backward(
        gw.masked_fill(bad, 0.0), logits, ids.masked_fill(bad, 0), "softmax", False, 1.0
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# (T, k, E, block_size, drop)
ROUTE_CASES = [
    (0, 2, 4, 0, 0.0),
    (0, 2, 4, 8, 0.0),
    (1, 1, 1, 0, 0.0),
    (7, 2, 8, 0, 0.0),
    (300, 4, 60, 16, 0.1),  # > one 256-pair chunk, padded, drops
    (600, 8, 128, 0, 0.2),  # many chunks (the grid-stride loop), unpadded
    (257, 3, 5, 64, 0.0),  # empty blocks past the last expert
    (50, 2, 16, 8, 0.0),
    (40, 4, 3, 4, 0.5),
]


@pytest.mark.parametrize("case", ROUTE_CASES, ids=lambda c: "T{}-k{}-E{}-bs{}".format(*c[:4]))
@pytest.mark.parametrize("max_blocks", [1, 3])
def test_route_vs_reference(emu, case, max_blocks):
    T, k, E, bs, drop = case
    emu.set_max_blocks(max_blocks)
    try:
        ids = random_ids(T, k, E, seed=T + 7 * k + E, drop=drop)
        if T > 10:
            ids[:5, 0] = E  # every token of a chunk on one expert: the rank loop's ties
        got = emu.route(ids, E, bs)
        want = ref.route(ids, E, bs)
        for name, g, w in zip(("counts", "offs", "row_of_slot", "slot_of_row", "block_expert"),
                              got, want):  # fmt: skip
            assert g.dtype == torch.int32, name
            assert torch.equal(g, w.to(torch.int32)), name
    finally:
        emu.set_max_blocks(3)


def test_route_int64_ids(emu):
    ids = random_ids(30, 3, 9, seed=1).long()
    ids[0, 1] = 2**33 + 2  # out of range: dropped, never wrapped into [0, E)
    ids[1, 0] = -(2**40)
    got = emu.route(ids, 9, 4)
    want = ref.route(ids, 9, 4)
    for g, w in zip(got, want):
        assert torch.equal(g, w.to(torch.int32))


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize(
    "case", PERMUTE_CASES, ids=lambda c: "T{}-k{}-E{}-bs{}-H{}".format(*c[:4], c[6])
)
@pytest.mark.parametrize("view", ["contiguous", "wide_rows"])
def test_permute_vs_reference(emu, case, dtype, view):
    """permute is an exact gather; unpermute and its backward against the reference (16-byte and
    element-wise variants: H = 37 is odd, H = 40 / 24 rows are 16-byte multiples in bf16/fp16,
    "wide_rows" takes a column slice of a wider tensor, so rows are strided)."""
    T, k, E, bs, drop, one, H, _ = case
    T = min(T, 60)
    g = gen(T + 17 * k + E)
    ids = random_ids(T, k, E, seed=T + 17 * k + E, drop=drop, one_expert=one)
    _, _, ros, sor, _ = ref.route(ids, E, bs)

    def make(rows):
        t = torch.randn(rows, H + (8 if view == "wide_rows" else 0), generator=g).to(dtype)
        return t[:, 8:] if view == "wide_rows" else t

    x = make(T)
    p = emu.permute(x, ros, sor)
    assert torch.equal(p, ref.permute(x, ros, sor)), "permute is not an exact gather"
    y = make(sor.shape[0])
    y[sor < 0] = float("nan")  # padding rows must never be read
    w = torch.rand(T, k, generator=g)
    for tw in (w, None):
        out = emu.unpermute(y, ros, sor, tw)
        rout = ref.unpermute(y, ros, sor, tw)
        truth = ref.unpermute(y.double(), ros, sor, None if tw is None else tw.double())
        check_vs_reference(out, rout, truth, dtype, "unpermute")
        assert torch.equal(out, emu.unpermute(y, ros, sor, tw)), "not bitwise reproducible"
        yb = make(sor.shape[0])
        go = torch.randn(T, H, generator=g).to(dtype)
        gy, gw = emu.unpermute_backward(go, yb, ros, sor, tw, True, True)
        rgy, rgw = ref.unpermute_backward(go, yb, ros, sor, tw, True, True)
        tgy, tgw = ref.unpermute_backward(
            go.double(), yb.double(), ros, sor, None if tw is None else tw.double(), True, True
        )
        check_vs_reference(gy, rgy, tgy, dtype, "grad_y")
        if tw is None:
            assert gw.numel() == 0
        else:
            assert gw.dtype == tw.dtype
            check_vs_reference(gw, rgw, tgw, torch.float32 if dtype == torch.float32 else dtype,
                               "grad_w")  # fmt: skip


def test_permute_any_dtype_and_misaligned(emu):
    """permute copies bytes: integer and bool rows, and a view whose rows start off a 16-byte
    boundary (element-wise path) give the reference's exact gather."""
    ids = random_ids(21, 2, 6, seed=2, drop=0.2)
    _, _, ros, sor, _ = ref.route(ids, 6, 4)
    for x in (
        torch.randint(-100, 100, (21, 16), dtype=torch.int64),
        torch.randint(0, 2, (21, 33), dtype=torch.bool),
        torch.randint(0, 100, (21, 40), dtype=torch.uint8),
        randn(21, 17, seed=3, dtype=torch.bfloat16)[:, 1:],  # 16 columns, rows at 2-byte offsets
    ):
        assert torch.equal(emu.permute(x, ros, sor), ref.permute(x, ros, sor)), x.dtype


def test_permute_grad_dtype_mix(emu):
    """unpermute_backward with fp32 gradients of bf16 rows, and fp16 gradients of fp32 rows."""
    ids = random_ids(19, 3, 7, seed=8, drop=0.1)
    _, _, ros, sor, _ = ref.route(ids, 7, 0)
    tw = torch.rand(19, 3, generator=gen(1))
    for ydt, gdt in ((torch.bfloat16, torch.float32), (torch.float32, torch.float16)):
        y = randn(sor.shape[0], 24, seed=4, dtype=ydt)
        go = randn(19, 24, seed=5, dtype=gdt)
        gy, gw = emu.unpermute_backward(go, y, ros, sor, tw, True, True)
        rgy, rgw = ref.unpermute_backward(go.to(ydt), y, ros, sor, tw, True, True)
        tgy, tgw = ref.unpermute_backward(go.double(), y.double(), ros, sor, tw.double(), True,
                                          True)  # fmt: skip
        check_vs_reference(gy, rgy, tgy, ydt, "grad_y")
        check_vs_reference(gw, rgw, tgw, ydt, "grad_w")


def test_out_of_range_plan_entries_read_nothing(emu):
    """Plan entries outside their range (a corrupted plan) count as dropped: nothing is read
    out of bounds, the rows / slots come out zero."""
    x = randn(4, 8, seed=1)
    ros = torch.tensor([[0, 1], [2, 99], [-5, 3], [4, 5]], dtype=torch.int32)
    sor = torch.tensor([0, 1, 2, 1000, -7, 6], dtype=torch.int32)
    p = emu.permute(x, ros, sor)
    want = torch.stack([x[0], x[0], x[1], torch.zeros(8), torch.zeros(8), x[3]])
    assert torch.equal(p, want)
    y = randn(6, 8, seed=2)
    out = emu.unpermute(y, ros, sor, None)
    assert torch.equal(out, torch.stack([y[0] + y[1], y[2], y[3], y[4] + y[5]]))


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("trans_b", [False, True], ids=["b_EKN", "b_ENK"])
@pytest.mark.parametrize("case", GEMM_CASES, ids=gemm_case_id)
def test_grouped_gemm_vs_reference(emu, case, trans_b, dtype):
    """SegmentGemm (forward, grad_a), SegmentGemmRaggedK (grad_b) and ZeroRows: the op suite's
    cases (odd K/N, empty experts first/middle/last, rows past offs[-1] filled with NaN)."""
    check_gemm(emu.grouped_gemm, emu.grouped_gemm_backward, case, trans_b, dtype, "cpu")


def test_grouped_gemm_strided_b_and_bad_offs(emu):
    """b as a transposed view reaches the kernel through its strides; offs values that are not
    non-decreasing within [0, M] are clamped (never an out-of-bounds access)."""
    offs = torch.tensor([7, 7, 20], dtype=torch.int32)
    b_nk = randn(3, 32, 24, seed=3)
    a = randn(20, 24, seed=4)
    out = emu.grouped_gemm(a, b_nk.transpose(1, 2), offs, False)
    torch.testing.assert_close(out, ref.grouped_gemm(a, b_nk, offs, True), rtol=1e-5, atol=1e-5)
    bad = torch.tensor([5, 2, 1000], dtype=torch.int32)  # clamped to [5, 5, 20]
    got = emu.grouped_gemm(a, b_nk, bad, True)
    want = ref.grouped_gemm(a, b_nk, torch.tensor([5, 5, 20], dtype=torch.int32), True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("case", FFN_CASES, ids=ffn_case_id)
def test_moe_ffn_vs_reference(emu, case, dtype):
    """moe_ffn and its backward as the CUDA backend composes them (route, permute, the segment
    GEMMs with fp32 intermediates, the activation and bias kernels, unpermute) on the op suite's
    cases, held to the "2x PyTorch's own error" rule."""
    check_ffn(emu.moe_ffn, emu.moe_ffn_backward, case, dtype, "cpu", budget=lambda grad: None)


# ----------------------------------------------------------------------------------------------
# the tensor-core grouped GEMM's device-side argument builder (TcBuildGroups, TcZeroFill)


def _segments(offs: list[int], R: int) -> list[tuple[int, int]]:
    """[begin, end) per expert as the kernels read offs: clamped non-decreasing within [0, R]."""
    out, prev = [], 0
    for o in offs:
        end = min(max(o, prev), R)
        out.append((prev, end))
        prev = end
    return out


def _offs_cases():
    g = torch.Generator().manual_seed(7)
    cases = [
        ("sorted", [0, 5, 5, 17, 40], 40),
        ("short", [3, 9, 12], 20),  # rows past offs[-1]
        ("bad", [10, 4, 60, -3, 25], 30),  # decreasing, past R, negative
        ("empty_all", [0, 0, 0], 9),
    ]
    for i in range(3):
        E = int(torch.randint(1, 40, (1,), generator=g))
        R = int(torch.randint(0, 300, (1,), generator=g))
        cuts = sorted(torch.randint(0, R + 1, (E,), generator=g).tolist())
        cases.append((f"random{i}", cuts, R))
    return cases


@pytest.mark.parametrize("case", _offs_cases(), ids=lambda c: c[0])
@pytest.mark.parametrize("mode", [0, 1], ids=["rows", "ragged_k"])
@pytest.mark.parametrize("d_dtype", [torch.bfloat16, torch.float32], ids=["d_bf16", "d_fp32"])
def test_tc_build_groups(emu, case, mode, d_dtype):
    """Shapes, operand pointers and leading dimensions that CUTLASS reads, per expert, from offs
    (any values: clamped as the exact path clamps them), and the zero fill of what CUTLASS does
    not write; every other byte of the output is left alone.  D in the operands' type or fp32."""
    _, offs, R = case
    E, elt, lda, ldb, b_se, N, K, M = len(offs), 2, 24, 40, 999, 16, 8, 12
    elt_d = torch.finfo(d_dtype).bits // 8
    # D rows and expert blocks 16-byte aligned, as the tensor-core path requires
    if mode == 0:
        ldd, d_se = N + 8, 0
        d = torch.full((R, ldd), 7.0, dtype=d_dtype)
    else:
        ldd, d_se = N + 8, M * (N + 8) + 8
        d = torch.full((E * d_se,), 7.0, dtype=d_dtype)
    shapes, ptrs, lds = emu.tc_build_groups(
        torch.tensor(offs, dtype=torch.int32), mode, R, elt, lda, ldb, b_se, d, ldd, d_se, M, N, K
    )
    seg = _segments(offs, R)
    for e, (b, end) in enumerate(seg):
        rows = end - b
        if mode == 0:
            assert shapes[e].tolist() == [rows, N, K], e
            assert ptrs[:, e].tolist() == [b * lda * elt, e * b_se * elt, b * ldd * elt_d], e
        else:
            assert shapes[e].tolist() == ([M, N, rows] if rows else [0, 0, 0]), e
            assert ptrs[:, e].tolist() == [b * lda * elt, b * ldb * elt, e * d_se * elt_d], e
        assert lds[:, e].tolist() == [lda, ldb, ldd], e
    expect = torch.full_like(d, 7.0)
    if mode == 0:
        last = seg[-1][1] if seg else 0
        expect[last:, :N] = 0  # the padding columns past N are not the op's: untouched
    else:
        for e, (b, end) in enumerate(seg):
            if end == b:
                blk = expect[e * d_se : e * d_se + M * ldd].view(M, ldd)
                blk[:, :N] = 0
    assert torch.equal(d, expect)
