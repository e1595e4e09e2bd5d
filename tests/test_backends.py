"""Backend control: available_backends(), use_backend, MOE_KERNELS_BACKEND, auto choice, errors.

Which backend ran is observed with a TorchDispatchMode that records the moe_kernels ops called
(``moe_kernels::X`` compiled, ``X_reference``, ``X_triton``), so the precedence rules are checked
on what actually executes, not on a helper's return value.  Also: the conftest's
``MOE_KERNELS_REQUIRE_BACKENDS`` gate, and every usable backend's forward against the reference.
"""

# ruff: noqa: E741  (I is the expert intermediate size, as everywhere in the package)
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from testutil import BACKEND_NAMES, backends, device_of, gen, max_rel_err, randn
from torch.utils._python_dispatch import TorchDispatchMode

import moe_kernels
from moe_kernels._tolerances import FFN_TOL

HERE = os.path.dirname(os.path.abspath(__file__))
SUFFIX = {"reference": "_reference", "triton": "_triton", "cpu": "", "cuda": ""}


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


def family_of(op_name: str) -> str:
    if op_name.endswith("_reference"):
        return "reference"
    if op_name.endswith("_triton"):
        return "triton"
    return "compiled"


def _ids(T, k, E, seed=0):
    g = gen(seed)
    return torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(torch.int32)


def all_op_calls(dtype=torch.float32, device="cpu"):
    """One call of every public op (name, thunk(backend)), inputs on ``device``."""
    T, E, k, H, I = 9, 6, 2, 16, 8
    d = device
    logits = randn(T, E, seed=1, dtype=dtype).to(d)
    ids = _ids(T, k, E).to(d)
    plan = moe_kernels.route(ids, E, block_size=4, backend="reference")
    x = randn(T, H, seed=2, dtype=dtype).to(d)
    y = randn(plan.num_rows, H, seed=3, dtype=dtype).to(d)
    tw = torch.rand(T, k, generator=gen(4)).to(d)
    w_gu = randn(E, 2 * I, H, seed=5, dtype=dtype, scale=0.3).to(d)
    w_d = randn(E, H, I, seed=6, dtype=dtype, scale=0.3).to(d)
    offs = torch.tensor([2, 2, 7, 9, 12, 13], dtype=torch.int32).to(d)
    a = randn(15, H, seed=7, dtype=dtype).to(d)
    return [
        ("topk_gating", lambda b: moe_kernels.topk_gating(logits, k, backend=b)[0]),
        ("route", lambda b: moe_kernels.route(ids, E, block_size=4, backend=b).slot_of_row),
        ("permute", lambda b: moe_kernels.permute(x, plan, backend=b)),
        ("unpermute", lambda b: moe_kernels.unpermute(y, plan, tw, backend=b)),
        (
            "grouped_gemm",
            lambda b: moe_kernels.grouped_gemm(a, w_gu, offs, trans_b=True, backend=b),
        ),
        ("moe_ffn", lambda b: moe_kernels.moe_ffn(x, w_gu, w_d, tw, ids, backend=b)),
    ]


def ran(thunk, backend=None):
    spy = OpSpy()
    with spy:
        out = thunk(backend)
    assert spy.ops, "no moe_kernels op ran"
    return spy.ops, out


#: backends under test on CUDA tensors (none without a GPU)
CUDA_BACKENDS = [b for b in backends() if device_of(b) == "cuda"]


def unavailable_backends():
    return [n for n, (ok, _) in moe_kernels.available_backends().items() if not ok]


# ----------------------------------------------------------------------------------------------
# available_backends
# ----------------------------------------------------------------------------------------------
def test_available_backends_structure():
    avail = moe_kernels.available_backends()
    assert isinstance(avail, dict)
    assert set(BACKEND_NAMES) <= set(avail)
    for name, value in avail.items():
        assert isinstance(value, tuple) and len(value) == 2, name
        ok, reason = value
        assert isinstance(ok, bool), name
        assert isinstance(reason, str) and reason.strip(), f"{name}: empty reason"
    assert avail["reference"][0] is True
    if not torch.cuda.is_available():
        assert avail["cuda"][0] is False


# ----------------------------------------------------------------------------------------------
# names and explicit choices
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op,thunk", all_op_calls(), ids=[c[0] for c in all_op_calls()])
def test_unknown_backend_name_raises_value_error(op, thunk, monkeypatch):
    with pytest.raises(ValueError, match="nonsense"):
        thunk("nonsense")
    with pytest.raises(ValueError, match="nonsense"):
        with moe_kernels.use_backend("nonsense"):
            thunk(None)
    monkeypatch.setenv("MOE_KERNELS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="nonsense"):
        thunk(None)


@pytest.mark.parametrize("op,thunk", all_op_calls(), ids=[c[0] for c in all_op_calls()])
def test_explicit_unavailable_backend_says_why(op, thunk):
    missing = unavailable_backends()
    if not missing:
        pytest.skip("every backend is available here")
    avail = moe_kernels.available_backends()
    for name in missing:
        with pytest.raises(moe_kernels.BackendUnavailableError) as info:
            thunk(name)
        msg = str(info.value)
        assert name in msg, msg
        assert avail[name][1] in msg, f"the error does not give the reason: {msg!r}"


@pytest.mark.parametrize("backend", [b for b in backends() if device_of(b) == "cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_explicit_choice_never_falls_back(backend, dtype):
    """backend=B runs B's own op, or raises: never silently another backend."""
    for op, thunk in all_op_calls(dtype):
        try:
            ops, _ = ran(thunk, backend)
        except (RuntimeError, TypeError, ValueError) as exc:
            assert backend in str(exc) or str(dtype).split(".")[-1] in str(exc), str(exc)
            continue
        want = "compiled" if backend in ("cpu", "cuda") else backend
        assert {family_of(o) for o in ops} == {want}, (op, ops)
        assert op + SUFFIX[backend] in ops


# ----------------------------------------------------------------------------------------------
# precedence: backend= > use_backend > MOE_KERNELS_BACKEND > auto
# ----------------------------------------------------------------------------------------------
def _bad_backend():
    missing = unavailable_backends()
    if not missing:
        pytest.skip("needs an unavailable backend to observe the choice")
    return missing[0]


@pytest.mark.parametrize("op,thunk", all_op_calls(), ids=[c[0] for c in all_op_calls()])
def test_precedence(op, thunk, monkeypatch):
    bad = _bad_backend()
    monkeypatch.delenv("MOE_KERNELS_BACKEND", raising=False)

    # the environment beats auto
    monkeypatch.setenv("MOE_KERNELS_BACKEND", bad)
    with pytest.raises(moe_kernels.BackendUnavailableError, match=bad):
        thunk(None)
    monkeypatch.setenv("MOE_KERNELS_BACKEND", "reference")
    ops, _ = ran(thunk)
    assert {family_of(o) for o in ops} == {"reference"}, ops

    # use_backend beats the environment
    monkeypatch.setenv("MOE_KERNELS_BACKEND", bad)
    with moe_kernels.use_backend("reference"):
        ops, _ = ran(thunk)
    assert {family_of(o) for o in ops} == {"reference"}, ops
    monkeypatch.setenv("MOE_KERNELS_BACKEND", "reference")
    with moe_kernels.use_backend(bad):
        with pytest.raises(moe_kernels.BackendUnavailableError, match=bad):
            thunk(None)

    # backend= beats use_backend and the environment
    monkeypatch.setenv("MOE_KERNELS_BACKEND", bad)
    with moe_kernels.use_backend(bad):
        ops, _ = ran(thunk, "reference")
    assert {family_of(o) for o in ops} == {"reference"}, ops
    monkeypatch.setenv("MOE_KERNELS_BACKEND", "reference")
    with moe_kernels.use_backend("reference"):
        with pytest.raises(moe_kernels.BackendUnavailableError, match=bad):
            thunk(bad)


def test_use_backend_nests_and_restores(monkeypatch):
    bad = _bad_backend()
    monkeypatch.delenv("MOE_KERNELS_BACKEND", raising=False)
    _, thunk = all_op_calls()[0]
    with moe_kernels.use_backend(bad):
        with moe_kernels.use_backend("reference"):
            ops, _ = ran(thunk)
            assert {family_of(o) for o in ops} == {"reference"}
        with pytest.raises(moe_kernels.BackendUnavailableError, match=bad):
            thunk(None)
    thunk(None)  # auto again
    with pytest.raises(KeyError):
        with moe_kernels.use_backend(bad):
            raise KeyError("boom")
    thunk(None)  # restored after an exception too


# ----------------------------------------------------------------------------------------------
# auto
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_auto_on_cpu_tensors(dtype, monkeypatch):
    """cpu, then reference (triton only with TRITON_INTERPRET=1); results equal the reference."""
    monkeypatch.delenv("MOE_KERNELS_BACKEND", raising=False)
    cpu_ok = moe_kernels.available_backends()["cpu"][0]
    for op, thunk in all_op_calls(dtype):
        ops, out = ran(thunk)
        fams = {family_of(o) for o in ops}
        assert len(fams) == 1, ops
        if os.environ.get("TRITON_INTERPRET") != "1":
            assert "triton" not in fams, ops
        if not cpu_ok:
            assert fams == {"reference"}, ops
        qual = f"moe_kernels::{op}"
        if (
            cpu_ok
            and dtype == torch.float32
            and torch._C._dispatch_has_kernel_for_dispatch_key(qual, "CPU")
        ):
            assert fams == {"compiled"}, f"auto skipped the cpu kernel of {op}: {ops}"
        ref = thunk("reference")
        if out.dtype.is_floating_point:
            # two computations in dtype, each within FFN_TOL of the exact result
            assert max_rel_err(out, ref) <= 2 * FFN_TOL[dtype], op
        else:
            assert torch.equal(out, ref), op


# ----------------------------------------------------------------------------------------------
# CUDA tensors (skipped without a GPU)
# ----------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_backends_match_cpu_reference(dtype, monkeypatch):
    """Every backend usable on CUDA tensors (and auto) against the reference run on CPU."""
    monkeypatch.delenv("MOE_KERNELS_BACKEND", raising=False)
    cpu_calls = dict(all_op_calls(dtype, "cpu"))
    for backend in [*CUDA_BACKENDS, None]:
        for op, thunk in all_op_calls(dtype, "cuda"):
            try:
                ops, out = ran(thunk, backend)
            except moe_kernels.BackendUnavailableError as exc:
                assert backend is not None, f"auto found no backend for {op}: {exc}"
                continue
            assert out.device.type == "cuda", (op, backend)
            fams = {family_of(o) for o in ops}
            assert len(fams) == 1, (op, ops)  # one backend ran the whole op
            ref = cpu_calls[op]("reference")
            if out.dtype.is_floating_point:
                assert not torch.isnan(out).any(), (op, backend)
                assert max_rel_err(out.cpu(), ref) <= 2 * FFN_TOL[dtype], (op, backend)
            else:
                assert torch.equal(out.cpu(), ref), (op, backend)


#: the backends that promise never to synchronise with the host on CUDA tensors (the reference
#: does: its grouped_gemm calls tolist() and its moe_ffn nonzero())
NO_SYNC_BACKENDS = ("cuda", "triton")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [b for b in NO_SYNC_BACKENDS if b in CUDA_BACKENDS])
def test_no_host_sync_on_cuda(backend, monkeypatch):
    """Outside debug mode no op of the compiled and Triton backends synchronises with the host
    (sizes never depend on values)."""
    from moe_kernels import _backends, _debug

    monkeypatch.delenv("MOE_KERNELS_DEBUG", raising=False)
    monkeypatch.delenv("MOE_KERNELS_BACKEND", raising=False)
    before = _debug.debug_mode()
    _debug.set_debug_mode(False)  # debug mode's value checks may sync
    # the ops this backend has (the cuda backend has no grouped_gemm / moe_ffn kernel yet)
    has_op = _backends._BACKENDS[backend].has_op
    calls = [(op, thunk) for op, thunk in all_op_calls(torch.float32, "cuda") if has_op(op)]
    try:
        for _, thunk in calls:  # warm up (first calls may compile / autotune)
            thunk(backend)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        for op, thunk in calls:
            try:
                thunk(backend)
            except RuntimeError as exc:
                raise AssertionError(f"{op} on {backend} syncs: {exc}") from exc
    finally:
        torch.cuda.set_sync_debug_mode("default")
        _debug.set_debug_mode(before)


@pytest.mark.gpu
def test_mixed_cpu_cuda_devices_rejected():
    x = randn(4, 8, seed=1).cuda()
    offs = torch.tensor([2, 4], dtype=torch.int32)  # on CPU
    with pytest.raises((ValueError, RuntimeError), match=r"\boffs\b|\ba\b"):
        moe_kernels.grouped_gemm(x, randn(2, 8, 3, seed=2).cuda(), offs)


# ----------------------------------------------------------------------------------------------
# conftest: MOE_KERNELS_REQUIRE_BACKENDS
# ----------------------------------------------------------------------------------------------
def _pytest_with_required(required: str):
    env = dict(os.environ)
    env["MOE_KERNELS_REQUIRE_BACKENDS"] = required
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        os.path.join(HERE, "test_backends.py") + "::test_available_backends_structure",
    ]
    return subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True, timeout=300)


def _sessionstart_outcome(required: str, monkeypatch) -> str | None:
    """Runs the conftest's session-start hook in-process: None if it lets the session run,
    else the message it stops the session with."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "_moe_conftest", os.path.join(HERE, "conftest.py")
    )
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    monkeypatch.setenv("MOE_KERNELS_REQUIRE_BACKENDS", required)
    try:
        conftest.pytest_sessionstart(None)
    except pytest.exit.Exception as exc:
        assert exc.returncode not in (0, None)
        return str(exc.msg)
    return None


def test_require_backends_hook(monkeypatch):
    assert _sessionstart_outcome("reference", monkeypatch) is None
    assert _sessionstart_outcome(" reference , ", monkeypatch) is None
    msg = _sessionstart_outcome("reference,no_such_backend", monkeypatch)
    assert msg is not None and "no_such_backend" in msg
    avail = moe_kernels.available_backends()
    for name in unavailable_backends():
        msg = _sessionstart_outcome(f"reference,{name}", monkeypatch)
        assert msg is not None and name in msg and avail[name][1] in msg, msg


def test_require_backends_fails_the_session():
    """End to end: a required backend that is missing stops pytest before any test runs."""
    missing = unavailable_backends()
    required = ",".join(["reference", *missing[:1], "no_such_backend"])
    bad = _pytest_with_required(required)
    text = bad.stdout + bad.stderr
    assert bad.returncode != 0, text
    assert "no_such_backend" in text, text
    assert "1 passed" not in text, "the session ran tests instead of failing at start"
    if missing:
        reason = moe_kernels.available_backends()[missing[0]][1]
        assert missing[0] in text and reason in text, text


# ----------------------------------------------------------------------------------------------
# the per-call fast path: cached backend choice, kernel called below autograd without grads
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", [b for b in backends() if device_of(b) == "cpu"])
def test_grad_tracking_follows_each_call(backend):
    """A call whose inputs need no gradient skips the autograd layer; the next call with
    requires_grad inputs (or the same under no_grad) must still get exactly the usual tracking,
    whatever the previous calls did."""
    T, H, I, E, k = 5, 24, 16, 4, 2
    x = randn(T, H, seed=1)
    wgu = randn(E, 2 * I, H, seed=2, scale=0.2)
    wd = randn(E, H, I, seed=3, scale=0.2)
    tw = torch.rand(T, k, generator=gen(4))
    ti = torch.randint(0, E, (T, k), generator=gen(5))

    def call(*args):
        return moe_kernels.moe_ffn(*args, ti, backend=backend)

    plain = call(x, wgu, wd, tw)
    assert not plain.requires_grad and plain.grad_fn is None
    xg = x.clone().requires_grad_()
    tracked = call(xg, wgu, wd, tw)
    assert tracked.grad_fn is not None
    assert torch.equal(tracked.detach(), plain)
    tracked.square().sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0
    with torch.no_grad():
        assert call(xg, wgu, wd, tw).grad_fn is None
    again = call(x, wgu, wd, tw.clone().requires_grad_())
    assert again.grad_fn is not None


def test_backend_choice_cache_follows_the_environment(monkeypatch):
    """The cached choice is keyed on everything it depends on: switching MOE_KERNELS_BACKEND or
    use_backend between two identical calls switches the backend that runs."""
    monkeypatch.delenv("MOE_KERNELS_BACKEND", raising=False)
    x = randn(3, 8, seed=6)
    thunk = lambda b: moe_kernels.topk_gating(x, 2, backend=b)  # noqa: E731
    auto = {family_of(o) for o in ran(thunk)[0]}
    monkeypatch.setenv("MOE_KERNELS_BACKEND", "reference")
    assert {family_of(o) for o in ran(thunk)[0]} == {"reference"}
    monkeypatch.delenv("MOE_KERNELS_BACKEND")
    assert {family_of(o) for o in ran(thunk)[0]} == auto
    with moe_kernels.use_backend("reference"):
        assert {family_of(o) for o in ran(thunk)[0]} == {"reference"}
    assert {family_of(o) for o in ran(thunk)[0]} == auto


def test_moe_ffn_unchecked_call_types_errors_and_keeps_kernel_errors(monkeypatch):
    """moe_ffn runs a self-checking backend's op before any Python check.  When that call fails,
    the Python checks decide: a bad argument gets its TypeError/ValueError (no chained kernel
    error), valid arguments keep the kernel's own error."""
    from moe_kernels import _api

    calls = []

    def failing_call_op(op, device, dtype, backend, args, *, checked=True):
        calls.append(checked)
        raise RuntimeError("kernel failed")

    monkeypatch.setattr(_api, "call_op", failing_call_op)
    T, H, I, E, k = 3, 8, 4, 2, 1
    x = randn(T, H, seed=7)
    args = (randn(E, 2 * I, H, seed=8), randn(E, H, I, seed=9))
    tw, ti = torch.rand(T, k, generator=gen(10)), torch.zeros(T, k, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="kernel failed"):
        moe_kernels.moe_ffn(x, *args, tw, ti)
    assert calls == [False]
    with pytest.raises(ValueError, match="x") as info:
        moe_kernels.moe_ffn(x[0], *args, tw, ti)
    assert info.value.__cause__ is None and info.value.__suppress_context__
    with pytest.raises(TypeError, match="topk_ids"):
        moe_kernels.moe_ffn(x, *args, tw, ti.float())


@pytest.mark.skipif("cpu" not in backends(), reason="the compiled CPU backend is not under test")
@pytest.mark.parametrize("op", [name for name, _ in all_op_calls()])
def test_typed_call_path(op, monkeypatch):
    """Compiled ops run through ``_C.typed.<op>`` (one typed C++ dispatcher call): same result,
    bit for bit, as the boxed ``torch.ops`` overload; still seen by dispatch modes and the
    profiler; a torch function mode (which the typed call would not see) takes the boxed path."""
    from torch.overrides import TorchFunctionMode

    from moe_kernels import _backends

    thunk = dict(all_op_calls())[op]
    typed_calls = []
    real = _backends._typed_call

    def counting(name):
        fn = real(name)
        assert fn is not None, f"no typed call for {name}"

        def wrapper(*args):
            typed_calls.append(name)
            return fn(*args)

        return wrapper

    monkeypatch.setattr(_backends, "_call_cache", {})
    monkeypatch.setattr(_backends, "_typed_call", counting)
    ops, typed_out = ran(thunk, "cpu")
    assert typed_calls == [op] and op in ops

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        thunk("cpu")
    assert f"moe_kernels::{op}" in {e.name for e in prof.events()}

    class Seen(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            schema = getattr(func, "_schema", None)
            if schema is not None:
                self.names.append(schema.name)
            return func(*args, **(kwargs or {}))

    typed_calls.clear()
    with Seen() as seen:
        boxed_out = thunk("cpu")
    assert typed_calls == [] and f"moe_kernels::{op}" in seen.names
    assert type(boxed_out) is type(typed_out)
    assert torch.equal(boxed_out, typed_out)
