// SwiGLU on CPU: silu(gate) * up and its backward as single elementwise passes. The reference needs
// separate silu, multiply and (in backward) sigmoid/product kernels, each a full trip through memory.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include "../fused_ops.h"
#include "common.h"

namespace puyu {
namespace {

constexpr int64_t kGrain = 32768;

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void swiglu_fwd_kernel(const scalar_t* gp, const scalar_t* up, scalar_t* op, int64_t n) {
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) {
      const acc_t g = static_cast<acc_t>(gp[i]);
      op[i] = static_cast<scalar_t>(g / (acc_t(1) + cpu::vexp(-g)) * static_cast<acc_t>(up[i]));
    }
  });
}

// d/dg [silu(g) u] = u * sig * (1 + g (1 - sig));  d/du = silu(g)
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void swiglu_bwd_kernel(const scalar_t* dyp, const scalar_t* gp, const scalar_t* up, scalar_t* dgp, scalar_t* dup,
                       int64_t n) {
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) {
      const acc_t g = static_cast<acc_t>(gp[i]), u = static_cast<acc_t>(up[i]), d = static_cast<acc_t>(dyp[i]);
      const acc_t sig = acc_t(1) / (acc_t(1) + cpu::vexp(-g));
      dgp[i] = static_cast<scalar_t>(d * u * sig * (acc_t(1) + g * (acc_t(1) - sig)));
      dup[i] = static_cast<scalar_t>(d * g * sig);
    }
  });
}

}  // namespace

at::Tensor swiglu_fwd_cpu(const at::Tensor& gate, const at::Tensor& up) {
  auto out = at::empty_like(gate);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate.scalar_type(), "swiglu_fwd_cpu", [&] {
    swiglu_fwd_kernel<scalar_t>(gate.const_data_ptr<scalar_t>(), up.const_data_ptr<scalar_t>(),
                                out.data_ptr<scalar_t>(), gate.numel());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> swiglu_bwd_cpu(const at::Tensor& dy, const at::Tensor& gate, const at::Tensor& up) {
  auto dgate = at::empty_like(gate);
  auto dup = at::empty_like(up);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate.scalar_type(), "swiglu_bwd_cpu", [&] {
    swiglu_bwd_kernel<scalar_t>(dy.const_data_ptr<scalar_t>(), gate.const_data_ptr<scalar_t>(),
                                up.const_data_ptr<scalar_t>(), dgate.data_ptr<scalar_t>(), dup.data_ptr<scalar_t>(),
                                gate.numel());
  });
  return {dgate, dup};
}

}  // namespace puyu
