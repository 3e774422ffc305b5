// Few-row products with int8 / int4 weights in dsv2.quant's blocked rows: each row of K values is K / g blocks of
// [bf16 scale | g values], int8 as signed bytes, int4 two per byte (element 2j in the low nibble of byte j, + 8).
// Weight-only: the values are widened to fp32 in registers and multiplied by the block's scale, then by fp32 x, so
// the result is the fp32 product with the dequantized weight (up to summation order) and decode reads 1 or 0.5 bytes
// per weight instead of 2. The format follows from K and the row's byte count (block_format: one (bits, g >= 32)
// fits), so a quantized weight is one uint8 tensor and passes where an fp32/bf16 weight does.
//     q_rows:    y[m, r] = w_r . x_m          (rows_dot)
//     q_combine: y[m, :] += sum_n x[n, m] w_n  (rows_combine: MLA's W_UK)
// int4's nibble order pairs the low nibbles of n bytes with the even elements of 2n values: x is given to q_rows with
// each Q_CHUNK values reordered evens-then-odds (deinterleave), and q_combine's output comes out in such an order
// too (its caller undoes it), so no shuffle runs in the inner loops.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <cstring>

#include "tiles.h"

namespace dsv2_kernels {
namespace {

struct QFormat {
  int bits = 0;
  int64_t group = 0;
  int64_t block_bytes() const { return 2 + group * bits / 8; }
};

// The one (bits, group) with row_bytes = 2 K / group + K bits / 8, group a multiple of 32 dividing K; bits 0 if none.
inline QFormat block_format(int64_t K, int64_t row_bytes) {
  for (int bits : {8, 4}) {
    const int64_t extra = row_bytes - K * bits / 8;
    if (extra > 0 && extra % 2 == 0 && K % (extra / 2) == 0 && (K / (extra / 2)) % 32 == 0)
      return QFormat{bits, K / (extra / 2)};
  }
  return QFormat{};
}

typedef int8_t v8i8 __attribute__((vector_size(8)));
typedef uint8_t v8u8 __attribute__((vector_size(8)));

inline float bf16_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
// 8 int8 values widened to fp32 (one sign-extending load and one conversion with AVX2: GCC lowers the generic
// conversion of an 8-byte vector to byte extracts, which made the products compute-bound at a fifth of the bandwidth)
inline v8 int8x8(const uint8_t* p) {
#if defined(__AVX2__)
  return (v8)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#else
  v8i8 b;
  std::memcpy(&b, p, 8);
  return __builtin_convertvector(__builtin_convertvector(b, v8i), v8);
#endif
}
// 16 int4 values from 8 bytes: the evens (low nibbles) and the odds (high nibbles), 8 lanes each, minus 8
inline void int4x16(const uint8_t* p, v8& even, v8& odd) {
#if defined(__AVX2__)
  const __m256i w = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  const __m256i eight = _mm256_set1_epi32(8);
  even = (v8)_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(w, _mm256_set1_epi32(15)), eight));
  odd = (v8)_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(w, 4), eight));
#else
  v8u8 b;
  std::memcpy(&b, p, 8);
  const v8i w = __builtin_convertvector(b, v8i);
  even = __builtin_convertvector((w & 15) - 8, v8);
  odd = __builtin_convertvector((w >> 4) - 8, v8);
#endif
}

#if defined(__AVX512F__)
// 16 lanes: the values of a block in chunks of 32 (int8: two loads of 16; int4: 16 bytes, evens and odds), each
// block's products summed apart and scaled once (one multiply per block, not per value), two chains per row of x
constexpr int64_t Q_CHUNK = 32;  // the int4 x order: each 32 values evens then odds
template <int BITS>
[[gnu::always_inline]] inline void chunk32(const uint8_t* q, __m512& w0, __m512& w1) {
  if constexpr (BITS == 8) {
    w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))));
    w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16))));
  } else {  // a nibble n is the value n - 8: one table lookup (vpermps reads an index's low 4 bits) per 16 values
    const __m512 table = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
    w0 = _mm512_permutexvar_ps(b, table);
    w1 = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table);
  }
}

// int4: the block's scale folded into the nibble table (one multiply per block), so the lookups give the scaled
// weights and the products go straight into two accumulators per row
template <int MQ>
[[gnu::always_inline]] inline void q4_row(const float* x, int64_t K, const uint8_t* w, int64_t g, float* y,
                                          int64_t ys) {
  const __m512 table = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
  __m512 acc[MQ][2];
  for (int m = 0; m < MQ; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  const int64_t bb = 2 + g / 2;
  for (int64_t k0 = 0; k0 < K; k0 += g, w += bb) {
    const __m512 scaled = _mm512_mul_ps(table, _mm512_set1_ps(bf16_at(w)));
    const uint8_t* q = w + 2;
    for (int64_t k = 0; k < g; k += 32, q += 16) {
      const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
      const __m512 w0 = _mm512_permutexvar_ps(b, scaled), w1 = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), scaled);
      for (int m = 0; m < MQ; ++m) {
        acc[m][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + m * K + k0 + k), acc[m][0]);
        acc[m][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + m * K + k0 + k + 16), acc[m][1]);
      }
    }
  }
  for (int m = 0; m < MQ; ++m) y[m * ys] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]));
}

template <int MQ, int BITS>
[[gnu::always_inline]] inline void q_row(const float* x, int64_t K, const uint8_t* w, int64_t g, float* y,
                                         int64_t ys) {
  if constexpr (BITS == 4) return q4_row<MQ>(x, K, w, g, y, ys);
  __m512 acc[MQ];
  for (int m = 0; m < MQ; ++m) acc[m] = _mm512_setzero_ps();
  const int64_t bb = 2 + g * BITS / 8;
  for (int64_t k0 = 0; k0 < K; k0 += g, w += bb) {
    __m512 part[MQ][2];
    for (int m = 0; m < MQ; ++m) part[m][0] = part[m][1] = _mm512_setzero_ps();
    const uint8_t* q = w + 2;
    for (int64_t k = 0; k < g; k += 32, q += 32 * BITS / 8) {
      __m512 w0, w1;
      chunk32<BITS>(q, w0, w1);
      for (int m = 0; m < MQ; ++m) {
        part[m][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + m * K + k0 + k), part[m][0]);
        part[m][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + m * K + k0 + k + 16), part[m][1]);
      }
    }
    const __m512 s = _mm512_set1_ps(bf16_at(w));
    for (int m = 0; m < MQ; ++m) acc[m] = _mm512_fmadd_ps(_mm512_add_ps(part[m][0], part[m][1]), s, acc[m]);
  }
  for (int m = 0; m < MQ; ++m) y[m * ys] = _mm512_reduce_add_ps(acc[m]);
}
#else
constexpr int64_t Q_CHUNK = 16;  // the int4 x order: each 16 values evens then odds
// y[m * ys] = w . x_m for MQ rows x (K fp32 each, int4: in Q_CHUNK order) and one blocked weight row w; each block's
// products summed apart and scaled once
template <int MQ, int BITS>
[[gnu::always_inline]] inline void q_row(const float* x, int64_t K, const uint8_t* w, int64_t g, float* y,
                                         int64_t ys) {
  v8 acc[MQ];
  for (int m = 0; m < MQ; ++m) acc[m] = v8{};
  const int64_t bb = 2 + g * BITS / 8;
  for (int64_t k0 = 0; k0 < K; k0 += g, w += bb) {
    v8 part[MQ][2];
    for (int m = 0; m < MQ; ++m) part[m][0] = part[m][1] = v8{};
    const uint8_t* q = w + 2;
    for (int64_t k = 0; k < g; k += 16, q += 16 * BITS / 8) {
      v8 w0, w1;
      if constexpr (BITS == 8) {
        w0 = pinned(int8x8(q)), w1 = pinned(int8x8(q + 8));
      } else {
        int4x16(q, w0, w1);
        w0 = pinned(w0), w1 = pinned(w1);
      }
      for (int m = 0; m < MQ; ++m) {
        part[m][0] += w0 * load8(x + m * K + k0 + k);
        part[m][1] += w1 * load8(x + m * K + k0 + k + 8);
      }
    }
    const float s = bf16_at(w);
    for (int m = 0; m < MQ; ++m) acc[m] += (part[m][0] + part[m][1]) * s;
  }
  for (int m = 0; m < MQ; ++m) y[m * ys] = hsum(acc[m]);
}
#endif

template <int BITS>
void q_rows_bits(const float* x, int64_t M, const uint8_t* w, int64_t ws, int64_t n, int64_t K, int64_t g, float* y,
                 int64_t ys) {
  for (int64_t r = 0; r < n; ++r) {
    const uint8_t* row = w + r * ws;
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) q_row<4, BITS>(x + m * K, K, row, g, y + m * ys + r, ys);
    switch (M - m) {
      case 3: q_row<3, BITS>(x + m * K, K, row, g, y + m * ys + r, ys); break;
      case 2: q_row<2, BITS>(x + m * K, K, row, g, y + m * ys + r, ys); break;
      case 1: q_row<1, BITS>(x + m * K, K, row, g, y + m * ys + r, ys); break;
    }
  }
}

#if defined(__AVX512BF16__) && defined(__AVX512VL__) && defined(__AVX512BW__)
// int4 weights against bf16 x where the CPU multiplies bf16 natively: a nibble becomes the bf16 of its value by one
// word lookup (vpermw reads an index's low 4 bits), and vdpbf16ps multiplies 16 pairs per instruction, a third of
// the instructions of widening to fp32 (which leaves int4 compute-bound below the memory's rate). The products of
// bf16 values are exact in fp32, so this is the fp32 result up to summation order. x in Q_CHUNK order, as bf16.
constexpr bool Q4_BF16 = true;
using BF16x = c10::BFloat16;
template <int MQ>
[[gnu::always_inline]] inline void q4_row_bf16(const BF16x* x, int64_t K, const uint8_t* w, int64_t g, float* y,
                                               int64_t ys) {
  const __m256i table = _mm256_setr_epi16(
      static_cast<short>(0xc100), static_cast<short>(0xc0e0), static_cast<short>(0xc0c0), static_cast<short>(0xc0a0),
      static_cast<short>(0xc080), static_cast<short>(0xc040), static_cast<short>(0xc000), static_cast<short>(0xbf80),
      0x0000, 0x3f80, 0x4000, 0x4040, 0x4080, 0x40a0, 0x40c0, 0x40e0);  // bf16 of -8 .. 7
  __m256 acc[MQ];
  for (int m = 0; m < MQ; ++m) acc[m] = _mm256_setzero_ps();
  const int64_t bb = 2 + g / 2;
  for (int64_t k0 = 0; k0 < K; k0 += g, w += bb) {
    __m256 part[MQ][2];  // evens and odds apart: two short chains per block, not one of twice the latency
    for (int m = 0; m < MQ; ++m) part[m][0] = part[m][1] = _mm256_setzero_ps();
    const uint8_t* q = w + 2;
    for (int64_t k = 0; k < g; k += 32, q += 16) {
      const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
      const __m256bh even = (__m256bh)_mm256_permutexvar_epi16(b, table);
      const __m256bh odd = (__m256bh)_mm256_permutexvar_epi16(_mm256_srli_epi16(b, 4), table);
      for (int m = 0; m < MQ; ++m) {
        const auto* xm = reinterpret_cast<const __m256i*>(x + m * K + k0 + k);
        part[m][0] = _mm256_dpbf16_ps(part[m][0], even, (__m256bh)_mm256_loadu_si256(xm));
        part[m][1] = _mm256_dpbf16_ps(part[m][1], odd, (__m256bh)_mm256_loadu_si256(xm + 1));
      }
    }
    const __m256 s = _mm256_set1_ps(bf16_at(w));
    for (int m = 0; m < MQ; ++m) acc[m] = _mm256_fmadd_ps(_mm256_add_ps(part[m][0], part[m][1]), s, acc[m]);
  }
  for (int m = 0; m < MQ; ++m) y[m * ys] = hsum((v8)acc[m]);
}

inline void q4_rows_bf16(const BF16x* x, int64_t M, const uint8_t* w, int64_t ws, int64_t n, int64_t K, int64_t g,
                         float* y, int64_t ys) {
  for (int64_t r = 0; r < n; ++r) {
    const uint8_t* row = w + r * ws;
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) q4_row_bf16<4>(x + m * K, K, row, g, y + m * ys + r, ys);
    switch (M - m) {
      case 3: q4_row_bf16<3>(x + m * K, K, row, g, y + m * ys + r, ys); break;
      case 2: q4_row_bf16<2>(x + m * K, K, row, g, y + m * ys + r, ys); break;
      case 1: q4_row_bf16<1>(x + m * K, K, row, g, y + m * ys + r, ys); break;
    }
  }
}
#else
constexpr bool Q4_BF16 = false;
#endif

// y[m * ys + r] = w_r . x_m for M rows of x (contiguous, K wide) and n blocked weight rows (stride ws bytes)
inline void q_rows(const float* x, int64_t M, const uint8_t* w, int64_t ws, int64_t n, int64_t K, QFormat f, float* y,
                   int64_t ys) {
  if (f.bits == 8)
    q_rows_bits<8>(x, M, w, ws, n, K, f.group, y, ys);
  else
    q_rows_bits<4>(x, M, w, ws, n, K, f.group, y, ys);
}

// y[m * C + c] += sum_n x[n * M + m] w_n[c] for N blocked weight rows of C values (stride ws bytes), M <= 16 rows of
// y; int4 output comes deinterleaved per 16 values
template <int BITS>
void q_combine_bits(const float* x, int64_t N, int64_t M, const uint8_t* w, int64_t ws, int64_t C, int64_t g,
                    float* y) {
  const int64_t bb = 2 + g * BITS / 8;
  for (int64_t n = 0; n < N; ++n) {
    const uint8_t* blk = w + n * ws;
    for (int64_t c0 = 0; c0 < C; c0 += g, blk += bb) {
      const float s = bf16_at(blk);
      const uint8_t* q = blk + 2;
      for (int64_t c = 0; c < g; c += 16, q += 16 * BITS / 8) {
        v8 w0, w1;
        if constexpr (BITS == 8) {
          w0 = int8x8(q), w1 = int8x8(q + 8);
        } else {
          int4x16(q, w0, w1);
        }
        w0 = pinned(w0 * s), w1 = pinned(w1 * s);
        for (int64_t m = 0; m < M; ++m) {
          const float a = x[n * M + m];
          float* yc = y + m * C + c0 + c;
          store8(yc, load8(yc) + a * w0);
          store8(yc + 8, load8(yc + 8) + a * w1);
        }
      }
    }
  }
}

inline void q_combine(const float* x, int64_t N, int64_t M, const uint8_t* w, int64_t ws, int64_t C, QFormat f,
                      float* y) {
  if (f.bits == 8)
    q_combine_bits<8>(x, N, M, w, ws, C, f.group, y);
  else
    q_combine_bits<4>(x, N, M, w, ws, C, f.group, y);
}

// Each `chunk` values of t reordered evens then odds (int4's nibble order), or back (inverse = true): q_rows takes x
// in Q_CHUNK order, q_combine gives y in the order of 16
inline torch::Tensor deinterleave(const torch::Tensor& t, int64_t chunk, bool inverse = false) {
  // forward: the values as (even, odd) pairs, transposed to [evens | odds]; inverse: the other way round
  const auto v = inverse ? t.reshape({-1, 2, chunk / 2}) : t.reshape({-1, chunk / 2, 2});
  return v.transpose(1, 2).contiguous().view(t.sizes());
}

}  // namespace
}  // namespace dsv2_kernels
