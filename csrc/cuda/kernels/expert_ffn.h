#pragma once
// Bodies of the element-wise CUDA kernels of moe_ffn (forward and backward) around its grouped
// GEMMs, written against simt.h so the CPU tests run them.  The activation arithmetic is
// common/activation.h's, the CPU kernels' own.  Every intermediate is fp32; a row's expert is
// found from offs (rows past the last segment -- dropped pairs -- are written as zeros).
//
//   GatedAct          act[r, i] = act(h[r, g(i)] + b[e, g(i)], h[r, u(i)] + b[e, u(i)])
//   GatedActBackward  dh[r, g(i)], dh[r, u(i)] from h (+ b) and d act[r, i]
//   AddExpertBias     y[r, :] += b[e, :]
//   ExpertColumnSum   out[e, c] = sum of in[r, c] over the rows r of segment e, in row order
//
// g(i), u(i): i and I + i (halves), or 2i and 2i + 1 (interleaved, gpt-oss).
#include <cstdint>

#include "common/activation.h"
#include "common/float_convert.h"
#include "common/routing.h"
#include "cuda/simt.h"

namespace moe_kernels::cuda {

struct ExpertEltParams {
  const float* in = nullptr;         // h [R, 2I] (act kernels) or the summed rows [R, C]
  const float* in2 = nullptr;        // GatedActBackward: d act [R, I]
  float* out = nullptr;              // act [R, I], dh [R, 2I] or y [R, C] (AddExpertBias, in place)
  const void* bias = nullptr;        // [E, 2I] / [E, C] of the weights' type, or null
  int64_t bias_se = 0, bias_sc = 1;  // bias element strides (expert, column)
  const int32_t* offs = nullptr;     // [E]
  int64_t E = 0, R = 0, I = 0;       // I: act columns (C for the other kernels)
  ActParams act{};
  bool interleaved = false;
};

// Column of the gate and up values of act column i in a row of 2I.
MOE_HOST_DEVICE MOE_FORCEINLINE void gate_up_cols(int64_t i, int64_t I, bool interleaved,
                                                  int64_t* g, int64_t* u) {
  *g = interleaved ? 2 * i : i;
  *u = interleaved ? 2 * i + 1 : I + i;
}

template <class TB>
MOE_HOST_DEVICE MOE_FORCEINLINE float bias_at(const ExpertEltParams& p, int64_t e, int64_t c) {
  return p.bias ? to_f32(static_cast<const TB*>(p.bias)[e * p.bias_se + c * p.bias_sc]) : 0.f;
}

template <class TB>
struct GatedAct {
  static constexpr int kThreads = 256;
  ExpertEltParams p;
  template <class Ctx>
  MOE_HOST_DEVICE void operator()(Ctx& c) const {
    const int64_t total = p.R * p.I;
    for (int64_t idx = c.bid() * kThreads + c.tid(); idx < total; idx += c.nbid() * kThreads) {
      const int64_t r = idx / p.I, i = idx % p.I;
      const int64_t e = expert_of_row(p.offs, p.E, r);
      if (e >= p.E) {
        p.out[idx] = 0.f;
        continue;
      }
      int64_t gc, uc;
      gate_up_cols(i, p.I, p.interleaved, &gc, &uc);
      const float g = p.in[r * 2 * p.I + gc] + bias_at<TB>(p, e, gc);
      const float u = p.in[r * 2 * p.I + uc] + bias_at<TB>(p, e, uc);
      p.out[idx] = act_forward(p.act, g, u);
    }
  }
};

template <class TB>
struct GatedActBackward {
  static constexpr int kThreads = 256;
  ExpertEltParams p;
  template <class Ctx>
  MOE_HOST_DEVICE void operator()(Ctx& c) const {
    const int64_t total = p.R * p.I;
    for (int64_t idx = c.bid() * kThreads + c.tid(); idx < total; idx += c.nbid() * kThreads) {
      const int64_t r = idx / p.I, i = idx % p.I;
      const int64_t e = expert_of_row(p.offs, p.E, r);
      int64_t gc, uc;
      gate_up_cols(i, p.I, p.interleaved, &gc, &uc);
      float dg = 0.f, du = 0.f;
      if (e < p.E) {
        const float g = p.in[r * 2 * p.I + gc] + bias_at<TB>(p, e, gc);
        const float u = p.in[r * 2 * p.I + uc] + bias_at<TB>(p, e, uc);
        act_backward(p.act, g, u, p.in2[idx], &dg, &du);
      }
      p.out[r * 2 * p.I + gc] = dg;
      p.out[r * 2 * p.I + uc] = du;
    }
  }
};

template <class TB>
struct AddExpertBias {
  static constexpr int kThreads = 256;
  ExpertEltParams p;
  template <class Ctx>
  MOE_HOST_DEVICE void operator()(Ctx& c) const {
    const int64_t total = p.R * p.I;
    for (int64_t idx = c.bid() * kThreads + c.tid(); idx < total; idx += c.nbid() * kThreads) {
      const int64_t r = idx / p.I, col = idx % p.I;
      const int64_t e = expert_of_row(p.offs, p.E, r);
      if (e < p.E) p.out[idx] += bias_at<TB>(p, e, col);
    }
  }
};

// out[e, c] (of TO, contiguous [E, C]) = sum of in[r, c] over segment e's rows, in row order.
template <class TO>
struct ExpertColumnSum {
  static constexpr int kThreads = 256;
  ExpertEltParams p;  // in [R, C = p.I], out unused: sums go to `sums`
  void* sums = nullptr;
  template <class Ctx>
  MOE_HOST_DEVICE void operator()(Ctx& c) const {
    const int64_t total = p.E * p.I;
    for (int64_t idx = c.bid() * kThreads + c.tid(); idx < total; idx += c.nbid() * kThreads) {
      const int64_t e = idx / p.I, col = idx % p.I;
      const int64_t begin = e > 0 ? p.offs[e - 1] : 0, end = p.offs[e];
      float acc = 0.f;
      for (int64_t r = begin; r < end && r < p.R; ++r) acc += p.in[r * p.I + col];
      static_cast<TO*>(sums)[idx] = from_f32<TO>(acc);
    }
  }
};

template <class Kernel, class Exec>
void run_elementwise(Exec& ex, const Kernel& k, int64_t total) {
  if (total <= 0) return;
  ex.launch(k, std::min<int64_t>((total + 255) / 256, ex.max_blocks()), 0);
}

}  // namespace moe_kernels::cuda
