// RoPE + paged KV cache write on CPU, the serving runtime's variant of csrc/cpu/rope.cpp: it reads q, k
// and v straight out of the packed QKV projection rows, writes the rotated query heads to a fresh
// [N, Hq, d] tensor and the rotated keys and the values straight into their slots of a paged KV cache
// layer. It replaces a split, two contiguous copies, the RoPE pass and two index_copy_ calls (with their
// transposes) per layer and step. The rotation is cpu::rotate_row, the one the training RoPE uses.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <vector>

#include "cpu/common.h"
#include "serving_ops.h"

namespace puyu {
namespace {

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
        cpu::rotate_row(xr, qo + r * n_heads * d, c, s, n_heads, half, acc_t(1));
        cpu::rotate_row(xr + n_heads * d, k_rot.data(), c, s, hk, half, acc_t(1));
        scatter_heads(k_rot.data(), kc + sl[r] * d, hk, half, n_slots * d);
        scatter_heads(xr + (n_heads + hk) * d, vc + sl[r] * d, hk, half, n_slots * d);
      }
    });
  });
  return q_out;
}

}  // namespace puyu
