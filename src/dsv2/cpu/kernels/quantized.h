// Few-row products with int8 / int4 weights in dsv2.quant's blocked rows: each row of K values is K / g blocks of
// [bf16 scale | g values], int8 as signed bytes, int4 two per byte (element 2j in the low nibble of byte j, + 8).
// Weight-only: the values are widened to fp32 in registers and multiplied by the block's scale, then by fp32 x, so
// the result is the fp32 product with the dequantized weight (up to summation order) and decode reads 1 or 0.5 bytes
// per weight instead of 2. The format follows from K and the row's byte count (block_format: one (bits, g >= 32)
// fits), so a quantized weight is one uint8 tensor and passes where an fp32/bf16 weight does.
//     q_rows:    y[m, r] = w_r . x_m          (rows_dot)
//     q_combine: y[m, :] += sum_n x[n, m] w_n  (rows_combine: MLA's W_UK)
// int4's nibble order pairs the low nibbles of 8 bytes with the even elements of 16 values: x is given to q_rows with
// each 16 values reordered evens-then-odds (deinterleave16), and q_combine's output comes out in that order too
// (its caller undoes it), so no shuffle runs in the inner loops.
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
inline v8 int8x8(const uint8_t* p) {
  v8i8 b;
  std::memcpy(&b, p, 8);
  return __builtin_convertvector(__builtin_convertvector(b, v8i), v8);
}
// 16 int4 values from 8 bytes: the evens (low nibbles) and the odds (high nibbles), 8 lanes each, minus 8
inline void int4x16(const uint8_t* p, v8& even, v8& odd) {
  v8u8 b;
  std::memcpy(&b, p, 8);
  const v8i w = __builtin_convertvector(b, v8i);
  even = __builtin_convertvector((w & 15) - 8, v8);
  odd = __builtin_convertvector((w >> 4) - 8, v8);
}

// y[m * ys] = w . x_m for MQ rows x (K fp32 each, int4: deinterleaved) and one blocked weight row w
template <int MQ, int BITS>
[[gnu::always_inline]] inline void q_row(const float* x, int64_t K, const uint8_t* w, int64_t g, float* y,
                                         int64_t ys) {
  v8 acc[MQ][2];
  for (int m = 0; m < MQ; ++m) acc[m][0] = acc[m][1] = v8{};
  const int64_t bb = 2 + g * BITS / 8;
  for (int64_t k0 = 0; k0 < K; k0 += g, w += bb) {
    const float s = bf16_at(w);
    const uint8_t* q = w + 2;
    for (int64_t k = 0; k < g; k += 16, q += 16 * BITS / 8) {
      v8 w0, w1;
      if constexpr (BITS == 8) {
        w0 = int8x8(q), w1 = int8x8(q + 8);
      } else {
        int4x16(q, w0, w1);
      }
      w0 = pinned(w0 * s), w1 = pinned(w1 * s);
      for (int m = 0; m < MQ; ++m) {
        acc[m][0] += w0 * load8(x + m * K + k0 + k);
        acc[m][1] += w1 * load8(x + m * K + k0 + k + 8);
      }
    }
  }
  for (int m = 0; m < MQ; ++m) y[m * ys] = hsum(acc[m][0] + acc[m][1]);
}

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

// Each 16 values of rows [n, K] reordered evens then odds (int4's nibble order), or back (inverse = true)
inline torch::Tensor deinterleave16(const torch::Tensor& t, bool inverse = false) {
  // forward: 16 values as 8 (even, odd) pairs, transposed to [evens | odds]; inverse: the other way round
  const auto v = inverse ? t.reshape({-1, 2, 8}) : t.reshape({-1, 8, 2});
  return v.transpose(1, 2).contiguous().view(t.sizes());
}

}  // namespace
}  // namespace dsv2_kernels
