// RoPE on CUDA for q and k in one launch: one thread per rotated pair (x1[j], x2[j]) of a head; the
// first Hq heads of each row come from q, the next Hk from k. inverse=true rotates by -angle (backward).
#include <ATen/Dispatch.h>
#include <ATen/ops/empty_like.h>

#include "../fused_ops.h"
#include "common.cuh"

namespace puyu {
namespace {

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__global__ void rope_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                            const acc_t* __restrict__ cos, const acc_t* __restrict__ sin, scalar_t* __restrict__ q_out,
                            scalar_t* __restrict__ k_out, int64_t rows, int64_t hq, int64_t hk, int64_t half,
                            acc_t sign) {
  const int64_t per_row = (hq + hk) * half;
  const int64_t total = rows * per_row;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = idx / per_row, rem = idx % per_row, head = rem / half, j = rem % half;
    const bool is_q = head < hq;
    const scalar_t* src = is_q ? q + (row * hq + head) * 2 * half : k + (row * hk + head - hq) * 2 * half;
    scalar_t* dst = is_q ? q_out + (row * hq + head) * 2 * half : k_out + (row * hk + head - hq) * 2 * half;
    const acc_t c = cos[row * half + j], s = sign * sin[row * half + j];
    const acc_t a = static_cast<acc_t>(src[j]), b = static_cast<acc_t>(src[j + half]);
    dst[j] = static_cast<scalar_t>(a * c - b * s);
    dst[j + half] = static_cast<scalar_t>(b * c + a * s);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rope_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                             const at::Tensor& sin, bool inverse, cudaStream_t stream) {
  const int64_t rows = q.size(0) * q.size(1), hq = q.size(2), hk = k.size(2), half = q.size(3) / 2;
  auto q_out = at::empty_like(q);
  auto k_out = at::empty_like(k);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "rope_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    rope_kernel<scalar_t><<<cuda::blocks_for(rows * (hq + hk) * half), cuda::kBlock, 0, stream>>>(
        q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), cos.const_data_ptr<acc_t>(),
        sin.const_data_ptr<acc_t>(), q_out.data_ptr<scalar_t>(), k_out.data_ptr<scalar_t>(), rows, hq, hk, half,
        inverse ? acc_t(-1) : acc_t(1));
  });
  cuda::check_launch();
  return {q_out, k_out};
}

}  // namespace puyu
