// Quantized linears on CPU (AVX2 + FMA): y [M, N] = x [M, K] W^T with W held as int8 or int4 codes.
//
// Why: decoding a batch of one reads every weight once per token, so its speed is the weights' bytes over
// memory bandwidth. Expanding int8/int4 codes to a float copy of W on each call (what serving did) reads
// the codes, writes 4 bytes per weight and reads them again: slower than fp32. These kernels read each
// code once and expand it in registers (small M), or into a per-thread buffer of a few rows that stays in
// cache and is reused by every row of x (larger M, where the matmul is compute-bound and the expansion is
// paid once per weight instead of once per row of x).
//
// - w8 (weight-only int8): codes int8 [N, K], scales fp32 [N]; y = (x q^T) * scales.
// - w4 (group-wise int4): codes uint8 [N, Kp/2], two per byte (low nibble: even k), scales and offsets
//   fp32 [N, Kp/g]; w = q * scale + offset (offset = -zero * scale). Kp is a multiple of g, g of 16. The
//   kernel walks each 8-byte run of codes as its 8 low nibbles (k = 0, 2, ..., 14) then its 8 high ones
//   (k = 1, ..., 15), so x is copied once per call into that order (zero-padded to Kp): x_perm.
// - w8a8 (SmoothQuant-style): x quantized per row to int8 (scale = max|x_row| / 127, round half to even),
//   integer dot products through madd_epi16, y = dot * x_scale[m] * scales[n].
// References: puyu.serving.qlinear.*_reference.
// The tiles' accumulators are small arrays of vectors; `#pragma GCC unroll` on every loop over them lets
// GCC keep them in registers (without it, it stored all of them to the stack on every k: 2-3x slower).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <type_traits>
#include <vector>

#ifdef PUYU_CPU_AVX2
#include <immintrin.h>
#endif

#include "serving_ops.h"

namespace puyu {
namespace {

#ifdef PUYU_CPU_AVX2
constexpr int64_t kSmallM = 4;  // up to this many rows of x: codes expanded in registers, else in a buffer
constexpr int64_t kBufRows = 16;  // weight rows expanded into a thread's panel at a time (two vectors of outputs)

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline int32_t hsum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

inline __m128i load8(const void* p) { return _mm_loadl_epi64(static_cast<const __m128i*>(p)); }

// Rows of int8 codes as float vectors (unscaled: the per-row scale is applied to the output).
struct W8Rows {
  const int8_t* q;
  int64_t K;
  // the 8 weights of row n at k + 8 * Half (natural order)
  template <int Half>
  __m256 get(int64_t n, int64_t k) const {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(load8(q + n * K + k + 8 * Half)));
  }
  float at(int64_t n, int64_t k) const { return q[n * K + k]; }
};

// Rows of int4 codes (x_perm order: each 8 bytes hold 8 even then 8 odd weights in their low and high
// nibbles) with per-group scales and offsets [N, G]; groups of g codes, Kp per row.
struct W4Rows {
  const uint8_t* q;
  const float* scales;
  const float* offsets;
  int64_t Kp, G, g;
};

// out[m][j] = dot(x[m, :K], W row n0 + j) for MT rows of x (stride ldx) and NT weight rows; the
// multiples of 16 in vector FMAs, the rest (K % 16) in scalar ones.
template <int MT, int NT, class Rows>
inline void dot_tile(const float* x, int64_t ldx, int64_t K, const Rows& rows, int64_t n0, float* y, int64_t ldy,
                     const float* col_scale) {
  __m256 acc[MT][NT];
  #pragma GCC unroll 16
  for (int m = 0; m < MT; ++m)
    #pragma GCC unroll 16
    for (int j = 0; j < NT; ++j) acc[m][j] = _mm256_setzero_ps();
  const int64_t K16 = K / 16 * 16;
  for (int64_t k = 0; k < K16; k += 16) {
    __m256 w[NT];
    #pragma GCC unroll 16
    for (int j = 0; j < NT; ++j) w[j] = rows.template get<0>(n0 + j, k);
    #pragma GCC unroll 16
    for (int m = 0; m < MT; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * ldx + k);
      #pragma GCC unroll 16
      for (int j = 0; j < NT; ++j) acc[m][j] = _mm256_fmadd_ps(xv, w[j], acc[m][j]);
    }
    #pragma GCC unroll 16
    for (int j = 0; j < NT; ++j) w[j] = rows.template get<1>(n0 + j, k);
    #pragma GCC unroll 16
    for (int m = 0; m < MT; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * ldx + k + 8);
      #pragma GCC unroll 16
      for (int j = 0; j < NT; ++j) acc[m][j] = _mm256_fmadd_ps(xv, w[j], acc[m][j]);
    }
  }
  #pragma GCC unroll 16
  for (int m = 0; m < MT; ++m)
    #pragma GCC unroll 16
    for (int j = 0; j < NT; ++j) {
      float s = hsum(acc[m][j]);
      for (int64_t k = K16; k < K; ++k) s += x[m * ldx + k] * rows.at(n0 + j, k);
      y[m * ldy + n0 + j] = col_scale ? s * col_scale[n0 + j] : s;
    }
}

// Calls tile.template operator()<mt, nt>(m, n) over rows [0, M) of x and weight rows [n0, n1): MT x NT
// tiles, with 1..MT-1 row and 1-column tiles at the edges (compile-time sizes keep accumulators in registers).
template <int MT, int NT, class Tile>
void for_tiles(int64_t M, int64_t n0, int64_t n1, const Tile& tile) {
  for (int64_t m = 0; m < M; m += MT) {
    const int64_t mt = std::min<int64_t>(MT, M - m);
    for (int64_t n = n0; n < n1;) {
      const bool full = n + NT <= n1;
      auto call = [&]<int R>() { full ? tile.template operator()<R, NT>(m, n) : tile.template operator()<R, 1>(m, n); };
      switch (mt) {
        case 1: call.template operator()<1>(); break;
        case 2: if constexpr (MT >= 2) call.template operator()<2>(); break;
        case 3: if constexpr (MT >= 3) call.template operator()<3>(); break;
        default: if constexpr (MT >= 4) call.template operator()<4>(); break;
      }
      n += full ? NT : 1;
    }
  }
}

// Weight rows [n0, n1) of `rows` against every row of x [M, K] into y [M, N].
template <int MT, int NT, class Rows>
void rows_block(const float* x, int64_t M, int64_t K, const Rows& rows, int64_t n0, int64_t n1, float* y,
                int64_t N, const float* col_scale) {
  for_tiles<MT, NT>(M, n0, n1, [&]<int R, int C>(int64_t m, int64_t n) {
    dot_tile<R, C>(x + m * K, K, K, rows, n, y + m * N, N, col_scale);
  });
}

// Small-M w4: per group, the dot product of x_perm with the raw codes, times the group's scale; the offsets
// enter through the group sums of x (sum_k x_k (q_k s + o) = s sum_k x_k q_k + o sum_k x_k), so a code costs
// a mask or shift, a conversion and one FMA. xsum [M, G].
template <int NT>
inline void w4_small_tile(const float* x, const float* xsum, const W4Rows& r, int64_t n0, float* y) {
  __m256 acc[NT];
  float off[NT];
  #pragma GCC unroll 16
  for (int j = 0; j < NT; ++j) acc[j] = _mm256_setzero_ps(), off[j] = 0.f;
  const __m256i mask = _mm256_set1_epi32(15);
  for (int64_t gi = 0; gi < r.G; ++gi) {
    __m256 accg[NT];
    #pragma GCC unroll 16
    for (int j = 0; j < NT; ++j) accg[j] = _mm256_setzero_ps();
    for (int64_t k = gi * r.g; k < (gi + 1) * r.g; k += 16) {
      const __m256 xlo = _mm256_loadu_ps(x + k), xhi = _mm256_loadu_ps(x + k + 8);
      #pragma GCC unroll 16
      for (int j = 0; j < NT; ++j) {
        const __m256i v = _mm256_cvtepu8_epi32(load8(r.q + ((n0 + j) * r.Kp + k) / 2));
        accg[j] = _mm256_fmadd_ps(xlo, _mm256_cvtepi32_ps(_mm256_and_si256(v, mask)), accg[j]);
        accg[j] = _mm256_fmadd_ps(xhi, _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), accg[j]);
      }
    }
    #pragma GCC unroll 16
    for (int j = 0; j < NT; ++j) {
      const int64_t idx = (n0 + j) * r.G + gi;
      acc[j] = _mm256_fmadd_ps(accg[j], _mm256_broadcast_ss(r.scales + idx), acc[j]);
      off[j] += r.offsets[idx] * xsum[gi];
    }
  }
  #pragma GCC unroll 16
  for (int j = 0; j < NT; ++j) y[n0 + j] = hsum(acc[j]) + off[j];
}

void w4_small(const float* x, int64_t M, const W4Rows& r, int64_t n0, int64_t n1, float* y, int64_t N) {
  std::vector<float> xsum(M * r.G, 0.f);  // [M, G]
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < r.Kp; ++k) xsum[m * r.G + k / r.g] += x[m * r.Kp + k];
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = n0; n < n1;) {
      const bool full = n + 4 <= n1;
      full ? w4_small_tile<4>(x + m * r.Kp, xsum.data() + m * r.G, r, n, y + m * N)
           : w4_small_tile<1>(x + m * r.Kp, xsum.data() + m * r.G, r, n, y + m * N);
      n += full ? 4 : 1;
    }
}

// 8 rows of 8 floats (src, row stride lds) transposed into dst (row stride ldd).
inline void transpose8(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m256 r[8], t[8];
  #pragma GCC unroll 16
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * lds);
  #pragma GCC unroll 16
  for (int i = 0; i < 8; i += 2) t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]), t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  #pragma GCC unroll 16
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44), r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xee);
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44), r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xee);
  }
  #pragma GCC unroll 16
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dst + i * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}

// y[i, 0:cols] = (x[i, :K] . panel) * scale for R rows of x: the panel holds 16 expanded weight rows
// transposed, [K][16], so each k is two vector loads and R broadcasts of x feed 2R FMAs (no horizontal sums).
template <int R>
inline void panel_tile(const float* x, int64_t K, const float* pan, const float* scale, float* y, int64_t ldy,
                       int64_t cols) {
  __m256 acc[R][2];
  #pragma GCC unroll 16
  for (int i = 0; i < R; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m256 w0 = _mm256_loadu_ps(pan + k * 16), w1 = _mm256_loadu_ps(pan + k * 16 + 8);
    #pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
      const __m256 xb = _mm256_broadcast_ss(x + i * K + k);
      acc[i][0] = _mm256_fmadd_ps(xb, w0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(xb, w1, acc[i][1]);
    }
  }
  const __m256 s0 = _mm256_loadu_ps(scale), s1 = _mm256_loadu_ps(scale + 8);
  #pragma GCC unroll 16
  for (int i = 0; i < R; ++i) {
    alignas(32) float out[16];
    _mm256_store_ps(out, _mm256_mul_ps(acc[i][0], s0));
    _mm256_store_ps(out + 8, _mm256_mul_ps(acc[i][1], s1));
    for (int64_t c = 0; c < cols; ++c) y[i * ldy + c] = out[c];
  }
}

// y [M, N] = x [M, K] W^T for weight rows given by `rows`. Small M: codes expanded in registers. Larger M:
// 16 rows at a time expanded (`expand(n, dst)` writes row n's K floats) and transposed into a panel that
// every row of x then reuses, six rows of x at a time.
template <class Rows, class Expand>
void quant_matmul(const float* x, int64_t M, int64_t K, int64_t N, const Rows& rows, const Expand& expand, float* y,
                  const float* col_scale) {
  const int64_t blocks = (N + kBufRows - 1) / kBufRows;
  const int64_t grain = std::max<int64_t>(1, (1 << 17) / std::max<int64_t>(1, kBufRows * K * M));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    const int64_t n0 = b0 * kBufRows, n1 = std::min(N, b1 * kBufRows);
    if (M <= kSmallM) {
      if constexpr (std::is_same_v<Rows, W4Rows>) {
        w4_small(x, M, rows, n0, n1, y, N);
      } else {
        rows_block<2, 4>(x, M, K, rows, n0, n1, y, N, col_scale);
      }
      return;
    }
    const int64_t Kr = (K + 7) / 8 * 8;
    std::vector<float> rowbuf(kBufRows * Kr, 0.f), pan(Kr * kBufRows);  // [16, Kr] and [Kr, 16]
    alignas(32) float scale[kBufRows];
    for (int64_t n = n0; n < n1; n += kBufRows) {
      const int64_t r = std::min(kBufRows, n1 - n);
      for (int64_t j = 0; j < kBufRows; ++j) {
        if (j < r) expand(n + j, rowbuf.data() + j * Kr);  // columns K..Kr stay 0
        else std::fill_n(rowbuf.data() + j * Kr, K, 0.f);
        scale[j] = col_scale && j < r ? col_scale[n + j] : 1.f;
      }
      for (int64_t j = 0; j < kBufRows; j += 8)
        for (int64_t k = 0; k < Kr; k += 8) transpose8(rowbuf.data() + j * Kr + k, Kr, pan.data() + k * kBufRows + j, kBufRows);
      const int64_t tiles = (M + 5) / 6;  // rows of x split evenly: 32 as 4 x 5 + 2 x 6, not 5 x 6 + 2
      for (int64_t t = 0, m = 0; t < tiles; ++t) {
        const int64_t rows_here = (M - m) / (tiles - t);
        const float* xm = x + m * K;
        float* ym = y + m * N + n;
        m += rows_here;
        switch (rows_here) {
          case 1: panel_tile<1>(xm, K, pan.data(), scale, ym, N, r); break;
          case 2: panel_tile<2>(xm, K, pan.data(), scale, ym, N, r); break;
          case 3: panel_tile<3>(xm, K, pan.data(), scale, ym, N, r); break;
          case 4: panel_tile<4>(xm, K, pan.data(), scale, ym, N, r); break;
          case 5: panel_tile<5>(xm, K, pan.data(), scale, ym, N, r); break;
          default: panel_tile<6>(xm, K, pan.data(), scale, ym, N, r); break;
        }
      }
    }
  });
}

// x [M, K] -> x_perm [M, Kp]: within each 16 columns the even ones, then the odd ones; zero past K.
at::Tensor permute_for_w4(const at::Tensor& x, int64_t Kp) {
  const int64_t M = x.size(0), K = x.size(1);
  auto out = at::zeros({M, Kp}, x.options());
  const float* src = x.const_data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t k = 0; k < K; ++k) dst[m * Kp + (k & ~15) + (k & 1) * 8 + (k & 15) / 2] = src[m * K + k];
  });
  return out;
}
#endif

void check_avx2() {
#ifndef PUYU_CPU_AVX2
  TORCH_CHECK(false, "quantized linears: this build has no AVX2 kernels (use the PyTorch reference)");
#endif
}

}  // namespace

at::Tensor w8_linear_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales) {
  check_avx2();
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0);
  auto y = at::empty({M, N}, x.options());
#ifdef PUYU_CPU_AVX2
  const int8_t* q = qweight.const_data_ptr<int8_t>();
  const W8Rows rows{q, K};
  quant_matmul(x.const_data_ptr<float>(), M, K, N, rows,
               [&](int64_t n, float* dst) {
                 int64_t k = 0;
                 for (; k + 16 <= K; k += 16) {
                   _mm256_storeu_ps(dst + k, rows.get<0>(n, k));
                   _mm256_storeu_ps(dst + k + 8, rows.get<1>(n, k));
                 }
                 for (; k < K; ++k) dst[k] = q[n * K + k];
               },
               y.data_ptr<float>(), scales.const_data_ptr<float>());
#endif
  return y;
}

at::Tensor w4_linear_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                         const at::Tensor& offsets) {
  check_avx2();
  const int64_t M = x.size(0), N = qweight.size(0), Kp = qweight.size(1) * 2, G = scales.size(1);
  auto y = at::empty({M, N}, x.options());
#ifdef PUYU_CPU_AVX2
  const at::Tensor xp = permute_for_w4(x, Kp);
  const W4Rows rows{qweight.const_data_ptr<uint8_t>(), scales.const_data_ptr<float>(),
                    offsets.const_data_ptr<float>(), Kp, G, Kp / G};
  quant_matmul(xp.const_data_ptr<float>(), M, Kp, N, rows,
               [&](int64_t n, float* dst) {  // one group's scale and offset for its g codes
                 const __m256i mask = _mm256_set1_epi32(15);
                 for (int64_t gi = 0; gi < G; ++gi) {
                   const __m256 s = _mm256_set1_ps(rows.scales[n * G + gi]), o = _mm256_set1_ps(rows.offsets[n * G + gi]);
                   for (int64_t k = gi * rows.g; k < (gi + 1) * rows.g; k += 16) {
                     const __m256i v = _mm256_cvtepu8_epi32(load8(rows.q + (n * Kp + k) / 2));
                     _mm256_storeu_ps(dst + k, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, mask)), s, o));
                     _mm256_storeu_ps(dst + k + 8, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), s, o));
                   }
                 }
               },
               y.data_ptr<float>(), nullptr);
#endif
  return y;
}

at::Tensor w8a8_linear_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales) {
  check_avx2();
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0);
  auto y = at::empty({M, N}, x.options());
#ifdef PUYU_CPU_AVX2
  const int64_t K16 = K / 16 * 16;
  std::vector<int16_t> xq(M * K);  // [M, K] codes in -127..127
  std::vector<float> xs(M);  // [M] per-row scales
  const float* xp = x.const_data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    float amax = 0.f;
    for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::abs(xp[m * K + k]));
    xs[m] = amax > 0.f ? amax / 127.f : 1.f;
    for (int64_t k = 0; k < K; ++k) xq[m * K + k] = static_cast<int16_t>(std::nearbyint(xp[m * K + k] / xs[m]));
  }
  const int8_t* q = qweight.const_data_ptr<int8_t>();
  const float* sw = scales.const_data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t blocks = (N + kBufRows - 1) / kBufRows;
  const int64_t grain = std::max<int64_t>(1, (1 << 17) / std::max<int64_t>(1, kBufRows * K * M));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    for_tiles<4, 2>(M, b0 * kBufRows, std::min(N, b1 * kBufRows), [&]<int R, int C>(int64_t m, int64_t n) {
      __m256i acc[R][C];
      #pragma GCC unroll 16
      for (int i = 0; i < R; ++i)
        #pragma GCC unroll 16
        for (int j = 0; j < C; ++j) acc[i][j] = _mm256_setzero_si256();
      for (int64_t k = 0; k < K16; k += 16) {
        __m256i w[C];
        #pragma GCC unroll 16
        for (int j = 0; j < C; ++j)
          w[j] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + (n + j) * K + k)));
        #pragma GCC unroll 16
        for (int i = 0; i < R; ++i) {
          const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq.data() + (m + i) * K + k));
          #pragma GCC unroll 16
          for (int j = 0; j < C; ++j) acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(xv, w[j]));
        }
      }
      #pragma GCC unroll 16
      for (int i = 0; i < R; ++i)
        #pragma GCC unroll 16
        for (int j = 0; j < C; ++j) {
          int32_t d = hsum(acc[i][j]);
          for (int64_t k = K16; k < K; ++k) d += xq[(m + i) * K + k] * q[(n + j) * K + k];
          yp[(m + i) * N + n + j] = static_cast<float>(d) * xs[m + i] * sw[n + j];
        }
    });
  });
#endif
  return y;
}

}  // namespace puyu
