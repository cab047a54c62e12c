// RoPE on CPU for q and k together: each (batch, position) row loads its cos/sin once and rotates all
// query and key heads with them, writing fresh outputs (no rotate_half/cat temporaries). The inverse
// rotation (angle -> -angle) is the backward, since the rotation is orthogonal.
//
// The rotation of one row (cpu::rotate_row) is shared with serving's rope_cache_write
// (csrc/serving/rope_cache_write.cpp), so both rotate bit for bit alike.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include "../fused_ops.h"
#include "common.h"

namespace puyu {

std::tuple<at::Tensor, at::Tensor> rope_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                            const at::Tensor& sin, bool inverse) {
  const int64_t rows = q.size(0) * q.size(1), hq = q.size(2), hk = k.size(2), half = q.size(3) / 2;
  auto q_out = at::empty_like(q);
  auto k_out = at::empty_like(k);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "rope_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* qp = q.const_data_ptr<scalar_t>();
    const scalar_t* kp = k.const_data_ptr<scalar_t>();
    scalar_t* qo = q_out.data_ptr<scalar_t>();
    scalar_t* ko = k_out.data_ptr<scalar_t>();
    const acc_t* cp = cos.const_data_ptr<acc_t>();
    const acc_t* sp = sin.const_data_ptr<acc_t>();
    const acc_t sign = inverse ? acc_t(-1) : acc_t(1);
    at::parallel_for(0, rows, cpu::row_grain((hq + hk) * 2 * half), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const acc_t* c = cp + r * half;
        const acc_t* s = sp + r * half;
        cpu::rotate_row(qp + r * hq * 2 * half, qo + r * hq * 2 * half, c, s, hq, half, sign);
        cpu::rotate_row(kp + r * hk * 2 * half, ko + r * hk * 2 * half, c, s, hk, half, sign);
      }
    });
  });
  return {q_out, k_out};
}

}  // namespace puyu
