"""Top-k gating kernels against the reference: ids exactly (up to true ties), weights in fp32."""

from __future__ import annotations

import pytest
import torch
from triton_helpers import DEVICE, DTYPES, check_close, randn

# (T, E, k, scoring, renormalize, bias, groups, topk_groups, scale): why each row exists
CASES = [
    (13, 8, 2, "softmax", True, False, 0, 0, 1.0),  # Mixtral-like; T not a multiple of the block
    (9, 60, 4, "softmax", False, False, 0, 0, 1.0),  # E not a power of two (Qwen2-MoE)
    (5, 6, 1, "sigmoid", False, True, 0, 0, 1.0),  # k = 1, sigmoid with correction bias
    (7, 12, 12, "softmax", True, False, 0, 0, 1.0),  # k = E
    (11, 24, 6, "sigmoid", True, True, 8, 3, 2.5),  # DeepSeek-V3 grouped, scaled
    (6, 10, 3, "softmax", True, True, 5, 2, 1.0),  # grouped softmax, 2 experts per group
    (4, 7, 2, "sigmoid", True, True, 7, 2, 1.0),  # one expert per group
    (3, 384, 8, "sigmoid", True, True, 8, 4, 2.5),  # E = 384 (Kimi-K2-like)
    (1, 1, 1, "softmax", True, False, 0, 0, 1.0),  # E = 1
]


def _near_tie_rows(sel: torch.Tensor, k: int) -> torch.Tensor:
    """Rows whose k-th and (k+1)-th selection scores are within 1e-6 relative: ids may differ."""
    if k >= sel.shape[1]:
        return torch.zeros(sel.shape[0], dtype=torch.bool)
    top = sel.topk(k + 1, dim=1).values
    a, b = top[:, k - 1], top[:, k]
    return (a - b).abs() <= 1e-6 * a.abs().clamp_min(1e-30)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c[0]}-E{c[1]}-k{c[2]}-{c[3]}-g{c[6]}")
def test_topk_gating(ops, ref, case):
    T, E, k, scoring, renorm, has_bias, G, TG, scale = case
    logits = randn(T, E, seed=E + k)
    bias = randn(E, seed=7, scale=0.1) if has_bias else None
    w, ids = ops.topk_gating(logits, k, scoring, renorm, bias, G, TG, scale)
    rw, rids = ref.topk_gating(
        logits.cpu(), k, scoring, renorm, None if bias is None else bias.cpu(), G, TG, scale
    )
    assert w.dtype == torch.float32 and ids.dtype == torch.int32
    assert w.shape == (T, k) and ids.shape == (T, k)
    scores = torch.softmax(logits.cpu(), -1) if scoring == "softmax" else logits.cpu().sigmoid()
    sel = scores + (0 if bias is None else bias.cpu())
    ok = ~_near_tie_rows(sel, k)
    assert torch.equal(ids.cpu()[ok], rids[ok])
    check_close(w.cpu()[ok], rw[ok], 1e-6, "topk_weights")


@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_gating_dtypes(ops, ref, dtype):
    logits = randn(10, 20, seed=3, dtype=dtype)
    w, ids = ops.topk_gating(logits, 4, "softmax", True, None, 0, 0, 1.0)
    rw, rids = ref.topk_gating(logits.cpu(), 4, "softmax", True, None, 0, 0, 1.0)
    assert torch.equal(ids.cpu(), rids)
    check_close(w.cpu(), rw, 1e-6, str(dtype))


def test_topk_gating_ties_go_to_lower_index(ops):
    logits = torch.zeros(3, 9, device=DEVICE)
    logits[1, 4] = 1.0
    w, ids = ops.topk_gating(logits, 3, "softmax", False, None, 0, 0, 1.0)
    assert ids.cpu().tolist() == [[0, 1, 2], [4, 0, 1], [0, 1, 2]]


def test_topk_gating_counts_in_same_pass(ops):
    logits = randn(37, 12, seed=11)
    w, ids, counts = ops.topk_gating_with_counts(logits, 3)
    expect = torch.bincount(ids.cpu().view(-1).long(), minlength=12).to(torch.int32)
    assert torch.equal(counts.cpu(), expect)


def test_topk_gating_empty(ops):
    w, ids = ops.topk_gating(torch.empty(0, 8, device=DEVICE), 2, "softmax", True, None, 0, 0, 1.0)
    assert w.shape == (0, 2) and ids.shape == (0, 2)


@pytest.mark.parametrize(
    "scoring,renorm,scale",
    [
        ("softmax", True, 1.0),
        ("softmax", False, 1.0),
        ("sigmoid", True, 2.5),
        ("sigmoid", False, 1.0),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_gating_backward(ops, ref, scoring, renorm, scale, dtype):
    T, E, k = 9, 12, 3
    logits = randn(T, E, seed=5, dtype=dtype)
    _, ids = ops.topk_gating(logits, k, scoring, renorm, None, 0, 0, scale)
    gw = randn(T, k, seed=6)
    g = ops.topk_gating_backward(gw, logits, ids, scoring, renorm, scale)
    rg = ref.topk_gating_backward(gw.cpu(), logits.cpu(), ids.cpu(), scoring, renorm, scale)
    assert g.dtype == dtype
    check_close(g.cpu().float(), rg.float(), 1e-5 if dtype == torch.float32 else 1e-2, "grad")


def test_topk_gating_bad_groups(ops):
    with pytest.raises(ValueError, match="num_expert_groups"):
        ops.topk_gating(randn(2, 10, seed=1), 2, "sigmoid", True, None, 3, 1, 1.0)
    with pytest.raises(ValueError, match="top_k"):
        ops.topk_gating(randn(2, 10, seed=1), 11, "softmax", True, None, 0, 0, 1.0)
