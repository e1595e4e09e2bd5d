#pragma once
// Bodies of the CUDA topk_gating kernels (forward and backward), written against simt.h so the
// CPU tests run them (tests/cpp/cuda_emulator.cpp).  One warp per router row, four rows per block
// at a time, a grid-stride loop over the rows.
//
// Expert e of a row lives on lane e % 32, in slot j = e / 32 of that lane's values.  With up to
// 512 experts the values stay in registers (VPT = ceil(E / 32) rounded up to a power of two, at
// most 16); with more, VPT = 0 selects the path that keeps them in a per-warp global scratch row
// (slower, same results).  Selection order and group scores are those of common/topk.h (NaN
// first, ties to the lower index); softmax / sigmoid, the bias, the renormalisation and the
// scaling follow the CPU kernel (csrc/cpu/gating.cpp) operation by operation, in fp32.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common/float_convert.h"
#include "common/topk.h"
#include "cuda/simt.h"

namespace moe_kernels::cuda {

struct GatingParams {
  const void* logits = nullptr;  // [T, E] of In, element strides (stride_t, stride_e)
  int64_t stride_t = 0, stride_e = 1;
  int64_t T = 0;
  int E = 0, k = 0;
  bool sigmoid = false, renormalize = false;
  const float* bias = nullptr;  // [E] fp32 or null (selection only)
  int groups = 0, topk_groups = 0;
  float scale = 1.f;
  float* weights = nullptr;    // [T, k] fp32
  int32_t* ids = nullptr;      // [T, k]
  float* scratch = nullptr;    // VPT = 0 or groups > 0 with VPT = 0: global per-warp scratch
  int64_t scratch_floats = 0;  // floats of scratch per warp
};

// Floats of per-warp scratch: the scores and selection values (VPT = 0 only), then a contiguous
// copy of the selection values, the group scores and the kept-group flags (groups only).
inline int64_t gating_scratch_floats(int E, int groups, bool in_regs) {
  const int64_t epad = (E + 31) / 32 * 32;
  const int64_t gpad = (groups + 31) / 32 * 32;
  return (in_regs ? 0 : 2 * epad) + (groups > 0 ? epad + 2 * gpad : 0);
}

// The values of one lane: in registers (VPT > 0) or strided in global scratch (VPT = 0).
template <int VPT>
struct RegVals {
  float v[VPT];
  MOE_HOST_DEVICE MOE_FORCEINLINE explicit RegVals(float*) {}
  MOE_HOST_DEVICE MOE_FORCEINLINE float& operator[](int j) { return v[j]; }
  MOE_HOST_DEVICE MOE_FORCEINLINE float operator[](int j) const { return v[j]; }
};
struct MemVals {
  float* p;  // this lane's first value; slot j at p[32 j]
  MOE_HOST_DEVICE MOE_FORCEINLINE explicit MemVals(float* q) : p(q) {}
  MOE_HOST_DEVICE MOE_FORCEINLINE float& operator[](int j) { return p[32 * j]; }
  MOE_HOST_DEVICE MOE_FORCEINLINE float operator[](int j) const { return p[32 * j]; }
};
template <int VPT>
using LaneVals = std::conditional_t<(VPT > 0), RegVals<VPT>, MemVals>;

MOE_HOST_DEVICE MOE_FORCEINLINE float neg_inf() { return -__builtin_huge_valf(); }

// a / b.  On the device PTX's full-range division (at most 2 ulp from the rounded quotient, the
// same class of error as the device expf): the IEEE-rounded division is a subroutine call there,
// and a call inside these register-resident loops makes ptxas save the live lane values to local
// memory.  On the host (the emulator) the IEEE division.
MOE_HOST_DEVICE MOE_FORCEINLINE float div_full(float a, float b) {
#if defined(__CUDA_ARCH__)
  float q;
  asm("div.full.f32 %0, %1, %2;" : "=f"(q) : "f"(a), "f"(b));
  return q;
#else
  return a / b;
#endif
}

// Softmax or sigmoid scores of one row into sc (slots past E: 0).  Returns the softmax row max
// and 1 / sum through mx / inv (what the backward needs to recompute any single score).
template <class In, class Ctx, class V>
MOE_HOST_DEVICE MOE_FORCEINLINE void row_scores(Ctx& c, int E, int64_t stride_e, bool sigmoid,
                                                const In* row, int nv, V& sc, float* mx_out,
                                                float* inv_out) {
  const int lane = c.lane();
  float mx = neg_inf();
#pragma unroll
  for (int j = 0; j < nv; ++j) {
    const int e = j * 32 + lane;
    const float x = e < E ? to_f32(row[e * stride_e]) : 0.f;
    sc[j] = x;
    if (e < E) mx = fmaxf(mx, x);
  }
  if (sigmoid) {
#pragma unroll
    for (int j = 0; j < nv; ++j) sc[j] = div_full(1.0f, 1.0f + expf(-sc[j]));
    *mx_out = 0.f;
    *inv_out = 1.f;
    return;
  }
  mx = warp_max(c, mx);
  float sum = 0.f;
#pragma unroll
  for (int j = 0; j < nv; ++j) {
    const int e = j * 32 + lane;
    const float ex = e < E ? expf(sc[j] - mx) : 0.f;
    sc[j] = ex;
    sum += ex;
  }
  sum = warp_sum(c, sum);
  const float inv = div_full(1.0f, sum);
#pragma unroll
  for (int j = 0; j < nv; ++j) sc[j] *= inv;
  *mx_out = mx;
  *inv_out = inv;
}

template <class In, int VPT>
struct GatingForward {
  static constexpr int kThreads = 128;
  static constexpr int kWarps = kThreads / 32;
  GatingParams p;

  template <class Ctx>
  MOE_HOST_DEVICE void operator()(Ctx& c) const {
    const int64_t gwarp = c.bid() * kWarps + c.warp();
    const int64_t nwarps = c.nbid() * kWarps;
    const bool need_scratch = VPT == 0 || p.groups > 0;
    float* scratch = nullptr;
    if (need_scratch) {
      scratch = VPT > 0 ? c.template shared<float>() + c.warp() * p.scratch_floats
                        : p.scratch + gwarp * p.scratch_floats;
    }
    for (int64_t t = gwarp; t < p.T; t += nwarps) row(c, t, scratch);
  }

  template <class Ctx>
  MOE_HOST_DEVICE void row(Ctx& c, int64_t t, float* scratch) const {
    const int lane = c.lane();
    const int nv = VPT > 0 ? VPT : (p.E + 31) / 32;
    const int epad = (p.E + 31) / 32 * 32;
    LaneVals<VPT> sc(scratch ? scratch + lane : nullptr);
    LaneVals<VPT> sel(scratch ? scratch + epad + lane : nullptr);
    const In* row_ptr = static_cast<const In*>(p.logits) + t * p.stride_t;
    float mx, inv;
    row_scores<In>(c, p.E, p.stride_e, p.sigmoid, row_ptr, nv, sc, &mx, &inv);
#pragma unroll
    for (int j = 0; j < nv; ++j) {
      const int e = j * 32 + lane;
      sel[j] = e < p.E ? sc[j] + (p.bias ? p.bias[e] : 0.f) : 0.f;
    }
    if (p.groups > 0) mask_groups(c, nv, sel, scratch + (VPT > 0 ? 0 : 2 * epad));
    // k picks, each the best value strictly after the previous pick in the order of
    // common/topk.h: every lane proposes its best, a butterfly keeps the best of all lanes.
    float prev_v = 0.f, sum = 0.f;
    int prev_i = -1;
    for (int s = 0; s < p.k; ++s) {
      float bv = 0.f, bs = 0.f;
      int bi = -1;
#pragma unroll
      for (int j = 0; j < nv; ++j) {
        const int e = j * 32 + lane;
        const float x = sel[j];
        if (e < p.E && (prev_i < 0 || topk_before(prev_v, prev_i, x, e)) &&
            (bi < 0 || topk_before(x, e, bv, bi))) {
          bv = x;
          bi = e;
          bs = sc[j];
        }
      }
#pragma unroll
      for (int m = 16; m >= 1; m >>= 1) {
        const float ov = c.shfl_xor(bv, m), os = c.shfl_xor(bs, m);
        const int oi = c.shfl_xor(bi, m);
        if (oi >= 0 && (bi < 0 || topk_before(ov, oi, bv, bi))) {
          bv = ov;
          bi = oi;
          bs = os;
        }
      }
      // k <= E, so a pick always exists (bi >= 0) whatever the values.
      if (lane == s % 32) {
        p.ids[t * p.k + s] = bi;
        p.weights[t * p.k + s] = bs;
      }
      sum += bs;  // in pick order, as the CPU kernel sums
      prev_v = bv;
      prev_i = bi;
    }
    // Each slot is rewritten by the lane that wrote it: no synchronisation needed.
    for (int s = lane; s < p.k; s += 32) {
      const float w = p.weights[t * p.k + s];
      p.weights[t * p.k + s] = (p.renormalize ? div_full(w, sum) : w) * p.scale;
    }
  }

  // Expert groups: the group score is the sum of the group's two best selection values; experts
  // outside the topk_groups best groups get -inf (they can still fill slots past the eligible
  // count, in index order, as a stable sort over the masked values does).
  template <class Ctx, class V>
  MOE_HOST_DEVICE void mask_groups(Ctx& c, int nv, V& sel, float* buf) const {
    const int lane = c.lane();
    const int epad = (p.E + 31) / 32 * 32, gpad = (p.groups + 31) / 32 * 32;
    float* gscore = buf + epad;
    float* keep = gscore + gpad;
    const int per = p.E / p.groups;
#pragma unroll
    for (int j = 0; j < nv; ++j) {
      const int e = j * 32 + lane;
      if (e < p.E) buf[e] = sel[j];
    }
    c.sync_warp();
    for (int g = lane; g < p.groups; g += 32) {
      gscore[g] = group_score(buf + g * per, per);
      keep[g] = 0.f;
    }
    c.sync_warp();
    if (lane == 0) {
      int prev = -1;
      float pv = 0.f;
      for (int s = 0; s < p.topk_groups; ++s) {
        const int g = topk_next(gscore, p.groups, pv, prev, [](int) { return true; });
        keep[g] = 1.f;
        prev = g;
        pv = gscore[g];
      }
    }
    c.sync_warp();
#pragma unroll
    for (int j = 0; j < nv; ++j) {
      const int e = j * 32 + lane;
      if (e < p.E && keep[e / per] == 0.f) sel[j] = neg_inf();
    }
    c.sync_warp();  // the buffer is rewritten by the next row
  }
};

struct GatingBackwardParams {
  const void* logits = nullptr;   // [T, E] of In, contiguous
  const float* grad_w = nullptr;  // [T, k] fp32, contiguous
  const int32_t* ids = nullptr;   // [T, k]; ids outside [0, E) contribute nothing
  int64_t T = 0;
  int E = 0, k = 0;
  bool sigmoid = false, renormalize = false;
  float scale = 1.f;
  void* grad = nullptr;      // [T, E] of In
  float* scratch = nullptr;  // VPT = 0: per-warp scratch of 2 * epad floats
};

// d logits of w = scale * p[e_s] / S (S = sum of the picked p; 1 without renormalisation).
template <class In, int VPT>
struct GatingBackward {
  static constexpr int kThreads = 128;
  static constexpr int kWarps = kThreads / 32;
  GatingBackwardParams p;

  template <class Ctx>
  MOE_HOST_DEVICE void operator()(Ctx& c) const {
    const int64_t gwarp = c.bid() * kWarps + c.warp();
    const int64_t nwarps = c.nbid() * kWarps;
    const int epad = (p.E + 31) / 32 * 32;
    float* scratch = VPT > 0 ? nullptr : p.scratch + gwarp * 2 * epad;
    for (int64_t t = gwarp; t < p.T; t += nwarps) row(c, t, scratch);
  }

  template <class Ctx>
  MOE_HOST_DEVICE void row(Ctx& c, int64_t t, float* scratch) const {
    const int lane = c.lane();
    const int nv = VPT > 0 ? VPT : (p.E + 31) / 32;
    const int epad = (p.E + 31) / 32 * 32;
    LaneVals<VPT> pr(scratch ? scratch + lane : nullptr);
    LaneVals<VPT> gp(scratch ? scratch + epad + lane : nullptr);
    const In* x = static_cast<const In*>(p.logits) + t * p.E;
    float mx, inv;
    row_scores<In>(c, p.E, 1, p.sigmoid, x, nv, pr, &mx, &inv);
    const int32_t* ids = p.ids + t * p.k;
    const float* gw = p.grad_w + t * p.k;
    // S and sum_s gw_s p_s over the picks, in slot order (every lane computes the same values).
    float S = 1.f, dot = 0.f;
    if (p.renormalize) {
      S = 0.f;
      for (int s = 0; s < p.k; ++s) {
        const int e = ids[s];
        if (e < 0 || e >= p.E) continue;
        const float xe = to_f32(x[e]);
        const float pe = p.sigmoid ? div_full(1.0f, 1.0f + expf(-xe)) : expf(xe - mx) * inv;
        S += pe;
        dot += gw[s] * pe;
      }
    }
    // d w_s / d p: scale / S * (gw_s - dot / S), or scale * gw_s without renormalisation.
    const float a = p.renormalize ? div_full(p.scale, S) : p.scale;
    const float b = p.renormalize ? div_full(dot, S) : 0.f;
    float inner = 0.f;
#pragma unroll
    for (int j = 0; j < nv; ++j) {
      const int e = j * 32 + lane;
      float g = 0.f;  // the contributions of the slots that picked e, in slot order
#pragma unroll 1
      for (int s = 0; s < p.k; ++s)
        if (ids[s] == e) g += p.renormalize ? a * (gw[s] - b) : a * gw[s];
      gp[j] = e < p.E ? g : 0.f;
      inner += gp[j] * pr[j];
    }
    In* out = static_cast<In*>(p.grad) + t * p.E;
    if (p.sigmoid) {
#pragma unroll
      for (int j = 0; j < nv; ++j) {
        const int e = j * 32 + lane;
        if (e < p.E) out[e] = from_f32<In>(gp[j] * pr[j] * (1.f - pr[j]));
      }
      return;
    }
    inner = warp_sum(c, inner);
#pragma unroll
    for (int j = 0; j < nv; ++j) {
      const int e = j * 32 + lane;
      if (e < p.E) out[e] = from_f32<In>(pr[j] * (gp[j] - inner));
    }
  }
};

// Blocks the VPT = 0 paths use at most, so their per-warp global scratch stays bounded.
constexpr int64_t kGatingScratchBlocks = 1024;

template <int VPT>
inline int64_t gating_max_blocks(int64_t exec_max) {
  return VPT == 0 ? std::min<int64_t>(exec_max, kGatingScratchBlocks) : exec_max;
}

// Warps of global scratch the VPT = 0 paths need for T rows (at most).
inline int64_t gating_scratch_warps(int64_t T) {
  return 4 * std::min<int64_t>((T + 3) / 4, kGatingScratchBlocks);
}

// Launch of the forward / backward for a given In and VPT: one block per 4 rows, at most
// ex.max_blocks() blocks (kGatingScratchBlocks on the scratch path).
template <class In, int VPT, class Exec>
void run_gating_forward(Exec& ex, const GatingParams& p) {
  if (p.T == 0) return;
  const int64_t blocks = std::min<int64_t>((p.T + 3) / 4, gating_max_blocks<VPT>(ex.max_blocks()));
  const size_t smem =
      VPT > 0 && p.groups > 0 ? sizeof(float) * 4 * static_cast<size_t>(p.scratch_floats) : 0;
  ex.launch(GatingForward<In, VPT>{p}, blocks, smem);
}

template <class In, int VPT, class Exec>
void run_gating_backward(Exec& ex, const GatingBackwardParams& p) {
  if (p.T == 0) return;
  const int64_t blocks = std::min<int64_t>((p.T + 3) / 4, gating_max_blocks<VPT>(ex.max_blocks()));
  ex.launch(GatingBackward<In, VPT>{p}, blocks, 0);
}

// VPT for E experts: 1, 2, 4, 8, 16 (up to 512 experts in registers) or 0 (scratch path).
inline int gating_vpt(int E) {
  const int need = (E + 31) / 32;
  if (need > 16) return 0;
  int v = 1;
  while (v < need) v *= 2;
  return v;
}

// Calls f(std::integral_constant<int, VPT>) for the VPT of E experts.
template <class F>
void dispatch_vpt(int E, F&& f) {
  switch (gating_vpt(E)) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    case 16: f(std::integral_constant<int, 16>{}); break;
    default: f(std::integral_constant<int, 0>{}); break;
  }
}

}  // namespace moe_kernels::cuda
