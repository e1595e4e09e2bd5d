"""Registration: every op family's schemas equal ``moe_kernels._schemas``, the kernels exist, and
``torch.library.opcheck`` passes on every registered op of every backend family.

Families: ``moe_kernels::X`` (compiled, CPU / CUDA kernels), ``moe_kernels::X_reference``,
``moe_kernels::X_triton``; ops: every schema of ``moe_kernels._schemas`` including the backward
ops.  Inputs are realistic random tensors (never zeros), with ``requires_grad`` on the
differentiable inputs of forward ops so the autograd registration is exercised too.  A family/op
/device combination without a kernel on this machine is skipped with the reason; the set of
schemas is also checked against the op table below so a new op cannot go untested.
"""

# ruff: noqa: E741  (I is the expert intermediate size, as everywhere in the package)
from __future__ import annotations

import os

import pytest
import torch
from testutil import CUDA_OPS, gen

import moe_kernels
from moe_kernels._schemas import SCHEMAS

FAMILIES = {"compiled": "", "reference": "_reference", "triton": "_triton"}
NS = torch.ops.moe_kernels


def _rand(*shape, seed, device, scale=1.0, grad=False):
    t = (torch.randn(*shape, generator=gen(seed)) * scale).to(device)
    return t.requires_grad_(grad)


def _routing(T, k, E, block_size, device, seed=0):
    g = gen(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(torch.int32)
    ids[0, -1] = -1  # a dropped pair (expert parallelism)
    ids = ids.to(device)
    return ids, NS.route_reference(ids, E, block_size)


def cases(op: str, device: str, forward_grad: bool):
    """Argument tuples for ``op`` (a list: each variant matters for a different code path)."""
    T, E, k, H, I = 7, 6, 2, 16, 8
    rg = forward_grad
    d = device
    ids, (_, offs, ros, sor, _) = _routing(T, k, E, 0, d)
    _, (_, offs_p, ros_p, sor_p, _) = _routing(T, k, E, 4, d, seed=1)
    tw = (torch.rand(T, k, generator=gen(3)) + 0.1).to(d)
    if op == "topk_gating":
        return [
            (_rand(T, E, seed=1, device=d, grad=rg), k, "softmax", True, None, 0, 0, 1.0),
            (
                _rand(T, 16, seed=2, device=d, grad=rg),
                3,
                "sigmoid",
                True,
                _rand(16, seed=3, device=d, scale=0.1),
                4,
                2,
                2.5,
            ),
            (_rand(T, E, seed=4, device=d, grad=rg), E, "softmax", False, None, 0, 0, 1.0),
        ]
    if op == "topk_gating_backward":
        logits = _rand(T, 16, seed=5, device=d)
        _, gids = NS.topk_gating_reference(logits, 3, "sigmoid", True, None, 0, 0, 1.0)
        grad_w = _rand(T, 3, seed=6, device=d)
        return [
            (grad_w, logits, gids, "sigmoid", True, 2.5),
            (grad_w, logits, gids, "softmax", False, 1.0),
        ]
    if op == "route":
        return [(ids, E, 0), (ids, E, 4), (ids.to(torch.int64), E, 16), (ids[:0], E, 4)]
    if op == "permute":
        return [
            (_rand(T, H, seed=7, device=d, grad=rg), ros, sor),
            (_rand(T, H, seed=8, device=d, grad=rg), ros_p, sor_p),
        ]
    if op == "unpermute":
        return [
            (_rand(T * k, H, seed=9, device=d, grad=rg), ros, sor, tw.clone().requires_grad_(rg)),
            (_rand(sor_p.shape[0], H, seed=10, device=d, grad=rg), ros_p, sor_p, None),
        ]
    if op == "unpermute_backward":
        y = _rand(sor_p.shape[0], H, seed=11, device=d)
        go = _rand(T, H, seed=12, device=d)
        return [
            (go, y, ros_p, sor_p, tw, True, True),
            (go, y, ros_p, sor_p, tw, False, True),
            (go, y, ros_p, sor_p, None, True, False),
        ]
    offs_g = torch.tensor([3, 3, 9, 10, 10, 12], dtype=torch.int32, device=d)  # empty experts
    if op == "grouped_gemm":
        return [
            (_rand(14, H, seed=13, device=d, grad=rg), _rand(E, H, I, seed=14, device=d, grad=rg),
             offs_g, False),
            (_rand(14, H, seed=15, device=d, grad=rg), _rand(E, I, H, seed=16, device=d, grad=rg),
             offs_g, True),
        ]  # fmt: skip
    if op == "grouped_gemm_backward":
        a, go = _rand(14, H, seed=17, device=d), _rand(14, I, seed=18, device=d)
        return [
            (go, a, _rand(E, H, I, seed=19, device=d), offs_g, False, True, True),
            (go, a, _rand(E, I, H, seed=20, device=d), offs_g, True, True, False),
            (go, a, _rand(E, I, H, seed=21, device=d), offs_g, True, False, True),
        ]
    ffn_common = dict(
        x=lambda s: _rand(T, H, seed=s, device=d, grad=rg),
        wgu=lambda s: _rand(E, 2 * I, H, seed=s, device=d, scale=0.3, grad=rg),
        wd=lambda s: _rand(E, H, I, seed=s, device=d, scale=0.3, grad=rg),
    )
    if op == "moe_ffn":
        f = ffn_common
        return [
            (f["x"](22), f["wgu"](23), f["wd"](24), tw.clone().requires_grad_(rg), ids, None, None,
             "swiglu", 1.702, 7.0, False),
            (f["x"](25), f["wgu"](26), f["wd"](27), tw.clone().requires_grad_(rg), ids,
             _rand(E, 2 * I, seed=28, device=d, grad=rg), _rand(E, H, seed=29, device=d, grad=rg),
             "swiglu_oai", 1.702, 1.5, True),
            (f["x"](30), f["wgu"](31), f["wd"](32), tw.clone().requires_grad_(rg), ids,
             None, _rand(E, H, seed=33, device=d, grad=rg), "geglu", 1.702, 7.0, False),
        ]  # fmt: skip
    if op == "moe_ffn_backward":
        go = _rand(T, H, seed=34, device=d)
        x = _rand(T, H, seed=35, device=d)
        wgu = _rand(E, 2 * I, H, seed=36, device=d, scale=0.3)
        wd = _rand(E, H, I, seed=37, device=d, scale=0.3)
        bgu, bd = _rand(E, 2 * I, seed=38, device=d), _rand(E, H, seed=39, device=d)
        return [
            (go, x, wgu, wd, tw, ids, None, None, "swiglu", 1.702, 7.0, False),
            (go, x, wgu, wd, tw, ids, bgu, bd, "swiglu_oai", 1.702, 1.5, True),
            (go, x, wgu, wd, tw, ids, None, bd, "geglu", 1.702, 7.0, False),
        ]
    if op == "moe_ffn_train":
        return cases("moe_ffn", d, forward_grad)
    if op == "moe_ffn_backward_saved":  # moe_ffn_backward's cases with moe_ffn_train's pre
        return [
            (c[0], moe_kernels.reference.moe_ffn_pre(*c[1:8]), *c[1:])
            for c in cases("moe_ffn_backward", d, forward_grad)
        ]
    raise KeyError(op)


def test_every_schema_has_opcheck_inputs():
    for op in SCHEMAS:
        try:
            assert cases(op, "cpu", forward_grad=False), op
        except KeyError:
            pytest.fail(f"{op}: a new op needs inputs in tests/test_registry.py (cases)")


def _registered_schema(qual: str):
    ns, name = qual.split("::")
    return getattr(getattr(torch.ops, ns), name).default._schema


@pytest.mark.parametrize("family", list(FAMILIES))
def test_schemas_match_schemas_module(family):
    """Each family's registered schema (the compiled family's comes from csrc/ops.cpp) is the one
    written in moe_kernels/_schemas.py: a drift between the two fails here."""
    if family == "compiled" and not moe_kernels.available_backends()["cpu"][0]:
        pytest.skip("the compiled extension is not built")
    if family == "triton" and not moe_kernels.available_backends()["triton"][0]:
        pytest.skip("the Triton kernels are not available")
    for op, (args, returns) in SCHEMAS.items():
        qual = f"moe_kernels::{op}{FAMILIES[family]}"
        want = torch._C.parse_schema(f"{qual}{args} -> {returns}")
        got = _registered_schema(qual)
        assert str(got) == str(want), f"{qual}: registered {got}, _schemas.py says {want}"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_op_has_its_kernels(family):
    """compiled: a CPU kernel for every op (and a CUDA one for every op of ``CUDA_OPS`` where
    the CUDA backend is available; test_cuda_build.py checks them wherever it is built);
    reference and triton: a kernel for every op."""
    avail = moe_kernels.available_backends()
    for op in SCHEMAS:
        qual = f"moe_kernels::{op}{FAMILIES[family]}"
        if family == "compiled":
            if not avail["cpu"][0]:
                pytest.skip("the compiled CPU backend is not built")
            assert torch._C._dispatch_has_kernel_for_dispatch_key(qual, "CPU"), qual
            if avail["cuda"][0] and op in CUDA_OPS:
                assert torch._C._dispatch_has_kernel_for_dispatch_key(qual, "CUDA"), qual
        elif family == "triton" and not avail["triton"][0]:
            pytest.skip("the Triton kernels are not available")
        else:
            assert torch._C._dispatch_has_kernel(qual), qual


def _devices():
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def _skip_reason(family: str, op: str, device: str) -> str | None:
    qual = f"moe_kernels::{op}{FAMILIES[family]}"
    try:
        torch._C._dispatch_find_schema_or_throw(qual, "")
    except RuntimeError:
        return f"{qual} is not registered"
    avail = moe_kernels.available_backends()
    if family == "compiled":
        key = "CPU" if device == "cpu" else "CUDA"
        backend = "cpu" if device == "cpu" else "cuda"
        if not avail[backend][0]:
            return f"backend {backend} unavailable: {avail[backend][1]}"
        if not torch._C._dispatch_has_kernel_for_dispatch_key(qual, key):
            return f"{qual} has no {key} kernel"
        return None
    if family == "triton":
        if not avail["triton"][0]:
            return f"backend triton unavailable: {avail['triton'][1]}"
        if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return "triton on CPU tensors needs TRITON_INTERPRET=1"
    if not torch._C._dispatch_has_kernel(qual):
        return f"{qual} has no kernel"
    return None


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("op", list(SCHEMAS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_opcheck(family, op, device):
    why = _skip_reason(family, op, device)
    if why:
        pytest.skip(why)
    fn = getattr(NS, op + FAMILIES[family])
    forward = "_backward" not in op
    for args in cases(op, device, forward_grad=forward):
        torch.library.opcheck(fn, args)


@pytest.mark.parametrize("family", ["reference", "compiled", "triton"])
def test_backward_ops_return_empty_for_unrequested(family):
    """Backward ops return a shape-[0] tensor for a gradient not requested or whose input was None."""
    for op in ("unpermute_backward", "grouped_gemm_backward", "moe_ffn_backward"):
        why = _skip_reason(family, op, "cpu")
        if why:
            pytest.skip(why)
    fam = FAMILIES[family]
    d = "cpu"
    gy, gw = getattr(NS, "unpermute_backward" + fam)(*cases("unpermute_backward", d, False)[1])
    assert gy.shape == (0,) and gw.shape == (7, 2)
    gy, gw = getattr(NS, "unpermute_backward" + fam)(*cases("unpermute_backward", d, False)[2])
    assert gw.shape == (0,) and gy.shape[1] == 16
    ga, gb = getattr(NS, "grouped_gemm_backward" + fam)(
        *cases("grouped_gemm_backward", d, False)[1]
    )
    assert ga.shape == (14, 16) and gb.shape == (0,)
    ga, gb = getattr(NS, "grouped_gemm_backward" + fam)(
        *cases("grouped_gemm_backward", d, False)[2]
    )
    assert ga.shape == (0,) and gb.shape == (6, 8, 16)
    grads = getattr(NS, "moe_ffn_backward" + fam)(*cases("moe_ffn_backward", d, False)[0])
    assert [tuple(g.shape) for g in grads] == [(7, 16), (6, 16, 16), (6, 16, 8), (7, 2), (0,), (0,)]
    grads = getattr(NS, "moe_ffn_backward" + fam)(*cases("moe_ffn_backward", d, False)[2])
    assert tuple(grads[4].shape) == (0,) and tuple(grads[5].shape) == (6, 16)
