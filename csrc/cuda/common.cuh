// Shared device helpers of the CUDA kernels: block-wide reductions over one row per block.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <limits>

namespace puyu::cuda {

constexpr int kBlock = 256;  // threads per block (a multiple of the 32-lane warp)

struct Sum {
  template <typename T>
  __device__ T operator()(T a, T b) const { return a + b; }
};
struct Max {
  template <typename T>
  __device__ T operator()(T a, T b) const { return a > b ? a : b; }
};

// Reduce `val` over the block with `op` (identity `init`); every thread gets the result. `shared`
// holds one slot per warp. Safe to call repeatedly with the same buffer.
template <typename T, typename Op>
__device__ T block_reduce(T val, Op op, T init, T* shared) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, n_warps = blockDim.x / 32;
  for (int offset = 16; offset > 0; offset >>= 1) val = op(val, __shfl_xor_sync(0xffffffff, val, offset));
  __syncthreads();  // the previous call's readers are done with `shared`
  if (lane == 0) shared[warp] = val;
  __syncthreads();
  val = lane < n_warps ? shared[lane] : init;
  for (int offset = 16; offset > 0; offset >>= 1) val = op(val, __shfl_xor_sync(0xffffffff, val, offset));
  return val;
}

inline void check_launch() {
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, "puyu CUDA kernel launch failed: ", cudaGetErrorString(err));
}

inline unsigned int blocks_for(int64_t n, int threads = kBlock) {
  const int64_t b = (n + threads - 1) / threads;
  return static_cast<unsigned int>(b < 65535 * 16 ? (b > 0 ? b : 1) : 65535 * 16);  // grid-stride beyond
}

}  // namespace puyu::cuda
