"""Tests of the Triton kernels, against the PyTorch reference.

They run in one of two modes, and are skipped otherwise:

* ``TRITON_INTERPRET=1 pytest tests/triton`` (no GPU): Triton's interpreter runs every kernel on
  CPU tensors. The variable must be set before triton is imported, so run these tests in their own
  process. The interpreter costs 5-65 ms per program: the shapes here are tiny on purpose. bf16 is
  covered through the path the kernels use for it under the interpreter (tiles converted to fp32
  right after loading; the interpreter's bf16 dot is broken upstream).
* on a machine with a CUDA device (``pytest tests/triton``): the same tests on ``cuda`` tensors,
  plus the ``gpu``-marked ones (larger shapes).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from triton_helpers import ENABLED

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    if ENABLED:
        return
    skip = pytest.mark.skip(reason="Triton tests need TRITON_INTERPRET=1 or a CUDA device")
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ops():
    if not ENABLED:
        pytest.skip("Triton tests need TRITON_INTERPRET=1 or a CUDA device")
    from moe_kernels.triton_kernels import ops as triton_ops

    return triton_ops


@pytest.fixture(scope="session")
def ref():
    from moe_kernels import reference

    return reference


@pytest.fixture
def debug_mode(monkeypatch):
    """MOE_KERNELS_DEBUG=1: the launchers allocate outputs NaN-filled (integers: -7), so an element
    a kernel fails to write shows up."""
    monkeypatch.setenv("MOE_KERNELS_DEBUG", "1")
