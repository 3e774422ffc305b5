// MLA's absorbed decode attention over the latent cache, reading the cache once (flash-decoding on CPU).
//
// For batch row b and query row k (one head of one new token; the softmax scale is folded into q):
//     s_t = q_k . kv_t                      kv_t = [c_KV | k_R], X = C + R wide
//     o_k = sum_t softmax_t(s) kv_t[:C]     the latent output; W_UV is applied by the caller
// The cache is cut into chunks of CHUNK tokens and each (b, chunk) is one task of at::parallel_for: a thread
// streams its chunk from memory once while scoring it, then accumulates p @ kv[:, :C] while the chunk is still in
// its L2, with the chunk's own maximum (safe softmax). A second loop merges the chunks by their maxima. bf16 and fp16
// rows are widened into an fp32 copy of the chunk first (each row is read by every query group of both products:
// widening it in registers each time made a bf16 cache slower to attend than an fp32 one of twice the bytes); all
// arithmetic is fp32.
//
// Scoring and accumulating are the register-tiled micro-kernels of tiles.h; the softmax's exponentials are
// vectorised too. mla_decode_paged runs the same chunks over a paged cache, a block per chunk, through the block
// table (the engine's cache, dsv2/inference/engine).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "tiles.h"

namespace {

using namespace dsv2_kernels;

constexpr int64_t CHUNK = 128;
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

// e^x, 8 lanes (Cephes' expf: x = n ln2 + r, |r| <= ln2/2, degree-6 polynomial; ~1 ulp); 0 below -87 (-inf too)
inline v8 exp8(v8 x) {
  const v8 zero = {};
  const v8i under = x < -87.f;
  x = under ? zero : x;
  x = x < 88.f ? x : zero + 88.f;
  const float magic = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits
  const v8 t = x * 1.44269504f + magic;
  const v8 n = t - magic;
  const v8 r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  v8 p = 1.9875691500e-4f + zero;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3333337680e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.f;
  const v8i scale = (((v8i)t - (v8i)(zero + magic)) + 127) << 23;  // 2^n, built in the exponent bits
  const v8 y = p * (v8)scale;
  return under ? zero : y;
}

// One chunk of n cache rows r (row stride rs) against the K queries of one sequence: the chunk's scores s (n x K),
// its maxima m and exp-sums l (K each) and its unnormalised latent output acc (K x C). mask: n entries or null.
template <typename E>
void attend_rows(const float* q, const E* r, int64_t rs, const bool* mask, int64_t n, int64_t K, int64_t X,
                 int64_t C, bool stream, float* s, float* shift, float* acc, float* m, float* l) {
  scores(q, K, r, rs, n, X, s, K, 1, stream);
  std::fill(m, m + K, NEG_INF);
  std::fill(l, l + K, 0.f);
  for (int64_t t = 0; t < n; ++t) {
    if (mask != nullptr && !mask[t]) {
      std::fill(s + t * K, s + (t + 1) * K, NEG_INF);
      continue;
    }
    for (int64_t k = 0; k < K; ++k) m[k] = std::max(m[k], s[t * K + k]);
  }
  // a query whose whole chunk is masked keeps m = -inf and l = 0 (exp(-inf - 0) = 0 for its keys)
  for (int64_t k = 0; k < K; ++k) shift[k] = m[k] == NEG_INF ? 0.f : m[k];
  const int64_t K8 = K - K % 8;
  for (int64_t k = 0; k < K8; k += 8) {
    const v8 sh = load8(shift + k);
    v8 sum = load8(l + k);
    for (int64_t t = 0; t < n; ++t) {
      const v8 e = exp8(load8(s + t * K + k) - sh);
      store8(s + t * K + k, e);
      sum += e;
    }
    store8(l + k, sum);
  }
  for (int64_t t = 0; t < n; ++t)
    for (int64_t k = K8; k < K; ++k) {
      s[t * K + k] = std::exp(s[t * K + k] - shift[k]);
      l[k] += s[t * K + k];
    }
  std::fill(acc, acc + K * C, 0.f);
  accumulate(s, K, r, rs, n, C, acc, C);
}

// Rows of a chunk as the tiles read them: fp32 in place, others (bf16, fp16) widened into `wide`.
template <typename scalar_t>
std::pair<const float*, int64_t> chunk_rows(const scalar_t* rows, int64_t rs, int64_t n, int64_t X,
                                            std::vector<float>& wide) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return {rows, rs};
  } else {
    const int64_t X8 = std::is_same_v<scalar_t, c10::BFloat16> ? X - X % 8 : 0;
    for (int64_t t = 0; t < n; ++t) {
      const scalar_t* r = rows + t * rs;
      float* w = wide.data() + t * X;
      if constexpr (std::is_same_v<scalar_t, c10::BFloat16>)
        for (int64_t x = 0; x < X8; x += 8) store8(w + x, load8(r + x));
      for (int64_t x = X8; x < X; ++x) w[x] = static_cast<float>(r[x]);
    }
    return {wide.data(), X};
  }
}

// The chunks of every sequence: chunk j of sequence b is `rows_of(b, j)` = (first row, rows, mask or null).
template <typename scalar_t, typename Rows>
void attend_chunks(const float* q, const std::vector<std::pair<int64_t, int64_t>>& tasks, const Rows& rows_of,
                   int64_t max_rows, int64_t row_stride, int64_t K, int64_t X, int64_t C, float* part_acc,
                   float* part_m, float* part_l) {
  constexpr bool in_place = std::is_same_v<scalar_t, float>;
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> wide(in_place ? 0 : max_rows * X), s(max_rows * K), shift(K);
    for (int64_t task = begin; task < end; ++task) {
      const auto [b, j] = tasks[task];
      const auto [first, n, mask] = rows_of(b, j);
      const auto [r, rs] = chunk_rows(first, row_stride, n, X, wide);
      attend_rows(q + b * K * X, r, rs, mask, n, K, X, C, in_place, s.data(), shift.data(),
                  part_acc + task * K * C, part_m + task * K, part_l + task * K);
    }
  });
}

// o[b, k] = sum_j e^{m_j - M} acc_j / sum_j e^{m_j - M} l_j over the chunks j of sequence b (tasks first[b] ..
// first[b + 1] - 1): the softmax over all of b's rows.
void merge_chunks(const float* pa, const float* pm, const float* pl, const std::vector<int64_t>& first, int64_t B,
                  int64_t K, int64_t C, float* o) {
  at::parallel_for(0, B * K, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bk = begin; bk < end; ++bk) {
      const int64_t b = bk / K, k = bk % K;
      float M = NEG_INF;
      for (int64_t j = first[b]; j < first[b + 1]; ++j) M = std::max(M, pm[j * K + k]);
      float* ok = o + bk * C;
      std::fill(ok, ok + C, 0.f);
      float denom = 0.f;
      for (int64_t j = first[b]; j < first[b + 1]; ++j) {
        const float mj = pm[j * K + k];
        if (mj == NEG_INF) continue;
        const float w = std::exp(mj - M);
        denom += w * pl[j * K + k];
        const float* a = pa + (j * K + k) * C;
        for (int64_t c = 0; c < C; ++c) ok[c] += w * a[c];
      }
      const float inv = denom > 0.f ? 1.f / denom : 0.f;  // every key masked: zeros (the caller never uses them)
      for (int64_t c = 0; c < C; ++c) ok[c] *= inv;
    }
  });
}

template <typename F>
void by_cache_dtype(const torch::Tensor& kv, const char* name, const F& f) {
  switch (kv.scalar_type()) {
    case at::kFloat: f(kv.data_ptr<float>()); break;
    case at::kBFloat16: f(kv.data_ptr<c10::BFloat16>()); break;
    case at::kHalf: f(kv.data_ptr<c10::Half>()); break;
    default: TORCH_CHECK(false, name, ": cache dtype must be float32, bfloat16 or float16");
  }
}

}  // namespace

// q [B, K, X] fp32 contiguous; kv [B, T, X] fp32/bf16/fp16 (rows contiguous, any row and batch stride);
// mask [B, >= T] bool (True = attend) or an empty tensor. Returns o [B, K, C] fp32.
torch::Tensor mla_decode(torch::Tensor q, torch::Tensor kv, torch::Tensor mask, int64_t C) {
  TORCH_CHECK(q.dim() == 3 && kv.dim() == 3 && q.size(0) == kv.size(0) && q.size(2) == kv.size(2),
              "mla_decode: q [B, K, X] and kv [B, T, X] expected");
  TORCH_CHECK(q.device().is_cpu() && kv.device().is_cpu(), "mla_decode: CPU tensors expected");
  TORCH_CHECK(q.scalar_type() == at::kFloat && q.is_contiguous(), "mla_decode: q must be contiguous fp32");
  TORCH_CHECK(kv.stride(2) == 1, "mla_decode: kv rows must be contiguous");
  const int64_t B = q.size(0), K = q.size(1), X = q.size(2), T = kv.size(1);
  TORCH_CHECK(C > 0 && C <= X && T > 0, "mla_decode: bad latent width or empty cache");
  const bool* mask_p = nullptr;
  int64_t mask_sb = 0;
  if (mask.numel() > 0) {
    TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 2 && mask.size(0) == B && mask.size(1) >= T &&
                    mask.stride(1) == 1,
                "mla_decode: mask [B, T] bool expected");
    mask_p = mask.data_ptr<bool>();
    mask_sb = mask.stride(0);
  }
  const int64_t n_chunks = (T + CHUNK - 1) / CHUNK;
  std::vector<std::pair<int64_t, int64_t>> tasks;
  std::vector<int64_t> first(B + 1);
  for (int64_t b = 0; b < B; ++b) {
    first[b] = static_cast<int64_t>(tasks.size());
    for (int64_t j = 0; j < n_chunks; ++j) tasks.emplace_back(b, j);
  }
  first[B] = static_cast<int64_t>(tasks.size());
  const auto n_tasks = static_cast<int64_t>(tasks.size());
  auto part_acc = torch::empty({n_tasks, K, C}, q.options());
  auto part_m = torch::empty({n_tasks, K}, q.options()), part_l = torch::empty({n_tasks, K}, q.options());
  by_cache_dtype(kv, "mla_decode", [&](const auto* kv_p) {
    auto rows_of = [&](int64_t b, int64_t j) {
      const int64_t t0 = j * CHUNK;
      return std::tuple{kv_p + b * kv.stride(0) + t0 * kv.stride(1), std::min(CHUNK, T - t0),
                        mask_p == nullptr ? nullptr : mask_p + b * mask_sb + t0};
    };
    attend_chunks<std::remove_cv_t<std::remove_pointer_t<decltype(kv_p)>>>(
        q.data_ptr<float>(), tasks, rows_of, CHUNK, kv.stride(1), K, X, C, part_acc.data_ptr<float>(),
        part_m.data_ptr<float>(), part_l.data_ptr<float>());
  });
  auto out = torch::empty({B, K, C}, q.options());
  merge_chunks(part_acc.data_ptr<float>(), part_m.data_ptr<float>(), part_l.data_ptr<float>(), first, B, K, C,
               out.data_ptr<float>());
  return out;
}

// The paged cache: sequence b's rows are the first lens[b] rows of blocks table[b, 0], table[b, 1], ...; a block is
// one chunk, read in place through the table (no gathered copy). q [B, K, X] fp32 contiguous; blocks [N, S, X]
// fp32/bf16/fp16 (rows contiguous, any row and block stride); table [B, M] int64; lens [B] int64, each in
// [1, M * S]. Returns o [B, K, C] fp32.
torch::Tensor mla_decode_paged(torch::Tensor q, torch::Tensor blocks, torch::Tensor table, torch::Tensor lens,
                               int64_t C) {
  TORCH_CHECK(q.dim() == 3 && blocks.dim() == 3 && q.size(2) == blocks.size(2),
              "mla_decode_paged: q [B, K, X] and blocks [N, S, X] expected");
  TORCH_CHECK(q.device().is_cpu() && blocks.device().is_cpu(), "mla_decode_paged: CPU tensors expected");
  TORCH_CHECK(q.scalar_type() == at::kFloat && q.is_contiguous(), "mla_decode_paged: q must be contiguous fp32");
  TORCH_CHECK(blocks.stride(2) == 1, "mla_decode_paged: block rows must be contiguous");
  const int64_t B = q.size(0), K = q.size(1), X = q.size(2), S = blocks.size(1), N = blocks.size(0);
  TORCH_CHECK(table.dim() == 2 && table.size(0) == B && table.scalar_type() == at::kLong && lens.dim() == 1 &&
                  lens.size(0) == B && lens.scalar_type() == at::kLong,
              "mla_decode_paged: table [B, M] and lens [B] int64 expected");
  TORCH_CHECK(C > 0 && C <= X && S > 0, "mla_decode_paged: bad latent width or block size");
  const auto tab = table.contiguous(), len = lens.contiguous();
  const int64_t M = tab.size(1);
  const int64_t *tp = tab.data_ptr<int64_t>(), *lp = len.data_ptr<int64_t>();
  std::vector<std::pair<int64_t, int64_t>> tasks;
  std::vector<int64_t> first(B + 1);
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lp[b] >= 1 && lp[b] <= M * S, "mla_decode_paged: lens must be in [1, M * block size]");
    first[b] = static_cast<int64_t>(tasks.size());
    for (int64_t j = 0; j * S < lp[b]; ++j) {
      TORCH_CHECK(tp[b * M + j] >= 0 && tp[b * M + j] < N, "mla_decode_paged: block index out of range");
      tasks.emplace_back(b, j);
    }
  }
  first[B] = static_cast<int64_t>(tasks.size());
  const auto n_tasks = static_cast<int64_t>(tasks.size());
  auto part_acc = torch::empty({n_tasks, K, C}, q.options());
  auto part_m = torch::empty({n_tasks, K}, q.options()), part_l = torch::empty({n_tasks, K}, q.options());
  by_cache_dtype(blocks, "mla_decode_paged", [&](const auto* kv_p) {
    auto rows_of = [&](int64_t b, int64_t j) {
      return std::tuple{kv_p + tp[b * M + j] * blocks.stride(0), std::min(S, lp[b] - j * S),
                        static_cast<const bool*>(nullptr)};
    };
    attend_chunks<std::remove_cv_t<std::remove_pointer_t<decltype(kv_p)>>>(
        q.data_ptr<float>(), tasks, rows_of, S, blocks.stride(1), K, X, C, part_acc.data_ptr<float>(),
        part_m.data_ptr<float>(), part_l.data_ptr<float>());
  });
  auto out = torch::empty({B, K, C}, q.options());
  merge_chunks(part_acc.data_ptr<float>(), part_m.data_ptr<float>(), part_l.data_ptr<float>(), first, B, K, C,
               out.data_ptr<float>());
  return out;
}
