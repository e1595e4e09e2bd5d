"""Expert parallelism over ``torch.distributed``: a :class:`~moe_kernels.MoE` layer whose experts
are sharded across the ranks of a process group, tokens exchanged with all-to-all.

Each of the W ranks of the group holds the experts ``[r * E / W, (r + 1) * E / W)``; the router,
the correction bias (and any other parameter outside the expert weights) stay replicated. A rank
routes its own tokens, sends each kept (token, slot) pair to the rank owning the pair's expert
(``all_to_all_single`` with uneven split sizes), runs its local experts on what it receives with
the package's ops (the layer's backend), sends the expert outputs back and combines them with the
routing weights in slot order (:func:`moe_kernels.unpermute`, fp32). The backward pass runs the
same exchanges in reverse (autograd functions over the collectives).

Works with any ``torch.distributed`` backend that implements ``all_to_all_single`` with uneven
splits: NCCL on GPUs, gloo on CPUs. The split sizes of an uneven all-to-all must be known on the
host, so each forward reads the per-rank pair counts back once (one host synchronisation per
layer call, in the forward pass only: the backward reuses them), and the wrapper cannot be compiled
with ``torch.compile(fullgraph=True)``.

Gradients: the expert parameters' gradients are complete on their owner rank (every row routed
to a local expert arrives there). Every other parameter (``replicated_parameters()``) gets this
rank's partial gradient, from its own tokens only: sum them over the group before the optimizer
step::

    for p in ep.replicated_parameters():
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad, group=ep.group)

(DistributedDataParallel over the whole layer would average the expert gradients of *different*
experts across ranks: wrap only the replicated part, or reduce by hand as above.)

Checkpoints: ``ep.module.state_dict()`` holds this rank's expert slices (``gate_up_proj``
``[E / W, 2I, H]`` etc.) and the replicated tensors. :meth:`ExpertParallelMoE.full_state_dict`
gathers the full layer's state dict (every rank gets it; save it from rank 0);
:meth:`ExpertParallelMoE.load_full_state_dict` loads such a full state dict on every rank,
keeping each rank's slice.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import nn

from . import _api
from .layers import MoE
from .plan import RoutingPlan

__all__ = ["ExpertParallelMoE"]

# Per-expert parameters of MoE, sliced along their first dimension.
_EXPERT_PARAMS = ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias")

# 16-bit floats travel as raw bytes (uint8 views): gloo has no bf16 / int16 collectives.
_WIRE = {torch.bfloat16: torch.uint8, torch.float16: torch.uint8}


def _exchange(
    x: torch.Tensor, send: list[int], recv: list[int], group
) -> torch.Tensor:  # rows of x[: sum(send)] split by `send`, received rows split by `recv`
    out = x.new_empty((sum(recv),) + tuple(x.shape[1:]))
    wire = _WIRE.get(x.dtype)
    src = x.contiguous()
    if wire is not None:
        dist.all_to_all_single(out.view(wire), src.view(wire), recv, send, group=group)
    else:
        dist.all_to_all_single(out, src, recv, send, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """Rows exchanged between ranks; the backward sends the gradients back the other way."""

    @staticmethod
    def forward(ctx, x, send, recv, group):
        ctx.send, ctx.recv, ctx.group = send, recv, group
        return _exchange(x, send, recv, group)

    @staticmethod
    def backward(ctx, grad):
        return _exchange(grad, ctx.recv, ctx.send, ctx.group), None, None, None


class ExpertParallelMoE(nn.Module):
    """Wraps ``moe`` (identical on every rank: same seed or same state dict) so that rank r of
    ``group`` (default: the world) keeps and runs only the experts ``local_experts``.

    Args:
        moe: the full layer. Its expert parameters (``gate_up_proj``, ``down_proj`` and their
            biases) are replaced in place by their local slices ``[E / W, ...]``: build the
            optimizer after wrapping.
        group: the process group (``None``: the default group).

    Attributes:
        module: ``moe`` itself (``ep.module is moe``), with the local expert slices.
        local_experts: ``range`` of the global expert ids this rank holds.
        group, world_size, rank: the process group and this rank's place in it.

    ``forward(x)`` takes this rank's own tokens ``[..., H]`` (any number, zero included,
    different per rank) and returns their outputs; ``return_router_logits`` and ``return_aux``
    as the layer. With the layer's defaults (dropless, no noise, no losses) each token's output
    is what the single-process layer gives it on the union of every rank's tokens (routing is
    per token). The training options act per rank, as in data-parallel training: capacity
    ``C = ceil(capacity_factor · T_r · k / E)`` and the drops are computed over this rank's T_r
    tokens, the load-balancing and z-losses (and ``aux``) over this rank's tokens (each rank
    injects its own; the router gradients summed over the ranks then hold the sum of the
    ranks' losses), noise and jitter are drawn from each rank's own generator, and the shared
    experts run on every rank for its tokens. So rank r's outputs equal those of the
    single-process layer applied to rank r's tokens alone.

    Raises:
        ValueError: E is not a multiple of the group size.
        RuntimeError: torch.distributed is not initialised.
    """

    def __init__(self, moe: MoE, group=None) -> None:
        super().__init__()
        if not isinstance(moe, MoE):
            raise TypeError(f"moe must be a moe_kernels.MoE, got {type(moe).__name__}")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "ExpertParallelMoE needs torch.distributed initialised "
                "(torch.distributed.init_process_group)"
            )
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        E, W = moe.num_experts, self.world_size
        if E % W != 0:
            raise ValueError(f"num_experts={E} must be a multiple of the process group's size {W}")
        if moe.similarity_loss_coef:
            raise ValueError(
                "SimSMoE (similarity_loss_coef) is not supported under expert parallelism: its "
                "extra expert calls would be collectives whose count differs between ranks"
            )
        self.experts_per_rank = E // W
        lo = self.rank * self.experts_per_rank
        self.local_experts = range(lo, lo + self.experts_per_rank)
        self.module = moe
        #: set True to fill :attr:`last_stats` at every forward (host timers around the
        #: exchanges: on a GPU each is then synchronised, which costs time of its own)
        self.record_stats = False
        #: the last forward's exchange volume and times (with ``record_stats``): rows sent to /
        #: received from the experts' owners, bytes sent / received by this rank over both
        #: exchanges (its share with itself included), seconds in the exchanges and in the local
        #: experts
        self.last_stats: dict[str, float] = {}
        with torch.no_grad():
            for name in _EXPERT_PARAMS:
                p = getattr(moe, name)
                if p is not None:
                    local = p.detach()[lo : lo + self.experts_per_rank].clone()
                    setattr(moe, name, nn.Parameter(local, requires_grad=p.requires_grad))

    # ------------------------------------------------------------------------------------------
    def replicated_parameters(self) -> list[nn.Parameter]:
        """Parameters every rank holds in full (router, ...): their gradients are per-rank
        partial sums, to be all-reduced (summed) over ``group`` before the optimizer step."""
        expert = {id(getattr(self.module, n)) for n in _EXPERT_PARAMS}
        return [p for p in self.module.parameters() if id(p) not in expert]

    def expert_parameters(self) -> list[nn.Parameter]:
        """This rank's expert slices (complete gradients, no reduction needed)."""
        return [
            getattr(self.module, n) for n in _EXPERT_PARAMS if getattr(self.module, n) is not None
        ]

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The full layer's state dict (expert tensors gathered from every rank, on every rank):
        what ``MoE(...).state_dict()`` of the unsharded layer holds. A collective: call it on
        every rank."""
        state = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        for name in _EXPERT_PARAMS:
            p = getattr(self.module, name)
            if p is None:
                continue
            parts = [torch.empty_like(p) for _ in range(self.world_size)]
            wire = _WIRE.get(p.dtype)
            if wire is not None:
                dist.all_gather(
                    [t.view(wire) for t in parts], p.detach().contiguous().view(wire), self.group
                )
            else:
                dist.all_gather(parts, p.detach().contiguous(), group=self.group)
            state[name] = torch.cat(parts, 0)
        return state

    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a full (unsharded) layer's state dict, keeping this rank's expert slices."""
        lo, hi = self.local_experts.start, self.local_experts.stop
        local = dict(state)
        for name in _EXPERT_PARAMS:
            if getattr(self.module, name) is not None:
                local[name] = state[name][lo:hi]
        self.module.load_state_dict(local)

    # ------------------------------------------------------------------------------------------
    def forward(
        self, x: torch.Tensor, return_router_logits: bool = False, return_aux: bool = False
    ):
        """The layer's forward (:meth:`MoE.forward_with_experts`) on this rank's tokens
        ``x`` [..., H], with the routed experts run by their owner ranks. Returns what the layer
        returns for the same flags."""
        return self.module.forward_with_experts(
            x, self._dispatch_combine, return_router_logits, return_aux
        )

    def _dispatch_combine(self, flat: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor):
        """Send every kept pair to its expert's owner, run the local experts, send back, combine
        with ``weights`` in slot order."""
        m, W, per = self.module, self.world_size, self.experts_per_rank
        T, k = ids.shape
        device = flat.device
        ids64 = ids.reshape(-1).long()
        kept = (ids64 >= 0) & (ids64 < m.num_experts)
        dest = torch.where(kept, ids64 // per, W)  # W: not sent
        # pairs in destination order, pair order within a destination (a stable sort)
        order = torch.sort(dest, stable=True).indices
        counts = torch.bincount(dest, minlength=W + 1)[:W]
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.group)
        # uneven split sizes live on the host: the documented one sync per forward
        send, recv = counts.tolist(), recv_counts.tolist()  # sync-ok: all_to_all split sizes
        n_send = sum(send)
        sent = order[:n_send]
        w_dtype = m.gate_up_proj.dtype
        x_send = flat.to(w_dtype).index_select(0, sent // k)
        local_send = (ids64.index_select(0, sent) - dest.index_select(0, sent) * per).to(
            torch.int32
        )
        stats = self.record_stats
        t0 = _clock(stats, device)
        x_recv = _AllToAll.apply(x_send, send, recv, self.group)
        local_recv = _exchange(local_send, send, recv, self.group)
        t1 = _clock(stats, device)
        # local experts on the received rows: k = 1 with weight 1 (the routing weights are
        # applied by the sender's combine, in slot order)
        y_recv = _api.moe_ffn(
            x_recv,
            m.gate_up_proj,
            m.down_proj,
            torch.ones(x_recv.shape[0], 1, device=device, dtype=torch.float32),
            local_recv.view(-1, 1),
            activation=m.activation,
            gate_up_bias=m.gate_up_proj_bias,
            down_bias=m.down_proj_bias,
            alpha=m.alpha,
            limit=m.limit,
            interleaved=m.interleaved,
            backend=m.backend,
        )
        t2 = _clock(stats, device)
        y_back = _AllToAll.apply(y_recv, recv, send, self.group)
        if stats:
            t3 = _clock(stats, device)
            row_bytes = x_send.shape[1] * x_send.element_size()
            n_recv = x_recv.shape[0]
            self.last_stats = {
                "rows_sent": float(n_send),
                "rows_received": float(n_recv),
                # x rows and int32 expert ids out, expert output rows back
                "bytes_sent": float((n_send + n_recv) * row_bytes + 4 * n_send),
                "bytes_received": float((n_send + n_recv) * row_bytes + 4 * n_recv),
                "exchange_s": (t1 - t0) + (t3 - t2),
                "experts_s": t2 - t1,
            }
        # the returned rows in pair order: row i of y_back is pair sent[i]; the combine reads
        # them through a plan whose rows are the sent pairs (dropped pairs: row -1)
        row_of_pair = torch.full((T * k,), -1, dtype=torch.int32, device=device)
        row_of_pair[sent] = torch.arange(n_send, dtype=torch.int32, device=device)
        rows = torch.full((1,), n_send, dtype=torch.int32, device=device)
        plan = RoutingPlan(  # one "expert": the returned rows, in send order
            tokens_per_expert=rows,
            offs=rows,
            row_of_slot=row_of_pair.view(T, k),
            slot_of_row=sent.to(torch.int32),
            block_expert=None,
            num_experts=1,
        )
        out = _api.unpermute(y_back, plan, weights, backend=m.backend)
        return out.to(flat.dtype)

    def extra_repr(self) -> str:
        return (
            f"world_size={self.world_size}, rank={self.rank}, "
            f"local_experts=[{self.local_experts.start}, {self.local_experts.stop})"
        )


def _clock(on: bool, device: torch.device) -> float:
    if not on:
        return 0.0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
