// RoPE on CPU for q and k together: each (batch, position) row loads its cos/sin once and rotates all
// query and key heads with them, writing fresh outputs (no rotate_half/cat temporaries). The inverse
// rotation (angle -> -angle) is the backward, since the rotation is orthogonal.
//
// rope_cache_write_cpu is the serving runtime's variant: it reads q, k and v straight out of the packed
// QKV projection rows, writes the rotated query heads to a fresh [N, Hq, d] tensor and the rotated keys
// and the values straight into their slots of a paged KV cache layer. It replaces a split, two contiguous
// copies, the RoPE pass and two index_copy_ calls (with their transposes) per layer and step.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include "../fused_ops.h"
#include "common.h"

#include <algorithm>
#include <vector>

namespace puyu {
namespace {

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

// Copies `n_heads` heads of d = 2 * half values from one row to their rows `dst + h * head_stride`.
template <typename scalar_t>
inline void scatter_heads(const scalar_t* x, scalar_t* dst, int64_t n_heads, int64_t half, int64_t head_stride) {
  for (int64_t h = 0; h < n_heads; ++h) std::copy_n(x + h * 2 * half, 2 * half, dst + h * head_stride);
}

}  // namespace

at::Tensor rope_cache_write_cpu(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                                at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slots, int64_t n_heads) {
  const int64_t N = qkv.size(0), hk = k_cache.size(0), d = k_cache.size(3), half = d / 2;
  const int64_t n_slots = k_cache.size(1) * k_cache.size(2);  // per kv head: num_blocks * block_size
  const int64_t* sl = slots.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < N; ++r)  // checked before any thread writes through them
    TORCH_CHECK(sl[r] >= 0 && sl[r] < n_slots, "rope_cache_write: slots[", r, "] = ", sl[r],
                " is outside the cache's [0, num_blocks * block_size = ", n_slots, ")");
  auto q_out = at::empty({N, n_heads, d}, qkv.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "rope_cache_write_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = qkv.const_data_ptr<scalar_t>();
    scalar_t* qo = q_out.data_ptr<scalar_t>();
    scalar_t* kc = k_cache.data_ptr<scalar_t>();
    scalar_t* vc = v_cache.data_ptr<scalar_t>();
    const acc_t* cp = cos.const_data_ptr<acc_t>();
    const acc_t* sp = sin.const_data_ptr<acc_t>();
    const int64_t row = (n_heads + 2 * hk) * d;  // q | k | v
    at::parallel_for(0, N, cpu::row_grain(row), [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> k_rot(hk * d);
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* xr = x + r * row;
        const acc_t* c = cp + r * half;
        const acc_t* s = sp + r * half;
        rotate_row(xr, qo + r * n_heads * d, c, s, n_heads, half, acc_t(1));
        rotate_row(xr + n_heads * d, k_rot.data(), c, s, hk, half, acc_t(1));
        scatter_heads(k_rot.data(), kc + sl[r] * d, hk, half, n_slots * d);
        scatter_heads(xr + (n_heads + hk) * d, vc + sl[r] * d, hk, half, n_slots * d);
      }
    });
  });
  return q_out;
}

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
        rotate_row(qp + r * hq * 2 * half, qo + r * hq * 2 * half, c, s, hq, half, sign);
        rotate_row(kp + r * hk * 2 * half, ko + r * hk * 2 * half, c, s, hk, half, sign);
      }
    });
  });
  return {q_out, k_out};
}

}  // namespace puyu
