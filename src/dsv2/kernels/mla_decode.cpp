// MLA's absorbed decode attention over the latent cache, reading the cache once (flash-decoding on CPU).
//
// For batch row b and query row k (one head of one new token; the softmax scale is folded into q):
//     s_t = q_k . kv_t                      kv_t = [c_KV | k_R], X = C + R wide
//     o_k = sum_t softmax_t(s) kv_t[:C]     the latent output; W_UV is applied by the caller
// The cache is cut into chunks of CHUNK tokens and each (b, chunk) is one task of at::parallel_for: a thread
// streams its chunk from memory once while scoring it, then accumulates p @ kv[:, :C] while the chunk is still in
// its L2, with the chunk's own maximum (safe softmax). A second loop merges the chunks by their maxima. bf16/fp16
// caches are widened to fp32 per chunk; all arithmetic is fp32.
//
// The two inner loops are register-blocked micro-kernels (GCC/Clang vector extensions, 8 floats wide: AVX2 on
// x86, two NEON registers on ARM): one accumulator per FMA would wait on the previous FMA's latency, and
// reloading a cache row per query would make the loop load-bound.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int64_t CHUNK = 128;
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

typedef float v8 __attribute__((vector_size(32)));
inline v8 load8(const float* p) { v8 v; std::memcpy(&v, p, sizeof v); return v; }
inline void store8(float* p, v8 v) { std::memcpy(p, &v, sizeof v); }
inline float hsum(v8 v) { return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7])); }

inline float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
  for (int64_t x = 0; x < n; ++x) s += a[x] * b[x];
  return s;
}

// s[t][k] = r_t . q_k for n rows (row stride rs) and K queries: blocks of 4 rows x 2 queries.
void scores(const float* q, int64_t K, const float* r, int64_t rs, int64_t n, int64_t X, float* s) {
  const int64_t X8 = X - X % 8;
  int64_t t = 0;
  for (; t + 4 <= n; t += 4) {
    const float *r0 = r + t * rs, *r1 = r0 + rs, *r2 = r1 + rs, *r3 = r2 + rs;
    int64_t k = 0;
    for (; k + 2 <= K; k += 2) {
      const float *qa = q + k * X, *qb = qa + X;
      v8 a0 = {}, a1 = {}, a2 = {}, a3 = {}, b0 = {}, b1 = {}, b2 = {}, b3 = {};
      for (int64_t x = 0; x < X8; x += 8) {
        const v8 x0 = load8(r0 + x), x1 = load8(r1 + x), x2 = load8(r2 + x), x3 = load8(r3 + x);
        const v8 ua = load8(qa + x), ub = load8(qb + x);
        a0 += ua * x0; a1 += ua * x1; a2 += ua * x2; a3 += ua * x3;
        b0 += ub * x0; b1 += ub * x1; b2 += ub * x2; b3 += ub * x3;
      }
      const float* rows[4] = {r0, r1, r2, r3};
      const v8 acc_a[4] = {a0, a1, a2, a3}, acc_b[4] = {b0, b1, b2, b3};
      for (int i = 0; i < 4; ++i) {
        s[(t + i) * K + k] = hsum(acc_a[i]) + dot(qa + X8, rows[i] + X8, X - X8);
        s[(t + i) * K + k + 1] = hsum(acc_b[i]) + dot(qb + X8, rows[i] + X8, X - X8);
      }
    }
    for (; k < K; ++k)
      for (int i = 0; i < 4; ++i) s[(t + i) * K + k] = dot(q + k * X, r + (t + i) * rs, X);
  }
  for (; t < n; ++t)
    for (int64_t k = 0; k < K; ++k) s[t * K + k] = dot(q + k * X, r + t * rs, X);
}

// acc[k][:C] += sum_t p[t][k] r_t[:C]: per 32-column block and pair of queries, 8 accumulators run down the rows
// (the block's rows stay in L1 across the query pairs).
void accumulate(const float* p, int64_t K, const float* r, int64_t rs, int64_t n, int64_t C, float* acc) {
  const int64_t C32 = C - C % 32;
  for (int64_t c = 0; c < C32; c += 32) {
    int64_t k = 0;
    for (; k + 2 <= K; k += 2) {
      float *pa = acc + k * C + c, *pb = pa + C;
      v8 a0 = load8(pa), a1 = load8(pa + 8), a2 = load8(pa + 16), a3 = load8(pa + 24);
      v8 b0 = load8(pb), b1 = load8(pb + 8), b2 = load8(pb + 16), b3 = load8(pb + 24);
      for (int64_t t = 0; t < n; ++t) {
        const float* rt = r + t * rs + c;
        const v8 x0 = load8(rt), x1 = load8(rt + 8), x2 = load8(rt + 16), x3 = load8(rt + 24);
        const float wa = p[t * K + k], wb = p[t * K + k + 1];
        a0 += wa * x0; a1 += wa * x1; a2 += wa * x2; a3 += wa * x3;
        b0 += wb * x0; b1 += wb * x1; b2 += wb * x2; b3 += wb * x3;
      }
      store8(pa, a0); store8(pa + 8, a1); store8(pa + 16, a2); store8(pa + 24, a3);
      store8(pb, b0); store8(pb + 8, b1); store8(pb + 16, b2); store8(pb + 24, b3);
    }
    for (; k < K; ++k)
      for (int64_t t = 0; t < n; ++t)
        for (int64_t j = 0; j < 32; ++j) acc[k * C + c + j] += p[t * K + k] * r[t * rs + c + j];
  }
  for (int64_t k = 0; k < K; ++k)
    for (int64_t t = 0; t < n; ++t)
      for (int64_t c = C32; c < C; ++c) acc[k * C + c] += p[t * K + k] * r[t * rs + c];
}

// bf16 -> fp32 is a 16-bit shift; written on the raw bits so that the loop vectorises
inline void widen(const c10::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
  for (int64_t x = 0; x < n; ++x) {
    const uint32_t w = static_cast<uint32_t>(bits[x]) << 16;
    std::memcpy(dst + x, &w, sizeof w);
  }
}

template <typename scalar_t>
inline void widen(const scalar_t* src, float* dst, int64_t n) {
  for (int64_t x = 0; x < n; ++x) dst[x] = static_cast<float>(src[x]);
}

template <typename scalar_t>
void attend_chunks(const float* q, const scalar_t* kv, const bool* mask, float* part_acc, float* part_m,
                   float* part_l, int64_t B, int64_t T, int64_t K, int64_t X, int64_t C, int64_t kv_sb,
                   int64_t kv_st, int64_t mask_sb) {
  const int64_t n_chunks = (T + CHUNK - 1) / CHUNK;
  at::parallel_for(0, B * n_chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> wide(std::is_same_v<scalar_t, float> ? 0 : CHUNK * X), s(CHUNK * K), shift(K);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / n_chunks, j = task % n_chunks;
      const int64_t t0 = j * CHUNK, n = std::min(CHUNK, T - t0);
      const float* r;
      int64_t rs;
      if constexpr (std::is_same_v<scalar_t, float>) {
        r = kv + b * kv_sb + t0 * kv_st;
        rs = kv_st;
      } else {
        for (int64_t t = 0; t < n; ++t) widen(kv + b * kv_sb + (t0 + t) * kv_st, wide.data() + t * X, X);
        r = wide.data();
        rs = X;
      }
      scores(q + b * K * X, K, r, rs, n, X, s.data());
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
      for (int64_t t = 0; t < n; ++t) {
        float* st = s.data() + t * K;
#pragma omp simd
        for (int64_t k = 0; k < K; ++k) {  // vectorised expf (libmvec): one exp per key and query
          st[k] = std::exp(st[k] - shift[k]);
          l[k] += st[k];
        }
      }
      float* acc = part_acc + task * K * C;
      std::fill(acc, acc + K * C, 0.f);
      accumulate(s.data(), K, r, rs, n, C, acc);
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("mla_decode", &mla_decode, "MLA absorbed decode attention"); }
