"""The machine a benchmark runs on: CPU model and feature flags, cache sizes, a one-line
description. The one place that reads ``/proc/cpuinfo`` (tests that need the CPU's flags use
:func:`cpu_flags`)."""

from __future__ import annotations

import glob
import os
import re
import subprocess

import torch

__all__ = ["cpu_flags", "cpu_model", "device_description", "l3_cache_bytes"]


def _parse_size(text: str) -> int:
    m = re.match(r"\s*([\d.]+)\s*([KMG]?)i?B?", text.strip(), re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot parse cache size {text!r}")
    mult = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2).upper()]
    return int(float(m.group(1)) * mult)


def l3_cache_bytes() -> int:
    """Total last-level cache of the machine in bytes (sum over distinct L3 instances).

    Read from ``/sys/devices/system/cpu/cpu*/cache``; falls back to ``lscpu``, then to 256 MiB.
    """
    instances: dict[str, int] = {}
    for index in glob.glob("/sys/devices/system/cpu/cpu[0-9]*/cache/index[0-9]*"):
        try:
            with open(os.path.join(index, "level")) as f:
                level = int(f.read())
            if level < 3:
                continue
            with open(os.path.join(index, "size")) as f:
                size = _parse_size(f.read())
            with open(os.path.join(index, "shared_cpu_list")) as f:
                shared = f.read().strip()
        except (OSError, ValueError):
            continue
        instances[f"{level}:{shared}"] = size
    if instances:
        return sum(instances.values())
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        m = re.search(r"^L3 cache:\s*([\d.]+\s*[KMG]i?B?)", out, re.MULTILINE)
        if m:  # lscpu reports the total over all instances
            return _parse_size(m.group(1))
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    return 256 << 20


def _cpuinfo_field(name: str) -> str | None:
    """The value of the first ``name`` line of ``/proc/cpuinfo`` (None where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(name) and line[len(name) :].lstrip().startswith(":"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The CPU model name (``/proc/cpuinfo``), or ``platform.processor()``."""
    model = _cpuinfo_field("model name")
    if model:
        return model
    import platform

    return platform.processor() or "unknown CPU"


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as ``/proc/cpuinfo`` lists them (``avx2``, ``avx512f``,
    ``amx_tile``, ...); empty where there is no ``/proc/cpuinfo``."""
    return frozenset((_cpuinfo_field("flags") or "").split())


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()}, {torch.get_num_threads()} threads, L3 {l3_cache_bytes() >> 20} MiB"
