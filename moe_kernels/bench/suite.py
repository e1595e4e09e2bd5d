"""``moe-bench``'s default job: every chosen op, pass, backend and peer on the same inputs.

For each shape, token count, op and pass, every contender (our backends, then the peers) first
runs once against the reference (its error, and the warm-up), then the contenders are timed in
turns (A B C A B C ...) so that drift on a shared machine hits them alike; a backward pass is
timed alone, as ``torch.autograd.grad`` on a graph built once and retained. The rows follow
:mod:`.schema`; counts, ceilings and predictions follow :mod:`.roofline`.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch

from . import harness as bu
from . import machine, peers, roofline
from . import ops as bops
from .presets import MoEShape
from .schema import SCHEMA_VERSION

__all__ = ["Options", "measure_ceilings", "run"]


@dataclasses.dataclass
class Options:
    device: torch.device
    dtype: torch.dtype
    shapes: list[tuple[MoEShape, MoEShape]]  # (preset, the shape that runs)
    tokens: list[int]
    ops: list[str]
    passes: list[str]
    backends: list[str]
    explicit_backends: bool
    peers: list[str]
    baseline: str
    routing: str
    skew: float
    repeats: int
    warmup: int
    max_seconds: float
    evict: bool
    decode_max_tokens: int
    cuda_graphs: bool
    seed: int
    plain: bool
    ceilings: bool
    read_mib: int
    dense_mnk: tuple[int, int, int]
    command: str = ""


def measure_ceilings(opts: Options, say: Callable[[str], None]) -> dict:
    """The read bandwidth and the dense matmul rate of this device, measured now."""
    out = {"read_gbps": None, "read_mib": None, "dense_tflops": None, "dense_mnk": None}
    out["dense_dtype"] = str(opts.dtype).replace("torch.", "")
    if not opts.ceilings:
        say("ceilings: not measured (--no-ceilings): pct_of_ceiling is empty")
        return out
    bw, sec = bu.read_bandwidth_ceiling(opts.read_mib << 20, repeats=5, device=opts.device)
    m, k, n = opts.dense_mnk
    dense = bu.dense_matmul_ceiling(m, k, n, 3, opts.dtype, opts.device)
    out.update(
        read_gbps=bw / 1e9,
        read_mib=opts.read_mib,
        dense_tflops=dense["rate"] / 1e12,
        dense_mnk=f"{m}x{k}x{n}",
        dense_layout=dense["layout"],
    )
    say(
        f"ceilings (measured now): read {bw / 1e9:.1f} GB/s (sum over {opts.read_mib} MiB fp32, "
        f"{sec * 1e3:.1f} ms); dense {dense['rate'] / 1e12:.3f} TFLOP/s ({out['dense_dtype']} "
        f"matmul {m}x{k}x{n}, {dense['layout']} layout)"
    )
    return out


def _versions() -> dict:
    import moe_kernels

    def version(mod: str) -> str | None:
        try:
            return __import__(mod).__version__
        except Exception:  # noqa: BLE001 -- not installed or broken: no version
            return None

    return {
        "version": moe_kernels.__version__,
        "torch": torch.__version__,
        "triton": version("triton"),
        "transformers": bu.transformers_version(),
    }


def _cpu_isa() -> str | None:
    try:
        from moe_kernels import _C

        return _C.cpu_isa()
    except Exception:  # noqa: BLE001 -- the CPU extension is not loaded
        return None


def make_meta(opts: Options, avail: dict, peer_status: dict, ceilings: dict) -> dict:
    meta = {
        "schema": SCHEMA_VERSION,
        "package": "moe-kernels-fused",
        **_versions(),
        "git_commit": machine.git_commit(),
        "python": platform.python_version(),
        "device": machine.device_description(opts.device),
        "device_type": opts.device.type,
        "cpu_model": machine.cpu_model(),
        "cpu_uarch": machine.cpu_uarch(),
        "isa_flags": machine.isa_flags(),
        "cpu_isa": _cpu_isa(),
        "num_threads": torch.get_num_threads(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": opts.command,
        "backends": {n: [ok, why] for n, (ok, why) in avail.items()},
        "peers": dict(peer_status),
        "ceilings": ceilings,
        "gpu_specs": {
            key: {
                "name": s.name,
                "dense_flops": {str(d).replace("torch.", ""): v for d, v in s.dense_flops.items()},
                "hbm_bytes_per_s": s.hbm_bytes_per_s,
                "source": s.source,
            }
            for key, s in roofline.GPU_SPECS.items()
        },
        "wall_s": None,
    }
    return meta


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    if len(values) == 1:
        return values[0]
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _graphed(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` captured as a CUDA graph: returns its replay (raises if capture fails, e.g. on a
    host synchronisation)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.inference_mode():  # as the forward is timed: no autograd records in the graph
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    return graph.replay


class _Contender:
    def __init__(self, name: str, kind: str, note: str = ""):
        self.name, self.kind, self.note = name, kind, note
        self.call: Callable[[], object] | None = None
        self.result: Callable[[], object] | None = None  # the checked output
        self.status = "ok"
        self.err = math.nan
        self.cuda_graph = False


def _grad_seeds(outs: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=gen).to(o.device, o.dtype) for o in outs]


def _prepare(c: _Contender, fwd, graph, pass_: str, seeds: list | None, built=None):
    """Set ``c.call`` (what is timed) and ``c.result`` (what is checked); ``built``: the graph
    already built (outputs, leaves, post)."""
    if pass_ == "fwd":
        c.call = fwd
        c.result = fwd
        return
    if built is None:
        with torch.enable_grad():
            built = graph()
    outs, leaves, post = built
    gouts = seeds
    if [tuple(o.shape) for o in outs] != [tuple(g.shape) for g in seeds]:
        gouts = _grad_seeds(outs, 0)  # a peer that computes something else (dense-matmul)

    def call():
        return torch.autograd.grad(outs, leaves, gouts, retain_graph=True, allow_unused=True)

    c.call = call
    c.result = lambda: post(list(call()))


def run_group(
    opts: Options,
    case: bops.Case,
    op: str,
    pass_: str,
    ceilings: dict,
    peer_status: dict,
    evictor,
    scaled: bool,
) -> list[dict]:
    """Every contender of one (shape, T, op, pass): checked, timed; their rows."""
    from moe_kernels import BackendUnavailableError

    shape = case.shape
    tol = bops.tolerance(op, pass_, opts.dtype, opts.device)
    contenders: list[_Contender] = []
    seeds = None
    # the reference first: its output (or gradients) is what every other one is checked against
    ref_fwd, ref_graph, _ = bops.contender(op, case, "reference")
    built = None
    if pass_ == "bwd":
        with torch.enable_grad():
            built = ref_graph()
        seeds = _grad_seeds(built[0], opts.seed + 7)
    ref = _Contender("reference", "backend")
    _prepare(ref, ref_fwd, ref_graph, pass_, seeds, built)
    del built
    with torch.inference_mode(pass_ == "fwd"):
        expected = ref.result()

    for name in opts.backends:
        c = _Contender(name, "backend")
        contenders.append(c)
        if name == "reference":
            c.call, c.note = ref.call, ""  # checked by definition: its error is 0
            if op == "layer":
                c.note = case.layer_note
            continue
        why = bops.why_not(name, op, opts.device, opts.dtype)
        if why is not None:
            c.status, c.note = "n/a", f"{name}: {why}"
            continue
        try:
            fwd, graph, c.note = bops.contender(op, case, name)
            _prepare(c, fwd, graph, pass_, seeds)
        except BackendUnavailableError as exc:
            c.status, c.note = "n/a", str(exc)
    for name in opts.peers:
        ok, why = peer_status[name]
        if not ok or op not in peers.PEERS[name].ops:
            continue  # unavailable peers are listed once, in the header and meta.peers
        c = _Contender(name, "peer")
        contenders.append(c)
        try:
            fwd, graph, c.note = peers.build(name, op, case, pass_)
            if pass_ == "bwd" and graph is None:
                raise peers.PeerSkip(f"skipped: {name} has no backward")
            _prepare(c, fwd, graph, pass_, seeds)
        except peers.PeerSkip as exc:
            c.status, c.note = "skipped", str(exc)
        except Exception as exc:  # noqa: BLE001 -- a peer that fails is reported, never fatal
            c.status, c.note = "ERROR", f"{type(exc).__name__}: {exc}"

    # check (and warm up) every contender outside the timed rounds
    for c in contenders:
        if c.status != "ok" or c.name == "reference":
            if c.name == "reference":
                c.err = 0.0
            continue
        if c.kind == "peer" and not peers.PEERS[c.name].checked:
            try:
                with torch.inference_mode(pass_ == "fwd"):
                    c.result()  # the warm-up call; nothing to check
            except Exception as exc:  # noqa: BLE001 -- reported in the row
                c.status, c.note = "ERROR", f"{type(exc).__name__}: {exc}"
            continue
        try:
            with torch.inference_mode(pass_ == "fwd"):
                c.err = bops.compare(op, pass_, c.result(), expected)
        except BackendUnavailableError as exc:
            c.status, c.note = "n/a", str(exc)
            continue
        except Exception as exc:  # noqa: BLE001 -- reported in the row and the exit code
            c.status, c.note = "ERROR", f"{type(exc).__name__}: {exc}"
            continue
        if not c.err <= tol:
            c.status = "FAIL"
    del expected

    live = {c.name: c for c in contenders if c.status in ("ok", "FAIL") and c.call is not None}
    decode = case.T <= opts.decode_max_tokens
    if opts.device.type == "cuda" and opts.cuda_graphs and decode and pass_ == "fwd":
        for c in live.values():
            try:
                c.call = _graphed(c.call)
                c.cuda_graph = True
            except Exception as exc:  # noqa: BLE001 -- e.g. a host sync: timed eagerly
                msg = f"CUDA graph capture failed ({type(exc).__name__}), timed eagerly"
                c.note = f"{c.note}; {msg}" if c.note else msg
                torch.cuda.synchronize()
    times, terrs = bu.time_alternating(
        {n: c.call for n, c in live.items()},
        repeats=opts.repeats,
        warmup=opts.warmup,
        before_each=evictor if opts.evict else None,
        device=opts.device,
        max_seconds=opts.max_seconds,
        inference_mode=pass_ == "fwd",
    )
    for n, e in terrs.items():
        live[n].status, live[n].note = "ERROR", e

    esize = case.x.element_size()
    cnt = roofline.counts(
        op,
        pass_,
        shape,
        case.T,
        esize,
        case.active_experts,
        shared_intermediate=case.shared_ran if op == "layer" else None,
    )
    rate = (ceilings.get("dense_tflops") or 0) * 1e12
    bw = (ceilings.get("read_gbps") or 0) * 1e9
    t_min, bound = roofline.attainable_seconds(cnt, rate, bw)
    base_t = statistics.median(times[opts.baseline]) if times.get(opts.baseline) else None
    rows = []
    for c in contenders:
        ts = times.get(c.name) or []
        med = statistics.median(ts) if ts and c.status in ("ok", "FAIL") else None
        row = {
            "op": op,
            "pass": pass_,
            "backend": c.name,
            "kind": c.kind,
            "shape": shape.name,
            "model": shape.model,
            "H": shape.hidden,
            "I": shape.intermediate,
            "E": shape.experts,
            "k": shape.top_k,
            "T": case.T,
            "dtype": str(opts.dtype).replace("torch.", ""),
            "routing": case.routing,
            "active_experts": case.active_experts,
            "scaled": scaled,
            "status": c.status,
            "note": c.note,
            "median_ms": None if med is None else med * 1e3,
            "p20_ms": None if med is None else _quantile(ts, 0.2) * 1e3,
            "p80_ms": None if med is None else _quantile(ts, 0.8) * 1e3,
            "samples": len(ts) if med is not None else 0,
            "cuda_graph": c.cuda_graph,
            "flops": cnt.flops,
            "bytes": cnt.bytes,
            "tflops": None if med is None or not cnt.flops else cnt.flops / med / 1e12,
            "gbps": None if med is None else cnt.bytes / med / 1e9,
            "bound": bound if (rate or bw) else None,
            "pct_of_ceiling": None if med is None or not t_min else 100.0 * t_min / med,
            "baseline": opts.baseline,
            "speedup": None if med is None or base_t is None else base_t / med,
            "max_rel_err": None if c.err != c.err else c.err,
            "tolerance": tol,
            "pred_h100_ms": roofline.predict_ms(cnt, opts.dtype, "h100_sxm"),
            "pred_h200_ms": roofline.predict_ms(cnt, opts.dtype, "h200"),
        }
        rows.append(row)
    return rows


TABLE_HEADERS = [
    "op",
    "pass",
    "contender",
    "status",
    "median ms",
    "p20-p80 ms",
    "TFLOP/s",
    "GB/s",
    "% ceil",
    "x {baseline}",
    "max rel err",
    "H100 pred ms",
    "H200 pred ms",
    "note",
]


#: the text columns of TABLE_HEADERS (aligned left)
TEXT_COLUMNS = (0, 1, 2, 3, 13)


def _cell(v, fmt="{:.4g}"):
    return "-" if v is None else (fmt.format(v) if isinstance(v, float) else str(v))


def table_rows(rows: list[dict]) -> list[list]:
    out = []
    for r in rows:
        spread = (
            "-"
            if r["median_ms"] is None
            else f"{_cell(r['p20_ms'], '{:.3g}')}-{_cell(r['p80_ms'], '{:.3g}')}"
        )
        err = r["max_rel_err"]
        err_s = "-" if err is None else f"{err:.2e}"
        if err is not None and not err <= r["tolerance"]:
            err_s += f" > {r['tolerance']:g}"
        note = r["note"] or ""
        out.append(
            [
                r["op"],
                r["pass"],
                r["backend"] + (" (graph)" if r["cuda_graph"] else ""),
                r["status"],
                _cell(r["median_ms"]),
                spread,
                _cell(r["tflops"], "{:.3g}"),
                _cell(r["gbps"], "{:.3g}"),
                _cell(r["pct_of_ceiling"], "{:.3g}"),
                _cell(r["speedup"], "{:.3g}"),
                err_s,
                _cell(r["pred_h100_ms"], "{:.3g}"),
                _cell(r["pred_h200_ms"], "{:.3g}"),
                note if len(note) <= 90 else note[:87] + "...",
            ]
        )
    return out


def run(opts: Options, say: Callable[[str], None] = print) -> tuple[list[dict], dict, list[str]]:
    """Run the job; returns (rows, meta, failures): ``failures`` names every one of our backends
    that raised or exceeded its tolerance (the exit code is non-zero when it is not empty)."""
    import moe_kernels

    t_start = time.perf_counter()
    avail = moe_kernels.available_backends()
    peer_status = {n: peers.availability(n, opts.device) for n in opts.peers}
    failures: list[str] = []

    say(
        f"moe-bench: {machine.device_description(opts.device)}; torch {torch.__version__}; "
        f"{str(opts.dtype).replace('torch.', '')}; routing "
        f"{bops.routing_label(opts.routing, opts.skew)}"
    )
    for n, (ok, why) in avail.items():
        say(f"  backend {n:9s} {'available' if ok else 'unavailable'}: {why}")
        if n in opts.backends and not ok and opts.explicit_backends:
            failures.append(f"backend {n} was asked for (--backends) but is unavailable: {why}")
    for n, (_, why) in peer_status.items():
        say(f"  peer    {n:17s} {why}")
    run_backends = [n for n in opts.backends if avail[n][0]]
    opts = dataclasses.replace(opts, backends=run_backends)
    ceilings = measure_ceilings(opts, say)
    say(
        "  (pred ms: PREDICTED H100 SXM / H200 times, roofline lower bounds from published peaks, "
        "not measurements)"
    )
    meta = make_meta(opts, avail, {n: why for n, (_, why) in peer_status.items()}, ceilings)
    evictor = bu.CacheEvictor(opts.device) if opts.evict else None

    steps = sum(
        1
        for _ in opts.shapes
        for _ in opts.tokens
        for op in opts.ops
        for p in opts.passes
        if p == "fwd" or bops.has_backward(op)
    )
    progress = _progress(opts, steps)
    rows: list[dict] = []
    esize = torch.empty(0, dtype=opts.dtype).element_size()
    try:
        for preset, shape in opts.shapes:
            scaled = shape != preset
            if scaled:
                say(
                    f"\n{preset.model}: {preset.describe()} scaled down to {shape.describe()} "
                    f"({shape.weight_bytes(esize) / 2**20:.0f} MiB of expert weights instead of "
                    f"{preset.weight_bytes(esize) / 2**30:.2f} GiB; --full-size for the real layer)"
                )
            else:
                say(
                    f"\n{preset.model}: {shape.describe()} "
                    f"({shape.weight_bytes(esize) / 2**20:.0f} MiB of expert weights)"
                )
            say(
                f"  routing {shape.routing_description()}; experts {shape.expert_description()}"
                + (f"; source {shape.source}" if shape.source else "")
            )
            weights = bops.make_weights(shape, opts.dtype, opts.device, opts.seed)
            for T in opts.tokens:
                case = bops.make_case(
                    shape,
                    T,
                    dtype=opts.dtype,
                    device=opts.device,
                    routing=opts.routing,
                    skew=opts.skew,
                    seed=opts.seed,
                    weights=weights,
                )
                group_rows = []
                for op in opts.ops:
                    for pass_ in opts.passes:
                        if pass_ == "bwd" and not bops.has_backward(op):
                            continue
                        progress.update(f"{shape.name} T={T} {op} {pass_}")
                        group_rows += run_group(
                            opts, case, op, pass_, ceilings, peer_status, evictor, scaled
                        )
                        progress.advance()
                rows += group_rows
                headers = [h.format(baseline=opts.baseline) for h in TABLE_HEADERS]
                progress.print_table(
                    headers,
                    table_rows(group_rows),
                    f"{shape.model} T={T} ({shape.describe()}, {meta['ceilings']['dense_dtype']}, "
                    f"{opts.device.type}, {case.active_experts} experts active)",
                )
                del case
            del weights
    finally:
        progress.close()
    for r in rows:
        if r["kind"] == "backend" and r["status"] in ("FAIL", "ERROR"):
            failures.append(
                f"{r['backend']} {r['op']} {r['pass']} {r['shape']} T={r['T']}: {r['status']}"
                + (
                    f" (max rel err {r['max_rel_err']:.3g} > {r['tolerance']:g})"
                    if r["status"] == "FAIL"
                    else f" ({r['note']})"
                )
            )
    meta["wall_s"] = round(time.perf_counter() - t_start, 2)
    return rows, meta, failures


class _Plain:
    def __init__(self, opts: Options):
        self.plain = opts.plain

    def update(self, what: str) -> None:
        pass

    def advance(self) -> None:
        pass

    def print_table(self, headers, rows, title) -> None:
        bu.print_table(headers, rows, title=title, plain=self.plain, left=TEXT_COLUMNS)
        sys.stdout.flush()

    def close(self) -> None:
        pass


class _Rich(_Plain):
    def __init__(self, opts: Options, steps: int):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        super().__init__(opts)
        self.console = Console()
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            console=self.console,
            transient=True,
        )
        self.task = self.progress.add_task("", total=steps)
        self.progress.start()

    def update(self, what: str) -> None:
        self.progress.update(self.task, description=what)

    def advance(self) -> None:
        self.progress.advance(self.task)

    def print_table(self, headers, rows, title) -> None:
        bu.print_table(headers, rows, title=title, console=self.console, left=TEXT_COLUMNS)

    def close(self) -> None:
        self.progress.stop()


def _progress(opts: Options, steps: int):
    """A progress bar (rich) on a terminal; plain output (no bar) otherwise or with --plain."""
    if opts.plain or not sys.stdout.isatty():
        return _Plain(opts)
    try:
        return _Rich(opts, steps)
    except ImportError:
        return _Plain(opts)
