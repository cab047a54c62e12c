// RMSNorm on CUDA: one block per row for the forward and for dx (sum of squares / dot product reduced
// across the block), and a column-tiled kernel for dweight that reduces over rows with one fp32
// atomicAdd per (column, row slice).
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>

#include "../fused_ops.h"
#include "common.cuh"

namespace puyu {
namespace {

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__global__ void rms_norm_fwd_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ w,
                                    scalar_t* __restrict__ y, acc_t* __restrict__ rstd, int64_t N, acc_t eps) {
  __shared__ acc_t shared[32];
  const int64_t row = blockIdx.x;
  const scalar_t* xr = x + row * N;
  acc_t ss = 0;
  for (int64_t j = threadIdx.x; j < N; j += blockDim.x) ss += static_cast<acc_t>(xr[j]) * static_cast<acc_t>(xr[j]);
  ss = cuda::block_reduce(ss, cuda::Sum{}, acc_t(0), shared);
  const acc_t r = rsqrt(ss / static_cast<acc_t>(N) + eps);
  if (threadIdx.x == 0) rstd[row] = r;
  for (int64_t j = threadIdx.x; j < N; j += blockDim.x)
    y[row * N + j] = static_cast<scalar_t>(static_cast<acc_t>(xr[j]) * r * static_cast<acc_t>(w[j]));
}

// dx = r * (dy*w - x * r^2 * mean(dy*w*x))
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__global__ void rms_norm_bwd_dx_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                       const scalar_t* __restrict__ w, const acc_t* __restrict__ rstd,
                                       scalar_t* __restrict__ dx, int64_t N) {
  __shared__ acc_t shared[32];
  const int64_t off = static_cast<int64_t>(blockIdx.x) * N;
  const acc_t r = rstd[blockIdx.x];
  acc_t dot = 0;
  for (int64_t j = threadIdx.x; j < N; j += blockDim.x)
    dot += static_cast<acc_t>(dy[off + j]) * static_cast<acc_t>(w[j]) * static_cast<acc_t>(x[off + j]);
  dot = cuda::block_reduce(dot, cuda::Sum{}, acc_t(0), shared);
  const acc_t c = dot * r * r / static_cast<acc_t>(N);
  for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
    const acc_t g = static_cast<acc_t>(dy[off + j]) * static_cast<acc_t>(w[j]);
    dx[off + j] = static_cast<scalar_t>(r * (g - static_cast<acc_t>(x[off + j]) * c));
  }
}

// dw[j] = sum_i dy[i, j] * x[i, j] * rstd[i]; blockIdx.x tiles columns, blockIdx.y slices rows.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__global__ void rms_norm_bwd_dw_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                       const acc_t* __restrict__ rstd, acc_t* __restrict__ dw, int64_t M,
                                       int64_t N) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= N) return;
  acc_t acc = 0;
  for (int64_t i = blockIdx.y; i < M; i += gridDim.y)
    acc += static_cast<acc_t>(dy[i * N + j]) * static_cast<acc_t>(x[i * N + j]) * rstd[i];
  atomicAdd(dw + j, acc);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd_cuda(const at::Tensor& x, const at::Tensor& w, double eps,
                                                     cudaStream_t stream) {
  const int64_t M = x.size(0), N = x.size(1);
  auto y = at::empty_like(x);
  auto rstd = at::empty({M}, x.options().dtype(at::toOpMathType(x.scalar_type())));
  const auto wc = w.to(x.scalar_type()).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (M > 0)
      rms_norm_fwd_kernel<scalar_t><<<M, cuda::kBlock, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), wc.const_data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), rstd.data_ptr<acc_t>(),
          N, static_cast<acc_t>(eps));
  });
  cuda::check_launch();
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_cuda(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w,
                                                     const at::Tensor& rstd, cudaStream_t stream) {
  const int64_t M = x.size(0), N = x.size(1);
  auto dx = at::empty_like(x);
  auto dw = at::zeros({N}, rstd.options());  // fp32 (fp64) accumulator
  const auto wc = w.to(x.scalar_type()).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (M > 0) {
      rms_norm_bwd_dx_kernel<scalar_t><<<M, cuda::kBlock, 0, stream>>>(
          dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), wc.const_data_ptr<scalar_t>(),
          rstd.const_data_ptr<acc_t>(), dx.data_ptr<scalar_t>(), N);
      const dim3 grid((N + cuda::kBlock - 1) / cuda::kBlock, static_cast<unsigned int>(M < 64 ? M : 64));
      rms_norm_bwd_dw_kernel<scalar_t><<<grid, cuda::kBlock, 0, stream>>>(
          dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), rstd.const_data_ptr<acc_t>(),
          dw.data_ptr<acc_t>(), M, N);
    }
  });
  cuda::check_launch();
  return {dx, dw.to(w.scalar_type())};
}

}  // namespace puyu
