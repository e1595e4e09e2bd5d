#include "cpu/expert_common.h"

#include <immintrin.h>

#include <algorithm>

#include "cpu/cpu_info.h"

namespace moe_kernels::cpu {
namespace {

// bf16(p[0..8)) as 8 dwords: c10::BFloat16's conversion (round to nearest even, every NaN to
// 0x7fc0).
__attribute__((target("avx2"))) inline __m256i round8_bf16(const float* p) {
  const __m256 x = _mm256_loadu_ps(p);
  const __m256i u = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r =
      _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb)), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), nan);
}

// dst[j] = bf16(src[j]) for j < n, 16 at a time (the outputs of 16-bit models: the weight
// gradients alone are a gigabyte per backward call at real layer shapes); Stream: the 16-value
// pieces whose destination is 32-byte aligned with non-temporal stores.
template <bool Stream>
__attribute__((target("avx2"))) void store_bf16_avx2(const float* src, c10::BFloat16* dst,
                                                     int64_t n) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    // packus interleaves the two inputs' 128-bit halves; the permute puts them back in order
    const __m256i v = _mm256_permute4x64_epi64(
        _mm256_packus_epi32(round8_bf16(src + j), round8_bf16(src + j + 8)), 0xd8);
    auto* d = reinterpret_cast<__m256i*>(dst + j);
    if (Stream && reinterpret_cast<uintptr_t>(d) % 32 == 0) {
      _mm256_stream_si256(d, v);
    } else {
      _mm256_storeu_si256(d, v);
    }
  }
  for (; j < n; ++j) dst[j] = c10::BFloat16(src[j]);
}

// Elements of a row of dtype S (0 fp32, 1 bf16, 2 fp16) as fp32: one, or 8 from j on.
template <int S>
inline float ld1(const void* p, int64_t j) {
  if constexpr (S == 0) return static_cast<const float*>(p)[j];
  if constexpr (S == 1) return static_cast<float>(static_cast<const c10::BFloat16*>(p)[j]);
  return static_cast<float>(static_cast<const c10::Half*>(p)[j]);
}
template <int S>
__attribute__((target("avx2,f16c"))) inline __m256 ld8(const void* p, int64_t j) {
  if constexpr (S == 0) return _mm256_loadu_ps(static_cast<const float*>(p) + j);
  const __m128i h =
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + j));
  if constexpr (S == 1) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  return _mm256_cvtph_ps(h);
}

// No fma in the target: the tail's w * x + acc must round the product as the vector body does.
template <int S, bool ADD>
__attribute__((target("avx2,f16c"))) void scaled_avx2(float* acc, const void* src, int64_t n,
                                                      float w) {
  const __m256 wv = _mm256_set1_ps(w);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 v = _mm256_mul_ps(wv, ld8<S>(src, j));
    _mm256_storeu_ps(acc + j, ADD ? _mm256_add_ps(_mm256_loadu_ps(acc + j), v) : v);
  }
  for (; j < n; ++j) acc[j] = ADD ? acc[j] + w * ld1<S>(src, j) : w * ld1<S>(src, j);
}

template <int A, int B>
__attribute__((target("avx2,fma,f16c"))) float dot_avx2(const void* a, const void* b, int64_t n) {
  __m256 s[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                 _mm256_setzero_ps()};
  int64_t j = 0;
  for (; j + 32 <= n; j += 32)
    for (int u = 0; u < 4; ++u)
      s[u] = _mm256_fmadd_ps(ld8<A>(a, j + 8 * u), ld8<B>(b, j + 8 * u), s[u]);
  for (; j + 8 <= n; j += 8) s[0] = _mm256_fmadd_ps(ld8<A>(a, j), ld8<B>(b, j), s[0]);
  const __m256 t = _mm256_add_ps(_mm256_add_ps(s[0], s[1]), _mm256_add_ps(s[2], s[3]));
  alignas(32) float l[8];
  _mm256_store_ps(l, t);
  float r = ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
  for (; j < n; ++j) r += ld1<A>(a, j) * ld1<B>(b, j);
  return r;
}

template <int S>
float dot_scalar(const void* a, const void* b, at::ScalarType bdt, int64_t n) {
  float r = 0.f;
  for (int64_t j = 0; j < n; ++j)
    r += ld1<S>(a, j) * (bdt == at::kFloat      ? ld1<0>(b, j)
                         : bdt == at::kBFloat16 ? ld1<1>(b, j)
                                                : ld1<2>(b, j));
  return r;
}

// 0 / 1 / 2 for fp32 / bf16 / fp16 (the dtypes of check_float's 16- and 32-bit floats).
int src_kind(at::ScalarType dt) {
  switch (dt) {
    case at::kFloat: return 0;
    case at::kBFloat16: return 1;
    case at::kHalf: return 2;
    default: TORCH_CHECK(false, "moe_kernels (cpu): unsupported dtype ", dt);
  }
}

template <bool ADD>
void scaled_row(float* acc, const void* src, at::ScalarType dt, int64_t n, float w) {
  const int s = src_kind(dt);
  if (detected_isa() >= Isa::kAvx2) {
    if (s == 0) return scaled_avx2<0, ADD>(acc, src, n, w);
    if (s == 1) return scaled_avx2<1, ADD>(acc, src, n, w);
    return scaled_avx2<2, ADD>(acc, src, n, w);
  }
  for (int64_t j = 0; j < n; ++j) {
    const float x = s == 0 ? ld1<0>(src, j) : s == 1 ? ld1<1>(src, j) : ld1<2>(src, j);
    acc[j] = ADD ? acc[j] + w * x : w * x;
  }
}

}  // namespace

void add_scaled_row(float* acc, const void* src, at::ScalarType dt, int64_t n, float w) {
  scaled_row<true>(acc, src, dt, n, w);
}
void scale_row(float* dst, const void* src, at::ScalarType dt, int64_t n, float w) {
  scaled_row<false>(dst, src, dt, n, w);
}

float dot_rows(const void* a, at::ScalarType adt, const void* b, at::ScalarType bdt, int64_t n) {
  const int sa = src_kind(adt), sb = src_kind(bdt);
  if (detected_isa() < Isa::kAvx2) {
    if (sa == 0) return dot_scalar<0>(a, b, bdt, n);
    if (sa == 1) return dot_scalar<1>(a, b, bdt, n);
    return dot_scalar<2>(a, b, bdt, n);
  }
  switch (sa * 3 + sb) {
    case 0: return dot_avx2<0, 0>(a, b, n);
    case 1: return dot_avx2<0, 1>(a, b, n);
    case 2: return dot_avx2<0, 2>(a, b, n);
    case 3: return dot_avx2<1, 0>(a, b, n);
    case 4: return dot_avx2<1, 1>(a, b, n);
    case 5: return dot_avx2<1, 2>(a, b, n);
    case 6: return dot_avx2<2, 0>(a, b, n);
    case 7: return dot_avx2<2, 1>(a, b, n);
    default: return dot_avx2<2, 2>(a, b, n);
  }
}

void store_f32(const float* src, void* dst, at::ScalarType dt, int64_t n, int64_t stride) {
  switch (dt) {
    case at::kFloat: {
      float* d = static_cast<float*>(dst);
      if (stride == 1) {
        std::copy(src, src + n, d);
      } else {
        for (int64_t j = 0; j < n; ++j) d[j * stride] = src[j];
      }
      return;
    }
    case at::kBFloat16: {
      auto* d = static_cast<c10::BFloat16*>(dst);
      if (stride == 1 && detected_isa() >= Isa::kAvx2) return store_bf16_avx2<false>(src, d, n);
      for (int64_t j = 0; j < n; ++j) d[j * stride] = c10::BFloat16(src[j]);
      return;
    }
    case at::kHalf: {
      auto* d = static_cast<c10::Half*>(dst);
      for (int64_t j = 0; j < n; ++j) d[j * stride] = c10::Half(src[j]);
      return;
    }
    default: TORCH_CHECK(false, "moe_kernels (cpu): unsupported output dtype ", dt);
  }
}

void store_bf16_stream(const float* src, c10::BFloat16* dst, int64_t n) {
  if (detected_isa() >= Isa::kAvx2) return store_bf16_avx2<true>(src, dst, n);
  store_f32(src, dst, at::kBFloat16, n);
}

void store_zeros(void* dst, at::ScalarType dt, int64_t n, int64_t stride) {
  const int64_t es = c10::elementSize(dt);
  char* d = static_cast<char*>(dst);
  if (stride == 1) {
    std::memset(d, 0, n * es);
  } else {
    for (int64_t j = 0; j < n; ++j) std::memset(d + j * stride * es, 0, es);
  }
}

std::vector<Task> make_tasks(int64_t E, const int64_t* begin, const int64_t* end, int64_t N,
                             int64_t mb, int64_t nb, bool skip_empty) {
  std::vector<Task> tasks;
  nb = std::max<int64_t>(nb, 1);
  for (int64_t e = 0; e < E; ++e) {
    const int64_t rows = end[e] - begin[e];
    if (rows <= 0 && skip_empty) continue;
    const int64_t nblk = rows <= 0 ? 1 : (rows + mb - 1) / mb;
    const int64_t per = rows <= 0 ? 0 : (rows + nblk - 1) / nblk;
    for (int64_t b = 0; b < nblk; ++b) {
      const int64_t m0 = begin[e] + b * per, m1 = std::min(end[e], m0 + per);
      for (int64_t n0 = 0; n0 < N; n0 += nb)
        tasks.push_back({e, m0, std::max(m0, m1), n0, std::min(N, n0 + nb)});
    }
  }
  return tasks;
}

void expert_weight_grad(const std::vector<int64_t>& begin, const std::vector<int64_t>& end,
                        const Operand& P, const Operand& Q, at::Tensor& grad) {
  constexpr int64_t kRows = 256;
  const int64_t E = grad.size(0), Mp = grad.size(1), Nq = grad.size(2);
  const std::vector<int64_t> zero(E, 0), full(E, Mp);
  const std::vector<Task> tasks =
      make_tasks(E, zero.data(), full.data(), Nq, kRows, std::max<int64_t>(Nq, 1), false);
  // Columns per GEMM call: each call packs its blocks of P and Q (K = the expert's rows, few);
  // on the bf16 routes, 512 columns pack P half as often as 256, with the fp32 tile in L2.
  const bool bf16 = (P.dt == DType::kBF16 || P.max_terms == 1) &&
                    (Q.dt == DType::kBF16 || Q.max_terms == 1) && bf16_routes(grad.scalar_type());
  const int64_t nc = bf16 ? 512 : 256;
  char* gp = static_cast<char*>(grad.data_ptr());
  const int64_t es = grad.element_size();
  const at::ScalarType gdt = grad.scalar_type();
  parallel_tasks(static_cast<int64_t>(tasks.size()), [&](int64_t i, int64_t) {
    const Task& t = tasks[i];
    const int64_t mb = t.m1 - t.m0, rows = end[t.e] - begin[t.e];
    char* g0 = gp + (t.e * Mp + t.m0) * Nq * es;          // the task's rows: whole rows, contiguous
    if (rows <= 0) return store_zeros(g0, gdt, mb * Nq);  // an expert without rows
    thread_local ScratchVector<float> tile;
    const Operand A = P.shifted(t.m0, begin[t.e]), B = Q.shifted(0, begin[t.e]);
    for (int64_t n0 = 0; n0 < Nq; n0 += nc) {
      const int64_t nb = std::min(nc, Nq - n0);
      const Operand Bn = B.shifted(n0, 0);
      // bf16 gradients: rounded in the GEMM's epilogue where a route does (no fp32 tile)
      if (gdt == at::kBFloat16 &&
          gemm_nt_bf16(mb, nb, rows, A, Bn, reinterpret_cast<uint16_t*>(g0) + n0, Nq))
        continue;
      if (static_cast<int64_t>(tile.size()) < mb * nb) tile.resize(mb * nb);
      gemm_nt(mb, nb, rows, A, Bn, tile.data(), nb);
      for (int64_t m = 0; m < mb; ++m)
        store_f32(tile.data() + m * nb, g0 + (m * Nq + n0) * es, gdt, nb);
    }
  });
}

int64_t pick_col_block(int64_t total_row_blocks, int64_t N, int64_t preferred, int64_t minimum) {
  const int64_t want = 4 * static_cast<int64_t>(at::get_num_threads());
  int64_t nb = preferred;
  while (nb > minimum && total_row_blocks * ((N + nb - 1) / nb) < want) nb /= 2;
  return std::max<int64_t>(nb, 1);
}

}  // namespace moe_kernels::cpu
