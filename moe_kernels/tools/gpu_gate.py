"""Static GPU gate for the Triton kernels: compile every shipped variant for sm_80 / sm_90 without a GPU.

Usage::

    python -m moe_kernels.tools.gpu_gate [--full] [--json PATH] [--arch 80,86,90] [--jobs N]

How the variants are found: the op launchers of :mod:`moe_kernels.triton_kernels.ops` are called on
``meta`` tensors of representative shapes (model-shaped hidden/intermediate sizes, decode to
prefill rows per expert, every dtype, the nn.Linear and the transposed weight layouts) with each
kernel replaced by a recorder. Each recorded launch is bound and specialised exactly as Triton's
runtime would (integer arguments equal to 1 become constants, 16-divisible integers and pointers
get ``tt.divisibility`` hints), so the gate compiles the very (kernel, tile configuration, dtype,
specialisation) variants the package launches. The configurations come from the same lookup the
launchers use, with the GPU family forced (sm80, sm86 = sm_86/sm_89, sm90).

Each variant is compiled with ``triton.compile`` for its family's target (sm_80, sm_86, sm_90a).
The ``ptxas -v`` report (Triton runs ptxas; a fresh cache makes it run for every variant) gives
spill stores/loads, and the cubin is inspected with the ``cuobjdump`` that Triton ships: registers,
stack, local memory, and the tensor-core instructions in the SASS. The gate fails when a variant

* spills (ptxas spill stores/loads or local memory > 0; a stack frame alone is reported, not a
  failure),
* needs more shared memory than its family has (sm_80 163 KB, sm_86/89 99 KB, sm_90 227 KB),
* is a GEMM without tensor-core instructions: ``HMMA`` on sm_80/86 and for sm_90 tiles under 64
  rows, ``HGMMA`` (wgmma) on sm_90 for tiles of 64+ rows with 4+ warps. fp32 variants compiled with
  ``input_precision="ieee"`` (the full-fp32 option) use FMA by design and are exempt.

By default (CI: a few minutes on 2 free cores; ``--quick`` says the same) the gate keeps every
tile configuration but only bf16 and fp32 (tf32), one model shape, one weight layout and one
activation, the non-GEMM kernels in bf16 on sm_80/sm_90, and compiles one representative of the
stride/divisibility specialisations of each (kernel, dtypes, tiles, mode constants, warps,
stages). ``--full`` (tens of minutes) adds fp16, full fp32, the transposed (gpt-oss) weight
layout, every activation and every specialisation; ``--full --coarse`` keeps the first four and
one specialisation each.

Before the Triton kernels, the gate checks the built CUDA extension ``moe_kernels._C_cuda`` (local
memory, stack, 128-bit row copies per kernel and architecture; see
:mod:`moe_kernels.tools.cuda_gate`). ``--no-cuda`` skips that part, ``--cuda-only`` runs only it.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import importlib
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# the gate compiles for real targets: the interpreter must be off before triton is imported, and
# a fresh cache makes ptxas run (and report spills) for every variant
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="moe_gpu_gate_"))
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"

import torch  # noqa: E402

ARCH_FAMILY = {80: "sm80", 86: "sm86", 90: "sm90"}
GEMM_KERNELS = ("grouped_mm_kernel", "ragged_k_kernel")

# representative problems: rows per expert from decode to prefill, model-shaped H / I
AVG_ROWS = (1, 8, 24, 48, 256, 4096)
SHAPES = ((2048, 768), (4096, 14336))  # (H, I): Qwen3-30B-A3B, Mixtral-8x7B
NUM_EXPERTS, TOP_K = 8, 2


def _load_ops():
    """``moe_kernels.triton_kernels.ops``; from the source tree when the package is not installed."""
    try:
        return importlib.import_module("moe_kernels.triton_kernels.ops")
    except ImportError:
        root = Path(__file__).resolve().parents[2] / "triton_kernels"
        spec = importlib.util.spec_from_file_location(
            "moe_kernels.triton_kernels",
            root / "__init__.py",
            submodule_search_locations=[str(root)],
        )
        mod = importlib.util.module_from_spec(spec)
        sys.modules["moe_kernels.triton_kernels"] = mod
        spec.loader.exec_module(mod)
        return importlib.import_module("moe_kernels.triton_kernels.ops")


@dataclass
class Launch:
    kernel: str
    fn: object
    args: tuple
    kwargs: dict
    family: str
    where: str


class _Recorder:
    """Stands in for a JIT kernel: ``kernel[grid](*args, **kwargs)`` records the launch."""

    def __init__(self, fn, sink: list, ctx: dict):
        self.fn, self.sink, self.ctx = fn, sink, ctx

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.sink.append(
                Launch(
                    self.fn.__name__,
                    self.fn,
                    args,
                    dict(kwargs),
                    self.ctx["family"],
                    self.ctx["where"],
                )
            )

        return launch


def record_launches(ops, quick: bool) -> list[Launch]:
    """Run every launcher on meta tensors for each family/dtype/shape and record the launches."""
    from moe_kernels.triton_kernels import _config, _gating, _gemm, _permute, _routing

    sink: list[Launch] = []
    ctx = {"family": "", "where": ""}
    modules = (_gating, _gemm, _permute, _routing)
    saved = []
    for mod in modules:
        for name in dir(mod):
            obj = getattr(mod, name)
            if type(obj).__name__ == "JITFunction" and name.endswith("_kernel"):
                saved.append((mod, name, obj))
                setattr(mod, name, _Recorder(obj, sink, ctx))
    meta = torch.device("meta")
    dtypes = (
        (torch.bfloat16, torch.float32) if quick else (torch.bfloat16, torch.float16, torch.float32)
    )
    precisions = ("tf32",) if quick else ("tf32", "ieee")
    layouts = ("hf",) if quick else ("hf", "transposed")
    acts = ("swiglu",) if quick else ("swiglu", "geglu", "swiglu_oai")
    shapes = SHAPES[:1] if quick else SHAPES
    small_avg = AVG_ROWS[:1] if quick else AVG_ROWS
    try:
        for family in ("sm80", "sm86", "sm90"):
            _config.FORCE_FAMILY[0] = family
            ctx["family"] = family
            for dt in dtypes:
                for prec in precisions if dt == torch.float32 else ("tf32",):
                    ops.set_fp32_precision(prec)
                    for H, isz in shapes:
                        E, k = NUM_EXPERTS, TOP_K
                        for avg in AVG_ROWS:
                            T = max(1, avg * E // k)
                            ctx["where"] = f"{family} {str(dt)[6:]} {prec} H={H} isz={isz} T={T}"
                            x = torch.empty(T, H, dtype=dt, device=meta)
                            ids = torch.empty(T, k, dtype=torch.int32, device=meta)
                            tw = torch.empty(T, k, dtype=torch.float32, device=meta)
                            for layout in layouts:
                                if layout == "hf":
                                    wgu = torch.empty(E, 2 * isz, H, dtype=dt, device=meta)
                                    wd = torch.empty(E, H, isz, dtype=dt, device=meta)
                                else:  # gpt-oss stores [E, H, 2I] / [E, isz, H]
                                    wgu = torch.empty(E, H, 2 * isz, dtype=dt, device=meta)
                                    wgu = wgu.transpose(1, 2)
                                    wd = torch.empty(E, isz, H, dtype=dt, device=meta).transpose(
                                        1, 2
                                    )
                                bgu = torch.empty(E, 2 * isz, dtype=dt, device=meta)
                                bd = torch.empty(E, H, dtype=dt, device=meta)
                                for act in acts:
                                    for inter in (
                                        (False, True) if layout == "transposed" else (False,)
                                    ):
                                        ops.moe_ffn(
                                            x, wgu, wd, tw, ids, bgu, bd, act, 1.702, 7.0, inter
                                        )
                                        ops.moe_ffn_backward(
                                            x, x, wgu, wd, tw, ids, bgu, bd, act, 1.702, 7.0, inter
                                        )
                                # grouped_gemm on the permuted rows: b [E, K, N] and [E, N, K]
                                M = T * k
                                a = torch.empty(M, H, dtype=dt, device=meta)
                                offs = torch.empty(E, dtype=torch.int32, device=meta)
                                # [E, H, 2I]: strided (hf) or contiguous (gpt-oss)
                                b = wgu.transpose(1, 2)
                                g = torch.empty(M, 2 * isz, dtype=dt, device=meta)
                                for trans_b in (False, True):
                                    bb = b.transpose(1, 2) if trans_b else b
                                    ops.grouped_gemm(a, bb, offs, trans_b)
                                    ops.grouped_gemm_backward(g, a, bb, offs, trans_b, True, True)
                            if (dt == torch.float32 and prec == "ieee") or avg not in small_avg:
                                continue
                            if quick and (dt != torch.bfloat16 or family == "sm86"):
                                continue  # quick: the non-GEMM kernels in bf16 on sm80/sm90
                            # the non-GEMM kernels (dtype-dependent, shape-independent tiles)
                            for E2, k2 in ((8, 2), (60, 4), (384, 8)):
                                lg = torch.empty(T, E2, dtype=dt, device=meta)
                                bias = torch.empty(E2, dtype=torch.float32, device=meta)
                                ops.topk_gating(lg, k2, "softmax", True, None, 0, 0, 1.0)
                                ops.topk_gating(lg, k2, "sigmoid", True, bias, 4, 2, 2.5)
                                ids2 = torch.empty(T, k2, dtype=torch.int32, device=meta)
                                ops.topk_gating_backward(
                                    torch.empty(T, k2, device=meta), lg, ids2, "softmax", True, 1.0
                                )
                                ops.topk_gating_backward(
                                    torch.empty(T, k2, device=meta), lg, ids2, "sigmoid", False, 1.0
                                )
                                ops.route(ids2, E2, 0)
                                ops.route(ids2, E2, 64)
                            plan = ops.route(ids, E, 0)
                            y = ops.permute(x, plan[2], plan[3])
                            ops.unpermute(y, plan[2], plan[3], tw)
                            ops.unpermute_backward(x, y, plan[2], plan[3], tw, True, True)
            # full run: every table entry of the family, whatever shapes its bounds select (the
            # representative shapes above reach every entry of the shipped table)
            H, isz = SHAPES[0]
            E, k = NUM_EXPERTS, TOP_K
            for kind in () if quick else _config.KINDS:
                for entry in _config.all_entries(kind, family):
                    _config.OVERRIDE[kind] = _config.GemmConfig(**entry["config"])
                    ctx["where"] = f"{family} configs.json {kind} entry {entry}"
                    for dt in dtypes:
                        if _config.DTYPE_NAMES[dt] not in entry.get(
                            "dtypes", ["bf16", "fp16", "fp32"]
                        ):
                            continue
                        T = max(1, 64 * E // k)
                        x = torch.empty(T, H, dtype=dt, device=meta)
                        ids = torch.empty(T, k, dtype=torch.int32, device=meta)
                        tw = torch.empty(T, k, dtype=torch.float32, device=meta)
                        wgu = torch.empty(E, 2 * isz, H, dtype=dt, device=meta)
                        wd = torch.empty(E, H, isz, dtype=dt, device=meta)
                        ops.moe_ffn(x, wgu, wd, tw, ids, None, None, "swiglu", 1.702, 7.0, False)
                        ops.moe_ffn_backward(
                            x, x, wgu, wd, tw, ids, None, None, "swiglu", 1.702, 7.0, False
                        )
                        a = torch.empty(T * k, H, dtype=dt, device=meta)
                        offs = torch.empty(E, dtype=torch.int32, device=meta)
                        b = wgu.transpose(1, 2)
                        g = torch.empty(T * k, 2 * isz, dtype=dt, device=meta)
                        ops.grouped_gemm(a, b, offs, False)
                        ops.grouped_gemm_backward(g, a, b, offs, False, True, True)
                    _config.OVERRIDE[kind] = None
    finally:
        _config.OVERRIDE.clear()
        for mod, name, obj in saved:
            setattr(mod, name, obj)
        _config.FORCE_FAMILY[0] = None
        ops.set_fp32_precision("tf32")
    return sink


@dataclass
class Variant:
    kernel: str
    fn: object = field(repr=False)
    signature: dict = field(repr=False)
    constexprs: dict = field(repr=False)
    attrs: dict = field(repr=False)
    options: dict = field(repr=False)
    arch: int = 90
    where: str = ""

    @property
    def const_by_name(self) -> dict:
        names = self.fn.arg_names
        return {names[k[0]]: v for k, v in self.constexprs.items()}

    def label(self) -> str:
        c = self.const_by_name
        ptrs = sorted({t[1:] for t in self.signature.values() if str(t).startswith("*")})
        parts = [self.kernel.replace("_kernel", ""), "/".join(ptrs)]
        tiles = ("BLOCK_M", "BLOCK_N", "BLOCK_K")
        if all(t in c for t in tiles):
            parts.append("x".join(str(c[t]) for t in tiles))
        for key, val in sorted(c.items()):
            if key in tiles or not key.isupper():
                continue
            val = getattr(val, "name", val)
            parts.append(f"{key}={val}")
        parts.append(f"w{self.options.get('num_warps')}s{self.options.get('num_stages')}")
        return " ".join(str(p) for p in parts)


def specialise(launches: list[Launch], archs: list[int], coarse: bool) -> list[Variant]:
    """Bind and specialise each launch as Triton's runtime would, one variant per distinct key."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fam_arch = {v: k for k, v in ARCH_FAMILY.items()}
    variants: dict[str, Variant] = {}
    backends, binders = {}, {}
    for ln in launches:
        arch = fam_arch[ln.family]
        if arch not in archs:
            continue
        if arch not in backends:
            target = GPUTarget("cuda", arch, 32)
            be = make_backend(target)
            backends[arch] = be
        be = backends[arch]
        fn = ln.fn
        bkey = (fn.__name__, arch)
        if bkey not in binders:
            binders[bkey] = create_function_from_signature(fn.signature, fn.params, be)
        binder = binders[bkey]
        bound, spec, opts = binder(*ln.args, **ln.kwargs)
        options, signature, constexprs, attrs = fn._pack_args(be, ln.kwargs, bound, spec, opts)
        if coarse:
            # one variant per kernel, pointer dtypes, tile/mode constants, warps and stages: the
            # stride and divisibility specialisations of one of them stand for the others
            names = fn.arg_names
            modes = sorted(
                (names[k[0]], str(v)) for k, v in constexprs.items() if names[k[0]].isupper()
            )
            ptrs = sorted(str(t) for t in signature.values() if str(t).startswith("*"))
            key = json.dumps(
                [fn.__name__, arch, ptrs, modes, options.num_warps, options.num_stages]
            )
        else:
            key = json.dumps(
                [
                    fn.__name__,
                    arch,
                    signature,
                    sorted((str(k), str(v)) for k, v in constexprs.items()),
                    sorted((str(k), str(v)) for k, v in attrs.items()),
                    options.num_warps,
                    options.num_stages,
                ]
            )
        if key not in variants:
            variants[key] = Variant(
                fn.__name__,
                fn,
                signature,
                constexprs,
                attrs,
                {"num_warps": options.num_warps, "num_stages": options.num_stages},
                arch,
                ln.where,
            )
    return list(variants.values())


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def compile_variant(v: Variant) -> dict:
    """Compile one variant and read its resources from the cubin."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    t0 = time.time()
    row = {"kernel": v.kernel, "arch": v.arch, "variant": v.label(), "example": v.where}
    try:
        src = ASTSource(v.fn, v.signature, v.constexprs, v.attrs)
        log = io.StringIO()
        with contextlib.redirect_stdout(log):  # Triton prints the `ptxas -v` report here
            k = triton.compile(src, target=GPUTarget("cuda", v.arch, 32), options=dict(v.options))
        ptxas_log = log.getvalue()
    except Exception as exc:  # a variant that does not compile fails the gate
        row.update(ok=False, problems=[f"compile error: {type(exc).__name__}: {exc}"[:500]])
        return row
    cubin = k.asm["cubin"]
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        res = subprocess.run(
            [_tool("cuobjdump"), "--dump-resource-usage", path],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        sass = subprocess.run(
            [_tool("cuobjdump"), "-sass", path], capture_output=True, text=True, check=True
        ).stdout
    finally:
        os.unlink(path)

    def field_of(name):
        m = re.search(name + r":(\d+)", res)
        return int(m.group(1)) if m else 0

    spill_st = sum(int(x) for x in re.findall(r"(\d+) bytes spill stores", ptxas_log))
    spill_ld = sum(int(x) for x in re.findall(r"(\d+) bytes spill loads", ptxas_log))
    row.update(
        spill_stores=spill_st,
        spill_loads=spill_ld,
        ptxas_log_seen="spill stores" in ptxas_log,
        regs=field_of("REG"),
        stack=field_of("STACK"),
        local=field_of("LOCAL"),
        shared=int(k.metadata.shared),
        hmma=len(re.findall(r"\bHMMA\b", sass)),
        hgmma=len(re.findall(r"\bHGMMA\b", sass)),
        seconds=round(time.time() - t0, 1),
    )
    problems = []
    # a stack frame alone (e.g. a called math routine) is not a spill; spill stores/loads
    # (ptxas -v) and local memory are
    if spill_st or spill_ld or row["local"] > 0:
        problems.append(f"spills (stores {spill_st} B, loads {spill_ld} B, local {row['local']} B)")
    if not row["ptxas_log_seen"]:
        problems.append("no ptxas -v report (cached compile?): spills not checked")
    # the per-family limit the tile configurations are sized against (one table, in _config)
    from moe_kernels.triton_kernels import _config

    shared_limit = _config.SHARED_LIMIT[ARCH_FAMILY[v.arch]]
    if row["shared"] > shared_limit:
        problems.append(f"shared {row['shared']} B > {shared_limit} B")
    c = v.const_by_name
    if v.kernel in GEMM_KERNELS and c.get("PRECISION") != "ieee":
        rows_tile = c.get("BLOCK_M", 0)
        if v.arch == 90 and rows_tile >= 64 and v.options["num_warps"] >= 4:
            if row["hgmma"] == 0:
                problems.append("no HGMMA (wgmma) in a >=64-row sm_90 tile")
        elif row["hmma"] == 0 and row["hgmma"] == 0:
            problems.append("no HMMA (tensor cores) in a GEMM variant")
    row["ok"] = not problems
    row["problems"] = problems
    return row


def _compile_in_worker(payload):
    kernel_module, kernel_name, fields = payload
    mod = importlib.import_module(kernel_module)
    fn = getattr(mod, kernel_name)
    return compile_variant(Variant(kernel_name, fn, **fields))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--full",
        action="store_true",
        help="every dtype, layout, activation and specialisation (tens of minutes)",
    )
    ap.add_argument("--quick", action="store_true", help="the default: see the module docstring")
    ap.add_argument("--arch", default="80,86,90", help="comma list of 80, 86, 90")
    ap.add_argument("--json", default="build/gpu_gate.json", help="where to write the results")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--limit", type=int, default=0, help="compile only the first N variants")
    ap.add_argument(
        "--coarse",
        action="store_true",
        help="one stride/divisibility specialisation per variant (implied by --quick)",
    )
    ap.add_argument("--match", default="", help="regular expression over the variant labels")
    ap.add_argument("--kernels", default="", help="comma list of kernel-name prefixes to compile")
    ap.add_argument("--verbose", action="store_true", help="one line per compiled variant")
    ap.add_argument("--no-cuda", action="store_true", help="skip the CUDA extension's check")
    ap.add_argument("--cuda-only", action="store_true", help="check only the CUDA extension")
    ap.add_argument("--cuda-so", default=None, help="check this library instead of _C_cuda")
    args = ap.parse_args(argv)
    archs = [int(a) for a in args.arch.split(",") if a]

    cuda = None
    if not args.no_cuda:
        from moe_kernels.tools import cuda_gate

        cuda = cuda_gate.run(args.cuda_so)
        print(cuda_gate.report(cuda) + "\n", flush=True)
        if args.cuda_only:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            with open(args.json, "w") as f:
                json.dump({"cuda": cuda}, f, indent=1, default=str)
            print(f"wrote {args.json}")
            return 0 if cuda["ok"] else 1

    t0 = time.time()
    ops = _load_ops()
    args.quick = not args.full
    launches = record_launches(ops, args.quick)
    variants = specialise(launches, archs, coarse=args.quick or args.coarse)
    variants.sort(key=lambda v: (v.arch, v.kernel, v.label()))
    counts: dict[str, int] = {}
    for v in variants:
        counts[f"sm{v.arch} {v.kernel}"] = counts.get(f"sm{v.arch} {v.kernel}", 0) + 1
    print("variants:", ", ".join(f"{k}: {n}" for k, n in sorted(counts.items())), flush=True)
    if args.kernels:
        wanted = args.kernels.split(",")
        variants = [v for v in variants if any(v.kernel.startswith(w) for w in wanted)]
    if args.match:
        variants = [v for v in variants if re.search(args.match, v.label())]
    if args.limit:
        variants = variants[: args.limit]
    print(
        f"{len(launches)} launches recorded, {len(variants)} distinct variants "
        f"({time.time() - t0:.1f} s); compiling with {args.jobs} job(s)",
        flush=True,
    )

    payloads = []
    for v in variants:
        fields = {
            "signature": v.signature,
            "constexprs": v.constexprs,
            "attrs": v.attrs,
            "options": v.options,
            "arch": v.arch,
            "where": v.where,
        }
        payloads.append((v.fn.__module__, v.kernel, fields))
    rows = []
    done = 0

    def progress(row):
        nonlocal done
        done += 1
        if args.verbose or not row["ok"]:
            state = "ok" if row["ok"] else "FAIL"
            print(
                f"[{done}/{len(payloads)}] sm{row['arch']} {row['variant']}: {state} "
                f"({row.get('seconds', '?')} s)",
                flush=True,
            )
        elif done % 10 == 0:
            print(f"[{done}/{len(payloads)}] compiled", flush=True)

    if args.jobs > 1:
        ctx = __import__("multiprocessing").get_context("spawn")
        with cf.ProcessPoolExecutor(args.jobs, mp_context=ctx, initializer=_load_ops) as pool:
            for fut in [pool.submit(_compile_in_worker, p) for p in payloads]:
                rows.append(fut.result())
                progress(rows[-1])
    else:
        for v in variants:
            rows.append(compile_variant(v))
            progress(rows[-1])

    hdr = (
        f"{'arch':>4} {'regs':>4} {'spill':>5} {'stack':>5} {'shared':>7} {'HMMA':>5} "
        f"{'HGMMA':>5}  ok  variant"
    )
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(
            f"sm{r['arch']:<2} {r.get('regs', '-'):>4} "
            f"{r.get('spill_stores', 0) + r.get('spill_loads', 0) + r.get('local', 0):>5} "
            f"{r.get('stack', '-'):>5} {r.get('shared', '-'):>7} {r.get('hmma', '-'):>5} {r.get('hgmma', '-'):>5}  "
            f"{'ok' if r['ok'] else 'FAIL'}  {r['variant']}"
        )
        for p in r["problems"]:
            print(f"          ! {p}   (e.g. {r['example']})")
    failed = [r for r in rows if not r["ok"]]
    summary = {
        "variants": len(rows),
        "failed": len(failed),
        "seconds": round(time.time() - t0, 1),
        "archs": archs,
        "quick": args.quick,
        "triton": importlib.import_module("triton").__version__,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"summary": summary, "variants": rows, "cuda": cuda}, f, indent=1, default=str)
    print(
        f"\n{len(rows)} variants, {len(failed)} failed, {summary['seconds']} s; wrote {args.json}"
    )
    if cuda is not None:
        state = "skipped" if cuda["skipped"] and cuda["ok"] else ("ok" if cuda["ok"] else "FAIL")
        print(f"CUDA extension: {state} (table above)")
    return 1 if failed or (cuda is not None and not cuda["ok"]) else 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # skip interpreter teardown: native state (LLVM, CUDA tooling) has crashed at exit after a
    # complete, written result; the exit status must be the gate's verdict
    os._exit(code)
