"""Expert parallelism on gloo: bytes each rank exchanges per layer call, and the time of the
exchanges against the local expert compute (moe_kernels.parallel.ExpertParallelMoE with
``record_stats``).

    python bench/bench_expert_parallel.py [--world 2] [--tokens 256] [--shape olmoe] [--reps 5]

Runs W processes on 127.0.0.1 (one thread each), each with ``--tokens`` tokens of its own, and
prints per rank the medians over ``--reps`` forward calls after one warm-up. Name the CPU
(lscpu) beside any figure you record (bench/NOTES.md).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SHAPES = {  # (H, I, E, k): real layer shapes, scaled down in E only where noted
    "olmoe": (2048, 1024, 64, 8),
    "qwen3": (2048, 768, 128, 8),
    "mixtral": (4096, 14336, 8, 2),
    "small": (512, 256, 16, 2),
}


def _worker(rank, world, port, args):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=600))
    from moe_kernels import MoE
    from moe_kernels.parallel import ExpertParallelMoE

    H, inter, E, k = SHAPES[args.shape]
    torch.manual_seed(0)
    ep = ExpertParallelMoE(MoE(H, inter, E, k, dtype=torch.bfloat16))
    ep.record_stats = True
    x = torch.randn(args.tokens, H, generator=torch.Generator().manual_seed(rank)).bfloat16()
    runs = []
    with torch.no_grad():
        for _ in range(args.reps + 1):
            dist.barrier()
            ep(x)
            runs.append(dict(ep.last_stats))
    runs = runs[1:]
    med = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    lines = [None] * world
    dist.all_gather_object(lines, (rank, med))
    if rank == 0:
        print(f"shape {args.shape} (H, I, E, k) = {SHAPES[args.shape]}, bf16, {world} ranks, "
              f"{args.tokens} tokens per rank, medians of {args.reps} calls")  # fmt: skip
        print("rank  rows out  rows in   MB sent   MB recv  exchange ms  experts ms")
        for r, m in lines:
            print(
                f"{r:4d}  {m['rows_sent']:8.0f}  {m['rows_received']:7.0f}  "
                f"{m['bytes_sent'] / 1e6:8.2f}  {m['bytes_received'] / 1e6:8.2f}  "
                f"{m['exchange_s'] * 1e3:11.2f}  {m['experts_s'] * 1e3:10.2f}"
            )
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="olmoe")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(args.world, port, args), nprocs=args.world, join=True,
                       start_method="spawn")  # fmt: skip


if __name__ == "__main__":
    main()
