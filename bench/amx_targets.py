"""The CPU backend's targets on Intel Xeon CPUs with AMX, checked against bench_moe_ffn.py runs.

``bench/amx_check.sh``'s ``targets`` step runs ``bench/bench_moe_ffn.py`` several times (one CSV
per run) and then this script over the CSVs::

    python bench/amx_targets.py amx-check-out/targets-1.csv amx-check-out/targets-2.csv \\
        amx-check-out/targets-3.csv

The targets (2 threads, bf16, the ``cpu`` contender against ``hf-eager`` and the ceilings that the
same run measured):

- prefill, all in one run: >= 2x eager at T = 512 and 2048 on Qwen3-30B-A3B and OLMoE-1B-7B,
  >= 1.5x on Mixtral-8x7B at T = 512, and Qwen3-30B-A3B at T = 2048 at >= 60% of the dense bf16
  matmul's rate;
- decode (T = 1 and 16, caches evicted), all three shapes: the median over the runs (at least
  ``--min-runs``, 3 by default) of the share of the read ceiling >= 80%.

``bench_moe_ffn.py``'s own ``target`` column holds the looser targets that every CPU kind is held
to (75% of the read ceiling, OLMoE T = 2048 at 1.4x); these are the AMX machines'. Prints one line
per target and run (yes / NO / missing) and a verdict; exits 0 when every target is met, 1 when
one is missed or a row is missing.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import sys

#: (shape, T, CSV column, minimum): the prefill targets, to be met together in one run
PREFILL = (
    ("qwen3-30b-a3b", 512, "speedup_vs_eager", 2.0),
    ("qwen3-30b-a3b", 2048, "speedup_vs_eager", 2.0),
    ("qwen3-30b-a3b", 2048, "pct_dense", 60.0),
    ("olmoe-1b-7b", 512, "speedup_vs_eager", 2.0),
    ("olmoe-1b-7b", 2048, "speedup_vs_eager", 2.0),
    ("mixtral-8x7b", 512, "speedup_vs_eager", 1.5),
)
#: (shape, T, CSV column, minimum): the decode targets, on the median over the runs
DECODE = tuple(
    (shape, t, "pct_read_bw", 80.0)
    for shape in ("qwen3-30b-a3b", "olmoe-1b-7b", "mixtral-8x7b")
    for t in (1, 16)
)
UNIT = {"speedup_vs_eager": "x eager", "pct_dense": "% dense", "pct_read_bw": "% read BW"}


def load(path: str) -> dict[tuple[str, int], dict[str, str]]:
    """The ``cpu`` rows of one bench_moe_ffn.py CSV, by (shape, T); none when the run wrote no
    CSV (its rows then count as missing)."""
    if not os.path.exists(path):
        print(f"{path}: no such file (a run that did not finish?)")
        return {}
    with open(path, newline="") as f:
        return {(r["shape"], int(r["T"])): r for r in csv.DictReader(f) if r["contender"] == "cpu"}


def value(rows: dict[tuple[str, int], dict[str, str]], shape: str, t: int, col: str) -> float:
    """The row's value, NaN when the row is missing, was not timed or has no number there."""
    row = rows.get((shape, t))
    try:
        if row is None or math.isnan(float(row["median_ms"])):
            return math.nan
        return float(row[col])
    except (KeyError, ValueError):
        return math.nan


def check(runs: list[dict[tuple[str, int], dict[str, str]]], min_runs: int = 3):
    """Returns (report lines, all met). ``runs``: :func:`load` of each run's CSV."""
    lines: list[str] = []
    best_run, best_met = None, -1
    for i, rows in enumerate(runs, 1):
        met = 0
        for shape, t, col, need in PREFILL:
            v = value(rows, shape, t, col)
            ok = v >= need  # False for NaN
            met += ok
            verdict = "missing" if math.isnan(v) else ("yes" if ok else "NO")
            lines.append(
                f"run {i}  prefill {shape} T={t}: {v:.2f} {UNIT[col]} (need >= {need:g})  {verdict}"
            )
        if met > best_met:
            best_run, best_met = i, met
    prefill_ok = best_met == len(PREFILL)
    lines.append(
        f"prefill: run {best_run} meets {best_met} of {len(PREFILL)} targets"
        + (" (all in one run)" if prefill_ok else "")
    )
    decode_ok = len(runs) >= min_runs
    if not decode_ok:
        lines.append(f"decode: {len(runs)} run(s), the medians need at least {min_runs}")
    for shape, t, col, need in DECODE:
        vals = [value(rows, shape, t, col) for rows in runs]
        present = [v for v in vals if not math.isnan(v)]
        med = statistics.median(present) if len(present) == len(vals) and vals else math.nan
        ok = med >= need
        decode_ok = decode_ok and ok
        verdict = "missing" if math.isnan(med) else ("yes" if ok else "NO")
        each = ", ".join(f"{v:.0f}" for v in vals)
        lines.append(
            f"decode  {shape} T={t}: median {med:.1f} {UNIT[col]} of [{each}] "
            f"(need >= {need:g})  {verdict}"
        )
    return lines, prefill_ok and decode_ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("csv", nargs="+", help="bench_moe_ffn.py --csv files, one per run")
    p.add_argument("--min-runs", type=int, default=3, help="runs the decode medians need")
    args = p.parse_args(argv)
    lines, ok = check([load(path) for path in args.csv], args.min_runs)
    print("\n".join(lines))
    print("AMX targets: " + ("all met" if ok else "NOT all met"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
