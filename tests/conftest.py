"""Shared pytest set-up.

* ``MOE_KERNELS_REQUIRE_BACKENDS=reference,cpu`` (comma list): the session fails at start, printing
  the reasons, if any named backend is unavailable.  CI sets it so that a backend that failed to
  build fails the run instead of having its tests skipped.
* ``MOE_KERNELS_TEST_INSTALLED=1``: the session fails at start if ``moe_kernels`` was imported from
  the source tree instead of the installed package.
* ``@pytest.mark.gpu`` tests are skipped when no CUDA device is present.
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


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: long-running")


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


def pytest_sessionstart(session):
    _check_installed_package()
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
