"""Fused MoE expert FFN vs the baselines, side by side in one run, against the project's speed
targets.

Contenders, on the same weights and routing, timed in turns (A B A B ...): the moe_kernels
backends (``cpu`` on a CPU), the pure-PyTorch reference, Hugging Face transformers 5.x experts in
``eager`` and ``grouped_mm`` mode, and a dense matmul of equal FLOPs; plus the machine's ceilings
measured in the same run (read bandwidth: a sum over 1 GiB of float32; dense: a 2048x2048x6144
matmul). Decode token counts (T <= 16) evict the caches before every call.

Examples::

    python bench/bench_moe_ffn.py                                  # all shapes and token counts
    python bench/bench_moe_ffn.py --shapes qwen3-30b-a3b --tokens 1,512 --csv bench/results.csv
    python bench/bench_moe_ffn.py --shapes small --tokens 1,64 --contenders reference,hf-eager

The harness is :mod:`moe_kernels.bench.compare` (the installed ``moe-bench --full`` runs it
too, without targets); this script owns the targets, shown in the ``target`` column of the ``cpu``
row. Results of past runs: bench/NOTES.md.
"""

from __future__ import annotations

import sys

from moe_kernels.bench.compare import main


def targets(shape: str, tokens: int, decode: bool) -> list[tuple[str, str, float]]:
    """The CPU backend's speed targets for one (shape, T), as (description, row key, minimum).

    Decode (T <= 16): the call streams the active experts' weights at >= 75% of the read
    ceiling measured in the same rounds; prefill: a multiple of Hugging Face eager's speed, and
    for Qwen3 at T = 2048 >= 60% of the dense matmul rate. bench/NOTES.md records the runs."""
    out: list[tuple[str, str, float]] = []
    if shape == "small":
        return out
    if decode:
        out.append((">=75% read BW", "pct_read_bw", 75.0))
    need = {
        ("qwen3-30b-a3b", 512): 2.0,
        ("qwen3-30b-a3b", 2048): 2.0,
        ("olmoe-1b-7b", 512): 2.0,
        ("olmoe-1b-7b", 2048): 1.4,
        ("mixtral-8x7b", 512): 1.5,
    }.get((shape, tokens))
    if need is not None:
        out.append((f">={need}x eager", "speedup_vs_eager", need))
    if (shape, tokens) == ("qwen3-30b-a3b", 2048):
        out.append((">=60% dense", "pct_dense", 60.0))
    return out


if __name__ == "__main__":
    sys.exit(main(prog="bench_moe_ffn.py", targets=targets))
