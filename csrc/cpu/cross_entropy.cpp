// Cross-entropy of one chunk of logits on CPU. Per row: a max pass, a sum-of-exp pass, and (when the
// gradient is wanted) a pass that overwrites the logits with grad_scale * (softmax - onehot). The chunk
// never gets an fp32 copy, a log-softmax tensor or a separate gradient tensor: the caller reuses the
// logits buffer for the gradient matmuls. exp is the vectorisable cpu::vexp.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <limits>
#include <type_traits>

#include "../fused_ops.h"
#include "common.h"

namespace puyu {
namespace {

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void ce_chunk_kernel(scalar_t* lp, const int64_t* tp, acc_t* loss, int64_t C, int64_t V, int64_t ignore_index,
                     acc_t scale, bool with_grad) {
  at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      scalar_t* x = lp + i * V;
      const int64_t t = tp[i];
      if (t == ignore_index) {
        loss[i] = 0;
        if (with_grad) std::fill(x, x + V, scalar_t(0));
        continue;
      }
      TORCH_CHECK(t >= 0 && t < V, "cross-entropy target ", t, " out of range [0, ", V, ")");
      acc_t m = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(max : m)
      for (int64_t j = 0; j < V; ++j) m = std::max(m, static_cast<acc_t>(x[j]));
      const acc_t x_target = static_cast<acc_t>(x[t]);
      acc_t s = 0;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        // Full-precision logits: keep exp(x - m) in place, so the gradient pass is a multiply.
        if (with_grad) {
#pragma omp simd reduction(+ : s)
          for (int64_t j = 0; j < V; ++j) {
            x[j] = cpu::vexp(x[j] - m);
            s += x[j];
          }
          const acc_t factor = scale / s;
#pragma omp simd
          for (int64_t j = 0; j < V; ++j) x[j] *= factor;
          x[t] -= scale;
          loss[i] = m + std::log(s) - x_target;
          continue;
        }
      }
#pragma omp simd reduction(+ : s)
      for (int64_t j = 0; j < V; ++j) s += cpu::vexp(static_cast<acc_t>(x[j]) - m);
      const acc_t lse = m + std::log(s);
      loss[i] = lse - x_target;
      if (!with_grad) continue;
      // Low-precision logits: recompute exp from the unrounded logits rather than store it rounded.
      const acc_t p_target = cpu::vexp(x_target - lse);
#pragma omp simd
      for (int64_t j = 0; j < V; ++j) x[j] = static_cast<scalar_t>(cpu::vexp(static_cast<acc_t>(x[j]) - lse) * scale);
      x[t] = static_cast<scalar_t>((p_target - acc_t(1)) * scale);
    }
  });
}

}  // namespace

at::Tensor ce_chunk_cpu(at::Tensor& logits, const at::Tensor& target, int64_t ignore_index, double grad_scale,
                        bool with_grad) {
  auto loss = at::empty({logits.size(0)}, logits.options().dtype(at::toOpMathType(logits.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "ce_chunk_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ce_chunk_kernel<scalar_t>(logits.data_ptr<scalar_t>(), target.const_data_ptr<int64_t>(), loss.data_ptr<acc_t>(),
                              logits.size(0), logits.size(1), ignore_index, static_cast<acc_t>(grad_scale), with_grad);
  });
  return loss;
}

}  // namespace puyu
