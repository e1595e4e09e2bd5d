"""Where one full-size ``moe_ffn`` call on the cpu backend spends its time, without a profiler.

Sets ``MOE_KERNELS_CPU_PROFILE=1`` before the package loads, so the compiled op prints on stderr
the wall time of each of its phases (sort, GEMMs, combine; the backward's recompute, weight and
data gradients) and, under each phase that ran oneDNN's brgemm route, that route's time split
summed over the threads: packing the token blocks, the brgemm calls, and storing their transposed
results. Meant for the AMX CPUs the brgemm route runs on, where a profiler may not be at hand
(``bench/amx_check.sh``'s ``profile`` step runs it); the same lines print on any CPU.

    python bench/profile_moe_ffn.py --shapes qwen3-30b-a3b --tokens 2048 --calls 3 [--backward]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ["MOE_KERNELS_CPU_PROFILE"] = "1"

import torch  # noqa: E402

import moe_kernels  # noqa: E402
from moe_kernels.bench.harness import make_inputs, parse_shapes  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="qwen3-30b-a3b", help="comma-separated presets")
    p.add_argument("--tokens", default="2048", help="comma-separated token counts")
    p.add_argument("--calls", type=int, default=3, help="calls per shape and token count")
    p.add_argument("--backward", action="store_true", help="also run the backward (autograd)")
    args = p.parse_args(argv)
    import moe_kernels._C as C

    print(f"cpu ISA level {C.cpu_isa()}, brgemm route {C.cpu_brgemm_route()}, "
          f"own AMX kernel {C.cpu_amx_kernel()}, {torch.get_num_threads()} threads",
          flush=True)  # fmt: skip
    for shape in parse_shapes(args.shapes):
        weights = None
        for tokens in (int(t) for t in args.tokens.split(",")):
            inputs = make_inputs(shape, tokens, weights=weights, seed=1)
            weights = (inputs["w_gate_up"], inputs["w_down"])
            for call in range(args.calls):
                x = inputs["x"].detach().requires_grad_(args.backward)
                print(f"== {shape.name} T={tokens}, call {call + 1} of {args.calls}", flush=True)
                t0 = time.perf_counter()
                out = moe_kernels.moe_ffn(
                    x, inputs["w_gate_up"], inputs["w_down"], inputs["topk_weights"],
                    inputs["topk_ids"], **shape.ffn_kwargs(), backend="cpu",
                )  # fmt: skip
                t1 = time.perf_counter()
                line = f"   forward {1e3 * (t1 - t0):.1f} ms"
                if args.backward:
                    out.backward(torch.ones_like(out))
                    line += f", backward {1e3 * (time.perf_counter() - t1):.1f} ms"
                sys.stderr.flush()
                print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
