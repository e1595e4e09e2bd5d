"""Which backends exist on this machine, and which one runs a given call.

Precedence of the choice: the ``backend=`` argument, then :func:`use_backend`, then the
``MOE_KERNELS_BACKEND`` environment variable, then auto. Auto picks, for CUDA tensors, cuda →
triton → reference; for CPU tensors, cpu → (triton when ``TRITON_INTERPRET=1``) → reference; and
falls back to the next backend when one lacks the op or the dtype. An explicit choice never falls
back: it raises :class:`BackendUnavailableError` saying why.

The ``cuda`` backend is the compiled family's CUDA kernels (``moe_kernels._C_cuda``, registered
under the ``CUDA`` dispatch key). It serves only the ops that have a CUDA kernel (so far the
gating, routing and permutation ops); for the others auto falls back to triton, then the
reference. Without a CUDA device :func:`available_backends` reports a built extension as
``(False, "built; no CUDA device")``, yet the backend is still chosen for tensors on device
``cuda``: without a device such tensors can only be fake ones (``FakeTensorMode``,
``torch.compile`` tracing), so the ops trace on ``device="cuda"`` exactly as they would run on a
GPU.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

__all__ = [
    "BACKEND_NAMES",
    "BackendUnavailableError",
    "available_backends",
    "use_backend",
    "select_backend",
]

BACKEND_NAMES: tuple[str, ...] = ("reference", "cpu", "triton", "cuda")

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_FLOATS64 = _FLOATS + (torch.float64,)

# Backend forced by use_backend(); a plain list so torch.compile traces it without a graph break.
_forced: list[str] = []


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this call (the message says why)."""


@dataclass(frozen=True)
class _Backend:
    name: str
    suffix: str  # op-name suffix of this backend's family ("" = the compiled ops)
    dispatch_key: str | None  # compiled ops: the dispatch key whose kernels this backend uses
    dtypes: tuple[torch.dtype, ...]
    # the ops of this backend that a public function calls with ``call_op(..., checked=False)``
    # (so far moe_ffn) check every argument that function checks (a clear error, never a wrong
    # result): the function skips its Python checks and runs them only to type an error
    checks_args: bool = False

    def op(self, name: str):
        return getattr(torch.ops.moe_kernels, name + self.suffix)

    def has_op(self, name: str) -> bool:
        if self.name == "triton":
            from . import _registry

            return name in _registry.triton_impls()
        qual = f"moe_kernels::{name}{self.suffix}"
        if not torch._C._dispatch_has_kernel(qual):
            return False
        return self.dispatch_key is None or torch._C._dispatch_has_kernel_for_dispatch_key(
            qual, self.dispatch_key
        )

    def devices(self) -> tuple[str, ...]:
        if self.name == "reference":
            return ("cpu", "cuda", "meta")
        if self.name == "cpu":
            return ("cpu",)
        if self.name == "cuda":
            return ("cuda",)
        return ("cuda", "cpu") if _triton_interpret() else ("cuda",)


def _needs_grad(args: tuple) -> bool:
    if not torch.is_grad_enabled():
        return False
    return any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)


_BACKENDS = {
    "reference": _Backend("reference", "_reference", None, _FLOATS64),
    "cpu": _Backend("cpu", "", "CPU", _FLOATS, checks_args=True),
    "triton": _Backend("triton", "_triton", None, _FLOATS),
    "cuda": _Backend("cuda", "", "CUDA", _FLOATS),
}


# ``os.environ.get`` runs several Python-level Mapping methods, slow with the cold caches of a
# decode step (bench/NOTES.md, "Per-call cost of the public ops"), and every call reads two
# variables.  On POSIX CPython the environment is a dict of bytes underneath (kept in step by
# ``os.environ[...] = ...`` and ``del``), which is read directly.
_ENV_BYTES: dict | None = getattr(os.environ, "_data", None) if os.name == "posix" else None


def getenv(name: str) -> str | None:
    """``os.environ.get(name)``, cheaper on POSIX (see above)."""
    if _ENV_BYTES is not None:
        value = _ENV_BYTES.get(name.encode())
        return None if value is None else value.decode(errors="surrogateescape")
    return os.environ.get(name)


def _triton_interpret() -> bool:
    return getenv("TRITON_INTERPRET") not in (None, "", "0")


#: ``available_backends()["cuda"]`` when ``moe_kernels._C_cuda`` is loaded but no CUDA device is
#: visible. The backend still serves tensors on device ``cuda`` then (fake ones: see the module
#: docstring and :func:`_why_not`).
BUILT_NO_DEVICE = "built; no CUDA device"


def _cuda_not_loaded(err: str) -> str:
    """Why the cuda backend is missing, given the load error of ``moe_kernels._C_cuda``: not
    built (and why it was not), or built but not loadable (e.g. built against another torch)."""
    if err == "not built" or err.startswith("ModuleNotFoundError"):
        if torch.version.cuda is None:
            why = f"torch {torch.__version__} is a CPU-only build"
        else:
            why = (
                "the install step builds it when torch is a CUDA build and nvcc is found, "
                "unless MOE_KERNELS_BUILD_CUDA=0"
            )
        return f"the CUDA extension moe_kernels._C_cuda is not built ({why})"
    return f"the CUDA extension moe_kernels._C_cuda is built but could not be loaded: {err}"


def _availability(name: str) -> tuple[bool, str]:
    from . import _registry

    if name == "reference":
        return True, "pure PyTorch; always available"
    if name == "cpu":
        err = _registry.extension_error("_C")
        if err:
            return False, f"the compiled extension moe_kernels._C could not be loaded: {err}"
        missing = [n for n in _registry.FORWARD_OPS if not _BACKENDS["cpu"].has_op(n)]
        if len(missing) == len(_registry.FORWARD_OPS):
            return False, "moe_kernels._C has no CPU kernels in this build"
        from . import _C

        isa = _C.cpu_isa()
        if _C.cpu_brgemm_route() != "off":
            isa += f", oneDNN brgemm ({_C.cpu_brgemm_route()})"
            if _C.cpu_amx_kernel():
                isa += " + own AMX kernel"
        if missing:
            return True, f"C++ kernels ({isa}); ops without a CPU kernel fall back: {missing}"
        return True, f"C++ kernels ({isa})"
    if name == "cuda":
        err = _registry.extension_error("_C_cuda")
        if err:
            return False, _cuda_not_loaded(err)
        if not torch.cuda.is_available():
            return False, BUILT_NO_DEVICE
        missing = [n for n in _registry.FORWARD_OPS if not _BACKENDS["cuda"].has_op(n)]
        if len(missing) == len(_registry.FORWARD_OPS):
            return False, "moe_kernels._C_cuda has no CUDA kernels in this build"
        where = f"CUDA kernels on {torch.cuda.get_device_name()}"
        if missing:
            return True, f"{where}; ops without a CUDA kernel fall back: {missing}"
        return True, where
    if name == "triton":
        ok, why = _registry.triton_status()
        return ok, why
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKEND_NAMES}")


def available_backends() -> dict[str, tuple[bool, str]]:
    """Every backend name mapped to ``(available, reason)``.

    Example::

        >>> moe_kernels.available_backends()["reference"]
        (True, 'pure PyTorch; always available')
    """
    return {name: _availability(name) for name in BACKEND_NAMES}


def _check_name(name: str | None, what: str) -> str | None:
    if name is None or name == "auto":
        return None
    if not isinstance(name, str) or name not in BACKEND_NAMES:
        raise ValueError(
            f"{what}: unknown backend {name!r}; expected one of {BACKEND_NAMES} or 'auto'"
        )
    return name


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Run the ops in this block on backend ``name`` (``None`` or ``"auto"``: automatic choice).

    The ``backend=`` argument of an op still wins over this context manager.
    """
    _forced.append(_check_name(name, "use_backend") or "auto")
    try:
        yield
    finally:
        _forced.pop()


def _why_not(b: _Backend, op: str, device: torch.device, dtype: torch.dtype | None) -> str | None:
    ok, reason = _availability(b.name)
    if not ok:
        if reason != BUILT_NO_DEVICE:
            return reason
        # The CUDA extension is built but no device is visible: tensors on device "cuda" can
        # then only be fake ones (FakeTensorMode, torch.compile tracing), which this backend
        # serves as it would on a GPU, so that its ops trace on device="cuda".
        if device.type != "cuda":
            return f"it does not run on {device.type} tensors ({reason})"
    if device.type not in b.devices():
        return f"it does not run on {device.type} tensors"
    if dtype is not None and dtype not in b.dtypes:
        return f"it does not support {dtype}"
    if not b.has_op(op):
        return f"it has no kernel for {op}"
    return None


def _auto_order(device: torch.device) -> tuple[str, ...]:
    if device.type == "cuda":
        return ("cuda", "triton", "reference")
    if device.type == "cpu":
        return ("cpu", "triton", "reference") if _triton_interpret() else ("cpu", "reference")
    return ("reference",)


def requested_backend(backend: str | None = None) -> str | None:
    """The explicitly requested backend name (argument > use_backend > environment), or None."""
    if backend is not None:  # "auto" here means auto, whatever use_backend or the environment say
        return _check_name(backend, "backend")
    if _forced:
        return None if _forced[-1] == "auto" else _forced[-1]
    name = _check_name(getenv("MOE_KERNELS_BACKEND") or None, "MOE_KERNELS_BACKEND")
    return name


def select_backend(
    op: str, device: torch.device, dtype: torch.dtype | None, backend: str | None = None
) -> _Backend:
    """The backend that runs ``op`` on tensors of ``device``/``dtype`` (what :func:`call_op`
    runs; raises :class:`BackendUnavailableError` as it would).

    Under ``torch.compile`` the choice is made once, while tracing, and baked into the graph.
    """
    return _BACKENDS[_select_name(op, device.type, dtype, backend)]


@torch.compiler.assume_constant_result
def _select_name(op: str, device_type: str, dtype: torch.dtype | None, backend: str | None) -> str:
    key = (op, device_type, dtype, backend, _forced[-1] if _forced else None, _env_key())
    hit = _call_cache.get(key)
    if hit is None:
        hit = _resolve(key, op, torch.device(device_type), dtype, backend)
    return hit[0].name


def _env_key() -> tuple:
    """The environment variables the choice depends on, as cheaply as they can be read."""
    if _ENV_BYTES is not None:
        return (_ENV_BYTES.get(b"MOE_KERNELS_BACKEND"), _ENV_BYTES.get(b"TRITON_INTERPRET"))
    return (os.environ.get("MOE_KERNELS_BACKEND"), os.environ.get("TRITON_INTERPRET"))


# The one cache of the call path: (op, device, dtype, backend argument, use_backend's choice,
# MOE_KERNELS_BACKEND, TRITON_INTERPRET) -> (backend, its compiled op's default overload or
# None, its typed C++ dispatcher call or None). The key holds every input of the choice (each
# backend's availability and kernels are fixed once moe_kernels is imported), so an entry never
# goes stale; a repeated call skips the walk over the candidates and every dispatcher lookup.
_call_cache: dict[tuple, tuple[_Backend, object, object]] = {}


def _resolve(key: tuple, op: str, device: torch.device, dtype, backend) -> tuple:
    """Choose the backend for ``key`` and cache what calling it needs."""
    b = _BACKENDS[_choose(op, device, dtype, requested_backend(backend))]
    compiled = b.dispatch_key is not None
    hit = _call_cache[key] = (
        b,
        b.op(op).default if compiled else None,
        _typed_call(op + b.suffix) if compiled else None,
    )
    return hit


def _typed_call(op: str):
    """``moe_kernels._C.typed.<op>``, or None: ``torch.ops.moe_kernels.<op>.default`` as
    one typed C++ dispatcher call, below the autograd layer when no tensor argument needs a
    gradient (decided in C++), without the boxed parsing of the Python arguments."""
    try:
        from . import _C
    except ImportError:
        return None
    return getattr(getattr(_C, "typed", None), op, None)


def call_op(
    op: str,
    device: torch.device,
    dtype: torch.dtype | None,
    backend: str | None,
    args: tuple,
    *,
    checked: bool = True,
):
    """Run ``op`` on the backend :func:`select_backend` names: the one path of every public op.

    Its per-call cost matters in decode, where each layer's call starts with cold caches (the
    previous layers' weights have just streamed through them) and every Python function, dict
    and tensor attribute on the way costs microseconds (bench/NOTES.md, "Per-call cost of the
    public ops"): one dictionary lookup finds the backend, then a compiled op runs as its typed
    C++ dispatcher call (or, with a ``__torch_function__`` override or mode active, its boxed
    overload, below the autograd layer when no tensor argument needs a gradient); a Python
    family's op runs through ``torch.ops``.

    ``checked=False``: ``args`` have not been checked in Python; the op runs only if the chosen
    backend's op checks them itself (:attr:`_Backend.checks_args`) and torch.compile is not
    tracing, otherwise nothing runs and ``NotImplemented`` is returned.
    """
    if torch.compiler.is_compiling():
        if not checked:
            return NotImplemented  # traced once: the Python checks cost nothing per call
        return select_backend(op, device, dtype, backend).op(op)(*args)
    # _env_key(), inlined: no function call on the hot path
    if _ENV_BYTES is not None:
        env = (_ENV_BYTES.get(b"MOE_KERNELS_BACKEND"), _ENV_BYTES.get(b"TRITON_INTERPRET"))
    else:
        env = (os.environ.get("MOE_KERNELS_BACKEND"), os.environ.get("TRITON_INTERPRET"))
    key = (op, device, dtype, backend, _forced[-1] if _forced else None, env)
    hit = _call_cache.get(key)
    if hit is None:
        hit = _resolve(key, op, device, dtype, backend)
    b, overload, typed = hit
    if not (checked or b.checks_args):
        return NotImplemented
    if typed is not None and not torch._C._has_torch_function(args):
        return typed(*args)  # decides in C++ whether the autograd layer is needed
    if overload is None or _needs_grad(args):
        return b.op(op)(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return overload(*args)


#: forward op -> its op that also returns what the backward needs, on the backends whose kernels
#: keep it (the others re-run that part of the forward in the backward)
_TRAIN_OPS = {"moe_ffn": "moe_ffn_train"}
_KEEPS_ACTIVATIONS = frozenset({"cpu"})


def call_train_op(
    op: str, device: torch.device, dtype: torch.dtype | None, backend: str | None, args: tuple
):
    """``op``'s output through its train op (:data:`_TRAIN_OPS`), for a call that needs
    gradients, where the backend :func:`select_backend` names keeps the forward's activations for
    the backward; ``NotImplemented`` where it does not.  ``args`` must have been checked."""
    b = select_backend(op, device, dtype, backend)
    if b.name not in _KEEPS_ACTIVATIONS:
        return NotImplemented
    return b.op(_TRAIN_OPS[op])(*args)[0]


def needs_grad(args: tuple) -> bool:
    """Whether a call with ``args`` records an autograd graph."""
    return _needs_grad(args)


def _choose(op: str, device: torch.device, dtype: torch.dtype | None, name: str | None) -> str:
    if name is not None:
        why = _why_not(_BACKENDS[name], op, device, dtype)
        if why is not None:
            raise BackendUnavailableError(f"backend {name!r} cannot run {op}: {why}")
        return name
    reasons = []
    for cand in _auto_order(device):
        why = _why_not(_BACKENDS[cand], op, device, dtype)
        if why is None:
            return cand
        reasons.append(f"{cand}: {why}")
    raise BackendUnavailableError(f"no backend can run {op} here ({'; '.join(reasons)})")
