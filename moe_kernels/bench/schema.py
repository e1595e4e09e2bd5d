"""The one output schema of ``moe-bench`` (``--json`` and ``--csv``), whichever ops ran.

JSON: ``{"meta": {...}, "rows": [{...}, ...]}`` with exactly the keys of :data:`META_FIELDS` and
:data:`ROW_FIELDS` (a value that does not apply is ``null``). CSV: one line per row, the columns
of :data:`ROW_FIELDS` then those of :data:`META_FIELDS` (the same values on every line; lists and
objects JSON-encoded), empty cells for ``null``; no meta field shares a row field's name. README.md
documents every field.
"""

from __future__ import annotations

import csv
import json
import os

__all__ = ["META_FIELDS", "ROW_FIELDS", "SCHEMA_VERSION", "validate", "write_csv", "write_json"]

SCHEMA_VERSION = "moe-bench/1"

#: meta field -> meaning
META_FIELDS: dict[str, str] = {
    "schema": f"schema name and version ({SCHEMA_VERSION!r})",
    "package": "distribution name (moe-kernels-fused)",
    "version": "moe_kernels version",
    "git_commit": "commit the package was built from ('-dirty' if tracked files differed), "
    "null when not built from a checkout",
    "torch": "torch version",
    "triton": "triton version, null if not installed",
    "transformers": "transformers version, null if not installed",
    "python": "Python version",
    "device": "the device timed: GPU name, or CPU model (microarchitecture), threads, L3 size",
    "device_type": "cpu or cuda",
    "cpu_model": "CPU model name (/proc/cpuinfo)",
    "cpu_uarch": "CPU microarchitecture where known (e.g. Zen 4), else null",
    "isa_flags": "the CPU's instruction-set features that select kernels (avx2 ... amx_bf16)",
    "cpu_isa": "instruction-set level of the CPU backend's kernels (moe_kernels._C.cpu_isa())",
    "num_threads": "torch.get_num_threads()",
    "created": "UTC time of the run (ISO 8601)",
    "command": "the command line",
    "backends": "backend -> [available, reason] (moe_kernels.available_backends())",
    "peers": "peer -> 'available' or the reason it was skipped",
    "ceilings": "machine ceilings measured in this run: read_gbps (sum over read_mib MiB), "
    "dense_tflops (matmul dense_mnk in dense_dtype, fastest layout)",
    "gpu_specs": "GPU -> published dense peak FLOP/s per dtype and HBM bytes/s behind the "
    "predictions, with the source",
    "wall_s": "wall time of the run in seconds",
}

#: row field -> meaning
ROW_FIELDS: dict[str, str] = {
    "op": "gating, route, permute, unpermute, grouped_gemm, moe_ffn or layer",
    "pass": "fwd or bwd (bwd: the backward alone, from a retained graph)",
    "backend": "our backend (reference, cpu, triton, cuda) or a peer's name",
    "kind": "backend (ours), peer, or ceiling (--full's read-ceiling row)",
    "shape": "preset name or custom-H-I-E-k",
    "model": "the model the preset comes from",
    "H": "hidden size",
    "I": "expert intermediate size",
    "E": "routed experts",
    "k": "experts per token",
    "T": "tokens",
    "dtype": "activation and weight dtype",
    "routing": "routing distribution (uniform, zipf(s=...), one)",
    "active_experts": "distinct experts the routing used",
    "scaled": "true when the preset was scaled down to the weight budget",
    "status": "ok, FAIL (error over tolerance), ERROR (raised), skipped, n/a (no kernel for "
    "this op)",
    "note": "why a row was skipped or differs (approximations, left-out options, fallbacks)",
    "median_ms": "median time per call after warm-up",
    "p20_ms": "20th percentile of the timed calls",
    "p80_ms": "80th percentile of the timed calls",
    "samples": "timed calls",
    "cuda_graph": "true when timed as a CUDA graph replay (decode sizes on GPUs)",
    "flops": "analytic FLOPs of one call (moe_kernels.bench.roofline)",
    "bytes": "analytic minimum bytes moved by one call",
    "tflops": "flops / median time, 1e12/s",
    "gbps": "bytes / median time, 1e9/s",
    "bound": "compute or memory: the larger term of the roofline",
    "pct_of_ceiling": "100 * roofline time (measured ceilings) / median time",
    "baseline": "the contender speedup compares with",
    "speedup": "baseline's median / this row's median (> 1: faster)",
    "max_rel_err": "max |out - ref| / max |ref| against the reference backend (bwd: over every "
    "gradient)",
    "tolerance": "the bound on max_rel_err for this op, pass and dtype",
    "pred_h100_ms": "PREDICTION: roofline lower bound on an H100 SXM (published peaks)",
    "pred_h200_ms": "PREDICTION: roofline lower bound on an H200 (published peaks)",
}


def _check_keys(what: str, got: dict, want: dict) -> list[str]:
    problems = []
    missing = [k for k in want if k not in got]
    extra = [k for k in got if k not in want]
    if missing:
        problems.append(f"{what}: missing {', '.join(missing)}")
    if extra:
        problems.append(f"{what}: unknown {', '.join(extra)}")
    return problems


def validate(doc: dict) -> list[str]:
    """The ways ``doc`` departs from the schema (empty when it conforms)."""
    problems: list[str] = []
    if set(doc) != {"meta", "rows"}:
        problems.append(f"top level: keys {sorted(doc)} instead of ['meta', 'rows']")
        return problems
    problems += _check_keys("meta", doc["meta"], META_FIELDS)
    if doc["meta"].get("schema") != SCHEMA_VERSION:
        problems.append(f"meta.schema is {doc['meta'].get('schema')!r}, not {SCHEMA_VERSION!r}")
    for i, row in enumerate(doc["rows"]):
        problems += _check_keys(f"rows[{i}]", row, ROW_FIELDS)
    return problems


def _parent(path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)


def _json_safe(value):
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(path: str, meta: dict, rows: list[dict]) -> None:
    """Write ``{"meta": meta, "rows": rows}`` (NaN as null, infinities as "inf")."""
    doc = _json_safe({"meta": meta, "rows": rows})
    problems = validate(doc)
    if problems:  # a programming error of moe-bench, not of the user
        raise RuntimeError("moe-bench output does not match its schema: " + "; ".join(problems))
    _parent(path)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


def write_csv(path: str, meta: dict, rows: list[dict]) -> None:
    """One line per row: the row fields, then the meta fields (lists and objects as JSON)."""
    _parent(path)
    meta = _json_safe(meta)
    meta_cells = [
        json.dumps(meta[k]) if isinstance(meta[k], (dict, list)) else meta[k] for k in META_FIELDS
    ]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*ROW_FIELDS, *META_FIELDS])
        for row in rows:
            row = _json_safe(row)
            w.writerow([*("" if row[k] is None else row[k] for k in ROW_FIELDS), *meta_cells])
