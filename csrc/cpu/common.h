// Shared helpers of the CPU kernels, training's (csrc/cpu, puyu.model._fused_ops) and serving's
// (csrc/serving, puyu.serving._serving_ops, which includes this file as "cpu/common.h"): loops are
// written over contiguous rows with opmath accumulators and `#pragma omp simd`, so the compiler
// vectorises them; rows are split over threads with at::parallel_for (OpenMP in torch's CPU builds,
// the same pool torch's own kernels use).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <string>

namespace puyu::cpu {

// The vector ISA the CPU kernels were compiled for (both extensions report it as cpu_isa()): running an
// AVX2 build on an older CPU would crash, and the quantized linears exist only in AVX2 builds.
inline std::string isa_name() {
#ifdef PUYU_CPU_AVX2
  return "avx2";
#else
  return "baseline";
#endif
}

// Rows handed to one thread at a time: enough elements to amortise the scheduling.
inline int64_t row_grain(int64_t row_len) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(row_len, 1));
}

// exp(x) for fp32 that GCC vectorises inside `omp simd` loops (std::exp is a scalar libm call there):
// Cody-Waite range reduction x = n ln2 + r, |r| <= ln2/2, and a degree-6 polynomial for e^r (rel. error
// ~1e-7), scaled by 2^n through the exponent bits. Inputs below -87.3 flush to 0, above 88.7 saturate.
inline float vexp(float x) {
  x = x < -87.3f ? -87.3f : (x > 88.7f ? 88.7f : x);  // ternaries vectorise; fmin/fmax keep NaN rules
  // Round to nearest by adding and subtracting 1.5 * 2^23 (vectorises on plain SSE2, nearbyint does not).
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // __builtin_bit_cast, not std::bit_cast: torch builds before 2.13 compile extensions as C++17.
  return p * __builtin_bit_cast(float, (static_cast<int32_t>(n) + 127) << 23);
}

inline double vexp(double x) { return std::exp(x); }

// The bindings' first check of a tensor argument: the kernels index contiguous floating-point rows.
inline void check_input(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.is_floating_point(), name, " must be a floating-point tensor, got ", t.scalar_type());
}

// Rotates `n_heads` heads of one row: out = [x1 c - x2 s, x2 c + x1 s] with s negated when inverse.
template <typename scalar_t, typename acc_t>
inline void rotate_row(const scalar_t* x, scalar_t* out, const acc_t* c, const acc_t* s, int64_t n_heads,
                       int64_t half, acc_t sign) {
  for (int64_t h = 0; h < n_heads; ++h) {
    const scalar_t* x1 = x + h * 2 * half;
    const scalar_t* x2 = x1 + half;
    scalar_t* o1 = out + h * 2 * half;
    scalar_t* o2 = o1 + half;
#pragma omp simd
    for (int64_t j = 0; j < half; ++j) {
      const acc_t a = static_cast<acc_t>(x1[j]), b = static_cast<acc_t>(x2[j]), sj = sign * s[j];
      o1[j] = static_cast<scalar_t>(a * c[j] - b * sj);
      o2[j] = static_cast<scalar_t>(b * c[j] + a * sj);
    }
  }
}

}  // namespace puyu::cpu
