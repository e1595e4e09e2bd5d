"""Tile configurations of the GEMM kernels.

A configuration is picked from ``configs.json`` by what the host knows without reading tensor
values: the kernel kind, the GPU family, the dtype, the average rows per expert (T * k / E), N and
K. Entries of a (family, kind) list are tried in order; the first whose bounds all hold wins, and
:func:`heuristic` answers when none does (or the family is not listed). ``bench/tune_triton.py``
rewrites the file on a GPU. Under Triton's interpreter a single small configuration is used (there
is no device to tune on, and the interpreter's cost is per program).

Kinds: ``gemm`` (``grouped_gemm`` and its data gradient: ragged schedule), ``glu`` (GEMM 1 of
``moe_ffn`` with the fused activation; its BLOCK_M is also the routing plan's block size), ``down``
(the other padded-schedule GEMMs of ``moe_ffn``; BLOCK_M is forced to the ``glu`` one), ``ragged_k``
(weight gradients; BLOCK_K is the number of rows per reduction step).
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

CONFIG_FILE = Path(__file__).with_name("configs.json")

KINDS = ("gemm", "glu", "down", "ragged_k")

#: shared memory a block may use (bytes) per family: sm_80 163 KB, sm_86/sm_89 99 KB, sm_90 227 KB;
#: the tile configurations are sized against it here and moe_kernels.tools.gpu_gate checks the
#: compiled kernels against it (the one copy)
SHARED_LIMIT = {"sm80": 166912, "sm86": 101376, "sm90": 232448}

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class GemmConfig:
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    GROUP_M: int = 8
    num_warps: int = 4
    num_stages: int = 3

    def kwargs(self) -> dict[str, int]:
        return asdict(self)

    def with_block_m(self, block_m: int) -> GemmConfig:
        d = asdict(self)
        d["BLOCK_M"] = block_m
        return GemmConfig(**d)


#: kind -> configuration forced on every launch of that kind (the tuning script and the static gate)
OVERRIDE: dict[str, GemmConfig | None] = {}

#: the single configuration used under TRITON_INTERPRET=1
INTERPRETER_CONFIG = GemmConfig(
    BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=1, num_stages=1
)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


#: set by the static gate to select the configurations of a family without its GPU
FORCE_FAMILY: list[str | None] = [None]


def gpu_family(device: torch.device | None = None) -> str:
    """``sm80`` (A100-like, 163 KB shared), ``sm86`` (sm_86/sm_89, 99 KB), ``sm90`` (Hopper and
    newer), from the device's compute capability (host-known, cached by torch)."""
    if FORCE_FAMILY[0] is not None:
        return FORCE_FAMILY[0]
    if device is None or device.type != "cuda":
        return "sm80"
    major, minor = torch.cuda.get_device_capability(device)
    if major >= 9:
        return "sm90"
    if major == 8 and minor in (6, 9):
        return "sm86"
    return "sm80"


def smem_bytes(cfg: GemmConfig, kind: str, elem_bytes: int) -> int:
    """Shared memory of the pipelined operand tiles (what the configs must fit)."""
    b_tiles = 2 if kind == "glu" else 1
    return (
        (cfg.BLOCK_M * cfg.BLOCK_K + b_tiles * cfg.BLOCK_K * cfg.BLOCK_N)
        * elem_bytes
        * max(cfg.num_stages - 1, 1)
    )


def heuristic(kind: str, family: str, dtype: str, avg_rows: float, N: int, K: int) -> GemmConfig:
    """Default tiles: small row tiles for decode-sized experts (the GEMM is a weight stream there),
    128-row tiles once experts hold enough rows to reuse each weight tile."""
    if kind == "ragged_k":
        # output tile [M_out, N_out], reduction over rows
        bk = 32 if dtype == "fp32" else 64
        return GemmConfig(BLOCK_M=64, BLOCK_N=64, BLOCK_K=bk, GROUP_M=1, num_warps=4, num_stages=3)
    if avg_rows <= 16:
        bm = 16
    elif avg_rows <= 32:
        bm = 32
    elif avg_rows <= 64:
        bm = 64
    else:
        bm = 128
    bn = 64 if kind == "glu" or bm < 128 else 128
    bk = 32 if dtype == "fp32" else 64
    if bm <= 32:
        bk *= 2  # thin tiles: fewer, deeper K steps keep the weight stream busy
    acc_cols = bn * (2 if kind == "glu" else 1)  # glu keeps gate and up accumulators
    warps = 8 if bm * acc_cols >= 128 * 128 else 4
    stages = 4 if family != "sm86" else 3
    cfg = GemmConfig(
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages
    )
    elem = 4 if dtype == "fp32" else 2
    limit = SHARED_LIMIT.get(family, SHARED_LIMIT["sm86"])
    while smem_bytes(cfg, kind, elem) > limit and cfg.num_stages > 2:
        cfg = GemmConfig(**{**asdict(cfg), "num_stages": cfg.num_stages - 1})
    return cfg


@functools.lru_cache(maxsize=1)
def _table() -> dict:
    path = Path(os.environ.get("MOE_KERNELS_TRITON_CONFIGS", CONFIG_FILE))
    if not path.exists():
        return {}
    with open(path) as f:
        return json.load(f).get("configs", {})


def _matches(entry: dict, dtype: str, avg_rows: float, N: int, K: int) -> bool:
    if "dtypes" in entry and dtype not in entry["dtypes"]:
        return False
    for key, val in (("max_avg_rows", avg_rows), ("max_n", N), ("max_k", K)):
        if entry.get(key) is not None and val > entry[key]:
            return False
    for key, val in (("min_n", N), ("min_k", K)):
        if entry.get(key) is not None and val < entry[key]:
            return False
    return True


def lookup(kind: str, family: str, dtype: str, avg_rows: float, N: int, K: int) -> GemmConfig:
    """The configuration for one GEMM launch (see the module docstring)."""
    if kind not in KINDS:
        raise ValueError(f"unknown kernel kind {kind!r}")
    if OVERRIDE.get(kind) is not None:
        return OVERRIDE[kind]
    if interpreting():
        return INTERPRETER_CONFIG
    for entry in _table().get(family, {}).get(kind, []):
        if _matches(entry, dtype, avg_rows, N, K):
            return GemmConfig(**entry["config"])
    return heuristic(kind, family, dtype, avg_rows, N, K)


def all_entries(kind: str, family: str) -> list[dict]:
    """Every entry the table lists for (family, kind) (for the static gate)."""
    return list(_table().get(family, {}).get(kind, []))
