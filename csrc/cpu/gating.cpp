// topk_gating and its backward on CPU: one token row per work item, fp32 math.
#include <cmath>
#include <limits>
#include <vector>

#include "common/topk.h"
#include "cpu/cpu_utils.h"
#include "cpu/ops.h"

namespace moe_kernels::cpu {
namespace {

enum class Scoring { kSoftmax, kSigmoid };

Scoring parse_scoring(const std::string& s) {
  if (s == "softmax") return Scoring::kSoftmax;
  if (s == "sigmoid") return Scoring::kSigmoid;
  TORCH_CHECK(false, "moe_kernels (cpu): scoring must be 'softmax' or 'sigmoid', got '", s, "'");
}

// scores[0, E) of one row, fp32.
template <typename Dt>
void row_scores(const Dt* logits, int64_t E, Scoring scoring, float* scores) {
  if (scoring == Scoring::kSoftmax) {
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t e = 0; e < E; ++e) mx = std::max(mx, to_f32(logits[e]));
    float sum = 0.f;
    for (int64_t e = 0; e < E; ++e) {
      scores[e] = std::exp(to_f32(logits[e]) - mx);
      sum += scores[e];
    }
    const float inv = 1.0f / sum;
    for (int64_t e = 0; e < E; ++e) scores[e] *= inv;
  } else {
    for (int64_t e = 0; e < E; ++e) scores[e] = 1.0f / (1.0f + std::exp(-to_f32(logits[e])));
  }
}

template <typename Dt>
void gating_kernel(const at::Tensor& logits, int64_t k, Scoring scoring, bool renormalize,
                   const float* bias, int64_t G, int64_t topk_groups, float scale, float* weights,
                   int32_t* ids) {
  const int64_t T = logits.size(0), E = logits.size(1);
  const Dt* lp = logits.data_ptr<Dt>();
  const int64_t ls = logits.stride(0), le = logits.stride(1);
  const int64_t per = G > 0 ? E / G : E;
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    std::vector<float> row(E), scores(E), sel(E), gval(std::max<int64_t>(G, 1));
    std::vector<int32_t> gkeep(std::max<int64_t>(topk_groups, 1));
    for (int64_t t = t0; t < t1; ++t) {
      const Dt* lrow = lp + t * ls;
      if (le == 1) {
        row_scores(lrow, E, scoring, scores.data());
      } else {
        std::vector<Dt> tmp(E);
        for (int64_t e = 0; e < E; ++e) tmp[e] = lrow[e * le];
        row_scores(tmp.data(), E, scoring, scores.data());
      }
      for (int64_t e = 0; e < E; ++e) sel[e] = scores[e] + (bias ? bias[e] : 0.f);
      if (G > 0) {
        for (int64_t g = 0; g < G; ++g) gval[g] = group_score(sel.data() + g * per, (int)per);
        topk_row(gval.data(), (int)G, (int)topk_groups, [](int) { return true; }, gkeep.data());
        std::vector<char> ok(G, 0);
        for (int64_t i = 0; i < topk_groups; ++i) ok[gkeep[i]] = 1;
        // Experts of dropped groups can still fill slots past the eligible count, in index order
        // (they all score -inf), exactly as a stable sort over the masked scores does.
        for (int64_t e = 0; e < E; ++e)
          if (!ok[e / per]) sel[e] = -std::numeric_limits<float>::infinity();
      }
      // Every index is eligible and k <= E, so the picks are k distinct ids in [0, E) whatever
      // the scores (NaN, +-inf): see common/topk.h.
      int32_t* out_ids = ids + t * k;
      topk_row(sel.data(), (int)E, (int)k, [](int) { return true; }, out_ids);
      // w = p / sum(p) * scale in fp32, divided (not multiplied by a reciprocal) as the reference
      // does, so k = 1 gives exactly scale.
      float sum = 0.f;
      for (int64_t s = 0; s < k; ++s) sum += scores[out_ids[s]];
      for (int64_t s = 0; s < k; ++s) {
        const float p = scores[out_ids[s]];
        weights[t * k + s] = (renormalize ? p / sum : p) * scale;
      }
    }
  });
}

template <typename Dt>
void gating_backward_kernel(const at::Tensor& grad_w, const at::Tensor& logits,
                            const at::Tensor& ids, Scoring scoring, bool renormalize, float scale,
                            at::Tensor& grad) {
  const int64_t T = logits.size(0), E = logits.size(1), k = ids.size(1);
  const Dt* lp = logits.data_ptr<Dt>();
  Dt* gp = grad.data_ptr<Dt>();
  const IndexView idv(ids);
  const float* gw = grad_w.data_ptr<float>();
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    std::vector<float> p(E), gp32(E);
    for (int64_t t = t0; t < t1; ++t) {
      row_scores(lp + t * E, E, scoring, p.data());
      std::fill(gp32.begin(), gp32.end(), 0.f);
      // w_s = scale * p[e_s] / S with S = sum_r p[e_r] (S = 1 without renormalize).
      float S = 1.f, dot = 0.f;
      if (renormalize) {
        S = 0.f;
        for (int64_t s = 0; s < k; ++s) {
          const int64_t e = idv[t * k + s];
          if (e >= 0 && e < E) S += p[e];
        }
        for (int64_t s = 0; s < k; ++s) {
          const int64_t e = idv[t * k + s];
          if (e >= 0 && e < E) dot += gw[t * k + s] * p[e];
        }
      }
      for (int64_t s = 0; s < k; ++s) {
        const int64_t e = idv[t * k + s];
        if (e < 0 || e >= E) continue;
        gp32[e] += renormalize ? scale / S * (gw[t * k + s] - dot / S) : scale * gw[t * k + s];
      }
      if (scoring == Scoring::kSoftmax) {
        float inner = 0.f;
        for (int64_t e = 0; e < E; ++e) inner += gp32[e] * p[e];
        for (int64_t e = 0; e < E; ++e) gp[t * E + e] = from_f32<Dt>(p[e] * (gp32[e] - inner));
      } else {
        for (int64_t e = 0; e < E; ++e) gp[t * E + e] = from_f32<Dt>(gp32[e] * p[e] * (1.f - p[e]));
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> topk_gating_cpu(const at::Tensor& router_logits, int64_t top_k,
                                                   c10::string_view scoring, bool renormalize,
                                                   const std::optional<at::Tensor>& correction_bias,
                                                   int64_t num_expert_groups, int64_t topk_groups,
                                                   double routed_scaling_factor) {
  check_cpu(router_logits, "router_logits");
  check_dim(router_logits, 2, "router_logits");
  check_float(router_logits, "router_logits");
  const int64_t T = router_logits.size(0), E = router_logits.size(1);
  TORCH_CHECK(top_k >= 1 && top_k <= E, "moe_kernels (cpu): top_k must be in [1, E=", E, "], got ",
              top_k);
  const Scoring sc = parse_scoring(std::string(scoring));
  check_finite(routed_scaling_factor, "routed_scaling_factor");
  at::Tensor bias;
  if (correction_bias.has_value()) {
    check_cpu(*correction_bias, "correction_bias");
    TORCH_CHECK(correction_bias->dim() == 1 && correction_bias->size(0) == E,
                "moe_kernels (cpu): correction_bias must have shape [E=", E, "], got ",
                correction_bias->sizes());
    bias = correction_bias->to(at::kFloat).contiguous();
  }
  if (num_expert_groups > 0) {
    TORCH_CHECK(E % num_expert_groups == 0,
                "moe_kernels (cpu): num_expert_groups=", num_expert_groups,
                " must divide the number of experts E=", E);
    TORCH_CHECK(topk_groups >= 1 && topk_groups <= num_expert_groups,
                "moe_kernels (cpu): topk_groups must be in [1, num_expert_groups=",
                num_expert_groups, "], got ", topk_groups);
  }
  auto opts = router_logits.options();
  at::Tensor weights = new_output({T, top_k}, opts.dtype(at::kFloat));
  at::Tensor ids = new_output({T, top_k}, opts.dtype(at::kInt));
  if (T == 0) return {weights, ids};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, router_logits.scalar_type(), "topk_gating", [&] {
        gating_kernel<scalar_t>(router_logits, top_k, sc, renormalize,
                                bias.defined() ? bias.data_ptr<float>() : nullptr,
                                num_expert_groups, topk_groups,
                                static_cast<float>(routed_scaling_factor),
                                weights.data_ptr<float>(), ids.data_ptr<int32_t>());
      });
  return {weights, ids};
}

at::Tensor topk_gating_backward_cpu(const at::Tensor& grad_weights, const at::Tensor& router_logits,
                                    const at::Tensor& topk_ids, c10::string_view scoring,
                                    bool renormalize, double routed_scaling_factor) {
  check_cpu(router_logits, "router_logits");
  check_cpu(grad_weights, "grad_weights");
  check_cpu(topk_ids, "topk_ids");
  check_dim(router_logits, 2, "router_logits");
  check_float(router_logits, "router_logits");
  check_index(topk_ids, "topk_ids");
  check_dim(topk_ids, 2, "topk_ids");
  TORCH_CHECK(topk_ids.size(0) == router_logits.size(0) && grad_weights.sizes() == topk_ids.sizes(),
              "moe_kernels (cpu): grad_weights ", grad_weights.sizes(), " and topk_ids ",
              topk_ids.sizes(),
              " must be [T, k] with T = router_logits.size(0) = ", router_logits.size(0));
  const Scoring sc = parse_scoring(std::string(scoring));
  check_finite(routed_scaling_factor, "routed_scaling_factor");
  at::Tensor logits = router_logits.contiguous();
  at::Tensor ids = topk_ids.contiguous();
  at::Tensor gw = grad_weights.to(at::kFloat).contiguous();
  at::Tensor grad = new_output(logits.sizes(), logits.options());
  if (logits.numel() == 0) return grad;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, logits.scalar_type(), "topk_gating_bwd", [&] {
        gating_backward_kernel<scalar_t>(gw, logits, ids, sc, renormalize,
                                         static_cast<float>(routed_scaling_factor), grad);
      });
  return grad;
}

}  // namespace

void register_gating(torch::Library& m) {
  m.impl("topk_gating", &topk_gating_cpu);
  m.impl("topk_gating_backward", &topk_gating_backward_cpu);
}

}  // namespace moe_kernels::cpu
