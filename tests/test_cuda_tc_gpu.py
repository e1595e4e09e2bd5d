"""The cuda backend's tensor-core grouped GEMM (CUTLASS) and what is built on it, on a GPU
(``gpu`` marker; skipped without a device).

The op suites already run their case tables on the cuda backend where a device is present; this
module adds model-sized problems that take the CUTLASS path (16-byte aligned rows), with empty
experts and rows past ``offs[-1]``:

* ``grouped_gemm`` forward, dA and the ragged-K weight gradient in bf16, fp16 and fp32 (tf32
  tensor cores, and ``ieee`` through :func:`moe_kernels.set_fp32_precision`), both ``trans_b``,
  against float64 on the same inputs, against the exact SIMT path and against Triton;
* experts without rows give exactly zero weight gradient, rows past the segments exactly zero;
* the selection: the CUTLASS path runs (its timing is far from the SIMT path's) where the
  layout allows and the SIMT path takes the rest (odd sizes, strided rows);
* a training step of :class:`moe_kernels.MoE` with ``backend="cuda"`` against the reference;
* a CUDA-graph capture of ``moe_ffn`` (forward and backward replayed on new inputs);
* a grouped GEMM whose operand offsets pass 2**31 elements.
"""

# ruff: noqa: E741  (I is the expert intermediate size, as everywhere in the package)
from __future__ import annotations

import pytest
import torch
from testutil import cuda_backend_marks

import moe_kernels
from moe_kernels._tolerances import GPU_FP32_TOL, GRAD_FACTOR, KERNEL_TOL, max_rel_err

CUDA = "cuda"


pytestmark = cuda_backend_marks()

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
DT_IDS = ["bf16", "fp16", "fp32"]


def _ext():
    import moe_kernels._C_cuda as ext

    return ext


def tol(dtype, grad=False):
    t = GPU_FP32_TOL if dtype == torch.float32 else KERNEL_TOL[dtype]
    return t * (GRAD_FACTOR if grad else 1)


def offs_with_gaps(E, M, seed, *, empty=(1, 5), tail=24):
    """Sorted segment ends over M rows with experts `empty` given no rows and the last `tail` rows
    past offs[-1]."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(E, generator=g) + 0.05
    for e in empty:
        if e < E:
            w[e] = 0
    counts = (w / w.sum() * (M - tail)).floor().long()
    counts[int(torch.argmax(w))] += M - tail - int(counts.sum())
    return torch.cumsum(counts, 0).to(torch.int32)


def gemm_problem(E, M, K, N, dtype, trans_b, seed):
    g = torch.Generator(device=CUDA).manual_seed(seed)
    a = torch.randn(M, K, device=CUDA, generator=g).to(dtype)
    shape = (E, N, K) if trans_b else (E, K, N)
    b = (torch.randn(*shape, device=CUDA, generator=g) / K**0.5).to(dtype)
    offs = offs_with_gaps(E, M, seed).to(CUDA)
    return a, b, offs


def f64_reference(a, b, offs, trans_b, go):
    """out, dA, dB in float64 on the GPU (per-expert matmuls)."""
    a64, b64, go64 = a.double(), b.double(), go.double()
    out = torch.zeros(a.shape[0], go.shape[1], dtype=torch.float64, device=a.device)
    da = torch.zeros_like(a64)
    db = torch.zeros_like(b64)
    prev = 0
    for e, end in enumerate(offs.tolist()):
        be = b64[e].t() if trans_b else b64[e]  # [K, N]
        out[prev:end] = a64[prev:end] @ be
        da[prev:end] = go64[prev:end] @ be.t()
        g = a64[prev:end].t() @ go64[prev:end]  # [K, N]
        db[e] = g.t() if trans_b else g
        prev = end
    return out, da, db


def run_gemm(a, b, offs, trans_b, go, backend=CUDA):
    a = a.clone().requires_grad_()
    b = b.clone().requires_grad_()
    out = moe_kernels.grouped_gemm(a, b, offs, trans_b=trans_b, backend=backend)
    out.backward(go)
    return out.detach(), a.grad, b.grad


@pytest.fixture
def simt_only():
    """Run the body with the tensor-core path off (the exact SIMT kernels take every GEMM)."""
    _ext().set_tensor_cores(False)
    try:
        yield
    finally:
        _ext().set_tensor_cores(True)


@pytest.mark.parametrize("trans_b", [False, True], ids=["b_EKN", "b_ENK"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_grouped_gemm_tensor_cores(dtype, trans_b, debug_mode):
    """Forward, dA and dB on the CUTLASS path against float64; empty experts give exactly zero
    weight gradient, rows past offs[-1] exactly zero output and dA."""
    E, M, K, N = 16, 3000, 512, 768
    a, b, offs = gemm_problem(E, M, K, N, dtype, trans_b, seed=1)
    go = torch.randn(M, N, device=CUDA).to(dtype)
    out, da, db = run_gemm(a, b, offs, trans_b, go)
    want = f64_reference(a, b, offs, trans_b, go)
    for name, got, exp, grad in zip(("out", "dA", "dB"), (out, da, db), want, (0, 1, 1)):
        assert got.dtype == dtype and torch.isfinite(got).all(), name
        err = max_rel_err(got, exp)
        assert err <= tol(dtype, bool(grad)), f"{name}: {err:.3e}"
    used = int(offs[-1])
    assert torch.equal(out[used:], torch.zeros_like(out[used:]))
    assert torch.equal(da[used:], torch.zeros_like(da[used:]))
    counts = torch.diff(offs, prepend=offs.new_zeros(1))
    for e in (counts == 0).nonzero().flatten().tolist():
        assert torch.equal(db[e], torch.zeros_like(db[e])), f"expert {e} has no rows"


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_tensor_cores_vs_simt_and_triton(dtype, debug_mode):
    """The CUTLASS path, the exact SIMT path and Triton on the same inputs agree within the
    dtype's budget, and the CUTLASS path gives the same bits on a second run."""
    E, M, K, N = 8, 1000, 256, 384
    a, b, offs = gemm_problem(E, M, K, N, dtype, True, seed=2)
    go = torch.randn(M, N, device=CUDA).to(dtype)
    tc = run_gemm(a, b, offs, True, go)
    again = run_gemm(a, b, offs, True, go)
    for x, y in zip(tc, again):
        assert torch.equal(x, y), "two runs differ"
    _ext().set_tensor_cores(False)
    try:
        simt = run_gemm(a, b, offs, True, go)
    finally:
        _ext().set_tensor_cores(True)
    others = [simt]
    if moe_kernels.available_backends()["triton"][0]:
        others.append(run_gemm(a, b, offs, True, go, backend="triton"))
    for other in others:
        for name, x, y in zip(("out", "dA", "dB"), tc, other):
            assert max_rel_err(x, y.double()) <= 2 * tol(dtype, name != "out"), name


def test_fp32_precision_switch(debug_mode):
    """fp32: tf32 tensor cores by default (error near 1e-3), exact fp32 after
    set_fp32_precision('ieee')."""
    E, M, K, N = 4, 600, 1024, 256
    a, b, offs = gemm_problem(E, M, K, N, torch.float32, False, seed=3)
    exp = f64_reference(a, b, offs, False, torch.zeros(M, N, device=CUDA))[0]
    err_tf32 = max_rel_err(moe_kernels.grouped_gemm(a, b, offs, backend=CUDA), exp)
    moe_kernels.set_fp32_precision("ieee")
    try:
        assert _ext().fp32_precision() == "ieee"
        err_ieee = max_rel_err(moe_kernels.grouped_gemm(a, b, offs, backend=CUDA), exp)
    finally:
        moe_kernels.set_fp32_precision("tf32")
    assert err_ieee <= 1e-5, err_ieee
    assert 1e-5 < err_tf32 <= GPU_FP32_TOL, err_tf32  # tf32 rounding shows: the tensor cores ran


@pytest.mark.parametrize(
    "K,N,strided", [(100, 64, False), (64, 36, False), (64, 64, True)], ids=str
)
def test_layouts_outside_the_tensor_core_path(K, N, strided, debug_mode):
    """Sizes that are not multiples of 8 and non-unit-stride rows run on the exact path, with the
    same results as the reference."""
    E, M = 4, 300
    a, b, offs = gemm_problem(E, M, K, N, torch.bfloat16, False, seed=4)
    if strided:
        a = torch.randn(M, 2 * K, device=CUDA).to(torch.bfloat16)[:, ::2]
    go = torch.randn(M, N, device=CUDA).to(torch.bfloat16)
    got = run_gemm(a, b, offs, False, go)
    want = f64_reference(a, b, offs, False, go)
    for name, x, y, grad in zip(("out", "dA", "dB"), got, want, (0, 1, 1)):
        assert max_rel_err(x, y) <= tol(torch.bfloat16, bool(grad)), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_moe_training_step(dtype):
    """One training step of the MoE layer on backend='cuda' against backend='reference' on the
    same device: output, loss and every parameter gradient."""
    torch.manual_seed(0)
    H, I, E, k, T = 256, 512, 8, 2, 384
    layers = {}
    for backend in ("reference", CUDA):
        torch.manual_seed(0)
        layers[backend] = moe_kernels.MoE(H, I, E, k, backend=backend).to(CUDA, dtype)
    x = torch.randn(T, H, device=CUDA).to(dtype)
    grads = {}
    for backend, layer in layers.items():
        xi = x.clone().requires_grad_()
        out = layer(xi)
        loss = out.float().square().mean()
        loss.backward()
        grads[backend] = {"out": out.detach(), "x": xi.grad}
        grads[backend].update({n: p.grad for n, p in layer.named_parameters()})
    for name, want in grads["reference"].items():
        got = grads[CUDA][name]
        assert got is not None and torch.isfinite(got).all(), name
        err = max_rel_err(got, want.double())
        assert err <= tol(dtype, name != "out") * 2, f"{name}: {err:.3e}"


def test_moe_ffn_cuda_graph():
    """moe_ffn forward and backward captured in a CUDA graph and replayed on new inputs copied
    into the static buffers give what eager calls give."""
    H, I, E, k, T = 256, 384, 8, 2, 200
    dt = torch.bfloat16
    x = torch.randn(T, H, device=CUDA).to(dt).requires_grad_()
    wgu = (torch.randn(E, 2 * I, H, device=CUDA) / H**0.5).to(dt).requires_grad_()
    wd = (torch.randn(E, H, I, device=CUDA) / I**0.5).to(dt).requires_grad_()
    logits = torch.randn(T, E, device=CUDA)
    w, ids = moe_kernels.topk_gating(logits, k, backend=CUDA)
    w, ids = w.clone(), ids.clone()
    go = torch.randn(T, H, device=CUDA).to(dt)

    def step():
        out = moe_kernels.moe_ffn(x, wgu, wd, w, ids, backend=CUDA)
        gx, gwgu, gwd = torch.autograd.grad(out, (x, wgu, wd), go)
        return out, gx, gwgu, gwd

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    for seed in (1, 2):
        g = torch.Generator(device=CUDA).manual_seed(seed)
        with torch.no_grad():
            x.copy_(torch.randn(T, H, device=CUDA, generator=g).to(dt))
            new_w, new_ids = moe_kernels.topk_gating(
                torch.randn(T, E, device=CUDA, generator=g), k, backend=CUDA
            )
            w.copy_(new_w)
            ids.copy_(new_ids)
        graph.replay()
        eager = step()
        for name, a, b in zip(("out", "gx", "gwgu", "gwd"), static, eager):
            assert torch.equal(a, b), f"{name}: the replay differs from an eager call"


def test_grouped_gemm_offsets_past_2_pow_31():
    """A grouped GEMM whose A has more than 2**31 elements: the last expert's rows (offsets past
    2**31) against float64."""
    K, N, E = 8192, 64, 4
    M = 2**31 // K + 4096  # M * K > 2**31
    free, _ = torch.cuda.mem_get_info()
    need = 2 * (M * K + M * N) * 2
    if free < need * 1.2:
        pytest.skip(f"needs ~{need / 2**30:.0f} GiB of free GPU memory")
    g = torch.Generator(device=CUDA).manual_seed(5)
    a = torch.randn(M, K, device=CUDA, generator=g, dtype=torch.bfloat16)
    b = (torch.randn(E, K, N, device=CUDA, generator=g) / K**0.5).to(torch.bfloat16)
    offs = torch.tensor([M // 4, M // 2, 3 * M // 4, M], dtype=torch.int32, device=CUDA)
    out = moe_kernels.grouped_gemm(a, b, offs, backend=CUDA)
    rows = torch.arange(M - 64, M, device=CUDA)
    assert rows[0] * K > 2**31
    want = a[rows].double() @ b[3].double()
    assert max_rel_err(out[rows], want) <= KERNEL_TOL[torch.bfloat16]
    go = torch.randn(M, N, device=CUDA, generator=g, dtype=torch.bfloat16)
    _, db = ref_grads_last(a, b, offs, go)
    got_db = torch.ops.moe_kernels.grouped_gemm_backward(go, a, b, offs, False, False, True)[1]
    assert max_rel_err(got_db[3], db) <= KERNEL_TOL[torch.bfloat16] * GRAD_FACTOR


def ref_grads_last(a, b, offs, go):
    """dB of the last expert in float64 (chunked: its rows are past 2**31 elements of a)."""
    lo, hi = int(offs[-2]), int(offs[-1])
    db = torch.zeros(a.shape[1], go.shape[1], dtype=torch.float64, device=a.device)
    for s in range(lo, hi, 65536):
        e = min(s + 65536, hi)
        db += a[s:e].double().t() @ go[s:e].double()
    return None, db


@pytest.mark.parametrize("transposed", [False, True], ids=["hf_layout", "gpt_oss_views"])
def test_moe_ffn_clamped_activation(transposed, debug_mode):
    """swiglu_oai with many values past its clamps (x scaled up, limit 1.5): the tensor-core path
    keeps h in fp32 (fp32-output GEMM 1; transposed weights copied contiguous for it), so its output
    and gradients stay within the bf16 budget of the float64 reference; a bf16-rounded h would
    move values across the clamps."""
    T, H, I, E, k = 300, 256, 128, 8, 2
    g = torch.Generator(device=CUDA).manual_seed(9)
    dt = torch.bfloat16
    x = (torch.randn(T, H, device=CUDA, generator=g) * 4).to(dt)
    if transposed:
        wgu = (torch.randn(E, H, 2 * I, device=CUDA, generator=g) / H**0.5).to(dt).transpose(1, 2)
        wd = (torch.randn(E, I, H, device=CUDA, generator=g) / I**0.5).to(dt).transpose(1, 2)
    else:
        wgu = (torch.randn(E, 2 * I, H, device=CUDA, generator=g) / H**0.5).to(dt)
        wd = (torch.randn(E, H, I, device=CUDA, generator=g) / I**0.5).to(dt)
    w, ids = moe_kernels.topk_gating(torch.randn(T, E, device=CUDA, generator=g), k)
    go = torch.randn(T, H, device=CUDA, generator=g).to(dt)

    def run(backend, *tensors):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        out = moe_kernels.moe_ffn(
            leaves[0],
            leaves[1],
            leaves[2],
            leaves[3],
            ids,
            activation="swiglu_oai",
            limit=1.5,
            interleaved=True,
            backend=backend,
        )
        out.backward(go.to(out.dtype))
        return [out.detach()] + [t.grad for t in leaves]

    got = run(CUDA, x, wgu, wd, w)
    want = run("reference", x.double(), wgu.double(), wd.double(), w.double())
    for name, a, b in zip(("out", "grad_x", "grad_wgu", "grad_wd", "grad_w"), got, want):
        assert torch.isfinite(a).all(), name
        err = max_rel_err(a, b)
        assert err <= tol(dt, name != "out"), f"{name}: {err:.3e}"
