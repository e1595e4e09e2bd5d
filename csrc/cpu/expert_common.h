#pragma once
// Helpers shared by the grouped GEMM and fused expert FFN kernels: tensor -> Operand views,
// fp32 tile stores, block task lists.
#include <vector>

#include "cpu/cpu_utils.h"
#include "cpu/gemm.h"

namespace moe_kernels::cpu {

inline DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kF32;
    case at::kBFloat16: return DType::kBF16;
    case at::kHalf: return DType::kF16;
    default: TORCH_CHECK(false, "moe_kernels (cpu): unsupported dtype ", t);
  }
}

// Operand over a 2-D (or a 3-D tensor's slice e) view: element (i, j) = base[i * s0 + j * s1].
inline Operand operand(const at::Tensor& t, int64_t s0, int64_t s1, int64_t offset_elems = 0,
                       const int64_t* gather = nullptr) {
  Operand o;
  o.dt = to_dtype(t.scalar_type());
  o.p = static_cast<const char*>(t.data_ptr()) + offset_elems * t.element_size();
  o.s0 = s0;
  o.s1 = s1;
  o.gather = gather;
  return o;
}
inline Operand operand_f32(const float* p, int64_t s0, int64_t s1,
                           const int64_t* gather = nullptr) {
  Operand o;
  o.dt = DType::kF32;
  o.p = p;
  o.s0 = s0;
  o.s1 = s1;
  o.gather = gather;
  return o;
}

// dst[j * stride] = src[j] for j < n, converted to the tensor dtype.
void store_f32(const float* src, void* dst, at::ScalarType dt, int64_t n, int64_t stride = 1);

// store_f32 of n contiguous values into bf16, with non-temporal stores (past the caches) where
// the CPU has AVX2: for results read again only after much other memory traffic.  The caller
// orders them with an sfence (_mm_sfence) before another thread reads dst.
void store_bf16_stream(const float* src, c10::BFloat16* dst, int64_t n);
// dst[j] = 0 for n elements of dtype dt.
void store_zeros(void* dst, at::ScalarType dt, int64_t n, int64_t stride = 1);

// Row primitives of the permutation ops, in fp32 arithmetic, for a contiguous row src of dtype dt
// (fp32, bf16 or fp16): acc[j] += w * src[j], dst[j] = w * src[j] (each product rounded, then
// added: the same values at every ISA level), and the dot product of two such rows (8 lanes and
// four partial sums at the avx2 level and above, in a fixed order: the same value at every call).
void add_scaled_row(float* acc, const void* src, at::ScalarType dt, int64_t n, float w);
void scale_row(float* dst, const void* src, at::ScalarType dt, int64_t n, float w);
float dot_rows(const void* a, at::ScalarType adt, const void* b, at::ScalarType bdt, int64_t n);

// (expert, row range, column range) work items.
struct Task {
  int64_t e, m0, m1, n0, n1;
};

// Splits each expert's [begin[e], end[e]) rows into near-equal blocks of at most mb rows and
// [0, N) into blocks of nb columns.  Experts without rows produce no task when skip_empty.
std::vector<Task> make_tasks(int64_t E, const int64_t* begin, const int64_t* end, int64_t N,
                             int64_t mb, int64_t nb, bool skip_empty = true);

// Column block so that there are at least ~4 tasks per thread when possible.
int64_t pick_col_block(int64_t total_row_blocks, int64_t N, int64_t preferred, int64_t minimum);

// The ragged-K weight gradient of every expert: grad[e][m, n] = sum_r P(m, r) * Q(n, r) over the
// rows r in [begin[e], end[e]) (P, Q: operands of Mp and Nq logical rows whose K index is the
// row; grad [E, Mp, Nq] contiguous, any float dtype).  Experts without rows get exact zeros.
// A task is one expert's block of whole output rows, so that every task writes one contiguous
// region (fresh output pages are faulted in by one thread per region).
void expert_weight_grad(const std::vector<int64_t>& begin, const std::vector<int64_t>& end,
                        const Operand& P, const Operand& Q, at::Tensor& grad);

// Whether gemm_nt multiplies operands of this dtype past its dot path on the AVX-512-BF16
// routes (bf16 at the amx level), which pack a call's rows once per call: tasks over more
// columns then pack them less often than the packed path's blocking would.
inline bool bf16_routes(at::ScalarType dt) {
  return dt == at::kBFloat16 && detected_isa() == Isa::kAmx;
}

}  // namespace moe_kernels::cpu
