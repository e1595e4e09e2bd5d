#pragma once
// The launchers' bodies, for any executor: the type and variant dispatch of every op around the
// `run_*` launch sequences.  csrc/cuda/*.cu instantiate them with the CUDA executor (exec.cuh),
// tests/cpp/cuda_emulator.cpp with the CPU one.
#include "cuda/kernels/expert_ffn.h"
#include "cuda/kernels/gating.h"
#include "cuda/kernels/grouped_gemm.h"
#include "cuda/kernels/permute.h"
#include "cuda/kernels/routing.h"
#include "cuda/kernels/tc_gemm.h"

namespace moe_kernels::cuda {

enum class FloatType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

// Calls f(tag) with a value of the storage type of t (float, bf16_t or f16_t).
template <class F>
void dispatch_float(FloatType t, F&& f) {
  switch (t) {
    case FloatType::kBF16: f(bf16_t{}); break;
    case FloatType::kF16: f(f16_t{}); break;
    default: f(float{}); break;
  }
}

template <class Exec>
void topk_gating_on(Exec& ex, FloatType in, const GatingParams& p) {
  dispatch_float(in, [&](auto tag) {
    dispatch_vpt(p.E, [&](auto vpt) { run_gating_forward<decltype(tag), vpt.value>(ex, p); });
  });
}

template <class Exec>
void topk_gating_backward_on(Exec& ex, FloatType in, const GatingBackwardParams& p) {
  dispatch_float(in, [&](auto tag) {
    dispatch_vpt(p.E, [&](auto vpt) { run_gating_backward<decltype(tag), vpt.value>(ex, p); });
  });
}

// false: unit_bytes is not 16, 8, 4, 2 or 1.
template <class Exec>
bool permute_on(Exec& ex, int unit_bytes, const PermuteParams& p) {
  switch (unit_bytes) {
    case 16: run_permute<16>(ex, p); return true;
    case 8: run_permute<8>(ex, p); return true;
    case 4: run_permute<4>(ex, p); return true;
    case 2: run_permute<2>(ex, p); return true;
    case 1: run_permute<1>(ex, p); return true;
    default: return false;
  }
}

template <class Exec>
void unpermute_on(Exec& ex, FloatType t, bool vec, const UnpermuteParams& p) {
  dispatch_float(t, [&](auto tag) {
    using T = decltype(tag);
    if (vec)
      run_unpermute<T, 16>(ex, p);
    else
      run_unpermute<T, 0>(ex, p);
  });
}

// g: grad_out's type, t's or kF32.
template <class Exec>
void unpermute_backward_on(Exec& ex, FloatType t, FloatType g, bool vec,
                           const UnpermuteBackwardParams& p, bool need_grad_y, bool need_grad_w) {
  dispatch_float(t, [&](auto tag) {
    using T = decltype(tag);
    auto run = [&](auto gtag) {
      using G = decltype(gtag);
      if (vec)
        run_unpermute_backward<T, G, 16>(ex, p, need_grad_y, need_grad_w);
      else
        run_unpermute_backward<T, G, 0>(ex, p, need_grad_y, need_grad_w);
    };
    if (g == FloatType::kF32)
      run(float{});
    else
      run(T{});
  });
}

// Operand types of the grouped GEMM kernels, around the weights' type T: the public op's one
// type, or moe_ffn's fp32 intermediates.
enum class GemmTypes : int {
  kSame = 0,    // SegmentGemm<T, T, T> / RaggedK<T, T, T>
  kOutF32 = 1,  // SegmentGemm<T, T, f32>: GEMM 1 of moe_ffn (x, w_gate_up -> fp32 h)
  kAF32 = 2,    // SegmentGemm<f32, T, f32> (GEMM 2, dA of both) / RaggedK<f32, T, T> (dW_gate_up)
  kADF32 = 3,   // RaggedK<f32, f32, T>: dW_down from fp32 activations and gradients
};

template <class Exec>
void segment_gemm_on(Exec& ex, FloatType t, GemmTypes types, const SegmentGemmParams& p) {
  dispatch_float(t, [&](auto tag) {
    using T = decltype(tag);
    if (types == GemmTypes::kOutF32)
      run_segment_gemm<T, T, float>(ex, p);
    else if (types == GemmTypes::kAF32)
      run_segment_gemm<float, T, float>(ex, p);
    else
      run_segment_gemm<T, T, T>(ex, p);
  });
}

template <class Exec>
void ragged_k_on(Exec& ex, FloatType t, GemmTypes types, const RaggedKParams& p) {
  dispatch_float(t, [&](auto tag) {
    using T = decltype(tag);
    if (types == GemmTypes::kAF32)
      run_ragged_k<float, T, T>(ex, p);
    else if (types == GemmTypes::kADF32)
      run_ragged_k<float, float, T>(ex, p);
    else
      run_ragged_k<T, T, T>(ex, p);
  });
}

// The element-wise kernels of moe_ffn (kernels/expert_ffn.h); t: the biases' / sums' type.
enum class ExpertOp : int { kAct = 0, kActBackward = 1, kAddBias = 2, kColumnSum = 3 };

template <class Exec>
void expert_elementwise_on(Exec& ex, ExpertOp op, FloatType t, const ExpertEltParams& p,
                           void* sums) {
  dispatch_float(t, [&](auto tag) {
    using T = decltype(tag);
    switch (op) {
      case ExpertOp::kAct: run_elementwise(ex, GatedAct<T>{p}, p.R * p.I); break;
      case ExpertOp::kActBackward: run_elementwise(ex, GatedActBackward<T>{p}, p.R * p.I); break;
      case ExpertOp::kAddBias: run_elementwise(ex, AddExpertBias<T>{p}, p.R * p.I); break;
      case ExpertOp::kColumnSum: run_elementwise(ex, ExpertColumnSum<T>{p, sums}, p.E * p.I); break;
    }
  });
}

}  // namespace moe_kernels::cuda
