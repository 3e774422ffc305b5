// MLA's absorbed decode attention over the latent cache, reading the cache once (flash-decoding on CPU).
//
// For batch row b and query row k (one head of one new token; the softmax scale is folded into q):
//     s_t = q_k . kv_t                      kv_t = [c_KV | k_R], X = C + R wide
//     o_k = sum_t softmax_t(s) kv_t[:C]     the latent output; W_UV is applied by the caller
// The cache is cut into chunks of CHUNK tokens and each (b, chunk) is one task of at::parallel_for: a thread
// streams its chunk from memory once while scoring it, then accumulates p @ kv[:, :C] while the chunk is still in
// its L2, with the chunk's own maximum (safe softmax). A second loop merges the chunks by their maxima. bf16 rows
// are widened in registers as they are loaded, fp16 rows into an fp32 copy of the chunk; all arithmetic is fp32.
//
// Scoring and accumulating are the register-tiled micro-kernels of tiles.h; the softmax's exponentials are
// vectorised too.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
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

template <typename scalar_t>
void attend_chunks(const float* q, const scalar_t* kv, const bool* mask, float* part_acc, float* part_m,
                   float* part_l, int64_t B, int64_t T, int64_t K, int64_t X, int64_t C, int64_t kv_sb,
                   int64_t kv_st, int64_t mask_sb) {
  const int64_t n_chunks = (T + CHUNK - 1) / CHUNK;
  // fp32 and bf16 rows are read in place; others (fp16) are widened into a copy of the chunk
  constexpr bool in_place = std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16>;
  using E = std::conditional_t<in_place, scalar_t, float>;
  at::parallel_for(0, B * n_chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> wide(in_place ? 0 : CHUNK * X), s(CHUNK * K), shift(K);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / n_chunks, j = task % n_chunks;
      const int64_t t0 = j * CHUNK, n = std::min(CHUNK, T - t0);
      const E* r;
      int64_t rs;
      if constexpr (in_place) {
        r = kv + b * kv_sb + t0 * kv_st;
        rs = kv_st;
      } else {
        for (int64_t t = 0; t < n; ++t)
          for (int64_t x = 0; x < X; ++x) wide[t * X + x] = static_cast<float>(kv[b * kv_sb + (t0 + t) * kv_st + x]);
        r = wide.data();
        rs = X;
      }
      scores(q + b * K * X, K, r, rs, n, X, s.data(), K, 1, in_place);
      float* m = part_m + task * K;
      float* l = part_l + task * K;
      std::fill(m, m + K, NEG_INF);
      std::fill(l, l + K, 0.f);
      for (int64_t t = 0; t < n; ++t) {
        if (mask != nullptr && !mask[b * mask_sb + t0 + t]) {
          std::fill(s.data() + t * K, s.data() + (t + 1) * K, NEG_INF);
          continue;
        }
        for (int64_t k = 0; k < K; ++k) m[k] = std::max(m[k], s[t * K + k]);
      }
      // a query whose whole chunk is masked keeps m = -inf and l = 0 (exp(-inf - 0) = 0 for its keys)
      for (int64_t k = 0; k < K; ++k) shift[k] = m[k] == NEG_INF ? 0.f : m[k];
      const int64_t K8 = K - K % 8;
      for (int64_t k = 0; k < K8; k += 8) {
        const v8 sh = load8(shift.data() + k);
        v8 sum = load8(l + k);
        for (int64_t t = 0; t < n; ++t) {
          const v8 e = exp8(load8(s.data() + t * K + k) - sh);
          store8(s.data() + t * K + k, e);
          sum += e;
        }
        store8(l + k, sum);
      }
      for (int64_t t = 0; t < n; ++t)
        for (int64_t k = K8; k < K; ++k) {
          s[t * K + k] = std::exp(s[t * K + k] - shift[k]);
          l[k] += s[t * K + k];
        }
      float* acc = part_acc + task * K * C;
      std::fill(acc, acc + K * C, 0.f);
      accumulate(s.data(), K, r, rs, n, C, acc, C);
    }
  });
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
  auto part_acc = torch::empty({B, n_chunks, K, C}, q.options());
  auto part_m = torch::empty({B, n_chunks, K}, q.options());
  auto part_l = torch::empty({B, n_chunks, K}, q.options());
  auto run = [&](const auto* kv_p) {
    attend_chunks(q.data_ptr<float>(), kv_p, mask_p, part_acc.data_ptr<float>(), part_m.data_ptr<float>(),
                  part_l.data_ptr<float>(), B, T, K, X, C, kv.stride(0), kv.stride(1), mask_sb);
  };
  switch (kv.scalar_type()) {
    case at::kFloat: run(kv.data_ptr<float>()); break;
    case at::kBFloat16: run(kv.data_ptr<c10::BFloat16>()); break;
    case at::kHalf: run(kv.data_ptr<c10::Half>()); break;
    default: TORCH_CHECK(false, "mla_decode: cache dtype must be float32, bfloat16 or float16");
  }
  // merge the chunks: o = sum_j e^{m_j - M} acc_j / sum_j e^{m_j - M} l_j
  auto out = torch::empty({B, K, C}, q.options());
  const float *pa = part_acc.data_ptr<float>(), *pm = part_m.data_ptr<float>(), *pl = part_l.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, B * K, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bk = begin; bk < end; ++bk) {
      const int64_t b = bk / K, k = bk % K;
      float M = NEG_INF;
      for (int64_t j = 0; j < n_chunks; ++j) M = std::max(M, pm[(b * n_chunks + j) * K + k]);
      float* ok = o + bk * C;
      std::fill(ok, ok + C, 0.f);
      float denom = 0.f;
      for (int64_t j = 0; j < n_chunks; ++j) {
        const float mj = pm[(b * n_chunks + j) * K + k];
        if (mj == NEG_INF) continue;
        const float w = std::exp(mj - M);
        denom += w * pl[(b * n_chunks + j) * K + k];
        const float* a = pa + ((b * n_chunks + j) * K + k) * C;
        for (int64_t c = 0; c < C; ++c) ok[c] += w * a[c];
      }
      const float inv = denom > 0.f ? 1.f / denom : 0.f;  // every key masked: zeros (the caller never uses them)
      for (int64_t c = 0; c < C; ++c) ok[c] *= inv;
    }
  });
  return out;
}
