"""Static gate for the built CUDA extension ``moe_kernels._C_cuda``: check its machine code without a GPU.

Usage::

    python -m moe_kernels.tools.cuda_gate [--so PATH] [--json PATH] [--verbose]

(``python -m moe_kernels.tools.gpu_gate`` runs this check too, before the Triton one.)

The installed ``_C_cuda`` shared library embeds a fat binary with one cubin per architecture and
source file.  One ``cuobjdump -res-usage -sass`` run (the cuobjdump that Triton's wheel ships under
``triton/backends/nvidia/bin``) gives, per cubin and kernel, the resource usage (registers, stack
frame, local and shared memory) and the SASS; ``c++filt`` demangles the names.  The gate fails when

* a cubin for an architecture of ``TORCH_CUDA_ARCH_LIST`` (default ``8.0;9.0a``) is missing;
* one of our own kernels (a function in namespace ``moe_kernels::``) has a stack frame, local
  memory, or local-memory instructions (``LDL`` / ``STL``): their state must live in registers
  and shared memory;
* a third-party kernel (CUB's scans, names in ``cub::``; anything else outside ``moe_kernels::``)
  spills: local memory or local-memory instructions.  A stack frame alone is reported, not a
  failure;
* a tensor-core grouped GEMM instantiation that the dispatcher can select (``_C_cuda.tc_kernels()``,
  the list of csrc/cuda/kernels/tc_gemm.h) is missing from the binary, or lacks its matrix
  instructions: ``HMMA`` (mma.sync) in the sm_80 instantiations, on every architecture built,
  ``HGMMA`` (wgmma) in the sm_90 ones in the ``sm_90a`` cubin (their ``sm_80`` copies are empty
  stubs); or the binary holds an instantiation the dispatcher cannot select.  CUTLASS's kernels
  are third-party kernels for the spill check above (kernels whose names hold
  ``moe_kernels::cuda::tc::<name>_kernel``);
* a kernel named by a rule of :data:`VEC128_RULES` lacks a 128-bit global load (``LDG.E.128``,
  ``LDG.E.128.CONSTANT``, ``LDG.E.ENL2.256`` or any other ``LDG`` of 128+ bits) or store
  (``STG.E.128`` or wider), or a rule matches no kernel of an architecture (the kernels were renamed
  or not built).

Spills show in the instructions, not in the ``LOCAL`` count: with the ABI that nvcc uses, ptxas
places spilled registers and local arrays in the stack frame, so ``LOCAL`` stays 0 and the frame is
accessed with ``LDL`` / ``STL``.  ``SHARED`` is the static shared memory; dynamic shared memory is
chosen at launch and not seen here.

When ``_C_cuda`` is not installed (CPU-only torch, no nvcc) the gate says why and passes, unless
``MOE_KERNELS_REQUIRE_BUILT`` (comma list, e.g. ``_C,_C_cuda``) names ``_C_cuda``: then it fails.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

EXTENSION = "moe_kernels._C_cuda"
DEFAULT_ARCH_LIST = "8.0;9.0a"


@dataclass(frozen=True)
class VecRule:
    """Kernels of functor ``functor`` whose last template argument is ``vec_bytes`` must use 128-bit
    global loads (``load``) and / or stores (``store``)."""

    functor: str
    vec_bytes: int
    load: bool
    store: bool

    def describe(self) -> str:
        need = " + ".join(n for n, on in (("load", self.load), ("store", self.store)) if on)
        return f"{self.functor}<..., {self.vec_bytes}>: 128-bit {need}"


#: The vectorised row kernels (16-byte accesses per thread) and the 128-bit global memory
#: instructions each must contain, on every architecture.  UnpermuteGradW reads rows (the dot
#: product of the output gradient with the permuted rows) and writes one weight per slot.
VEC128_RULES: tuple[VecRule, ...] = (
    VecRule("PermuteRows", 16, load=True, store=True),
    VecRule("UnpermuteRows", 16, load=True, store=True),
    VecRule("UnpermuteGradY", 16, load=True, store=True),
    VecRule("UnpermuteGradW", 16, load=True, store=False),
)


@dataclass
class Kernel:
    """One kernel of one architecture (instances in several cubins merged: the worst of each)."""

    arch: str
    mangled: str
    name: str = ""  # demangled
    kind: str = ""  # "own" (moe_kernels::), "cub" or "other"
    regs: int = 0
    stack: int = 0
    local: int = 0
    shared: int = 0
    lmem_insts: int = 0  # LDL / STL instructions
    ld128: int = 0  # global loads of 128+ bits
    st128: int = 0  # global stores of 128+ bits
    global_ops: list[str] = field(default_factory=list)  # distinct LDG / STG opcodes
    hmma: int = 0  # mma.sync tensor-core instructions
    hgmma: int = 0  # wgmma (sm_90a) tensor-core instructions
    instances: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def short(self) -> str:
        return short_name(self.name or self.mangled)

    @property
    def ok(self) -> bool:
        return not self.problems


# ---------------------------------------------------------------------------------------------
# locating the extension, the tools and the architectures


def find_extension() -> tuple[str | None, str]:
    """(path of the installed ``_C_cuda`` library or None, why not)."""
    try:
        spec = importlib.util.find_spec(EXTENSION)
    except Exception as exc:  # the package itself fails to import
        return None, f"cannot look for {EXTENSION}: {type(exc).__name__}: {exc}"
    if spec is None or not spec.origin:
        try:
            pkg = importlib.util.find_spec("moe_kernels")
            where = os.path.dirname(pkg.origin) if pkg and pkg.origin else "?"
        except Exception:
            where = "?"
        hint = ""
        if not os.path.dirname(where).endswith("site-packages"):
            hint = (
                " (a source tree's moe_kernels/ has no compiled extension: run from another folder)"
            )
        return None, (
            f"{EXTENSION} is not built: no such module in {where}{hint}; it is built when torch is a "
            "CUDA build and nvcc is found (MOE_KERNELS_BUILD_CUDA=1 forces it)"
        )
    return spec.origin, ""


def required_built(env: str | None = None) -> set[str]:
    """Extension names listed in ``MOE_KERNELS_REQUIRE_BUILT`` (``moe_kernels.`` prefix optional)."""
    raw = os.environ.get("MOE_KERNELS_REQUIRE_BUILT", "") if env is None else env
    names = (n.strip() for n in raw.split(","))
    return {n.removeprefix("moe_kernels.") for n in names if n}


def parse_arch_list(value: str | None = None) -> list[str]:
    """``TORCH_CUDA_ARCH_LIST`` (``8.0;9.0a``, ``8.6+PTX``, spaces or commas) as cubin names
    (``sm_80``, ``sm_90a``); the PTX of ``+PTX`` entries is not checked."""
    raw = value if value is not None else os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    raw = raw.strip() or DEFAULT_ARCH_LIST
    archs = []
    for tok in re.split(r"[;,\s]+", raw):
        if not tok:
            continue
        m = re.fullmatch(r"(\d+)\.(\d+)([a-z]?)(\+PTX)?", tok)
        if not m:
            raise ValueError(
                f"TORCH_CUDA_ARCH_LIST entry {tok!r} is not of the form 8.0, 9.0a or 8.6+PTX"
            )
        name = f"sm_{m.group(1)}{m.group(2)}{m.group(3)}"
        if name not in archs:
            archs.append(name)
    return archs


def tool(name: str) -> str:
    """Path of a CUDA binary tool shipped in Triton's wheel (raises FileNotFoundError)."""
    spec = importlib.util.find_spec("triton")
    if spec is None or not spec.origin:
        raise FileNotFoundError(f"{name}: triton is not installed (its wheel ships {name})")
    path = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / name
    if not path.is_file():
        raise FileNotFoundError(f"{name}: not found at {path}")
    return str(path)


def demangler() -> str:
    path = shutil.which("c++filt")
    if path is None:
        raise FileNotFoundError("c++filt (binutils) not found: needed to demangle kernel names")
    return path


# ---------------------------------------------------------------------------------------------
# reading the binary


def dump(so_path: str) -> str:
    """Resource usage and SASS of every cubin in the library, in one cuobjdump run."""
    res = subprocess.run(
        [tool("cuobjdump"), "-res-usage", "-sass", so_path],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        raise RuntimeError(f"cuobjdump failed on {so_path}: {res.stderr.strip()[:500]}")
    return res.stdout


_INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?\w+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)")
_RES_FUNCTION = re.compile(r"^\s*Function (\S+):\s*$")
_SASS_FUNCTION = re.compile(r"^\s*Function : (\S+)\s*$")
_FIELD = re.compile(r"([A-Z]+(?:\[\d+\])?):(\d+)")


def access_bits(opcode: str) -> int:
    """Width of a memory instruction from its numeric modifier (``LDG.E.128`` -> 128; 32 when it
    has none).  Modifiers with digits among letters (``LTC128B``, an L2 prefetch hint) are not
    widths."""
    widths = [int(m) for m in opcode.split(".")[1:] if m.isdigit()]
    return max(widths) if widths else 32


def _sass_stats(opcodes: list[str]) -> dict:
    heads = [op.split(".")[0] for op in opcodes]
    return {
        "lmem_insts": sum(h in ("LDL", "STL") for h in heads),
        "ld128": sum(h == "LDG" and access_bits(op) >= 128 for h, op in zip(heads, opcodes)),
        "st128": sum(h == "STG" and access_bits(op) >= 128 for h, op in zip(heads, opcodes)),
        "global_ops": sorted({op for h, op in zip(heads, opcodes) if h in ("LDG", "STG")}),
        "hmma": sum(h == "HMMA" for h in heads),
        "hgmma": sum(h == "HGMMA" for h in heads),
    }


def parse_dump(text: str) -> list[Kernel]:
    """Kernels of ``cuobjdump -res-usage -sass`` output, one per (architecture, mangled name)."""
    kernels: dict[tuple[str, str], Kernel] = {}
    # one section per cubin ("Fatbin elf code:"); PTX sections carry no SASS
    for section in re.split(r"^Fatbin (?=\w+ code:)", text, flags=re.M)[1:]:
        if not section.startswith("elf code:"):
            continue
        m = re.search(r"^arch = (sm_\w+)", section, flags=re.M)
        if not m:
            continue
        arch = m.group(1)
        resources: dict[str, dict] = {}
        sass: dict[str, list[str]] = {}
        current_res = None
        current_sass = None
        for line in section.splitlines():
            if m := _RES_FUNCTION.match(line):
                current_res, current_sass = m.group(1), None
                continue
            if m := _SASS_FUNCTION.match(line):
                current_sass, current_res = m.group(1), None
                sass[current_sass] = []
                continue
            if current_res is not None and "REG:" in line:
                resources[current_res] = {k: int(v) for k, v in _FIELD.findall(line)}
                current_res = None
                continue
            if current_sass is not None and (m := _INSTRUCTION.match(line)):
                sass[current_sass].append(m.group(1))
        for name in resources.keys() | sass.keys():
            r = resources.get(name, {})
            s = _sass_stats(sass.get(name, []))
            k = kernels.get((arch, name))
            if k is None:
                k = kernels[(arch, name)] = Kernel(arch, name, ld128=s["ld128"], st128=s["st128"])
            else:  # the same kernel in another cubin (another source file): keep the worst
                k.ld128 = min(k.ld128, s["ld128"])
                k.st128 = min(k.st128, s["st128"])
            k.instances += 1
            k.regs = max(k.regs, r.get("REG", 0))
            k.stack = max(k.stack, r.get("STACK", 0))
            k.local = max(k.local, r.get("LOCAL", 0))
            k.shared = max(k.shared, r.get("SHARED", 0))
            k.lmem_insts = max(k.lmem_insts, s["lmem_insts"])
            k.hmma = max(k.hmma, s["hmma"])
            k.hgmma = max(k.hgmma, s["hgmma"])
            k.global_ops = sorted(set(k.global_ops) | set(s["global_ops"]))
    return sorted(kernels.values(), key=lambda k: (k.arch, k.mangled))


def demangle(names: list[str]) -> dict[str, str]:
    """Demangled names, one ``c++filt`` run for all."""
    if not names:
        return {}
    out = subprocess.run(
        [demangler()], input="\n".join(names) + "\n", capture_output=True, text=True, check=True
    ).stdout.splitlines()
    if len(out) != len(names):
        raise RuntimeError(f"c++filt returned {len(out)} lines for {len(names)} names")
    return dict(zip(names, out))


# ---------------------------------------------------------------------------------------------
# names


def _closing(s: str, i: int) -> int:
    """Index of the bracket closing the one at ``s[i]`` (``<``/``(``), or -1."""
    depth = 0
    for j in range(i, len(s)):
        c = s[j]
        if c in "<(":
            depth += 1
        elif c in ">)":
            depth -= 1
            if depth == 0:
                return j
    return -1


def _split_args(s: str) -> list[str]:
    """Top-level comma-separated arguments of a template argument list (without the brackets)."""
    args, depth, start = [], 0, 0
    for j, c in enumerate(s):
        if c in "<(":
            depth += 1
        elif c in ">)":
            depth -= 1
        elif c == "," and depth == 0:
            args.append(s[start:j].strip())
            start = j + 1
    args.append(s[start:].strip())
    return args


def qualified_name(demangled: str) -> str:
    """The function's name with its template arguments: no return type, no parameter list."""
    s = demangled.strip()
    s = s.removeprefix("void ")
    if s.endswith(")"):  # drop the parameter list: the parenthesis matching the last one
        depth = 0
        for j in range(len(s) - 1, -1, -1):
            if s[j] == ")":
                depth += 1
            elif s[j] == "(":
                depth -= 1
                if depth == 0:
                    s = s[:j]
                    break
    return s.strip()


def classify(demangled: str) -> str:
    """``own`` for functions in namespace moe_kernels, ``cub`` for CUB's, ``other`` otherwise (a
    CUB kernel instantiated on one of our functors is CUB's)."""
    q = qualified_name(demangled)
    if q.startswith("moe_kernels::"):
        return "own"
    if q.startswith("cub::") or "cub::" in q.split("<")[0]:
        return "cub"
    return "other"


def short_name(demangled: str, width: int = 90) -> str:
    """``PermuteRows<16>`` for ``void moe_kernels::cuda::kernel_entry<...PermuteRows<16> >(...)``;
    other kernels: the qualified name; ``moe_kernels::`` and CUB's versioned inline namespace left
    out, truncated to ``width``."""
    q = qualified_name(demangled)
    m = re.match(r"moe_kernels::cuda::kernel_entry<", q)
    if m:
        end = _closing(q, m.end() - 1)
        if end == len(q) - 1:
            q = q[m.end() : end].strip()
    q = q.replace("moe_kernels::cuda::", "").replace("moe_kernels::", "")
    q = re.sub(r"\bCUB_\d+_SM_[0-9_]+::", "", q)
    q = re.sub(r"\s+>", ">", q)
    return q if len(q) <= width else q[: width - 3] + "..."


def _int_arg(arg: str) -> int | None:
    """A template argument as an integer: ``16``, ``16u``, ``16ul``, ``(unsigned char)16``."""
    m = re.fullmatch(r"(?:\([\w\s]+\))?\s*(-?\d+)[uUlL]*", arg.strip())
    return int(m.group(1)) if m else None


def functor_args(demangled: str, functor: str) -> list[str] | None:
    """Template arguments of the first ``functor<...>`` in the name (not ``Unfunctor<``)."""
    m = re.search(r"(?<![A-Za-z0-9_])" + re.escape(functor) + "<", demangled)
    if not m:
        return None
    end = _closing(demangled, m.end() - 1)
    if end < 0:
        return None
    return _split_args(demangled[m.end() : end])


def rule_matches(rule: VecRule, demangled: str) -> bool:
    args = functor_args(demangled, rule.functor)
    return bool(args) and _int_arg(args[-1]) == rule.vec_bytes


_TC_TAG = re.compile(r"moe_kernels::cuda::tc::(\w+)_kernel\b")


def tc_name(demangled: str) -> str | None:
    """The instantiation name of a CUTLASS grouped GEMM kernel (``sm90_bf16_nn`` for
    ``cutlass::device_kernel<moe_kernels::cuda::tc::sm90_bf16_nn_kernel>(...)``), else None."""
    m = _TC_TAG.search(demangled)
    return m.group(1) if m else None


def dispatcher_tc_kernels() -> list[tuple[str, int]] | None:
    """(name, sm) of every CUTLASS instantiation the installed extension's dispatcher can select,
    or None when the extension does not load."""
    try:
        import importlib

        ext = importlib.import_module(EXTENSION)
    except Exception:
        return None
    return [(name, sm) for name, sm, *_ in ext.tc_kernels()]


def check_tc(
    kernels: list[Kernel], archs: list[str], selectable: list[tuple[str, int]]
) -> list[str]:
    """The tensor-core rules: every selectable instantiation is in the binary with its matrix
    instructions, and nothing else is."""
    problems = []
    listed = {name for name, _ in selectable}
    built: dict[str, dict[str, Kernel]] = {}
    for k in kernels:
        name = tc_name(k.name or k.mangled)
        if name is not None:
            built.setdefault(name, {})[k.arch] = k
    for name in sorted(built.keys() - listed):
        problems.append(
            f"CUTLASS instantiation {name} is built but the dispatcher cannot select it"
        )
    present = sorted({k.arch for k in kernels})
    for name, sm in selectable:
        for arch in sorted(set(archs) | set(present)):
            needs = "HGMMA" if sm >= 90 else "HMMA"
            if sm >= 90 and arch != "sm_90a":
                continue  # wgmma exists on sm_90a only; other cubins hold a stub
            k = built.get(name, {}).get(arch)
            if k is None:
                problems.append(f"{arch}: the dispatcher can select {name} but the binary lacks it")
                continue
            if (k.hgmma if needs == "HGMMA" else k.hmma) == 0:
                k.problems.append(f"no {needs} instruction in tensor-core kernel {name}")
    return problems


# ---------------------------------------------------------------------------------------------
# the checks


def check(
    kernels: list[Kernel], archs: list[str], rules: tuple[VecRule, ...] = VEC128_RULES
) -> list[str]:
    """Fill each kernel's problems / notes; return the problems not tied to one kernel."""
    problems = []
    present = sorted({k.arch for k in kernels})
    for arch in archs:
        if arch not in present:
            problems.append(f"no {arch} cubin (TORCH_CUDA_ARCH_LIST asks for {', '.join(archs)})")
    for k in kernels:
        if not k.kind:
            k.kind = classify(k.name or k.mangled)
        lmem = f"local {k.local} B, {k.lmem_insts} LDL/STL instructions"
        if k.kind == "own":
            if k.stack or k.local or k.lmem_insts:
                k.problems.append(f"stack {k.stack} B / local memory in our kernel ({lmem})")
        else:
            if k.local or k.lmem_insts:
                k.problems.append(f"spills: local memory in a {k.kind} kernel ({lmem})")
            elif k.stack:
                k.notes.append(f"stack frame {k.stack} B without local-memory instructions")
    for arch in sorted(set(archs) | set(present)):
        for rule in rules:
            matched = [
                k
                for k in kernels
                if k.arch == arch and k.kind == "own" and rule_matches(rule, k.name or k.mangled)
            ]
            if not matched:
                problems.append(
                    f"{arch}: rule {rule.describe()} matches no kernel (renamed or not built?)"
                )
            for k in matched:
                ops = ", ".join(k.global_ops) or "none"
                if rule.load and k.ld128 == 0:
                    k.problems.append(f"no 128-bit global load (LDG.E.128 or wider; has {ops})")
                if rule.store and k.st128 == 0:
                    k.problems.append(f"no 128-bit global store (STG.E.128 or wider; has {ops})")
    return problems


def gate_library(
    so_path: str,
    archs: list[str],
    rules: tuple[VecRule, ...] = VEC128_RULES,
    selectable: list[tuple[str, int]] | None = None,
) -> tuple[list[Kernel], list[str]]:
    """Dump, demangle and check one library: (kernels, problems not tied to one kernel).
    ``selectable``: the dispatcher's CUTLASS instantiations (None: no tensor-core rules)."""
    kernels = parse_dump(dump(so_path))
    names = demangle(sorted({k.mangled for k in kernels}))
    for k in kernels:
        k.name = names.get(k.mangled, k.mangled)
    problems = check(kernels, archs, rules)
    if selectable is not None:
        problems += check_tc(kernels, archs, selectable)
    if not kernels:
        problems.append(f"no kernels found in {so_path} (no embedded cubins?)")
    return kernels, problems


def run(so_path: str | None = None, arch_list: str | None = None) -> dict:
    """The CUDA part of the gate; a JSON-ready result with ``ok``, ``skipped`` and ``summary``."""
    t0 = time.time()
    result: dict = {"extension": EXTENSION, "so": so_path, "skipped": False, "problems": []}
    try:
        archs = parse_arch_list(arch_list)
    except ValueError as exc:
        result.update(ok=False, problems=[str(exc)], kernels=[])
        return result
    result["archs"] = archs
    result["rules"] = [asdict(r) for r in VEC128_RULES]
    if so_path is None:
        so_path, why = find_extension()
        result["so"] = so_path
        if so_path is None:
            required = "_C_cuda" in required_built()
            result.update(ok=not required, skipped=True, kernels=[], reason=why)
            if required:
                result["problems"].append(
                    "MOE_KERNELS_REQUIRE_BUILT names _C_cuda: it must be built"
                )
            return result
    selectable = dispatcher_tc_kernels()
    if selectable is None:
        result["problems"].append(f"{EXTENSION} does not load: the tensor-core rules cannot run")
    result["tc_kernels"] = [name for name, _ in selectable or []]
    try:
        kernels, problems = gate_library(so_path, archs, selectable=selectable or [])
    except (FileNotFoundError, RuntimeError, subprocess.CalledProcessError) as exc:
        result.update(ok=False, kernels=[], problems=[f"cannot inspect {so_path}: {exc}"])
        return result
    failed = [k for k in kernels if not k.ok]
    problems = result["problems"] + problems
    result["problems"] = problems
    result["kernels"] = [{**asdict(k), "short": k.short, "ok": k.ok} for k in kernels]
    result["ok"] = not failed and not problems
    result["summary"] = {
        "kernels": len(kernels),
        "per_arch": {
            a: sum(k.arch == a for k in kernels) for a in sorted({k.arch for k in kernels})
        },
        "own": sum(k.kind == "own" for k in kernels),
        "tensor_core": sum(tc_name(k.name) is not None for k in kernels),
        "failed": len(failed),
        "problems": len(problems),
        "seconds": round(time.time() - t0, 1),
    }
    return result


def report(result: dict, verbose: bool = True) -> str:
    """The per-kernel table and the summary line."""
    lines = []
    if result.get("skipped"):
        state = "skipped" if result["ok"] else "FAIL"
        lines.append(f"CUDA gate: {state}: {result.get('reason', '')}")
        lines += [f"  ! {p}" for p in result["problems"]]
        return "\n".join(lines)
    rows = result.get("kernels", [])
    if rows:
        hdr = (
            f"{'arch':<7}{'kind':<6}{'regs':>5}{'stack':>6}{'local':>6}{'ldl/stl':>8}"
            f"{'shared':>7}{'ld128':>6}{'st128':>6}{'mma':>6}  ok    kernel"
        )
        lines.append(f"CUDA gate: {result['so']}")
        lines.append(hdr)
        lines.append("-" * len(hdr))
        order = {"own": 0, "cub": 1, "other": 2}
        for r in sorted(rows, key=lambda r: (r["arch"], order.get(r["kind"], 3), r["short"])):
            if not verbose and r["ok"] and not r["notes"]:
                continue
            lines.append(
                f"{r['arch']:<7}{r['kind']:<6}{r['regs']:>5}{r['stack']:>6}{r['local']:>6}"
                f"{r['lmem_insts']:>8}{r['shared']:>7}{r['ld128']:>6}{r['st128']:>6}"
                f"{r.get('hmma', 0) + r.get('hgmma', 0):>6}  "
                f"{'ok  ' if r['ok'] else 'FAIL'}  {r['short']}"
            )
            lines += [f"          ! {p}" for p in r["problems"]]
            lines += [f"          ~ {n}" for n in r["notes"]]
    lines += [f"  ! {p}" for p in result["problems"]]
    s = result.get("summary")
    if s:
        per_arch = ", ".join(f"{a}: {n}" for a, n in s["per_arch"].items())
        lines.append(
            f"CUDA gate: {s['kernels']} kernels ({per_arch}; {s['own']} ours, "
            f"{s.get('tensor_core', 0)} CUTLASS tensor-core), {s['failed']} "
            f"failed, {s['problems']} other problems, {len(result['rules'])} 128-bit rules, "
            f"{s['seconds']} s: {'ok' if result['ok'] else 'FAIL'}"
        )
    else:
        lines.append(f"CUDA gate: {'ok' if result['ok'] else 'FAIL'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--so", default=None, help="a library to check instead of the installed one")
    ap.add_argument("--json", default="", help="also write the result here")
    ap.add_argument("--quiet", action="store_true", help="list only failing or noted kernels")
    args = ap.parse_args(argv)
    result = run(args.so)
    print(report(result, verbose=not args.quiet), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
