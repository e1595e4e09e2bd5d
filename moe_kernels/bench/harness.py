"""The benchmark harness shared by ``moe-bench`` and the scripts under ``bench/``.

Nothing here is on an op path: host syncs, Python loops and ``.item()`` are fine.

* :class:`MoEShape` and :data:`SHAPES`: expert-layer shapes of real models (from :mod:`.presets`).
* :func:`make_inputs`: random weights in the Hugging Face expert layout plus a softmax/top-k routing.
* :func:`time_alternating`: times several contenders in turns (A B A B ...), so that drift on a
  shared machine hits all of them alike, optionally evicting the caches before every call.
* :func:`read_bandwidth_ceiling` / :func:`dense_matmul_ceiling`: the machine's measured ceilings.
* :func:`build_hf_experts`: a Hugging Face transformers experts module sharing given weights.
* :func:`print_table` / :func:`write_csv`: output (``rich`` when installed, plain text otherwise).
"""

from __future__ import annotations

import csv
import os
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from . import machine

# the presets live in .presets; re-exported here, where the scripts under bench/ look for them
from .presets import SHAPES, MoEShape, get_shape, parse_shapes, scale_to_budget  # noqa: F401

# --------------------------------------------------------------------------------------- inputs


def make_inputs(
    shape: MoEShape,
    tokens: int,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    seed: int = 0,
    weights: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Random inputs of one expert FFN call, in the public API's layout.

    Returns a dict with ``x`` [T, H], ``w_gate_up`` [E, 2I, H], ``w_down`` [E, H, I] (all ``dtype``),
    ``topk_weights`` float32 [T, k] and ``topk_ids`` int32 [T, k]. Routing is softmax over random
    router logits, top-k, renormalised (Qwen3/OLMoE/Mixtral style). The routing weights are rounded
    to ``dtype`` (then stored as float32) so that contenders taking weights in the activation dtype
    (Hugging Face) see exactly the same values. Pass ``weights`` to reuse expert weights.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    H, inter, E, k = shape.hidden, shape.intermediate, shape.experts, shape.top_k
    if weights is None:
        w_gate_up = torch.empty(E, 2 * inter, H, dtype=dtype, device=device)
        w_down = torch.empty(E, H, inter, dtype=dtype, device=device)
        # One expert at a time keeps the float32 staging buffer small (Mixtral: 350 MB per expert).
        for e in range(E):
            w_gate_up[e].copy_(torch.randn(2 * inter, H, generator=gen).mul_(H**-0.5))
            w_down[e].copy_(torch.randn(H, inter, generator=gen).mul_(inter**-0.5))
    else:
        w_gate_up, w_down = weights
    x = torch.randn(tokens, H, generator=gen).to(device=device, dtype=dtype)
    logits = torch.randn(tokens, E, generator=gen)
    probs = torch.softmax(logits, dim=-1)
    topk_weights, topk_ids = torch.topk(probs, k, dim=-1)
    topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    topk_weights = topk_weights.to(dtype).float()
    return {
        "x": x,
        "w_gate_up": w_gate_up,
        "w_down": w_down,
        "topk_weights": topk_weights.to(device),
        "topk_ids": topk_ids.to(device=device, dtype=torch.int32),
    }


def distinct_experts(topk_ids: torch.Tensor, num_experts: int) -> int:
    """Number of distinct valid expert ids in ``topk_ids`` (host sync; benchmark use only)."""
    ids = topk_ids.flatten().long()
    ids = ids[(ids >= 0) & (ids < num_experts)]
    return int(torch.unique(ids).numel())


# ---------------------------------------------------------------------------------- caches


class CacheEvictor:
    """Evicts the CPU caches by writing a buffer of ``factor`` times the last-level cache size.

    Call it before a timed call to measure a decode step whose weights arrive from DRAM, as they do
    in a real model where every layer's experts have been pushed out of the caches by the others.
    On CUDA it writes a buffer of twice the L2 size.
    """

    def __init__(self, device: torch.device | str = "cpu", factor: int = 3):
        device = torch.device(device)
        if device.type == "cuda":
            props = torch.cuda.get_device_properties(device)
            nbytes = 2 * getattr(props, "L2_cache_size", 64 << 20)
        else:
            nbytes = max(factor * machine.l3_cache_bytes(), 64 << 20)
        self.nbytes = nbytes
        self.device = device
        self._buf = torch.zeros(nbytes // 4, dtype=torch.float32, device=device)

    def __call__(self) -> None:
        self._buf.add_(1.0)
        sync(self.device)


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------- timing


def time_alternating(
    contenders: dict[str, Callable[[], object]],
    *,
    repeats: int,
    warmup: int = 1,
    before_each: Callable[[], None] | None = None,
    device: torch.device | str = "cpu",
    max_seconds: float | None = None,
    inference_mode: bool = True,
) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Time ``contenders`` in turns (A B A B ...); returns seconds per call and errors by name.

    ``before_each`` (e.g. a :class:`CacheEvictor`) runs before every timed call and is not timed.
    A contender that raises is dropped from the following rounds and its error message recorded.
    ``max_seconds`` stops after the round in which the total elapsed time passed it (at least one
    timed round always runs). ``inference_mode=False`` runs the calls with autograd on (timing a
    backward pass).
    """
    times: dict[str, list[float]] = {name: [] for name in contenders}
    errors: dict[str, str] = {}
    live = dict(contenders)
    mode = torch.inference_mode() if inference_mode else torch.enable_grad()
    with mode:
        for name, fn in list(live.items()):
            try:
                for _ in range(warmup):
                    fn()
                sync(device)
            except Exception as exc:  # noqa: BLE001 -- reported, not hidden
                errors[name] = f"{type(exc).__name__}: {exc}"
                del live[name]
        start = time.perf_counter()
        for _ in range(repeats):
            for name, fn in list(live.items()):
                if before_each is not None:
                    before_each()
                try:
                    sync(device)
                    t0 = time.perf_counter()
                    fn()
                    sync(device)
                    times[name].append(time.perf_counter() - t0)
                except Exception as exc:  # noqa: BLE001
                    errors[name] = f"{type(exc).__name__}: {exc}"
                    del live[name]
            if max_seconds is not None and time.perf_counter() - start > max_seconds:
                break
    return times, errors


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def read_bandwidth_ceiling(
    nbytes: int = 1 << 30, repeats: int = 5, device: torch.device | str = "cpu"
) -> tuple[float, float]:
    """Read bandwidth of a reduction over an ``nbytes`` float32 tensor: (bytes/s, median seconds).

    The tensor is far larger than the caches, so each sum streams it from memory.
    """
    t = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    times, _ = time_alternating({"sum": t.sum}, repeats=repeats, device=device)
    sec = median(times["sum"])
    del t
    return nbytes / sec, sec


#: operand layouts of a dense ``[m, k] x [k, n]`` product: "nn" both row-major, "nt" B stored
#: [n, k] (nn.Linear), "tn" A stored [k, m]. torch's CPU GEMM speed differs by layout: on AVX2
#: machines (no AVX-512-BF16/AMX) a bf16 "nn" matmul takes a slow path, 10-25x below "tn".
MATMUL_LAYOUTS = ("nn", "nt", "tn")


def _matmul_fn(m: int, k: int, n: int, layout: str, dtype, device) -> Callable[[], torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(k, n, generator=gen).to(device=device, dtype=dtype)
    if layout == "nt":
        b = b.t().contiguous().t()
    elif layout == "tn":
        a = a.t().contiguous().t()
    elif layout != "nn":
        raise ValueError(f"unknown layout {layout!r}")
    return lambda: torch.matmul(a, b)


def probe_matmul(m: int, k: int, n: int, layout: str, dtype, device="cpu") -> float:
    """FLOP/s of one ``[m, k] x [k, n]`` matmul in ``layout`` (a second call if the first was fast)."""
    fn = _matmul_fn(m, k, n, layout, dtype, device)
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    sec = time.perf_counter() - t0
    if sec < 1.0:
        t0 = time.perf_counter()
        fn()
        sync(device)
        sec = time.perf_counter() - t0
    return 2.0 * m * k * n / sec


def close_layouts(probe: dict[str, float], factor: float = 4.0) -> list[str]:
    """The layouts whose probe rate is within ``factor`` of the fastest one: the candidates worth
    timing at full size (a layout's order at 128 rows need not hold at 2048)."""
    top = max(probe.values())
    return [layout for layout, rate in probe.items() if rate * factor >= top]


def dense_matmul_ceiling(
    m: int = 2048,
    k: int = 2048,
    n: int = 6144,
    repeats: int = 3,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    layouts: Sequence[str] = MATMUL_LAYOUTS,
) -> dict[str, object]:
    """FLOP rate of a dense ``[m, k] x [k, n]`` ``torch.matmul``, in the fastest operand layout.

    Each layout of ``layouts`` is probed on ``[min(m, 128), k] x [k, n]`` (one call, plus a second
    one when the first took under a second); every layout within 4x of the fastest probe is then
    timed at full size, ``repeats`` calls each, alternated (the probe's order need not hold at
    full size: bf16 on a CPU without AMX has layouts that are fast at 128 rows and 4x slower at
    2048). Returns a dict: ``rate`` (FLOP/s of the fastest full-size call: a ceiling, timed once
    per run, should not drop because the shared host was busy for a moment), ``seconds`` (that
    call's time), ``layout`` (its layout), ``probe`` (layout -> probe FLOP/s).
    """
    pm = min(m, 128)
    probe = {layout: probe_matmul(pm, k, n, layout, dtype, device) for layout in layouts}
    fns = {lay: _matmul_fn(m, k, n, lay, dtype, device) for lay in close_layouts(probe)}
    times, _ = time_alternating(fns, repeats=repeats, device=device)
    best = min(times, key=lambda lay: min(times[lay]))
    sec = min(times[best])
    return {"rate": 2.0 * m * k * n / sec, "seconds": sec, "layout": best, "probe": probe}


# ---------------------------------------------------------------------------- transformers


def transformers_version() -> str | None:
    try:
        import transformers
    except ImportError:
        return None
    return transformers.__version__


def build_hf_experts(
    shape: MoEShape,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    implementation: str = "eager",
) -> torch.nn.Module:
    """A Hugging Face transformers 5.x experts module of ``shape`` that *shares* the given weights.

    Uses ``Qwen3MoeExperts`` (OLMoE's and Mixtral's experts modules are the same code: SwiGLU,
    ``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I]) built from a one-layer config, with its
    parameters replaced by ``w_gate_up`` / ``w_down`` (no copy). ``implementation`` is the value of
    the config's experts implementation switch: ``"eager"`` (the per-expert loop in the modeling
    file) or a key of ``transformers.integrations.moe.ExpertsInterface`` (``"grouped_mm"``,
    ``"batched_mm"``, ...). The module is called as ``module(x, topk_ids, topk_weights)``.

    Raises ``ImportError`` when transformers (>= 5) is not installed.
    """
    try:
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts
    except ImportError as exc:
        raise ImportError(
            "the Hugging Face baselines need transformers >= 5 (pip install 'transformers>=5')"
        ) from exc
    config = Qwen3MoeConfig(
        hidden_size=shape.hidden,
        moe_intermediate_size=shape.intermediate,
        num_experts=shape.experts,
        num_experts_per_tok=shape.top_k,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        vocab_size=8,
        hidden_act="silu",
    )
    config._experts_implementation = implementation
    with torch.device("meta"):
        module = Qwen3MoeExperts(config)
    module.gate_up_proj = torch.nn.Parameter(w_gate_up, requires_grad=False)
    module.down_proj = torch.nn.Parameter(w_down, requires_grad=False)
    module.eval()
    return module


# ---------------------------------------------------------------------------------- output


def _fmt(value: object) -> str:
    if isinstance(value, float):
        if value != value:
            return "-"
        if value == float("inf"):
            return "inf"
        return f"{value:.4g}"  # 4 digits: 74.96 next to a ">= 75%" target reads as a miss
    return "" if value is None else str(value)


def print_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[object]],
    title: str | None = None,
    plain: bool = False,
    console=None,
    left: Sequence[int] = (0,),
) -> None:
    """Print a table with ``rich`` when installed (and ``plain`` is false), else aligned text.
    ``console``: the ``rich`` console to print on (e.g. one showing a progress bar); ``left``: the
    columns aligned left in the rich table (the others are numbers, aligned right)."""
    cells = [[_fmt(v) for v in row] for row in rows]
    if not plain:
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            plain = True
    if not plain:
        table = Table(title=title, title_justify="left")
        for i, h in enumerate(headers):
            table.add_column(h, justify="left" if i in left else "right")
        for row in cells:
            table.add_row(*row)
        if console is None:
            width = max(100, os.get_terminal_size(1).columns if os.isatty(1) else 160)
            console = Console(width=width)
        console.print(table)
        return
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    if title:
        print(title)
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    print(line)
    print("-" * len(line))
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))


def write_csv(path: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Write ``rows`` (raw values, not formatted) to ``path``; creates parent folders."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(headers)
        writer.writerows(rows)
