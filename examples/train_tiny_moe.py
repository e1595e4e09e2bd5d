"""Train a tiny MoE language model on the CPU with Switch-Transformer routing.

Top-1 routing with a capacity factor of 1.25 (assignments past an expert's capacity are dropped),
router jitter and the load-balancing loss (Fedus et al. 2021), plus ST-MoE's router z-loss.  The
router starts skewed towards expert 0 (as a collapsed router is); the same model is trained twice
from the same weights and data, without and with the load-balancing loss, and the per-expert load
of a held-out batch is printed before and after: the loss brings it toward uniform.

    python examples/train_tiny_moe.py [--steps 300] [--aux-loss-coef 0.05]

The task: next-token prediction on sequences from a random second-order Markov chain, so the
model needs the previous two tokens (a causal mixing layer gives it them) and the experts.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import moe_kernels
from moe_kernels.layers import MoE

VOCAB, HIDDEN, INTER, EXPERTS, SEQ, BATCH = 32, 32, 32, 8, 32, 8


class TinyMoELM(nn.Module):
    """Embedding -> causal mixing of the last two tokens -> MoE block (residual) -> LM head."""

    def __init__(self, aux_loss_coef: float) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.mix = nn.Linear(2 * HIDDEN, HIDDEN)
        self.norm = nn.LayerNorm(HIDDEN)
        self.moe = MoE(
            HIDDEN,
            INTER,
            EXPERTS,
            1,  # Switch: top-1
            router_bias=True,
            capacity_factor=1.25,
            drop_policy="position",
            router_jitter=0.01,
            aux_loss_coef=aux_loss_coef,
            z_loss_coef=1e-3,
        )
        self.head = nn.Linear(HIDDEN, VOCAB)

    def forward(self, tokens: torch.Tensor, return_aux: bool = False):
        e = self.embed(tokens)
        prev = torch.cat([torch.zeros_like(e[:, :1]), e[:, :-1]], dim=1)
        h = torch.relu(self.mix(torch.cat([e, prev], dim=-1)))
        moe_out, aux = self.moe(self.norm(h), return_aux=True)
        logits = self.head(h + moe_out)
        return (logits, aux) if return_aux else logits


def markov_batches(seed: int):
    """An endless stream of [BATCH, SEQ + 1] token batches from a fixed random 2nd-order chain."""
    gen = torch.Generator().manual_seed(seed)
    table = torch.softmax(torch.randn(VOCAB, VOCAB, VOCAB, generator=gen) * 3, dim=-1)
    while True:
        seq = torch.randint(0, VOCAB, (BATCH, 2), generator=gen)
        for _ in range(SEQ - 1):
            probs = table[seq[:, -2], seq[:, -1]]
            seq = torch.cat([seq, torch.multinomial(probs, 1, generator=gen)], dim=1)
        yield seq


@torch.no_grad()
def expert_load(model: TinyMoELM, batch: torch.Tensor) -> torch.Tensor:
    """Fraction of the batch's tokens routed to each expert (eval mode, before drops)."""
    model.eval()
    _, aux = model(batch[:, :-1], return_aux=True)
    model.train()
    return aux.tokens_per_expert.float() / aux.tokens_per_expert.sum()


def train(model: TinyMoELM, steps: int, data_seed: int) -> tuple[float, float, float]:
    """AdamW on the next-token loss alone: the MoE layer adds its auxiliary losses to the
    backward pass itself.  Returns the mean training loss of the first and of the last 20 steps
    and the share of tokens dropped in the last step."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = markov_batches(data_seed)
    losses, dropped = [], 0.0
    for _ in range(steps):
        batch = next(data)
        logits, aux = model(batch[:, :-1], return_aux=True)
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        dropped = aux.dropped.item() / aux.kept.numel()
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    return first, last, dropped


def fmt(load: torch.Tensor) -> str:
    return " ".join(f"{v:5.2f}" for v in load.tolist())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--aux-loss-coef", type=float, default=0.05)
    args = parser.parse_args()

    # every matrix here is tiny: one thread does each op faster than two that must synchronise
    torch.set_num_threads(1)
    torch.manual_seed(0)
    init = TinyMoELM(0.0)
    with torch.no_grad():  # a skewed router: expert 0 gets most tokens at the start
        init.moe.router.bias.zero_()
        init.moe.router.bias[0] = 2.0
    held_out = next(markov_batches(seed=123))
    usable = [n for n, (ok, _) in moe_kernels.available_backends().items() if ok]
    print(f"backends available: {', '.join(usable)} (chosen automatically)")
    print(f"{EXPERTS} experts, top-1, capacity factor 1.25; uniform load = {1 / EXPERTS:.3f}")
    print(f"load before training:        {fmt(expert_load(init, held_out))}")

    for coef in (0.0, args.aux_loss_coef):
        model = TinyMoELM(coef)
        model.load_state_dict(init.state_dict())
        torch.manual_seed(1)  # same jitter draws in both runs
        start = time.perf_counter()
        first, last, dropped = train(model, args.steps, data_seed=7)
        load = expert_load(model, held_out)
        print(
            f"aux_loss_coef={coef:<5}: load {fmt(load)}  (max {load.max():.2f}); "
            f"train loss {first:.2f} -> {last:.2f}; dropped {100 * dropped:.0f}% of tokens "
            f"in the last step; {time.perf_counter() - start:.1f} s"
        )


if __name__ == "__main__":
    main()
