#include "cpu/activation_rows.h"

#include <immintrin.h>

#include <algorithm>

#include "cpu/cpu_info.h"

namespace moe_kernels::cpu {
namespace {

#define MOE_AVX2_FMA __attribute__((target("avx2,fma")))

// e^x, 8 lanes: x = n ln2 + r with n = round(x / ln2) and |r| <= ln2 / 2 (ln2 in two parts, so r
// carries about 32 bits), e^r by its Taylor polynomial of degree 7 (truncation below 6e-9
// relative), times 2^n as two powers of two of about n / 2 each, both normal floats, so that the
// result overflows to inf and underflows through the subnormals (rounded once) as expf does.
// x is clamped to [-104, 89] first (e^x rounds to 0 below and overflows above); NaN stays NaN.
MOE_AVX2_FMA inline __m256 exp8(__m256 x) {
  const __m256 xc = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-104.f)), _mm256_set1_ps(89.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 q = _mm256_set1_ps(1.f / 5040.f);
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(1.f / 720.f));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(1.f / 120.f));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(1.f / 24.f));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(1.f / 6.f));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(0.5f));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(1.f));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(1.f));
  // n in [-150, 128]: n1 = floor(n / 2) and n - n1 in [-75, 64]
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 p1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
  const __m256 p2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
  const __m256 y = _mm256_mul_ps(_mm256_mul_ps(q, p1), p2);
  return _mm256_blendv_ps(y, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}

// 1 / (1 + e^-x): 0 at -inf, 1 at +inf, NaN kept.
MOE_AVX2_FMA inline __m256 sigmoid8(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.f);
  return _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), x))));
}

// a(t) = c[0] + c[1] t + ... + c[N-1] t^(N-1), by Horner's rule.
template <int N>
MOE_AVX2_FMA inline __m256 poly8(const float (&c)[N], __m256 t) {
  __m256 r = _mm256_set1_ps(c[N - 1]);
#pragma GCC unroll 16
  for (int i = N - 2; i >= 0; --i) r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(c[i]));
  return r;
}

// GELU's Phi(g) = (1 + erf(g / sqrt 2)) / 2 and phi(g) = e^(-g^2 / 2) / sqrt(2 pi), 8 lanes.  With
// x = g / sqrt 2: for |x| <= 1, erf(x) = x P(x^2); above, erfc(|x|) = e^(-x^2) Q(1 / (1 + |x| /
// 2)), so the lower tail Phi = erfc(|x|) / 2 keeps its relative accuracy (1 + erf(x) would cancel).
// P (degree 6) and Q (degree 8) are least-squares fits of erf(x) / x on [0, 1] and of
// erfc(x) e^(x^2) on [1, 10.5] (relative error 2e-9 and 9e-9 in exact arithmetic; Phi within 2
// ulps of 1 in float); past |x| ~ 10.2, e^(-x^2) is 0 in float.  NaN gives NaN.
MOE_AVX2_FMA inline void gelu_parts8(__m256 g, __m256* cdf, __m256* pdf) {
  static constexpr float kP[] = {1.128379167e+00f,  -3.761262884e-01f, 1.128361236e-01f,
                                 -2.685480602e-02f, 5.190048821e-03f,  -8.024311698e-04f,
                                 7.898066371e-05f};
  static constexpr float kQ[] = {-2.490703302e-06f, 2.821596237e-01f,  2.814056696e-01f,
                                 2.505779962e-01f,  1.663574167e-01f,  8.741046136e-02f,
                                 4.849126739e-02f,  -2.020321615e-01f, 8.613666820e-02f};
  const __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.f);
  const __m256 x = _mm256_mul_ps(g, _mm256_set1_ps(0.70710678118654752f));
  const __m256 ax = _mm256_andnot_ps(_mm256_set1_ps(-0.f), x);
  const __m256 t = _mm256_mul_ps(x, x);
  const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), t));  // e^(-x^2) = e^(-g^2 / 2)
  const __m256 small = _mm256_fmadd_ps(half, _mm256_mul_ps(x, poly8(kP, t)), half);
  const __m256 s = _mm256_div_ps(one, _mm256_fmadd_ps(half, ax, one));
  const __m256 tail = _mm256_mul_ps(half, _mm256_mul_ps(e, poly8(kQ, s)));  // erfc(|x|) / 2
  const __m256 big = _mm256_blendv_ps(tail, _mm256_sub_ps(one, tail),
                                      _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_GT_OQ));
  *cdf = _mm256_blendv_ps(big, small, _mm256_cmp_ps(ax, one, _CMP_LE_OQ));
  *pdf = _mm256_mul_ps(_mm256_set1_ps(0.39894228040143268f), e);
}

// act_forward's activations, in its order of operations where it has one (min / max as fminf /
// fmaxf: a NaN argument gives the other one).
template <Activation A>
MOE_AVX2_FMA inline __m256 forward8(__m256 g, __m256 u, __m256 alpha, __m256 limit) {
  if constexpr (A == Activation::kSwiglu) {
    return _mm256_mul_ps(_mm256_mul_ps(g, sigmoid8(g)), u);
  } else if constexpr (A == Activation::kGeglu) {
    __m256 cdf, pdf;
    gelu_parts8(g, &cdf, &pdf);
    return _mm256_mul_ps(_mm256_mul_ps(g, cdf), u);
  } else {
    const __m256 gc = _mm256_min_ps(g, limit);
    const __m256 uc =
        _mm256_min_ps(_mm256_max_ps(u, _mm256_sub_ps(_mm256_setzero_ps(), limit)), limit);
    return _mm256_mul_ps(_mm256_mul_ps(_mm256_add_ps(uc, _mm256_set1_ps(1.f)), gc),
                         sigmoid8(_mm256_mul_ps(alpha, gc)));
  }
}

// act_backward's activations: dg and du for upstream gradient dy.
template <Activation A>
MOE_AVX2_FMA inline void backward8(__m256 g, __m256 u, __m256 dy, __m256 alpha, __m256 limit,
                                   __m256* dg, __m256* du) {
  const __m256 one = _mm256_set1_ps(1.f);
  if constexpr (A == Activation::kSwiglu) {
    const __m256 s = sigmoid8(g);
    *du = _mm256_mul_ps(dy, _mm256_mul_ps(g, s));
    *dg = _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(dy, u), s),
                        _mm256_add_ps(one, _mm256_mul_ps(g, _mm256_sub_ps(one, s))));
  } else if constexpr (A == Activation::kGeglu) {
    __m256 cdf, pdf;
    gelu_parts8(g, &cdf, &pdf);
    *du = _mm256_mul_ps(_mm256_mul_ps(dy, g), cdf);
    *dg = _mm256_mul_ps(_mm256_mul_ps(dy, u), _mm256_add_ps(cdf, _mm256_mul_ps(g, pdf)));
  } else {
    const __m256 neg_limit = _mm256_sub_ps(_mm256_setzero_ps(), limit);
    const __m256 g_pass = _mm256_cmp_ps(g, limit, _CMP_LE_OQ);
    const __m256 u_pass =
        _mm256_and_ps(_mm256_cmp_ps(u, neg_limit, _CMP_GE_OQ), _mm256_cmp_ps(u, limit, _CMP_LE_OQ));
    const __m256 gc = _mm256_blendv_ps(limit, g, g_pass);
    const __m256 uc = _mm256_min_ps(_mm256_max_ps(u, neg_limit), limit);
    const __m256 ag = _mm256_mul_ps(alpha, gc);
    const __m256 s = sigmoid8(ag);
    *du = _mm256_and_ps(u_pass, _mm256_mul_ps(dy, _mm256_mul_ps(gc, s)));
    *dg = _mm256_and_ps(
        g_pass, _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(dy, _mm256_add_ps(uc, one)), s),
                              _mm256_add_ps(one, _mm256_mul_ps(ag, _mm256_sub_ps(one, s)))));
  }
}

// Up to 8 lanes of a row: the last n < 8 values padded with zeros, through the vector code.
MOE_AVX2_FMA inline __m256 load_n(const float* p, int64_t n) {
  alignas(32) float t[8] = {};
  std::copy(p, p + n, t);
  return _mm256_load_ps(t);
}
MOE_AVX2_FMA inline void store_n(float* p, __m256 v, int64_t n) {
  alignas(32) float t[8];
  _mm256_store_ps(t, v);
  std::copy(t, t + n, p);
}

template <Activation A>
MOE_AVX2_FMA void forward_avx2(const ActParams& p, const float* g, const float* u, float* h,
                               int64_t n) {
  const __m256 alpha = _mm256_set1_ps(p.alpha), limit = _mm256_set1_ps(p.limit);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    _mm256_storeu_ps(h + j,
                     forward8<A>(_mm256_loadu_ps(g + j), _mm256_loadu_ps(u + j), alpha, limit));
  if (j < n)
    store_n(h + j, forward8<A>(load_n(g + j, n - j), load_n(u + j, n - j), alpha, limit), n - j);
}

template <Activation A>
MOE_AVX2_FMA void backward_avx2(const ActParams& p, float* g, float* u, const float* gy,
                                float scale, int64_t n) {
  const __m256 alpha = _mm256_set1_ps(p.alpha), limit = _mm256_set1_ps(p.limit);
  const __m256 sc = _mm256_set1_ps(scale);
  __m256 dg, du;
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    backward8<A>(_mm256_loadu_ps(g + j), _mm256_loadu_ps(u + j),
                 _mm256_mul_ps(sc, _mm256_loadu_ps(gy + j)), alpha, limit, &dg, &du);
    _mm256_storeu_ps(g + j, dg);
    _mm256_storeu_ps(u + j, du);
  }
  if (j < n) {
    const int64_t m = n - j;
    backward8<A>(load_n(g + j, m), load_n(u + j, m), _mm256_mul_ps(sc, load_n(gy + j, m)), alpha,
                 limit, &dg, &du);
    store_n(g + j, dg, m);
    store_n(u + j, du, m);
  }
}

#define MOE_AVX512F __attribute__((target("avx512f,avx512dq,avx2,fma")))

// exp8's instructions on 16 lanes: the same value in every lane as exp8 gives.  A separate copy,
// not one template over both widths: the 8-lane code must be compiled for AVX2 only (it runs on
// CPUs without AVX-512), and a template cannot carry a target attribute per instantiation.
MOE_AVX512F inline __m512 exp16(__m512 x) {
  const __m512 xc = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.f)), _mm512_set1_ps(89.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 q = _mm512_set1_ps(1.f / 5040.f);
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.f / 720.f));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.f / 120.f));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.f / 24.f));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.f / 6.f));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(0.5f));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.f));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.f));
  const __m512i ni = _mm512_cvtps_epi32(n);
  const __m512i n1 = _mm512_srai_epi32(ni, 1), n2 = _mm512_sub_epi32(ni, n1);
  const __m512i bias = _mm512_set1_epi32(127);
  const __m512 p1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(n1, bias), 23));
  const __m512 p2 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(n2, bias), 23));
  const __m512 y = _mm512_mul_ps(_mm512_mul_ps(q, p1), p2);
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), y, x);
}

// SwiGLU's forward 16 lanes at a time (the epilogue of GEMM 1 on AVX-512 CPUs, where its e^x and
// division on 8 lanes cost ~5-10% of a prefill call), the last n % 16 values through the 8-lane
// code: every value is the one forward_avx2 gives, wherever the row is split.
MOE_AVX512F void forward_swiglu_avx512(const ActParams& p, const float* g, const float* u, float* h,
                                       int64_t n) {
  const __m512 one = _mm512_set1_ps(1.f);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512 gv = _mm512_loadu_ps(g + j);
    const __m512 s =
        _mm512_div_ps(one, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
    _mm512_storeu_ps(h + j, _mm512_mul_ps(_mm512_mul_ps(gv, s), _mm512_loadu_ps(u + j)));
  }
  if (j < n) forward_avx2<Activation::kSwiglu>(p, g + j, u + j, h + j, n - j);
}

}  // namespace

void act_forward_row(const ActParams& p, const float* g, const float* u, float* h, int64_t n) {
  if (p.kind == Activation::kSwiglu && detected_isa() >= Isa::kAvx512)
    return forward_swiglu_avx512(p, g, u, h, n);
  if (detected_isa() >= Isa::kAvx2) {
    switch (p.kind) {
      case Activation::kSwiglu: return forward_avx2<Activation::kSwiglu>(p, g, u, h, n);
      case Activation::kGeglu: return forward_avx2<Activation::kGeglu>(p, g, u, h, n);
      default: return forward_avx2<Activation::kSwigluOai>(p, g, u, h, n);
    }
  }
  for (int64_t j = 0; j < n; ++j) h[j] = act_forward(p, g[j], u[j]);
}

void act_backward_row(const ActParams& p, float* g, float* u, const float* gy, float scale,
                      int64_t n) {
  if (detected_isa() >= Isa::kAvx2) {
    switch (p.kind) {
      case Activation::kSwiglu: return backward_avx2<Activation::kSwiglu>(p, g, u, gy, scale, n);
      case Activation::kGeglu: return backward_avx2<Activation::kGeglu>(p, g, u, gy, scale, n);
      default: return backward_avx2<Activation::kSwigluOai>(p, g, u, gy, scale, n);
    }
  }
  for (int64_t j = 0; j < n; ++j) {
    float dg, du;
    act_backward(p, g[j], u[j], scale * gy[j], &dg, &du);
    g[j] = dg;
    u[j] = du;
  }
}

}  // namespace moe_kernels::cpu
