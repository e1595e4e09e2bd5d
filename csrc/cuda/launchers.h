#pragma once
// Raw-pointer launchers of the CUDA kernels (csrc/cuda/*.cu), called by the torch bindings
// (bindings.cpp).  No torch header here or in the .cu files: each costs tens of seconds of nvcc.
#if defined(MOE_KERNELS_CUDA_EMULATION)
// tests/cpp/cuda_emulator.cpp: the same launchers run the kernel bodies on the CPU.
enum cudaError_t : int { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorLaunchFailure = 4 };
using cudaStream_t = void*;
const char* cudaGetErrorString(cudaError_t err);
#else
#include <cuda_runtime_api.h>
#endif

#include <cstddef>
#include <cstdint>

#include "cuda/kernels/dispatch.h"

namespace moe_kernels::cuda {

// Largest grid the launchers use; the kernels loop over the rest (grid-stride).
constexpr int64_t kMaxBlocks = 65535;

cudaError_t launch_topk_gating(FloatType in, const GatingParams& p, cudaStream_t stream);
cudaError_t launch_topk_gating_backward(FloatType in, const GatingBackwardParams& p,
                                        cudaStream_t stream);

// Bytes of device scratch CUB's scan needs for route over n = E * ceil(TK / 256) counts.
size_t route_scan_temp_bytes(int64_t n);
cudaError_t launch_route(const RouteParams& p, void* scan_temp, size_t scan_temp_bytes,
                         cudaStream_t stream);

// unit_bytes: 16 (vectorised rows) or the element size (1, 2, 4, 8; element-wise rows).
cudaError_t launch_permute(int unit_bytes, const PermuteParams& p, cudaStream_t stream);
cudaError_t launch_unpermute(FloatType t, bool vec, const UnpermuteParams& p, cudaStream_t stream);
// g: grad_out's type, t's or kF32.
cudaError_t launch_unpermute_backward(FloatType t, FloatType g, bool vec,
                                      const UnpermuteBackwardParams& p, bool need_grad_y,
                                      bool need_grad_w, cudaStream_t stream);

// The exact grouped GEMM path (kernels/grouped_gemm.h): a, b and out of one float type t.
cudaError_t launch_segment_gemm(FloatType t, GemmTypes types, const SegmentGemmParams& p,
                                cudaStream_t stream);
cudaError_t launch_ragged_k(FloatType t, GemmTypes types, const RaggedKParams& p,
                            cudaStream_t stream);

// The tensor-core grouped GEMM (csrc/cuda/tc_gemm.cu; kernels/tc_gemm.h says how a launch is
// described and which instantiation tc_select picks).  workspace: tc_workspace_bytes(kernel,
// p.E, sm_count) bytes of device memory, 256-byte aligned; p's output arrays are placed in it.
size_t tc_workspace_bytes(int kernel, int64_t groups, int sm_count);
cudaError_t launch_tc_gemm(int kernel, TcGroupsParams p, void* workspace, size_t workspace_bytes,
                           int device, int sm_count, cudaStream_t stream);
// The argument builder alone (its output arrays set in p), for the tests.
cudaError_t launch_tc_groups(const TcGroupsParams& p, cudaStream_t stream);

// moe_ffn's element-wise kernels (kernels/expert_ffn.h); sums: ExpertColumnSum's output.
cudaError_t launch_expert_elementwise(ExpertOp op, FloatType t, const ExpertEltParams& p,
                                      void* sums, cudaStream_t stream);

#if defined(MOE_KERNELS_CUDA_EMULATION)
// Grid cap of the emulated launches (small, so grid-stride loops run more than once).
void emu_set_max_blocks(int64_t n);
#endif

}  // namespace moe_kernels::cuda
