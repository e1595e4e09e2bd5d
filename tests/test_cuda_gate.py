"""The static gate on the CUDA extension's binary (moe_kernels.tools.cuda_gate) can fail.

A small library compiled here with nvcc for sm_80 and sm_90a holds kernels named like the
extension's (``moe_kernels::cuda::kernel_entry<PermuteRows<16>>`` ...) with 16-byte vector copies,
one that keeps a dynamically indexed array in local memory, one named as a vectorised kernel but
copying scalars, and CUB's scan kernels.  The gate's functions must pass the good kernels and fail
the others.  No GPU is needed: the kernels are only compiled and disassembled.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from moe_kernels.tools import cuda_gate as cg
from moe_kernels.tools.cuda_gate import Kernel, VecRule

ARCHS = ["sm_80", "sm_90a"]

SOURCE = r"""
#include <cstdint>
#include <cub/device/device_scan.cuh>

namespace moe_kernels {
namespace cuda {

template <class F>
__global__ void kernel_entry(F f) { f(); }

struct Rows {
  const uint4* src; uint4* dst; const int64_t* idx; int64_t n;
  __device__ int64_t i() const { return blockIdx.x * (int64_t)blockDim.x + threadIdx.x; }
};

template <int VecBytes>
struct PermuteRows : Rows {
  __device__ void operator()() const { if (i() < n) dst[i()] = src[idx[i()]]; }
};
template <class T, int VecBytes>
struct UnpermuteRows : Rows {
  __device__ void operator()() const { if (i() < n) dst[idx[i()]] = src[i()]; }
};
template <class T, int G, int VecBytes>
struct UnpermuteGradY : Rows {
  __device__ void operator()() const { if (i() < n) dst[i()] = src[idx[i()]]; }
};
// reads 16-byte vectors, writes one float per thread
template <class T, int G, int VecBytes>
struct UnpermuteGradW : Rows {
  __device__ void operator()() const {
    if (i() < n) {
      uint4 v = src[i()];
      reinterpret_cast<float*>(dst)[i()] = __uint_as_float(v.x ^ v.y ^ v.z ^ v.w);
    }
  }
};
// named as a vectorised kernel, copies 4-byte scalars
template <int VecBytes>
struct ScalarRows {
  const float* src; float* dst; int64_t n;
  __device__ void operator()() const {
    int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (i < n) dst[i] = src[i];
  }
};
// an array indexed by data: it lives in local memory
struct LocalScratch {
  const int* in; int* out; int n;
  __device__ void operator()() const {
    int buf[64];
    for (int j = 0; j < 64; ++j) buf[j] = in[j * n + threadIdx.x];
    for (int j = 0; j < n; ++j) buf[in[j] & 63] += in[j + n];
    out[threadIdx.x] = buf[in[threadIdx.x + n] & 63];
  }
};

template __global__ void kernel_entry<PermuteRows<16>>(PermuteRows<16>);
template __global__ void kernel_entry<UnpermuteRows<float, 16>>(UnpermuteRows<float, 16>);
template __global__ void kernel_entry<UnpermuteGradY<float, 2, 16>>(UnpermuteGradY<float, 2, 16>);
template __global__ void kernel_entry<UnpermuteGradW<float, 2, 16>>(UnpermuteGradW<float, 2, 16>);
template __global__ void kernel_entry<ScalarRows<16>>(ScalarRows<16>);
template __global__ void kernel_entry<LocalScratch>(LocalScratch);

}  // namespace cuda
}  // namespace moe_kernels

void scan(const int* in, int* out, int n, void* tmp, size_t& bytes) {
  cub::DeviceScan::ExclusiveSum(tmp, bytes, in, out, n);
}
"""


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """Path of the compiled test library (one nvcc run for the module)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found: cannot compile the test kernels")
    try:
        cg.tool("cuobjdump")
        cg.demangler()
    except FileNotFoundError as exc:
        pytest.skip(f"the gate's tools are missing: {exc}")
    d = tmp_path_factory.mktemp("cuda_gate")
    (d / "k.cu").write_text(SOURCE)
    cmd = [nvcc, "-shared", "-Xcompiler", "-fPIC", "-o", str(d / "k.so"), str(d / "k.cu")]
    for arch in ("80", "90a"):
        cmd += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    return str(d / "k.so")


@pytest.fixture
def kernels(library):
    """Freshly parsed and demangled kernels (checks write into them)."""
    ks = cg.parse_dump(cg.dump(library))
    names = cg.demangle([k.mangled for k in ks])
    for k in ks:
        k.name = names[k.mangled]
    return ks


def _by_short(ks, short):
    found = [k for k in ks if k.short == short]
    assert sorted(k.arch for k in found) == ARCHS, (short, [k.short for k in ks])
    return found


def test_good_kernels_pass(kernels):
    good = [k for k in kernels if k.short not in ("LocalScratch",)]
    problems = cg.check(good, ARCHS)
    assert problems == []
    assert [(k.arch, k.short, k.problems) for k in good if not k.ok] == []
    for short in ("PermuteRows<16>", "UnpermuteRows<float, 16>", "UnpermuteGradY<float, 2, 16>"):
        for k in _by_short(good, short):
            assert k.kind == "own" and k.ld128 > 0 and k.st128 > 0, k
    for k in _by_short(good, "UnpermuteGradW<float, 2, 16>"):
        assert k.ld128 > 0 and k.st128 == 0, k
    cub = [k for k in good if k.kind == "cub"]
    assert {k.arch for k in cub} == set(ARCHS)
    assert any("DeviceScanKernel" in k.short and k.shared > 0 for k in cub)


def test_local_memory_fails(kernels):
    cg.check(kernels, ARCHS)
    for k in _by_short(kernels, "LocalScratch"):
        assert k.stack > 0 and k.lmem_insts > 0, k
        assert not k.ok and "local memory" in k.problems[0], k.problems
    assert [k.short for k in kernels if not k.ok] == ["LocalScratch"] * 2


def test_missing_128bit_access_fails(kernels):
    rule = VecRule("ScalarRows", 16, load=True, store=True)
    assert cg.check(kernels, ARCHS, (rule,)) == []
    for k in _by_short(kernels, "ScalarRows<16>"):
        assert k.ld128 == 0 and k.st128 == 0, k
        assert any("no 128-bit global load" in p for p in k.problems), k.problems
        assert any("no 128-bit global store" in p for p in k.problems), k.problems


def test_rule_matching_nothing_fails(kernels):
    rule = VecRule("RenamedRows", 16, load=True, store=False)
    problems = cg.check(kernels, ARCHS, (rule,))
    assert len(problems) == 2 and all("matches no kernel" in p for p in problems), problems
    # a rule on the vector width: PermuteRows<8> was not built
    problems = cg.check(kernels, ARCHS, (VecRule("PermuteRows", 8, True, True),))
    assert len(problems) == 2, problems


def test_missing_arch_fails(kernels):
    sm80 = [k for k in kernels if k.arch == "sm_80"]
    problems = cg.check(sm80, ARCHS, ())
    assert problems == ["no sm_90a cubin (TORCH_CUDA_ARCH_LIST asks for sm_80, sm_90a)"]


def test_run_on_library(library):
    result = cg.run(library, "8.0;9.0a")
    assert not result["ok"] and not result["skipped"]
    json.dumps(result)  # the gate writes it as JSON
    failed = sorted((r["arch"], r["short"]) for r in result["kernels"] if not r["ok"])
    assert failed == [("sm_80", "LocalScratch"), ("sm_90a", "LocalScratch")]
    row = next(r for r in result["kernels"] if r["short"] == "PermuteRows<16>")
    assert {"regs", "stack", "local", "shared", "arch", "name", "mangled"} <= row.keys()
    assert "FAIL  LocalScratch" in cg.report(result)


# --- the rules on names and instructions (no compiler needed) -----------------------------------


def test_arch_list():
    assert cg.parse_arch_list("") == ["sm_80", "sm_90a"]
    assert cg.parse_arch_list("8.0;8.6+PTX 9.0a,9.0") == ["sm_80", "sm_86", "sm_90a", "sm_90"]
    with pytest.raises(ValueError):
        cg.parse_arch_list("Ampere")


def test_required_built():
    assert cg.required_built("_C, moe_kernels._C_cuda") == {"_C", "_C_cuda"}
    assert cg.required_built("") == set()


def test_access_width():
    assert cg.access_bits("LDG.E.128") == 128
    assert cg.access_bits("LDG.E.128.CONSTANT") == 128
    assert cg.access_bits("LDG.E.ENL2.256") == 256
    assert cg.access_bits("LDG.E.LTC128B") == 32  # an L2 prefetch hint, not a width
    assert cg.access_bits("STG.E.64") == 64


def test_names():
    own = (
        "void moe_kernels::cuda::kernel_entry<moe_kernels::cuda::UnpermuteGradW<moe_kernels::"
        "bf16_t, float, 16u> >(moe_kernels::cuda::UnpermuteGradW<moe_kernels::bf16_t, float, 16u>)"
    )
    assert cg.classify(own) == "own"
    assert cg.short_name(own) == "UnpermuteGradW<bf16_t, float, 16u>"
    assert cg.rule_matches(VecRule("UnpermuteGradW", 16, True, False), own)
    assert not cg.rule_matches(VecRule("UnpermuteGradW", 8, True, False), own)
    # UnpermuteRows is not PermuteRows
    unp = "void moe_kernels::cuda::kernel_entry<moe_kernels::cuda::UnpermuteRows<float, 16> >(x)"
    assert not cg.rule_matches(VecRule("PermuteRows", 16, True, True), unp)
    cub = (
        "void cub::CUB_300001_SM_800_900::detail::scan::DeviceScanInitKernel<"
        "moe_kernels::cuda::Foo>(int)"
    )
    assert cg.classify(cub) == "cub"
    assert cg.short_name(cub) == "cub::detail::scan::DeviceScanInitKernel<Foo>"
    assert cg.classify("void at::native::foo<float>(float*)") == "other"


def test_third_party_stack_is_reported_spills_fail():
    stack_only = Kernel("sm_80", "a", name="void cub::K<int>(int)", stack=16)
    spills = Kernel("sm_80", "b", name="void cub::K<long>(long)", stack=16, lmem_insts=4)
    own = Kernel("sm_80", "c", name="void moe_kernels::cuda::kernel_entry<X>(X)", stack=16)
    cg.check([stack_only, spills, own], ["sm_80"], ())
    assert stack_only.ok and stack_only.notes
    assert not spills.ok and "spills" in spills.problems[0]
    assert not own.ok


def test_absent_extension(monkeypatch):
    monkeypatch.setattr(cg, "find_extension", lambda: (None, "not built (test)"))
    monkeypatch.setenv("MOE_KERNELS_REQUIRE_BUILT", "_C")
    result = cg.run(None, "8.0;9.0a")
    assert result["skipped"] and result["ok"]
    monkeypatch.setenv("MOE_KERNELS_REQUIRE_BUILT", "_C,_C_cuda")
    result = cg.run(None, "8.0;9.0a")
    assert result["skipped"] and not result["ok"] and result["problems"]


# --- the tensor-core (CUTLASS) rules -------------------------------------------------------------


def _tc(arch, name, hmma=0, hgmma=0):
    demangled = f"void cutlass::device_kernel<moe_kernels::cuda::tc::{name}_kernel>(P)"
    return Kernel(arch, name, name=demangled, hmma=hmma, hgmma=hgmma)


SELECTABLE = [("sm80_bf16_nn", 80), ("sm90_bf16_nn", 90)]


def _good_tc():
    return [
        _tc("sm_80", "sm80_bf16_nn", hmma=64),
        _tc("sm_90a", "sm80_bf16_nn", hmma=64),
        _tc("sm_80", "sm90_bf16_nn"),  # the stub of an sm_90a-only kernel
        _tc("sm_90a", "sm90_bf16_nn", hgmma=8),
    ]


def test_tc_rules_pass_good_kernels():
    ks = _good_tc()
    assert cg.check_tc(ks, ARCHS, SELECTABLE) == []
    assert all(k.ok for k in ks)
    assert cg.tc_name(ks[0].name) == "sm80_bf16_nn"
    assert cg.tc_name("void moe_kernels::cuda::kernel_entry<X>(X)") is None


def test_tc_rules_fail():
    ks = _good_tc()
    ks[3].hgmma = 0  # wgmma compiled out (e.g. built for compute_90 instead of 90a)
    ks[1].hmma = 0
    assert cg.check_tc(ks, ARCHS, SELECTABLE) == []
    assert not ks[3].ok and "HGMMA" in ks[3].problems[0]
    assert not ks[1].ok and "HMMA" in ks[1].problems[0]
    missing = [k for k in _good_tc() if not (k.arch == "sm_90a" and k.mangled == "sm80_bf16_nn")]
    assert cg.check_tc(missing, ARCHS, SELECTABLE) == [
        "sm_90a: the dispatcher can select sm80_bf16_nn but the binary lacks it"
    ]
    extra = _good_tc() + [_tc("sm_80", "sm80_f16_tn", hmma=4)]
    problems = cg.check_tc(extra, ARCHS, SELECTABLE)
    assert problems == [
        "CUTLASS instantiation sm80_f16_tn is built but the dispatcher cannot select it"
    ]


def test_dispatcher_set_is_the_gated_set():
    """The CUTLASS instantiations the dispatcher can select (_C_cuda.tc_kernels(), each one chosen
    by tc_select for some device, dtype and layout) are exactly those the gate finds in the
    installed binary, each with its matrix instructions."""
    so, why = cg.find_extension()
    if so is None:
        pytest.skip(why)
    ext = pytest.importorskip("moe_kernels._C_cuda")
    listed = {name for name, *_ in ext.tc_kernels()}
    chosen = set()
    for cc in (80, 86, 89, 90):
        for dtype in (0, 1, 2):
            for layout in (0, 1, 2):
                for tile in (0, 1):
                    i = ext.tc_select(cc, dtype, layout, tile)
                    assert i >= 0, (cc, dtype, layout, tile)
                    chosen.add(ext.tc_kernels()[i][0])
                    j = ext.tc_select(cc, dtype, layout, tile, 1)  # fp32 output: some only
                    if j >= 0:
                        assert ext.tc_kernels()[j][5] == 1 and dtype != 0
                        chosen.add(ext.tc_kernels()[j][0])
    assert ext.tc_select(75, 1, 0) == -1 and ext.tc_select(100, 1, 0) == -1
    assert chosen == listed, "an instantiation no device / dtype / layout selects"
    kernels, problems = cg.gate_library(so, ARCHS, selectable=cg.dispatcher_tc_kernels())
    in_binary = {cg.tc_name(k.name) for k in kernels} - {None}
    assert in_binary == listed
    assert problems == [] or not any("CUTLASS" in p or "lacks" in p for p in problems), problems
    for k in kernels:
        if cg.tc_name(k.name) is not None:
            assert k.ok, (k.arch, k.name, k.problems)
