"""``moe-bench``: check and time moe_kernels against the reference and its peers.

Default job: every op (top-k gating, route, permute, unpermute, the grouped GEMM, the expert FFN
``moe_ffn`` and the whole ``MoE`` layer), forward, on one Qwen3-30B-A3B-shaped layer whose experts
are scaled down so that it runs in seconds on a CPU (the output says how), at T = 1 and 128. Every
available backend and every installed peer run the same inputs; each row shows the median time and
its p20-p80 spread, TFLOP/s and GB/s from analytic counts, the share of the roofline of the
ceilings measured in the same run, the speed-up against a baseline (the reference by default),
the max relative error against the reference, and predicted H100 SXM / H200 times (roofline lower
bounds from published peaks, labelled as predictions).

The exit code is 1 when one of our backends raises or exceeds its tolerance (peers never change
it), or a backend named with ``--backends`` is unavailable; 2 on bad arguments.

``moe-bench --full`` runs the long side-by-side comparison of :mod:`moe_kernels.bench.compare`
instead (the fused expert FFN against the reference, Hugging Face transformers experts and a
dense matmul of equal FLOPs at full size); the source tree's ``bench/bench_moe_ffn.py`` runs the
same with the project's speed targets. ``--json`` / ``--csv`` write one schema in both modes
(:mod:`moe_kernels.bench.schema`, documented in README.md).
"""

from __future__ import annotations

import argparse
import shlex
import sys

import torch

from ._tolerances import LAYER_TOL, max_rel_err  # noqa: F401  (max_rel_err: the error column)
from .bench import compare as cmp
from .bench import harness as bu
from .bench import ops as bops
from .bench import peers as bpeers
from .bench import roofline, schema, suite

#: the largest relative error (vs the reference) a backend's whole layer may show, per dtype
#: (reasons in moe_kernels/_tolerances.py; per op: moe_kernels.bench.ops.tolerance)
TOLERANCE = LAYER_TOL

#: expert-weight budget of the default (scaled) job
DEFAULT_BUDGET_MIB = 160
DEFAULT_TOKENS = (1, 128)
#: ceilings of the default job (small enough to take a second; --full measures larger ones)
DEFAULT_READ_MIB = 256
DEFAULT_DENSE_MNK = "1024,2048,2048"
#: stop timing one (op, pass, shape, T) after the round that passes this many seconds
DEFAULT_GROUP_SECONDS = 2.0

DESCRIPTION = """\
Check and time moe_kernels' ops -- top-k gating, routing, permutation, the grouped GEMM, the
expert FFN and the whole MoE layer, forward and backward -- on every backend against the
reference and the installed peers (transformers' experts, torch's grouped_mm, vLLM, the
grouped_gemm package), on the layer shapes of well-known MoE models. Each row: median and
p20-p80 time, TFLOP/s and GB/s from analytic counts, % of the roofline of the ceilings measured
in the same run, speed-up against a baseline, max relative error against the reference, and
PREDICTED H100 SXM / H200 times (roofline lower bounds from published peaks).

Default: every op, forward, on Qwen3-30B-A3B's layer with its experts scaled down to 160 MiB,
T = 1 and 128: about half a minute on a 2-core CPU.
"""

EPILOG = """\
examples:
  moe-bench                                   # every op, fwd, Qwen3-30B-A3B scaled, T = 1,128
  moe-bench --list-presets                    # the model presets and their sources
  moe-bench --shape deepseek-v3 --pass both --tokens 16
  moe-bench --shape 4096,1024,64,6 --ops moe_ffn --routing zipf --skew 1.5
  moe-bench --json out.json --csv out.csv --plot out.png
  moe-bench --full                            # side-by-side comparison at full size (minutes)

exit code: 0 ok; 1 one of our backends raised or exceeded its tolerance (peers never fail the
run), or a backend named with --backends is unavailable; 2 bad arguments.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moe-bench",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--list-presets", action="store_true", help="print the model presets and exit")
    g = p.add_argument_group("what to run")
    g.add_argument(
        "--shape",
        "--shapes",
        dest="shape",
        default=None,
        metavar="S[,S...]",
        help=f"comma-separated presets ({', '.join(bu.SHAPES)}) and/or custom shapes as four "
        "integers H,I,E,k (default: qwen3-30b-a3b; with --full: "
        "qwen3-30b-a3b,olmoe-1b-7b,mixtral-8x7b)",
    )
    g.add_argument(
        "--tokens",
        default=None,
        metavar="T[,T...]",
        help="comma-separated token counts (default: 1,128; --full: per shape 1,16,512,2048)",
    )
    g.add_argument(
        "--ops",
        default=None,
        metavar="OP[,OP...]",
        help=f"ops to time, any of {', '.join(roofline.OPS)} or 'all' (default: all)",
    )
    g.add_argument(
        "--pass",
        dest="pass_",
        choices=("fwd", "bwd", "both"),
        default="fwd",
        help="forward, backward (the backward alone, from a retained graph) or both (default fwd)",
    )
    g.add_argument("--dtype", default="bf16", help="bf16 (default), fp16 or fp32")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    g.add_argument(
        "--backends",
        default=None,
        help="comma-separated backends to run (default: every available one for the device; "
        "the reference always runs); naming an unavailable backend fails the run",
    )
    g.add_argument(
        "--peers",
        default="all",
        help=f"comma-separated peers, 'all' (default) or 'none': {', '.join(bpeers.PEERS)}; "
        "a peer that is not installed or cannot run a case is listed as skipped",
    )
    g.add_argument(
        "--baseline",
        default="reference",
        help="the contender speed-ups are relative to (default: reference)",
    )
    g.add_argument(
        "--routing",
        choices=bops.ROUTINGS,
        default=None,
        help="token-to-expert distribution: uniform (default), zipf (Zipf-skewed, --skew), "
        "one (every token on experts 0..k-1)",
    )
    g.add_argument(
        "--skew",
        type=float,
        default=None,
        help="Zipf exponent s (p_e ~ (e+1)^-s; implies --routing zipf; default 1.2)",
    )
    g.add_argument(
        "--full-size",
        action="store_true",
        help="run the presets at their real size (default: experts scaled down to "
        f"{DEFAULT_BUDGET_MIB} MiB of weights)",
    )
    g.add_argument(
        "--budget-mib",
        type=int,
        default=DEFAULT_BUDGET_MIB,
        help="expert-weight budget of a scaled layer",
    )
    g.add_argument("--seed", type=int, default=0)
    t = p.add_argument_group("timing")
    t.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed calls per contender (default 5; --full: 20 at decode sizes, 5 at prefill)",
    )
    t.add_argument("--warmup", type=int, default=1, help="untimed calls before timing (default 1)")
    t.add_argument("--evict", action="store_true", help="evict the CPU caches before each call")
    t.add_argument(
        "--no-ceilings",
        action="store_true",
        help="do not measure the read-bandwidth and dense-matmul ceilings",
    )
    t.add_argument(
        "--no-cuda-graphs",
        action="store_true",
        help="on a GPU, time decode sizes (T <= --decode-max-tokens) eagerly, not as CUDA graphs",
    )
    o = p.add_argument_group("output")
    o.add_argument("--json", default=None, metavar="PATH", help="write meta and rows as JSON")
    o.add_argument(
        "--csv", default=None, metavar="PATH", help="write the rows (plus meta columns) as CSV"
    )
    o.add_argument(
        "--plot",
        default=None,
        metavar="PATH.png",
        help="write a roofline and a speed-up chart (matplotlib)",
    )
    o.add_argument("--plain", action="store_true", help="plain-text tables, no progress bar")
    p.add_argument(
        "--full",
        "--compare",
        dest="full",
        action="store_true",
        help="run the long side-by-side comparison of the expert FFN (bench/bench_moe_ffn.py) "
        "instead",
    )
    f = p.add_argument_group(
        "options of --full (--decode-max-tokens, --max-seconds, --read-mib "
        "and --dense-mnk apply to the default job too)"
    )
    cmp.add_compare_arguments(f, with_common=False)
    return p


def _split(text: str | None) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()] if text else []


def list_presets() -> str:
    lines = []
    width = max(len(n) for n in bu.SHAPES)
    for name, s in bu.SHAPES.items():
        extra = f"; {s.routing_description()}; {s.expert_description()}"
        if s.num_shared_experts:
            extra += f"; shared experts {s.num_shared_experts} (Is {s.shared_intermediate_size})"
        if s.approximation:
            extra += f"; approximated: {s.approximation}"
        lines.append(
            f"{name:{width}s}  H {s.hidden:5d}  I {s.intermediate:5d}  E {s.experts:3d}  "
            f"k {s.top_k}  {s.source or s.model}{extra}"
        )
    return "\n".join(lines)


def _options(args: argparse.Namespace) -> suite.Options:
    import moe_kernels
    from moe_kernels import _backends

    device = torch.device(args.device or cmp.default_device())
    dtype = cmp.parse_dtype(args.dtype)
    esize = torch.empty(0, dtype=dtype).element_size()
    presets = bu.parse_shapes(args.shape) or [bu.SHAPES["qwen3-30b-a3b"]]
    shapes = [
        (s, s if args.full_size else bu.scale_to_budget(s, args.budget_mib << 20, esize))
        for s in presets
    ]
    try:
        tokens = [int(t) for t in _split(args.tokens)] or list(DEFAULT_TOKENS)
    except ValueError:
        raise ValueError(f"--tokens: expected integers, got {args.tokens!r}") from None
    if any(t < 0 for t in tokens):
        raise ValueError("--tokens: token counts must be >= 0")
    ops = _split(args.ops)
    if not ops or ops == ["all"]:
        ops = list(roofline.OPS)
    for op in ops:
        if op not in roofline.OPS:
            raise ValueError(f"--ops: unknown op {op!r}; choose from {', '.join(roofline.OPS)}")
    passes = ["fwd", "bwd"] if args.pass_ == "both" else [args.pass_]
    avail = moe_kernels.available_backends()
    if args.backends is None:
        backends = ["reference"] + [
            n
            for n, (ok, _) in avail.items()
            if ok and n != "reference" and device.type in _backends._BACKENDS[n].devices()
        ]
        explicit = False
    else:
        backends = _split(args.backends)
        for n in backends:
            if n not in avail:
                raise ValueError(f"--backends: unknown backend {n!r}; known: {', '.join(avail)}")
        if "reference" not in backends:
            backends = ["reference", *backends]
        explicit = True
    if args.peers in ("all", ""):
        peer_names = list(bpeers.PEERS)
    elif args.peers == "none":
        peer_names = []
    else:
        peer_names = _split(args.peers)
        for n in peer_names:
            if n not in bpeers.PEERS:
                raise ValueError(f"--peers: unknown peer {n!r}; known: {', '.join(bpeers.PEERS)}")
    if args.baseline not in backends and args.baseline not in peer_names:
        raise ValueError(
            f"--baseline: {args.baseline!r} is not among the backends and peers of this run"
        )
    routing = args.routing or ("zipf" if args.skew is not None else "uniform")
    skew = 1.2 if args.skew is None else args.skew
    if routing == "zipf" and not skew > 0:
        raise ValueError(f"--skew: the Zipf exponent must be > 0, got {skew}")
    if args.repeats is not None and args.repeats < 1:
        raise ValueError("--repeats must be >= 1")
    try:
        mnk = tuple(int(v) for v in _split(args.dense_mnk or DEFAULT_DENSE_MNK))
    except ValueError:
        mnk = ()
    if len(mnk) != 3:
        raise ValueError(f"--dense-mnk: expected M,K,N, got {args.dense_mnk!r}")
    return suite.Options(
        device=device,
        dtype=dtype,
        shapes=shapes,
        tokens=tokens,
        ops=ops,
        passes=passes,
        backends=backends,
        explicit_backends=explicit,
        peers=peer_names,
        baseline=args.baseline,
        routing=routing,
        skew=skew,
        repeats=args.repeats or 5,
        warmup=max(0, args.warmup - 1),  # the accuracy check is the first warm-up call
        max_seconds=DEFAULT_GROUP_SECONDS if args.max_seconds is None else args.max_seconds,
        evict=args.evict,
        decode_max_tokens=args.decode_max_tokens,
        cuda_graphs=not args.no_cuda_graphs,
        seed=args.seed,
        plain=args.plain,
        ceilings=not args.no_ceilings,
        read_mib=args.read_mib or DEFAULT_READ_MIB,
        dense_mnk=mnk,
        command=shlex.join(["moe-bench", *(args._argv or [])]),
    )


def write_outputs(args, rows: list[dict], meta: dict) -> None:
    if args.json:
        schema.write_json(args.json, meta, rows)
        print(f"wrote {len(rows)} rows to {args.json}")
    if args.csv:
        schema.write_csv(args.csv, meta, rows)
        print(f"wrote {len(rows)} rows to {args.csv}")
    if args.plot:
        roofline.plot(rows, meta, args.plot)
        print(f"wrote the roofline and speed-up charts to {args.plot}")


def run_default(args: argparse.Namespace) -> int:
    opts = _options(args)
    rows, meta, failures = suite.run(opts)
    write_outputs(args, rows, meta)
    flagged = [r for r in rows if r["kind"] == "peer" and r["status"] == "FAIL"]
    for r in flagged:
        print(
            f"note: peer {r['backend']} {r['op']} {r['pass']} T={r['T']} exceeds the tolerance "
            f"({r['max_rel_err']:.3g} > {r['tolerance']:g}); peers do not fail the run"
        )
    if failures:
        print("moe-bench: FAILED")
        for f in failures:
            print(f"  {f}")
        return 1
    print(f"moe-bench: ok ({meta['wall_s']:.1f} s)")
    return 0


def run_full(args: argparse.Namespace) -> int:
    """The side-by-side comparison; its rows are written in the same schema as the default job's."""
    record: dict = {}
    csv_path, json_path = args.csv, args.json
    args.csv = None  # compare's own CSV layout belongs to bench/bench_moe_ffn.py
    rc = cmp.run(args, record=record)
    args.csv = csv_path
    if csv_path or json_path or args.plot:
        rows, meta = cmp.to_schema(args, record)
        write_outputs(args, rows, meta)
    return rc


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args._argv = list(sys.argv[1:] if argv is None else argv)
    if args.list_presets:
        print(list_presets())
        return 0
    try:
        if args.full:
            return run_full(args)
        return run_default(args)
    except ValueError as exc:
        print(f"moe-bench: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
