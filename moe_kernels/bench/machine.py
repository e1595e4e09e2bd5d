"""The machine a benchmark runs on: CPU model, microarchitecture and feature flags, cache sizes, a
one-line description, the package's build commit, and the ``meta`` record of ``moe-bench``'s
output. The one place that reads ``/proc/cpuinfo`` (tests that need the CPU's flags use
:func:`cpu_flags`)."""

from __future__ import annotations

import glob
import os
import re
import subprocess

import torch

__all__ = [
    "cpu_flags",
    "cpu_model",
    "cpu_uarch",
    "device_description",
    "git_commit",
    "isa_flags",
    "l3_cache_bytes",
    "machine_slug",
]


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


#: AMD's microarchitectures by (CPU family, model range), from AMD's processor programming
#: reference manuals: a virtual machine often reports only "AMD EPYC" as the model name.
_AMD_UARCH = (
    (0x17, range(0x00, 0x30), "Zen / Zen+"),
    (0x17, range(0x30, 0x100), "Zen 2"),
    (0x19, range(0x00, 0x10), "Zen 3"),
    (0x19, range(0x10, 0x20), "Zen 4"),
    (0x19, range(0x20, 0x60), "Zen 3"),
    (0x19, range(0x60, 0x80), "Zen 4"),
    (0x19, range(0xA0, 0xB0), "Zen 4"),
    (0x1A, range(0x00, 0x100), "Zen 5"),
)


def cpu_uarch() -> str | None:
    """The microarchitecture of an AMD CPU from its family and model (``Zen 4``), else None."""
    vendor = _cpuinfo_field("vendor_id")
    try:
        family = int(_cpuinfo_field("cpu family") or "")
        model = int(_cpuinfo_field("model") or "")
    except ValueError:
        return None
    if vendor == "AuthenticAMD":
        for fam, models, name in _AMD_UARCH:
            if family == fam and model in models:
                return name
    return None


def cpu_description() -> str:
    """The CPU model, with its microarchitecture where the model name lacks it."""
    model = cpu_model()
    uarch = cpu_uarch()
    return f"{model} ({uarch})" if uarch and uarch not in model else model


#: the CPU features that decide which kernels run (the CPU backend's ISA levels, torch's bf16
#: matmul path), as /proc/cpuinfo names them
ISA_FLAGS = (
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "amx_fp16",
    "asimd",
    "sve",
    "sve2",
)


def isa_flags() -> list[str]:
    """The CPU features of :data:`ISA_FLAGS` this CPU has, in that order."""
    have = cpu_flags()
    return [f for f in ISA_FLAGS if f in have]


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return (
        f"{cpu_description()}, {torch.get_num_threads()} threads, L3 {l3_cache_bytes() >> 20} MiB"
    )


def machine_slug(device: torch.device) -> str:
    """A file-name-safe name of the machine type, e.g. ``cpu-amd-epyc-zen-4-2t`` or
    ``nvidia-h100-80gb-hbm3``: the name of its recorded results in ``bench/results/``."""
    if device.type == "cuda":
        text = torch.cuda.get_device_name(device)
    else:
        text = f"cpu {cpu_description()} {torch.get_num_threads()}t"
    text = re.sub(r"\(r\)|\(tm\)|processor|\d+-core", " ", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def git_commit() -> str | None:
    """The commit the installed package was built from (``moe_kernels/_build_info.py``, written by
    setup.py when the build runs in a git checkout; ``-dirty`` when tracked files differed from
    it), else the commit of the checkout the package is imported from, else None."""
    try:
        from .. import _build_info  # generated at build time; absent outside a checkout

        return _build_info.GIT_COMMIT or None
    except ImportError:
        pass
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if not os.path.exists(os.path.join(root, ".git")):
        return None
    try:
        out = subprocess.run(
            ["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
