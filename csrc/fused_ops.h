// Declarations of the fused kernels behind puyu.model._fused_ops (see model/ops.py for the contracts
// and the PyTorch references they must match). Every kernel computes in the "opmath" type of its input
// (fp32 for fp32/bf16/fp16, fp64 for fp64) and rounds once on the way out.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#ifdef WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace puyu {

// ---- CPU (csrc/cpu) --------------------------------------------------------------------------------
// x [M, N], w [N] -> y [M, N], rstd [M] (opmath)
std::tuple<at::Tensor, at::Tensor> rms_norm_fwd_cpu(const at::Tensor& x, const at::Tensor& w, double eps);
// dy, x [M, N], w [N], rstd [M] -> dx [M, N], dw [N]
std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_cpu(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w, const at::Tensor& rstd);
// q [B, T, Hq, d], k [B, T, Hk, d], cos/sin [B, T, d/2] (opmath) -> rotated q, k (inverse: by -angle)
std::tuple<at::Tensor, at::Tensor> rope_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin, bool inverse);
// qkv [N, (Hq + 2 Hk) d] (q | k | v per row), cos/sin [N, d/2] (opmath), k_cache/v_cache [Hk, num_blocks,
// block_size, d] (one layer, qkv's dtype), slots [N] int64 -> rotated q [N, Hq, d]; rotated k and v are
// written to the cache at slots (inference only)
at::Tensor rope_cache_write_cpu(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                                at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slots, int64_t n_heads);
// gate, up [*] -> silu(gate) * up
at::Tensor swiglu_fwd_cpu(const at::Tensor& gate, const at::Tensor& up);
// dy, gate, up [*] -> dgate, dup
std::tuple<at::Tensor, at::Tensor> swiglu_bwd_cpu(const at::Tensor& dy, const at::Tensor& gate, const at::Tensor& up);
// logits [C, V] (overwritten with grad_scale * (softmax - onehot) when with_grad), target [C] int64
// -> per-row loss [C] (opmath), 0 where target == ignore_index
at::Tensor ce_chunk_cpu(at::Tensor& logits, const at::Tensor& target, int64_t ignore_index, double grad_scale,
                        bool with_grad);
// q [b, Hq, d], k_cache/v_cache [Hk, num_blocks, block_size, d] (q's dtype, or int8 with fp32 k_scale/v_scale
// [Hk, num_blocks, block_size]), block_tables [b, max_blocks] int64, context_lens [b] int64 -> out [b, Hq, d]
// (inference only; no CUDA kernel)
at::Tensor paged_decode_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                      const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                                      const std::optional<at::Tensor>& k_scale,
                                      const std::optional<at::Tensor>& v_scale);

// Quantized linears (csrc/cpu/quant_linear.cpp; AVX2 builds only), x [M, K] fp32 -> y [M, N] fp32:
// w8: qweight int8 [N, K], scales fp32 [N]; w4: qweight uint8 [N, Kp/2] (low nibble = even k), scales and
// offsets fp32 [N, G] with Kp = G * g, g % 16 == 0 (w = q * scale + offset); w8a8: as w8, x quantized per row
at::Tensor w8_linear_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales);
at::Tensor w4_linear_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                         const at::Tensor& offsets);
at::Tensor w8a8_linear_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales);

// Caching CPU allocator for the serving step loop (csrc/cpu/caching_allocator.cpp): enable installs it as
// torch's CPU allocator (false if another allocator with a higher priority is installed), caching at most
// limit_bytes of freed blocks; disable restores the previous allocator once the last user is gone, frees
// the cache, and returns (hits, misses) of the installation's large allocations.
bool caching_allocator_enable(int64_t limit_bytes);
std::tuple<int64_t, int64_t> caching_allocator_disable();

#ifdef WITH_CUDA
// ---- CUDA (csrc/cuda); same contracts, launched on `stream` ----------------------------------------
std::tuple<at::Tensor, at::Tensor> rms_norm_fwd_cuda(const at::Tensor& x, const at::Tensor& w, double eps,
                                                     cudaStream_t stream);
std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_cuda(const at::Tensor& dy, const at::Tensor& x,
                                                     const at::Tensor& w, const at::Tensor& rstd,
                                                     cudaStream_t stream);
std::tuple<at::Tensor, at::Tensor> rope_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                             const at::Tensor& sin, bool inverse, cudaStream_t stream);
at::Tensor swiglu_fwd_cuda(const at::Tensor& gate, const at::Tensor& up, cudaStream_t stream);
std::tuple<at::Tensor, at::Tensor> swiglu_bwd_cuda(const at::Tensor& dy, const at::Tensor& gate,
                                                   const at::Tensor& up, cudaStream_t stream);
at::Tensor ce_chunk_cuda(at::Tensor& logits, const at::Tensor& target, int64_t ignore_index, double grad_scale,
                         bool with_grad, cudaStream_t stream);
#endif

}  // namespace puyu
