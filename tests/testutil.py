"""Helpers shared by the test modules (a plain module: ``conftest`` names clash across folders).

Seeded generators, relative-error assertions, per-dtype tolerances and the list of backends usable
on this machine.
"""

from __future__ import annotations

import os

import torch

BACKEND_NAMES = ("reference", "cpu", "triton", "cuda")


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
