// One decoder layer of a decode step (one new token for each of a few sequences) as two calls: the attention block
// and the FFN block, each from its residual-stream input to its residual-stream output.
//
// Why: a decode step's weights stream through the few-row kernels (few_rows.cpp, mla_decode.cpp) close to the
// memory's rate, but between them the plain model runs ~1,100 small ATen ops per step (norm pieces, views and
// casts, RoPE, the router's softmax, top-k and group mask, the copies' sort and bincount, the combine), each paying
// Python's and the dispatcher's fixed cost: a few ms of a step that otherwise costs what its bytes cost. Here the
// same products run from C++ (the same kernels, so the results are those of the plain model's CPU path up to
// summation order) and the glue between them is a few loops over a few rows.
//
//     attention_decode: x + o_proj(W_UV attend([W_UK^T q_nope ; rope(q_pe)] * scale, cache)), with the new token's
//                       [RMSNorm(c_KV) | rope(k_R)] row written into the cache first (MLA, Sec. 2.1, absorbed)
//     ffn_decode:       x + sum_{top-K} g_i FFN_i(u) + shared(u), u = RMSNorm(x) (DeepSeekMoE, device-limited
//                       routing; a dense layer is the shared part alone)
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <optional>
#include <tuple>
#include <vector>

#include "kernels.h"

namespace {

using std::optional;

// Rotate interleaved pairs (x[2i], x[2i+1]) of n rows of R values by cos/sin [., R/2] (row r uses the cos/sin row
// r / per_cos: a token's heads share its position), in fp32, rounded to T: as dsv2.model.rope.apply_rope.
template <typename T>
void rope_rows(const T* x, int64_t xs, float* out, int64_t os, float out_scale, T* out_t, int64_t ots, int64_t n,
               int64_t R, const float* cos, const float* sin, int64_t cs, int64_t per_cos) {
  for (int64_t r = 0; r < n; ++r) {
    const float *c = cos + (r / per_cos) * cs, *s = sin + (r / per_cos) * cs;
    for (int64_t i = 0; i < R / 2; ++i) {
      const float xe = static_cast<float>(x[r * xs + 2 * i]), xo = static_cast<float>(x[r * xs + 2 * i + 1]);
      const T ye = static_cast<T>(xe * c[i] - xo * s[i]), yo = static_cast<T>(xe * s[i] + xo * c[i]);
      if (out != nullptr) {
        out[r * os + 2 * i] = static_cast<float>(ye) * out_scale;
        out[r * os + 2 * i + 1] = static_cast<float>(yo) * out_scale;
      }
      if (out_t != nullptr) {
        out_t[r * ots + 2 * i] = ye;
        out_t[r * ots + 2 * i + 1] = yo;
      }
    }
  }
}

template <typename F>
void by_dtype(const torch::Tensor& t, const F& f) {
  if (t.scalar_type() == at::kFloat)
    f(float{});
  else
    f(c10::BFloat16{});
}

void check_rows(const torch::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu() && x.is_contiguous() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              name, ": x must be a contiguous fp32 or bf16 [B, D] CPU tensor");
}

// The chosen experts and combine weights of one token from its affinities s [E] (Router.forward):
// group_limited_greedy keeps the topk_group device groups with the highest MAX affinity and picks the top-K experts
// inside them; the weights are the chosen affinities renormalised (norm_topk_prob) or times the scaling factor.
void route_token(const float* s, int64_t E, int64_t K, int64_t n_group, int64_t topk_group, bool norm_topk_prob,
                 double scaling, int64_t* experts, float* weights, std::vector<float>& limited,
                 std::vector<int64_t>& order) {
  limited.assign(s, s + E);
  if (n_group > 1 && topk_group < n_group) {
    const int64_t per = E / n_group;
    std::vector<float> group_max(n_group);
    for (int64_t g = 0; g < n_group; ++g) group_max[g] = *std::max_element(s + g * per, s + (g + 1) * per);
    std::vector<int64_t> groups(n_group);
    std::iota(groups.begin(), groups.end(), 0);
    std::stable_sort(groups.begin(), groups.end(), [&](int64_t a, int64_t b) { return group_max[a] > group_max[b]; });
    for (int64_t i = topk_group; i < n_group; ++i)  // affinities are > 0: a zeroed expert never outranks a kept one
      std::fill(limited.begin() + groups[i] * per, limited.begin() + (groups[i] + 1) * per, 0.f);
  }
  order.resize(E);
  std::iota(order.begin(), order.end(), 0);
  std::partial_sort(order.begin(), order.begin() + K, order.end(), [&](int64_t a, int64_t b) {
    return limited[a] > limited[b] || (limited[a] == limited[b] && a < b);
  });
  float sum = 0.f;
  for (int64_t k = 0; k < K; ++k) {
    experts[k] = order[k];
    weights[k] = s[order[k]];  // the exact affinity, not the masked copy
    sum += weights[k];
  }
  for (int64_t k = 0; k < K; ++k)
    weights[k] = K > 1 && norm_topk_prob ? weights[k] / (sum + 1e-20f) : static_cast<float>(weights[k] * scaling);
}

}  // namespace

// x [B, D] (one new token per sequence); norm [D] (input_layernorm); q_a [Q, D] and q_a_norm [Q] (q_lora_rank) or
// undefined; q [H (N + R), D or Q]; kv_a [C + R, D]; kv_a_norm [C]; kv_b [H (N + V), C]; o [D, H V] (the
// projections may be blocked int8/int4 rows, uint8 [rows, bytes]: dsv2.quant); cos, sin
// [B, R/2] fp32 (the new tokens' positions). The cache: rows [*, C + R] (the layer's slots, flat) gets the new
// rows at slots [B]; then either kv [B, T, C + R] with mask [B, T] (or empty) for a contiguous cache, or kv the
// blocks [N, S, C + R] read through table [B, M] and lens [B]. Returns x + attention, like x.
torch::Tensor attention_decode(torch::Tensor x, torch::Tensor norm, optional<torch::Tensor> q_a,
                               optional<torch::Tensor> q_a_norm, torch::Tensor q_w, torch::Tensor kv_a,
                               torch::Tensor kv_a_norm, torch::Tensor kv_b, torch::Tensor o_w, torch::Tensor cos,
                               torch::Tensor sin, torch::Tensor rows, torch::Tensor slots, torch::Tensor kv,
                               torch::Tensor mask, optional<torch::Tensor> table, optional<torch::Tensor> lens,
                               int64_t H, int64_t N, int64_t R, int64_t V, double eps, double q_eps, double kv_eps,
                               double scale) {
  check_rows(x, "attention_decode");
  const int64_t B = x.size(0), C = kv_a.size(0) - R, X = C + R;
  const bool kv_b_quantized = kv_b.scalar_type() == at::kByte;  // blocked int8/int4 rows of C values (quantized.h)
  TORCH_CHECK(R % 2 == 0 && C > 0 && kv_b.size(0) == H * (N + V) && (kv_b_quantized || kv_b.size(1) == C) &&
                  q_w.size(0) == H * (N + R),
              "attention_decode: weight shapes do not match the head dims");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && cos.is_contiguous() && sin.is_contiguous() && cos.size(0) == B &&
                  cos.size(1) == R / 2 && sin.sizes() == cos.sizes(),
              "attention_decode: cos and sin must be contiguous fp32 [B, R/2]");
  TORCH_CHECK(rows.dim() == 2 && rows.size(1) == X && rows.is_contiguous() && slots.dim() == 1 &&
                  slots.size(0) == B && slots.scalar_type() == at::kLong,
              "attention_decode: rows [*, C + R] contiguous and slots [B] int64 expected");
  const auto h = rms_norm(x, norm, eps);
  // the products of h in one parallel loop: q (or its compression c_Q) and the KV latent [c_KV | k_R]
  const auto first = rows_dots({{h, q_a.has_value() ? *q_a : q_w, std::nullopt}, {h, kv_a, std::nullopt}});
  const auto q = q_a.has_value() ? rows_dot(rms_norm(first[0], *q_a_norm, q_eps), q_w, std::nullopt)
                                 : first[0];  // [B, H (N + R)]
  const auto& latent = first[1];             // [B, C + R]
  // the new cache rows [RMSNorm(c_KV) | rope(k_R)] in the model's dtype, then the cache's
  auto new_rows = torch::empty({B, X}, x.options());
  new_rows.narrow(1, 0, C).copy_(rms_norm(latent.narrow(1, 0, C), kv_a_norm, kv_eps));
  // the queries [W_UK^T q_nope | rope(q_pe)] * scale, fp32 [B, H, C + R]
  const auto w_b = kv_b.view({H, N + V, -1});
  const auto q_lat = rows_combine(q.view({B, H, N + R}).narrow(2, 0, N).permute({1, 2, 0}).to(at::kFloat),
                                  w_b.narrow(1, 0, N), kv_b_quantized ? C : 0);  // [H, B, C] fp32
  auto q_x = torch::empty({B, H, X}, x.options().dtype(at::kFloat));
  q_x.narrow(2, 0, C).copy_(q_lat.permute({1, 0, 2}));
  q_x.narrow(2, 0, C).mul_(scale);
  by_dtype(x, [&](auto zero) {
    using T = decltype(zero);
    const float *c = cos.data_ptr<float>(), *s = sin.data_ptr<float>();
    rope_rows<T>(latent.data_ptr<T>() + C, X, nullptr, 0, 1.f, new_rows.data_ptr<T>() + C, X, B, R, c, s, R / 2,
                 1);
    rope_rows<T>(q.data_ptr<T>() + N, N + R, q_x.data_ptr<float>() + C, X, static_cast<float>(scale), nullptr, 0,
                 B * H, R, c, s, R / 2, H);
  });
  rows.index_copy_(0, slots, new_rows.to(rows.scalar_type()));
  const auto o_lat = table.has_value() ? mla_decode_paged(q_x, kv, *table, *lens, C) : mla_decode(q_x, kv, mask, C);
  // W_UV per head over the heads' latent outputs [H B, C], then o_proj
  const auto ends = at::arange(1, H + 1, slots.options()) * B;
  const auto o_hv = rows_dot(o_lat.permute({1, 0, 2}).reshape({H * B, C}), w_b.narrow(1, N, V), ends);
  const auto o = o_hv.view({H, B, V}).permute({1, 0, 2}).to(x.scalar_type()).reshape({B, H * V});
  return x + rows_dot(o, o_w, std::nullopt);
}

// x [T, D] (a few tokens); norm [D] (post_attention_layernorm). Routed experts (all given or none): gate [E, D]
// (the router), gate_up [E, 2F, D], down [E, D, F] (or either as blocked int8/int4 rows: uint8 [E, rows, bytes]), routing by top_k, n_group, topk_group, norm_topk_prob and
// scaling (model/router.py). Shared experts or a dense MLP: shared_gate, shared_up [F', D], shared_down [D, F']
// (SiLU). Returns x + FFN, like x.
torch::Tensor ffn_decode(torch::Tensor x, torch::Tensor norm, double eps, optional<torch::Tensor> gate,
                         optional<torch::Tensor> gate_up, optional<torch::Tensor> down, int64_t top_k,
                         int64_t n_group, int64_t topk_group, bool norm_topk_prob, double scaling,
                         optional<torch::Tensor> shared_gate, optional<torch::Tensor> shared_up,
                         optional<torch::Tensor> shared_down) {
  check_rows(x, "ffn_decode");
  TORCH_CHECK(gate.has_value() || shared_gate.has_value(), "ffn_decode: neither routed nor shared experts given");
  const int64_t T = x.size(0);
  const auto h = rms_norm(x, norm, eps);
  // the products of u in one parallel loop (the routed experts' and the shared experts' gate and up), then those
  // of their activations in another (the down projections)
  std::vector<std::tuple<torch::Tensor, torch::Tensor, optional<torch::Tensor>>> ups, downs;
  torch::Tensor token, w_n;
  if (gate.has_value()) {
    const int64_t E = gate->size(0), K = top_k;
    TORCH_CHECK(K >= 1 && K <= E && n_group >= 1 && E % n_group == 0 && topk_group >= 1 && topk_group <= n_group,
                "ffn_decode: bad routing settings");
    const auto scores = at::softmax(rows_dot(h.to(at::kFloat), *gate, std::nullopt), -1).contiguous();  // [T, E]
    std::vector<int64_t> experts(T * K), order;
    std::vector<float> weights(T * K), limited;
    for (int64_t t = 0; t < T; ++t)
      route_token(scores.data_ptr<float>() + t * E, E, K, n_group, topk_group, norm_topk_prob, scaling,
                  experts.data() + t * K, weights.data() + t * K, limited, order);
    // the token copies sorted by expert (stable), as LocalDispatcher.sort
    std::vector<int64_t> slot(T * K);
    std::iota(slot.begin(), slot.end(), 0);
    std::stable_sort(slot.begin(), slot.end(), [&](int64_t a, int64_t b) { return experts[a] < experts[b]; });
    token = torch::empty({T * K}, at::kLong);
    w_n = torch::empty({T * K, 1}, x.options().dtype(at::kFloat));
    auto ends = torch::zeros({E}, at::kLong);
    int64_t *tp = token.data_ptr<int64_t>(), *ep = ends.data_ptr<int64_t>();
    for (int64_t n = 0; n < T * K; ++n) {
      tp[n] = slot[n] / K;
      w_n.data_ptr<float>()[n] = weights[slot[n]];
      ++ep[experts[slot[n]]];
    }
    for (int64_t e = 1; e < E; ++e) ep[e] += ep[e - 1];
    ups.emplace_back(h.index_select(0, token), *gate_up, ends);  // [T K, 2F]
    downs.emplace_back(torch::Tensor(), *down, ends);
  }
  if (shared_gate.has_value()) {
    ups.emplace_back(h, *shared_gate, std::nullopt);
    ups.emplace_back(h, *shared_up, std::nullopt);
    downs.emplace_back(torch::Tensor(), *shared_down, std::nullopt);
  }
  const auto up = rows_dots(ups);
  if (gate.has_value()) {
    const int64_t F = gate_up->size(1) / 2;
    std::get<0>(downs[0]) = at::silu(up[0].narrow(1, 0, F)) * up[0].narrow(1, F, F);
  }
  if (shared_gate.has_value()) std::get<0>(downs.back()) = at::silu(up[up.size() - 2]) * up.back();
  const auto out = rows_dots(downs);
  torch::Tensor y;
  if (gate.has_value())
    y = torch::zeros({T, x.size(1)}, x.options()).index_add_(0, token, (out[0] * w_n).to(x.scalar_type()));
  if (shared_gate.has_value()) y = y.defined() ? y + out.back() : out.back();
  return x + y;
}
