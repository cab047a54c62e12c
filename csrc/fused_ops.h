// Declarations of the fused training kernels behind puyu.model._fused_ops (see model/ops.py for the
// contracts and the PyTorch references they must match; serving's own kernels are in csrc/serving).
// Every kernel computes in the "opmath" type of its input (fp32 for fp32/bf16/fp16, fp64 for fp64) and
// rounds once on the way out.
#pragma once

#include <ATen/core/Tensor.h>

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
// gate, up [*] -> silu(gate) * up
at::Tensor swiglu_fwd_cpu(const at::Tensor& gate, const at::Tensor& up);
// dy, gate, up [*] -> dgate, dup
std::tuple<at::Tensor, at::Tensor> swiglu_bwd_cpu(const at::Tensor& dy, const at::Tensor& gate, const at::Tensor& up);
// logits [C, V] (overwritten with grad_scale * (softmax - onehot) when with_grad), target [C] int64
// -> per-row loss [C] (opmath), 0 where target == ignore_index
at::Tensor ce_chunk_cpu(at::Tensor& logits, const at::Tensor& target, int64_t ignore_index, double grad_scale,
                        bool with_grad);

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
