// The tensor-core grouped GEMM's dispatcher: picks a CUTLASS instantiation (csrc/cuda/cutlass/)
// for the device and operand layout, runs the device-side argument builder (kernels/tc_gemm.h)
// and then the instantiation, all on one stream with no host synchronisation.  No CUTLASS header
// here: each instantiation is its own translation unit.
#include "cuda/cutlass/tc_entry.h"
#include "cuda/exec.cuh"

namespace moe_kernels::cuda {
namespace {

struct TcEntry {
  size_t (*workspace)(int groups, int sm_count);
  cudaError_t (*run)(const tc::TcLaunch& launch);
};

#define MOE_TC_ENTRY(name, sm, dtype, layout, tile, out) \
  {&tc::tc_workspace_##name, &tc::tc_run_##name},
constexpr TcEntry kEntries[] = {MOE_TC_KERNELS(MOE_TC_ENTRY)};
#undef MOE_TC_ENTRY

}  // namespace

size_t tc_workspace_bytes(int kernel, int64_t groups, int sm_count) {
  return tc_group_arrays_bytes(groups) +
         kEntries[kernel].workspace(static_cast<int>(groups), sm_count) + kTcAlign;
}

cudaError_t launch_tc_groups(const TcGroupsParams& p, cudaStream_t stream) {
  CudaExec ex;
  ex.stream = stream;
  run_tc_groups(ex, p);
  return ex.err;
}

cudaError_t launch_tc_gemm(int kernel, TcGroupsParams p, void* workspace, size_t workspace_bytes,
                           int device, int sm_count, cudaStream_t stream) {
  if (kernel < 0 || kernel >= tc_kernel_count()) return cudaErrorInvalidValue;
  if (p.E == 0) return cudaSuccess;
  if (workspace_bytes < tc_workspace_bytes(kernel, p.E, sm_count)) return cudaErrorInvalidValue;
  char* cutlass_ws = tc_carve_group_arrays(p, workspace);
  if (cudaError_t err = launch_tc_groups(p, stream); err != cudaSuccess) return err;
  tc::TcLaunch l;
  l.groups = static_cast<int>(p.E);
  l.shapes = p.shapes;
  l.ptr_a = const_cast<void**>(p.ptr_a);
  l.ptr_b = const_cast<void**>(p.ptr_b);
  l.ptr_d = p.ptr_d;
  l.lda = p.out_lda;
  l.ldb = p.out_ldb;
  l.ldd = p.out_ldd;
  l.workspace = cutlass_ws;
  l.device = device;
  l.sm_count = sm_count;
  l.stream = stream;
  return kEntries[kernel].run(l);
}

}  // namespace moe_kernels::cuda
