"""Shared pytest set-up.

* ``MOE_KERNELS_REQUIRE_BACKENDS=reference,cpu`` (comma list): the session fails at start, printing
  the reasons, if any named backend is unavailable.  CI sets it so that a backend that failed to
  build fails the run instead of having its tests skipped.
* ``@pytest.mark.gpu`` tests are skipped when no CUDA device is present.
* Helpers shared by the test modules: seeded generators, relative-error assertions, the list of
  usable backends and the ``debug_mode`` fixture (``MOE_KERNELS_DEBUG=1``: outputs NaN-filled).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

BACKEND_NAMES = ("reference", "cpu", "triton", "cuda")


def _required_backends() -> list[str]:
    raw = os.environ.get("MOE_KERNELS_REQUIRE_BACKENDS", "")
    return [name.strip() for name in raw.split(",") if name.strip()]


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: long-running")


def pytest_sessionstart(session):
    required = _required_backends()
    if not required:
        return
    try:
        import moe_kernels

        available = moe_kernels.available_backends()
    except Exception as exc:  # the package itself failed: say so and stop
        pytest.exit(
            f"MOE_KERNELS_REQUIRE_BACKENDS={','.join(required)} but moe_kernels failed to "
            f"report its backends: {type(exc).__name__}: {exc}",
            returncode=1,
        )
        return
    problems = []
    for name in required:
        if name not in available:
            problems.append(f"  {name}: unknown backend (known: {', '.join(sorted(available))})")
            continue
        ok, reason = available[name]
        if not ok:
            problems.append(f"  {name}: not available: {reason}")
    if problems:
        pytest.exit(
            "MOE_KERNELS_REQUIRE_BACKENDS names backends that are not available:\n"
            + "\n".join(problems),
            returncode=1,
        )


def pytest_report_header(config):
    try:
        import moe_kernels

        lines = ["moe_kernels backends:"]
        for name, (ok, reason) in moe_kernels.available_backends().items():
            lines.append(f"  {name}: {'available' if ok else 'unavailable'} ({reason})")
        return lines
    except Exception as exc:
        return [f"moe_kernels backends: failed to query ({type(exc).__name__}: {exc})"]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def available_backends_list(device: str = "cpu") -> list[str]:
    """Backends usable for tensors on ``device`` on this machine."""
    import moe_kernels

    avail = moe_kernels.available_backends()
    names = []
    for name in BACKEND_NAMES:
        if not avail.get(name, (False, ""))[0]:
            continue
        if device == "cpu" and name == "cuda":
            continue
        if device == "cpu" and name == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
            continue
        if device == "cuda" and name == "cpu":
            continue
        names.append(name)
    return names


def gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def randn(*shape, seed: int, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen(seed), dtype=torch.float64) * scale).to(dtype)


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max |e| (float64), 0 for empty tensors."""
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    if e.numel() == 0:
        return 0.0
    return float((a - e).abs().max() / e.abs().max().clamp_min(1e-30))


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = ""):
    assert tuple(actual.shape) == tuple(expected.shape), (what, actual.shape, expected.shape)
    assert not torch.isnan(actual).any(), f"{what}: NaN in output (an element was never written?)"
    err = max_rel_err(actual, expected)
    assert err <= tol, f"{what}: max relative error {err:.3e} > {tol:.1e}"


#: tolerance (max abs error / max abs value) of a float op computed in each dtype
TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}


@pytest.fixture
def debug_mode(monkeypatch):
    """MOE_KERNELS_DEBUG=1: outputs are allocated NaN-filled so a missed write shows up."""
    monkeypatch.setenv("MOE_KERNELS_DEBUG", "1")
    yield
