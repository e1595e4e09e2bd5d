#pragma once
// The CUTLASS grouped GEMM templates behind tc_entry.h.  Each csrc/cuda/cutlass/<name>.cu
// instantiates one with MOE_TC_DEFINE_SM80 / MOE_TC_DEFINE_SM90, which also derives a kernel type
// named <name>_kernel from CUTLASS's: that name appears in the binary's kernel symbols, so the
// gate can find every instantiation the dispatcher may select.
//
//   sm_80 (Ampere, also run on Ada and Hopper for tf32): CUTLASS 2.x grouped GEMM
//     (DefaultGemmGrouped + device::GemmGrouped), the problem sizes read on the device
//     (GroupScheduleMode::kDeviceOnly), mma.sync tensor cores, 128 x 128 tiles, multistage
//     cp.async.
//   sm_90a (Hopper): CUTLASS 3.x pointer-array grouped GEMM (GroupProblemShape, TMA loads,
//     warp-specialised cooperative (prefill) or ping-pong (decode) kernels, wgmma), problem
//     shapes on the device only.
// Neither needs the problem sizes on the host, so nothing synchronises and the launch can be
// captured in a CUDA graph.  The epilogue scales by alpha = 1 only: no source operand is read.
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/thread/linear_combination.h>
#include <cutlass/gemm/device/gemm_grouped.h>
#include <cutlass/gemm/kernel/default_gemm_grouped.h>

#if defined(MOE_TC_SM90)
#include <cutlass/gemm/device/gemm_universal_adapter.h>

#include <cute/tensor.hpp>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/group_array_problem_shape.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#endif

#include "cuda/cutlass/tc_entry.h"

namespace moe_kernels::cuda::tc {

template <int L>
struct Layouts;
template <>
struct Layouts<0> {
  using A = cutlass::layout::RowMajor;
  using B = cutlass::layout::RowMajor;
};
template <>
struct Layouts<1> {
  using A = cutlass::layout::RowMajor;
  using B = cutlass::layout::ColumnMajor;
};
template <>
struct Layouts<2> {
  using A = cutlass::layout::ColumnMajor;
  using B = cutlass::layout::RowMajor;
};

inline cudaError_t to_cuda_error(cutlass::Status s) {
  if (s == cutlass::Status::kSuccess) return cudaSuccess;
  const cudaError_t last = cudaGetLastError();
  return last != cudaSuccess ? last : cudaErrorInvalidValue;
}

// ---------------------------------------------------------------------------------------------
// sm_80: CUTLASS 2.x
// ---------------------------------------------------------------------------------------------
// tile 0 (prefill): 128 x 128 blocks of 4 warps of 64 x 64; tile 1 (decode, few rows per
// expert): 64 x 128 blocks of 4 warps of 32 x 64, half the wasted rows of a short segment (not
// instantiated for sm_80 at present: the instantiation budget goes to the fp32-output kernels).
template <class Element, int L, int TileId, class ElementD = Element>
struct Sm80Config {
  static constexpr bool kTf32 = std::is_same_v<Element, float>;
  static constexpr int kAlign = 128 / cutlass::sizeof_bits<Element>::value;
  static constexpr int kAlignD = 128 / cutlass::sizeof_bits<ElementD>::value;
  static constexpr int kM = TileId == 1 ? 64 : 128, kWM = TileId == 1 ? 32 : 64;
  using Tile = std::conditional_t<kTf32, cutlass::gemm::GemmShape<kM, 128, 16>,
                                  cutlass::gemm::GemmShape<kM, 128, 32>>;
  using Warp = std::conditional_t<kTf32, cutlass::gemm::GemmShape<kWM, 64, 16>,
                                  cutlass::gemm::GemmShape<kWM, 64, 32>>;
  using Instr = std::conditional_t<kTf32, cutlass::gemm::GemmShape<16, 8, 8>,
                                   cutlass::gemm::GemmShape<16, 8, 16>>;
  using Epilogue = cutlass::epilogue::thread::LinearCombination<
      ElementD, kAlignD, float, float, cutlass::epilogue::thread::ScaleType::OnlyAlphaScaling>;
  using Kernel = typename cutlass::gemm::kernel::DefaultGemmGrouped<
      Element, typename Layouts<L>::A, cutlass::ComplexTransform::kNone, kAlign, Element,
      typename Layouts<L>::B, cutlass::ComplexTransform::kNone, kAlign, ElementD,
      cutlass::layout::RowMajor, float, cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80, Tile,
      Warp, Instr, Epilogue, cutlass::gemm::threadblock::GemmBatchedIdentityThreadblockSwizzle,
      kTf32 ? 3 : 4, cutlass::gemm::kernel::GroupScheduleMode::kDeviceOnly>::GemmKernel;
};

template <class KernelT>
size_t sm80_workspace(int, int) {
  return 0;
}

template <class KernelT>
cudaError_t sm80_run(const TcLaunch& l) {
  using Gemm = cutlass::gemm::device::GemmGrouped<KernelT>;
  using E = typename Gemm::ElementA;
  using D = typename Gemm::ElementC;
  if (l.groups <= 0) return cudaSuccess;
  // resident blocks per SM: an occupancy query, made once per process and kernel
  static const int per_sm = Gemm::maximum_active_blocks();
  if (per_sm <= 0) return cudaErrorInvalidConfiguration;
  typename Gemm::EpilogueOutputOp::Params epilogue(1.0f, 0.0f);
  static_assert(sizeof(cutlass::gemm::GemmCoord) == 3 * sizeof(int32_t));
  typename Gemm::Arguments args(reinterpret_cast<cutlass::gemm::GemmCoord*>(l.shapes), l.groups,
                                per_sm * l.sm_count, epilogue, reinterpret_cast<E**>(l.ptr_a),
                                reinterpret_cast<E**>(l.ptr_b), reinterpret_cast<D**>(l.ptr_d),
                                reinterpret_cast<D**>(l.ptr_d), l.lda, l.ldb, l.ldd, l.ldd,
                                nullptr);
  Gemm gemm;
  cutlass::Status s = gemm.initialize(args, l.workspace, l.stream);
  if (s == cutlass::Status::kSuccess) s = gemm.run(l.stream);
  return to_cuda_error(s);
}

#define MOE_TC_DEFINE_SM80(name, Element, layout, tile, ElementD)                \
  struct name##_kernel : Sm80Config<Element, layout, tile, ElementD>::Kernel {}; \
  size_t tc_workspace_##name(int groups, int sm_count) {                         \
    return sm80_workspace<name##_kernel>(groups, sm_count);                      \
  }                                                                              \
  cudaError_t tc_run_##name(const TcLaunch& l) { return sm80_run<name##_kernel>(l); }

// ---------------------------------------------------------------------------------------------
// sm_90a: CUTLASS 3.x
// ---------------------------------------------------------------------------------------------
#if defined(MOE_TC_SM90)
// tile 0 (prefill): 128 x 128 x 64, cooperative (two consumer warp groups share each tile);
// tile 1 (decode): 64 x 128 x 64, ping-pong (the two consumer warp groups alternate tiles).
template <class Element, int L, int TileId, class ElementD = Element>
struct Sm90Config {
  static constexpr int kAlign = 128 / cutlass::sizeof_bits<Element>::value;
  static constexpr int kAlignD = 128 / cutlass::sizeof_bits<ElementD>::value;
  static constexpr bool kPingpong = TileId == 1;
  using Problem = cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;
  using Tile = std::conditional_t<kPingpong, cute::Shape<cute::_64, cute::_128, cute::_64>,
                                  cute::Shape<cute::_128, cute::_128, cute::_64>>;
  using EpilogueSchedule =
      std::conditional_t<kPingpong, cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong,
                         cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative>;
  using KernelSchedule =
      std::conditional_t<kPingpong, cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpong,
                         cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative>;
  using Cluster = cute::Shape<cute::_1, cute::_1, cute::_1>;
  using LayoutD = cutlass::layout::RowMajor;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Tile, Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, ElementD, LayoutD*, kAlignD,
      ElementD, LayoutD*, kAlignD, EpilogueSchedule,
      cutlass::epilogue::fusion::LinearCombination<ElementD, float>>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, typename Layouts<L>::A*, kAlign,
      Element, typename Layouts<L>::B*, kAlign, float, Tile, Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename Epilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Problem, Mainloop, Epilogue>;
};

template <class KernelT>
typename cutlass::gemm::device::GemmUniversalAdapter<KernelT>::Arguments sm90_args(
    const TcLaunch& l) {
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<KernelT>;
  using E = typename Gemm::ElementA;
  using StrideA = typename KernelT::InternalStrideA;
  using StrideB = typename KernelT::InternalStrideB;
  using StrideD = typename KernelT::InternalStrideD;
  using D = typename Gemm::ElementD;
  // the builder writes one int64 leading dimension per group; these stride types hold exactly
  // that (their other modes are compile-time 1 and 0)
  static_assert(sizeof(StrideA) == sizeof(int64_t) && sizeof(StrideB) == sizeof(int64_t) &&
                sizeof(StrideD) == sizeof(int64_t));
  using Shape = typename KernelT::ProblemShape::UnderlyingProblemShape;
  static_assert(sizeof(Shape) == 3 * sizeof(int32_t));
  cutlass::KernelHardwareInfo hw;
  hw.device_id = l.device;
  hw.sm_count = l.sm_count;
  typename Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGrouped,
      {l.groups, reinterpret_cast<Shape*>(l.shapes), nullptr},
      {static_cast<const E**>(static_cast<void*>(l.ptr_a)), reinterpret_cast<StrideA*>(l.lda),
       static_cast<const E**>(static_cast<void*>(l.ptr_b)), reinterpret_cast<StrideB*>(l.ldb)},
      {{},
       static_cast<const D**>(static_cast<void*>(l.ptr_d)),
       reinterpret_cast<StrideD*>(l.ldd),
       reinterpret_cast<D**>(l.ptr_d),
       reinterpret_cast<StrideD*>(l.ldd)},
      hw};
  auto& fusion = args.epilogue.thread;
  fusion.alpha = 1.0f;
  fusion.beta = 0.0f;
  fusion.alpha_ptr = nullptr;
  fusion.beta_ptr = nullptr;
  fusion.alpha_ptr_array = nullptr;
  fusion.beta_ptr_array = nullptr;
  fusion.dAlpha = {cute::_0{}, cute::_0{}, 0};
  fusion.dBeta = {cute::_0{}, cute::_0{}, 0};
  return args;
}

template <class KernelT>
size_t sm90_workspace(int groups, int sm_count) {
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<KernelT>;
  TcLaunch l;
  l.groups = groups;
  l.sm_count = sm_count;
  return Gemm::get_workspace_size(sm90_args<KernelT>(l));
}

template <class KernelT>
cudaError_t sm90_run(const TcLaunch& l) {
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<KernelT>;
  if (l.groups <= 0) return cudaSuccess;
  auto args = sm90_args<KernelT>(l);
  Gemm gemm;
  cutlass::Status s = gemm.initialize(args, l.workspace, l.stream);
  if (s == cutlass::Status::kSuccess) s = gemm.run(l.stream);
  return to_cuda_error(s);
}

#define MOE_TC_DEFINE_SM90(name, Element, layout, tile, ElementD)                \
  struct name##_kernel : Sm90Config<Element, layout, tile, ElementD>::Kernel {}; \
  size_t tc_workspace_##name(int groups, int sm_count) {                         \
    return sm90_workspace<name##_kernel>(groups, sm_count);                      \
  }                                                                              \
  cudaError_t tc_run_##name(const TcLaunch& l) { return sm90_run<name##_kernel>(l); }
#endif

}  // namespace moe_kernels::cuda::tc
