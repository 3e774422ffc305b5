// Products of a few rows x (decode: one token per sequence) with weight matrices, streaming each weight once with
// all threads. oneDNN's and MKL's few-row kernels reach a fraction of the memory bandwidth (MKL's from one thread;
// on CPUs without native bf16 both emulate bf16); these are the tiles of tiles.h:
//     rows_dot:     y[n, :] = w[g] x[n, :]  for the rows n of group g    x W^T: linears, routed experts, MLA's W_UV
//     rows_combine: y[g, m, :] = sum_n x[g, n, m] w[g, n, :]            x W:   MLA's W_UK absorbed into the query
// rows_dot's groups are the routed experts of expert-sorted token copies (one GEMV per chosen expert, all in one
// parallel loop, no gathered weight copy) or MLA's heads; a plain linear is one group. w is fp32 or bf16 (widened
// in registers, or multiplied as bf16 where the CPU does that natively and x is bf16 too) with contiguous rows; x is
// fp32 or bf16 (any layout), y has x's dtype (accumulated in fp32, rounded once).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "kernels.h"
#include "quantized.h"
#include "tiles.h"

namespace {

using namespace dsv2_kernels;

constexpr int64_t ROW_BLOCK = 48;  // weight rows per rows_dot task (16 tiles of 3 rows)
constexpr int64_t COL_BLOCK = 96;  // weight columns per rows_combine task (4 tiles of 24 columns)

bool fp32_or_bf16(const torch::Tensor& t) { return t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16; }

// x widened to a contiguous fp32 copy (the tiles read it many times; it is small)
torch::Tensor checked_x(const torch::Tensor& x, const torch::Tensor& w, int64_t x_dim, const char* name) {
  TORCH_CHECK(x.dim() == x_dim && w.dim() == 3, name, ": bad ranks (x ", x.dim(), "-D, w ", w.dim(), "-D)");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), name, ": CPU tensors expected");
  TORCH_CHECK(fp32_or_bf16(x), name, ": x must be fp32 or bf16");
  TORCH_CHECK(w.stride(2) == 1, name, ": w rows must be contiguous");
  TORCH_CHECK(fp32_or_bf16(w) || w.scalar_type() == at::kByte, name,
              ": w must be fp32, bf16 or uint8 (dsv2.quant's blocked int8/int4 rows)");
  return x.to(at::kFloat).contiguous();
}

// the format of a quantized (uint8) weight whose rows hold K values
QFormat checked_format(const torch::Tensor& w, int64_t K, const char* name) {
  const QFormat f = block_format(K, w.size(-1));
  TORCH_CHECK(f.bits != 0, name, ": a uint8 w must be blocked int8/int4 rows of ", K, " values (", w.size(-1),
              " bytes is not)");
  return f;
}

// rows_dot multiplies bf16 natively here (dp_rows below): bf16 weights and bf16 x
bool native_bf16_product(const torch::Tensor& x, const torch::Tensor& w) {
#if defined(__AVX512BF16__)
  return x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16;
#else
  return false;
#endif
}

#if defined(__AVX512BF16__)
// Where the CPU multiplies bf16 natively (AVX512-BF16), bf16 x bf16 products skip the widening: vdpbf16ps multiplies
// 32 bf16 pairs and adds them into 16 fp32 lanes, so a weight row is streamed as it is (the widening tiles above
// read bf16 weights ~25% below the memory's rate on such CPUs). One weight row at a time against MQ rows of x,
// so that each core reads one sequential stream, fetched 1 KB ahead (the hardware prefetchers alone lose ~15% on
// rows of 1-2 KB); U accumulators per x row keep 6-8 FMA chains in flight; the tail of K is loaded masked.
using BF16 = c10::BFloat16;
constexpr int64_t DP_AHEAD = 1024;  // bytes

template <int MQ>
[[gnu::always_inline]] inline void dp_row(const BF16* x, int64_t K, const BF16* w, float* y, int64_t ys) {
  constexpr int U = MQ >= 3 ? 2 : 8 / MQ;
  __m512 acc[MQ][U];
  for (int j = 0; j < MQ; ++j)
    for (int u = 0; u < U; ++u) acc[j][u] = _mm512_setzero_ps();
  const char* ahead = reinterpret_cast<const char*>(w) + DP_AHEAD;
  int64_t k = 0;
  for (; k + 32 * U <= K; k += 32 * U) {
    for (int u = 0; u < U; ++u) _mm_prefetch(ahead + 2 * k + 64 * u, _MM_HINT_T0);
    for (int u = 0; u < U; ++u) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + k + 32 * u);
      for (int j = 0; j < MQ; ++j)
        acc[j][u] = _mm512_dpbf16_ps(acc[j][u], wv, (__m512bh)_mm512_loadu_si512(x + j * K + k + 32 * u));
    }
  }
  for (; k < K; k += 32) {
    const __mmask32 m = K - k >= 32 ? ~__mmask32{0} : (__mmask32{1} << (K - k)) - 1;
    const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(m, w + k);
    for (int j = 0; j < MQ; ++j)
      acc[j][0] = _mm512_dpbf16_ps(acc[j][0], wv, (__m512bh)_mm512_maskz_loadu_epi16(m, x + j * K + k));
  }
  for (int j = 0; j < MQ; ++j) {
    for (int u = 1; u < U; ++u) acc[j][0] = _mm512_add_ps(acc[j][0], acc[j][u]);
    y[j * ys] = _mm512_reduce_add_ps(acc[j][0]);
  }
}

// y[m * ys + r] = w_r . x_m for M rows of x (contiguous, K wide) and n weight rows (stride ws)
void dp_rows(const BF16* x, int64_t M, const BF16* w, int64_t ws, int64_t n, int64_t K, float* y, int64_t ys) {
  for (int64_t r = 0; r < n; ++r) {
    const BF16* row = w + r * ws;
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) dp_row<4>(x + m * K, K, row, y + m * ys + r, ys);
    switch (M - m) {
      case 3: dp_row<3>(x + m * K, K, row, y + m * ys + r, ys); break;
      case 2: dp_row<2>(x + m * K, K, row, y + m * ys + r, ys); break;
      case 1: dp_row<1>(x + m * K, K, row, y + m * ys + r, ys); break;
    }
  }
}
#endif

// y[:C] += sum_n x[n] w_n[:C] for one query (M = 1): whole weight rows, four at a time, in memory order, so that a
// task streams its head's block sequentially (the column tiles below read it in strips of COL_BLOCK columns, which
// the prefetchers follow poorly: ~8 GB/s for W_UK of a decode step)
template <typename E>
void combine_single(const float* x, int64_t N, const E* w, int64_t ws, int64_t C, float* y) {
  const int64_t C8 = C - C % 8;
  int64_t n = 0;
  for (; n + 4 <= N; n += 4) {
    const E *w0 = w + n * ws, *w1 = w0 + ws, *w2 = w1 + ws, *w3 = w2 + ws;
    const float a0 = x[n], a1 = x[n + 1], a2 = x[n + 2], a3 = x[n + 3];
    for (int64_t c = 0; c < C8; c += 8)
      store8(y + c, load8(y + c) + a0 * load8(w0 + c) + a1 * load8(w1 + c) + a2 * load8(w2 + c) + a3 * load8(w3 + c));
    for (int64_t c = C8; c < C; ++c)
      y[c] += a0 * static_cast<float>(w0[c]) + a1 * static_cast<float>(w1[c]) + a2 * static_cast<float>(w2[c]) +
              a3 * static_cast<float>(w3[c]);
  }
  for (; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) y[c] += x[n] * static_cast<float>(w[n * ws + c]);
}

template <typename F>
void with_rows(const torch::Tensor& w, const F& f) {
  if (w.scalar_type() == at::kFloat)
    f(w.data_ptr<float>());
  else
    f(w.data_ptr<c10::BFloat16>());
}

}  // namespace

namespace {

// One rows_dot, checked and prepared: its inputs as the tiles read them, its tasks (non-empty group, block of weight
// rows: only the groups with rows read their weights) and its fp32 output.
struct Product {
  torch::Tensor x, w, ends, y;
  bool native;
  QFormat qf;  // bits 0: fp32/bf16 w
  int64_t N, K, R;
  std::vector<int64_t> shape;
  at::ScalarType dtype;
  std::vector<std::pair<int64_t, int64_t>> tasks;
  const int64_t* e() const { return ends.defined() ? ends.data_ptr<int64_t>() : &N; }  // one group: ends = {N}
};

// the groups with rows (1 without ends); ends is checked by prepare
int64_t groups(const std::optional<torch::Tensor>& ends) {
  if (!ends.has_value() || ends->scalar_type() != at::kLong || ends->dim() != 1) return 1;
  const auto e = ends->contiguous();
  const int64_t* p = e.data_ptr<int64_t>();
  int64_t n = 0;
  for (int64_t g = 0, start = 0; g < e.size(0); start = p[g++]) n += p[g] > start;
  return std::max<int64_t>(n, 1);
}

Product prepare(const torch::Tensor& x_in, const torch::Tensor& w_in, const std::optional<torch::Tensor>& ends) {
  TORCH_CHECK(w_in.dim() == 3 || (w_in.dim() == 2 && !ends.has_value()),
              "rows_dot: w [R, K] (no ends) or w [G, R, K] with ends expected");
  TORCH_CHECK(w_in.dim() == 2 || x_in.dim() == 2, "rows_dot: grouped rows take x [N, K]");
  Product p;
  p.w = w_in.dim() == 3 ? w_in : w_in.unsqueeze(0);
  // int4 x bf16 natively where the groups average two rows or more (with one row the widening tiles are faster)
  const bool q4 = p.w.scalar_type() == at::kByte && block_format(x_in.size(-1), p.w.size(-1)).bits == 4;
  p.native = native_bf16_product(x_in, p.w) ||
             (Q4_BF16 && q4 && x_in.scalar_type() == at::kBFloat16 && x_in.numel() >= 2 * x_in.size(-1) * groups(ends));
  const auto x2 = x_in.reshape({-1, x_in.size(-1)});
  // bf16 products keep x as it is; the widening tiles read an fp32 copy (checked_x's checks apply to both)
  p.x = p.native ? (checked_x(x2.narrow(0, 0, 0), p.w, 2, "rows_dot"), x2.contiguous())
                 : checked_x(x2, p.w, 2, "rows_dot");
  if (p.w.scalar_type() == at::kByte) {
    p.qf = checked_format(p.w, p.x.size(1), "rows_dot");
    if (p.qf.bits == 4) p.x = deinterleave(p.x, Q_CHUNK);  // int4's nibble order (quantized.h)
  } else {
    TORCH_CHECK(p.x.size(1) == p.w.size(2), "rows_dot: x rows (", p.x.size(1), ") and w rows (", p.w.size(2),
                ") differ");
  }
  p.N = p.x.size(0), p.K = p.x.size(1), p.R = p.w.size(1);
  const int64_t G = p.w.size(0);
  if (ends.has_value()) {
    TORCH_CHECK(ends->dim() == 1 && ends->size(0) == G && ends->scalar_type() == at::kLong && ends->is_cpu(),
                "rows_dot: ends must be int64 [G] on the CPU");
    p.ends = ends->contiguous();
  }
  const int64_t* e = p.e();
  for (int64_t g = 0, start = 0; g < G; start = e[g++]) {
    TORCH_CHECK(e[g] >= start && e[g] <= p.N, "rows_dot: ends must be non-decreasing and at most N");
    if (e[g] > start)
      for (int64_t r0 = 0; r0 < p.R; r0 += ROW_BLOCK) p.tasks.emplace_back(g, r0);
  }
  TORCH_CHECK(G == 0 || e[G - 1] == p.N, "rows_dot: ends[-1] must equal the number of rows of x");
  p.y = torch::empty({p.N, p.R}, p.x.options().dtype(at::kFloat));
  p.shape = x_in.sizes().vec();
  p.shape.back() = p.R;
  p.dtype = x_in.scalar_type();
  return p;
}

// task (g, r0) of product p: y[m, r0 .. r0 + n) for the rows m of group g
void run_task(const Product& p, int64_t g, int64_t r0) {
  const int64_t* e = p.e();
  const int64_t m0 = g == 0 ? 0 : e[g - 1], M = e[g] - m0, n = std::min(ROW_BLOCK, p.R - r0);
  const int64_t w0 = g * p.w.stride(0) + r0 * p.w.stride(1), ws1 = p.w.stride(1);
  float* yb = p.y.data_ptr<float>() + m0 * p.R + r0;
#if defined(__AVX512BF16__)
  if (p.native && p.qf.bits == 4)
    return q4_rows_bf16(p.x.data_ptr<BF16>() + m0 * p.K, M, p.w.data_ptr<uint8_t>() + w0, ws1, n, p.K, p.qf.group, yb,
                        p.R);
  if (p.native) return dp_rows(p.x.data_ptr<BF16>() + m0 * p.K, M, p.w.data_ptr<BF16>() + w0, ws1, n, p.K, yb, p.R);
#endif
  const float* xp = p.x.data_ptr<float>() + m0 * p.K;
  if (p.qf.bits != 0) return q_rows(xp, M, p.w.data_ptr<uint8_t>() + w0, ws1, n, p.K, p.qf, yb, p.R);
  with_rows(p.w, [&](const auto* wp) { scores(xp, M, wp + w0, ws1, n, p.K, yb, 1, p.R, true); });
}

// Every task of every product in one parallel loop: a decode step's products of the same input (q and the KV
// latent; the experts' and the shared experts' gate and up) cost one barrier and one ramp-up of the threads'
// streams, not one each (a 6 MB product reaches ~15% less of the bandwidth than a 64 MB one).
void run(std::vector<Product>& ps) {
  std::vector<std::pair<const Product*, std::pair<int64_t, int64_t>>> tasks;
  for (const auto& p : ps)
    for (const auto& t : p.tasks) tasks.emplace_back(&p, t);
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) run_task(*tasks[i].first, tasks[i].second.first, tasks[i].second.second);
  });
}

torch::Tensor result(const Product& p) { return p.y.view(p.shape).to(p.dtype); }

}  // namespace

// x [..., K], w [R, K] (one matrix: a linear) -> y [..., R]; or x [N, K], w [G, R, K] and ends [G] int64,
// non-decreasing, ends[G-1] == N: group g holds rows ends[g-1] .. ends[g]-1 (ends[-1] = 0) -> y [N, R].
torch::Tensor rows_dot(torch::Tensor x_in, torch::Tensor w_in, std::optional<torch::Tensor> ends) {
  std::vector<Product> ps;
  ps.push_back(prepare(x_in, w_in, ends));
  run(ps);
  return result(ps[0]);
}

// Several rows_dot products (x, w, ends) in one parallel loop (for decode_step.cpp).
std::vector<torch::Tensor> rows_dots(
    const std::vector<std::tuple<torch::Tensor, torch::Tensor, std::optional<torch::Tensor>>>& products) {
  std::vector<Product> ps;
  for (const auto& [x, w, ends] : products) ps.push_back(prepare(x, w, ends));
  run(ps);
  std::vector<torch::Tensor> out;
  for (const auto& p : ps) out.push_back(result(p));
  return out;
}

// x [G, N, M] (each x row transposed: the n-th entries of the M rows side by side), w [G, N, C] -> y [G, M, C];
// a quantized w (uint8 blocked rows) holds C = cols values per row
torch::Tensor rows_combine(torch::Tensor x_in, torch::Tensor w, int64_t cols) {
  const auto x = checked_x(x_in, w, 3, "rows_combine");
  TORCH_CHECK(x.size(0) == w.size(0) && x.size(1) == w.size(1),
              "rows_combine: x [G, N, M] and w [G, N, C] differ in G or N");
  const bool quantized = w.scalar_type() == at::kByte;
  TORCH_CHECK(quantized == (cols > 0), "rows_combine: cols is the width of a quantized w, and only that");
  const int64_t G = x.size(0), N = x.size(1), M = x.size(2), C = quantized ? cols : w.size(2);
  auto y = torch::zeros({G, M, C}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (quantized) {  // one task per group (MLA's heads): each reads its rows once, all M rows of y in cache
    const QFormat f = checked_format(w, C, "rows_combine");
    const uint8_t* wp = w.data_ptr<uint8_t>();
    const int64_t ws0 = w.stride(0), ws1 = w.stride(1);
    at::parallel_for(0, G, 1, [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g) q_combine(xp + g * N * M, N, M, wp + g * ws0, ws1, C, f, yp + g * M * C);
    });
    return (f.bits == 4 ? deinterleave(y, 16, true) : y).to(x_in.scalar_type());
  }
  const int64_t blocks = (C + COL_BLOCK - 1) / COL_BLOCK, ws0 = w.stride(0), ws1 = w.stride(1);
  if (M == 1 && G >= 2 * at::get_num_threads()) {  // batch-1 decode, one task per head: enough to balance
    with_rows(w, [&](const auto* wp) {
      at::parallel_for(0, G, 1, [&](int64_t begin, int64_t end) {
        for (int64_t g = begin; g < end; ++g) combine_single(xp + g * N, N, wp + g * ws0, ws1, C, yp + g * C);
      });
    });
    return y.to(x_in.scalar_type());
  }
  with_rows(w, [&](const auto* wp) {
    at::parallel_for(0, G * blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t g = task / blocks, c0 = (task % blocks) * COL_BLOCK, c = std::min(COL_BLOCK, C - c0);
        accumulate(xp + g * N * M, M, wp + g * ws0 + c0, ws1, N, c, yp + g * M * C + c0, C);
      }
    });
  });
  return y.to(x_in.scalar_type());
}

// w uint8 [..., R, bytes]: blocked int8/int4 rows of K values -> the dense weight [..., R, K] in dtype (fp32 or bf16),
// each value q * its block's scale (rounded once to dtype): the many-row (prefill) path's GEMM input
torch::Tensor dequantize(torch::Tensor w, int64_t K, at::ScalarType dtype) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kByte && w.dim() >= 1, "dequantize: w must be uint8 rows");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "dequantize: dtype must be fp32 or bf16");
  const QFormat f = checked_format(w, K, "dequantize");
  const auto wc = w.contiguous();
  auto sizes = wc.sizes().vec();
  sizes.back() = K;
  auto out = torch::empty(sizes, wc.options().dtype(dtype));
  const int64_t rows = wc.numel() / std::max<int64_t>(wc.size(-1), 1), rb = wc.size(-1), bb = f.block_bytes();
  const uint8_t* src = wc.data_ptr<uint8_t>();
  auto run = [&](auto* dst) {
    at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const uint8_t* row = src + r * rb;
        auto* o = dst + r * K;
        for (int64_t k0 = 0; k0 < K; k0 += f.group, row += bb) {
          const float s = bf16_at(row);
          const uint8_t* q = row + 2;
          if (f.bits == 8) {
            for (int64_t k = 0; k < f.group; ++k) o[k0 + k] = static_cast<float>(static_cast<int8_t>(q[k])) * s;
          } else {
            for (int64_t j = 0; j < f.group / 2; ++j) {
              o[k0 + 2 * j] = static_cast<float>((q[j] & 15) - 8) * s;
              o[k0 + 2 * j + 1] = static_cast<float>((q[j] >> 4) - 8) * s;
            }
          }
        }
      }
    });
  };
  if (dtype == at::kFloat)
    run(out.data_ptr<float>());
  else
    run(out.data_ptr<c10::BFloat16>());
  return out;
}

// w [..., K] (fp32, bf16 or fp16) -> its blocked int8/int4 rows, as dsv2.quant.formats.quantize + to_blocks compute
// them (the same fp32 arithmetic; int4 picks, per group, the scale of least squared error among the clips given):
// a checkpoint of billions of weights quantizes as it loads at the memory's pace, not at that of a dozen tensor ops
torch::Tensor quantize_rows(torch::Tensor w, int64_t bits, int64_t group, std::vector<double> clips) {
  TORCH_CHECK(w.device().is_cpu() && w.is_floating_point() && w.dim() >= 1, "quantize_rows: w must be a float CPU tensor");
  TORCH_CHECK(bits == 8 || bits == 4, "quantize_rows: bits must be 8 or 4");
  const int64_t K = w.size(-1), g = group > 0 ? group : K;
  TORCH_CHECK(K % g == 0 && g % 32 == 0, "quantize_rows: groups of a multiple of 32 must divide K");
  TORCH_CHECK(bits == 8 || !clips.empty(), "quantize_rows: int4 needs clips");
  const auto wf = w.to(at::kFloat).contiguous();
  const int64_t rows = wf.numel() / std::max<int64_t>(K, 1), bb = 2 + g * bits / 8, rb = K / g * bb;
  auto sizes = wf.sizes().vec();
  sizes.back() = rb;
  auto out = torch::empty(sizes, wf.options().dtype(at::kByte));
  const float* src = wf.data_ptr<float>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  std::vector<float> fclips(clips.begin(), clips.end());
  for (auto& c : fclips) c = static_cast<float>(static_cast<double>(c) / 7.5);  // as torch: a Python float scalar
  auto bf16 = [](float v) { return static_cast<float>(c10::BFloat16(v)); };
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<int8_t> q(g), best(g);
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t b = 0; b < K / g; ++b) {
        const float* x = src + r * K + b * g;
        uint8_t* o = dst + r * rb + b * bb;
        float amax = 0.f;
        for (int64_t k = 0; k < g; ++k) amax = std::max(amax, std::fabs(x[k]));
        float scale;
        if (bits == 8) {
          scale = bf16(amax / 127.f);
          if (!(scale > 0.f)) scale = 1.f;
          for (int64_t k = 0; k < g; ++k) best[k] = static_cast<int8_t>(std::clamp(std::nearbyint(x[k] / scale), -128.f, 127.f));
        } else {
          float best_err = 0.f;
          for (size_t c = 0; c < fclips.size(); ++c) {
            float s = bf16(amax * fclips[c]);
            if (!(s > 0.f)) s = 1.f;
            float err = 0.f;
            for (int64_t k = 0; k < g; ++k) {
              q[k] = static_cast<int8_t>(std::clamp(std::nearbyint(x[k] / s), -8.f, 7.f));
              const float d = q[k] * s - x[k];
              err += d * d;
            }
            if (c == 0 || err < best_err) best_err = err, scale = s, best = q;
          }
        }
        const c10::BFloat16 sb(scale);
        std::memcpy(o, &sb, 2);
        if (bits == 8)
          std::memcpy(o + 2, best.data(), g);
        else
          for (int64_t j = 0; j < g / 2; ++j)
            o[2 + j] = static_cast<uint8_t>((best[2 * j] + 8) | ((best[2 * j + 1] + 8) << 4));
      }
    }
  });
  return out;
}
