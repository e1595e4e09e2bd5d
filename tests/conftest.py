"""Shared pytest set-up.

* ``MOE_KERNELS_REQUIRE_BACKENDS=reference,cpu`` (comma list): the session fails at start, printing
  the reasons, if any named backend is unavailable.  CI sets it so that a backend that failed to
  build fails the run instead of having its tests skipped.
* ``MOE_KERNELS_REQUIRE_BUILT=_C,_C_cuda`` (comma list of compiled extensions of ``moe_kernels``):
  the session fails at start, printing each one's load error, if any named extension was not built
  or does not load.  ``make test`` names ``_C_cuda`` whenever torch is a CUDA build, so a broken
  CUDA build fails the run (without a device the cuda backend is never "available", so
  ``MOE_KERNELS_REQUIRE_BACKENDS`` cannot catch it).
* ``MOE_KERNELS_TEST_INSTALLED=1``: the session fails at start if ``moe_kernels`` was imported from
  the source tree instead of the installed package.
* Markers (``pytest -m NAME`` selects, ``-m "not NAME"`` deselects): ``gpu`` -- needs a CUDA device,
  skipped with that reason without one; ``slow`` -- long-running (the > 2^31-element cases);
  ``interpreter`` -- runs Triton kernels, which on a machine without a GPU needs
  ``TRITON_INTERPRET=1`` (``make test-triton``): added to every case parametrised with
  ``backend="triton"`` and to ``test_triton_poison.py``.
* A test parametrised with ``backend=B`` whose module or function names an op (``test_moe_ffn.py``,
  ``test_grouped_gemm_*``) that backend B has no kernel for is skipped with that reason (the cuda
  backend has no grouped_gemm / moe_ffn kernels yet; auto mode falls back for them).
* The ``debug_mode`` fixture turns debug mode on (outputs NaN-filled, so a missed write shows up).
* ``MOE_KERNELS_TEST_BACKENDS=name,name``: run the op modules on these backends only (see
  ``testutil.backends``).  Helpers shared by the test modules live in ``testutil.py``, not here: a
  ``conftest`` module cannot be imported by name once another folder has its own conftest.py.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _required_backends() -> list[str]:
    raw = os.environ.get("MOE_KERNELS_REQUIRE_BACKENDS", "")
    return [name.strip() for name in raw.split(",") if name.strip()]


def _required_built() -> list[str]:
    raw = os.environ.get("MOE_KERNELS_REQUIRE_BUILT", "")
    return [name.strip() for name in raw.split(",") if name.strip()]


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: long-running")
    config.addinivalue_line(
        "markers", "interpreter: runs Triton kernels (without a GPU: under TRITON_INTERPRET=1)"
    )


def _check_installed_package() -> None:
    """``MOE_KERNELS_TEST_INSTALLED=1``: the tests must import the installed package, not the
    source tree's ``moe_kernels/`` (which has no compiled extension)."""
    if os.environ.get("MOE_KERNELS_TEST_INSTALLED", "0") in ("", "0"):
        return
    import moe_kernels

    source_tree = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "")
    where = os.path.abspath(moe_kernels.__file__)
    if where.startswith(source_tree) and "site-packages" not in where:
        pytest.exit(
            f"MOE_KERNELS_TEST_INSTALLED=1 but moe_kernels was imported from the source tree "
            f"({where}); run pytest from tests/ against the installed package",
            returncode=1,
        )


def _check_required_built() -> None:
    """``MOE_KERNELS_REQUIRE_BUILT``: every named extension of moe_kernels was built and loads."""
    required = _required_built()
    if not required:
        return
    try:
        from moe_kernels import _registry
    except Exception as exc:  # the package itself failed: say so and stop
        pytest.exit(
            f"MOE_KERNELS_REQUIRE_BUILT={','.join(required)} but moe_kernels failed to import: "
            f"{type(exc).__name__}: {exc}",
            returncode=1,
        )
        return
    problems = []
    for name in required:
        err = _registry.extension_error(name)
        if err is not None:
            problems.append(f"  moe_kernels.{name}: {err}")
    if problems:
        pytest.exit(
            "MOE_KERNELS_REQUIRE_BUILT names compiled extensions that are not loaded (not built, "
            "or built but not loadable):\n" + "\n".join(problems),
            returncode=1,
        )


def pytest_sessionstart(session):
    _check_installed_package()
    _check_required_built()
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


def _missing_op(item) -> str | None:
    """The reason to skip ``item`` when it is parametrised with a ``backend`` that has no kernel
    for an op its module or function is named after, else None."""
    callspec = getattr(item, "callspec", None)
    backend = callspec.params.get("backend") if callspec is not None else None
    if not isinstance(backend, str):
        return None
    from moe_kernels import _backends, _registry

    b = _backends._BACKENDS.get(backend)
    if b is None:
        return None
    module = getattr(item, "module", None)
    names = f"{getattr(module, '__name__', '')} {getattr(item, 'originalname', item.name)}"
    for op in _registry.FORWARD_OPS:
        if op in names and not b.has_op(op):
            return f"backend {backend!r} has no kernel for {op} (auto mode falls back)"
    return None


def pytest_collection_modifyitems(config, items):
    for item in items:
        why = _missing_op(item)
        if why is not None:
            item.add_marker(pytest.mark.skip(reason=why))
        callspec = getattr(item, "callspec", None)
        if (callspec is not None and callspec.params.get("backend") == "triton") or (
            "test_triton_poison" in item.nodeid
        ):
            item.add_marker(pytest.mark.interpreter)
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def debug_mode(monkeypatch):
    """Debug mode on for the test (``moe_kernels._debug.set_debug_mode``): the compiled and Triton
    backends allocate every output NaN-filled (integers: a negative sentinel), so an element a
    kernel fails to write shows up.  The reference never allocates poisoned buffers: only tests
    of the other backends take this fixture."""
    from moe_kernels import _debug

    before = _debug.debug_mode()
    _debug.set_debug_mode(True)
    try:
        yield
    finally:
        _debug.set_debug_mode(before)
