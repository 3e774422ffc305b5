// Register-tiled fp32 micro-kernels shared by the CPU decode kernels (GCC/Clang vector extensions, 8 floats wide:
// AVX2 on x86, two NEON registers on ARM). Two products of few "queries" with many rows, each row read once:
//     scores:     s[t][k] = r_t . q_k                 (MLA decode scores; x W^T for a few rows x)
//     accumulate: acc[k] += sum_t p[t][k] r_t[:C]     (MLA decode output; x W for a few rows x)
// Rows are fp32 or bf16 (bf16 widened in registers as it is loaded); all arithmetic is fp32. One accumulator per
// FMA would wait on the previous FMA's latency, and reloading a row per query would make the loops load-bound.
#pragma once

#include <torch/extension.h>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

// Internal linkage: each kernel file gets its own copy that the compiler may inline (as shared-library symbols the
// tiles would be called through the PLT, never inlined into the loops that call them).
namespace dsv2_kernels {
namespace {

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint16_t v8u16 __attribute__((vector_size(16)));
inline v8 load8(const float* p) { v8 v; std::memcpy(&v, p, sizeof v); return v; }
// bf16 -> fp32 is a 16-bit shift of the bits: one zero-extending load and one shift per 8 values (GCC lowers the
// generic conversion to two half-width extends and a shuffle, hence the intrinsic where there is one)
inline v8 load8(const c10::BFloat16* p) {
#if defined(__AVX2__)
  return (v8)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
#else
  v8u16 h;
  std::memcpy(&h, p, sizeof h);
  return (v8)(__builtin_convertvector(h, v8i) << 16);
#endif
}
inline void store8(float* p, v8 v) { std::memcpy(p, &v, sizeof v); }
typedef float v4 __attribute__((vector_size(16)));
// the 8 lanes' sum in three vector adds (lane extracts and scalar adds cost a sizeable share of a score tile)
inline float hsum(v8 v) {
  v4 s = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
  s += __builtin_shufflevector(s, s, 2, 3, 0, 1);
  s += __builtin_shufflevector(s, s, 1, 0, 3, 2);
  return s[0];
}

template <typename E>
inline float dot(const float* a, const E* b, int64_t n) {
  float s = 0.f;
  for (int64_t x = 0; x < n; ++x) s += a[x] * static_cast<float>(b[x]);
  return s;
}

// A loaded vector kept in a register. Without this GCC folds the load into each FMA that uses the vector (a
// memory operand per FMA), so a tile of R rows x Q queries issues R*Q loads instead of R+Q and the loop is
// load-bound: 17 -> 30 GFMA/s per core for the 3x4 score tile on a Zen 3 EPYC.
inline v8 pinned(v8 v) {
#if defined(__x86_64__)
  asm("" : "+x"(v));
#endif
  return v;
}

// s[i*si + j*sj] = r_i . q_j for R rows (row stride rs) and Q queries: R + Q vector loads feed R*Q FMAs, and the
// R*Q accumulators hide the FMA latency. 3 x 4 fills AVX2's 16 registers (12 accumulators, 3 rows, 1 query).
// pf (or null): R rows to fetch from memory meanwhile, a cache line at a time in step with the loads, so the fetches
// overlap the FMAs (fetched in one burst before the tile, they did not: 18 -> 24 GFMA/s streaming an fp32 cache).
template <int R, int Q, typename E>
[[gnu::always_inline]] inline void score_tile(const float* q, int64_t X, const E* r, int64_t rs, float* s, int64_t si, int64_t sj,
                const E* pf) {
  const int64_t X8 = X - X % 8;
  v8 acc[R][Q];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < Q; ++j) acc[i][j] = v8{};  // not `= {}`: that zeroes the array with a memset call
  for (int64_t x = 0; x < X8; x += 8) {
    if (pf != nullptr && (x * sizeof(E)) % 64 == 0)
      for (int i = 0; i < R; ++i) __builtin_prefetch(pf + i * rs + x);
    v8 rx[R];
    for (int i = 0; i < R; ++i) rx[i] = pinned(load8(r + i * rs + x));
    for (int j = 0; j < Q; ++j) {
      const v8 qx = pinned(load8(q + j * X + x));
      for (int i = 0; i < R; ++i) acc[i][j] += rx[i] * qx;
    }
  }
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < Q; ++j) s[i * si + j * sj] = hsum(acc[i][j]) + dot(q + j * X + X8, r + i * rs + X8, X - X8);
}

// the R rows against all K queries, fetching pf's R rows during the first query group
template <int R, typename E>
void score_rows(const float* q, int64_t K, const E* r, int64_t rs, int64_t X, float* s, int64_t si, int64_t sk,
                const E* pf) {
  int64_t k = 0;
  for (; k + 4 <= K; k += 4, pf = nullptr) score_tile<R, 4>(q + k * X, X, r, rs, s + k * sk, si, sk, pf);
  switch (K - k) {
    case 3: score_tile<R, 3>(q + k * X, X, r, rs, s + k * sk, si, sk, pf); break;
    case 2: score_tile<R, 2>(q + k * X, X, r, rs, s + k * sk, si, sk, pf); break;
    case 1: score_tile<R, 1>(q + k * X, X, r, rs, s + k * sk, si, sk, pf); break;
  }
}

// s[t*st] = r_t . q for n rows and one query (a GEMV): a row at a time, 4 accumulators along it, so that a core
// reads one sequential stream (the 3-row tiles interleave three). No software prefetch: on a Zen 3 EPYC the
// hardware prefetchers alone stream a GEMV at the rate of a plain sum (21-22 GB/s on 2 cores), and fetches issued
// 1-8 KB ahead cost 10-40% of it.
template <typename E>
void score_single(const float* q, const E* r, int64_t rs, int64_t n, int64_t X, float* s, int64_t st) {
  constexpr int U = 4;
  for (int64_t t = 0; t < n; ++t) {
    const E* row = r + t * rs;
    v8 acc[U];
    for (int u = 0; u < U; ++u) acc[u] = v8{};
    int64_t x = 0;
    for (; x + 8 * U <= X; x += 8 * U)
      for (int u = 0; u < U; ++u) acc[u] += load8(row + x + 8 * u) * load8(q + x + 8 * u);
    for (; x + 8 <= X; x += 8) acc[0] += load8(row + x) * load8(q + x);
    for (int u = 1; u < U; ++u) acc[0] += acc[u];
    s[t * st] = hsum(acc[0]) + dot(q + x, row + x, X - x);
  }
}

#if defined(__AVX2__)
// bf16 rows widened 16 at a time: one 256-bit load unpacked against zero into two fp32 vectors, which hold the
// values 0-3, 8-11 and 4-7, 12-15 of the 16 (the unpacks work within 128-bit lanes); q is permuted to match once
// per call. Half the loads and widening uops of load8's 8 at a time: 12 -> 17 GB/s on a Zen 3 EPYC.
inline void score_single(const float* q, const c10::BFloat16* r, int64_t rs, int64_t n, int64_t X, float* s,
                         int64_t st) {
  constexpr int U = 4;
  const int64_t X16 = X - X % 16;
  thread_local std::vector<float> permuted;
  permuted.resize(X16);
  for (int64_t x = 0; x < X16; x += 16)
    for (int i = 0; i < 4; ++i) {
      permuted[x + i] = q[x + i];
      permuted[x + 4 + i] = q[x + 8 + i];
      permuted[x + 8 + i] = q[x + 4 + i];
      permuted[x + 12 + i] = q[x + 12 + i];
    }
  const float* qp = permuted.data();
  const __m256i zero = _mm256_setzero_si256();
  for (int64_t t = 0; t < n; ++t) {
    const c10::BFloat16* row = r + t * rs;
    v8 acc[2 * U];
    for (int u = 0; u < 2 * U; ++u) acc[u] = v8{};
    auto step = [&](int64_t x, int u) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + x));
      acc[2 * u] += (v8)_mm256_unpacklo_epi16(zero, w) * load8(qp + x);
      acc[2 * u + 1] += (v8)_mm256_unpackhi_epi16(zero, w) * load8(qp + x + 8);
    };
    int64_t x = 0;
    for (; x + 16 * U <= X16; x += 16 * U)
      for (int u = 0; u < U; ++u) step(x + 16 * u, u);
    for (; x < X16; x += 16) step(x, 0);
    for (int u = 1; u < 2 * U; ++u) acc[0] += acc[u];
    s[t * st] = hsum(acc[0]) + dot(q + X16, row + X16, X - X16);
  }
}
#endif

// s[t*st + k*sk] = r_t . q_k for n rows (row stride rs) and K queries (contiguous, X wide). With several queries,
// rows read straight from memory (stream) are fetched a block ahead: the first query group of a block would
// otherwise wait on memory.
template <typename E>
void scores(const float* q, int64_t K, const E* r, int64_t rs, int64_t n, int64_t X, float* s, int64_t st,
            int64_t sk, bool stream) {
  if (K == 1) return score_single(q, r, rs, n, X, s, st);
  int64_t t = 0;
  for (; t + 3 <= n; t += 3)
    score_rows<3>(q, K, r + t * rs, rs, X, s + t * st, st, sk, stream && t + 6 <= n ? r + (t + 3) * rs : nullptr);
  switch (n - t) {
    case 2: score_rows<2>(q, K, r + t * rs, rs, X, s + t * st, st, sk, static_cast<const E*>(nullptr)); break;
    case 1: score_rows<1>(q, K, r + t * rs, rs, X, s + t * st, st, sk, static_cast<const E*>(nullptr)); break;
  }
}

// acc[j][8v .. 8v+7] += sum_t p[t][j] r_t[8v .. 8v+7] for Q queries and V vectors of columns: V loads and Q
// broadcasts feed Q*V FMAs; the columns' rows stay in L1 across the query groups.
template <int V, int Q, typename E>
[[gnu::always_inline]] inline void accumulate_tile(const float* p, int64_t K, const E* r, int64_t rs, int64_t n, float* acc, int64_t as) {
  v8 a[Q][V];
  for (int j = 0; j < Q; ++j)
    for (int v = 0; v < V; ++v) a[j][v] = load8(acc + j * as + 8 * v);
  for (int64_t t = 0; t < n; ++t) {
    v8 rt[V];
    for (int v = 0; v < V; ++v) rt[v] = pinned(load8(r + t * rs + 8 * v));
    for (int j = 0; j < Q; ++j) {
      const float w = p[t * K + j];
      for (int v = 0; v < V; ++v) a[j][v] += w * rt[v];
    }
  }
  for (int j = 0; j < Q; ++j)
    for (int v = 0; v < V; ++v) store8(acc + j * as + 8 * v, a[j][v]);
}

template <int V, typename E>
void accumulate_columns(const float* p, int64_t K, const E* r, int64_t rs, int64_t n, float* acc, int64_t as) {
  int64_t k = 0;
  for (; k + 4 <= K; k += 4) accumulate_tile<V, 4>(p + k, K, r, rs, n, acc + k * as, as);
  switch (K - k) {
    case 3: accumulate_tile<V, 3>(p + k, K, r, rs, n, acc + k * as, as); break;
    case 2: accumulate_tile<V, 2>(p + k, K, r, rs, n, acc + k * as, as); break;
    case 1: accumulate_tile<V, 1>(p + k, K, r, rs, n, acc + k * as, as); break;
  }
}

// acc[k*as + :C] += sum_t p[t*K + k] r_t[:C] for n rows (row stride rs) and K queries: 24-column blocks (4 x 3
// tiles, 12 accumulators), then the 8- and 16-column rest, then single columns
template <typename E>
void accumulate(const float* p, int64_t K, const E* r, int64_t rs, int64_t n, int64_t C, float* acc, int64_t as) {
  const int64_t C8 = C - C % 8;
  int64_t c = 0;
  for (; c + 24 <= C8; c += 24) accumulate_columns<3>(p, K, r + c, rs, n, acc + c, as);
  switch ((C8 - c) / 8) {
    case 2: accumulate_columns<2>(p, K, r + c, rs, n, acc + c, as); break;
    case 1: accumulate_columns<1>(p, K, r + c, rs, n, acc + c, as); break;
  }
  for (int64_t k = 0; k < K; ++k)
    for (int64_t t = 0; t < n; ++t)
      for (int64_t j = C8; j < C; ++j) acc[k * as + j] += p[t * K + k] * static_cast<float>(r[t * rs + j]);
}

}  // namespace
}  // namespace dsv2_kernels
