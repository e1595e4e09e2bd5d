"""Bad input raises the documented error, with a message naming the argument.

ValueError for shapes and values, TypeError for dtypes, exactly those types (the public API checks
in Python before any kernel runs).  Every case runs on every backend under test that takes CPU
tensors, so a backend that crashes or returns garbage on bad input fails here.  T = 0 is valid
input.  The ops of ``torch.ops.moe_kernels`` called directly (below the public checks) keep their
own checks: tested at the end.
"""

# ruff: noqa: E741  (I is the expert intermediate size, as everywhere in the package)
from __future__ import annotations

import pytest
import torch
from testutil import backends, device_of, op, randn

import moe_kernels

BACKENDS = [b for b in backends() if device_of(b) == "cpu"]

VALUE = ValueError
TYPE = TypeError


def named(words: str) -> str:
    """Regex matching one of the ``|``-separated argument names as a whole word."""
    return rf"\b(?:{words})\b"


def _rand(*shape, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(sum(shape) + 1)
    return torch.randn(*shape, generator=g).to(dtype=dtype, device=device)


def _ids(T, k, E, device="cpu"):
    g = torch.Generator().manual_seed(T * 7 + k)
    return torch.randint(0, E, (T, k), generator=g, dtype=torch.int32).to(device)


# ----------------------------------------------------------------------------------------------
# topk_gating
# ----------------------------------------------------------------------------------------------
GATING_BAD = [
    # (id, args, kwargs, error types, a word the message must contain)
    ("logits_1d", (_rand(8), 2), {}, VALUE, "router_logits"),
    ("logits_3d", (_rand(2, 3, 8), 2), {}, VALUE, "router_logits"),
    ("int_logits", (torch.ones(4, 8, dtype=torch.int32), 2), {}, TYPE, "router_logits"),
    ("k_gt_E", (_rand(4, 8), 9), {}, VALUE, "top_k"),
    ("k_zero", (_rand(4, 8), 0), {}, VALUE, "top_k"),
    ("k_negative", (_rand(4, 8), -1), {}, VALUE, "top_k"),
    ("bad_scoring", (_rand(4, 8), 2), {"scoring": "relu"}, VALUE, "scoring"),
    ("bias_shape", (_rand(4, 8), 2), {"correction_bias": _rand(7)}, VALUE, "correction_bias"),
    ("bias_2d", (_rand(4, 8), 2), {"correction_bias": _rand(1, 8)}, VALUE, "correction_bias"),
    (
        "groups_not_dividing",
        (_rand(4, 10), 2),
        {"num_expert_groups": 3, "topk_groups": 1},
        VALUE,
        "num_expert_groups",
    ),
    (
        "topk_groups_gt_groups",
        (_rand(4, 8), 2),
        {"num_expert_groups": 4, "topk_groups": 5},
        VALUE,
        "topk_groups",
    ),
    (
        "too_few_experts_in_kept_groups",  # k = 5 from 2 groups of 2 experts is impossible
        (_rand(4, 8), 5),
        {"num_expert_groups": 4, "topk_groups": 2},
        VALUE,
        "top_k",
    ),
    (
        "bias_on_meta",
        (_rand(4, 8), 2),
        {"correction_bias": torch.empty(8, device="meta")},
        VALUE,
        "correction_bias",
    ),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", GATING_BAD, ids=[c[0] for c in GATING_BAD])
def test_topk_gating_bad_input(case, backend):
    _, args, kwargs, errors, word = case
    with pytest.raises(errors, match=named(word)):
        moe_kernels.topk_gating(*args, backend=backend, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_gating_empty_is_valid(backend):
    w, ids = moe_kernels.topk_gating(torch.empty(0, 16), 3, backend=backend)
    assert w.shape == (0, 3) and ids.shape == (0, 3)


# ----------------------------------------------------------------------------------------------
# route
# ----------------------------------------------------------------------------------------------
ROUTE_BAD = [
    ("ids_1d", (_ids(4, 2, 8).reshape(-1), 8), {}, VALUE, "topk_ids"),
    ("ids_3d", (_ids(4, 2, 8).reshape(2, 2, 2), 8), {}, VALUE, "topk_ids"),
    ("float_ids", (_ids(4, 2, 8).float(), 8), {}, TYPE, "topk_ids"),
    ("bool_ids", (_ids(4, 2, 8) > 3, 8), {}, TYPE, "topk_ids"),
    ("zero_experts", (_ids(4, 2, 8), 0), {}, VALUE, "num_experts"),
    ("negative_block", (_ids(4, 2, 8), 8), {"block_size": -4}, VALUE, "block_size"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ROUTE_BAD, ids=[c[0] for c in ROUTE_BAD])
def test_route_bad_input(case, backend):
    _, args, kwargs, errors, word = case
    with pytest.raises(errors, match=named(word)):
        moe_kernels.route(*args, backend=backend, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_route_out_of_range_ids_are_not_errors(backend):
    ids = torch.tensor([[-5, 0], [9, 2], [1, 100]], dtype=torch.int32)
    plan = moe_kernels.route(ids, 3, backend=backend)
    assert plan.row_of_slot.tolist() == [[-1, 0], [-1, 2], [1, -1]]
    assert plan.tokens_per_expert.tolist() == [1, 1, 1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_route_empty_is_valid(backend):
    plan = moe_kernels.route(torch.empty(0, 2, dtype=torch.int32), 4, block_size=2, backend=backend)
    assert plan.row_of_slot.shape == (0, 2)
    assert plan.tokens_per_expert.tolist() == [0, 0, 0, 0]
    assert plan.num_rows == 4  # round_up(0 + 4 * (2 - 1), 2)


# ----------------------------------------------------------------------------------------------
# permute / unpermute
# ----------------------------------------------------------------------------------------------
def _plan(T=5, k=2, E=4, block_size=None):
    return moe_kernels.route(_ids(T, k, E), E, block_size=block_size, backend="reference")


@pytest.mark.parametrize("backend", BACKENDS)
def test_permute_bad_input(backend):
    plan = _plan()
    with pytest.raises(VALUE, match=named("x")):
        moe_kernels.permute(_rand(5, 3, 2), plan, backend=backend)  # rank 3
    with pytest.raises(VALUE, match=named("x")):
        moe_kernels.permute(_rand(6, 3), plan, backend=backend)  # T mismatch
    with pytest.raises(TYPE, match=named("x")):
        moe_kernels.permute(torch.ones(5, 3, dtype=torch.int32), plan, backend=backend)
    with pytest.raises(VALUE, match=named("x|row_of_slot|slot_of_row")):
        moe_kernels.permute(torch.empty(5, 3, device="meta"), plan, backend=backend)
    with pytest.raises(TYPE, match=named("plan")):
        moe_kernels.permute(_rand(5, 3), (plan.row_of_slot, plan.slot_of_row), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unpermute_bad_input(backend):
    plan = _plan(block_size=4)
    R = plan.num_rows
    w = torch.rand(5, 2)
    with pytest.raises(VALUE, match=named("y")):
        moe_kernels.unpermute(_rand(R), plan, w, backend=backend)  # rank 1
    with pytest.raises(VALUE, match=named("y")):
        moe_kernels.unpermute(_rand(R - 1, 3), plan, w, backend=backend)  # rows mismatch
    with pytest.raises(VALUE, match=named("topk_weights")):
        moe_kernels.unpermute(_rand(R, 3), plan, torch.rand(5, 3), backend=backend)
    with pytest.raises(VALUE, match=named("topk_weights")):
        moe_kernels.unpermute(_rand(R, 3), plan, torch.rand(10), backend=backend)
    with pytest.raises(TYPE, match=named("topk_weights")):
        moe_kernels.unpermute(
            _rand(R, 3), plan, torch.ones(5, 2, dtype=torch.int64), backend=backend
        )
    with pytest.raises(TYPE, match=named("y")):
        moe_kernels.unpermute(torch.ones(R, 3, dtype=torch.int32), plan, w, backend=backend)
    with pytest.raises(VALUE, match=named("topk_weights|y")):
        moe_kernels.unpermute(_rand(R, 3), plan, w.to("meta"), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_permute_unpermute_empty_is_valid(backend):
    plan = moe_kernels.route(torch.empty(0, 3, dtype=torch.int32), 5, backend="reference")
    y = moe_kernels.permute(torch.empty(0, 7), plan, backend=backend)
    assert y.shape == (0, 7)
    out = moe_kernels.unpermute(y, plan, torch.empty(0, 3), backend=backend)
    assert out.shape == (0, 7)


# ----------------------------------------------------------------------------------------------
# grouped_gemm
# ----------------------------------------------------------------------------------------------
def _offs(*v):
    return torch.tensor(v, dtype=torch.int32)


GG_BAD = [
    # (id, a, b, offs, trans_b, error types, word)
    ("a_3d", _rand(2, 6, 4), _rand(3, 4, 5), _offs(2, 4, 6), False, VALUE, "a"),
    ("b_2d", _rand(6, 4), _rand(4, 5), _offs(2, 4, 6), False, VALUE, "b"),
    ("K_mismatch", _rand(6, 4), _rand(3, 5, 5), _offs(2, 4, 6), False, VALUE, "b|K"),
    ("K_mismatch_trans", _rand(6, 4), _rand(3, 4, 5), _offs(2, 4, 6), True, VALUE, "b|K"),
    ("offs_short", _rand(6, 4), _rand(3, 4, 5), _offs(2, 6), False, VALUE, "offs"),
    ("offs_long", _rand(6, 4), _rand(3, 4, 5), _offs(1, 2, 4, 6), False, VALUE, "offs"),
    ("offs_2d", _rand(6, 4), _rand(3, 4, 5), _offs(2, 4, 6)[None], False, VALUE, "offs"),
    ("offs_float", _rand(6, 4), _rand(3, 4, 5), _offs(2, 4, 6).float(), False, TYPE, "offs"),
    ("offs_decreasing", _rand(6, 4), _rand(3, 4, 5), _offs(4, 2, 6), False, VALUE, "offs"),
    ("offs_negative", _rand(6, 4), _rand(3, 4, 5), _offs(-1, 2, 6), False, VALUE, "offs"),
    ("offs_past_M", _rand(6, 4), _rand(3, 4, 5), _offs(2, 4, 7), False, VALUE, "offs"),
    (
        "dtype_mismatch",
        _rand(6, 4),
        _rand(3, 4, 5, dtype=torch.bfloat16),
        _offs(2, 4, 6),
        False,
        TYPE,
        "a|b|dtype",
    ),
    (
        "int_a",
        torch.ones(6, 4, dtype=torch.int32),
        _rand(3, 4, 5),
        _offs(2, 4, 6),
        False,
        TYPE,
        "a",
    ),
    (
        "offs_on_meta",
        _rand(6, 4),
        _rand(3, 4, 5),
        _offs(2, 4, 6).to("meta"),
        False,
        VALUE,
        "offs",
    ),
    (
        "b_on_meta",
        _rand(6, 4),
        torch.empty(3, 4, 5, device="meta"),
        _offs(2, 4, 6),
        False,
        VALUE,
        "b",
    ),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", GG_BAD, ids=[c[0] for c in GG_BAD])
def test_grouped_gemm_bad_input(case, backend):
    _, a, b, offs, trans_b, errors, word = case
    with pytest.raises(errors, match=named(word)):
        moe_kernels.grouped_gemm(a, b, offs, trans_b=trans_b, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_gemm_empty_is_valid(backend):
    out = moe_kernels.grouped_gemm(_rand(0, 4), _rand(3, 4, 5), _offs(0, 0, 0), backend=backend)
    assert out.shape == (0, 5)


# ----------------------------------------------------------------------------------------------
# moe_ffn
# ----------------------------------------------------------------------------------------------
T, H, I, E, K = 5, 8, 6, 4, 2


def _ffn(**over):
    args = dict(
        x=_rand(T, H),
        w_gate_up=_rand(E, 2 * I, H),
        w_down=_rand(E, H, I),
        topk_weights=torch.rand(T, K),
        topk_ids=_ids(T, K, E),
    )
    kwargs = {}
    for key, v in over.items():
        (args if key in args else kwargs)[key] = v
    return args, kwargs


FFN_BAD = [
    ("x_1d", dict(x=_rand(H)), VALUE, "x"),
    ("x_wrong_H", dict(x=_rand(T, H + 1)), VALUE, "x|w_gate_up|H"),
    ("x_int", dict(x=torch.ones(T, H, dtype=torch.int32)), TYPE, "x"),
    ("w_gate_up_2d", dict(w_gate_up=_rand(2 * I, H)), VALUE, "w_gate_up"),
    ("w_gate_up_odd", dict(w_gate_up=_rand(E, 2 * I + 1, H)), VALUE, "w_gate_up"),
    ("w_down_wrong_I", dict(w_down=_rand(E, H, I + 1)), VALUE, "w_down"),
    ("w_down_wrong_E", dict(w_down=_rand(E + 1, H, I)), VALUE, "w_down"),
    ("w_down_wrong_H", dict(w_down=_rand(E, H + 2, I)), VALUE, "w_down"),
    ("weights_shape", dict(topk_weights=torch.rand(T, K + 1)), VALUE, "topk_weights"),
    ("ids_shape", dict(topk_ids=_ids(T + 1, K, E)), VALUE, "topk_ids"),
    ("ids_float", dict(topk_ids=_ids(T, K, E).float()), TYPE, "topk_ids"),
    ("weights_int", dict(topk_weights=torch.ones(T, K, dtype=torch.int32)), TYPE, "topk_weights"),
    ("activation", dict(activation="relu"), VALUE, "activation"),
    ("gate_up_bias_shape", dict(gate_up_bias=_rand(E, I)), VALUE, "gate_up_bias"),
    ("down_bias_shape", dict(down_bias=_rand(E, H + 1)), VALUE, "down_bias"),
    (
        "w_dtype_mismatch",
        dict(w_down=_rand(E, H, I, dtype=torch.bfloat16)),
        TYPE,
        "w_down|dtype",
    ),
    ("w_down_on_meta", dict(w_down=torch.empty(E, H, I, device="meta")), VALUE, "w_down"),
    ("ids_on_meta", dict(topk_ids=_ids(T, K, E).to("meta")), VALUE, "topk_ids"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", FFN_BAD, ids=[c[0] for c in FFN_BAD])
def test_moe_ffn_bad_input(case, backend):
    _, over, errors, word = case
    args, kwargs = _ffn(**over)
    with pytest.raises(errors, match=named(word)):
        moe_kernels.moe_ffn(**args, **kwargs, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_moe_ffn_empty_is_valid(backend):
    args, _ = _ffn(x=_rand(0, H), topk_weights=torch.rand(0, K), topk_ids=_ids(0, K, E))
    out = moe_kernels.moe_ffn(**args, backend=backend)
    assert out.shape == (0, H)


def test_errors_name_their_argument_in_full():
    """The message says which argument is wrong, not just that something is."""
    with pytest.raises(ValueError) as info:
        moe_kernels.grouped_gemm(_rand(6, 4), _rand(3, 4, 5), _offs(2, 6), backend="reference")
    assert "offs" in str(info.value)
    with pytest.raises(ValueError) as info:
        moe_kernels.topk_gating(_rand(4, 8), 9, backend="reference")
    assert "top_k" in str(info.value)


# ----------------------------------------------------------------------------------------------
# the kernels' own checks (torch.ops.moe_kernels called directly, below the public API)
# ----------------------------------------------------------------------------------------------
#: the error a compiled kernel's TORCH_CHECK raises (gating's checks: test_gating.py)
COMPILED_ERROR = RuntimeError
KERNEL_BACKENDS = [b for b in BACKENDS if b not in ("reference",)]


@pytest.mark.parametrize("backend", [b for b in KERNEL_BACKENDS if b != "triton"])
def test_kernel_checks_grouped_gemm(backend):
    gg = op("grouped_gemm", backend)
    a, b = randn(10, 8, seed=2), randn(2, 8, 4, seed=3)
    with pytest.raises(COMPILED_ERROR, match="offs"):
        gg(a, b, torch.tensor([6, 4], dtype=torch.int32), False)
    with pytest.raises(COMPILED_ERROR, match="offs"):
        gg(a, b, torch.tensor([4, 11], dtype=torch.int32), False)
    with pytest.raises(COMPILED_ERROR, match="offs"):
        gg(a, b, torch.tensor([10], dtype=torch.int32), False)
    with pytest.raises(COMPILED_ERROR, match="K"):
        gg(a, randn(2, 7, 4, seed=4), torch.tensor([4, 10], dtype=torch.int32), False)


@pytest.mark.parametrize("backend", [b for b in KERNEL_BACKENDS if b != "triton"])
def test_kernel_checks_moe_ffn(backend):
    ffn = op("moe_ffn", backend)
    x, wgu, wd = randn(3, 16, seed=5), randn(2, 8, 16, seed=6), randn(2, 16, 4, seed=7)
    ids, tw = torch.full((3, 1), -1, dtype=torch.int32), torch.rand(3, 1)
    with pytest.raises(COMPILED_ERROR, match="activation"):
        ffn(x, wgu, wd, tw, ids, None, None, "relu", 1.702, 7.0, False)
    with pytest.raises(COMPILED_ERROR, match="w_down"):
        ffn(x, wgu, randn(2, 16, 5, seed=8), tw, ids, None, None, "swiglu", 1.702, 7.0, False)
    with pytest.raises(COMPILED_ERROR, match="float32, bfloat16 or float16"):
        ffn(x.double(), wgu, wd, tw, ids, None, None, "swiglu", 1.702, 7.0, False)
