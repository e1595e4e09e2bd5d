#pragma once
// The expert MLP's activation (common/activation.h) over rows of fp32 values, as the CPU kernels'
// epilogues and the backward apply it.  At the avx2 level and above, 8 lanes at a time with e^x
// and erf from polynomials (within a few ulp of expf / erff; a row's last lanes run through the
// same vector code, padded, so each value does not depend on where a row is split); the scalar
// level runs act_forward / act_backward element by element.
#include <cstdint>

#include "common/activation.h"

namespace moe_kernels::cpu {

// h[j] = act(g[j], u[j]) for j < n.
void act_forward_row(const ActParams& p, const float* g, const float* u, float* h, int64_t n);

// In place: g[j] <- d act / d g and u[j] <- d act / d u at (g[j], u[j]), each times the
// upstream gradient dy = scale * gy[j], for j < n.
void act_backward_row(const ActParams& p, float* g, float* u, const float* gy, float scale,
                      int64_t n);

}  // namespace moe_kernels::cpu
