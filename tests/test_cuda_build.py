"""The CUDA extension ``moe_kernels._C_cuda`` as built here, checked without a GPU.

* It registers a ``CUDA`` kernel for every op of :data:`testutil.CUDA_OPS` (the gating, routing
  and permutation ops); the ops without one fall back in auto mode and raise
  :class:`~moe_kernels.BackendUnavailableError` when ``backend="cuda"`` names them.
* ``available_backends()["cuda"]`` is ``(False, "built; no CUDA device")`` without a device, and
  ``moe_kernels._debug.set_debug_mode`` reaches the extension's own flag.
* Fake-tensor runs: under ``FakeTensorMode`` with inputs on ``device="cuda"``, every public op
  runs on ``backend="cuda"`` (the compiled family's ops are what executes) and its outputs have
  the shapes, dtypes, strides and device of the same call on the reference under the same mode,
  and the shapes, dtypes and strides of the reference run on real CPU tensors; so do the
  gradients, through each op's registered autograd formula.
* ``torch.compile(fullgraph=True)`` traces each op over fake CUDA inputs into a graph that calls
  ``moe_kernels.<op>.default`` (the compiled family), never a reference or Triton op.

Without a device torch's autograd engine cannot run over CUDA tensors, fake ones included (it
stashes the current stream of each CUDA device before running a backward pass), so the backward
here calls the graph node of the op's output directly (``out.grad_fn.apply``: the registered
autograd formula, without the engine), and the compiled graphs are forward ones.  The GPU suite
(``test_cuda_gpu.py``) runs both through the engine.

The module is skipped, with the reason, when torch is a CPU-only build or when the extension was
not built and ``MOE_KERNELS_REQUIRE_BUILT`` does not name ``_C_cuda`` (when it does, the
session fails at start: see conftest.py).  The tests that need no extension (``backend="cuda"``
on CPU tensors, the reason of a missing extension) always run.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch._dynamo
from testutil import CUDA_OPS, gen, randn, random_ids
from torch._dynamo.backends.common import aot_autograd
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import moe_kernels
from moe_kernels import _backends, _registry

FLOATS = [torch.bfloat16, torch.float16, torch.float32]
FLOAT_IDS = ["bf16", "fp16", "fp32"]


def _required() -> bool:
    raw = os.environ.get("MOE_KERNELS_REQUIRE_BUILT", "")
    return "_C_cuda" in {n.strip() for n in raw.split(",")}


def _skip_reason() -> str | None:
    """Why the tests of the built extension cannot run here (None: they run)."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build: moe_kernels._C_cuda is not built"
    err = _registry.extension_error("_C_cuda")
    if err is not None and not _required():
        return (
            f"moe_kernels._C_cuda is not loaded ({err}) and MOE_KERNELS_REQUIRE_BUILT does "
            "not name _C_cuda"
        )
    return None


@pytest.fixture(scope="module")
def built():
    """The loaded extension; skips (see :func:`_skip_reason`), or fails when it is required."""
    why = _skip_reason()
    if why is not None:
        pytest.skip(why)
    err = _registry.extension_error("_C_cuda")
    assert err is None, f"MOE_KERNELS_REQUIRE_BUILT names _C_cuda but it did not load: {err}"
    from moe_kernels import _C_cuda

    return _C_cuda


@pytest.fixture
def fresh(monkeypatch):
    """No backend forced by the environment, an empty choice cache and a fresh dynamo."""
    monkeypatch.delenv("MOE_KERNELS_BACKEND", raising=False)
    monkeypatch.setattr(_backends, "_call_cache", {})
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class OpSpy(TorchDispatchMode):
    """Records the moe_kernels ops that execute (name without the namespace)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name.startswith("moe_kernels::"):
            self.ops.append(name.split("::", 1)[1])
        return func(*args, **(kwargs or {}))


def _family(op_name: str) -> str:
    for suffix in ("_reference", "_triton"):
        if op_name.endswith(suffix):
            return suffix[1:]
    return "compiled"


# ----------------------------------------------------------------------------------------------
# inputs: one builder for real CPU tensors and fake CUDA ones
# ----------------------------------------------------------------------------------------------
class Real:
    """Random CPU tensors (values matter: the reference runs on them)."""

    device = "cpu"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def floats(self, *shape, dtype=torch.float32, grad=False):
        self.seed += 1
        return randn(*shape, seed=self.seed, dtype=dtype).requires_grad_(grad)

    def weights(self, T, k, dtype=torch.float32, grad=False):
        self.seed += 1
        return torch.rand(T, k, generator=gen(self.seed)).to(dtype).requires_grad_(grad)

    def ids(self, T, k, E, dtype=torch.int32):
        self.seed += 1
        return random_ids(T, k, E, self.seed, drop=0.2).to(dtype)


class Fake(Real):
    """Tensors on device ``cuda`` made under the active FakeTensorMode (no values)."""

    device = "cuda"

    def floats(self, *shape, dtype=torch.float32, grad=False):
        return torch.empty(*shape, dtype=dtype, device="cuda").requires_grad_(grad)

    def weights(self, T, k, dtype=torch.float32, grad=False):
        return torch.empty(T, k, dtype=dtype, device="cuda").requires_grad_(grad)

    def ids(self, T, k, E, dtype=torch.int32):
        return torch.empty(T, k, dtype=dtype, device="cuda")


def _meta(t):
    """What a fake run must get right: shape, dtype, strides, device."""
    if t is None:
        return None
    return (tuple(t.shape), t.dtype, t.stride(), t.device.type)


def _meta_no_device(t):
    """Shape, dtype and layout (the strides of the dimensions longer than 1 of a non-empty
    tensor: the others address nothing, and torch ops differ there)."""
    if t is None:
        return None
    layout = None
    if t.numel():
        layout = tuple(st if n > 1 else None for n, st in zip(t.shape, t.stride(), strict=True))
    return (tuple(t.shape), t.dtype, layout)


def _plan_tensors(plan):
    return [
        plan.tokens_per_expert,
        plan.offs,
        plan.row_of_slot,
        plan.slot_of_row,
        plan.block_expert,
    ]


# ----------------------------------------------------------------------------------------------
# the cases: each returns (outputs, (output to differentiate, inputs wanting a gradient))
# ----------------------------------------------------------------------------------------------
#: (T, E, k, scoring, renormalize, correction bias, groups, topk_groups, scale): why
GATING = {
    "softmax": (7, 8, 2, "softmax", True, False, None, None, 1.0),
    "T0": (0, 16, 4, "softmax", True, False, None, None, 1.0),
    "T1-k1": (1, 6, 1, "softmax", False, False, None, None, 1.0),
    "sigmoid-bias-groups": (5, 64, 6, "sigmoid", True, True, 8, 4, 2.5),  # DeepSeek-V3 style
    "E512-k32": (3, 512, 32, "softmax", True, False, None, None, 1.0),  # the promised maxima
    "E1024": (2, 1024, 8, "sigmoid", False, True, None, None, 1.0),  # a larger E
}


def run_gating(make, backend, name, dtype, grad):
    T, E, k, scoring, renorm, bias, groups, topk_groups, scale = GATING[name]
    logits = make.floats(T, E, dtype=dtype, grad=grad)
    cb = make.floats(E) if bias else None
    w, ids = moe_kernels.topk_gating(
        logits,
        k,
        scoring=scoring,
        renormalize=renorm,
        correction_bias=cb,
        num_expert_groups=groups,
        topk_groups=topk_groups,
        routed_scaling_factor=scale,
        backend=backend,
    )
    return [w, ids], (w, [logits])


#: (T, k, E, block_size, id dtype)
ROUTE = {
    "unpadded": (9, 2, 6, None, torch.int32),
    "padded": (9, 2, 6, 4, torch.int64),
    "T0-padded": (0, 4, 8, 16, torch.int32),
    "T1-E1": (1, 1, 1, None, torch.int64),
    "E128-k8-padded": (33, 8, 128, 64, torch.int32),
}


def run_route(make, backend, name, dtype, grad):
    T, k, E, bs, id_dtype = ROUTE[name]
    plan = moe_kernels.route(make.ids(T, k, E, id_dtype), E, block_size=bs, backend=backend)
    assert isinstance(plan, moe_kernels.RoutingPlan)
    return _plan_tensors(plan), None


#: (T, k, E, H, block_size, x is a misaligned view)
PERMUTE = {
    "unpadded": (9, 2, 6, 16, None, False),
    "padded-oddH": (9, 2, 6, 33, 4, False),
    "view": (7, 3, 5, 24, None, True),  # x starts one element into its storage, row stride H + 1
    "T0": (0, 2, 4, 8, 8, False),
}


def _permute_inputs(make, name, dtype, grad, backend):
    T, k, E, H, bs, view = PERMUTE[name]
    plan = moe_kernels.route(make.ids(T, k, E), E, block_size=bs, backend=backend)
    if view:
        x = make.floats(T, H + 1, dtype=dtype)[:, 1:]
        x.requires_grad_(grad)
    else:
        x = make.floats(T, H, dtype=dtype, grad=grad)
    return plan, x


def run_permute(make, backend, name, dtype, grad):
    plan, x = _permute_inputs(make, name, dtype, grad, backend)
    out = moe_kernels.permute(x, plan, backend=backend)
    return [out], (out, [x])


#: topk_weights of unpermute: None (weights of 1) or a dtype (fp32, bf16, fp16, fp64 accepted)
WEIGHTS = {"w-none": None, "w-fp32": torch.float32, "w-bf16": torch.bfloat16}


def run_unpermute(make, backend, name, dtype, grad, wname="w-fp32"):
    T, k, E, H, bs, _ = PERMUTE[name]
    plan = moe_kernels.route(make.ids(T, k, E), E, block_size=bs, backend=backend)
    y = make.floats(plan.num_rows, H, dtype=dtype, grad=grad)
    wdt = WEIGHTS[wname]
    w = None if wdt is None else make.weights(T, k, wdt, grad=grad)
    out = moe_kernels.unpermute(y, plan, w, backend=backend)
    return [out], (out, [y] + ([] if w is None else [w]))


#: (T, k, E, K, N, trans_b, b is a transposed view)
GEMM = {
    "b_ENK": (9, 2, 6, 16, 24, True, False),
    "b_EKN-odd": (7, 2, 5, 13, 7, False, False),
    "b_view": (8, 2, 4, 32, 16, False, True),  # [E, N, K] storage seen as [E, K, N]
}


def run_grouped_gemm(make, backend, name, dtype, grad):
    T, k, E, K, N, trans_b, view = GEMM[name]
    plan = moe_kernels.route(make.ids(T, k, E), E, backend=backend)
    a = make.floats(plan.num_rows, K, dtype=dtype, grad=grad)
    if view:
        b = make.floats(E, N, K, dtype=dtype).transpose(1, 2)
        b.requires_grad_(grad)
    else:
        b = make.floats(*((E, N, K) if trans_b else (E, K, N)), dtype=dtype, grad=grad)
    out = moe_kernels.grouped_gemm(a, b, plan.offs, trans_b=trans_b, backend=backend)
    return [out], (out, [a, b])


#: (T, k, E, H, I, activation, biases, gpt-oss transposed weight views, interleaved)
FFN = {
    "swiglu": (9, 2, 6, 32, 24, "swiglu", False, False, False),
    "gpt-oss": (7, 2, 4, 16, 8, "swiglu_oai", True, True, True),
    "T0": (0, 2, 4, 16, 8, "geglu", True, False, False),
}


def run_moe_ffn(make, backend, name, dtype, grad):
    T, k, E, H, inter, act, biases, transposed, interleaved = FFN[name]
    x = make.floats(T, H, dtype=dtype, grad=grad)
    if transposed:
        wgu = make.floats(E, H, 2 * inter, dtype=dtype).transpose(1, 2)
        wd = make.floats(E, inter, H, dtype=dtype).transpose(1, 2)
        wgu.requires_grad_(grad)
        wd.requires_grad_(grad)
    else:
        wgu = make.floats(E, 2 * inter, H, dtype=dtype, grad=grad)
        wd = make.floats(E, H, inter, dtype=dtype, grad=grad)
    w = make.weights(T, k, grad=grad)
    bgu = make.floats(E, 2 * inter, dtype=dtype, grad=grad) if biases else None
    bd = make.floats(E, H, dtype=dtype, grad=grad) if biases else None
    out = moe_kernels.moe_ffn(
        x,
        wgu,
        wd,
        w,
        make.ids(T, k, E),
        activation=act,
        gate_up_bias=bgu,
        down_bias=bd,
        interleaved=interleaved,
        backend=backend,
    )
    inputs = [t for t in (x, wgu, wd, w, bgu, bd) if t is not None]
    return [out], (out, inputs)


RUNNERS = {
    "moe_ffn": (run_moe_ffn, list(FFN)),
    "grouped_gemm": (run_grouped_gemm, list(GEMM)),
    "topk_gating": (run_gating, list(GATING)),
    "route": (run_route, list(ROUTE)),
    "permute": (run_permute, list(PERMUTE)),
    "unpermute": (run_unpermute, list(PERMUTE)),
}
#: the backward op each differentiable public op's autograd formula calls in its family
BACKWARD_OP = {
    "moe_ffn": "moe_ffn_backward",
    "grouped_gemm": "grouped_gemm_backward",
    "topk_gating": "topk_gating_backward",
    "permute": "unpermute",
    "unpermute": "unpermute_backward",
}


def _params():
    out = []
    for op, (_, names) in RUNNERS.items():
        for name in names:
            for dtype, did in zip(FLOATS, FLOAT_IDS, strict=True):
                if op == "route" and dtype != torch.float32:
                    continue  # route takes no float input
                out.append(pytest.param(op, name, dtype, id=f"{op}-{name}-{did}"))
    return out


def _fake_backward(out, inputs):
    """Gradients of ``inputs`` for a gradient of ones on ``out``, through the registered autograd
    formula of the op that made ``out`` (its graph node, called directly: see the docstring)."""
    node = out.grad_fn
    assert node is not None, "the output does not track gradients"
    grads = node.apply(*_grad_outputs(node, out))
    grads = grads if isinstance(grads, tuple) else (grads,)
    # the formula returns one gradient per op argument; keep those of tensors that want one
    got = [g for g in grads if isinstance(g, torch.Tensor)]
    assert len(got) == len(inputs), (len(got), len(inputs))
    return got


def _grad_outputs(node, out):
    # the op's outputs: topk_gating has two (weights, ids), the others one
    if "topk_gating" in node.name():
        return (torch.ones_like(out), None)
    return (torch.ones_like(out),)


# ----------------------------------------------------------------------------------------------
# tests that need no extension
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["topk_gating", "route", "permute", "unpermute"])
def test_cuda_backend_on_cpu_tensors_raises(op, fresh):
    """``backend="cuda"`` never runs CPU tensors (nor falls back): BackendUnavailableError with
    the reason (the CPU device when the extension is built, else why it is missing)."""
    T, E, k, H = 5, 4, 2, 8
    make = Real()
    x, ids = make.floats(T, H), make.ids(T, k, E)
    plan = moe_kernels.route(ids, E, backend="reference")
    calls = {
        "topk_gating": lambda: moe_kernels.topk_gating(make.floats(T, E), k, backend="cuda"),
        "route": lambda: moe_kernels.route(ids, E, backend="cuda"),
        "permute": lambda: moe_kernels.permute(x, plan, backend="cuda"),
        "unpermute": lambda: moe_kernels.unpermute(x.repeat(k, 1), plan, backend="cuda"),
    }
    with pytest.raises(moe_kernels.BackendUnavailableError) as info:
        calls[op]()
    msg = str(info.value)
    assert "'cuda'" in msg and op in msg, msg
    ok, reason = moe_kernels.available_backends()["cuda"]
    if ok or _registry.extension_error("_C_cuda") is None:
        assert "cpu tensors" in msg, msg
    assert ok or reason in msg, f"the error does not give the reason {reason!r}: {msg}"


def _sessionstart_outcome(required: str, monkeypatch) -> str | None:
    """Runs the conftest's session-start hook in-process with MOE_KERNELS_REQUIRE_BUILT set:
    None if it lets the session run, else the message it stops the session with."""
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location(
        "_moe_conftest", os.path.join(here, "conftest.py")
    )
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    monkeypatch.delenv("MOE_KERNELS_REQUIRE_BACKENDS", raising=False)
    monkeypatch.setenv("MOE_KERNELS_REQUIRE_BUILT", required)
    try:
        conftest.pytest_sessionstart(None)
    except pytest.exit.Exception as exc:
        assert exc.returncode not in (0, None)
        return str(exc.msg)
    return None


def test_require_built_hook(monkeypatch):
    """MOE_KERNELS_REQUIRE_BUILT fails the session at start for an extension that is not loaded,
    with its load error, and lets it run when every named one is."""
    assert _sessionstart_outcome("", monkeypatch) is None
    msg = _sessionstart_outcome("_no_such_extension", monkeypatch)
    assert msg is not None and "moe_kernels._no_such_extension" in msg, msg
    for name in ("_C", "_C_cuda"):
        err = _registry.extension_error(name)
        msg = _sessionstart_outcome(f" {name} , ", monkeypatch)
        if err is None:
            assert msg is None, msg
        else:
            assert msg is not None and f"moe_kernels.{name}" in msg and err in msg, msg


def test_reason_when_not_built():
    err = _registry.extension_error("_C_cuda")
    if err is None:
        pytest.skip("moe_kernels._C_cuda is built here")
    ok, reason = moe_kernels.available_backends()["cuda"]
    assert ok is False
    assert "moe_kernels._C_cuda" in reason, reason
    if err.startswith("ModuleNotFoundError"):
        assert "not built" in reason, reason
        if torch.version.cuda is None:
            assert "CPU-only" in reason, reason
    else:
        assert err in reason, reason


# ----------------------------------------------------------------------------------------------
# the built extension
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", CUDA_OPS)
def test_cuda_kernel_registered(built, op):
    qual = f"moe_kernels::{op}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(qual, "CUDA"), (
        f"moe_kernels._C_cuda registers no CUDA kernel for {qual}"
    )


def test_available_backends_without_device(built):
    ok, reason = moe_kernels.available_backends()["cuda"]
    if torch.cuda.is_available():
        assert ok is True, reason
    else:
        assert (ok, reason) == (False, "built; no CUDA device")


def test_debug_switch_reaches_the_cuda_extension(built):
    from moe_kernels import _debug

    before = _debug.debug_mode()
    try:
        for on in (True, False, True):
            _debug.set_debug_mode(on)
            assert built.debug_mode() is on
    finally:
        _debug.set_debug_mode(before)
    assert built.debug_mode() is before


def _ops_without_cuda_kernel():
    return [op for op in _registry.FORWARD_OPS if op not in CUDA_OPS]


@pytest.mark.parametrize("op", _ops_without_cuda_kernel() or ["none"])
def test_ops_without_cuda_kernel_fall_back(built, op, fresh):
    """An op with no CUDA kernel: explicit ``backend="cuda"`` raises saying so; auto mode runs it
    on the next backend (triton where usable, else the reference)."""
    if op == "none":
        pytest.skip("every forward op has a CUDA kernel")
    assert not torch._C._dispatch_has_kernel_for_dispatch_key(f"moe_kernels::{op}", "CUDA")
    T, E, k, H, N = 6, 4, 2, 8, 5
    with FakeTensorMode():
        make = Fake()
        x = make.floats(T, H)
        ids = make.ids(T, k, E)
        w = make.weights(T, k)
        w_gu, w_d = make.floats(E, 2 * N, H), make.floats(E, H, N)
        offs = torch.empty(E, dtype=torch.int32, device="cuda")

        def call(b):
            if op == "grouped_gemm":
                return moe_kernels.grouped_gemm(x, w_gu, offs, trans_b=True, backend=b)
            return moe_kernels.moe_ffn(x, w_gu, w_d, w, ids, backend=b)

        with pytest.raises(moe_kernels.BackendUnavailableError, match=f"no kernel for {op}"):
            call("cuda")
        spy = OpSpy()
        with spy:
            out = call(None)
    assert out.device.type == "cuda"
    want = "triton" if moe_kernels.available_backends()["triton"][0] else "reference"
    assert {_family(o) for o in spy.ops} == {want}, spy.ops


@pytest.mark.parametrize("op,name,dtype", _params())
def test_fake_cuda_matches_reference(built, op, name, dtype, fresh):
    """Under FakeTensorMode on device="cuda": backend="cuda" runs the compiled family's op and
    its outputs (and gradients) look like those of the reference under the same mode, and like
    those of the reference run on real CPU tensors."""
    run = RUNNERS[op][0]
    grad = op in BACKWARD_OP
    real, real_diff = run(Real(), "reference", name, dtype, grad)
    real_grads = []
    if grad:
        out, inputs = real_diff
        real_grads = torch.autograd.grad(out, inputs, torch.ones_like(out))

    with FakeTensorMode():
        spy = OpSpy()
        with spy:
            got, diff = run(Fake(), "cuda", name, dtype, grad)
            got_grads = _fake_backward(*diff) if grad else []
        ref, ref_diff = run(Fake(), "reference", name, dtype, grad)
        ref_grads = _fake_backward(*ref_diff) if grad else []

    assert {_family(o) for o in spy.ops} == {"compiled"}, spy.ops
    assert op in spy.ops, spy.ops
    if grad:
        assert BACKWARD_OP[op] in spy.ops, spy.ops
    for what, a, b, c in [
        ("output", got, ref, real),
        ("gradient", got_grads, ref_grads, real_grads),
    ]:
        assert len(a) == len(b) == len(c), what
        for i, (g, r, e) in enumerate(zip(a, b, c, strict=True)):
            assert _meta(g) == _meta(r), (what, i, _meta(g), _meta(r))
            assert g is None or g.device.type == "cuda", (what, i, g.device)
            assert _meta_no_device(g) == _meta_no_device(e), (what, i, _meta(g), _meta(e))


@pytest.mark.parametrize("wname", list(WEIGHTS))
def test_fake_unpermute_weight_dtypes(built, wname, fresh):
    with FakeTensorMode():
        spy = OpSpy()
        with spy:
            got, (out, inputs) = run_unpermute(
                Fake(), "cuda", "padded-oddH", torch.bfloat16, True, wname
            )
            grads = _fake_backward(out, inputs)
    real, (rout, rin) = run_unpermute(
        Real(), "reference", "padded-oddH", torch.bfloat16, True, wname
    )
    rgrads = torch.autograd.grad(rout, rin, torch.ones_like(rout))
    assert {_family(o) for o in spy.ops} == {"compiled"}, spy.ops
    assert _meta_no_device(got[0]) == _meta_no_device(real[0])
    assert [_meta_no_device(g) for g in grads] == [_meta_no_device(g) for g in rgrads]


def test_auto_picks_cuda_for_fake_cuda_tensors(built, fresh):
    """With the extension built and no device, auto mode on (fake) CUDA tensors runs the CUDA
    kernels' ops, and the ops without one on the next backend, in one pipeline."""
    T, E, k, H, N = 6, 4, 2, 8, 5
    with FakeTensorMode():
        make = Fake()
        logits, x = make.floats(T, E), make.floats(T, H, dtype=torch.bfloat16)
        w_gu = make.floats(E, N, H, dtype=torch.bfloat16)
        spy = OpSpy()
        with spy:
            w, ids = moe_kernels.topk_gating(logits, k)
            plan = moe_kernels.route(ids, E)
            xp = moe_kernels.permute(x, plan)
            h = moe_kernels.grouped_gemm(xp, w_gu, plan.offs, trans_b=True)
            out = moe_kernels.unpermute(h, plan, w)
    assert out.shape == (T, N) and out.device.type == "cuda" and out.dtype == torch.bfloat16
    fams = {o: _family(o) for o in spy.ops}
    for op in ("topk_gating", "route", "permute", "unpermute"):
        assert fams.get(op) == "compiled", spy.ops
    if "grouped_gemm" not in CUDA_OPS:
        assert "grouped_gemm" not in fams, spy.ops  # no CUDA kernel: not the compiled family


# ----------------------------------------------------------------------------------------------
# torch.compile over fake CUDA inputs
# ----------------------------------------------------------------------------------------------
def _compile_and_run(fn, *args):
    """``torch.compile(fn, fullgraph=True)`` through AOTAutograd without a compiler (as
    ``aot_eager``), run over fake inputs in the active mode; returns (outputs, call targets of
    the traced forward graphs)."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(
        fn, fullgraph=True, backend=aot_autograd(fw_compiler=record, bw_compiler=record)
    )
    out = compiled(*args)
    targets = [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    return out, targets


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("op", ["topk_gating", "route", "route-padded", "permute", "unpermute"])
@pytest.mark.parametrize("backend", ["cuda", None], ids=["cuda", "auto"])
def test_compile_traces_the_compiled_family(built, op, dtype, backend, fresh):
    T, E, k, H = 9, 6, 2, 16
    base, bs = op.split("-")[0], (4 if op.endswith("padded") else None)

    def fn(logits, ids, x, y, w):
        if base == "topk_gating":
            return moe_kernels.topk_gating(logits, k, backend=backend)
        plan = moe_kernels.route(ids, E, block_size=bs, backend=backend)
        if base == "route":
            return tuple(t for t in _plan_tensors(plan) if t is not None)
        if base == "permute":
            return moe_kernels.permute(x, plan, backend=backend)
        return moe_kernels.unpermute(y, plan, w, backend=backend)

    with FakeTensorMode():
        make = Fake()
        args = (
            make.floats(T, E, dtype=dtype),
            make.ids(T, k, E),
            make.floats(T, H, dtype=dtype),
            make.floats(T * k, H, dtype=dtype),
            make.weights(T, k),
        )
        got, targets = _compile_and_run(fn, *args)
        eager = fn(*args)
    ours = [t for t in targets if t.startswith("moe_kernels.")]
    assert f"moe_kernels.{base}.default" in ours, targets
    assert all(_family(t.rsplit(".", 1)[0]) == "compiled" for t in ours), ours
    got = got if isinstance(got, tuple) else (got,)
    eager = eager if isinstance(eager, tuple) else (eager,)
    assert [_meta(t) for t in got] == [_meta(t) for t in eager]
    assert all(t.device.type == "cuda" for t in got)
