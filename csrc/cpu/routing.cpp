// route / permute / unpermute (+ backward) on CPU.
#include "common/routing.h"

#include <cstring>
#include <vector>

#include "cpu/cpu_utils.h"
#include "cpu/expert_common.h"
#include "cpu/ops.h"
#include "cpu/pair_sort.h"

namespace moe_kernels::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> route_cpu(
    const at::Tensor& topk_ids, int64_t num_experts, int64_t block_size) {
  check_cpu(topk_ids, "topk_ids");
  check_dim(topk_ids, 2, "topk_ids");
  check_index(topk_ids, "topk_ids");
  TORCH_CHECK(num_experts >= 1, "moe_kernels (cpu): num_experts must be >= 1, got ", num_experts);
  TORCH_CHECK(block_size >= 0, "moe_kernels (cpu): block_size must be >= 0, got ", block_size);
  const int64_t T = topk_ids.size(0), k = topk_ids.size(1), E = num_experts, TK = T * k;
  const int64_t num_rows = route_num_rows(T, k, E, block_size);
  auto opts = topk_ids.options().dtype(at::kInt);
  at::Tensor counts = new_output({E}, opts), offs = new_output({E}, opts);
  at::Tensor row_of_slot = new_output({T, k}, opts), slot_of_row = new_output({num_rows}, opts);
  const int64_t nblocks = block_size > 0 ? num_rows / block_size : 0;
  at::Tensor block_expert = new_output({nblocks}, opts);
  at::Tensor ids = topk_ids.contiguous();
  const IndexView idv(ids);
  int32_t* cnt = counts.data_ptr<int32_t>();
  int32_t* off = offs.data_ptr<int32_t>();
  int32_t* ros = row_of_slot.data_ptr<int32_t>();
  int32_t* sor = slot_of_row.data_ptr<int32_t>();
  int32_t* be = block_expert.data_ptr<int32_t>();
  const PairCounts pc = count_pairs(idv, TK, E, block_size);
  for (int64_t e = 0; e < E; ++e) {
    cnt[e] = static_cast<int32_t>(pc.count[e]);
    off[e] = static_cast<int32_t>(pc.start[e] + segment_rows(pc.count[e], block_size));
  }
  std::fill(sor, sor + num_rows, -1);
  place_pairs(idv, TK, E, pc, [&](int64_t i, int64_t r) {
    ros[i] = static_cast<int32_t>(r);
    if (r >= 0) sor[r] = static_cast<int32_t>(i);
  });
  for (int64_t b = 0, e = 0; b < nblocks; ++b) {
    const int64_t row = b * block_size;
    while (e < E && off[e] <= row) ++e;
    be[b] = e < E ? static_cast<int32_t>(e) : -1;
  }
  return {counts, offs, row_of_slot, slot_of_row, block_expert};
}

void check_plan(const at::Tensor& row_of_slot, const at::Tensor& slot_of_row) {
  check_cpu(row_of_slot, "row_of_slot");
  check_cpu(slot_of_row, "slot_of_row");
  check_dim(row_of_slot, 2, "row_of_slot");
  check_dim(slot_of_row, 1, "slot_of_row");
  check_index(row_of_slot, "row_of_slot");
  check_index(slot_of_row, "slot_of_row");
}

template <typename T>
void copy_row(const T* src, int64_t src_stride, T* dst, int64_t H) {
  if (src_stride == 1) {
    std::memcpy(dst, src, H * sizeof(T));
  } else {
    for (int64_t h = 0; h < H; ++h) dst[h] = src[h * src_stride];
  }
}

at::Tensor permute_cpu(const at::Tensor& x, const at::Tensor& row_of_slot,
                       const at::Tensor& slot_of_row) {
  check_cpu(x, "x");
  check_dim(x, 2, "x");
  check_plan(row_of_slot, slot_of_row);
  const int64_t T = x.size(0), H = x.size(1), k = row_of_slot.size(1);
  const int64_t R = slot_of_row.size(0);
  TORCH_CHECK(row_of_slot.size(0) == T, "moe_kernels (cpu): row_of_slot must be [T=", T,
              ", k], got ", row_of_slot.sizes());
  at::Tensor out = new_output({R, H}, x.options());
  at::Tensor sor = slot_of_row.contiguous();
  const IndexView sv(sor);
  // Tests only (set_test_fault("permute")): the last row is left unwritten.
  const int64_t rows_written = test_fault() == TestFault::kPermuteLastRow && R > 0 ? R - 1 : R;
  AT_DISPATCH_ALL_TYPES_AND3(at::kBFloat16, at::kHalf, at::kBool, x.scalar_type(), "permute", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t s0 = x.stride(0), s1 = x.stride(1);
    at::parallel_for(0, rows_written, std::max<int64_t>(1, 4096 / std::max<int64_t>(H, 1)),
                     [&](int64_t r0, int64_t r1) {
                       for (int64_t r = r0; r < r1; ++r) {
                         const int64_t slot = sv[r];
                         scalar_t* dst = op + r * H;
                         if (slot < 0) {
                           std::fill(dst, dst + H, scalar_t(0));
                           continue;
                         }
                         TORCH_CHECK(slot < T * k, "moe_kernels (cpu): slot_of_row[", r, "]=", slot,
                                     " out of range [0, T*k=", T * k, ")");
                         copy_row(xp + (slot / k) * s0, s1, dst, H);
                       }
                     });
  });
  return out;
}

at::Tensor unpermute_cpu(const at::Tensor& y, const at::Tensor& row_of_slot,
                         const at::Tensor& slot_of_row,
                         const std::optional<at::Tensor>& topk_weights) {
  check_cpu(y, "y");
  check_dim(y, 2, "y");
  check_float(y, "y");
  check_plan(row_of_slot, slot_of_row);
  const int64_t T = row_of_slot.size(0), k = row_of_slot.size(1), R = y.size(0), H = y.size(1);
  at::Tensor w;
  if (topk_weights.has_value()) {
    check_cpu(*topk_weights, "topk_weights");
    check_weights_dtype(*topk_weights, "topk_weights");
    TORCH_CHECK(topk_weights->sizes() == row_of_slot.sizes(), "moe_kernels (cpu): topk_weights ",
                topk_weights->sizes(), " must match row_of_slot ", row_of_slot.sizes());
    w = topk_weights->to(at::kFloat).contiguous();
  }
  at::Tensor out = new_output({T, H}, y.options());
  at::Tensor ros = row_of_slot.contiguous();
  const IndexView rv(ros);
  const float* wp = w.defined() ? w.data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "unpermute", [&] {
    const scalar_t* yp = y.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t s0 = y.stride(0), s1 = y.stride(1);
    const bool rows_simd = s1 == 1 && y.scalar_type() != at::kDouble;
    at::parallel_for(0, T, std::max<int64_t>(1, 2048 / std::max<int64_t>(H * k, 1)),
                     [&](int64_t t0, int64_t t1) {
                       std::vector<float> acc(H);
                       for (int64_t t = t0; t < t1; ++t) {
                         std::fill(acc.begin(), acc.end(), 0.f);
                         for (int64_t s = 0; s < k; ++s) {
                           const int64_t r = rv[t * k + s];
                           if (r < 0) continue;
                           TORCH_CHECK(r < R, "moe_kernels (cpu): row_of_slot[", t, ", ", s,
                                       "]=", r, " out of range [0, ", R, ")");
                           const float ws = wp ? wp[t * k + s] : 1.f;
                           const scalar_t* src = yp + r * s0;
                           if (rows_simd) {
                             add_scaled_row(acc.data(), src, y.scalar_type(), H, ws);
                           } else {
                             for (int64_t h = 0; h < H; ++h) acc[h] += ws * to_f32(src[h * s1]);
                           }
                         }
                         if (rows_simd) {
                           store_f32(acc.data(), op + t * H, y.scalar_type(), H);
                         } else {
                           for (int64_t h = 0; h < H; ++h)
                             op[t * H + h] = from_f32<scalar_t>(acc[h]);
                         }
                       }
                     });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> unpermute_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& y, const at::Tensor& row_of_slot,
    const at::Tensor& slot_of_row, const std::optional<at::Tensor>& topk_weights, bool need_grad_y,
    bool need_grad_weights) {
  check_cpu(grad_out, "grad_out");
  check_cpu(y, "y");
  check_float(y, "y");
  check_float(grad_out, "grad_out");
  check_plan(row_of_slot, slot_of_row);
  const int64_t T = row_of_slot.size(0), k = row_of_slot.size(1), R = y.size(0), H = y.size(1);
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == T && grad_out.size(1) == H,
              "moe_kernels (cpu): grad_out must be [T=", T, ", H=", H, "], got ", grad_out.sizes());
  TORCH_CHECK(slot_of_row.size(0) == R, "moe_kernels (cpu): slot_of_row must have y.size(0)=", R,
              " entries, got ", slot_of_row.size(0));
  at::Tensor w;
  if (topk_weights.has_value()) {
    check_cpu(*topk_weights, "topk_weights");
    check_weights_dtype(*topk_weights, "topk_weights");
    TORCH_CHECK(topk_weights->sizes() == row_of_slot.sizes(), "moe_kernels (cpu): topk_weights ",
                topk_weights->sizes(), " must match row_of_slot ", row_of_slot.sizes());
    w = topk_weights->to(at::kFloat).contiguous();
  }
  const float* wp = w.defined() ? w.data_ptr<float>() : nullptr;
  at::Tensor g = grad_out.contiguous();
  at::Tensor grad_y = at::empty({0}, y.options());
  at::Tensor grad_w =
      at::empty({0}, topk_weights.has_value() ? topk_weights->options() : grad_out.options());
  at::Tensor sor = slot_of_row.contiguous(), ros = row_of_slot.contiguous();
  const IndexView sv(sor), rv(ros);
  if (need_grad_y) {
    grad_y = new_output({R, H}, y.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kBFloat16, at::kHalf, y.scalar_type(), "unpermute_bwd_y", [&] {
          using out_t = scalar_t;
          AT_DISPATCH_FLOATING_TYPES_AND2(
              at::kBFloat16, at::kHalf, g.scalar_type(), "unpermute_bwd_g", [&] {
                const scalar_t* gp = g.data_ptr<scalar_t>();
                out_t* op = grad_y.data_ptr<out_t>();
                const bool rows_simd =
                    g.scalar_type() != at::kDouble && grad_y.scalar_type() != at::kDouble;
                at::parallel_for(0, R, std::max<int64_t>(1, 4096 / std::max<int64_t>(H, 1)),
                                 [&](int64_t r0, int64_t r1) {
                                   std::vector<float> row(rows_simd ? H : 0);
                                   for (int64_t r = r0; r < r1; ++r) {
                                     const int64_t slot = sv[r];
                                     out_t* dst = op + r * H;
                                     if (slot < 0) {
                                       std::fill(dst, dst + H, out_t(0));
                                       continue;
                                     }
                                     TORCH_CHECK(slot < T * k, "moe_kernels (cpu): slot_of_row[", r,
                                                 "]=", slot, " out of range");
                                     const float ws = wp ? wp[slot] : 1.f;
                                     const scalar_t* src = gp + (slot / k) * H;
                                     if (rows_simd) {
                                       scale_row(row.data(), src, g.scalar_type(), H, ws);
                                       store_f32(row.data(), dst, grad_y.scalar_type(), H);
                                       continue;
                                     }
                                     for (int64_t h = 0; h < H; ++h)
                                       dst[h] = from_f32<out_t>(ws * to_f32(src[h]));
                                   }
                                 });
              });
        });
  }
  if (need_grad_weights && w.defined()) {
    at::Tensor gw32 = new_output({T, k}, grad_out.options().dtype(at::kFloat));
    float* gwp = gw32.data_ptr<float>();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kBFloat16, at::kHalf, y.scalar_type(), "unpermute_bwd_w", [&] {
          using y_t = scalar_t;
          const y_t* yp = y.data_ptr<y_t>();
          const int64_t s0 = y.stride(0), s1 = y.stride(1);
          AT_DISPATCH_FLOATING_TYPES_AND2(
              at::kBFloat16, at::kHalf, g.scalar_type(), "unpermute_bwd_w2", [&] {
                const scalar_t* gp = g.data_ptr<scalar_t>();
                const bool rows_simd =
                    s1 == 1 && g.scalar_type() != at::kDouble && y.scalar_type() != at::kDouble;
                at::parallel_for(0, T * k, std::max<int64_t>(1, 4096 / std::max<int64_t>(H, 1)),
                                 [&](int64_t i0, int64_t i1) {
                                   for (int64_t i = i0; i < i1; ++i) {
                                     const int64_t r = rv[i];
                                     if (r < 0) {
                                       gwp[i] = 0.f;
                                       continue;
                                     }
                                     TORCH_CHECK(r < R, "moe_kernels (cpu): row_of_slot entry ", r,
                                                 " out of range [0, ", R, ")");
                                     const scalar_t* go = gp + (i / k) * H;
                                     const y_t* yr = yp + r * s0;
                                     if (rows_simd) {
                                       gwp[i] =
                                           dot_rows(go, g.scalar_type(), yr, y.scalar_type(), H);
                                       continue;
                                     }
                                     float acc = 0.f;
                                     for (int64_t h = 0; h < H; ++h)
                                       acc += to_f32(go[h]) * to_f32(yr[h * s1]);
                                     gwp[i] = acc;
                                   }
                                 });
              });
        });
    grad_w = gw32.to(topk_weights->scalar_type());
  }
  return {grad_y, grad_w};
}

}  // namespace

void register_routing(torch::Library& m) {
  m.impl("route", &route_cpu);
  m.impl("permute", &permute_cpu);
  m.impl("unpermute", &unpermute_cpu);
  m.impl("unpermute_backward", &unpermute_backward_cpu);
}

}  // namespace moe_kernels::cpu
