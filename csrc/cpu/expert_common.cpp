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
// gradients alone are a gigabyte per backward call at real layer shapes).
__attribute__((target("avx2"))) void store_bf16_avx2(const float* src, c10::BFloat16* dst,
                                                     int64_t n) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    // packus interleaves the two inputs' 128-bit halves; the permute puts them back in order
    const __m256i v = _mm256_permute4x64_epi64(
        _mm256_packus_epi32(round8_bf16(src + j), round8_bf16(src + j + 8)), 0xd8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j), v);
  }
  for (; j < n; ++j) dst[j] = c10::BFloat16(src[j]);
}

}  // namespace

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
      if (stride == 1 && detected_isa() >= Isa::kAvx2) return store_bf16_avx2(src, d, n);
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
    thread_local std::vector<float> tile;
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
