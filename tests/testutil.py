"""Helpers shared by the test modules (a plain module: ``conftest`` names clash across folders).

* The backends under test: :func:`backends` lists every backend usable on this machine, restricted
  by ``MOE_KERNELS_TEST_BACKENDS=name,name`` (the Triton interpreter run selects ``triton`` only).
  A new backend needs only its name in :data:`BACKEND_NAMES` (and its op suffix in
  :data:`SUFFIX`): every op module's cases then run on it.
* :func:`device_of`: the tensor device a backend runs on here (Triton: CPU tensors under
  ``TRITON_INTERPRET=1``, else CUDA; cuda: CUDA, so it is under test only where a device is
  present).  A test parametrised with a backend that lacks its op (cuda: :data:`CUDA_OPS`) is
  skipped by the conftest with that reason.
* :func:`fits`: under the Triton interpreter only the cases marked ``tiny`` run (each program
  costs milliseconds there).
* Seeded random data, the checks against the reference (:func:`check_vs_reference`, with the
  tolerances of :mod:`moe_kernels._tolerances`), the CPU's instruction-set flags.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess

import pytest
import torch

from moe_kernels._tolerances import (
    GPU_FP32_TOL,
    GRAD_FACTOR,
    KERNEL_TOL,
    TWO_X_FLOOR,
    max_rel_err,
    within_2x,
)

__all__ = ["max_rel_err"]  # re-exported: the one error metric

BACKEND_NAMES = ("reference", "cpu", "triton", "cuda")
#: suffix of each backend's ops in ``torch.ops.moe_kernels`` (cpu and cuda: the compiled family)
SUFFIX = {"reference": "_reference", "cpu": "", "cuda": "", "triton": "_triton"}
#: the ops (schemas) that ``moe_kernels._C_cuda`` registers CUDA kernels for (every op); auto mode
#: would fall back for any other
CUDA_OPS = (
    "topk_gating",
    "topk_gating_backward",
    "route",
    "permute",
    "unpermute",
    "unpermute_backward",
    "grouped_gemm",
    "grouped_gemm_backward",
    "moe_ffn",
    "moe_ffn_backward",
)
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
NS = torch.ops.moe_kernels


def _selection() -> set[str] | None:
    raw = os.environ.get("MOE_KERNELS_TEST_BACKENDS", "")
    names = {n.strip() for n in raw.split(",") if n.strip()}
    return names or None


def device_of(backend: str) -> str:
    """The device of the tensors ``backend`` is tested on here."""
    if backend == "cuda":
        return "cuda"
    if backend == "triton":
        return "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"
    return "cpu"


@functools.lru_cache(maxsize=1)
def _usable() -> tuple[str, ...]:
    import moe_kernels

    avail = moe_kernels.available_backends()
    names = []
    for name in BACKEND_NAMES:
        if not avail.get(name, (False, ""))[0]:
            continue
        if device_of(name) == "cuda" and not torch.cuda.is_available():
            continue
        if name == "triton" and device_of(name) == "cpu" and not INTERPRET:
            continue
        names.append(name)
    return tuple(names)


def backends(*, reference: bool = True) -> list[str]:
    """The backends under test (usable here and selected); ``reference=False`` leaves the
    reference out (for comparisons against it)."""
    sel = _selection()
    return [n for n in _usable() if (sel is None or n in sel) and (reference or n != "reference")]


def reference_selected() -> bool:
    """Whether the reference-only tests (reference vs naive loops, gradcheck) run here."""
    sel = _selection()
    return sel is None or "reference" in sel


#: marks a test of the reference backend alone (skipped when the run selects other backends)
reference_only = pytest.mark.skipif(
    not reference_selected(), reason="reference-only test: MOE_KERNELS_TEST_BACKENDS excludes it"
)


def fits(backend: str, tiny: bool) -> bool:
    """Under the Triton interpreter only ``tiny`` cases run."""
    return tiny or not (backend == "triton" and device_of(backend) == "cpu")


def backend_cases(cases, tiny=lambda case: True, ids=None):
    """``pytest.param(backend, case)`` for every backend under test (reference excluded) and
    every case that fits it."""
    out = []
    for b in backends(reference=False):
        for i, c in enumerate(cases):
            if fits(b, tiny(c)):
                name = ids(c) if callable(ids) else str(i)
                out.append(pytest.param(b, c, id=f"{b}-{name}"))
    return out


def op(name: str, backend: str):
    """``torch.ops.moe_kernels.<name>`` of ``backend``'s family."""
    return getattr(NS, name + SUFFIX[backend])


def gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def randn(*shape, seed: int, dtype=torch.float32, scale: float = 1.0, device="cpu"):
    t = (torch.randn(*shape, generator=gen(seed), dtype=torch.float64) * scale).to(dtype)
    return t.to(device)


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = ""):
    """Same shape, no NaN (a poisoned element never written shows up), max_rel_err <= tol."""
    assert tuple(actual.shape) == tuple(expected.shape), (what, actual.shape, expected.shape)
    assert not torch.isnan(actual).any(), f"{what}: NaN in output (an element was never written?)"
    err = max_rel_err(actual, expected)
    assert err <= tol, f"{what}: max relative error {err:.3e} > {tol:.1e}"


def check_vs_reference(
    actual,
    torch_same_dtype,
    exact,
    dtype,
    what: str = "",
    *,
    budget: float | None = None,
    device_type: str | None = None,
) -> None:
    """A backend's float output against the reference, by the "2x PyTorch's own error" rule:
    its error against ``exact`` (the reference in float64) is at most twice that of
    ``torch_same_dtype`` (the reference run in ``dtype``), or twice the noise floor of
    :data:`~moe_kernels._tolerances.TWO_X_FLOOR` (fp32 on a GPU: TF32's; ``device_type``: where
    ``actual`` was computed, when it has been copied to the CPU since).  With ``budget``:
    the error against ``exact`` is at most ``budget`` instead (see :func:`kernel_budget`).
    Always: same shape and dtype as the reference, every element finite (so a poisoned element
    never written fails)."""
    actual = actual.detach()
    assert tuple(actual.shape) == tuple(exact.shape), (what, actual.shape, exact.shape)
    assert actual.dtype == torch_same_dtype.dtype, (what, actual.dtype, torch_same_dtype.dtype)
    assert torch.isfinite(actual).all(), f"{what}: non-finite output (an unwritten element?)"
    if budget is not None:
        err = max_rel_err(actual, exact)
        assert err <= budget, f"{what}: max relative error {err:.3e} > {budget:.1e}"
        return
    floor = TWO_X_FLOOR[dtype]
    if dtype == torch.float32 and (device_type or actual.device.type) == "cuda":
        floor = GPU_FP32_TOL  # TF32 rounds the inputs: a fixed error scale, not 2x fp32 torch
    ok, e, e_torch = within_2x(actual, torch_same_dtype, exact, floor)
    assert ok, f"{what}: error {e:.3g} vs PyTorch's {e_torch:.3g} in {dtype}"


def kernel_budget(dtype, device_type: str, *, grad: bool = False) -> float:
    """The fixed error budget of :data:`~moe_kernels._tolerances.KERNEL_TOL` for outputs computed
    from ``dtype`` inputs (TF32's for fp32 on a GPU), doubled for gradients."""
    tol = GPU_FP32_TOL if dtype == torch.float32 and device_type == "cuda" else KERNEL_TOL[dtype]
    return tol * (GRAD_FACTOR if grad else 1)


def to64(*ts):
    return [None if t is None else t.detach().double() for t in ts]


def cpu(*ts):
    return [None if t is None else t.detach().cpu() for t in ts]


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (``moe_kernels.bench.machine.cpu_flags``: the one /proc/cpuinfo
    parser)."""
    from moe_kernels.bench.machine import cpu_flags as flags

    return flags()


def cpu_has(*flags: str) -> bool:
    return set(flags) <= cpu_flags()


#: the source tree's kernel sources (tests/cpp checkers compile them)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")


def require_cpp_toolchain() -> str:
    """The C++ compiler (``$CXX`` or g++) for the tests/cpp checkers; skips without the source
    tree or a compiler."""
    if not os.path.isdir(CSRC):
        pytest.skip("needs the source tree (csrc/)")
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        pytest.skip("no C++ compiler")
    return cxx


def build_cpp_check(
    out_dir: str, name: str, sources: list[str], flags: list[str], libs: list[str] = ()
) -> str:
    """``tests/cpp/<name>.cpp`` compiled with ``sources`` (paths under ``csrc/``) into
    ``out_dir``, ``flags`` before the sources and ``libs`` after them: the executable's path.
    Skips as :func:`require_cpp_toolchain`; a failed build fails the test with the compiler's
    output."""
    exe = os.path.join(out_dir, name)
    cmd = [
        require_cpp_toolchain(),
        "-std=c++20",
        "-O2",
        "-I",
        CSRC,
        *flags,
        os.path.join(ROOT, "tests", "cpp", f"{name}.cpp"),
        *[os.path.join(CSRC, s) for s in sources],
        "-o",
        exe,
        *libs,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"building {name} failed:\n{proc.stderr[-6000:]}"
    return exe


def random_ids(T, k, E, seed, drop=0.0, one_expert=None):
    """Router-like ids [T, k] int32 (distinct per token when k <= E), a fraction ``drop``
    replaced by out-of-range ids (-1 or >= E: another rank's experts), or every pair on
    ``one_expert``."""
    g = gen(seed)
    if one_expert is not None:
        ids = torch.full((T, k), one_expert, dtype=torch.int64)
    elif T == 0:
        ids = torch.empty(0, k, dtype=torch.int64)
    elif k <= E:
        ids = torch.rand(T, E, generator=g).argsort(dim=1)[:, :k]
    else:
        ids = torch.randint(0, E, (T, k), generator=g)
    if drop:
        mask = torch.rand(T, k, generator=g) < drop
        bad = torch.where(torch.rand(T, k, generator=g) < 0.5, -1, E + 3)
        ids = torch.where(mask, bad, ids)
    return ids.to(torch.int32)


def cuda_backend_marks() -> list:
    """``pytestmark`` of the modules that test the cuda backend on a device: ``gpu`` (the conftest
    skips those tests without a device) and, with a device, a skip saying why the cuda backend is
    not available (``make test-gpu`` requires it at session start anyway)."""
    import moe_kernels

    ok, why = moe_kernels.available_backends()["cuda"]
    return [
        pytest.mark.gpu,
        pytest.mark.skipif(
            torch.cuda.is_available() and not ok, reason=f"the cuda backend is not available: {why}"
        ),
    ]
