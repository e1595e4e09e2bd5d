"""Side-by-side benchmark of the fused expert FFN against the baselines a user would pick instead.

On the same weights and the same routing, in one run, contenders timed in turns (A B A B ...):

* ``moe_kernels`` backends (``cpu`` by default on CPU tensors; ``--backends`` picks others),
* ``reference``: this package's pure-PyTorch specification,
* ``hf-eager`` / ``hf-grouped_mm``: Hugging Face transformers 5.x experts (``Qwen3MoeExperts``,
  the same code as OLMoE's and Mixtral's) with the ``eager`` and ``grouped_mm`` experts
  implementations,
* ``dense-matmul``: a dense ``torch.matmul`` with the same FLOPs, ``[T, H] x [H, k*3I]``
  (it also reads the weights of k experts, like a decode step with k distinct experts),

and two machine ceilings measured in the same run: the read bandwidth (a sum over a 1 GiB float32
tensor, timed at the start and again as the ``read-ceiling`` contender in the rounds of every
(shape, T), whose median is the yardstick of that table's ``% read BW``) and the dense FLOP rate
(``[2048, 2048] x [2048, 6144]`` matmul in the benchmark dtype, in the fastest of three operand
layouts, the fastest of three calls; and, for reference, the same matmul in float32).

Decode sizes (T <= 16 by default) evict the caches before every timed call, as in a real model
where each layer's experts arrive from DRAM. Derived columns:

* ``x eager``: hf-eager median / this contender's median (> 1 is faster than eager);
* ``% read BW``: bytes of the distinct active experts' weights / time, over the read ceiling;
* ``% dense``: FLOPs (``2*T*k*3*H*I``) / time, over the dense ceiling;
* ``% fp32 mm``: the same over the float32 matmul rate. On CPUs without native bf16 dot products
  (AVX2 only) torch's bf16 matmul is a slow path, below its fp32 rate, so a bf16 kernel that
  widens to fp32 can exceed "100% dense": the fp32 rate is then the meaningful ceiling.

Run ``python bench/bench_moe_ffn.py --help`` or ``moe-bench --full --help``. The project's speed
targets (the ``target`` column of the ``cpu`` row) belong to the source tree's
``bench/bench_moe_ffn.py``, which passes them to :func:`run`; ``moe-bench --full`` runs without.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch

from .._tolerances import max_rel_err
from . import harness as bu
from .machine import device_description

#: contender names besides the moe_kernels backends
BASELINES = ("reference", "hf-eager", "hf-grouped_mm", "dense-matmul")

#: default token counts per shape (Mixtral at T = 2048 needs minutes per contender on 2 cores)
DEFAULT_TOKENS = {
    "qwen3-30b-a3b": (1, 16, 512, 2048),
    "olmoe-1b-7b": (1, 16, 512, 2048),
    "mixtral-8x7b": (1, 16, 512),
    "small": (1, 16, 512),
}

DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}

CSV_HEADERS = (
    "shape",
    "H",
    "I",
    "E",
    "k",
    "T",
    "dtype",
    "device",
    "threads",
    "contender",
    "ran_as",
    "median_ms",
    "min_ms",
    "samples",
    "speedup_vs_eager",
    "distinct_experts",
    "GBps",
    "pct_read_bw",
    "tflops",
    "pct_dense",
    "rel_err_vs_reference",
    "evicted",
    "target",
    "target_met",
    "error",
    "read_bw_GBps",
    "dense_tflops",
    "dense_layout",
    "fp32_dense_tflops",
    "pct_fp32_dense",
)


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose from bf16, fp16, fp32") from None


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_backends(device: torch.device) -> list[str]:
    """The moe_kernels backends to time by default on ``device``: ``cpu`` on a CPU (shown even
    while it cannot run moe_ffn yet: the row then says which backend ran instead); on CUDA the
    available ones of ``cuda`` and ``triton`` (``cuda`` if neither is)."""
    if device.type != "cuda":
        return ["cpu"]
    import moe_kernels

    avail = moe_kernels.available_backends()
    names = [n for n in ("cuda", "triton") if avail[n][0]]
    return names or ["cuda"]


def resolve_backend(name: str | None, device: torch.device, dtype: torch.dtype) -> tuple[str, str]:
    """(backend that will run moe_ffn, note). Falls back to auto when ``name`` cannot run.

    The note is empty when ``name`` runs as asked, else says what ran instead and why.
    """
    from moe_kernels import _backends

    try:
        b = _backends.select_backend("moe_ffn", device, dtype, name)
        return b.name, ""
    except _backends.BackendUnavailableError as exc:
        b = _backends.select_backend("moe_ffn", device, dtype, "auto")
        return b.name, f"{name} unavailable ({exc}); ran {b.name}"


#: speed targets of one (shape name, T, decode) as (description, row key, minimum), e.g.
#: ``(">=75% read BW", "pct_read_bw", 75.0)``; the row keys are those of :func:`target_status`.
Targets = Callable[[str, int, bool], list[tuple[str, str, float]]]


def target_status(checks: list[tuple[str, str, float]], row: dict) -> str:
    """ "yes" if every target is met, "NO" if one is missed, "n/a" if one cannot be evaluated
    (e.g. eager was not timed)."""
    values = [row[key] for _, key, _ in checks]
    if any(v != v for v in values):
        return "n/a"
    return "yes" if all(v >= m for v, (_, _, m) in zip(values, checks, strict=True)) else "NO"


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Fused MoE expert FFN vs the reference, Hugging Face transformers experts "
        "(eager, grouped_mm), a dense matmul of equal FLOPs, and the machine's read-bandwidth "
        "and dense-matmul ceilings; same weights and routing, contenders timed in turns.",
    )
    add_compare_arguments(p)
    return p


def add_compare_arguments(p: argparse.ArgumentParser, *, with_common: bool = True) -> None:
    if with_common:
        p.add_argument(
            "--shape",
            "--shapes",
            dest="shape",
            default=None,
            help="comma-separated presets (default: qwen3-30b-a3b,olmoe-1b-7b,mixtral-8x7b); "
            f"known: {', '.join(bu.SHAPES)}",
        )
        p.add_argument(
            "--tokens",
            default=None,
            help="comma-separated token counts (default per shape: 1,16,512,2048; "
            "Mixtral 1,16,512)",
        )
        p.add_argument("--dtype", default="bf16", help="bf16 (default), fp16 or fp32")
        p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
        p.add_argument(
            "--backends",
            default=None,
            help="comma-separated moe_kernels backends to time (default: the available ones "
            "for the device, e.g. cpu)",
        )
        p.add_argument("--repeats", type=int, default=None, help="timed calls per contender")
        p.add_argument("--csv", default=None, metavar="PATH", help="write every row to PATH")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--plain", action="store_true", help="plain-text tables (no rich)")
    p.add_argument(
        "--contenders",
        default=",".join(BASELINES),
        help=f"comma-separated baselines to include (default: all of {', '.join(BASELINES)})",
    )
    p.add_argument(
        "--decode-max-tokens",
        type=int,
        default=16,
        help="token counts up to this are timed as decode: caches evicted before each call",
    )
    p.add_argument("--no-evict", action="store_true", help="never evict the caches")
    p.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        help="stop timing one (shape, T) after the round that passes this many seconds (default "
        "60; moe-bench's default job: one (op, pass, shape, T), default 2)",
    )
    p.add_argument(
        "--max-call-seconds",
        type=float,
        default=60.0,
        help="skip a contender whose call is predicted (from its FLOP rate at the previous "
        "prefill token count of the shape) to take longer than this",
    )
    p.add_argument("--no-check", action="store_true", help="skip the accuracy comparison")
    p.add_argument(
        "--read-mib",
        type=int,
        default=None,
        help="size of the float32 tensor of the read-bandwidth ceiling (default 1024 MiB; "
        "moe-bench's default job: 256)",
    )
    p.add_argument(
        "--dense-mnk",
        default=None,
        help="M,K,N of the dense-matmul ceiling (default 2048,2048,6144; moe-bench's default "
        "job: 1024,2048,2048)",
    )
    p.add_argument(
        "--no-fp32-ceiling",
        action="store_true",
        help="do not also measure the fp32 dense matmul rate",
    )


def _split(text: str | None) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()] if text else []


#: defaults of the options that moe-bench's default job sets differently
FULL_DEFAULTS = {"read_mib": 1024, "dense_mnk": "2048,2048,6144", "max_seconds": 60.0}


def run(
    args: argparse.Namespace, targets: Targets | None = None, record: dict | None = None
) -> int:
    """Run the comparison described by ``args``; returns the process exit code.

    ``targets``: the speed targets of the ``cpu`` row per (shape, T) (the project's are in the
    source tree's ``bench/bench_moe_ffn.py``); without them the target column stays empty.
    ``record``: a dict that receives ``rows`` (one dict per CSV line, keys :data:`CSV_HEADERS`
    plus ``p20_ms`` / ``p80_ms``), ``ceilings`` and ``device`` (for :func:`to_schema`)."""
    for key, value in FULL_DEFAULTS.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    device = torch.device(args.device or default_device())
    dtype = parse_dtype(args.dtype)
    shapes = [bu.get_shape(s) for s in _split(args.shape)] or [
        bu.SHAPES[n] for n in ("qwen3-30b-a3b", "olmoe-1b-7b", "mixtral-8x7b")
    ]
    token_override = [int(t) for t in _split(args.tokens)]
    baselines = _split(args.contenders)
    for b in baselines:
        if b not in BASELINES:
            raise ValueError(f"unknown contender {b!r}; choose from {', '.join(BASELINES)}")
    backends = _split(args.backends) if args.backends is not None else default_backends(device)
    hf_version = bu.transformers_version()
    if hf_version is None and any(b.startswith("hf-") for b in baselines):
        print(
            "transformers is not installed: the hf-eager / hf-grouped_mm baselines are skipped "
            "(pip install 'transformers>=5')"
        )
        baselines = [b for b in baselines if not b.startswith("hf-")]

    print(
        f"device: {device_description(device)}; torch {torch.__version__}; "
        f"transformers {hf_version or '-'}; dtype {dtype}"
    )
    read_bytes = args.read_mib << 20
    m, k, n = (int(v) for v in _split(args.dense_mnk))
    read_bw, read_sec = bu.read_bandwidth_ceiling(read_bytes, repeats=5, device=device)
    print(
        f"read ceiling: sum over {args.read_mib} MiB of fp32 in {read_sec * 1e3:.1f} ms = "
        f"{read_bw / 1e9:.1f} GB/s"
    )
    dense = bu.dense_matmul_ceiling(m, k, n, 3, dtype, device)
    dense_rate = dense["rate"]
    probe = ", ".join(f"{k} {v / 1e12:.3f}" for k, v in dense["probe"].items())
    print(
        f"dense ceiling: {dtype} matmul {m}x{k}x{n} ({dense['layout']} layout) in "
        f"{dense['seconds'] * 1e3:.0f} ms = {dense_rate / 1e12:.3f} TFLOP/s "
        f"(layout probe, TFLOP/s: {probe})"
    )
    fp32_rate = float("nan")
    if dtype != torch.float32 and not args.no_fp32_ceiling:
        d32 = bu.dense_matmul_ceiling(m, k, n, 3, torch.float32, device)
        fp32_rate = d32["rate"]
        print(f"   for comparison, fp32 matmul {m}x{k}x{n}: {fp32_rate / 1e12:.3f} TFLOP/s")
    read_buf = torch.ones(read_bytes // 4, dtype=torch.float32, device=device)
    ceilings = {
        "read_buf": read_buf,
        "read_bw": read_bw,
        "dense": dense_rate,
        "dense_layout": dense["layout"],
        "dense_probe": dense["probe"],
        "fp32_dense": fp32_rate,
    }
    evictor = None if args.no_evict else bu.CacheEvictor(device)
    if evictor is not None:
        print(
            f"decode (T <= {args.decode_max_tokens}): caches evicted before each call "
            f"({evictor.nbytes >> 20} MiB written)"
        )

    csv_rows: list[list] = []
    failures = 0
    for shape in shapes:
        tokens_list = token_override or list(DEFAULT_TOKENS.get(shape.name, (1, 16, 512)))
        esize = torch.empty(0, dtype=dtype).element_size()
        print(
            f"\n== {shape.model} ({shape.describe()}): expert weights "
            f"{shape.weight_bytes(esize) / 1e9:.2f} GB {dtype}"
        )
        t0 = time.perf_counter()
        base = bu.make_inputs(shape, 1, dtype=dtype, device=device, seed=args.seed)
        weights = (base["w_gate_up"], base["w_down"])
        print(f"   weights generated in {time.perf_counter() - t0:.1f} s")
        hf = {}
        for b in baselines:
            if b.startswith("hf-"):
                hf[b] = bu.build_hf_experts(shape, *weights, implementation=b[3:])
        dense_b = None
        if "dense-matmul" in baselines:
            # same FLOPs as the expert FFN: [T, H] x [H, k*3I]; B stored both ways, the layout
            # is picked per T (torch's CPU GEMM speed depends on it)
            n = shape.top_k * 3 * shape.intermediate
            b_kn = torch.empty(shape.hidden, n, dtype=dtype, device=device)
            b_kn.normal_(0, shape.hidden**-0.5)
            dense_b = {"kn": b_kn, "nk": b_kn.t().contiguous().t()}
        rates: dict[str, float] = {}  # FLOP/s of each contender at the previous T (predictions)
        for T in tokens_list:
            rows, n_fail = _run_one(
                args,
                shape,
                T,
                dtype,
                device,
                weights,
                hf,
                dense_b,
                backends,
                baselines,
                evictor,
                ceilings,
                rates,
                targets,
            )
            failures += n_fail
            csv_rows.extend(rows)
        del base, weights, hf, dense_b
    if args.csv:
        bu.write_csv(args.csv, CSV_HEADERS, [r[: len(CSV_HEADERS)] for r in csv_rows])
        print(f"\nwrote {len(csv_rows)} rows to {args.csv}")
    if record is not None:
        keys = [*CSV_HEADERS, "p20_ms", "p80_ms"]
        record["rows"] = [dict(zip(keys, r, strict=True)) for r in csv_rows]
        record["ceilings"] = {
            "read_gbps": read_bw / 1e9,
            "read_mib": args.read_mib,
            "dense_tflops": dense_rate / 1e12,
            "dense_mnk": f"{m}x{k}x{n}",
            "dense_dtype": str(dtype).replace("torch.", ""),
            "dense_layout": dense["layout"],
        }
        record["device"] = device
        record["dtype"] = dtype
        record["backends"] = backends
    return 1 if failures else 0


def _run_one(
    args,
    shape,
    T,
    dtype,
    device,
    weights,
    hf,
    dense_b,
    backends,
    baselines,
    evictor,
    ceilings,
    rates,
    targets,
):
    import moe_kernels

    inp = bu.make_inputs(shape, T, dtype=dtype, device=device, seed=args.seed + T, weights=weights)
    x, wgu, wd, tw, ti = (inp[n] for n in ("x", "w_gate_up", "w_down", "topk_weights", "topk_ids"))
    tw_act = tw.to(dtype)  # HF passes the routing weights in the activation dtype
    ti_long = ti.long()
    decode = T <= args.decode_max_tokens
    evict = decode and evictor is not None

    contenders: dict[str, Callable[[], torch.Tensor]] = {}
    ran_as: dict[str, str] = {}
    notes: dict[str, str] = {}
    for name in backends:
        used, note = resolve_backend(name, device, dtype)
        contenders[name] = lambda u=used: moe_kernels.moe_ffn(x, wgu, wd, tw, ti, backend=u)
        ran_as[name] = used
        if note:
            notes[name] = note
    for b in baselines:
        if b == "reference":
            contenders[b] = lambda: moe_kernels.moe_ffn(x, wgu, wd, tw, ti, backend="reference")
            ran_as[b] = "reference"
        elif b.startswith("hf-"):
            contenders[b] = lambda m=hf[b]: m(x, ti_long, tw_act)
            ran_as[b] = f"transformers {b[3:]}"
        elif b == "dense-matmul":
            layout = _dense_layout(x, dense_b, device, ceilings)
            xd, bd = _dense_operands(x, dense_b, layout)
            contenders[b] = lambda xd=xd, bd=bd: torch.matmul(xd, bd)
            ran_as[b] = f"matmul [{T},{shape.hidden}]x[{shape.hidden},{bd.shape[1]}] ({layout})"

    # the read ceiling again, in the same rounds: on a shared machine the bandwidth drifts
    contenders["read-ceiling"] = ceilings["read_buf"].sum
    ran_as["read-ceiling"] = f"sum over {ceilings['read_buf'].numel() * 4 >> 20} MiB fp32"

    # skip contenders whose call would take longer than --max-call-seconds, predicted from their
    # FLOP rate at the previous prefill token count of this shape
    flops = shape.flops(T)
    skipped: dict[str, str] = {}
    for name in list(contenders):
        if name in rates and name != "read-ceiling" and flops / rates[name] > args.max_call_seconds:
            skipped[name] = (
                f"skipped: ~{flops / rates[name]:.0f} s per call predicted "
                f"(> --max-call-seconds {args.max_call_seconds:g})"
            )
            del contenders[name]

    # accuracy, outside the timed loop: every FFN contender against the reference
    errors_rel: dict[str, float] = {}
    exc_msgs: dict[str, str] = {}
    if not args.no_check:
        with torch.inference_mode():
            ref = moe_kernels.moe_ffn(x, wgu, wd, tw, ti, backend="reference")
            for name, fn in contenders.items():
                if name in ("dense-matmul", "read-ceiling"):
                    continue
                try:
                    errors_rel[name] = max_rel_err(fn(), ref)
                except Exception as exc:  # noqa: BLE001 -- reported in the table and exit code
                    exc_msgs[name] = f"{type(exc).__name__}: {exc}"
            del ref
    live = {n: f for n, f in contenders.items() if n not in exc_msgs}

    repeats = args.repeats or (20 if decode else 5)
    # the accuracy call above already warmed the FFN contenders up
    warm = {n: f for n, f in live.items() if args.no_check or n in ("dense-matmul", "read-ceiling")}
    with torch.inference_mode():
        for fn in warm.values():
            fn()
    times, timing_errors = bu.time_alternating(
        live,
        repeats=repeats,
        warmup=0,
        before_each=evictor if evict else None,
        device=device,
        max_seconds=args.max_seconds,
    )
    exc_msgs.update(timing_errors)
    for name, ts in times.items():
        if ts and not decode:  # decode rates (bandwidth-bound) would not predict prefill times
            rates[name] = flops / bu.median(ts)

    n_distinct = bu.distinct_experts(ti, shape.experts)
    esize = x.element_size()
    active_bytes = n_distinct * shape.expert_bytes(esize)
    dense_rate = ceilings["dense"]
    read_bw = ceilings["read_bw"]
    if times.get("read-ceiling"):  # measured in these rounds: the fairer yardstick
        read_bw = ceilings["read_buf"].numel() * 4 / bu.median(times["read-ceiling"])
    eager_med = bu.median(times.get("hf-eager", []))
    from ..cli import TOLERANCE  # the CLI's tolerance per dtype: one table for both jobs

    tol = TOLERANCE[dtype]

    table_rows, csv_rows = [], []
    failures = 0
    for name in [*contenders, *skipped]:
        med = bu.median(times.get(name, []))
        err = exc_msgs.get(name, "") or skipped.get(name, "")
        rel = errors_rel.get(name, float("nan"))
        if name in backends and (name in exc_msgs or (rel == rel and rel > tol)):
            failures += 1
        nan = float("nan")
        row_flops, row_bytes = flops, active_bytes
        if name == "read-ceiling":
            row_flops, row_bytes = nan, ceilings["read_buf"].numel() * 4
        row = {
            "speedup_vs_eager": eager_med / med if name != "read-ceiling" else nan,
            "pct_read_bw": 100.0 * row_bytes / med / read_bw,
            "pct_dense": 100.0 * row_flops / med / dense_rate,
            "pct_fp32": 100.0 * row_flops / med / ceilings["fp32_dense"],
            "tflops": row_flops / med / 1e12,
            "GBps": row_bytes / med / 1e9,
        }
        tgt_desc, tgt_met = "", ""
        if targets and name == "cpu" and ran_as.get(name) == "cpu" and device.type == "cpu":
            checks = targets(shape.name, T, decode)
            if checks:
                tgt_desc = "; ".join(d for d, _, _ in checks)
                tgt_met = target_status(checks, row)
        label = name if name not in notes else f"{name} (ran {ran_as[name]})"
        table_rows.append(
            [
                label,
                med * 1e3,
                row["speedup_vs_eager"],
                row["pct_read_bw"],
                row["pct_dense"],
                row["pct_fp32"],
                row["tflops"],
                rel,
                f"{tgt_desc}: {tgt_met}" if tgt_desc else "",
                (err[:60] + "...") if len(err) > 60 else err,
            ]
        )
        csv_rows.append(
            [
                shape.name,
                shape.hidden,
                shape.intermediate,
                shape.experts,
                shape.top_k,
                T,
                str(dtype).replace("torch.", ""),
                device.type,
                torch.get_num_threads() if device.type == "cpu" else "",
                name,
                ran_as.get(name, ""),
                med * 1e3,
                min(times.get(name) or [float("nan")]) * 1e3,
                len(times.get(name, [])),
                row["speedup_vs_eager"],
                n_distinct,
                row["GBps"],
                row["pct_read_bw"],
                row["tflops"],
                row["pct_dense"],
                rel,
                evict,
                tgt_desc,
                tgt_met,
                err or notes.get(name, ""),
                read_bw / 1e9,
                dense_rate / 1e12,
                ceilings["dense_layout"],
                ceilings["fp32_dense"] / 1e12,
                row["pct_fp32"],
                # past CSV_HEADERS: for to_schema only
                _quantile(times.get(name, []), 0.2) * 1e3,
                _quantile(times.get(name, []), 0.8) * 1e3,
            ]
        )
    title = (
        f"{shape.model} T={T} ({'decode, caches evicted' if evict else 'prefill'}; "
        f"{n_distinct} distinct experts, {active_bytes / 1e6:.0f} MB active weights, "
        f"{flops / 1e9:.2f} GFLOP; {len(times.get(next(iter(live), ''), []))} rounds)"
    )
    bu.print_table(
        [
            "contender",
            "median ms",
            "x eager",
            "% read BW",
            "% dense",
            "% fp32 mm",
            "TFLOP/s",
            "rel err vs ref",
            "target",
            "error",
        ],
        table_rows,
        title=title,
        plain=args.plain,
    )
    for note in notes.values():
        print(f"   note: {note}")
    sys.stdout.flush()
    return csv_rows, failures


def _quantile(values: list[float], q: float) -> float:
    from .suite import _quantile as quantile

    return quantile(values, q) if values else float("nan")


def to_schema(args: argparse.Namespace, record: dict) -> tuple[list[dict], dict]:
    """The comparison's rows in moe-bench's one schema (:mod:`.schema`): op ``moe_ffn``, pass
    ``fwd``; ``kind`` is ``backend`` for moe_kernels' backends and the reference, ``ceiling`` for
    the read-ceiling row, ``peer`` otherwise; the baseline is ``hf-eager``."""
    from . import roofline, suite
    from .ops import tolerance

    device, dtype = record["device"], record["dtype"]
    ceil = record["ceilings"]
    rate, bw = ceil["dense_tflops"] * 1e12, ceil["read_gbps"] * 1e9
    esize = torch.empty(0, dtype=dtype).element_size()
    tol = tolerance("moe_ffn", "fwd", dtype, device)

    def num(v):
        return None if v is None or v == "" or v != v else v

    rows = []
    for r in record["rows"]:
        name = r["contender"]
        shape = bu.get_shape(r["shape"])
        kind = (
            "ceiling"
            if name == "read-ceiling"
            else "backend"
            if name in record["backends"] or name == "reference"
            else "peer"
        )
        cnt = roofline.counts("moe_ffn", "fwd", shape, r["T"], esize, r["distinct_experts"])
        med = num(r["median_ms"])
        t_min, bound = roofline.attainable_seconds(cnt, rate, bw)
        rel = num(r["rel_err_vs_reference"])
        status = "ok"
        if r["error"].startswith("skipped"):
            status = "skipped"
        elif r["error"] and med is None:
            status = "ERROR"
        elif rel is not None and not rel <= tol:
            status = "FAIL"
        note = "; ".join(
            t
            for t in (
                r["ran_as"] if r["ran_as"] not in (name, "") else "",
                r["error"],
                f"target {r['target']}: {r['target_met']}" if r["target"] else "",
                "caches evicted before each call" if r["evicted"] else "",
            )
            if t
        )
        if kind == "ceiling":
            cnt = roofline.Counts(0, int(ceil["read_mib"]) << 20)
            t_min, bound = 0.0, "memory"
        rows.append(
            {
                "op": "moe_ffn",
                "pass": "fwd",
                "backend": name,
                "kind": kind,
                "shape": shape.name,
                "model": shape.model,
                "H": shape.hidden,
                "I": shape.intermediate,
                "E": shape.experts,
                "k": shape.top_k,
                "T": r["T"],
                "dtype": r["dtype"],
                "routing": "uniform",
                "active_experts": r["distinct_experts"],
                "scaled": False,
                "status": status,
                "note": note,
                "median_ms": med,
                "p20_ms": num(r["p20_ms"]),
                "p80_ms": num(r["p80_ms"]),
                "samples": r["samples"],
                "cuda_graph": False,
                "flops": cnt.flops,
                "bytes": cnt.bytes,
                "tflops": None if med is None or not cnt.flops else cnt.flops / med / 1e9,
                "gbps": None if med is None else cnt.bytes / med / 1e6,
                "bound": bound,
                "pct_of_ceiling": None if med is None or not t_min else 100 * t_min / med * 1e3,
                "baseline": "hf-eager",
                "speedup": num(r["speedup_vs_eager"]),
                "max_rel_err": rel,
                "tolerance": tol if kind != "ceiling" else None,
                "pred_h100_ms": roofline.predict_ms(cnt, dtype, "h100_sxm"),
                "pred_h200_ms": roofline.predict_ms(cnt, dtype, "h200"),
            }
        )
    opts = argparse.Namespace(
        device=device,
        dtype=dtype,
        command=" ".join(["moe-bench", *getattr(args, "_argv", [])]),
        baseline="hf-eager",
        routing="uniform",
        skew=0.0,
    )
    import moe_kernels

    avail = moe_kernels.available_backends()
    meta = suite.make_meta(opts, avail, {}, ceil)
    return rows, meta


def _dense_operands(x, dense_b, layout):
    xd = x.t().contiguous().t() if layout == "tn" else x
    bd = dense_b["nk"] if layout == "nt" else dense_b["kn"]
    return xd, bd


def _dense_layout(x, dense_b, device, ceilings) -> str:
    """Fastest layout for ``x @ B`` among those within 4x of the best at the ceiling's size
    (one or two probe calls each; layouts far behind at the ceiling's size are not tried)."""
    cands = bu.close_layouts(ceilings["dense_probe"])
    if len(cands) == 1:
        return cands[0]
    seconds = {}
    for c in cands:
        xd, bd = _dense_operands(x, dense_b, c)
        times, _ = bu.time_alternating(
            {c: lambda xd=xd, bd=bd: torch.matmul(xd, bd)}, repeats=1, warmup=1, device=device
        )
        seconds[c] = bu.median(times[c])
    return min(seconds, key=seconds.get)


def main(
    argv: list[str] | None = None, prog: str | None = None, targets: Targets | None = None
) -> int:
    args = build_parser(prog).parse_args(argv)
    return run(args, targets)


if __name__ == "__main__":
    sys.exit(main())
