"""A/B two builds of moe_kernels on the same machine, alternated call by call in one run.

Each build is a Python interpreter (a virtual environment) that imports its own ``moe_kernels``.
Both run as long-lived worker processes holding the same inputs (same seeds); the driver asks them
for one timed ``moe_ffn`` call (``--pass bwd``: one ``moe_ffn_backward`` op call; ``--pass step``:
a forward and backward through autograd; ``--op grouped_gemm``: the layer's first GEMM instead) in
turns (A, B, read ceiling, A, B, ...), so that a shared or noisy machine slows both alike. Only
one process computes at a time. Decode rows evict the caches before every call (a buffer of 3x the
last-level cache is written), as in a real model where the other layers' weights have just
streamed through them.

Example (before/after a change, decode rows of the three preset shapes)::

    python bench/ab_builds.py --a /path/to/old/.venv/bin/python --b .venv/bin/python \\
        --shapes qwen3-30b-a3b,olmoe-1b-7b,mixtral-8x7b --tokens 1,16 --rounds 15

Prints per (shape, T) the median of each build, B / A, and each build's share of the read
bandwidth measured in the same rounds (bytes of the distinct active experts' weights / time).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

#: H, I, E, k of the preset layer shapes (the models' configs)
SHAPES = {
    "qwen3-30b-a3b": (2048, 768, 128, 8),
    "olmoe-1b-7b": (2048, 1024, 64, 8),
    "mixtral-8x7b": (4096, 14336, 8, 2),
    "deepseek-v3": (7168, 2048, 256, 8),
}

WORKER = r"""
import glob, json, os, sys, time
import torch
import moe_kernels as mk

def l3_bytes():
    sizes = {}
    for d in glob.glob("/sys/devices/system/cpu/cpu[0-9]*/cache/index[0-9]*"):
        try:
            if int(open(d + "/level").read()) < 3:
                continue
            s = open(d + "/size").read().strip().upper()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1], 1)
            sizes[open(d + "/shared_cpu_list").read().strip()] = int(s.rstrip("KMGB")) * mult
        except (OSError, ValueError):
            pass
    return sum(sizes.values()) or (256 << 20)

evict_buf = torch.zeros(max(3 * l3_bytes(), 64 << 20) // 4)
state = {}
print(json.dumps({"ready": mk.__file__, "isa": mk.available_backends()["cpu"][1]}), flush=True)
for line in sys.stdin:
    msg = json.loads(line)
    if msg["cmd"] == "setup":
        H, I, E, k, T, seed = (msg[n] for n in ("H", "I", "E", "k", "T", "seed"))
        g = torch.Generator().manual_seed(seed)
        wgu = torch.empty(E, 2 * I, H, dtype=torch.bfloat16)
        wd = torch.empty(E, H, I, dtype=torch.bfloat16)
        for e in range(E):
            wgu[e].copy_(torch.randn(2 * I, H, generator=g).mul_(H**-0.5))
            wd[e].copy_(torch.randn(H, I, generator=g).mul_(I**-0.5))
        x = torch.randn(T, H, generator=g).bfloat16()
        w, ids = torch.topk(torch.softmax(torch.randn(T, E, generator=g), -1), k, dim=-1)
        w = (w / w.sum(-1, keepdim=True)).float()
        ids = ids.int()
        state["args"] = (x, wgu, wd, w, ids)
        state["grad"] = torch.randn(T, H, generator=g).bfloat16()
        distinct = int(torch.unique(ids).numel())
        state["bytes"] = distinct * 3 * H * I * 2
        if msg["op"] == "grouped_gemm":  # GEMM 1 of the layer on the expert-sorted token rows
            flat = ids.flatten().long()
            order = torch.argsort(flat, stable=True)
            a = x[order // k].contiguous()
            offs = torch.bincount(flat, minlength=E).cumsum(0).int()
            go = torch.randn(a.shape[0], 2 * I, generator=g).bfloat16()
            if msg["pass"] == "bwd":
                gbwd = torch.ops.moe_kernels.grouped_gemm_backward
                state["call"] = lambda: gbwd(go, a, wgu, offs, True, True, True)
            else:
                state["call"] = lambda: mk.grouped_gemm(a, wgu, offs, trans_b=True, backend="cpu")
            state["bytes"] = distinct * 2 * H * I * 2
        elif msg["pass"] == "step":  # forward and backward through autograd (training)
            leaves = [t.detach().requires_grad_() for t in (x, wgu, wd, w)]

            def step():
                with torch.enable_grad():
                    mk.moe_ffn(*leaves, ids, backend="cpu").backward(state["grad"])
                for t in leaves:
                    t.grad = None

            state["call"] = step
        elif msg["pass"] == "bwd":  # the backward op alone, on the forward's inputs
            bwd = torch.ops.moe_kernels.moe_ffn_backward
            extra = (None, None, "swiglu", 1.702, 7.0, False)
            state["call"] = lambda: bwd(state["grad"], *state["args"], *extra)
        else:
            state["call"] = lambda: mk.moe_ffn(*state["args"], backend="cpu")
        state["pass"] = msg["pass"]
        with torch.inference_mode(msg["pass"] != "step"):
            state["call"]()
        print(json.dumps({"bytes": state["bytes"]}), flush=True)
    elif msg["cmd"] == "time":
        with torch.inference_mode(state["pass"] != "step"):
            if msg["evict"]:
                evict_buf.add_(1.0)
            t0 = time.perf_counter()
            state["call"]()
            dt = time.perf_counter() - t0
        print(json.dumps({"s": dt}), flush=True)
    elif msg["cmd"] == "sum":
        buf = state.get("sum_buf")
        if buf is None:
            buf = state["sum_buf"] = torch.ones((1 << 30) // 4)
        t0 = time.perf_counter()
        buf.sum()
        dt = time.perf_counter() - t0
        print(json.dumps({"s": dt, "bytes": buf.numel() * 4}), flush=True)
    elif msg["cmd"] == "drop":
        state.clear()
        print(json.dumps({}), flush=True)
"""


class Worker:
    def __init__(self, python: str, threads: int, extra_env: list[str]):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        env.update(kv.split("=", 1) for kv in extra_env)
        # Run from a neutral folder so a source tree's moe_kernels/ never shadows the build.
        self.proc = subprocess.Popen(
            [python, "-c", WORKER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd="/",
        )
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.proc.args[0]} exited (code {self.proc.poll()})")
        return json.loads(line)

    def ask(self, **msg) -> dict:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--a", required=True, help="Python interpreter of build A (before)")
    p.add_argument("--b", required=True, help="Python interpreter of build B (after)")
    p.add_argument(
        "--a-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="environment of build A's worker (repeatable), e.g. MOE_KERNELS_CPU_ISA=avx2: "
        "with --a and --b the same interpreter, this compares settings of one build",
    )
    p.add_argument("--b-env", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--shapes", default="qwen3-30b-a3b,olmoe-1b-7b,mixtral-8x7b")
    p.add_argument("--tokens", default="1,16")
    p.add_argument(
        "--op",
        choices=("moe_ffn", "grouped_gemm"),
        default="moe_ffn",
        help="the op timed: moe_ffn, or grouped_gemm on the layer's GEMM 1 (w_gate_up)",
    )
    p.add_argument(
        "--experts",
        type=int,
        default=0,
        help="E of every shape (0: the model's), e.g. 16 for moe-bench's scaled-down layers",
    )
    p.add_argument(
        "--inter",
        type=int,
        default=0,
        help="I of every shape (0: the model's), e.g. 128 for moe-bench's scaled DeepSeek-V3",
    )
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--no-evict", action="store_true", help="keep the caches warm between calls")
    p.add_argument(
        "--pass",
        dest="pass_",
        choices=("fwd", "bwd", "step"),
        default="fwd",
        help="time moe_ffn (fwd), the moe_ffn_backward op alone (bwd), or moe_ffn's forward and "
        "backward through autograd, as in training (step)",
    )
    p.add_argument(
        "--settle",
        type=float,
        default=0.2,
        help="seconds to wait before each timed call, so that the last thread pool stops spinning",
    )
    args = p.parse_args(argv)

    workers = {
        "A": Worker(args.a, args.threads, args.a_env),
        "B": Worker(args.b, args.threads, args.b_env),
    }
    for name, w in workers.items():
        env = " ".join(args.a_env if name == "A" else args.b_env)
        print(f"{name}: {w.info['ready']} ({w.info['isa']}) {env}")
    print(f"{'shape':<15} {'T':>4} {'A ms':>8} {'B ms':>8} {'B/A':>6} {'A %BW':>6} {'B %BW':>6}")
    for shape in args.shapes.split(","):
        H, I, E, k = SHAPES[shape]  # noqa: E741 (the layer symbols H, I, E, k)
        E = args.experts or E
        I = args.inter or I  # noqa: E741
        for T in (int(t) for t in args.tokens.split(",")):
            nbytes = 0
            for w in workers.values():
                nbytes = w.ask(
                    cmd="setup", H=H, I=I, E=E, k=k, T=T, seed=0, op=args.op, **{"pass": args.pass_}
                )["bytes"]
            times: dict[str, list[float]] = {"A": [], "B": [], "sum": []}
            for rnd in range(args.rounds):
                order = ("A", "B") if rnd % 2 == 0 else ("B", "A")
                for name in order:
                    time.sleep(args.settle)
                    times[name].append(workers[name].ask(cmd="time", evict=not args.no_evict)["s"])
                time.sleep(args.settle)
                r = workers["A"].ask(cmd="sum")
                times["sum"].append(r["s"] / r["bytes"])  # seconds per byte
            med = {n: statistics.median(v) for n, v in times.items()}
            pct = {n: 100 * nbytes * med["sum"] / med[n] for n in ("A", "B")}
            print(
                f"{shape:<15} {T:>4} {1e3 * med['A']:>8.2f} {1e3 * med['B']:>8.2f} "
                f"{med['B'] / med['A']:>6.3f} {pct['A']:>6.1f} {pct['B']:>6.1f}",
                flush=True,
            )
            for w in workers.values():
                w.ask(cmd="drop")
    for w in workers.values():
        w.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
