// Checks the CPU backend's activation rows (csrc/cpu/activation_rows.cpp) against float64
// evaluations of the same formulas, at one ISA level (argv[1]: scalar or avx2):
//   * a sweep of gate values over [-100, 100] (past both ends of e^x's float range) with random
//     up values and upstream gradients: forward and backward within a few float32 roundings;
//   * every pair of special values (0, -0, +-inf, NaN, the ends of e^x's range, the clamp
//     limit): NaN, infinite and finite where act_forward / act_backward's scalar code is, and
//     finite results within the same bound;
//   * every row length 1..40 and every split of a row: each value independent of where the row
//     is split (the vector code's last lanes run padded through the same instructions).
// Prints "ok" and exits 0, or prints the first failures and exits 1.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "common/activation.h"
#include "cpu/activation_rows.h"
#include "cpu/cpu_info.h"

namespace moe_kernels::cpu {
Isa g_isa = Isa::kScalar;
Isa detected_isa() { return g_isa; }
std::string detected_isa_name() { return "test"; }
}  // namespace moe_kernels::cpu

using namespace moe_kernels;
using namespace moe_kernels::cpu;

namespace {

int failures = 0;

double sig(double x) { return 1.0 / (1.0 + std::exp(-x)); }

// A float32 evaluation of the formulas carries the error of its sigmoid (or GELU's cdf and pdf)
// on top of a few roundings of its products: sgn = +-1 moves those intermediates by that error,
// so the spread of the float64 results over sgn is the error the float32 evaluation may show.
// The sigmoid: 4 float32 ulps relative, plus its argument's rounding (alpha * g: relative error
// 2^-24 of x, which moves ln sigmoid(x) by |x| (1 - s) 2^-24), plus the smallest normal float
// absolute (where e^x is subnormal); the cdf: with the scalar code's 1 + erff, 4 ulps of 1
// absolute (the sum cancels in the lower tail); with the vector code's erfc tail, 4 ulps relative
// plus its e^(-x^2)'s argument's rounding (x = g / sqrt 2 with the constant and the product
// rounded, then squared: up to 5 roundings of x^2 = g^2 / 2, 3 g^2 2^-24 relative); the pdf 4
// ulps plus the same argument's rounding (the scalar code's -g^2 / 2: one rounding).
constexpr double kU = 4.0 / (1 << 24), kTiny = 1.1754943508222875e-38;
double clamp01(double v) { return std::fmin(1.0, std::fmax(0.0, v)); }
double sig_p(double x, int sgn) {
  const double s = sig(x), rel = kU + 2.0 * std::fabs(x) * (1.0 - s) / (1 << 24);
  return clamp01(s * (1.0 + sgn * rel) + sgn * kTiny);
}
// the relative error of e^(-g^2 / 2) from its argument's rounding
double gauss_arg_rel(double g) { return (g_isa == Isa::kScalar ? 1.0 : 3.0) * g * g / (1 << 24); }
double cdf_p(double g, int sgn) {
  const double cdf = 0.5 * std::erfc(-g / std::sqrt(2.0));
  if (g_isa == Isa::kScalar) return clamp01(cdf + sgn * kU);
  return clamp01(cdf * (1.0 + sgn * (kU + gauss_arg_rel(g))) + sgn * kTiny);
}
double pdf_p(double g, int sgn) {
  const double rel = kU + gauss_arg_rel(g);
  return clamp01(std::exp(-0.5 * g * g) / std::sqrt(2.0 * M_PI) * (1.0 + sgn * rel) + sgn * kTiny);
}

// float64 values of act_forward and act_backward (finite inputs), intermediates moved by sgn.
double ref_forward(const ActParams& p, double g, double u, int sgn = 0) {
  switch (p.kind) {
    case Activation::kSwiglu: return g * sig_p(g, sgn) * u;
    case Activation::kGeglu: return g * cdf_p(g, sgn) * u;
    default: {
      const double gc = std::fmin(g, p.limit), uc = std::fmin(std::fmax(u, -p.limit), p.limit);
      return (uc + 1.0) * gc * sig_p(p.alpha * gc, sgn);
    }
  }
}
// d/dg and d/du times dy, and the scale of each (the sum of its terms' magnitudes).
void ref_backward(const ActParams& p, double g, double u, double dy, double* dg, double* du,
                  double* sg, double* su, int sgn = 0) {
  switch (p.kind) {
    case Activation::kSwiglu: {
      const double s = sig_p(g, sgn);
      *du = dy * g * s;
      *su = std::fabs(*du);
      *dg = dy * u * s * (1.0 + g * (1.0 - s));
      *sg = std::fabs(dy * u * s) * (1.0 + std::fabs(g * (1.0 - s)));
      return;
    }
    case Activation::kGeglu: {
      const double cdf = cdf_p(g, sgn), pdf = pdf_p(g, sgn);
      *du = dy * g * cdf;
      *su = std::fabs(*du);
      *dg = dy * u * (cdf + g * pdf);
      *sg = std::fabs(dy * u) * (cdf + std::fabs(g * pdf));
      return;
    }
    default: {
      const bool g_pass = g <= p.limit, u_pass = u >= -p.limit && u <= p.limit;
      const double gc = g_pass ? g : p.limit, uc = std::fmin(std::fmax(u, -p.limit), p.limit);
      const double s = sig_p(p.alpha * gc, sgn);
      *du = u_pass ? dy * gc * s : 0.0;
      *su = std::fabs(*du);
      *dg = g_pass ? dy * (uc + 1.0) * s * (1.0 + p.alpha * gc * (1.0 - s)) : 0.0;
      *sg = g_pass ? std::fabs(dy * (uc + 1.0) * s) * (1.0 + std::fabs(p.alpha * gc * (1.0 - s)))
                   : 0.0;
    }
  }
}

// Bound on |float32 - float64|: the intermediates' spread, a few roundings of the result's terms
// (kRtol of their magnitudes' sum) and a subnormal product's rounding (half the smallest
// subnormal, 2^-150, times the factors applied after it; kAtol times their bound).
constexpr double kRtol = 1e-6, kAtol = 2.8e-45;

// The largest |f(+-1) - f(0)|.
template <class F>
double spread(const F& f) {
  const double c = f(0);
  return std::fmax(std::fabs(f(1) - c), std::fabs(f(-1) - c));
}

void expect_close(const char* what, const ActParams& p, double got, double ref, double scale,
                  double pert, double factors, float g, float u) {
  if (std::fabs(got - ref) <= pert + kRtol * scale + kAtol * factors) return;
  if (++failures <= 20)
    std::printf(
        "FAIL %s kind %d: g %.9g u %.9g: got %.9g, float64 %.9g (scale %.3g, spread %.3g)\n", what,
        static_cast<int>(p.kind), g, u, got, ref, scale, pert);
}

// Every output of (g, u, dy) against float64.
void expect_all(const char* what, const ActParams& p, float g, float u, float dy, float h, float dg,
                float du) {
  const double factors =
      (1.0 + std::fabs(g)) * (1.0 + std::fabs(u)) * (1.0 + std::fabs(dy)) * (1.0 + p.alpha);
  const double ref = ref_forward(p, g, u);
  expect_close(what, p, h, ref, std::fabs(ref),
               spread([&](int s) { return ref_forward(p, g, u, s); }), factors, g, u);
  double rdg, rdu, sg, su, t1, t2, t3;
  ref_backward(p, g, u, dy, &rdg, &rdu, &sg, &su);
  const double pg = spread([&](int s) {
    ref_backward(p, g, u, dy, &t1, &t2, &t3, &t3, s);
    return t1;
  });
  const double pu = spread([&](int s) {
    ref_backward(p, g, u, dy, &t1, &t2, &t3, &t3, s);
    return t2;
  });
  expect_close(what, p, dg, rdg, sg, pg, factors, g, u);
  expect_close(what, p, du, rdu, su, pu, factors, g, u);
}

int cls(float v) { return std::isnan(v) ? 2 : std::isinf(v) ? (v > 0 ? 3 : 4) : 0; }

void expect_same_class(const char* what, const ActParams& p, float got, float want, float g,
                       float u) {
  if (cls(got) == cls(want)) return;
  if (++failures <= 20)
    std::printf("FAIL %s kind %d: g %.9g u %.9g: got %.9g, the scalar code %.9g\n", what,
                static_cast<int>(p.kind), g, u, got, want);
}

void check_sweep(const ActParams& p, std::mt19937& rng) {
  std::uniform_real_distribution<float> ud(-8.f, 8.f), dd(-2.f, 2.f);
  const int64_t n = 40001;
  std::vector<float> g(n), u(n), gy(n), h(n), gb, ub;
  for (int64_t i = 0; i < n; ++i) {
    g[i] = -100.f + 200.f * static_cast<float>(i) / static_cast<float>(n - 1);
    u[i] = ud(rng);
    gy[i] = dd(rng);
  }
  const float scale = 0.75f;
  act_forward_row(p, g.data(), u.data(), h.data(), n);
  gb = g;
  ub = u;
  act_backward_row(p, gb.data(), ub.data(), gy.data(), scale, n);
  for (int64_t i = 0; i < n; ++i)
    expect_all("sweep", p, g[i], u[i], scale * gy[i], h[i], gb[i], ub[i]);
}

void check_specials(const ActParams& p) {
  const float inf = INFINITY, nan = NAN;
  // e^x's float range ends near 88.72 (overflow), -87.34 (subnormal) and -103.97 (zero)
  const std::vector<float> v = {0.f,    -0.f,    1.f,     -1.f,     inf,
                                -inf,   nan,     88.37f,  88.38f,   88.72f,
                                88.73f, -88.38f, -88.72f, -88.73f,  87.3f,
                                -87.3f, -87.4f,  -103.9f, -104.1f,  -150.f,
                                1e-30f, -1e-30f, p.limit, -p.limit, std::nextafter(p.limit, inf),
                                1e30f,  -1e30f};
  std::vector<float> g, u, gy;
  for (float a : v)
    for (float b : v) {
      g.push_back(a);
      u.push_back(b);
      gy.push_back(0.5f);
    }
  const int64_t n = static_cast<int64_t>(g.size());
  std::vector<float> h(n), gb = g, ub = u;
  act_forward_row(p, g.data(), u.data(), h.data(), n);
  act_backward_row(p, gb.data(), ub.data(), gy.data(), 1.f, n);
  for (int64_t i = 0; i < n; ++i) {
    const float want = act_forward(p, g[i], u[i]);
    expect_same_class("forward (specials)", p, h[i], want, g[i], u[i]);
    float dg, du;
    act_backward(p, g[i], u[i], gy[i], &dg, &du);
    expect_same_class("backward dg (specials)", p, gb[i], dg, g[i], u[i]);
    expect_same_class("backward du (specials)", p, ub[i], du, g[i], u[i]);
    if (std::isfinite(g[i]) && std::isfinite(u[i]) && std::fabs(g[i]) < 1e29f &&
        std::fabs(u[i]) < 1e29f)
      expect_all("specials", p, g[i], u[i], gy[i], h[i], gb[i], ub[i]);
  }
}

void check_splits(const ActParams& p, std::mt19937& rng) {
  std::normal_distribution<float> nd(0.f, 3.f);
  for (int64_t n = 1; n <= 40; ++n) {
    std::vector<float> g(n), u(n), gy(n), whole(n), part(n);
    for (int64_t i = 0; i < n; ++i) {
      g[i] = nd(rng);
      u[i] = nd(rng);
      gy[i] = nd(rng);
    }
    act_forward_row(p, g.data(), u.data(), whole.data(), n);
    std::vector<float> gw = g, uw = u;
    act_backward_row(p, gw.data(), uw.data(), gy.data(), 0.5f, n);
    for (int64_t cut = 1; cut < n; ++cut) {
      act_forward_row(p, g.data(), u.data(), part.data(), cut);
      act_forward_row(p, g.data() + cut, u.data() + cut, part.data() + cut, n - cut);
      std::vector<float> gp = g, up = u;
      act_backward_row(p, gp.data(), up.data(), gy.data(), 0.5f, cut);
      act_backward_row(p, gp.data() + cut, up.data() + cut, gy.data() + cut, 0.5f, n - cut);
      if (std::memcmp(whole.data(), part.data(), n * 4) != 0 ||
          std::memcmp(gw.data(), gp.data(), n * 4) != 0 ||
          std::memcmp(uw.data(), up.data(), n * 4) != 0) {
        if (++failures <= 20)
          std::printf("FAIL kind %d: a row of %ld split at %ld changes its values\n",
                      static_cast<int>(p.kind), static_cast<long>(n), static_cast<long>(cut));
      }
    }
  }
}

// At the avx512 level: every forward value the same bits as the avx2 level's (wide rows, specials
// included), so the level a machine runs never changes a result.
void check_levels(const ActParams& p, std::mt19937& rng) {
  if (g_isa != Isa::kAvx512) return;
  std::normal_distribution<float> nd(0.f, 8.f);
  const float specials[] = {0.f, -0.f, INFINITY, -INFINITY, NAN, 88.7f, -103.9f, 200.f, -200.f};
  for (int64_t n = 1; n <= 70; ++n) {
    std::vector<float> g(n), u(n), h512(n), h2(n);
    for (int64_t i = 0; i < n; ++i) {
      g[i] = i % 7 == 3 ? specials[(n + i) % 9] : nd(rng);
      u[i] = nd(rng);
    }
    act_forward_row(p, g.data(), u.data(), h512.data(), n);
    g_isa = Isa::kAvx2;
    act_forward_row(p, g.data(), u.data(), h2.data(), n);
    g_isa = Isa::kAvx512;
    if (std::memcmp(h512.data(), h2.data(), n * 4) != 0 && ++failures <= 20)
      std::printf("FAIL kind %d: a row of %ld differs from the avx2 level's\n",
                  static_cast<int>(p.kind), static_cast<long>(n));
  }
}

}  // namespace

int main(int argc, char** argv) {
  const std::string isa = argc > 1 ? argv[1] : "";
  if (isa == "scalar") {
    g_isa = Isa::kScalar;
  } else if (isa == "avx2") {
    g_isa = Isa::kAvx2;
  } else if (isa == "avx512") {
    g_isa = Isa::kAvx512;
  } else {
    std::printf("usage: act_check scalar|avx2|avx512\n");
    return 2;
  }
  std::mt19937 rng(1234);
  const ActParams params[] = {{Activation::kSwiglu, 1.f, 0.f},
                              {Activation::kGeglu, 1.f, 0.f},
                              {Activation::kSwigluOai, 1.702f, 7.f}};
  for (const ActParams& p : params) {
    check_sweep(p, rng);
    check_specials(p);
    check_splits(p, rng);
    check_levels(p, rng);
  }
  if (failures > 0) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("ok\n");
  return 0;
}
