// Declarations of the serving-only CPU kernels behind puyu.serving._serving_ops (see serving/ops.py and
// serving/qlinear.py for the contracts and the PyTorch references they must match). Inference only: no
// backward, no CUDA kernels (CUDA tensors take the references). Floating-point kernels compute in the
// "opmath" type of their input (fp32 for fp32/bf16/fp16, fp64 for fp64) and round once on the way out.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace puyu {

// qkv [N, (Hq + 2 Hk) d] (q | k | v per row), cos/sin [N, d/2] (opmath), k_cache/v_cache [Hk, num_blocks,
// block_size, d] (one layer, qkv's dtype), slots [N] int64 -> rotated q [N, Hq, d]; rotated k and v are
// written to the cache at slots (csrc/serving/rope_cache_write.cpp)
at::Tensor rope_cache_write_cpu(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                                at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slots, int64_t n_heads);

// q [b, Hq, d], k_cache/v_cache [Hk, num_blocks, block_size, d] (q's dtype, or int8 with fp32 k_scale/v_scale
// [Hk, num_blocks, block_size]), block_tables [b, max_blocks] int64, context_lens [b] int64 -> out [b, Hq, d]
// (csrc/serving/paged_attention.cpp)
at::Tensor paged_decode_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                      const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                                      const std::optional<at::Tensor>& k_scale,
                                      const std::optional<at::Tensor>& v_scale);

// Quantized linears (csrc/serving/quant_linear.cpp; AVX2 builds only), x [M, K] fp32 -> y [M, N] fp32:
// w8: qweight int8 [N, K], scales fp32 [N]; w4: qweight uint8 [N, Kp/2] (low nibble = even k), scales and
// offsets fp32 [N, G] with Kp = G * g, g % 16 == 0 (w = q * scale + offset); w8a8: as w8, x quantized per row
at::Tensor w8_linear_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales);
at::Tensor w4_linear_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                         const at::Tensor& offsets);
at::Tensor w8a8_linear_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales);

// Caching CPU allocator for the serving step loop (csrc/serving/caching_allocator.cpp): enable installs it as
// torch's CPU allocator (false if another allocator with a higher priority is installed), caching at most
// limit_bytes of freed blocks; disable restores the previous allocator once the last user is gone, frees
// the cache, and returns (hits, misses) of the installation's large allocations.
bool caching_allocator_enable(int64_t limit_bytes);
std::tuple<int64_t, int64_t> caching_allocator_disable();

}  // namespace puyu
