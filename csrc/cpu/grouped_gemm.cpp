// grouped_gemm (+ backward) on CPU: segment-wise a[rows of e] @ b[e] on the GEMM engine.
#include <functional>
#include <vector>

#include "cpu/expert_common.h"
#include "cpu/ops.h"

namespace moe_kernels::cpu {
namespace {

constexpr int64_t kRowBlock = 96;

// Segment bounds from offs (values checked: non-decreasing, within [0, M]).
void segments(const at::Tensor& offs, int64_t M, std::vector<int64_t>& begin,
              std::vector<int64_t>& end) {
  const int64_t E = offs.size(0);
  at::Tensor o = offs.contiguous();
  const IndexView ov(o);
  begin.resize(E);
  end.resize(E);
  int64_t prev = 0;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t v = ov[e];
    TORCH_CHECK(v >= prev && v <= M, "moe_kernels (cpu): offs must be non-decreasing within [0, ",
                M, "], got offs[", e, "]=", v, (e > 0 ? " after " : ""),
                (e > 0 ? std::to_string(prev) : std::string()));
    begin[e] = prev;
    end[e] = v;
    prev = v;
  }
}

void check_gg(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offs, bool trans_b) {
  check_cpu(a, "a");
  check_cpu(b, "b");
  check_cpu(offs, "offs");
  check_dim(a, 2, "a");
  check_dim(b, 3, "b");
  check_dim(offs, 1, "offs");
  check_float(a, "a");
  check_float(b, "b");
  check_index(offs, "offs");
  TORCH_CHECK(offs.size(0) == b.size(0), "moe_kernels (cpu): offs must have E=", b.size(0),
              " entries (one per expert of b), got ", offs.size(0));
  const int64_t Kb = trans_b ? b.size(2) : b.size(1);
  TORCH_CHECK(Kb == a.size(1), "moe_kernels (cpu): a is [M, K=", a.size(1), "] but b ",
              (trans_b ? "[E, N, K]" : "[E, K, N]"), " has K=", Kb, " (shape ", b.sizes(), ")");
}

// b[e] as the engine's B(n, k) for out = a @ b[e] (or b[e]^T with trans_b).
Operand b_operand(const at::Tensor& b, int64_t e, bool trans_b) {
  return trans_b ? operand(b, b.stride(1), b.stride(2), e * b.stride(0))
                 : operand(b, b.stride(2), b.stride(1), e * b.stride(0));
}

// out[r, :] = A(r, :) @ B_e^T for the rows of each segment; zeros for rows past the last one.
void segmented_gemm(const at::Tensor& a_t, const std::vector<int64_t>& begin,
                    const std::vector<int64_t>& end, int64_t N, int64_t K,
                    const std::function<Operand(int64_t)>& b_of, at::Tensor& out) {
  const int64_t E = static_cast<int64_t>(begin.size()), M = out.size(0);
  int64_t row_blocks = 0;
  for (int64_t e = 0; e < E; ++e)
    if (end[e] > begin[e]) row_blocks += (end[e] - begin[e] + kRowBlock - 1) / kRowBlock;
  // on the bf16 routes, a task packs its rows once for 8x the columns
  const int64_t nb = pick_col_block(row_blocks, N, bf16_routes(a_t.scalar_type()) ? 2048 : 256, 16);
  const std::vector<Task> tasks = make_tasks(E, begin.data(), end.data(), N, kRowBlock, nb);
  const Operand A = operand(a_t, a_t.stride(0), a_t.stride(1));
  char* op = static_cast<char*>(out.data_ptr());
  const int64_t es = out.element_size(), ldo = out.stride(0);
  const at::ScalarType odt = out.scalar_type();
  parallel_tasks(static_cast<int64_t>(tasks.size()), [&](int64_t i, int64_t) {
    const Task& t = tasks[i];
    const int64_t mb = t.m1 - t.m0, nbt = t.n1 - t.n0;
    const Operand At = A.shifted(t.m0, 0), Bt = b_of(t.e).shifted(t.n0, 0);
    if (odt == at::kBFloat16 &&
        gemm_nt_bf16(mb, nbt, K, At, Bt, reinterpret_cast<uint16_t*>(op + (t.m0 * ldo + t.n0) * es),
                     ldo))
      return;
    thread_local ScratchVector<float> tile;
    if (static_cast<int64_t>(tile.size()) < mb * nbt) tile.resize(mb * nbt);
    gemm_nt(mb, nbt, K, At, Bt, tile.data(), nbt);
    for (int64_t m = 0; m < mb; ++m)
      store_f32(tile.data() + m * nbt, op + ((t.m0 + m) * ldo + t.n0) * es, odt, nbt);
  });
  const int64_t used = E > 0 ? end[E - 1] : 0;
  if (used < M) store_zeros(op + used * ldo * es, odt, (M - used) * N);
}

at::Tensor grouped_gemm_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offs,
                            bool trans_b) {
  check_gg(a, b, offs, trans_b);
  const int64_t M = a.size(0), K = a.size(1);
  const int64_t N = trans_b ? b.size(1) : b.size(2);
  std::vector<int64_t> begin, end;
  segments(offs, M, begin, end);
  at::Tensor out = new_output({M, N}, a.options());
  if (M == 0 || N == 0) return out;
  segmented_gemm(a, begin, end, N, K, [&](int64_t e) { return b_operand(b, e, trans_b); }, out);
  return out;
}

// grad[e] (shape [P_cols, Q_cols]) = P[seg e]^T @ Q[seg e]: the ragged-K weight gradient.
void weight_grad(const at::Tensor& P, const at::Tensor& Q, const std::vector<int64_t>& begin,
                 const std::vector<int64_t>& end, at::Tensor& grad) {
  // A(m, r) = P[r, m], B(n, r) = Q[r, n]
  expert_weight_grad(begin, end, operand(P, P.stride(1), P.stride(0)),
                     operand(Q, Q.stride(1), Q.stride(0)), grad);
}

std::tuple<at::Tensor, at::Tensor> grouped_gemm_backward_cpu(const at::Tensor& grad_out,
                                                             const at::Tensor& a,
                                                             const at::Tensor& b,
                                                             const at::Tensor& offs, bool trans_b,
                                                             bool need_grad_a, bool need_grad_b) {
  check_gg(a, b, offs, trans_b);
  check_cpu(grad_out, "grad_out");
  check_float(grad_out, "grad_out");
  const int64_t M = a.size(0), K = a.size(1);
  const int64_t N = trans_b ? b.size(1) : b.size(2);
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == M && grad_out.size(1) == N,
              "moe_kernels (cpu): grad_out must be [M=", M, ", N=", N, "], got ", grad_out.sizes());
  std::vector<int64_t> begin, end;
  segments(offs, M, begin, end);
  at::Tensor grad_a = at::empty({0}, a.options()), grad_b = at::empty({0}, b.options());
  if (need_grad_a) {
    grad_a = new_output({M, K}, a.options());
    if (M > 0 && K > 0) {
      // grad_a[r, kk] = sum_n grad_out[r, n] * b[e](kk, n)
      segmented_gemm(
          grad_out, begin, end, K, N,
          [&](int64_t e) {
            return trans_b ? operand(b, b.stride(2), b.stride(1), e * b.stride(0))
                           : operand(b, b.stride(1), b.stride(2), e * b.stride(0));
          },
          grad_a);
    }
  }
  if (need_grad_b) {
    grad_b = new_output(b.sizes(), b.options().memory_format(at::MemoryFormat::Contiguous));
    if (grad_b.numel() > 0) {
      if (trans_b) {
        weight_grad(grad_out, a, begin, end, grad_b);  // [E, N, K]
      } else {
        weight_grad(a, grad_out, begin, end, grad_b);  // [E, K, N]
      }
    }
  }
  return {grad_a, grad_b};
}

}  // namespace

void register_grouped_gemm(torch::Library& m) {
  m.impl("grouped_gemm", &grouped_gemm_cpu);
  m.impl("grouped_gemm_backward", &grouped_gemm_backward_cpu);
}

}  // namespace moe_kernels::cpu
