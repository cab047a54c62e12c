// SwiGLU on CUDA: silu(gate) * up and its backward as single grid-stride elementwise kernels.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty_like.h>

#include "../fused_ops.h"
#include "common.cuh"

namespace puyu {
namespace {

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__global__ void swiglu_fwd_kernel(const scalar_t* __restrict__ gate, const scalar_t* __restrict__ up,
                                  scalar_t* __restrict__ out, int64_t n) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const acc_t g = static_cast<acc_t>(gate[i]);
    out[i] = static_cast<scalar_t>(g / (acc_t(1) + exp(-g)) * static_cast<acc_t>(up[i]));
  }
}

// d/dg [silu(g) u] = u * sig * (1 + g (1 - sig));  d/du = silu(g)
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__global__ void swiglu_bwd_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ gate,
                                  const scalar_t* __restrict__ up, scalar_t* __restrict__ dgate,
                                  scalar_t* __restrict__ dup, int64_t n) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const acc_t g = static_cast<acc_t>(gate[i]), u = static_cast<acc_t>(up[i]), d = static_cast<acc_t>(dy[i]);
    const acc_t sig = acc_t(1) / (acc_t(1) + exp(-g));
    dgate[i] = static_cast<scalar_t>(d * u * sig * (acc_t(1) + g * (acc_t(1) - sig)));
    dup[i] = static_cast<scalar_t>(d * g * sig);
  }
}

}  // namespace

at::Tensor swiglu_fwd_cuda(const at::Tensor& gate, const at::Tensor& up, cudaStream_t stream) {
  auto out = at::empty_like(gate);
  const int64_t n = gate.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate.scalar_type(), "swiglu_fwd_cuda", [&] {
    swiglu_fwd_kernel<scalar_t><<<cuda::blocks_for(n), cuda::kBlock, 0, stream>>>(
        gate.const_data_ptr<scalar_t>(), up.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), n);
  });
  cuda::check_launch();
  return out;
}

std::tuple<at::Tensor, at::Tensor> swiglu_bwd_cuda(const at::Tensor& dy, const at::Tensor& gate, const at::Tensor& up,
                                                   cudaStream_t stream) {
  auto dgate = at::empty_like(gate);
  auto dup = at::empty_like(up);
  const int64_t n = gate.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate.scalar_type(), "swiglu_bwd_cuda", [&] {
    swiglu_bwd_kernel<scalar_t><<<cuda::blocks_for(n), cuda::kBlock, 0, stream>>>(
        dy.const_data_ptr<scalar_t>(), gate.const_data_ptr<scalar_t>(), up.const_data_ptr<scalar_t>(),
        dgate.data_ptr<scalar_t>(), dup.data_ptr<scalar_t>(), n);
  });
  cuda::check_launch();
  return {dgate, dup};
}

}  // namespace puyu
