// The Python module moe_kernels._C_cuda: the CUDA kernels of the compiled ops, registered with
// TORCH_LIBRARY_IMPL(moe_kernels, CUDA) against the schemas of moe_kernels/_schemas.py.
//
// This file does the torch side -- argument checks, output and workspace allocation through the
// caching allocator, the current stream, debug-mode poisoning -- and calls the raw-pointer
// launchers of launchers.h.  Nothing here reads device memory back: no host synchronisation.
#include <torch/extension.h>
#if !defined(MOE_KERNELS_CUDA_EMULATION)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <array>
#include <atomic>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

#include "common/routing.h"
#include "common/torch_output.h"
#include "cuda/launchers.h"

// MOE_KERNELS_CUDA_EMULATION: the build of tests/test_cuda_emulated.py, which runs these bindings
// on CPU tensors with the launchers of tests/cpp/cuda_emulator.cpp (kernel bodies on emulated
// warps): the ops are exposed as module functions instead of CUDA dispatcher kernels.
#if defined(MOE_KERNELS_CUDA_EMULATION)
#define MOE_DEVICE_GUARD(t)
#define MOE_ON_DEVICE(t) (t).is_cpu()
#else
#define MOE_DEVICE_GUARD(t) c10::cuda::CUDAGuard device_guard_((t).device())
#define MOE_ON_DEVICE(t) (t).is_cuda()
#endif

namespace moe_kernels::cuda {
namespace {

std::atomic<bool> g_debug{debug_from_env()};

bool debug_mode() { return g_debug.load(std::memory_order_relaxed); }
void set_debug_mode(bool on) { g_debug.store(on, std::memory_order_relaxed); }

// An output every element of which the kernels write (poisoned in debug mode).
at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  return output_tensor(sizes, opts, debug_mode());
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(MOE_ON_DEVICE(t), "moe_kernels (cuda): ", name, " must be a CUDA tensor, got ",
              t.device());
}
void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), "moe_kernels (cuda): ", name, " is on ", t.device(),
              " but the other inputs are on ", ref.device());
}
void check_dim(const at::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK(t.dim() == dim, "moe_kernels (cuda): ", name, " must have ", dim, " dimensions, got ",
              t.dim(), " (shape ", t.sizes(), ")");
}
FloatType float_type(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return FloatType::kF32;
    case at::kBFloat16: return FloatType::kBF16;
    case at::kHalf: return FloatType::kF16;
    default:
      TORCH_CHECK(false, "moe_kernels (cuda): ", name,
                  " must be float32, bfloat16 or float16, got ", t.scalar_type(),
                  " (float64 runs on the reference backend)");
  }
}
void check_index(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong,
              "moe_kernels (cuda): ", name, " must be int32 or int64, got ", t.scalar_type());
}
void check_finite(double v, const char* name) {
  TORCH_CHECK_VALUE(std::isfinite(v), "moe_kernels (cuda): ", name, " must be finite, got ", v);
}
// An index tensor as contiguous int32 for the kernels.  int64 values outside int32's range become
// -1 (a dropped entry) instead of wrapping around into a valid index.
at::Tensor index_i32(const at::Tensor& t) {
  if (t.scalar_type() == at::kInt) return t.contiguous();
  const auto in_range = t.ge(0).logical_and(t.le(std::numeric_limits<int32_t>::max()));
  return at::where(in_range, t, at::scalar_tensor(-1, t.options())).to(at::kInt).contiguous();
}
// Routing weights as contiguous fp32 (any float dtype the API accepts).
at::Tensor weights_f32(const at::Tensor& w, const at::Tensor& like, const char* name) {
  check_same_device(w, like, name);
  TORCH_CHECK(at::isFloatingType(w.scalar_type()), "moe_kernels (cuda): ", name,
              " must be float32, bfloat16, float16 or float64, got ", w.scalar_type());
  return w.to(at::kFloat).contiguous();
}
bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }
// Whether rows of t (2-D) can move in 16-byte pieces.
bool rows_vectorisable(const at::Tensor& t) {
  const int64_t es = t.element_size();
  return (t.size(1) <= 1 || t.stride(1) == 1) && (t.size(1) * es) % 16 == 0 &&
         (t.stride(0) * es) % 16 == 0 && aligned16(t.data_ptr());
}
void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "moe_kernels (cuda): ", op,
              " kernel launch failed: ", cudaGetErrorString(err));
}
#if defined(MOE_KERNELS_CUDA_EMULATION)
cudaStream_t stream() { return nullptr; }
#else
cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
#endif
int checked_int(int64_t v, const char* what) {
  TORCH_CHECK_VALUE(v <= std::numeric_limits<int32_t>::max(), "moe_kernels (cuda): ", what, " (", v,
                    ") must fit in int32");
  return static_cast<int>(v);
}

bool parse_sigmoid(c10::string_view scoring) {
  const std::string s(scoring);
  TORCH_CHECK(s == "softmax" || s == "sigmoid",
              "moe_kernels (cuda): scoring must be 'softmax' or 'sigmoid', got '", s, "'");
  return s == "sigmoid";
}

std::tuple<at::Tensor, at::Tensor> topk_gating_cuda(
    const at::Tensor& router_logits, int64_t top_k, c10::string_view scoring, bool renormalize,
    const std::optional<at::Tensor>& correction_bias, int64_t num_expert_groups,
    int64_t topk_groups, double routed_scaling_factor) {
  check_cuda(router_logits, "router_logits");
  check_dim(router_logits, 2, "router_logits");
  const FloatType ft = float_type(router_logits, "router_logits");
  const int64_t T = router_logits.size(0), E = router_logits.size(1);
  TORCH_CHECK(top_k >= 1 && top_k <= E, "moe_kernels (cuda): top_k must be in [1, E=", E, "], got ",
              top_k);
  const bool sigmoid = parse_sigmoid(scoring);
  check_finite(routed_scaling_factor, "routed_scaling_factor");
  MOE_DEVICE_GUARD(router_logits);
  at::Tensor bias;
  if (correction_bias.has_value()) {
    check_same_device(*correction_bias, router_logits, "correction_bias");
    TORCH_CHECK(correction_bias->dim() == 1 && correction_bias->size(0) == E,
                "moe_kernels (cuda): correction_bias must have shape [E=", E, "], got ",
                correction_bias->sizes());
    bias = correction_bias->to(at::kFloat).contiguous();
  }
  if (num_expert_groups > 0) {
    TORCH_CHECK(E % num_expert_groups == 0,
                "moe_kernels (cuda): num_expert_groups=", num_expert_groups,
                " must divide the number of experts E=", E);
    TORCH_CHECK(topk_groups >= 1 && topk_groups <= num_expert_groups,
                "moe_kernels (cuda): topk_groups must be in [1, num_expert_groups=",
                num_expert_groups, "], got ", topk_groups);
  }
  auto opts = router_logits.options();
  at::Tensor weights = new_output({T, top_k}, opts.dtype(at::kFloat));
  at::Tensor ids = new_output({T, top_k}, opts.dtype(at::kInt));
  if (T == 0) return {weights, ids};
  GatingParams p;
  p.logits = router_logits.data_ptr();
  p.stride_t = router_logits.stride(0);
  p.stride_e = router_logits.stride(1);
  p.T = T;
  p.E = checked_int(E, "the number of experts");
  p.k = static_cast<int>(top_k);
  p.sigmoid = sigmoid;
  p.renormalize = renormalize;
  p.bias = bias.defined() ? bias.data_ptr<float>() : nullptr;
  p.groups = num_expert_groups > 0 ? static_cast<int>(num_expert_groups) : 0;
  p.topk_groups = static_cast<int>(topk_groups);
  p.scale = static_cast<float>(routed_scaling_factor);
  p.weights = weights.data_ptr<float>();
  p.ids = ids.data_ptr<int32_t>();
  const bool in_regs = gating_vpt(p.E) > 0;
  p.scratch_floats = gating_scratch_floats(p.E, p.groups, in_regs);
  at::Tensor scratch;
  if (!in_regs) {
    scratch = at::empty({gating_scratch_warps(T) * p.scratch_floats}, opts.dtype(at::kFloat));
    p.scratch = scratch.data_ptr<float>();
  }
  check_launch(launch_topk_gating(ft, p, stream()), "topk_gating");
  return {weights, ids};
}

at::Tensor topk_gating_backward_cuda(const at::Tensor& grad_weights,
                                     const at::Tensor& router_logits, const at::Tensor& topk_ids,
                                     c10::string_view scoring, bool renormalize,
                                     double routed_scaling_factor) {
  check_cuda(router_logits, "router_logits");
  check_dim(router_logits, 2, "router_logits");
  const FloatType ft = float_type(router_logits, "router_logits");
  check_same_device(grad_weights, router_logits, "grad_weights");
  check_same_device(topk_ids, router_logits, "topk_ids");
  check_index(topk_ids, "topk_ids");
  check_dim(topk_ids, 2, "topk_ids");
  TORCH_CHECK(topk_ids.size(0) == router_logits.size(0) && grad_weights.sizes() == topk_ids.sizes(),
              "moe_kernels (cuda): grad_weights ", grad_weights.sizes(), " and topk_ids ",
              topk_ids.sizes(),
              " must be [T, k] with T = router_logits.size(0) = ", router_logits.size(0));
  const bool sigmoid = parse_sigmoid(scoring);
  check_finite(routed_scaling_factor, "routed_scaling_factor");
  MOE_DEVICE_GUARD(router_logits);
  at::Tensor logits = router_logits.contiguous();
  at::Tensor ids = index_i32(topk_ids);
  at::Tensor gw = grad_weights.to(at::kFloat).contiguous();
  at::Tensor grad = new_output(logits.sizes(), logits.options());
  if (logits.numel() == 0) return grad;
  GatingBackwardParams p;
  p.logits = logits.data_ptr();
  p.grad_w = gw.data_ptr<float>();
  p.ids = ids.data_ptr<int32_t>();
  p.T = logits.size(0);
  p.E = checked_int(logits.size(1), "the number of experts");
  p.k = checked_int(ids.size(1), "top_k");
  p.sigmoid = sigmoid;
  p.renormalize = renormalize;
  p.scale = static_cast<float>(routed_scaling_factor);
  p.grad = grad.data_ptr();
  at::Tensor scratch;
  if (gating_vpt(p.E) == 0) {
    const int64_t epad = (p.E + 31) / 32 * 32;
    scratch = at::empty({gating_scratch_warps(p.T) * 2 * epad}, logits.options().dtype(at::kFloat));
    p.scratch = scratch.data_ptr<float>();
  }
  check_launch(launch_topk_gating_backward(ft, p, stream()), "topk_gating_backward");
  return grad;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> route_cuda(
    const at::Tensor& topk_ids, int64_t num_experts, int64_t block_size) {
  check_cuda(topk_ids, "topk_ids");
  check_dim(topk_ids, 2, "topk_ids");
  check_index(topk_ids, "topk_ids");
  TORCH_CHECK(num_experts >= 1, "moe_kernels (cuda): num_experts must be >= 1, got ", num_experts);
  TORCH_CHECK(block_size >= 0, "moe_kernels (cuda): block_size must be >= 0, got ", block_size);
  MOE_DEVICE_GUARD(topk_ids);
  const int64_t T = topk_ids.size(0), k = topk_ids.size(1), E = num_experts, TK = T * k;
  const int64_t num_rows = route_num_rows(T, k, E, block_size);
  checked_int(num_rows, "the number of permuted rows");
  const int64_t nblocks = block_size > 0 ? num_rows / block_size : 0;
  auto opts = topk_ids.options().dtype(at::kInt);
  at::Tensor counts = new_output({E}, opts), offs = new_output({E}, opts);
  at::Tensor row_of_slot = new_output({T, k}, opts), slot_of_row = new_output({num_rows}, opts);
  at::Tensor block_expert = new_output({nblocks}, opts);
  at::Tensor ids = index_i32(topk_ids);
  const int64_t scan_n = E * ceil_div(TK, kRouteChunk);
  const size_t temp_bytes = route_scan_temp_bytes(scan_n);
  at::Tensor work = at::empty({route_workspace_ints(TK, E)}, opts);
  at::Tensor temp = at::empty({static_cast<int64_t>(temp_bytes)}, opts.dtype(at::kByte));
  RouteParams p;
  p.ids = ids.data_ptr<int32_t>();
  p.TK = TK;
  p.E = E;
  p.block_size = block_size;
  p.num_rows = num_rows;
  p.num_blocks = nblocks;
  int32_t* w = work.data_ptr<int32_t>();
  p.cnt = w;
  p.base = w + scan_n;
  p.rank = w + 2 * scan_n;
  p.start = w + 2 * scan_n + TK;
  p.counts = counts.data_ptr<int32_t>();
  p.offs = offs.data_ptr<int32_t>();
  p.row_of_slot = row_of_slot.data_ptr<int32_t>();
  p.slot_of_row = slot_of_row.data_ptr<int32_t>();
  p.block_expert = block_expert.data_ptr<int32_t>();
  check_launch(launch_route(p, temp_bytes ? temp.data_ptr() : nullptr, temp_bytes, stream()),
               "route");
  return {counts, offs, row_of_slot, slot_of_row, block_expert};
}

void check_plan(const at::Tensor& row_of_slot, const at::Tensor& slot_of_row,
                const at::Tensor& like) {
  check_same_device(row_of_slot, like, "row_of_slot");
  check_same_device(slot_of_row, like, "slot_of_row");
  check_dim(row_of_slot, 2, "row_of_slot");
  check_dim(slot_of_row, 1, "slot_of_row");
  check_index(row_of_slot, "row_of_slot");
  check_index(slot_of_row, "slot_of_row");
}

at::Tensor permute_cuda(const at::Tensor& x, const at::Tensor& row_of_slot,
                        const at::Tensor& slot_of_row) {
  check_cuda(x, "x");
  check_dim(x, 2, "x");
  check_plan(row_of_slot, slot_of_row, x);
  const int64_t T = x.size(0), H = x.size(1), k = row_of_slot.size(1);
  TORCH_CHECK(row_of_slot.size(0) == T, "moe_kernels (cuda): row_of_slot must be [T=", T,
              ", k], got ", row_of_slot.sizes());
  MOE_DEVICE_GUARD(x);
  const int64_t R = slot_of_row.size(0);
  at::Tensor out = new_output({R, H}, x.options());
  if (R == 0 || H == 0) return out;
  at::Tensor sor = index_i32(slot_of_row);
  const int64_t es = x.element_size();
  TORCH_CHECK(es == 1 || es == 2 || es == 4 || es == 8 || es == 16,
              "moe_kernels (cuda): permute does not support ", x.scalar_type());
  PermuteParams p;
  p.x = static_cast<const unsigned char*>(x.data_ptr());
  p.x_row_bytes = x.stride(0) * es;
  p.k = k;
  p.TK = T * k;
  p.R = R;
  p.slot_of_row = sor.data_ptr<int32_t>();
  p.out = static_cast<unsigned char*>(out.data_ptr());
  int unit = static_cast<int>(es);
  if (rows_vectorisable(x)) {
    unit = 16;
    p.x_unit_stride = 1;
    p.row_units = H * es / 16;
  } else {
    p.x_unit_stride = x.stride(1);
    p.row_units = H;
  }
  check_launch(launch_permute(unit, p, stream()), "permute");
  return out;
}

at::Tensor unpermute_cuda(const at::Tensor& y, const at::Tensor& row_of_slot,
                          const at::Tensor& slot_of_row,
                          const std::optional<at::Tensor>& topk_weights) {
  check_cuda(y, "y");
  check_dim(y, 2, "y");
  const FloatType ft = float_type(y, "y");
  check_plan(row_of_slot, slot_of_row, y);
  MOE_DEVICE_GUARD(y);
  const int64_t T = row_of_slot.size(0), k = row_of_slot.size(1), R = y.size(0), H = y.size(1);
  at::Tensor w;
  if (topk_weights.has_value()) {
    TORCH_CHECK(topk_weights->sizes() == row_of_slot.sizes(), "moe_kernels (cuda): topk_weights ",
                topk_weights->sizes(), " must match row_of_slot ", row_of_slot.sizes());
    w = weights_f32(*topk_weights, y, "topk_weights");
  }
  at::Tensor out = new_output({T, H}, y.options());
  if (T == 0 || H == 0) return out;
  at::Tensor ros = index_i32(row_of_slot);
  UnpermuteParams p;
  p.y = y.data_ptr();
  p.y_s0 = y.stride(0);
  p.y_s1 = y.stride(1);
  p.R = R;
  p.H = H;
  p.T = T;
  p.k = k;
  p.row_of_slot = ros.data_ptr<int32_t>();
  p.weights = w.defined() ? w.data_ptr<float>() : nullptr;
  p.out = out.data_ptr();
  const bool vec = rows_vectorisable(y);
  check_launch(launch_unpermute(ft, vec, p, stream()), "unpermute");
  return out;
}

std::tuple<at::Tensor, at::Tensor> unpermute_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& y, const at::Tensor& row_of_slot,
    const at::Tensor& slot_of_row, const std::optional<at::Tensor>& topk_weights, bool need_grad_y,
    bool need_grad_weights) {
  check_cuda(y, "y");
  check_dim(y, 2, "y");
  const FloatType ft = float_type(y, "y");
  check_same_device(grad_out, y, "grad_out");
  float_type(grad_out, "grad_out");
  check_plan(row_of_slot, slot_of_row, y);
  MOE_DEVICE_GUARD(y);
  const int64_t T = row_of_slot.size(0), k = row_of_slot.size(1), R = y.size(0), H = y.size(1);
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == T && grad_out.size(1) == H,
              "moe_kernels (cuda): grad_out must be [T=", T, ", H=", H, "], got ",
              grad_out.sizes());
  TORCH_CHECK(slot_of_row.size(0) == R, "moe_kernels (cuda): slot_of_row must have y.size(0)=", R,
              " entries, got ", slot_of_row.size(0));
  at::Tensor w;
  if (topk_weights.has_value()) {
    TORCH_CHECK(topk_weights->sizes() == row_of_slot.sizes(), "moe_kernels (cuda): topk_weights ",
                topk_weights->sizes(), " must match row_of_slot ", row_of_slot.sizes());
    w = weights_f32(*topk_weights, y, "topk_weights");
  }
  // grad_out is read as y's type or as fp32; other mixes are widened to fp32 first.
  at::Tensor g = grad_out;
  if (g.scalar_type() != y.scalar_type() && g.scalar_type() != at::kFloat) g = g.to(at::kFloat);
  g = g.contiguous();
  const FloatType gt = g.scalar_type() == at::kFloat ? FloatType::kF32 : ft;
  at::Tensor grad_y = at::empty({0}, y.options());
  at::Tensor grad_w =
      at::empty({0}, topk_weights.has_value() ? topk_weights->options() : grad_out.options());
  const bool want_w = need_grad_weights && w.defined();
  at::Tensor gw32;
  if (need_grad_y) grad_y = new_output({R, H}, y.options());
  if (want_w) gw32 = new_output({T, k}, y.options().dtype(at::kFloat));
  if (!need_grad_y && !want_w) return {grad_y, grad_w};
  at::Tensor ros = index_i32(row_of_slot), sor = index_i32(slot_of_row);
  UnpermuteBackwardParams p;
  p.grad_out = g.data_ptr();
  p.y = y.data_ptr();
  p.y_s0 = y.stride(0);
  p.y_s1 = y.stride(1);
  p.R = R;
  p.H = H;
  p.T = T;
  p.k = k;
  p.row_of_slot = ros.data_ptr<int32_t>();
  p.slot_of_row = sor.data_ptr<int32_t>();
  p.weights = w.defined() ? w.data_ptr<float>() : nullptr;
  p.grad_y = need_grad_y ? grad_y.data_ptr() : nullptr;
  p.grad_w = want_w ? gw32.data_ptr<float>() : nullptr;
  const bool vec = rows_vectorisable(y) && aligned16(g.data_ptr()) &&
                   (!need_grad_y || aligned16(grad_y.data_ptr()));
  check_launch(launch_unpermute_backward(ft, gt, vec, p, need_grad_y, want_w, stream()),
               "unpermute_backward");
  if (want_w) grad_w = gw32.to(topk_weights->scalar_type());
  return {grad_y, grad_w};
}

// ----------------------------------------------------------------------------------------------
// The tensor-core grouped GEMM (CUTLASS; tc_gemm.cu, kernels/tc_gemm.h) and its switches
// ----------------------------------------------------------------------------------------------
// fp32 GEMMs: tf32 tensor cores (default) or "ieee", the exact fp32 path.  MOE_KERNELS_CUDA_FP32
// gives the initial value; moe_kernels.set_fp32_precision switches it (and Triton's) at run time.
bool fp32_ieee_from_env() {
  const char* v = std::getenv("MOE_KERNELS_CUDA_FP32");
  return v != nullptr && std::string(v) == "ieee";
}
std::atomic<bool> g_fp32_ieee{fp32_ieee_from_env()};
// MOE_KERNELS_CUDA_TENSOR_CORES=0: every GEMM on the exact SIMT path (a debugging aid).
bool tc_from_env() {
  const char* v = std::getenv("MOE_KERNELS_CUDA_TENSOR_CORES");
  return v == nullptr || std::string(v) != "0";
}
std::atomic<bool> g_tc{tc_from_env()};

void set_fp32_precision(const std::string& precision) {
  TORCH_CHECK_VALUE(precision == "tf32" || precision == "ieee",
                    "moe_kernels (cuda): precision must be 'tf32' or 'ieee', got '", precision,
                    "'");
  g_fp32_ieee.store(precision == "ieee", std::memory_order_relaxed);
}
std::string fp32_precision() { return g_fp32_ieee.load() ? "ieee" : "tf32"; }
void set_tensor_cores(bool on) { g_tc.store(on, std::memory_order_relaxed); }

struct DeviceInfo {
  int cc = 0, sm_count = 0, index = 0;
};
DeviceInfo device_info(const at::Tensor& like) {
  DeviceInfo d;
#if !defined(MOE_KERNELS_CUDA_EMULATION)
  // read once per device (attribute queries, no synchronisation)
  constexpr int kMaxDevices = 64;
  static std::array<std::atomic<int>, kMaxDevices> cache{};  // cc << 16 | SMs; 0: not read
  d.index = like.device().index();
  int packed = d.index >= 0 && d.index < kMaxDevices ? cache[d.index].load() : 0;
  if (packed == 0) {
    int major = 0, minor = 0, sms = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, d.index);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, d.index);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, d.index);
    packed = (major * 10 + minor) << 16 | sms;
    if (d.index >= 0 && d.index < kMaxDevices) cache[d.index].store(packed);
  }
  d.cc = packed >> 16;
  d.sm_count = packed & 0xffff;
#else
  (void)like;
#endif
  return d;
}

// The tensor-core instantiation for this call, or -1: the device, the dtype (fp32 only in tf32
// mode) and the switches decide; the layout was checked by the caller.
int tc_kernel_for(FloatType ft, int layout, const DeviceInfo& dev, int tile = 0,
                  bool out_f32 = false) {
  if (!g_tc.load(std::memory_order_relaxed)) return -1;
  if (ft == FloatType::kF32 && g_fp32_ieee.load(std::memory_order_relaxed)) return -1;
  return tc_select(dev.cc, static_cast<int>(ft), layout, tile, out_f32 ? 1 : 0);
}

// Runs one grouped GEMM on the tensor cores (workspace from the caching allocator; the arrays are
// built on the device, so nothing waits for the host).  p.elt_d 4 with 16-bit operands: fp32 D.
// false: nothing was launched.
bool tc_run(TcGroupsParams p, int layout, FloatType ft, const at::Tensor& like, const char* op) {
  const DeviceInfo dev = device_info(like);
  // few rows per expert (decode): the tile with fewer rows, where there is one
  const bool decode =
      p.mode == TcMode::kRows && p.R <= kTcDecodeRowsPerExpert * std::max<int64_t>(p.E, 1);
  const int k = tc_kernel_for(ft, layout, dev, decode ? 1 : 0, p.elt_d != p.elt);
  if (k < 0) return false;
  const size_t bytes = tc_workspace_bytes(k, p.E, dev.sm_count);
  at::Tensor ws = at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
  check_launch(launch_tc_gemm(k, p, ws.data_ptr(), bytes, dev.index, dev.sm_count, stream()), op);
  return true;
}

TcGroupsParams tc_params(TcMode mode, const int32_t* offs, int64_t E, int64_t R, int64_t elt,
                         int64_t elt_d) {
  TcGroupsParams p;
  p.mode = mode;
  p.offs = offs;
  p.E = E;
  p.R = R;
  p.elt = elt;
  p.elt_d = elt_d;
  return p;
}

bool tc_ld_ok(int64_t ld, int64_t extent, int64_t al) { return ld >= extent && ld % al == 0; }
bool tc_dims_ok(int64_t al, std::initializer_list<int64_t> dims) {
  for (int64_t d : dims)
    if (d <= 0 || d % al != 0 || d > std::numeric_limits<int32_t>::max()) return false;
  return true;
}

// out rows = a rows x B_e on the tensor cores when the strides allow (a's rows and one of B_e's
// axes contiguous, 16-byte aligned rows and columns); false: run the exact path.
bool tc_segment_gemm(FloatType ft, int64_t elt, const SegmentGemmParams& s, const at::Tensor& like,
                     const char* op, bool out_f32 = false) {
  const int64_t al = 16 / elt;
  if (!tc_dims_ok(al, {s.N, s.K}) || s.R > std::numeric_limits<int32_t>::max()) return false;
  if (s.a_sk != 1 || !tc_ld_ok(s.a_sr, s.K, al) || !aligned16(s.a) || !aligned16(s.b) ||
      !aligned16(s.out) || s.b_se % al != 0)
    return false;
  int layout;
  int64_t ldb;
  if (s.b_sn == 1 && tc_ld_ok(s.b_sk, s.N, al)) {
    layout = 0, ldb = s.b_sk;  // B_e row-major [K, N]
  } else if (s.b_sk == 1 && tc_ld_ok(s.b_sn, s.K, al)) {
    layout = 1, ldb = s.b_sn;  // B_e column-major
  } else {
    return false;
  }
  TcGroupsParams p = tc_params(TcMode::kRows, s.offs, s.E, s.R, elt, out_f32 ? 4 : elt);
  p.a = s.a;
  p.lda = s.a_sr;
  p.b = s.b;
  p.ldb = ldb;
  p.b_se = s.b_se;
  p.d = s.out;
  p.ldd = s.N;
  p.N = s.N;
  p.K = s.K;
  return tc_run(p, layout, ft, like, op);
}

// G_e = A_e^T D_e over each expert's rows on the tensor cores (one GEMM per expert with its rows
// as the reduction axis); false: run the exact path.
bool tc_ragged_k(FloatType ft, int64_t elt, const RaggedKParams& r, const at::Tensor& like,
                 const char* op) {
  const int64_t al = 16 / elt;
  if (!tc_dims_ok(al, {r.K, r.N}) || r.R > std::numeric_limits<int32_t>::max()) return false;
  if (r.a_sk != 1 || r.d_sn != 1 || !tc_ld_ok(r.a_sm, r.K, al) || !tc_ld_ok(r.d_sm, r.N, al) ||
      !aligned16(r.a) || !aligned16(r.d) || !aligned16(r.out) || r.o_se % al != 0)
    return false;
  TcGroupsParams p = tc_params(TcMode::kRaggedK, r.offs, r.E, r.R, elt, elt);
  p.d = r.out;
  p.d_se = r.o_se;
  if (r.o_sn == 1 && tc_ld_ok(r.o_sk, r.N, al)) {
    // G_e (K x N, row-major) = A_e^T (column-major view of a's rows) x D_e
    p.a = r.a, p.lda = r.a_sm, p.b = r.d, p.ldb = r.d_sm, p.ldd = r.o_sk, p.M = r.K, p.N = r.N;
  } else if (r.o_sk == 1 && tc_ld_ok(r.o_sn, r.K, al)) {
    // G_e^T (N x K, row-major) = D_e^T x A_e
    p.a = r.d, p.lda = r.d_sm, p.b = r.a, p.ldb = r.a_sm, p.ldd = r.o_sn, p.M = r.N, p.N = r.K;
  } else {
    return false;
  }
  return tc_run(p, 2, ft, like, op);
}

// The argument builder alone, for the tests: groups of `offs` over R rows with fake operand base
// addresses a_base / b_base and the real output d (zero-filled where CUTLASS would not write).
// Returns shapes [E, 3] int32, pointers [3, E] int64 (A and B relative to their bases, D to d's
// data pointer) and leading dimensions [3, E] int64.
std::tuple<at::Tensor, at::Tensor, at::Tensor> tc_build_groups(
    const at::Tensor& offs, int64_t mode, int64_t R, int64_t elt, int64_t lda, int64_t ldb,
    int64_t b_se, const at::Tensor& d, int64_t ldd, int64_t d_se, int64_t M, int64_t N, int64_t K) {
  check_cuda(offs, "offs");
  check_same_device(d, offs, "d");
  TORCH_CHECK_VALUE(offs.dim() == 1 && offs.scalar_type() == at::kInt, "offs must be int32 [E]");
  TORCH_CHECK_VALUE(mode == 0 || mode == 1, "mode must be 0 (rows) or 1 (ragged K)");
  MOE_DEVICE_GUARD(offs);
  const at::Tensor o = offs.contiguous();
  const int64_t E = o.size(0);
  constexpr int64_t kABase = int64_t{1} << 40, kBBase = int64_t{1} << 44;
  TcGroupsParams p;
  p.mode = mode == 0 ? TcMode::kRows : TcMode::kRaggedK;
  p.offs = o.data_ptr<int32_t>();
  p.E = E;
  p.R = R;
  p.elt = elt;
  p.elt_d = d.element_size();
  p.a = reinterpret_cast<const void*>(kABase);
  p.lda = lda;
  p.b = reinterpret_cast<const void*>(kBBase);
  p.ldb = ldb;
  p.b_se = b_se;
  p.d = d.data_ptr();
  p.ldd = ldd;
  p.d_se = d_se;
  p.M = M;
  p.N = N;
  p.K = K;
  at::Tensor ws = at::empty({static_cast<int64_t>(tc_group_arrays_bytes(std::max<int64_t>(E, 1)))},
                            offs.options().dtype(at::kByte));
  tc_carve_group_arrays(p, ws.data_ptr());
  check_launch(launch_tc_groups(p, stream()), "tc_build_groups");
  const auto i64 = offs.options().dtype(at::kLong);
  at::Tensor shapes = at::from_blob(p.shapes, {E, 3}, offs.options()).clone();
  // each array has its own 256-byte aligned slot
  const auto rows = [&](std::initializer_list<const void*> arrays) {
    std::vector<at::Tensor> out;
    for (const void* a : arrays) out.push_back(at::from_blob(const_cast<void*>(a), {E}, i64));
    return at::stack(out);
  };
  at::Tensor ptrs = rows({p.ptr_a, p.ptr_b, p.ptr_d});
  at::Tensor lds = rows({p.out_lda, p.out_ldb, p.out_ldd});
  const int64_t d_addr = static_cast<int64_t>(reinterpret_cast<uintptr_t>(d.data_ptr()));
  ptrs[0] -= kABase;
  ptrs[1] -= kBBase;
  ptrs[2] -= d_addr;
  return {shapes, ptrs, lds};
}

// ----------------------------------------------------------------------------------------------
// grouped GEMM: the tensor cores where the layout allows, else the exact path
// ----------------------------------------------------------------------------------------------
void check_grouped(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offs, bool trans_b) {
  check_cuda(a, "a");
  check_same_device(b, a, "b");
  check_same_device(offs, a, "offs");
  check_dim(a, 2, "a");
  check_dim(b, 3, "b");
  check_dim(offs, 1, "offs");
  float_type(a, "a");
  float_type(b, "b");
  check_index(offs, "offs");
  TORCH_CHECK(offs.size(0) == b.size(0), "moe_kernels (cuda): offs must have E=", b.size(0),
              " entries (one per expert of b), got ", offs.size(0));
  const int64_t Kb = trans_b ? b.size(2) : b.size(1);
  TORCH_CHECK(Kb == a.size(1), "moe_kernels (cuda): a is [M, K=", a.size(1), "] but b ",
              (trans_b ? "[E, N, K]" : "[E, K, N]"), " has K=", Kb, " (shape ", b.sizes(), ")");
}

// B_e(k, n) of b for out = a @ b[e] (b[e]^T with trans_b): its (k, n) element strides.
std::pair<int64_t, int64_t> b_strides(const at::Tensor& b, bool trans_b) {
  return trans_b ? std::make_pair(b.stride(2), b.stride(1))
                 : std::make_pair(b.stride(1), b.stride(2));
}

at::Tensor grouped_gemm_cuda(const at::Tensor& a, const at::Tensor& b_in, const at::Tensor& offs,
                             bool trans_b) {
  check_grouped(a, b_in, offs, trans_b);
  MOE_DEVICE_GUARD(a);
  // one float type for the three operands: b is converted to a's type when they differ
  const at::Tensor b = b_in.scalar_type() == a.scalar_type() ? b_in : b_in.to(a.scalar_type());
  const int64_t M = a.size(0), K = a.size(1), N = trans_b ? b.size(1) : b.size(2);
  at::Tensor out = new_output({M, N}, a.options());
  if (M == 0 || N == 0) return out;
  at::Tensor o = index_i32(offs);
  SegmentGemmParams p;
  p.a = a.data_ptr();
  p.a_sr = a.stride(0);
  p.a_sk = a.stride(1);
  p.b = b.data_ptr();
  p.b_se = b.stride(0);
  std::tie(p.b_sk, p.b_sn) = b_strides(b, trans_b);
  p.out = out.data_ptr();
  p.offs = o.data_ptr<int32_t>();
  p.E = b.size(0);
  p.R = M;
  p.N = N;
  p.K = K;
  const FloatType ft = float_type(a, "a");
  if (!tc_segment_gemm(ft, a.element_size(), p, a, "grouped_gemm"))
    check_launch(launch_segment_gemm(ft, GemmTypes::kSame, p, stream()), "grouped_gemm");
  return out;
}

std::tuple<at::Tensor, at::Tensor> grouped_gemm_backward_cuda(const at::Tensor& grad_out_in,
                                                              const at::Tensor& a,
                                                              const at::Tensor& b_in,
                                                              const at::Tensor& offs, bool trans_b,
                                                              bool need_grad_a, bool need_grad_b) {
  check_grouped(a, b_in, offs, trans_b);
  check_same_device(grad_out_in, a, "grad_out");
  float_type(grad_out_in, "grad_out");
  MOE_DEVICE_GUARD(a);
  const int64_t M = a.size(0), K = a.size(1), E = b_in.size(0);
  const int64_t N = trans_b ? b_in.size(1) : b_in.size(2);
  TORCH_CHECK(grad_out_in.dim() == 2 && grad_out_in.size(0) == M && grad_out_in.size(1) == N,
              "moe_kernels (cuda): grad_out must be [M=", M, ", N=", N, "], got ",
              grad_out_in.sizes());
  const at::ScalarType t = a.scalar_type();
  const at::Tensor b = b_in.scalar_type() == t ? b_in : b_in.to(t);
  const at::Tensor g = grad_out_in.scalar_type() == t ? grad_out_in : grad_out_in.to(t);
  const FloatType ft = float_type(a, "a");
  at::Tensor grad_a = at::empty({0}, a.options()), grad_b = at::empty({0}, b_in.options());
  at::Tensor o = index_i32(offs);
  if (need_grad_a) {
    grad_a = new_output({M, K}, a.options());
    if (M > 0 && K > 0) {
      const auto [b_sk, b_sn] = b_strides(b, trans_b);
      SegmentGemmParams p;  // dA(m, k) = sum_n grad_out(m, n) * B_e(k, n)
      p.a = g.data_ptr();
      p.a_sr = g.stride(0);
      p.a_sk = g.stride(1);
      p.b = b.data_ptr();
      p.b_se = b.stride(0);
      p.b_sk = b_sn;
      p.b_sn = b_sk;
      p.out = grad_a.data_ptr();
      p.offs = o.data_ptr<int32_t>();
      p.E = E;
      p.R = M;
      p.N = K;
      p.K = N;
      if (!tc_segment_gemm(ft, a.element_size(), p, a, "grouped_gemm_backward (grad_a)"))
        check_launch(launch_segment_gemm(ft, GemmTypes::kSame, p, stream()),
                     "grouped_gemm_backward (grad_a)");
    }
  }
  if (need_grad_b) {
    at::Tensor gb = new_output(b.sizes(), b.options().memory_format(at::MemoryFormat::Contiguous));
    if (gb.numel() > 0) {
      RaggedKParams p;  // G_e(k, n) = sum over e's rows m of a(m, k) * grad_out(m, n)
      p.a = a.data_ptr();
      p.a_sm = a.stride(0);
      p.a_sk = a.stride(1);
      p.d = g.data_ptr();
      p.d_sm = g.stride(0);
      p.d_sn = g.stride(1);
      p.out = gb.data_ptr();
      p.o_se = gb.stride(0);
      p.o_sk = trans_b ? gb.stride(2) : gb.stride(1);
      p.o_sn = trans_b ? gb.stride(1) : gb.stride(2);
      p.offs = o.data_ptr<int32_t>();
      p.E = E;
      p.R = M;
      p.K = K;
      p.N = N;
      if (!tc_ragged_k(ft, a.element_size(), p, a, "grouped_gemm_backward (grad_b)"))
        check_launch(launch_ragged_k(ft, GemmTypes::kSame, p, stream()),
                     "grouped_gemm_backward (grad_b)");
    }
    grad_b = gb.scalar_type() == b_in.scalar_type() ? gb : gb.to(b_in.scalar_type());
  }
  return {grad_a, grad_b};
}

// ----------------------------------------------------------------------------------------------
// moe_ffn: route -> permute -> grouped GEMM 1 -> activation -> grouped GEMM 2 -> combine, every
// intermediate in fp32 (as the reference computes); the backward recomputes the forward's
// intermediates (no state kept between the two calls of the op pair).
// ----------------------------------------------------------------------------------------------
struct Ffn {
  int64_t T = 0, H = 0, E = 0, I = 0, k = 0, R = 0;
  FloatType ft = FloatType::kF32;
  ActParams act{};
  bool interleaved = false;
  at::Tensor offs, ros, sor;  // the plan (int32)
  at::Tensor xp;              // [R, H] permuted x (x's type)
  at::Tensor h;               // [R, 2I] fp32, GEMM 1 without its bias
  at::Tensor a;               // [R, I] fp32 activation (bias included)
  at::Tensor y;               // [R, H] fp32 expert outputs (bias included)
};

Activation parse_activation(c10::string_view activation) {
  const std::string s(activation);
  if (s == "swiglu") return Activation::kSwiglu;
  if (s == "geglu") return Activation::kGeglu;
  TORCH_CHECK(s == "swiglu_oai",
              "moe_kernels (cuda): activation must be 'swiglu', 'geglu' or 'swiglu_oai', got '", s,
              "'");
  return Activation::kSwigluOai;
}

void check_bias(const std::optional<at::Tensor>& b, const at::Tensor& x, int64_t E, int64_t C,
                const char* name) {
  if (!b.has_value()) return;
  check_same_device(*b, x, name);
  TORCH_CHECK(b->scalar_type() == x.scalar_type(), "moe_kernels (cuda): ", name,
              " must have x's dtype ", x.scalar_type(), ", got ", b->scalar_type());
  TORCH_CHECK(b->dim() == 2 && b->size(0) == E && b->size(1) == C, "moe_kernels (cuda): ", name,
              " must be [E=", E, ", ", C, "], got ", b->sizes());
}

ExpertEltParams elt(const Ffn& f, const std::optional<at::Tensor>& bias) {
  ExpertEltParams p;
  p.offs = f.offs.data_ptr<int32_t>();
  p.E = f.E;
  p.R = f.R;
  p.act = f.act;
  p.interleaved = f.interleaved;
  if (bias.has_value()) {
    p.bias = bias->data_ptr();
    p.bias_se = bias->stride(0);
    p.bias_sc = bias->stride(1);
  }
  return p;
}

// moe_ffn's GEMMs, on the tensor cores where they can run there.  Their fp32 intermediates stay
// fp32 where it matters: GEMM 1 writes h in fp32 (a rounding would move values across
// swiglu_oai's clamps) and GEMM 2 the expert outputs in fp32 (the routing-weight gradient reads
// them) -- both through the fp32-output instantiations, which exist for Hugging Face's weight
// layout (nt); with other weight strides these two GEMMs run on the exact path.  An fp32
// intermediate that is an A operand (the activation, the gradients) is rounded to the weights'
// type t first, as the Triton backend does; the backward's dA products (d_a, d_xp) are made in t
// and widened.  In fp32 (tf32 mode) nothing is converted.  Otherwise the exact mixed-type kernels.
bool tc_possible(const Ffn& f, const at::Tensor& like, int64_t n, int64_t k) {
  if (!g_tc.load(std::memory_order_relaxed)) return false;
  const int64_t al = f.ft == FloatType::kF32 ? 4 : 8;
  return tc_kernel_for(f.ft, 0, device_info(like)) >= 0 && tc_dims_ok(al, {n, k});
}

at::Tensor f32_view(const void* p, int64_t rows, int64_t cols, int64_t sr, int64_t sc,
                    const at::Tensor& like) {
  return at::from_blob(const_cast<void*>(p), {rows, cols}, {sr, sc},
                       like.options().dtype(at::kFloat));
}

// w ([E, N, K]) as GEMM 1 / 2 want it for the fp32-output tensor-core kernels: contiguous rows
// (B column-major, the nt layout); a contiguous copy when it is not and those kernels will run.
at::Tensor ffn_nt_weights(const Ffn& f, const at::Tensor& w, const at::Tensor& like) {
  if (f.ft == FloatType::kF32 || w.stride(2) == 1 || !tc_possible(f, like, w.size(1), w.size(2)))
    return w;
  return w.contiguous();
}

// An fp32 operand (rows x cols at p with strides s0, s1) rounded to like's dtype for the tensor
// cores; p and the strides are pointed at the copy, which the caller keeps alive.
at::Tensor round_operand(const void*& p, int64_t rows, int64_t cols, int64_t& s0, int64_t& s1,
                         const at::Tensor& like) {
  at::Tensor t = f32_view(p, rows, cols, s0, s1, like).to(like.scalar_type());
  p = t.data_ptr();
  s0 = t.stride(0);
  s1 = t.stride(1);
  return t;
}

// which: 1 GEMM 1, 2 GEMM 2 (their outputs must stay fp32), 0 a backward dA product.
void ffn_segment_gemm(const Ffn& f, GemmTypes types, const SegmentGemmParams& p,
                      const at::Tensor& like, const char* op, int which = 0) {
  const int64_t es = like.element_size();
  if (f.ft == FloatType::kF32 || types == GemmTypes::kSame) {
    if (tc_segment_gemm(f.ft, es, p, like, op)) return;
  } else if (tc_possible(f, like, p.N, p.K)) {
    SegmentGemmParams q = p;
    at::Tensor a_t;
    if (types == GemmTypes::kAF32) a_t = round_operand(q.a, q.R, q.K, q.a_sr, q.a_sk, like);
    if (which != 0) {
      if (tc_segment_gemm(f.ft, es, q, like, op, /*out_f32=*/true)) return;
    } else {
      const at::Tensor out_t = at::empty({p.R, p.N}, like.options());
      q.out = out_t.data_ptr();
      if (tc_segment_gemm(f.ft, es, q, like, op)) {
        f32_view(p.out, p.R, p.N, p.N, 1, like).copy_(out_t);
        return;
      }
    }
  }
  check_launch(launch_segment_gemm(f.ft, types, p, stream()), op);
}

void ffn_ragged_k(const Ffn& f, GemmTypes types, const RaggedKParams& r, const at::Tensor& like,
                  const char* op) {
  const int64_t es = like.element_size();
  if (f.ft == FloatType::kF32 || types == GemmTypes::kSame) {
    if (tc_ragged_k(f.ft, es, r, like, op)) return;
  } else if (tc_possible(f, like, r.N, r.K)) {
    RaggedKParams q = r;
    const at::Tensor a_t = round_operand(q.a, q.R, q.K, q.a_sm, q.a_sk, like);
    at::Tensor d_t;
    if (types == GemmTypes::kADF32) d_t = round_operand(q.d, q.R, q.N, q.d_sm, q.d_sn, like);
    if (tc_ragged_k(f.ft, es, q, like, op)) return;
  }
  check_launch(launch_ragged_k(f.ft, types, r, stream()), op);
}

// Route, permute and the forward intermediates of moe_ffn.
Ffn ffn_forward(const at::Tensor& x, const at::Tensor& w_gate_up, const at::Tensor& w_down,
                const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                const std::optional<at::Tensor>& gate_up_bias,
                const std::optional<at::Tensor>& down_bias, c10::string_view activation,
                double alpha, double limit, bool interleaved) {
  check_cuda(x, "x");
  for (const auto& [t, name] : {std::pair{&w_gate_up, "w_gate_up"},
                                {&w_down, "w_down"},
                                {&topk_weights, "topk_weights"},
                                {&topk_ids, "topk_ids"}})
    check_same_device(*t, x, name);
  check_dim(x, 2, "x");
  check_dim(w_gate_up, 3, "w_gate_up");
  check_dim(w_down, 3, "w_down");
  check_dim(topk_ids, 2, "topk_ids");
  check_index(topk_ids, "topk_ids");
  check_finite(alpha, "alpha");
  check_finite(limit, "limit");
  Ffn f;
  f.ft = float_type(x, "x");
  for (const auto& [t, name] : {std::pair{&w_gate_up, "w_gate_up"}, {&w_down, "w_down"}})
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "moe_kernels (cuda): ", name,
                " must have x's dtype ", x.scalar_type(), ", got ", t->scalar_type());
  f.T = x.size(0);
  f.H = x.size(1);
  f.E = w_gate_up.size(0);
  f.k = topk_ids.size(1);
  TORCH_CHECK(w_gate_up.size(1) % 2 == 0 && w_gate_up.size(2) == f.H,
              "moe_kernels (cuda): w_gate_up must be [E, 2I, H=", f.H, "], got ",
              w_gate_up.sizes());
  f.I = w_gate_up.size(1) / 2;
  TORCH_CHECK(w_down.size(0) == f.E && w_down.size(1) == f.H && w_down.size(2) == f.I,
              "moe_kernels (cuda): w_down must be [E=", f.E, ", H=", f.H, ", I=", f.I, "], got ",
              w_down.sizes());
  TORCH_CHECK(topk_ids.size(0) == f.T && topk_weights.sizes() == topk_ids.sizes(),
              "moe_kernels (cuda): topk_ids and topk_weights must be [T=", f.T, ", k], got ",
              topk_ids.sizes(), " and ", topk_weights.sizes());
  check_bias(gate_up_bias, x, f.E, 2 * f.I, "gate_up_bias");
  check_bias(down_bias, x, f.E, f.H, "down_bias");
  f.act =
      ActParams{parse_activation(activation), static_cast<float>(alpha), static_cast<float>(limit)};
  f.interleaved = interleaved;
  MOE_DEVICE_GUARD(x);
  auto plan = route_cuda(topk_ids, f.E, 0);
  f.offs = std::get<1>(plan);
  f.ros = std::get<2>(plan);
  f.sor = std::get<3>(plan);
  f.R = f.sor.size(0);
  f.xp = permute_cuda(x, f.ros, f.sor);
  const auto f32 = x.options().dtype(at::kFloat);
  f.h = at::empty({f.R, 2 * f.I}, f32);
  f.a = at::empty({f.R, f.I}, f32);
  f.y = at::empty({f.R, f.H}, f32);
  if (f.R == 0) return f;
  // GEMMs 1 and 2 keep fp32 outputs through the nt-layout instantiations only: weights stored
  // otherwise (gpt-oss's [E, H, 2I] / [E, I, H] as transposed views) are copied contiguous for
  // them when the tensor cores will run, one copy per call (what it costs is in the timings)
  const at::Tensor wgu = ffn_nt_weights(f, w_gate_up, x);
  const at::Tensor wd = ffn_nt_weights(f, w_down, x);
  SegmentGemmParams g1;  // h = xp @ w_gate_up[e]^T
  g1.a = f.xp.data_ptr();
  g1.a_sr = f.xp.stride(0);
  g1.a_sk = f.xp.stride(1);
  g1.b = wgu.data_ptr();
  g1.b_se = wgu.stride(0);
  g1.b_sk = wgu.stride(2);
  g1.b_sn = wgu.stride(1);
  g1.out = f.h.data_ptr();
  g1.offs = f.offs.data_ptr<int32_t>();
  g1.E = f.E;
  g1.R = f.R;
  g1.N = 2 * f.I;
  g1.K = f.H;
  ffn_segment_gemm(f, GemmTypes::kOutF32, g1, x, "moe_ffn (gemm 1)", 1);
  ExpertEltParams pa = elt(f, gate_up_bias);
  pa.in = f.h.data_ptr<float>();
  pa.out = f.a.data_ptr<float>();
  pa.I = f.I;
  check_launch(launch_expert_elementwise(ExpertOp::kAct, f.ft, pa, nullptr, stream()),
               "moe_ffn (activation)");
  SegmentGemmParams g2;  // y = a @ w_down[e]^T
  g2.a = f.a.data_ptr();
  g2.a_sr = f.I;
  g2.a_sk = 1;
  g2.b = wd.data_ptr();
  g2.b_se = wd.stride(0);
  g2.b_sk = wd.stride(2);
  g2.b_sn = wd.stride(1);
  g2.out = f.y.data_ptr();
  g2.offs = f.offs.data_ptr<int32_t>();
  g2.E = f.E;
  g2.R = f.R;
  g2.N = f.H;
  g2.K = f.I;
  ffn_segment_gemm(f, GemmTypes::kAF32, g2, x, "moe_ffn (gemm 2)", 2);
  if (down_bias.has_value()) {
    ExpertEltParams pb = elt(f, down_bias);
    pb.out = f.y.data_ptr<float>();
    pb.I = f.H;
    check_launch(launch_expert_elementwise(ExpertOp::kAddBias, f.ft, pb, nullptr, stream()),
                 "moe_ffn (down bias)");
  }
  return f;
}

at::Tensor moe_ffn_cuda(const at::Tensor& x, const at::Tensor& w_gate_up, const at::Tensor& w_down,
                        const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                        const std::optional<at::Tensor>& gate_up_bias,
                        const std::optional<at::Tensor>& down_bias, c10::string_view activation,
                        double alpha, double limit, bool interleaved) {
  Ffn f = ffn_forward(x, w_gate_up, w_down, topk_weights, topk_ids, gate_up_bias, down_bias,
                      activation, alpha, limit, interleaved);
  // out[t] = sum over slots of w * y[row], fp32, slot order
  at::Tensor out = unpermute_cuda(f.y, f.ros, f.sor, topk_weights);
  return out.to(x.scalar_type());
}

// Per-expert column sums of rows [R, C] (fp32) into [E, C] of the bias's type.
at::Tensor expert_sums(const Ffn& f, const at::Tensor& rows, const at::Tensor& like) {
  at::Tensor sums = new_output({f.E, rows.size(1)}, like.options());
  ExpertEltParams p = elt(f, std::nullopt);
  p.in = rows.data_ptr<float>();
  p.I = rows.size(1);
  check_launch(launch_expert_elementwise(ExpertOp::kColumnSum, float_type(like, "bias"), p,
                                         sums.data_ptr(), stream()),
               "moe_ffn_backward (bias gradient)");
  return sums;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
moe_ffn_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w_gate_up,
                      const at::Tensor& w_down, const at::Tensor& topk_weights,
                      const at::Tensor& topk_ids, const std::optional<at::Tensor>& gate_up_bias,
                      const std::optional<at::Tensor>& down_bias, c10::string_view activation,
                      double alpha, double limit, bool interleaved) {
  Ffn f = ffn_forward(x, w_gate_up, w_down, topk_weights, topk_ids, gate_up_bias, down_bias,
                      activation, alpha, limit, interleaved);
  check_same_device(grad_out, x, "grad_out");
  float_type(grad_out, "grad_out");
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == f.T && grad_out.size(1) == f.H,
              "moe_kernels (cuda): grad_out must be [T=", f.T, ", H=", f.H, "], got ",
              grad_out.sizes());
  const auto f32 = x.options().dtype(at::kFloat);
  // grad_y[r] = w * G[t] (fp32), grad_w = <G[t], y[r]>
  auto [gy, gw] =
      unpermute_backward_cuda(grad_out.to(at::kFloat), f.y, f.ros, f.sor, topk_weights, true, true);
  at::Tensor d_x, d_wgu = new_output(w_gate_up.sizes(), w_gate_up.options());
  at::Tensor d_wd = new_output(w_down.sizes(), w_down.options());
  at::Tensor d_bgu = at::empty({0}, x.options()), d_bd = at::empty({0}, x.options());
  at::Tensor d_a = at::empty({f.R, f.I}, f32), dh = at::empty({f.R, 2 * f.I}, f32);
  at::Tensor d_xp = at::empty({f.R, f.H}, f32);
  if (f.R > 0) {
    SegmentGemmParams g;  // d_a = gy @ w_down[e]
    g.a = gy.data_ptr();
    g.a_sr = f.H;
    g.a_sk = 1;
    g.b = w_down.data_ptr();
    g.b_se = w_down.stride(0);
    g.b_sk = w_down.stride(1);
    g.b_sn = w_down.stride(2);
    g.out = d_a.data_ptr();
    g.offs = f.offs.data_ptr<int32_t>();
    g.E = f.E;
    g.R = f.R;
    g.N = f.I;
    g.K = f.H;
    ffn_segment_gemm(f, GemmTypes::kAF32, g, x, "moe_ffn_backward");
    ExpertEltParams pa = elt(f, gate_up_bias);  // dh = act'(h + b, d_a)
    pa.in = f.h.data_ptr<float>();
    pa.in2 = d_a.data_ptr<float>();
    pa.out = dh.data_ptr<float>();
    pa.I = f.I;
    check_launch(launch_expert_elementwise(ExpertOp::kActBackward, f.ft, pa, nullptr, stream()),
                 "moe_ffn_backward (activation)");
    g.a = dh.data_ptr();  // d_xp = dh @ w_gate_up[e]
    g.a_sr = 2 * f.I;
    g.b = w_gate_up.data_ptr();
    g.b_se = w_gate_up.stride(0);
    g.b_sk = w_gate_up.stride(1);
    g.b_sn = w_gate_up.stride(2);
    g.out = d_xp.data_ptr();
    g.N = f.H;
    g.K = 2 * f.I;
    ffn_segment_gemm(f, GemmTypes::kAF32, g, x, "moe_ffn_backward");
  }
  RaggedKParams r;  // d_w_down[e] = gy^T a, d_w_gate_up[e] = dh^T xp (rows of segment e)
  r.offs = f.offs.data_ptr<int32_t>();
  r.E = f.E;
  r.R = f.R;
  r.a = gy.data_ptr();
  r.a_sm = f.H;
  r.a_sk = 1;
  r.d = f.a.data_ptr();
  r.d_sm = f.I;
  r.d_sn = 1;
  r.out = d_wd.data_ptr();
  r.o_se = d_wd.stride(0);
  r.o_sk = d_wd.stride(1);
  r.o_sn = d_wd.stride(2);
  r.K = f.H;
  r.N = f.I;
  ffn_ragged_k(f, GemmTypes::kADF32, r, x, "moe_ffn_backward");
  r.a = dh.data_ptr();
  r.a_sm = 2 * f.I;
  r.d = f.xp.data_ptr();
  r.d_sm = f.xp.stride(0);
  r.d_sn = f.xp.stride(1);
  r.out = d_wgu.data_ptr();
  r.o_se = d_wgu.stride(0);
  r.o_sk = d_wgu.stride(1);
  r.o_sn = d_wgu.stride(2);
  r.K = 2 * f.I;
  r.N = f.H;
  ffn_ragged_k(f, GemmTypes::kAF32, r, x, "moe_ffn_backward");
  if (gate_up_bias.has_value()) d_bgu = expert_sums(f, dh, *gate_up_bias);
  if (down_bias.has_value()) d_bd = expert_sums(f, gy, *down_bias);
  // d_x[t] = sum over t's slots of d_xp[row] (permute's backward)
  d_x = unpermute_cuda(d_xp, f.ros, f.sor, std::nullopt).to(x.scalar_type());
  return {d_x, d_wgu, d_wd, gw, d_bgu, d_bd};  // gw: already in topk_weights' dtype
}

}  // namespace
}  // namespace moe_kernels::cuda

#if !defined(MOE_KERNELS_CUDA_EMULATION)
TORCH_LIBRARY_IMPL(moe_kernels, CUDA, m) {
  using namespace moe_kernels::cuda;
  m.impl("topk_gating", &topk_gating_cuda);
  m.impl("topk_gating_backward", &topk_gating_backward_cuda);
  m.impl("route", &route_cuda);
  m.impl("permute", &permute_cuda);
  m.impl("unpermute", &unpermute_cuda);
  m.impl("unpermute_backward", &unpermute_backward_cuda);
  m.impl("grouped_gemm", &grouped_gemm_cuda);
  m.impl("grouped_gemm_backward", &grouped_gemm_backward_cuda);
  m.impl("moe_ffn", &moe_ffn_cuda);
  m.impl("moe_ffn_backward", &moe_ffn_backward_cuda);
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() =
      "moe_kernels CUDA kernels (registered for the CUDA dispatch key; schemas: "
      "moe_kernels/_schemas.py)";
  m.def("set_debug_mode", &moe_kernels::cuda::set_debug_mode, py::arg("on"),
        "Switch the CUDA kernels' debug mode (NaN / INT_MIN-poisoned outputs); its initial value "
        "is MOE_KERNELS_DEBUG's at load.  Use moe_kernels._debug.set_debug_mode, which switches "
        "every backend.");
  m.def("debug_mode", &moe_kernels::cuda::debug_mode,
        "Whether the CUDA kernels' debug mode is on.");
  m.def("set_fp32_precision", &moe_kernels::cuda::set_fp32_precision, py::arg("precision"),
        "fp32 GEMMs of the CUDA kernels: 'tf32' (tensor cores, the default) or 'ieee' (exact fp32 "
        "FMA); the initial value is MOE_KERNELS_CUDA_FP32's at load.  Use "
        "moe_kernels.set_fp32_precision, which switches the Triton kernels too.");
  m.def("fp32_precision", &moe_kernels::cuda::fp32_precision);
  m.def("set_tensor_cores", &moe_kernels::cuda::set_tensor_cores, py::arg("on"),
        "Whether grouped GEMMs may run on the CUTLASS tensor-core kernels (default on; "
        "MOE_KERNELS_CUDA_TENSOR_CORES=0 at load turns it off).");
  m.def(
      "tc_kernels",
      [] {
        std::vector<std::tuple<std::string, int, int, int, int, int>> out;
        for (const auto& k : moe_kernels::cuda::kTcKernels)
          out.emplace_back(k.name, k.sm, k.dtype, k.layout, k.tile, k.out_f32);
        return out;
      },
      "The CUTLASS instantiations the dispatcher can select: (name, sm, dtype, layout, tile, "
      "out_f32).");
  m.def(
      "tc_select",
      [](int cc, int dtype, int layout, int tile, int out_f32) {
        return moe_kernels::cuda::tc_select(cc, dtype, layout, tile, out_f32);
      },
      py::arg("cc"), py::arg("dtype"), py::arg("layout"), py::arg("tile") = 0,
      py::arg("out_f32") = 0,
      "Index into tc_kernels() of the instantiation chosen for compute capability cc (major * 10 "
      "+ minor), dtype (0 fp32/tf32, 1 bf16, 2 fp16), layout (0 nn, 1 nt, 2 tn) and tile (0 "
      "prefill, 1 decode: falls back to 0 where there is none) and output type (out_f32 1: fp32 "
      "D from 16-bit operands), or -1.");
  m.def("tc_build_groups", &moe_kernels::cuda::tc_build_groups,
        "The device-side argument builder of the tensor-core grouped GEMM alone (tests).");
#if defined(MOE_KERNELS_CUDA_EMULATION)
  using namespace moe_kernels::cuda;
  using OptT = std::optional<at::Tensor>;
  m.def("topk_gating",
        [](const at::Tensor& l, int64_t k, const std::string& sc, bool rn, const OptT& b, int64_t g,
           int64_t tg, double s) { return topk_gating_cuda(l, k, sc, rn, b, g, tg, s); });
  m.def("topk_gating_backward",
        [](const at::Tensor& gw, const at::Tensor& l, const at::Tensor& i, const std::string& sc,
           bool rn, double s) { return topk_gating_backward_cuda(gw, l, i, sc, rn, s); });
  m.def("route", &route_cuda);
  m.def("permute", &permute_cuda);
  m.def("unpermute", &unpermute_cuda);
  m.def("unpermute_backward", &unpermute_backward_cuda);
  m.def("grouped_gemm", &grouped_gemm_cuda);
  m.def("grouped_gemm_backward", &grouped_gemm_backward_cuda);
  m.def("moe_ffn", [](const at::Tensor& x, const at::Tensor& wgu, const at::Tensor& wd,
                      const at::Tensor& w, const at::Tensor& ids, const OptT& bgu, const OptT& bd,
                      const std::string& act, double alpha, double limit, bool inter) {
    return moe_ffn_cuda(x, wgu, wd, w, ids, bgu, bd, act, alpha, limit, inter);
  });
  m.def("moe_ffn_backward",
        [](const at::Tensor& g, const at::Tensor& x, const at::Tensor& wgu, const at::Tensor& wd,
           const at::Tensor& w, const at::Tensor& ids, const OptT& bgu, const OptT& bd,
           const std::string& act, double alpha, double limit, bool inter) {
          return moe_ffn_backward_cuda(g, x, wgu, wd, w, ids, bgu, bd, act, alpha, limit, inter);
        });
  m.def("set_max_blocks", &emu_set_max_blocks, "Grid cap of the emulated launches.");
#endif
}
