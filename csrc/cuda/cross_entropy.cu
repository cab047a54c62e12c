// Cross-entropy of one chunk of logits on CUDA: one block per row reduces the max and the sum of exp,
// writes the row's loss and, when the gradient is wanted, overwrites the logits in place with
// grad_scale * (softmax - onehot). Ignored rows get loss 0 and a zero gradient.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>

#include "../fused_ops.h"
#include "common.cuh"

namespace puyu {
namespace {

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__global__ void ce_chunk_kernel(scalar_t* __restrict__ logits, const int64_t* __restrict__ target,
                                acc_t* __restrict__ loss, int64_t V, int64_t ignore_index, acc_t scale,
                                bool with_grad) {
  __shared__ acc_t shared[32];
  scalar_t* x = logits + static_cast<int64_t>(blockIdx.x) * V;
  const int64_t t = target[blockIdx.x];
  if (t == ignore_index) {
    if (threadIdx.x == 0) loss[blockIdx.x] = 0;
    if (with_grad)
      for (int64_t j = threadIdx.x; j < V; j += blockDim.x) x[j] = scalar_t(0);
    return;
  }
  CUDA_KERNEL_ASSERT(t >= 0 && t < V);
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) m = max(m, static_cast<acc_t>(x[j]));
  m = cuda::block_reduce(m, cuda::Max{}, -std::numeric_limits<acc_t>::infinity(), shared);
  acc_t s = 0;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) s += exp(static_cast<acc_t>(x[j]) - m);
  s = cuda::block_reduce(s, cuda::Sum{}, acc_t(0), shared);
  const acc_t lse = m + log(s);
  const acc_t x_target = static_cast<acc_t>(x[t]);
  if (threadIdx.x == 0) loss[blockIdx.x] = lse - x_target;
  if (!with_grad) return;
  __syncthreads();  // every thread has read x[t] before it is overwritten
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
    const acc_t p = exp(static_cast<acc_t>(x[j]) - lse);
    x[j] = static_cast<scalar_t>((j == t ? p - acc_t(1) : p) * scale);
  }
}

}  // namespace

at::Tensor ce_chunk_cuda(at::Tensor& logits, const at::Tensor& target, int64_t ignore_index, double grad_scale,
                         bool with_grad, cudaStream_t stream) {
  const int64_t C = logits.size(0), V = logits.size(1);
  auto loss = at::empty({C}, logits.options().dtype(at::toOpMathType(logits.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "ce_chunk_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (C > 0)
      ce_chunk_kernel<scalar_t><<<C, cuda::kBlock, 0, stream>>>(logits.data_ptr<scalar_t>(),
                                                                target.const_data_ptr<int64_t>(),
                                                                loss.data_ptr<acc_t>(), V, ignore_index,
                                                                static_cast<acc_t>(grad_scale), with_grad);
  });
  cuda::check_launch();
  return loss;
}

}  // namespace puyu
