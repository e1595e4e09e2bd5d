"""GPU-only checks of the Triton kernels (``gpu`` marker; skipped without a CUDA device):
model-sized shapes, bf16 on tensor cores, full-fp32 mode and 64-bit addressing.  The op modules
run every case table on the Triton backend too (on CUDA tensors where a GPU is present)."""

from __future__ import annotations

import pytest
import torch
from testutil import INTERPRET, assert_rel_close, backends

from moe_kernels import reference
from moe_kernels._tolerances import GPU_FP32_TOL, GRAD_FACTOR, KERNEL_TOL

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        INTERPRET or not torch.cuda.is_available() or "triton" not in backends(),
        reason="needs a CUDA device and the Triton backend",
    ),
]


@pytest.fixture(scope="module")
def ops():
    from moe_kernels.triton_kernels import ops as triton_ops

    return triton_ops


@pytest.fixture(scope="module")
def ref():
    return reference


def gemm_tol(dtype):
    return GPU_FP32_TOL if dtype == torch.float32 else KERNEL_TOL[dtype]


def check_close(actual, expected, tol, what=""):
    assert torch.isfinite(actual).all(), f"{what}: non-finite values (an element never written?)"
    assert_rel_close(actual, expected, tol, what)


def _c64(t):
    return None if t is None else t.detach().cpu().double()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("T", [1, 7, 300, 2048])  # decode to prefill: every config bucket
def test_moe_ffn_model_shape(ops, ref, dtype, T):
    E, k, H, isz = 60, 4, 512, 256  # E not a power of two (Qwen1.5-MoE)
    g = torch.Generator(device="cuda").manual_seed(T)
    x = torch.randn(T, H, device="cuda", generator=g).to(dtype)
    wgu = (torch.randn(E, 2 * isz, H, device="cuda", generator=g) * H**-0.5).to(dtype)
    wd = (torch.randn(E, H, isz, device="cuda", generator=g) * isz**-0.5).to(dtype)
    logits = torch.randn(T, E, device="cuda", generator=g)
    w, ids = ops.topk_gating(logits, k, "softmax", True, None, 0, 0, 1.0)
    out = ops.moe_ffn(x, wgu, wd, w, ids, None, None, "swiglu", 1.702, 7.0, False)
    exp = ref.moe_ffn(
        _c64(x), _c64(wgu), _c64(wd), _c64(w), ids.cpu(), None, None, "swiglu", 1.702, 7.0, False
    )
    check_close(out.cpu(), exp, gemm_tol(dtype), "moe_ffn")
    gout = torch.randn(T, H, device="cuda", generator=g).to(dtype)
    got = ops.moe_ffn_backward(gout, x, wgu, wd, w, ids, None, None, "swiglu", 1.702, 7.0, False)
    exp = ref.moe_ffn_backward(
        _c64(gout),
        _c64(x),
        _c64(wgu),
        _c64(wd),
        _c64(w),
        ids.cpu(),
        None,
        None,
        "swiglu",
        1.702,
        7.0,
        False,
    )
    for name, a, e in zip(("dx", "dwgu", "dwd", "dw"), got[:4], exp[:4]):
        check_close(a.cpu(), e, GRAD_FACTOR * gemm_tol(dtype), name)


def test_fp32_full_precision(ops, ref):
    E, M, K, N = 6, 500, 256, 192
    a = torch.randn(M, K, device="cuda")
    b = torch.randn(E, K, N, device="cuda")
    offs = torch.tensor([50, 50, 200, 260, 400, 480], dtype=torch.int32, device="cuda")
    exp = ref.grouped_gemm(_c64(a), _c64(b), offs.cpu(), False)
    ops.set_fp32_precision("ieee")
    try:
        check_close(
            ops.grouped_gemm(a, b, offs, False).cpu(), exp, KERNEL_TOL[torch.float32], "ieee"
        )
    finally:
        ops.set_fp32_precision("tf32")
    check_close(ops.grouped_gemm(a, b, offs, False).cpu(), exp, GPU_FP32_TOL, "tf32")


def test_route_large(ops, ref):
    T, k, E = 40000, 8, 384
    ids = torch.randint(-1, E, (T, k), device="cuda", dtype=torch.int32)
    for bs in (0, 64):
        for a, b in zip(ops.route(ids, E, bs), ref.route(ids.cpu(), E, bs)):
            assert torch.equal(a.cpu(), b)


@pytest.mark.slow
def test_int64_addressing(ops):
    """num_rows * H > 2^31 elements: row offsets must be computed in 64 bits."""
    free = torch.cuda.mem_get_info()[0]
    T, k, H = 1 << 16, 2, 3 << 13  # 2^17 rows x 24576 > 2^31 elements (6 GiB in bf16)
    if free < 16 * 2**30:
        pytest.skip("needs 16 GiB of free GPU memory")
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    ids = torch.stack(
        [torch.arange(T, device="cuda") % 3, 3 + torch.arange(T, device="cuda") % 2], 1
    ).to(torch.int32)
    counts, offs, row_of_slot, slot_of_row, _ = ops.route(ids, 5, 0)
    y = ops.permute(x, row_of_slot, slot_of_row)
    last = slot_of_row[-4:].long()
    assert torch.equal(y[-4:], x[last // k])
    out = ops.unpermute(y, row_of_slot, slot_of_row, None)
    assert torch.equal(out[-3:].float(), (2 * x[-3:].float()).to(torch.bfloat16).float())
