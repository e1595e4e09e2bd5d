// The fused expert FFN on CPU (forward and backward).
//
// Forward, per call:
//   1. a stable counting sort of the (token, slot) pairs by expert (dropped ids skipped);
//   2. GEMM 1 tasks (expert x row block, column block of I): the tokens' rows of x are gathered
//      straight into the GEMM tiles, the gate and up rows of w_gate_up are picked by a column
//      gather (so one tile holds matching gate/up columns, interleaved or not), and the bias and
//      activation run in the epilogue; h (fp32) is kept in expert-sorted order;
//   3. GEMM 2 tasks (expert x row block, column block of H): down projection, bias and routing
//      weight in the epilogue, fp32 rows in expert-sorted order;
//   4. per token, the k rows are summed in slot order in fp32 and cast to x's dtype.
// Tasks are handed out dynamically, so empty experts cost nothing and skewed routing balances.
//
// Backward: GEMM 1 is re-run for the pre-activation (moe_ffn_backward), or the forward kept it
// (moe_ffn_train, moe_ffn_backward_saved); gh = grad_out[token] @ w_down[e] per row
// gives both the activation's gradient (times the routing weight) and the routing weight's
// (<act, gh> + <grad_out, b_down>), so GEMM 2 is not re-run; then the weight gradients per expert
// and grad_x through w_gate_up.  In a bf16 model the fp32 operands of these GEMMs enter them
// rounded to bf16, as in bf16 autograd.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

#include "common/activation.h"
#include "cpu/activation_rows.h"
#include "cpu/expert_common.h"
#include "cpu/ops.h"
#include "cpu/pair_sort.h"

namespace moe_kernels::cpu {
namespace {

// Rows per task at most (an expert's rows split into near-equal tasks): B is converted, or on the
// brgemm route read from memory, once per task -- an expert with 257-384 rows (OLMoE at T = 2048
// averages 256) is one task, not two that each read all its weights.
constexpr int64_t kRowBlock = 384;

// MOE_KERNELS_CPU_PROFILE=1: per-phase wall times of moe_ffn on stderr (development aid).
bool profile_on() {
  static const bool on = [] {
    const char* s = std::getenv("MOE_KERNELS_CPU_PROFILE");
    return s && *s && *s != '0';
  }();
  return on;
}
struct PhaseTimer {
  std::chrono::steady_clock::time_point t = std::chrono::steady_clock::now();
  void lap(const char* what) {
    if (!profile_on()) return;
    const auto now = std::chrono::steady_clock::now();
    std::fprintf(stderr, "moe_ffn %-10s %9.3f ms\n", what,
                 std::chrono::duration<double, std::milli>(now - t).count());
    // the phase's brgemm route, if it ran: thread-summed times of its parts
    const BrgemmProfile b = brgemm_profile_take();
    if (b.calls > 0)
      std::fprintf(stderr,
                   "moe_ffn   brgemm route (all threads): pack %.3f ms, %ld kernel calls %.3f ms, "
                   "store %.3f ms; paired: kernel %.3f ms (of the calls'), sink %.3f ms\n",
                   1e-6 * static_cast<double>(b.pack_ns), static_cast<long>(b.calls),
                   1e-6 * static_cast<double>(b.brgemm_ns), 1e-6 * static_cast<double>(b.store_ns),
                   1e-6 * static_cast<double>(b.paired_ns), 1e-6 * static_cast<double>(b.sink_ns));
    t = std::chrono::steady_clock::now();
  }
};

Activation parse_activation(const std::string& s) {
  if (s == "swiglu") return Activation::kSwiglu;
  if (s == "geglu") return Activation::kGeglu;
  if (s == "swiglu_oai") return Activation::kSwigluOai;
  TORCH_CHECK(false,
              "moe_kernels (cpu): activation must be 'swiglu', 'geglu' or 'swiglu_oai', got '", s,
              "'");
}

struct FfnArgs {
  int64_t T, H, E, I, k;
  ActParams act;
  bool interleaved;
};

FfnArgs check_ffn(const at::Tensor& x, const at::Tensor& w_gate_up, const at::Tensor& w_down,
                  const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                  const std::optional<at::Tensor>& gate_up_bias,
                  const std::optional<at::Tensor>& down_bias, c10::string_view activation,
                  double alpha, double limit, bool interleaved) {
  check_cpu(x, "x");
  check_cpu(w_gate_up, "w_gate_up");
  check_cpu(w_down, "w_down");
  check_cpu(topk_weights, "topk_weights");
  check_cpu(topk_ids, "topk_ids");
  check_dim(x, 2, "x");
  check_dim(w_gate_up, 3, "w_gate_up");
  check_dim(w_down, 3, "w_down");
  check_dim(topk_weights, 2, "topk_weights");
  check_dim(topk_ids, 2, "topk_ids");
  check_float(x, "x");
  check_float(w_gate_up, "w_gate_up");
  check_float(w_down, "w_down");
  check_weights_dtype(topk_weights, "topk_weights");  // any float dtype; read as fp32
  check_index(topk_ids, "topk_ids");
  check_finite(alpha, "alpha");
  check_finite(limit, "limit");
  check_dtype_of_x(w_gate_up, x, "w_gate_up");
  check_dtype_of_x(w_down, x, "w_down");
  FfnArgs a;
  a.T = x.size(0);
  a.H = x.size(1);
  a.E = w_gate_up.size(0);
  a.k = topk_ids.size(1);
  TORCH_CHECK(w_gate_up.size(1) % 2 == 0, "moe_kernels (cpu): w_gate_up must be [E, 2I, H], got ",
              w_gate_up.sizes(), " (odd second dimension)");
  a.I = w_gate_up.size(1) / 2;
  TORCH_CHECK(w_gate_up.size(2) == a.H, "moe_kernels (cpu): w_gate_up must be [E, 2I, H=", a.H,
              "], got ", w_gate_up.sizes());
  TORCH_CHECK(w_down.size(0) == a.E && w_down.size(1) == a.H && w_down.size(2) == a.I,
              "moe_kernels (cpu): w_down must be [E=", a.E, ", H=", a.H, ", I=", a.I, "], got ",
              w_down.sizes());
  TORCH_CHECK(topk_ids.size(0) == a.T, "moe_kernels (cpu): topk_ids must be [T=", a.T, ", k], got ",
              topk_ids.sizes());
  TORCH_CHECK(topk_weights.sizes() == topk_ids.sizes(), "moe_kernels (cpu): topk_weights ",
              topk_weights.sizes(), " must match topk_ids ", topk_ids.sizes());
  if (gate_up_bias.has_value()) {
    check_cpu(*gate_up_bias, "gate_up_bias");
    check_float(*gate_up_bias, "gate_up_bias");
    check_dtype_of_x(*gate_up_bias, x, "gate_up_bias");
    TORCH_CHECK(gate_up_bias->dim() == 2 && gate_up_bias->size(0) == a.E &&
                    gate_up_bias->size(1) == 2 * a.I,
                "moe_kernels (cpu): gate_up_bias must be [E=", a.E, ", 2I=", 2 * a.I, "], got ",
                gate_up_bias->sizes());
  }
  if (down_bias.has_value()) {
    check_cpu(*down_bias, "down_bias");
    check_float(*down_bias, "down_bias");
    check_dtype_of_x(*down_bias, x, "down_bias");
    TORCH_CHECK(down_bias->dim() == 2 && down_bias->size(0) == a.E && down_bias->size(1) == a.H,
                "moe_kernels (cpu): down_bias must be [E=", a.E, ", H=", a.H, "], got ",
                down_bias->sizes());
  }
  a.act = {parse_activation(std::string(activation)), static_cast<float>(alpha),
           static_cast<float>(limit)};
  a.interleaved = interleaved;
  return a;
}

// Expert-sorted rows of the kept (token, slot) pairs (route's layout without padding).
struct Rows {
  int64_t R = 0;
  std::vector<int64_t> begin, end;   // [E]
  std::vector<int64_t> token;        // [R] token of each row
  std::vector<int64_t> pair;         // [R] flat pair index t*k + s
  std::vector<int64_t> row_of_pair;  // [T*k], -1 for dropped pairs
};

Rows sort_rows(const at::Tensor& topk_ids, int64_t E, int64_t k) {
  at::Tensor ids = topk_ids.contiguous();
  const IndexView iv(ids);
  const int64_t TK = ids.numel();
  const PairCounts pc = count_pairs(iv, TK, E, 0);
  Rows r;
  r.R = pc.rows;
  r.begin = pc.start;
  r.end.resize(E);
  for (int64_t e = 0; e < E; ++e) r.end[e] = pc.start[e] + pc.count[e];
  r.token.resize(r.R);
  r.pair.resize(r.R);
  r.row_of_pair.resize(TK);
  place_pairs(iv, TK, E, pc, [&](int64_t i, int64_t row) {
    r.row_of_pair[i] = row;
    if (row < 0) return;
    r.pair[row] = i;
    r.token[row] = i / k;
  });
  return r;
}

// The expert whose rows hold row r: the first e with end[e] > r (end is non-decreasing).
int64_t expert_of_row(const Rows& rows, int64_t r) {
  return std::upper_bound(rows.end.begin(), rows.end.end(), r) - rows.end.begin();
}

int64_t count_row_blocks(const Rows& rows) {
  int64_t n = 0;
  for (size_t e = 0; e < rows.begin.size(); ++e) {
    const int64_t m = rows.end[e] - rows.begin[e];
    if (m > 0) n += (m + kRowBlock - 1) / kRowBlock;
  }
  return n;
}

// Column block of the forward GEMM tasks.  When every expert's rows take gemm_nt's dot path
// (decode: the weights are streamed once, straight from memory), a task covers about 8 MiB of
// weights: each task boundary breaks the weight stream (the next task's rows are not prefetched,
// and the two threads' tasks interleave in memory), which costs a decode call measurably with
// tasks of 1 MiB or less (bench/NOTES.md v12).  Otherwise `preferred` columns (the packed path's
// blocking). Either way there are at least ~4 tasks per thread when the call is large enough.
// With bf16 weights on CPUs with AVX-512-BF16, gemm_nt reads the weights in place and packs the
// token rows instead, once per task: 32x wider tasks pack them 32x less often (Mixtral's I 14336:
// 2048 columns a task).
int64_t forward_col_block(const Rows& rows, int64_t N, int64_t preferred, int64_t bytes_per_col,
                          at::ScalarType wdt) {
  int64_t max_rows = 0;
  for (size_t e = 0; e < rows.begin.size(); ++e)
    max_rows = std::max(max_rows, rows.end[e] - rows.begin[e]);
  if (max_rows > gemm_dot_max_rows() && bf16_routes(wdt)) preferred *= 32;
  if (max_rows <= gemm_dot_max_rows()) {
    constexpr int64_t kTaskBytes = int64_t{8} << 20;
    int64_t nb = preferred;
    while (nb < N && 2 * nb * bytes_per_col <= kTaskBytes) nb *= 2;
    preferred = nb;
  }
  return pick_col_block(count_row_blocks(rows), N, preferred, 8);
}

// Index in w_gate_up's 2I axis of gate column j and up column j.
inline int64_t gate_col(const FfnArgs& a, int64_t j) { return a.interleaved ? 2 * j : j; }
inline int64_t up_col(const FfnArgs& a, int64_t j) { return a.interleaved ? 2 * j + 1 : a.I + j; }

// The gate and up halves of a pre-activation row [2I] (w_gate_up's column order) as two
// contiguous rows g and u of I values: the row's own halves, or with interleaved columns a
// thread's copy, which store() writes back.
struct GateUpRow {
  float* row;
  int64_t I;
  bool interleaved;
  float *g, *u;
  GateUpRow(const FfnArgs& a, float* row_) : row(row_), I(a.I), interleaved(a.interleaved) {
    if (!interleaved) {
      g = row;
      u = row + I;
      return;
    }
    thread_local ScratchVector<float> copy;
    if (static_cast<int64_t>(copy.size()) < 2 * I) copy.resize(2 * I);
    g = copy.data();
    u = g + I;
    for (int64_t j = 0; j < I; ++j) {
      g[j] = row[2 * j];
      u[j] = row[2 * j + 1];
    }
  }
  void store() const {
    if (!interleaved) return;
    for (int64_t j = 0; j < I; ++j) {
      row[2 * j] = g[j];
      row[2 * j + 1] = u[j];
    }
  }
};

at::Tensor to_f32_contig(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->to(at::kFloat).contiguous() : at::Tensor();
}

// GEMM 1 tasks.  apply_act: writes act(gate, up) [R, I] to out; otherwise the pre-activation
// [R, 2I] in w_gate_up's column order (the backward needs it).
struct Gemm1Job {
  const FfnArgs& a;
  const at::Tensor& w_gate_up;
  const float* bias_gu;
  bool apply_act;
  float* out;
  // apply_act: also the pre-activation [T*k, 2I] in pair order (row t*k + s), when not null
  float* pre_pairs = nullptr;
  // apply_act: act(gate, up) rounded to bf16 here [R, I] instead of fp32 to out, when not null
  c10::BFloat16* out_bf16 = nullptr;
  const int64_t* pair_of_row;
  Operand X;
  std::vector<Task> tasks;

  Gemm1Job(const FfnArgs& a_, const Rows& rows, const at::Tensor& x, const at::Tensor& w,
           const float* bias, bool act, float* o)
      : a(a_), w_gate_up(w), bias_gu(bias), apply_act(act), out(o), pair_of_row(rows.pair.data()) {
    // one column of h reads a gate and an up row of w_gate_up
    const int64_t nb =
        forward_col_block(rows, a.I, 64, 2 * a.H * w.element_size(), w.scalar_type());
    tasks = make_tasks(a.E, rows.begin.data(), rows.end.data(), a.I, kRowBlock, nb);
    X = operand(x, x.stride(0), x.stride(1), 0, rows.token.data());
  }

  // The epilogue of one task's gate and up rows given a block at a time (gemm_nt_paired's
  // route): bias, activation and h's store while the block is in L1, no [rows, 2 x cols] tile.
  struct ActSink final : PairSink {
    const Gemm1Job& j;
    const Task& t;
    const int64_t* cols;  // [2 nbt]: the task's gate columns, then its up columns
    const float* bg;      // the expert's gate_up bias, or null
    ActSink(const Gemm1Job& j_, const Task& t_, const int64_t* cols_, const float* bg_)
        : j(j_), t(t_), cols(cols_), bg(bg_) {}
    void operator()(float* first, float* second, int64_t ldt, int64_t rows, int64_t mb, int64_t m0,
                    int64_t n0) const override {
      const int64_t I = j.a.I, nbt = t.n1 - t.n0;
      if (bg != nullptr) {  // in the transposed layout, one bias value per row
        for (int64_t i = 0; i < rows; ++i) {
          const float b1 = bg[cols[n0 + i]], b2 = bg[cols[nbt + n0 + i]];
          for (int64_t m = 0; m < mb; ++m) {
            first[i * ldt + m] += b1;
            second[i * ldt + m] += b2;
          }
        }
      }
      thread_local ScratchVector<float> buf;
      const int64_t need = rows * ldt + 2 * mb * rows;
      if (static_cast<int64_t>(buf.size()) < need) buf.resize(need);
      float* ht = buf.data();       // act in the transposed layout [rows, ldt]
      float* tm = ht + rows * ldt;  // token-major [mb, rows] (x2 for the pre-activation)
      if (j.pre_pairs != nullptr) {
        float* g = tm;
        float* u = tm + mb * rows;
        gemm_store_transposed(first, ldt, rows, mb, g, rows);
        gemm_store_transposed(second, ldt, rows, mb, u, rows);
        for (int64_t m = 0; m < mb; ++m) {
          float* p = j.pre_pairs + j.pair_of_row[t.m0 + m0 + m] * 2 * I;
          for (int64_t i = 0; i < rows; ++i) {
            p[cols[n0 + i]] = g[m * rows + i];
            p[cols[nbt + n0 + i]] = u[m * rows + i];
          }
        }
      }
      // the whole block in one call where its rows are full (e^x and the division pipelined over
      // 1024 values, not a dependent chain per 32); the values do not depend on the split
      if (mb == ldt) {
        act_forward_row(j.a.act, first, second, ht, rows * ldt);
      } else {
        for (int64_t i = 0; i < rows; ++i)
          act_forward_row(j.a.act, first + i * ldt, second + i * ldt, ht + i * ldt, mb);
      }
      const int64_t r0 = t.m0 + m0;
      if (j.out_bf16 == nullptr) {
        gemm_store_transposed(ht, ldt, rows, mb, j.out + r0 * I + t.n0 + n0, I);
        return;
      }
      // h goes past the caches: GEMM 2 reads it once, after the expert's other GEMM 1 tasks, and
      // plain stores would read every line of it in first
      gemm_store_transposed(ht, ldt, rows, mb, tm, rows);
      for (int64_t m = 0; m < mb; ++m)
        store_bf16_stream(tm + m * rows, j.out_bf16 + (r0 + m) * I + t.n0 + n0, rows);
    }
  };

  void run(int64_t i) const {
    const int64_t I = a.I;
    const Task& t = tasks[i];
    const int64_t mb = t.m1 - t.m0, nbt = t.n1 - t.n0;
    thread_local ScratchVector<float> tile;
    thread_local std::vector<int64_t> cols;
    cols.resize(2 * nbt);
    for (int64_t j = 0; j < nbt; ++j) {
      cols[j] = gate_col(a, t.n0 + j);
      cols[nbt + j] = up_col(a, t.n0 + j);
    }
    const Operand W = operand(w_gate_up, w_gate_up.stride(1), w_gate_up.stride(2),
                              t.e * w_gate_up.stride(0), cols.data());
    const float* bg = bias_gu ? bias_gu + t.e * 2 * I : nullptr;
    if (apply_act) {
      const ActSink sink(*this, t, cols.data(), bg);
      if (gemm_nt_paired(mb, nbt, a.H, X.shifted(t.m0, 0), W, sink)) {
        _mm_sfence();  // the sink's streamed stores of h before GEMM 2 reads them
        return;
      }
    }
    if (static_cast<int64_t>(tile.size()) < mb * 2 * nbt) tile.resize(mb * 2 * nbt);
    float* c = tile.data();
    gemm_nt(mb, 2 * nbt, a.H, X.shifted(t.m0, 0), W, c, 2 * nbt);
    for (int64_t m = 0; m < mb; ++m) {
      // the row's gate and up values in the tile
      float* g = c + m * 2 * nbt;
      float* u = g + nbt;
      if (apply_act) {
        if (bg != nullptr) {  // biased in place (the tile is scratch)
          for (int64_t j = 0; j < nbt; ++j) {
            g[j] += bg[cols[j]];
            u[j] += bg[cols[nbt + j]];
          }
        }
        if (out_bf16 != nullptr) {
          thread_local ScratchVector<float> act_row;
          if (static_cast<int64_t>(act_row.size()) < nbt) act_row.resize(nbt);
          act_forward_row(a.act, g, u, act_row.data(), nbt);
          store_f32(act_row.data(), out_bf16 + (t.m0 + m) * I + t.n0, at::kBFloat16, nbt);
        } else {
          act_forward_row(a.act, g, u, out + (t.m0 + m) * I + t.n0, nbt);
        }
        if (pre_pairs != nullptr) {
          float* p = pre_pairs + pair_of_row[t.m0 + m] * 2 * I;
          for (int64_t j = 0; j < nbt; ++j) {
            p[cols[j]] = g[j];
            p[cols[nbt + j]] = u[j];
          }
        }
      } else {
        float* p = out + (t.m0 + m) * 2 * I;
        for (int64_t j = 0; j < nbt; ++j) {
          p[cols[j]] = g[j] + (bg ? bg[cols[j]] : 0.f);
          p[cols[nbt + j]] = u[j] + (bg ? bg[cols[nbt + j]] : 0.f);
        }
      }
    }
  }
};

// GEMM 2 tasks: y[r, :] = h[r, :] @ w_down[e]^T, written by gemm_nt straight into y (no tile
// and no epilogue pass over it: combine applies the routing weight and b_down).
struct Gemm2Job {
  const FfnArgs& a;
  const at::Tensor& h;  // [R, I]: fp32, or bf16 (GEMM 1 rounded it)
  const at::Tensor& w_down;
  float* y;
  int h_terms;  // Operand::max_terms of h against bf16 weights
  std::vector<Task> tasks;

  // h_terms: 3 where y must keep fp32 accuracy (fp32 models), 1 where y only feeds an output
  // rounded to x's 16-bit dtype (h rounded, as the GPU backends do; with bf16 weights GEMM 1
  // stores h already rounded, in half the bytes).
  Gemm2Job(const FfnArgs& a_, const Rows& rows, const at::Tensor& h_, const at::Tensor& w,
           float* y_, int h_terms_)
      : a(a_), h(h_), w_down(w), y(y_), h_terms(h_terms_) {
    int64_t nb = forward_col_block(rows, a.H, 128, a.I * w.element_size(), w.scalar_type());
    if (const char* e = std::getenv("XX_GEMM2_COLS")) nb = std::min<int64_t>(nb, std::atoll(e));
    tasks = make_tasks(a.E, rows.begin.data(), rows.end.data(), a.H, kRowBlock, nb);
  }

  void run(int64_t i) const {
    const int64_t H = a.H, I = a.I;
    const Task& t = tasks[i];
    const int64_t mb = t.m1 - t.m0, nbt = t.n1 - t.n0;
    Operand A = operand(h, I, 1, t.m0 * I);
    A.max_terms = h_terms;
    const Operand W = operand(w_down, w_down.stride(1), w_down.stride(2),
                              t.e * w_down.stride(0) + t.n0 * w_down.stride(1));
    gemm_nt(mb, nbt, I, A, W, y + t.m0 * H + t.n0, H, /*stream_c=*/true);
  }
};

void gemm1(const FfnArgs& a, const Rows& rows, const at::Tensor& x, const at::Tensor& w_gate_up,
           const float* bias_gu, bool apply_act, float* out) {
  const Gemm1Job job(a, rows, x, w_gate_up, bias_gu, apply_act, out);
  parallel_tasks(static_cast<int64_t>(job.tasks.size()), [&](int64_t i, int64_t) { job.run(i); });
}

// GEMM 1 then GEMM 2 in one parallel region: the GEMM 2 tasks of an expert start as soon as that
// expert's GEMM 1 tasks are done (a per-expert countdown), so there is no barrier between the two
// GEMMs -- on a machine shared with other processes, a descheduled thread at a barrier stalls all.
// Both task lists are in expert order, so a GEMM 2 task almost never has to wait.
void gemm1_gemm2_fused(const Gemm1Job& j1, const Gemm2Job& j2, int64_t E) {
  const int64_t n1 = static_cast<int64_t>(j1.tasks.size());
  const int64_t n2 = static_cast<int64_t>(j2.tasks.size());
  std::vector<std::atomic<int64_t>> pending(E);
  for (auto& p : pending) p.store(0, std::memory_order_relaxed);
  for (const Task& t : j1.tasks) pending[t.e].fetch_add(1, std::memory_order_relaxed);
  parallel_tasks(n1 + n2, [&](int64_t i, int64_t) {
    if (i < n1) {
      j1.run(i);
      pending[j1.tasks[i].e].fetch_sub(1, std::memory_order_release);
      return;
    }
    const Task& t = j2.tasks[i - n1];
    while (pending[t.e].load(std::memory_order_acquire) != 0) std::this_thread::yield();
    j2.run(i - n1);
  });
}

// out[t, :] = sum_s w[t*k+s] * (vals[r, :] + bias[e(r), :]) in slot order (fp32), r =
// row_of_pair[t*k+s] and e(r) its expert, cast to out's dtype, for t < T; w null: 1, bias null:
// 0.  Dropped pairs add nothing (their weight is never read).
void combine(const Rows& rows, int64_t T, int64_t k, int64_t H, const float* vals, at::Tensor& out,
             const float* w = nullptr, const float* bias = nullptr) {
  char* op = static_cast<char*>(out.data_ptr());
  const int64_t es = out.element_size();
  const at::ScalarType odt = out.scalar_type();
  // grain: ~32K adds per chunk, so decode-sized calls run inline (no parallel region to join)
  at::parallel_for(0, T, std::max<int64_t>(1, 32768 / std::max<int64_t>(H * k, 1)),
                   [&](int64_t t0, int64_t t1) {
                     std::vector<float> acc(H);
                     for (int64_t t = t0; t < t1; ++t) {
                       std::fill(acc.begin(), acc.end(), 0.f);
                       for (int64_t s = 0; s < k; ++s) {
                         const int64_t r = rows.row_of_pair[t * k + s];
                         if (r < 0) continue;
                         const float* v = vals + r * H;
                         const float ws = w ? w[t * k + s] : 1.f;
                         if (bias != nullptr) {
                           const float* b = bias + expert_of_row(rows, r) * H;
                           for (int64_t j = 0; j < H; ++j) acc[j] += ws * (v[j] + b[j]);
                         } else if (w != nullptr) {
                           for (int64_t j = 0; j < H; ++j) acc[j] += ws * v[j];
                         } else {
                           for (int64_t j = 0; j < H; ++j) acc[j] += v[j];
                         }
                       }
                       store_f32(acc.data(), op + t * H * es, odt, H);
                     }
                   });
}

// The forward; pre (moe_ffn_train): a [T*k, 2I] fp32 tensor that receives the pre-activation of
// every kept pair, zeros for the dropped ones, or undefined.
at::Tensor ffn_forward(const FfnArgs& a, const at::Tensor& x, const at::Tensor& w_gate_up,
                       const at::Tensor& w_down, const at::Tensor& topk_weights,
                       const at::Tensor& topk_ids, const std::optional<at::Tensor>& gate_up_bias,
                       const std::optional<at::Tensor>& down_bias, at::Tensor pre) {
  at::Tensor out = new_output({a.T, a.H}, x.options());
  if (a.T == 0) return out;
  PhaseTimer timer;
  const Rows rows = sort_rows(topk_ids, a.E, a.k);
  if (pre.defined()) {
    // the dropped pairs' rows; with H = 0, every row (the bias alone); GEMM 1 writes the others
    float* pp = pre.data_ptr<float>();
    const at::Tensor bgu = a.H == 0 ? to_f32_contig(gate_up_bias) : at::Tensor();
    for (int64_t i = 0; i < a.T * a.k; ++i) {
      const int64_t r = rows.row_of_pair[i];
      if (r >= 0 && a.H > 0) continue;
      float* row = pp + i * 2 * a.I;
      if (r >= 0 && bgu.defined()) {
        const float* b = bgu.data_ptr<float>() + expert_of_row(rows, r) * 2 * a.I;
        std::copy(b, b + 2 * a.I, row);
      } else {
        std::fill(row, row + 2 * a.I, 0.f);
      }
    }
  }
  if (a.H == 0) return out;
  if (rows.R == 0) {
    out.zero_();
    return out;
  }
  const at::Tensor bgu = to_f32_contig(gate_up_bias), bd = to_f32_contig(down_bias);
  const at::Tensor tw = topk_weights.to(at::kFloat).contiguous();
  // h in bf16 where GEMM 2 would round it to one bf16 term anyway (the same values)
  const int h_terms = x.scalar_type() == at::kFloat ? 3 : 1;
  const bool h_bf16 = h_terms == 1 && w_down.scalar_type() == at::kBFloat16;
  at::Tensor h = new_buffer({rows.R, a.I}, x.options().dtype(h_bf16 ? at::kBFloat16 : at::kFloat));
  at::Tensor y = new_buffer({rows.R, a.H}, x.options().dtype(at::kFloat));
  timer.lap("setup");
  Gemm1Job j1(a, rows, x, w_gate_up, bgu.defined() ? bgu.data_ptr<float>() : nullptr, true,
              h_bf16 ? nullptr : h.data_ptr<float>());
  if (h_bf16) j1.out_bf16 = h.data_ptr<c10::BFloat16>();
  if (pre.defined()) j1.pre_pairs = pre.data_ptr<float>();
  const Gemm2Job j2(a, rows, h, w_down, y.data_ptr<float>(), h_terms);
  gemm1_gemm2_fused(j1, j2, a.E);
  timer.lap("gemms");
  // Tests only (set_test_fault("moe_ffn")): the last token row is left unwritten.
  const int64_t tokens = test_fault() == TestFault::kMoeFfnLastToken ? a.T - 1 : a.T;
  combine(rows, tokens, a.k, a.H, y.data_ptr<float>(), out, tw.data_ptr<float>(),
          bd.defined() ? bd.data_ptr<float>() : nullptr);
  timer.lap("combine");
  return out;
}

at::Tensor moe_ffn_cpu(const at::Tensor& x, const at::Tensor& w_gate_up, const at::Tensor& w_down,
                       const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                       const std::optional<at::Tensor>& gate_up_bias,
                       const std::optional<at::Tensor>& down_bias, c10::string_view activation,
                       double alpha, double limit, bool interleaved) {
  const FfnArgs a = check_ffn(x, w_gate_up, w_down, topk_weights, topk_ids, gate_up_bias, down_bias,
                              activation, alpha, limit, interleaved);
  return ffn_forward(a, x, w_gate_up, w_down, topk_weights, topk_ids, gate_up_bias, down_bias,
                     at::Tensor());
}

// moe_ffn's output and the pre-activation its backward needs (moe_ffn_backward_saved).
std::tuple<at::Tensor, at::Tensor> moe_ffn_train_cpu(
    const at::Tensor& x, const at::Tensor& w_gate_up, const at::Tensor& w_down,
    const at::Tensor& topk_weights, const at::Tensor& topk_ids,
    const std::optional<at::Tensor>& gate_up_bias, const std::optional<at::Tensor>& down_bias,
    c10::string_view activation, double alpha, double limit, bool interleaved) {
  const FfnArgs a = check_ffn(x, w_gate_up, w_down, topk_weights, topk_ids, gate_up_bias, down_bias,
                              activation, alpha, limit, interleaved);
  at::Tensor pre = new_output({a.T * a.k, 2 * a.I}, x.options().dtype(at::kFloat));
  at::Tensor out =
      ffn_forward(a, x, w_gate_up, w_down, topk_weights, topk_ids, gate_up_bias, down_bias, pre);
  return {out, pre};
}

// bias gradient: grad[e][n] = sum over the expert's rows of G[r, n] (rows in order).
void expert_bias_grad(const Rows& rows, const float* G, int64_t N, at::Tensor& grad) {
  const int64_t E = grad.size(0);
  char* gp = static_cast<char*>(grad.data_ptr());
  const int64_t es = grad.element_size();
  at::parallel_for(0, E, 1, [&](int64_t e0, int64_t e1) {
    std::vector<float> acc(N);
    for (int64_t e = e0; e < e1; ++e) {
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t r = rows.begin[e]; r < rows.end[e]; ++r)
        for (int64_t n = 0; n < N; ++n) acc[n] += G[r * N + n];
      store_f32(acc.data(), gp + e * N * es, grad.scalar_type(), N);
    }
  });
}

// Data gradient through one weight of each expert: out[r, n] = sum_k G(r, k) * w[e][k, n] for
// the rows r of expert e (G: an operand of R rows and K columns; w [E, K, N], any strides: the
// weight read as W^T, so along N).
void data_grad(const Rows& rows, const Operand& G, const at::Tensor& w, float* out) {
  const int64_t E = w.size(0), K = w.size(1), N = w.size(2);
  const int64_t nb = forward_col_block(rows, N, 128, K * w.element_size(), w.scalar_type());
  const std::vector<Task> tasks =
      make_tasks(E, rows.begin.data(), rows.end.data(), N, kRowBlock, nb);
  parallel_tasks(static_cast<int64_t>(tasks.size()), [&](int64_t i, int64_t) {
    const Task& t = tasks[i];
    const Operand W = operand(w, w.stride(2), w.stride(1), t.e * w.stride(0) + t.n0 * w.stride(2));
    gemm_nt(t.m1 - t.m0, t.n1 - t.n0, K, G.shifted(t.m0, 0), W, out + t.m0 * N + t.n0, N);
  });
}

using FfnGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The backward; saved: moe_ffn_train's pre-activation [T*k, 2I] (fp32), or undefined (GEMM 1 is
// re-run).
FfnGrads ffn_backward(const at::Tensor& grad_out, const at::Tensor& saved, const at::Tensor& x,
                      const at::Tensor& w_gate_up, const at::Tensor& w_down,
                      const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                      const std::optional<at::Tensor>& gate_up_bias,
                      const std::optional<at::Tensor>& down_bias, c10::string_view activation,
                      double alpha, double limit, bool interleaved) {
  const FfnArgs a = check_ffn(x, w_gate_up, w_down, topk_weights, topk_ids, gate_up_bias, down_bias,
                              activation, alpha, limit, interleaved);
  if (saved.defined()) {
    check_cpu(saved, "pre");
    TORCH_CHECK(saved.scalar_type() == at::kFloat && saved.dim() == 2 &&
                    saved.size(0) == a.T * a.k && saved.size(1) == 2 * a.I,
                "moe_kernels (cpu): pre must be moe_ffn_train's float32 [T*k=", a.T * a.k,
                ", 2I=", 2 * a.I, "], got ", saved.scalar_type(), " ", saved.sizes());
  }
  check_cpu(grad_out, "grad_out");
  check_float(grad_out, "grad_out");
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == a.T && grad_out.size(1) == a.H,
              "moe_kernels (cpu): grad_out must be [T=", a.T, ", H=", a.H, "], got ",
              grad_out.sizes());
  const int64_t T = a.T, H = a.H, I = a.I, k = a.k, E = a.E;
  // The backward GEMMs of a bf16 model take their fp32 operands (the output and
  // pre-activation gradients, the activations) rounded to bf16, as bf16 autograd and the GPU
  // backends do: one bf16 term each against the weights and each other.
  const int g_terms = x.scalar_type() == at::kBFloat16 ? 1 : 3;
  PhaseTimer timer;
  const Rows rows = sort_rows(topk_ids, E, k);
  const int64_t R = rows.R;
  auto f32 = x.options().dtype(at::kFloat);
  const at::Tensor bgu = to_f32_contig(gate_up_bias), bd = to_f32_contig(down_bias);
  const at::Tensor tw = topk_weights.to(at::kFloat).contiguous();
  const at::Tensor go = grad_out.to(at::kFloat).contiguous();
  const float* twp = tw.data_ptr<float>();
  const float* gop = go.data_ptr<float>();

  // Recompute the forward's pre-activation and activation in expert-sorted order.
  at::Tensor pre = new_buffer({R, 2 * I}, f32), hact = new_buffer({R, I}, f32);
  at::Tensor gy = new_buffer({R, H}, f32), gh = new_buffer({R, I}, f32);
  float* prep = pre.data_ptr<float>();
  float* hp = hact.data_ptr<float>();
  float* gyp = gy.data_ptr<float>();
  float* ghp = gh.data_ptr<float>();
  std::vector<float> row_w(R);
  for (int64_t r = 0; r < R; ++r) row_w[r] = twp[rows.pair[r]];
  if (R > 0) {
    const at::Tensor sv = saved.defined() ? saved.contiguous() : at::Tensor();
    const float* svp = sv.defined() ? sv.data_ptr<float>() : nullptr;
    if (svp == nullptr)
      gemm1(a, rows, x, w_gate_up, bgu.defined() ? bgu.data_ptr<float>() : nullptr, false, prep);
    at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        if (svp != nullptr)  // the forward's pre-activation, into expert-sorted order
          std::copy(svp + rows.pair[r] * 2 * I, svp + (rows.pair[r] + 1) * 2 * I, prep + r * 2 * I);
        GateUpRow gu(a, prep + r * 2 * I);
        act_forward_row(a.act, gu.g, gu.u, hp + r * I, I);
        // gy[r] = w[r] * grad_out[token r]
        const float* g = gop + rows.token[r] * H;
        for (int64_t n = 0; n < H; ++n) gyp[r * H + n] = row_w[r] * g[n];
      }
    });
    // gh[r] = grad_out[token r] @ w_down[e]: the gradient of row r's unweighted output y_r
    // through w_down (weighted by w[r] in the activation backward below)
    data_grad(rows, operand_f32(gop, H, 1, rows.token.data()), w_down, ghp);
  }
  timer.lap("recompute");

  // grad_topk_weights[t, s] = <grad_out[t], y_r> with y_r = w_down[e] hact[r] + b_down[e], so
  // = <hact[r], gh[r]> + <grad_out[t], b_down[e]>: the forward's second GEMM is not re-run
  at::Tensor gw32 = new_output({T, k}, f32);
  {
    float* gwp = gw32.data_ptr<float>();
    const float* bdp = bd.defined() ? bd.data_ptr<float>() : nullptr;
    at::parallel_for(0, T * k, 64, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t r = rows.row_of_pair[i];
        if (r < 0) {
          gwp[i] = 0.f;
          continue;
        }
        float acc = 0.f;
        for (int64_t j = 0; j < I; ++j) acc += hp[r * I + j] * ghp[r * I + j];
        if (bdp != nullptr) {
          const float* g = gop + (i / k) * H;
          const float* b = bdp + expert_of_row(rows, r) * H;
          for (int64_t n = 0; n < H; ++n) acc += g[n] * b[n];
        }
        gwp[i] = acc;
      }
    });
  }
  at::Tensor grad_tw = gw32.to(topk_weights.scalar_type());

  timer.lap("grad_tw");
  // grad_w_down[e] = gy^T hact; grad_down_bias[e] = sum gy
  at::Tensor grad_wd = new_output({E, H, I}, w_down.options());
  Operand P = operand_f32(gyp, 1, H), Q = operand_f32(hp, 1, I);  // (m, r) = [r, m]
  P.max_terms = Q.max_terms = g_terms;
  expert_weight_grad(rows.begin, rows.end, P, Q, grad_wd);
  at::Tensor grad_bd = at::empty({0}, x.options());
  if (down_bias.has_value()) {
    grad_bd = new_output({E, H}, down_bias->options());
    expert_bias_grad(rows, gyp, H, grad_bd);
  }

  timer.lap("grad_wd");
  // d pre = act'(pre, w[r] gh[r]) (into pre's storage)
  if (R > 0) {
    at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        GateUpRow gu(a, prep + r * 2 * I);
        act_backward_row(a.act, gu.g, gu.u, ghp + r * I, row_w[r], I);
        gu.store();
      }
    });
  }
  const float* ggu = prep;  // now d(pre-activation) [R, 2I]
  timer.lap("grad_pre");

  // grad_w_gate_up[e] = ggu^T x_rows; grad_gate_up_bias[e] = sum ggu
  at::Tensor xg = new_buffer({R, H}, f32);
  float* xgp = xg.data_ptr<float>();
  if (R > 0) {
    const Operand X = operand(x, x.stride(0), x.stride(1), 0, rows.token.data());
    at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
      gemm_load_rows(r1 - r0, H, X.shifted(r0, 0), xgp + r0 * H, H);
    });
  }
  at::Tensor grad_wgu = new_output({E, 2 * I, H}, w_gate_up.options());
  P = operand_f32(ggu, 1, 2 * I);
  Q = operand_f32(xgp, 1, H);
  P.max_terms = Q.max_terms = g_terms;
  expert_weight_grad(rows.begin, rows.end, P, Q, grad_wgu);
  at::Tensor grad_bgu = at::empty({0}, x.options());
  if (gate_up_bias.has_value()) {
    grad_bgu = new_output({E, 2 * I}, gate_up_bias->options());
    expert_bias_grad(rows, ggu, 2 * I, grad_bgu);
  }

  timer.lap("grad_wgu");
  // grad_x[t] = sum_s (ggu @ w_gate_up[e])[row]  (slot order)
  at::Tensor gxr = new_buffer({R, H}, f32);
  float* gxp = gxr.data_ptr<float>();
  if (R > 0) {
    Operand G = operand_f32(ggu, 2 * I, 1);
    G.max_terms = g_terms;
    data_grad(rows, G, w_gate_up, gxp);
  }
  at::Tensor grad_x = new_output({T, H}, x.options());
  timer.lap("grad_xrow");
  if (T > 0 && H > 0) combine(rows, T, k, H, gxp, grad_x);
  timer.lap("combine");
  return {grad_x, grad_wgu, grad_wd, grad_tw, grad_bgu, grad_bd};
}

FfnGrads moe_ffn_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                              const at::Tensor& w_gate_up, const at::Tensor& w_down,
                              const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                              const std::optional<at::Tensor>& gate_up_bias,
                              const std::optional<at::Tensor>& down_bias,
                              c10::string_view activation, double alpha, double limit,
                              bool interleaved) {
  return ffn_backward(grad_out, at::Tensor(), x, w_gate_up, w_down, topk_weights, topk_ids,
                      gate_up_bias, down_bias, activation, alpha, limit, interleaved);
}

FfnGrads moe_ffn_backward_saved_cpu(const at::Tensor& grad_out, const at::Tensor& pre,
                                    const at::Tensor& x, const at::Tensor& w_gate_up,
                                    const at::Tensor& w_down, const at::Tensor& topk_weights,
                                    const at::Tensor& topk_ids,
                                    const std::optional<at::Tensor>& gate_up_bias,
                                    const std::optional<at::Tensor>& down_bias,
                                    c10::string_view activation, double alpha, double limit,
                                    bool interleaved) {
  return ffn_backward(grad_out, pre, x, w_gate_up, w_down, topk_weights, topk_ids, gate_up_bias,
                      down_bias, activation, alpha, limit, interleaved);
}

}  // namespace

void register_moe_ffn(torch::Library& m) {
  m.impl("moe_ffn", &moe_ffn_cpu);
  m.impl("moe_ffn_backward", &moe_ffn_backward_cpu);
  m.impl("moe_ffn_train", &moe_ffn_train_cpu);
  m.impl("moe_ffn_backward_saved", &moe_ffn_backward_saved_cpu);
}

}  // namespace moe_kernels::cpu
