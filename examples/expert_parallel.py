"""Expert parallelism on CPU: a few training steps of a small MoE model, experts sharded over the
ranks, against the same model trained in one process.

    torchrun --nproc-per-node 2 examples/expert_parallel.py

Every rank builds the same model (same seed), wraps its MoE layer in ExpertParallelMoE (keeping
E / W experts) and trains on its own shard of each batch; router and other replicated gradients
are summed over the ranks before the step, expert gradients are complete on their owner. Rank 0
also trains the unsharded model on the whole batch and prints both losses per step: they agree
to fp32 rounding.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn

import moe_kernels as mk
from moe_kernels.parallel import ExpertParallelMoE

H, INTER, E, K, VOCAB, SEQ, BATCH, STEPS = 64, 96, 8, 2, 128, 16, 8, 20


class TinyMoEModel(nn.Module):
    """Embedding -> MoE feed-forward (residual) -> output head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, H)
        self.moe = mk.MoE(H, INTER, E, K)
        self.head = nn.Linear(H, VOCAB)

    def forward(self, tokens: torch.Tensor, moe=None) -> torch.Tensor:
        h = self.embed(tokens)
        h = h + (moe or self.moe)(h)
        return self.head(h)


def loss_of(model, tokens, moe=None, total_tokens=None):
    logits = model(tokens[:, :-1], moe)
    loss = nn.functional.cross_entropy(
        logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1), reduction="sum"
    )
    return loss / total_tokens


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = TinyMoEModel()
    single = copy.deepcopy(model) if rank == 0 else None
    ep = ExpertParallelMoE(model.moe)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)  # after wrapping: the local expert slices
    opt_single = torch.optim.SGD(single.parameters(), lr=0.5) if single is not None else None
    replicated = [p for p in model.parameters() if all(p is not q for q in ep.expert_parameters())]
    data = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        batch = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=data)  # same on every rank
        total = BATCH * SEQ
        mine = batch.chunk(world)[rank]
        loss = loss_of(model, mine, ep, total)
        opt.zero_grad()
        loss.backward()
        for p in replicated:  # router, embedding, head: partial sums of the ranks' tokens
            dist.all_reduce(p.grad)
        opt.step()
        summed = loss.detach().clone()
        dist.all_reduce(summed)
        if single is not None:
            ref = loss_of(single, batch, None, total)
            opt_single.zero_grad()
            ref.backward()
            opt_single.step()
            print(
                f"step {step:2d}  expert-parallel loss {summed.item():.6f}  "
                f"single-process loss {ref.item():.6f}  diff {abs(summed.item() - ref.item()):.1e}"
            )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
