"""SimSMoE on a tiny regression task: train an MoE layer from nearly identical experts, with and
without the similarity loss, and print how similar the experts' outputs are before and after
(mean pairwise linear CKA over held-out inputs; 1 = the same function up to rotation and scale).

Two experts, both selected for every token: the setting where co-selected experts receive the
same tokens and, without the loss, stay much alike.

    python examples/simsmoe.py
"""

from __future__ import annotations

import itertools

import torch

import moe_kernels as mk
from moe_kernels.losses import cka

H, INTER, E, K, STEPS = 32, 48, 2, 2, 300


def expert_similarity(m: mk.MoE, x: torch.Tensor) -> float:
    """Mean linear CKA of the experts' outputs on x, over every pair of experts."""
    with torch.no_grad():
        outs = [
            mk.moe_ffn(
                x,
                m.gate_up_proj,
                m.down_proj,
                torch.ones(len(x), 1),
                torch.full((len(x), 1), e, dtype=torch.int32),
            )  # fmt: skip
            for e in range(E)
        ]
    pairs = list(itertools.combinations(range(E), 2))
    return sum(cka(outs[i], outs[j]).item() for i, j in pairs) / len(pairs)


def train(similarity_loss_coef: float) -> tuple[float, float, float]:
    torch.manual_seed(0)
    m = mk.MoE(
        H, INTER, E, K, similarity_loss_coef=similarity_loss_coef, pair_frequency_threshold=1.0
    )
    with torch.no_grad():  # collapsed start: every expert a near copy of expert 0
        for e in range(1, E):
            m.gate_up_proj[e] = m.gate_up_proj[0] + 1e-3 * torch.randn_like(m.gate_up_proj[0])
            m.down_proj[e] = m.down_proj[0] + 1e-3 * torch.randn_like(m.down_proj[0])
    teacher = torch.nn.Sequential(torch.nn.Linear(H, 64), torch.nn.Tanh(), torch.nn.Linear(64, H))
    data = torch.Generator().manual_seed(1)
    x_eval = torch.randn(256, H, generator=data)
    before = expert_similarity(m, x_eval)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    m.train()
    for _ in range(STEPS):
        x = torch.randn(128, H, generator=data)
        with torch.no_grad():
            y = teacher(x)
        loss = torch.nn.functional.mse_loss(m(x), y)
        opt.zero_grad()
        loss.backward()  # the similarity loss's gradient is injected by the layer
        opt.step()
    m.eval()
    with torch.no_grad():
        x = torch.randn(512, H, generator=data)
        mse = torch.nn.functional.mse_loss(m(x), teacher(x)).item()
    return before, expert_similarity(m, x_eval), mse


def main() -> None:
    torch.set_num_threads(1)
    for coef in (0.0, 0.5):
        before, after, mse = train(coef)
        print(
            f"similarity_loss_coef={coef:<4}  mean pairwise CKA of the experts' outputs: "
            f"{before:.3f} before, {after:.3f} after {STEPS} steps (held-out MSE {mse:.4f})"
        )


if __name__ == "__main__":
    main()
