"""Analytic FLOP and byte counts of every benchmarked op, the roofline, GPU predictions and plots.

Counts (``n = T * k`` (token, slot) pairs, ``A`` the distinct experts the routing uses, ``e`` the
element size of the activations and weights, indices int32 and routing weights fp32 (4 bytes),
router logits fp32). Bytes are the minimum traffic: each tensor read or written once.

========================= ===================================== ========================================================
op, pass                  FLOPs                                 bytes
========================= ===================================== ========================================================
gating fwd                0 (not counted: memory-bound)         logits ``4 T E`` + weights and ids ``8 n`` (+ bias ``4 E``)
gating bwd                0                                     ``8 T E`` (logits, their gradient) + ``12 n``
route fwd                 0                                     ids ``4 n`` + two index maps ``8 n`` + counts ``8 E``
permute fwd               0                                     ``x`` ``T H e`` + rows ``n H e`` + map ``4 n``
permute bwd               0                                     the same
unpermute fwd             ``2 n H``                             rows ``n H e`` + out ``T H e`` + ``8 n``
unpermute bwd             ``3 n H``                             ``2 n H e`` + ``T H e`` + ``12 n``
grouped_gemm fwd          ``2 n H 2I``                          ``a`` ``n H e`` + ``A`` experts ``2I H e`` + out ``n 2I e``
grouped_gemm bwd          ``2 x`` fwd                           fwd's reads and ``grad_out`` + ``grad_a`` + ``grad_b`` of all ``E`` experts
moe_ffn fwd               ``2 n 3 H I``                         ``x``, out ``2 T H e`` + ``A`` experts ``3 H I e`` + ``8 n`` (+ biases)
moe_ffn bwd               ``2 x`` fwd                           ``3 T H e`` + ``A`` experts read + ``E`` experts' gradients written + ``8 n``
layer fwd                 moe_ffn + router ``2 T H E`` +        moe_ffn + router weight ``4 E H`` + shared weights
                          shared ``2 T 3 H Is``                 ``3 H Is e``
layer bwd                 ``2 x`` fwd                           moe_ffn bwd + router and shared weights read and their gradients written
========================= ===================================== ========================================================

The roofline of a row: ``t_min = max(FLOPs / dense rate, bytes / read bandwidth)``; the row's
``pct_of_ceiling`` is ``100 * t_min / measured time`` and ``bound`` says which term is larger.

GPU predictions (no GPU needed): the same ``t_min`` against the published dense peak and memory
bandwidth of :data:`GPU_SPECS` -- a lower bound (no launch overhead, no cache reuse), labelled
as a prediction wherever it is shown.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .presets import MoEShape

__all__ = [
    "GPU_SPECS",
    "GpuSpec",
    "OPS",
    "PASSES",
    "Counts",
    "attainable_seconds",
    "counts",
    "plot",
    "predict_ms",
]

#: the ops moe-bench times, in the order it runs them
OPS = ("gating", "route", "permute", "unpermute", "grouped_gemm", "moe_ffn", "layer")
#: ops without a backward pass (route's outputs are integers)
FORWARD_ONLY = ("route",)
PASSES = ("fwd", "bwd")


@dataclasses.dataclass(frozen=True)
class GpuSpec:
    """A GPU's published peak rates: dense (no sparsity) tensor-core FLOP/s per dtype and HBM
    bandwidth in bytes/s."""

    name: str
    dense_flops: dict
    hbm_bytes_per_s: float
    source: str


# NVIDIA's datasheets list tensor-core rates "with sparsity"; the dense rates are half of them.
# H100 SXM5: BF16/FP16 1,979 TFLOP/s sparse -> 989.5 dense; TF32 989 sparse -> 494.5 dense;
# HBM3 3.35 TB/s.  H200 (SXM): the same tensor-core rates, HBM3e 4.8 TB/s.  fp32 is predicted at
# the TF32 rate: the Triton and CUDA GEMMs use TF32 tensor cores for fp32 inputs.
GPU_SPECS: dict[str, GpuSpec] = {
    "h100_sxm": GpuSpec(
        "H100 SXM",
        {torch.bfloat16: 989.5e12, torch.float16: 989.5e12, torch.float32: 494.5e12},
        3.35e12,
        "NVIDIA H100 Tensor Core GPU datasheet, https://www.nvidia.com/en-us/data-center/h100/",
    ),
    "h200": GpuSpec(
        "H200",
        {torch.bfloat16: 989.5e12, torch.float16: 989.5e12, torch.float32: 494.5e12},
        4.8e12,
        "NVIDIA H200 Tensor Core GPU datasheet, https://www.nvidia.com/en-us/data-center/h200/",
    ),
}


@dataclasses.dataclass(frozen=True)
class Counts:
    flops: int
    bytes: int


def counts(
    op: str,
    pass_: str,
    shape: MoEShape,
    tokens: int,
    element_size: int,
    active_experts: int,
    *,
    shared_intermediate: int | None = None,
) -> Counts:
    """Analytic FLOPs and minimum bytes of one call (the module docstring's table).

    ``shared_intermediate``: the shared experts' width that actually ran (the layer op leaves them
    out when ``moe_kernels.MoE`` cannot build them); default ``shape.shared_intermediate_size``.
    """
    T, H, inter, E, k = tokens, shape.hidden, shape.intermediate, shape.experts, shape.top_k
    n = T * k
    e = element_size
    A = active_experts
    Is = shape.shared_intermediate_size if shared_intermediate is None else shared_intermediate
    bwd = pass_ == "bwd"
    expert_w = 3 * H * inter * e
    bias_w = (2 * inter + H) * e if shape.bias else 0
    if op == "gating":
        bias = 4 * E if shape.correction_bias else 0
        if bwd:
            return Counts(0, 8 * T * E + 12 * n)
        return Counts(0, 4 * T * E + 8 * n + bias)
    if op == "route":
        return Counts(0, 12 * n + 8 * E)
    if op == "permute":
        return Counts(0, T * H * e + n * H * e + 4 * n)
    if op == "unpermute":
        if bwd:
            return Counts(3 * n * H, 2 * n * H * e + T * H * e + 12 * n)
        return Counts(2 * n * H, n * H * e + T * H * e + 8 * n)
    if op == "grouped_gemm":
        flops = 2 * n * H * 2 * inter
        w = 2 * inter * H * e
        fwd_bytes = n * H * e + A * w + n * 2 * inter * e + 4 * E
        if bwd:
            return Counts(2 * flops, fwd_bytes + n * H * e + E * w)
        return Counts(flops, fwd_bytes)
    if op in ("moe_ffn", "layer"):
        flops = 2 * n * 3 * H * inter
        if bwd:
            nbytes = 3 * T * H * e + A * (expert_w + bias_w) + E * (expert_w + bias_w) + 8 * n
        else:
            nbytes = 2 * T * H * e + A * (expert_w + bias_w) + 8 * n
        if op == "layer":
            router = 4 * E * H
            shared = 3 * H * Is * e
            flops += 2 * T * H * E + 2 * T * 3 * H * Is
            nbytes += router + shared + (router + shared if bwd else 0)
        return Counts(2 * flops if bwd else flops, nbytes)
    raise ValueError(f"unknown op {op!r}; choose from {', '.join(OPS)}")


def attainable_seconds(c: Counts, flop_rate: float, bytes_per_s: float) -> tuple[float, str]:
    """Roofline lower bound of a call and its bound: ``max(FLOPs / rate, bytes / bandwidth)``."""
    t_compute = c.flops / flop_rate if flop_rate > 0 else 0.0
    t_memory = c.bytes / bytes_per_s if bytes_per_s > 0 else 0.0
    return max(t_compute, t_memory), ("compute" if t_compute > t_memory else "memory")


def predict_ms(c: Counts, dtype: torch.dtype, gpu: str) -> float:
    """Predicted time on ``gpu`` (a key of :data:`GPU_SPECS`) in ms: the roofline lower bound."""
    spec = GPU_SPECS[gpu]
    sec, _ = attainable_seconds(c, spec.dense_flops[dtype], spec.hbm_bytes_per_s)
    return sec * 1e3


# ------------------------------------------------------------------------------------- plot


def _contender_order(rows: list[dict]) -> list[str]:
    """Our backends first (reference first of them), then the peers, each in order of
    appearance."""
    ours, peers = [], []
    for r in rows:
        dest = ours if r.get("kind") == "backend" else peers
        if r["backend"] not in dest:
            dest.append(r["backend"])
    ours.sort(key=lambda n: n != "reference")
    return ours + peers


def plot(rows: list[dict], meta: dict, path: str) -> None:
    """Write a PNG: the roofline (each timed row's achieved FLOP/s against its arithmetic
    intensity, under the dense-rate and read-bandwidth ceilings measured in the same run) and, per
    shape, a speed-up map: one line per contender, one column per (op, pass, T), each cell the
    baseline's median over the contender's (blue: faster than the baseline, red: slower).

    Rows without FLOPs (gating, route, permute) have no place on the roofline: they appear in the
    speed-up maps only.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    timed = [r for r in rows if r.get("median_ms") is not None]
    shapes = list(dict.fromkeys(r["shape"] for r in timed))
    baseline = next((r["baseline"] for r in timed), "reference")
    names = _contender_order(timed)
    shown = {
        s: [
            n
            for n in names
            if n != baseline and any(r["backend"] == n and r["shape"] == s for r in timed)
        ]
        for s in shapes
    }
    columns = {
        s: list(
            dict.fromkeys(
                (r["op"], r["pass"], r["T"])
                for r in sorted(
                    (r for r in timed if r["shape"] == s),
                    key=lambda r: (OPS.index(r["op"]), r["pass"] == "bwd", r["T"]),
                )
            )
        )
        for s in shapes
    }
    heights = [6.0] + [1.6 + 0.42 * max(1, len(shown[s])) for s in shapes]
    width = max(12.0, 3.5 + 0.55 * max([len(c) for c in columns.values()] or [1]))
    fig = plt.figure(figsize=(width, sum(heights)))
    grid = fig.add_gridspec(len(heights), 2, height_ratios=heights, width_ratios=[3, 2])

    # roofline
    ax1 = fig.add_subplot(grid[0, 0])
    ceil = meta.get("ceilings") or {}
    rate = (ceil.get("dense_tflops") or 0) * 1e12
    bw = (ceil.get("read_gbps") or 0) * 1e9
    pts = [r for r in timed if r.get("flops") and r.get("bytes")]
    markers = "osD^v<>phX*"
    ops = [o for o in OPS if any(r["op"] == o for r in pts)]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for r in pts:
        ai = r["flops"] / r["bytes"]
        achieved = r["flops"] / (r["median_ms"] * 1e-3)
        ax1.scatter(
            ai,
            achieved / 1e12,
            marker=markers[names.index(r["backend"]) % len(markers)],
            color=colors[ops.index(r["op"]) % len(colors)],
            alpha=0.8 if r["pass"] == "fwd" else 0.45,
            edgecolors="black" if r.get("kind") == "backend" else "none",
            s=36,
        )
    if pts and rate > 0 and bw > 0:
        ais = [r["flops"] / r["bytes"] for r in pts]
        lo, hi = min(ais + [rate / bw]) / 4, max(ais + [rate / bw]) * 4
        xs = [lo * (hi / lo) ** (i / 200) for i in range(201)]
        ax1.plot(xs, [min(rate, x * bw) / 1e12 for x in xs], color="black", lw=1.2)
        ax1.set_title(
            f"roofline: dense {rate / 1e12:.3g} TFLOP/s and read {bw / 1e9:.3g} GB/s, measured in "
            "this run",
            fontsize=9,
        )
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.set_xlabel("arithmetic intensity (analytic FLOP / byte)")
    ax1.set_ylabel("achieved TFLOP/s")
    ax1.grid(True, which="both", alpha=0.3)
    legend_ax = fig.add_subplot(grid[0, 1])
    legend_ax.axis("off")
    used = [n for n in names if any(r["backend"] == n for r in pts)]
    handles = [
        Line2D([], [], marker=markers[names.index(n) % len(markers)], ls="", color="gray", label=n)
        for n in used
    ] + [
        Line2D([], [], marker="s", ls="", color=colors[i % len(colors)], label=o)
        for i, o in enumerate(ops)
    ]
    if handles:
        legend_ax.legend(
            handles=handles,
            loc="upper left",
            fontsize=8,
            title="marker: contender (black edge: ours); colour: op; faded: bwd",
            title_fontsize=8,
        )
    legend_ax.text(
        0.0,
        0.02,
        f"{meta.get('device', '')}\ntorch {meta.get('torch', '')}, moe_kernels "
        f"{meta.get('version', '')} ({(meta.get('git_commit') or 'no commit')[:12]})\n"
        f"{meta.get('created', '')}",
        fontsize=8,
        va="bottom",
        transform=legend_ax.transAxes,
    )

    # speed-up maps, one per shape
    for i, s in enumerate(shapes):
        ax = fig.add_subplot(grid[i + 1, :])
        cols, lines = columns[s], shown[s]
        cells = [[math.nan] * len(cols) for _ in lines]
        for r in timed:
            if r["shape"] != s or r["backend"] not in lines or r.get("speedup") is None:
                continue
            cells[lines.index(r["backend"])][cols.index((r["op"], r["pass"], r["T"]))] = r[
                "speedup"
            ]
        logs = [[math.log2(v) if v == v and v > 0 else math.nan for v in line] for line in cells]
        ax.imshow(logs, cmap="RdBu", vmin=-4, vmax=4, aspect="auto", interpolation="nearest")
        for y, line in enumerate(cells):
            for x, v in enumerate(line):
                if v == v:
                    dark = abs(math.log2(v)) > 2.5 if v > 0 else False
                    ax.text(
                        x,
                        y,
                        f"{v:.2g}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if dark else "black",
                    )
        ax.set_yticks(range(len(lines)))
        ax.set_yticklabels(lines, fontsize=8)
        ax.set_xticks(range(len(cols)))
        ax.set_xticklabels(
            [f"{op} {p} T={T}" for op, p, T in cols], rotation=60, ha="right", fontsize=7
        )
        ax.set_title(f"{s}: speed-up vs {baseline} (> 1: faster; empty: not run)", fontsize=9)

    dtypes = ", ".join(sorted({r["dtype"] for r in timed}))
    fig.suptitle(f"moe-bench: {', '.join(shapes)}; {dtypes}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
