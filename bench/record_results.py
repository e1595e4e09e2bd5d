"""Refresh this machine type's recorded results: ``bench/results/<machine>.json`` and ``.png``.

``make bench-results`` (or ``python bench/record_results.py``) runs ``moe-bench`` on every op,
forward and backward, at T = 1, 16 and 128 on the default scaled Qwen3-30B-A3B layer and on
DeepSeek-V3 (sigmoid routing, groups, shared expert), and writes the JSON and the charts named
after the machine (``moe_kernels.bench.machine.machine_slug``, e.g.
``cpu-amd-epyc-zen-4-2t``); ``bench/results/README.md`` lists them. Run it on a quiet machine:
the output records the load average before and after (``meta.command`` holds the command).

Extra arguments are passed to ``moe-bench`` (e.g. ``--device cuda``).
"""

from __future__ import annotations

import os
import sys

import torch

from moe_kernels import cli
from moe_kernels.bench import machine

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

#: the recorded job (kept in one place so every machine type records the same thing)
ARGS = [
    "--shapes",
    "qwen3-30b-a3b,deepseek-v3",
    "--tokens",
    "1,16,128",
    "--pass",
    "both",
    "--repeats",
    "7",
    "--plain",
]


def main(argv: list[str]) -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if "--device" in argv:
        device = argv[argv.index("--device") + 1]
    slug = machine.machine_slug(torch.device(device))
    base = os.path.join(RESULTS, slug)
    if hasattr(os, "getloadavg"):
        print(f"load average before: {os.getloadavg()}")
    rc = cli.main([*ARGS, *argv, "--json", base + ".json", "--plot", base + ".png"])
    if hasattr(os, "getloadavg"):
        print(f"load average after: {os.getloadavg()}")
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
