"""Tune the Triton GEMM configurations on this GPU and write them into configs.json.

Run on a machine with a CUDA GPU (the result is keyed by its family: sm80, sm86 = sm_86/sm_89, or
sm90)::

    python bench/tune_triton.py                       # every kind, bf16, the default model shapes
    python bench/tune_triton.py --kinds glu,down --dtypes bf16,fp16 --quick
    python bench/tune_triton.py --output /tmp/configs.json   # write elsewhere (default: in place)

For each kernel kind (``gemm``: grouped_gemm; ``glu`` / ``down``: the two GEMMs of moe_ffn;
``ragged_k``: the weight gradient), dtype and bucket of average rows per expert (T * k / E), every
candidate tile configuration that fits the family's shared memory is timed with
``triton.testing.do_bench`` on each model shape, and the one with the lowest total time wins. The
family's section of the JSON file is replaced by the winners (one entry per bucket, in increasing
``max_avg_rows`` order, the last one unbounded); other families are kept. Afterwards run the static
gate (``python -m moe_kernels.tools.gpu_gate``) to check the new configurations compile without
spills on every architecture.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# (name, H, I, E, k): the model shapes the winners must be good for
SHAPES = {
    "qwen3-30b-a3b": (2048, 768, 128, 8),
    "olmoe-1b-7b": (2048, 1024, 64, 8),
    "mixtral-8x7b": (4096, 14336, 8, 2),
}
BUCKETS = (16, 32, 64, None)  # max_avg_rows of the entries; None = unbounded
BUCKET_ROWS = {16: 8, 32: 24, 64: 48, None: 512}  # the rows per expert timed for each bucket


def candidates(kind: str, bucket, dtype: str, family: str, quick: bool):
    from moe_kernels.triton_kernels import _config

    if kind == "ragged_k":
        bms, bns, bks = (64, 128), (64, 128), (32, 64)
    else:
        bms = {16: (16,), 32: (16, 32), 64: (32, 64), None: (64, 128)}[bucket]
        bns = (64, 128) if quick else (32, 64, 128, 256)
        bks = (64, 128) if quick else (32, 64, 128)
    warps = (4, 8)
    stages = (3, 4) if quick else (2, 3, 4, 5)
    elem = 4 if dtype == "fp32" else 2
    limit = _config.SHARED_LIMIT[family]
    for bm, bn, bk, w, s in itertools.product(bms, bns, bks, warps, stages):
        cfg = _config.GemmConfig(bm, bn, bk, 8 if kind != "ragged_k" else 1, w, s)
        if _config.smem_bytes(cfg, kind, elem) * s / max(s - 1, 1) > limit:
            continue
        yield cfg


def time_kind(ops, kind: str, dtype, shape, rows_per_expert: int) -> float:
    from triton.testing import do_bench

    H, isz, E, k = shape
    T = max(1, rows_per_expert * E // k)
    dev = "cuda"
    x = torch.randn(T, H, device=dev, dtype=dtype)
    logits = torch.randn(T, E, device=dev)
    w, ids = ops.topk_gating(logits, k, "softmax", True, None, 0, 0, 1.0)
    wgu = torch.randn(E, 2 * isz, H, device=dev, dtype=dtype) * H**-0.5
    wd = torch.randn(E, H, isz, device=dev, dtype=dtype) * isz**-0.5
    if kind in ("glu", "down"):
        fn = lambda: ops.moe_ffn(x, wgu, wd, w, ids, None, None, "swiglu", 1.702, 7.0, False)
    else:
        counts, offs, *_ = ops.route(ids, E, 0)
        a = torch.randn(T * k, H, device=dev, dtype=dtype)
        g = torch.randn(T * k, 2 * isz, device=dev, dtype=dtype)
        if kind == "gemm":
            fn = lambda: ops.grouped_gemm(a, wgu, offs, True)
        else:
            fn = lambda: ops.grouped_gemm_backward(g, a, wgu, offs, True, False, True)
    return do_bench(fn, warmup=10, rep=50)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kinds", default="gemm,glu,down,ragged_k")
    ap.add_argument("--dtypes", default="bf16")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--quick", action="store_true", help="a smaller candidate space")
    ap.add_argument("--output", default=None, help="JSON to write (default: the package's file)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_triton.py needs a CUDA GPU", file=sys.stderr)
        return 2
    from moe_kernels.triton_kernels import _config, ops

    family = _config.gpu_family(torch.device("cuda"))
    path = Path(args.output) if args.output else _config.CONFIG_FILE
    data = json.loads(_config.CONFIG_FILE.read_text()) if _config.CONFIG_FILE.exists() else {}
    data.setdefault("version", 1)
    section = data.setdefault("configs", {}).setdefault(family, {})
    shapes = [SHAPES[s] for s in args.shapes.split(",")]
    t_start = time.time()
    for kind in args.kinds.split(","):
        entries = []
        for dt_name in args.dtypes.split(","):
            dtype = DTYPES[dt_name]
            buckets = (None,) if kind == "ragged_k" else BUCKETS
            for bucket in buckets:
                best, best_t = None, float("inf")
                for cfg in candidates(kind, bucket, dt_name, family, args.quick):
                    _config.OVERRIDE[kind] = cfg
                    try:
                        total = sum(
                            time_kind(ops, kind, dtype, s, BUCKET_ROWS[bucket]) for s in shapes
                        )
                    except Exception as exc:  # e.g. out of resources: not a candidate
                        print(f"  {kind} {dt_name} {cfg}: {type(exc).__name__}", flush=True)
                        continue
                    finally:
                        _config.OVERRIDE[kind] = None
                    if total < best_t:
                        best, best_t = cfg, total
                if best is None:
                    continue
                print(
                    f"{family} {kind} {dt_name} max_avg_rows={bucket}: {best} "
                    f"({best_t:.3f} ms over {len(shapes)} shapes)",
                    flush=True,
                )
                entry = {"dtypes": [dt_name], "max_avg_rows": bucket, "config": best.kwargs()}
                entries.append(entry)
        section[kind] = entries
    data["notes"] = (
        data.get("notes", "") + f" {family} tuned by bench/tune_triton.py "
        f"({torch.cuda.get_device_name()}, {time.strftime('%Y-%m-%d')})."
    ).strip()
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(
        f"wrote {path} in {time.time() - t_start:.0f} s; now run "
        "`python -m moe_kernels.tools.gpu_gate` to check the new configurations"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
