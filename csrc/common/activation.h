#pragma once
// Expert-MLP activations (forward and backward), fp32 math, shared by the CPU and CUDA kernels.
//
//   swiglu      act = silu(g) * u
//   geglu       act = gelu_erf(g) * u           (exact GELU: 0.5 g (1 + erf(g / sqrt 2)))
//   swiglu_oai  g' = min(g, limit), u' = clamp(u, -limit, limit),
//               act = (u' + 1) * g' * sigmoid(alpha * g')    (gpt-oss)
//
// Gradients of the clamps follow torch's convention for min/clamp: the gradient passes where the
// input is kept (g <= limit, -limit <= u <= limit), including at the boundary.
#include <cmath>

#include "common/host_device.h"

namespace moe_kernels {

enum class Activation : int { kSwiglu = 0, kGeglu = 1, kSwigluOai = 2 };

struct ActParams {
  Activation kind;
  float alpha;
  float limit;
};

MOE_HOST_DEVICE MOE_FORCEINLINE float sigmoid_f32(float x) { return 1.0f / (1.0f + expf(-x)); }

MOE_HOST_DEVICE MOE_FORCEINLINE float act_forward(const ActParams& p, float g, float u) {
  switch (p.kind) {
    case Activation::kSwiglu: return g * sigmoid_f32(g) * u;
    case Activation::kGeglu: return 0.5f * g * (1.0f + erff(g * 0.70710678118654752f)) * u;
    default: {
      const float gc = fminf(g, p.limit);
      const float uc = fminf(fmaxf(u, -p.limit), p.limit);
      return (uc + 1.0f) * gc * sigmoid_f32(p.alpha * gc);
    }
  }
}

// d act / d g and d act / d u, given the upstream gradient dy.
MOE_HOST_DEVICE MOE_FORCEINLINE void act_backward(const ActParams& p, float g, float u, float dy,
                                                  float* dg, float* du) {
  switch (p.kind) {
    case Activation::kSwiglu: {
      const float s = sigmoid_f32(g);
      const float silu = g * s;
      *du = dy * silu;
      *dg = dy * u * s * (1.0f + g * (1.0f - s));
      return;
    }
    case Activation::kGeglu: {
      const float cdf = 0.5f * (1.0f + erff(g * 0.70710678118654752f));
      const float pdf = 0.39894228040143268f * expf(-0.5f * g * g);
      *du = dy * g * cdf;
      *dg = dy * u * (cdf + g * pdf);
      return;
    }
    default: {
      const bool g_pass = g <= p.limit;
      const bool u_pass = u >= -p.limit && u <= p.limit;
      const float gc = g_pass ? g : p.limit;
      const float uc = fminf(fmaxf(u, -p.limit), p.limit);
      const float s = sigmoid_f32(p.alpha * gc);
      const float glu = gc * s;
      *du = u_pass ? dy * glu : 0.0f;
      *dg = g_pass ? dy * (uc + 1.0f) * s * (1.0f + p.alpha * gc * (1.0f - s)) : 0.0f;
      return;
    }
  }
}

}  // namespace moe_kernels
