"""``moe-bench``: check and time every available backend on one MoE layer.

Default job: one Qwen3-30B-A3B-shaped expert layer (H 2048, I 768, k 8), with the number of experts
scaled down so that it runs in seconds on a CPU (the output says how). Every available backend and
the reference run ``moe_kernels.moe_ffn`` on the same inputs; the table shows each backend's max
relative error against the reference (``max |out - ref| / max |ref|``) and its median time.
The exit code is non-zero when a backend raises or its error exceeds the dtype's tolerance.

``moe-bench --full`` runs the side-by-side comparison of :mod:`moe_kernels.bench.compare` instead
(the fused backends vs the reference, Hugging Face transformers experts in ``eager`` and
``grouped_mm`` mode, a dense matmul of equal FLOPs, the read-bandwidth and dense-matmul ceilings)
at full size; the source tree's ``bench/bench_moe_ffn.py`` runs the same with the project's speed
targets.
"""

from __future__ import annotations

import argparse
import sys

import torch

from ._tolerances import LAYER_TOL, max_rel_err
from .bench import compare as cmp
from .bench import harness as bu
from .bench.machine import device_description

#: the largest relative error (vs the reference) a backend may show, per dtype (reasons in
#: moe_kernels/_tolerances.py)
TOLERANCE = LAYER_TOL

#: expert-weight budget of the default (scaled) job
DEFAULT_BUDGET_MIB = 160


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moe-bench",
        description="Time and check moe_kernels backends against the reference on an MoE layer "
        "(--full: compare with Hugging Face transformers experts and the machine's ceilings).",
    )
    p.add_argument(
        "--shape",
        "--shapes",
        dest="shape",
        default=None,
        help=f"comma-separated presets: {', '.join(bu.SHAPES)} (default: qwen3-30b-a3b; with "
        "--full: qwen3-30b-a3b,olmoe-1b-7b,mixtral-8x7b)",
    )
    p.add_argument(
        "--tokens",
        default=None,
        help="comma-separated token counts (default: 1,64; --full: per shape 1,16,512,2048)",
    )
    p.add_argument("--dtype", default="bf16", help="bf16 (default), fp16 or fp32")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument(
        "--backends",
        default=None,
        help="comma-separated backends to run (default: every available one); naming an "
        "unavailable backend is an error",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed calls per backend (default 5; --full: 20 at decode sizes, 5 at prefill)",
    )
    p.add_argument("--csv", default=None, metavar="PATH", help="also write the results to PATH")
    p.add_argument(
        "--full-size",
        action="store_true",
        help="run the preset at its real size (default: experts scaled down to "
        f"{DEFAULT_BUDGET_MIB} MiB of weights)",
    )
    p.add_argument(
        "--budget-mib",
        type=int,
        default=DEFAULT_BUDGET_MIB,
        help="expert-weight budget of the scaled layer",
    )
    p.add_argument("--evict", action="store_true", help="evict the CPU caches before each call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plain", action="store_true", help="plain-text tables (no rich)")
    p.add_argument(
        "--full",
        "--compare",
        dest="full",
        action="store_true",
        help="run the full side-by-side comparison (bench/bench_moe_ffn.py) instead",
    )
    g = p.add_argument_group("options of --full")
    cmp.add_compare_arguments(g, with_common=False)
    return p


def _split(text: str | None) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()] if text else []


def run_default(args: argparse.Namespace) -> int:
    import moe_kernels

    device = torch.device(args.device or cmp.default_device())
    dtype = cmp.parse_dtype(args.dtype)
    esize = torch.empty(0, dtype=dtype).element_size()
    presets = [bu.get_shape(s) for s in _split(args.shape)] or [bu.SHAPES["qwen3-30b-a3b"]]
    tokens_list = [int(t) for t in _split(args.tokens)] or [1, 64]
    if any(t < 0 for t in tokens_list):
        raise ValueError("--tokens: token counts must be >= 0")
    repeats = args.repeats or 5
    avail = moe_kernels.available_backends()

    if args.backends is None:
        names = ["reference"] + [n for n, (ok, _) in avail.items() if ok and n != "reference"]
        explicit = False
    else:
        names = _split(args.backends)
        explicit = True
        for n in names:
            if n not in avail:
                raise ValueError(f"--backends: unknown backend {n!r}; known: {', '.join(avail)}")
        if "reference" not in names:
            names = ["reference", *names]

    print(f"moe-bench: {device_description(device)}; torch {torch.__version__}; {dtype}")
    for n, (ok, why) in avail.items():
        print(f"  backend {n:9s} {'available' if ok else 'unavailable'}: {why}")

    headers = ["backend", "status", "max rel err", "median ms", "x reference", "TFLOP/s", "GB/s"]
    csv_headers = [
        "shape",
        "H",
        "I",
        "E",
        "k",
        "T",
        "dtype",
        "device",
        "backend",
        "status",
        "max_rel_err",
        "median_ms",
        "speedup_vs_reference",
        "tflops",
        "active_weight_GBps",
        "error",
    ]
    csv_rows: list[list] = []
    failed = False
    tol = TOLERANCE[dtype]
    evictor = bu.CacheEvictor(device) if args.evict else None
    for preset in presets:
        shape = preset
        if not args.full_size:
            shape = bu.scale_to_budget(preset, args.budget_mib << 20, esize)
        if shape != preset:
            print(
                f"\n{preset.model}: {preset.describe()} scaled down to {shape.describe()} "
                f"({shape.weight_bytes(esize) / 2**20:.0f} MiB of expert weights instead of "
                f"{preset.weight_bytes(esize) / 2**30:.2f} GiB; --full-size for the real layer)"
            )
        else:
            print(
                f"\n{preset.model}: {shape.describe()} "
                f"({shape.weight_bytes(esize) / 2**20:.0f} MiB of expert weights)"
            )
        weights = None
        for T in tokens_list:
            inp = bu.make_inputs(
                shape, T, dtype=dtype, device=device, seed=args.seed + T, weights=weights
            )
            weights = (inp["w_gate_up"], inp["w_down"])
            rows, bad = _run_shape(
                moe_kernels,
                shape,
                T,
                inp,
                names,
                avail,
                explicit,
                device,
                dtype,
                tol,
                repeats,
                evictor,
                args,
            )
            failed |= bad
            bu.print_table(
                headers,
                [r[0] for r in rows],
                title=f"{shape.model} T={T} ({shape.describe()}, {dtype}, {device.type})",
                plain=args.plain,
            )
            csv_rows.extend(r[1] for r in rows)
    if args.csv:
        bu.write_csv(args.csv, csv_headers, csv_rows)
        print(f"wrote {len(csv_rows)} rows to {args.csv}")
    if failed:
        print(
            "moe-bench: FAILED (a backend raised or exceeded the tolerance "
            f"{tol:g} on the max relative error)"
        )
    return 1 if failed else 0


def _run_shape(
    moe_kernels, shape, T, inp, names, avail, explicit, device, dtype, tol, repeats, evictor, args
):
    x, wgu, wd, tw, ti = (inp[n] for n in ("x", "w_gate_up", "w_down", "topk_weights", "topk_ids"))
    esize = x.element_size()
    active_bytes = bu.distinct_experts(ti, shape.experts) * shape.expert_bytes(esize)
    flops = shape.flops(T)
    fns, status, errs, rels = {}, {}, {}, {}
    failed = False
    with torch.inference_mode():
        ref = moe_kernels.moe_ffn(x, wgu, wd, tw, ti, backend="reference")
    for n in names:
        ok, why = avail[n]
        if not ok:
            status[n] = "unavailable"
            errs[n] = why
            failed |= explicit
            continue
        fn = lambda b=n: moe_kernels.moe_ffn(x, wgu, wd, tw, ti, backend=b)
        try:
            with torch.inference_mode():
                out = fn()
            rels[n] = max_rel_err(out, ref)
        except moe_kernels.BackendUnavailableError as exc:
            # available, but not for moe_ffn with these tensors (e.g. a partial build): only an
            # error when the backend was asked for by name
            status[n] = "ERROR" if explicit else "n/a"
            errs[n] = str(exc)
            failed |= explicit
            continue
        except Exception as exc:  # noqa: BLE001 -- reported and turned into the exit code
            status[n] = "ERROR"
            errs[n] = f"{type(exc).__name__}: {exc}"
            failed = True
            continue
        if not rels[n] <= tol:
            status[n] = "FAIL"
            errs[n] = f"error {rels[n]:.3g} > tolerance {tol:g}"
            failed = True
        else:
            status[n] = "ok"
        fns[n] = fn
    times, terrs = bu.time_alternating(
        fns, repeats=repeats, warmup=1, device=device, before_each=evictor
    )
    for n, e in terrs.items():
        status[n], errs[n] = "ERROR", e
        failed = True
    ref_med = bu.median(times.get("reference", []))
    rows = []
    for n in names:
        med = bu.median(times.get(n, []))
        speed = ref_med / med if med == med else float("nan")
        tflops = flops / med / 1e12 if med == med else float("nan")
        gbps = active_bytes / med / 1e9 if med == med else float("nan")
        rel = rels.get(n, float("nan"))
        err = errs.get(n, "")
        shown = status[n] if not err else f"{status[n]}: {err[:70]}"
        rows.append(
            (
                [n, shown, rel, med * 1e3, speed, tflops, gbps],
                [
                    shape.name,
                    shape.hidden,
                    shape.intermediate,
                    shape.experts,
                    shape.top_k,
                    T,
                    str(dtype).replace("torch.", ""),
                    device.type,
                    n,
                    status[n],
                    rel,
                    med * 1e3,
                    speed,
                    tflops,
                    gbps,
                    err,
                ],
            )
        )
    return rows, failed


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.full:
            return cmp.run(args)
        return run_default(args)
    except ValueError as exc:
        print(f"moe-bench: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
