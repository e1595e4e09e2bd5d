"""Hugging Face's own sparse MoE blocks with ``experts_implementation="moe_kernels"`` against
``"eager"``: an independent check of the transformers integration, outside moe-bench's harness.

For each model, transformers' own block (``Qwen3MoeSparseMoeBlock``, ``OlmoeSparseMoeBlock``,
``MixtralSparseMoeBlock``: router and experts) is built at full size from its published config,
with bf16 weights ~N(0, 0.02) and inputs ~N(0, 1). One block instance switches its config's
experts implementation between the two, alternated call by call in one process (so a shared
machine slows both alike); caches are not evicted. Prints per (model, T) the median of each, the
speed-up over eager and the largest relative difference of the outputs (both sides round to bf16,
so it is the size of a bf16 rounding, ~1e-2)::

    python bench/hf_blocks_check.py                                 # all three, T = 16, 512
    python bench/hf_blocks_check.py --models qwen3,olmoe --tokens 16,512,2048 --repeats 5

Needs transformers >= 5. Threads: torch's default (set OMP_NUM_THREADS, or run under taskset).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

#: model -> (config class, block class path, config keyword arguments at full size)
MODELS = {
    "qwen3": (
        "Qwen3MoeConfig",
        "transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock",
        dict(hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8),
    ),
    "olmoe": (
        "OlmoeConfig",
        "transformers.models.olmoe.modeling_olmoe.OlmoeSparseMoeBlock",
        dict(hidden_size=2048, intermediate_size=1024, num_experts=64, num_experts_per_tok=8),
    ),
    "mixtral": (
        "MixtralConfig",
        "transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock",
        dict(hidden_size=4096, intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2),
    ),
}


def build_block(model: str, impl: str, seed: int) -> tuple[torch.nn.Module, object]:
    """transformers' sparse MoE block of ``model`` (a key of MODELS) in bf16, random weights, and
    its config (whose experts implementation the block's experts module reads at each call)."""
    import importlib

    import transformers

    cfg_name, block_path, kwargs = MODELS[model]
    config = getattr(transformers, cfg_name)(**kwargs, experts_implementation=impl)
    mod_name, cls_name = block_path.rsplit(".", 1)
    cls = getattr(importlib.import_module(mod_name), cls_name)
    gen = torch.Generator().manual_seed(seed)
    block = cls(config).to(torch.bfloat16).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return block, config


def run(block: torch.nn.Module, config, impl: str, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    config._experts_implementation = impl
    with torch.no_grad():
        t0 = time.perf_counter()
        out = block(x)
        dt = time.perf_counter() - t0
    return (out[0] if isinstance(out, tuple) else out), dt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="qwen3,olmoe,mixtral", help=f"of {', '.join(MODELS)}")
    p.add_argument("--tokens", default="16,512")
    p.add_argument("--repeats", type=int, default=3, help="timed calls of each side")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import moe_kernels
    import moe_kernels.integrations.transformers as mkt

    name = mkt.register()
    # count the calls that reach moe_kernels, so that a block which silently kept eager is caught
    calls = [0]
    real_moe_ffn = mkt._api.moe_ffn

    def counted(*a, **kw):
        calls[0] += 1
        return real_moe_ffn(*a, **kw)

    mkt._api.moe_ffn = counted
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; moe_kernels backends:")
    for b, (ok, why) in moe_kernels.available_backends().items():
        print(f"  {b}: {ok} ({why})")
    print(
        f"{'model':<8} {'T':>5} {'eager ms':>9} {'ours ms':>9} {'x eager':>8} {'max rel diff':>13}"
    )
    worst = 0.0
    for model in args.models.split(","):
        if model not in MODELS:
            print(f"unknown model {model!r}; known: {', '.join(MODELS)}", file=sys.stderr)
            return 2
        block, config = build_block(model, "eager", args.seed)
        H = block.gate.weight.shape[1]
        for T in (int(t) for t in args.tokens.split(",")):
            gen = torch.Generator().manual_seed(args.seed + T)
            x = torch.randn(1, T, H, generator=gen).to(torch.bfloat16)
            run(block, config, name, x)  # warm-up of both sides (first-call set-up, page faults)
            run(block, config, "eager", x)
            times: dict[str, list[float]] = {"eager": [], name: []}
            outs = {}
            for r in range(args.repeats):
                for impl in ("eager", name) if r % 2 == 0 else (name, "eager"):
                    before = calls[0]
                    outs[impl], dt = run(block, config, impl, x)
                    if (calls[0] > before) != (impl == name):
                        print(f"{model}: {impl} did not run the expected implementation")
                        return 1
                    times[impl].append(dt)
            a, b = outs["eager"].float(), outs[name].float()
            rel = ((a - b).abs().max() / a.abs().max().clamp_min(1e-30)).item()
            worst = max(worst, rel)
            me, mo = statistics.median(times["eager"]), statistics.median(times[name])
            print(
                f"{model:<8} {T:>5} {1e3 * me:>9.2f} {1e3 * mo:>9.2f} {me / mo:>8.2f} {rel:>13.2e}",
                flush=True,
            )
        del block
    # both sides round to bf16: a difference far past that is a wrong result, not rounding
    return 1 if worst > 0.05 else 0


if __name__ == "__main__":
    sys.exit(main())
