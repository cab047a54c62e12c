// RMSNorm on CPU: one pass for the sum of squares and one for the output, per row, and a backward that
// recomputes x_hat from the saved rstd instead of storing it. The weight gradient is reduced per thread
// into its own buffer, then summed, so no atomics and a deterministic result for a fixed thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include "../fused_ops.h"
#include "common.h"

namespace puyu {
namespace {

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void rms_norm_fwd_kernel(const scalar_t* xp, const scalar_t* wp, scalar_t* yp, acc_t* rp, int64_t M, int64_t N,
                         acc_t eps) {
  at::parallel_for(0, M, cpu::row_grain(N), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* xr = xp + i * N;
      scalar_t* yr = yp + i * N;
      acc_t ss = 0;
#pragma omp simd reduction(+ : ss)
      for (int64_t j = 0; j < N; ++j) ss += static_cast<acc_t>(xr[j]) * static_cast<acc_t>(xr[j]);
      const acc_t r = acc_t(1) / std::sqrt(ss / static_cast<acc_t>(N) + eps);
      rp[i] = r;
#pragma omp simd
      for (int64_t j = 0; j < N; ++j)
        yr[j] = static_cast<scalar_t>(static_cast<acc_t>(xr[j]) * r * static_cast<acc_t>(wp[j]));
    }
  });
}

// dx = r * (dy*w - x_hat * mean(dy*w*x_hat)) with x_hat = x * r;  dw = sum_rows(dy * x_hat)
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void rms_norm_bwd_kernel(const scalar_t* dyp, const scalar_t* xp, const scalar_t* wp, const acc_t* rp,
                         scalar_t* dxp, acc_t* dw_partial, int64_t M, int64_t N) {
  at::parallel_for(0, M, cpu::row_grain(N), [&](int64_t begin, int64_t end) {
    acc_t* dw_local = dw_partial + at::get_thread_num() * N;
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* xr = xp + i * N;
      const scalar_t* dyr = dyp + i * N;
      scalar_t* dxr = dxp + i * N;
      const acc_t r = rp[i];
      acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
      for (int64_t j = 0; j < N; ++j)
        dot += static_cast<acc_t>(dyr[j]) * static_cast<acc_t>(wp[j]) * static_cast<acc_t>(xr[j]);
      const acc_t c = dot * r * r / static_cast<acc_t>(N);
#pragma omp simd
      for (int64_t j = 0; j < N; ++j) {
        const acc_t xj = static_cast<acc_t>(xr[j]), gj = static_cast<acc_t>(dyr[j]);
        dxr[j] = static_cast<scalar_t>(r * (gj * static_cast<acc_t>(wp[j]) - xj * c));
        dw_local[j] += gj * xj * r;
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd_cpu(const at::Tensor& x, const at::Tensor& w, double eps) {
  const int64_t M = x.size(0), N = x.size(1);
  auto y = at::empty_like(x);
  auto rstd = at::empty({M}, x.options().dtype(at::toOpMathType(x.scalar_type())));
  const auto wc = w.to(x.scalar_type()).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    rms_norm_fwd_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), wc.const_data_ptr<scalar_t>(),
                                  y.data_ptr<scalar_t>(), rstd.data_ptr<acc_t>(), M, N, static_cast<acc_t>(eps));
  });
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w,
                                                    const at::Tensor& rstd) {
  const int64_t M = x.size(0), N = x.size(1);
  auto dx = at::empty_like(x);
  auto dw_partial = at::zeros({at::get_num_threads(), N}, rstd.options());  // [threads, N] opmath
  const auto wc = w.to(x.scalar_type()).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    rms_norm_bwd_kernel<scalar_t>(dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                  wc.const_data_ptr<scalar_t>(), rstd.const_data_ptr<acc_t>(),
                                  dx.data_ptr<scalar_t>(), dw_partial.data_ptr<acc_t>(), M, N);
  });
  return {dx, dw_partial.sum(0).to(w.scalar_type())};
}

}  // namespace puyu
