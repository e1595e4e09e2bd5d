"""Fused MoE expert FFN vs the baselines, side by side in one run (also ``moe-bench --full``).

Contenders, on the same weights and routing, timed in turns (A B A B ...): the moe_kernels
backends (``cpu`` on a CPU), the pure-PyTorch reference, Hugging Face transformers 5.x experts in
``eager`` and ``grouped_mm`` mode, and a dense matmul of equal FLOPs; plus the machine's ceilings
measured in the same run (read bandwidth: a sum over 1 GiB of float32; dense: a 2048x2048x6144
matmul). Decode token counts (T <= 16) evict the caches before every call.

Examples::

    python bench/bench_moe_ffn.py                                  # all shapes and token counts
    python bench/bench_moe_ffn.py --shapes qwen3-30b-a3b --tokens 1,512 --csv bench/results.csv
    python bench/bench_moe_ffn.py --shapes small --tokens 1,64 --contenders reference,hf-eager

The logic lives in ``moe_kernels._bench_compare`` so that the installed ``moe-bench`` runs it too.
"""

from __future__ import annotations

import sys

from moe_kernels._bench_compare import main

if __name__ == "__main__":
    sys.exit(main(prog="bench_moe_ffn.py"))
