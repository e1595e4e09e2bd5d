"""SimSMoE in the MoE layer: ``moe_kernels.losses.cka`` against float64 HSIC definitions written
here, the layer's pair tracking on hand-built routings, and the similarity loss's value and
gradients (reference and cpu backends)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
from testutil import randn

import moe_kernels
from moe_kernels import MoE
from moe_kernels.losses import cka


# ----------------------------------------------------------------------------------------------
# CKA against the definitions: HSIC(K, L) = tr(K H L H) / (n - 1)^2, H = I - 11^T / n
# ----------------------------------------------------------------------------------------------
def _hsic(K, L):
    n = K.shape[0]
    H = torch.eye(n, dtype=torch.float64) - torch.full((n, n), 1.0 / n, dtype=torch.float64)
    return torch.trace(K @ H @ L @ H) / (n - 1) ** 2


def _gram(X, kernel, sigma):
    X = X.double()
    if kernel == "linear":
        return X @ X.t()
    D = torch.cdist(X, X) ** 2
    if sigma is None:
        off = D[~torch.eye(X.shape[0], dtype=torch.bool)]
        s2 = off[off > 0].median()
    else:
        s2 = torch.tensor(sigma, dtype=torch.float64) ** 2
    return torch.exp(-D / (2 * s2))


def _cka64(X, Y, kernel="linear", sigma=None):
    K, L = _gram(X, kernel, sigma), _gram(Y, kernel, sigma)
    return (_hsic(K, L) / torch.sqrt(_hsic(K, K) * _hsic(L, L))).item()


@pytest.mark.parametrize(
    "kernel,sigma", [("linear", None), ("rbf", 0.8), ("rbf", 2.5), ("rbf", None)]
)
@pytest.mark.parametrize("n,d1,d2", [(12, 5, 7), (40, 16, 16), (3, 2, 9)])
def test_cka_vs_definition(kernel, sigma, n, d1, d2):
    X = randn(n, d1, seed=n + d1)
    Y = X[:, :1] * 0.7 + randn(n, d2, seed=n + d2) * 0.5  # partly dependent
    got = cka(X, Y, kernel=kernel, sigma=sigma)
    assert got.dtype == torch.float32 and got.shape == ()
    assert abs(got.item() - _cka64(X, Y, kernel, sigma)) <= 2e-5


def test_cka_properties():
    X = randn(50, 8, seed=1)
    assert cka(X, X).item() == pytest.approx(1.0, abs=1e-6)
    assert cka(X, X, kernel="rbf", sigma=1.0).item() == pytest.approx(1.0, abs=1e-6)
    Y = randn(50, 8, seed=2)  # independent
    assert cka(X, Y).item() < 0.35
    Q, _ = torch.linalg.qr(randn(8, 8, seed=3))
    assert cka(X, X @ Q * 3.7).item() == pytest.approx(1.0, abs=1e-5)  # orthogonal, isotropic
    assert cka(X, X + 5.0).item() == pytest.approx(1.0, abs=1e-5)  # centring removes shifts
    assert cka(X, torch.ones(50, 4)).item() == 0.0  # constant representation


def test_cka_gradients():
    """Gradients against autograd through the definition (float64 HSIC with explicit H)."""
    X = randn(20, 6, seed=4, dtype=torch.float64)
    Y = randn(20, 5, seed=5, dtype=torch.float64)
    for kernel, sigma in (("linear", None), ("rbf", 1.3)):
        a1, b1 = X.clone().requires_grad_(), Y.clone().requires_grad_()
        cka(a1, b1, kernel=kernel, sigma=sigma).backward()
        a2, b2 = X.clone().requires_grad_(), Y.clone().requires_grad_()
        K, L = _gram(a2, kernel, sigma), _gram(b2, kernel, sigma)
        (_hsic(K, L) / torch.sqrt(_hsic(K, K) * _hsic(L, L))).backward()
        torch.testing.assert_close(a1.grad, a2.grad, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(b1.grad, b2.grad, rtol=1e-5, atol=1e-9)


def test_cka_bad_arguments():
    X = randn(4, 3, seed=1)
    with pytest.raises(ValueError, match="same number of rows"):
        cka(X, randn(5, 3, seed=2))
    with pytest.raises(ValueError, match="at least 2"):
        cka(X[:1], X[:1])
    with pytest.raises(ValueError, match="kernel"):
        cka(X, X, kernel="poly")
    with pytest.raises(ValueError, match="sigma"):
        cka(X, X, kernel="rbf", sigma=0.0)


# ----------------------------------------------------------------------------------------------
# the layer
# ----------------------------------------------------------------------------------------------
H, I, E = 16, 12, 4  # noqa: E741
REF = "reference"


def _layer(backend="reference", **kw):
    torch.manual_seed(0)
    kw.setdefault("similarity_loss_coef", 1.0)
    m = MoE(H, I, E, 2, backend=backend, router_bias=True, **kw)
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.bias.copy_(torch.tensor([3.0, 2.0, 1.0, 0.0]))  # every token picks experts 0, 1
    return m.train()


def test_off_by_default_costs_nothing():
    m = MoE(H, I, E, 2)
    assert m.similarity_head is None and m.pair_frequency is None
    assert "pair_frequency" not in m.state_dict()
    out, aux = m.train()(randn(6, H, seed=1), return_aux=True)
    assert aux.similarity_loss.item() == 0.0


def test_tracking_and_reset_on_hand_built_routing():
    """Every token selects experts 0 and 1: pair (0, 1) gains 1.0 per call; with a threshold of
    1.5 it is tracked (and reset) on calls 2, 4, ...; nothing else accumulates."""
    m = _layer(pair_frequency_threshold=1.5, similarity_threshold=-1.0)
    x = randn(10, H, seed=2)
    expect = [1.0, 0.0, 1.0, 0.0]
    for call, acc in enumerate(expect, 1):
        _, aux = m(x, return_aux=True)
        assert m.pair_frequency[0, 1].item() == pytest.approx(acc), call
        others = m.pair_frequency.clone()
        others[0, 1] = 0
        assert torch.equal(others, torch.zeros_like(others)), call
        tracked = call % 2 == 0
        assert (aux.similarity_loss.item() != 0.0) == tracked, call
    assert "pair_frequency" in m.state_dict()


def test_mixed_routing_fractions():
    """Pair fractions for k = 3: each token adds 1/T to each of its 3 pairs."""
    torch.manual_seed(0)
    m = MoE(H, I, 5, 3, similarity_loss_coef=1.0, pair_frequency_threshold=100.0).train()
    x = randn(16, H, seed=3)
    _, aux = m(x, return_aux=True)
    ids = aux.topk_ids.long()
    want = torch.zeros(5, 5, dtype=torch.float64)
    for row in ids.tolist():
        for a in row:
            for b in row:
                if a < b:
                    want[a, b] += 1.0 / 16
    torch.testing.assert_close(m.pair_frequency.double(), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("kind", ["rbf", "linear"])
def test_loss_on_near_copies_and_its_gradients(backend, kind):
    """Experts 0 and 1 made near copies and co-selected by every token: the loss is the CKA of
    their projected outputs (computed here from the definition), and its gradient reaches both
    experts and the head, and no other expert."""
    if (
        backend not in moe_kernels.available_backends()
        or not moe_kernels.available_backends()[backend][0]
    ):
        pytest.skip(f"backend {backend} unavailable")
    m = _layer(backend, pair_frequency_threshold=0.5, similarity_threshold=0.1, cka=kind)
    with torch.no_grad():
        m.gate_up_proj[1].copy_(m.gate_up_proj[0] + 0.005 * torch.randn_like(m.gate_up_proj[0]))
        m.down_proj[1].copy_(m.down_proj[0] + 0.005 * torch.randn_like(m.down_proj[0]))
    x = randn(24, H, seed=4)
    out, aux = m(x, return_aux=True)
    # the definition: both experts' routed FFN on every token, through the head
    ys = [
        moe_kernels.moe_ffn(
            x, m.gate_up_proj, m.down_proj, torch.ones(24, 1), torch.full((24, 1), e), backend=REF
        )
        for e in (0, 1)
    ]
    zs = [m.similarity_head(y).detach() for y in ys]
    want = _cka64(zs[0], zs[1], kind, 0.8 if kind == "rbf" else None)
    assert want > 0.9
    assert aux.similarity_loss.item() == pytest.approx(want, abs=1e-4)
    (out * 0).sum().backward()  # only the injected loss has a gradient
    assert m.similarity_head.weight.grad.abs().sum() > 0
    g = m.gate_up_proj.grad
    assert g[0].abs().sum() > 0 and g[1].abs().sum() > 0
    assert torch.equal(g[2:], torch.zeros_like(g[2:]))


def test_exact_copies_are_stationary():
    """Identical experts: CKA = 1, a stationary point (zero gradient to the experts)."""
    m = _layer(pair_frequency_threshold=0.5, similarity_threshold=0.1, cka="linear")
    with torch.no_grad():
        m.gate_up_proj[1].copy_(m.gate_up_proj[0])
        m.down_proj[1].copy_(m.down_proj[0])
    out, aux = m(randn(12, H, seed=6), return_aux=True)
    assert aux.similarity_loss.item() == pytest.approx(1.0, abs=1e-5)
    (out * 0).sum().backward()
    assert m.gate_up_proj.grad.abs().max().item() < 1e-5


def test_eval_mode_and_checks():
    m = _layer(pair_frequency_threshold=0.5)
    m.eval()
    _, aux = m(randn(5, H, seed=7), return_aux=True)
    assert aux.similarity_loss.item() == 0.0
    assert torch.equal(m.pair_frequency, torch.zeros_like(m.pair_frequency))
    plain = MoE(H, I, E, 2).train()
    plain.similarity_loss_coef = 1.0
    with pytest.raises(RuntimeError, match="similarity_head"):
        plain(randn(5, H, seed=8))
    with pytest.raises(ValueError, match="cka"):
        MoE(H, I, E, 2, similarity_loss_coef=1.0, cka="cosine")
    with pytest.raises(ValueError, match="cka_sigma"):
        MoE(H, I, E, 2, similarity_loss_coef=1.0, cka_sigma=0.0)
    m.train()
    with pytest.raises(RuntimeError, match="expert parallelism"):
        m.forward_with_experts(randn(5, H, seed=9), lambda x, w, i: x)


def test_deterministic():
    outs = []
    for _ in range(2):
        m = _layer(pair_frequency_threshold=0.5, similarity_threshold=0.0)
        x = randn(9, H, seed=10)
        out, aux = m(x, return_aux=True)
        out.sum().backward()
        outs.append((out.detach(), aux.similarity_loss, m.gate_up_proj.grad.clone()))
    assert all(torch.equal(a, b) for a, b in zip(outs[0], outs[1], strict=True))


def test_generator_unused():
    """The option draws no random numbers: the default generator's state is untouched."""
    m = _layer(pair_frequency_threshold=0.5)
    state = torch.get_rng_state()
    m(randn(7, H, seed=11))
    assert torch.equal(state, torch.get_rng_state())


def test_example_keeps_experts_apart():
    """examples/simsmoe.py: from near-identical experts, the option ends with a lower pairwise
    CKA of the experts' outputs than training without it."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, os.path.join(root, "examples", "simsmoe.py")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd="/tmp",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = [float(v) for v in re.findall(r"before, ([0-9.]+) after", proc.stdout)]
    assert len(after) == 2, proc.stdout
    assert after[1] < after[0], proc.stdout
