// Python bindings of puyu.model._fused_ops, the training ops: checks the inputs once and routes each call
// to the CPU or CUDA kernel by device. CUDA kernels exist only in builds made with a CUDA toolkit and CUDA
// torch (WITH_CUDA); model/ops.py asks has_cuda() and otherwise falls back to the PyTorch reference.
// Serving-only kernels live in their own extension (csrc/serving, puyu.serving._serving_ops).
#include <torch/extension.h>

#include "cpu/common.h"
#include "fused_ops.h"

#ifdef WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace puyu {
namespace {

using cpu::check_input;

// Runs `cpu_fn` for CPU tensors, `cuda_fn(stream)` for CUDA tensors (under a guard for their device).
template <typename CpuFn, typename CudaFn>
auto route(const at::Tensor& t, CpuFn cpu_fn, CudaFn cuda_fn) {
  if (t.is_cpu()) {
    return cpu_fn();
  }
#ifdef WITH_CUDA
  if (t.is_cuda()) {
    const c10::cuda::CUDAGuard guard(t.device());
    return cuda_fn(at::cuda::getCurrentCUDAStream().stream());
  }
#endif
  (void)cuda_fn;
  TORCH_CHECK(false, "puyu fused ops: no kernels for device ", t.device(), " in this build");
}

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x, const at::Tensor& w, double eps) {
  check_input(x, "x");
  check_input(w, "weight");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 1 && x.size(1) == w.size(0), "rms_norm: x [M, N] and weight [N]");
  return route(x, [&] { return rms_norm_fwd_cpu(x, w, eps); },
               [&](auto stream) { return rms_norm_fwd_cuda(x, w, eps, stream); });
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w,
                                                const at::Tensor& rstd) {
  check_input(dy, "dy");
  TORCH_CHECK(dy.sizes() == x.sizes() && rstd.size(0) == x.size(0), "rms_norm_bwd: shape mismatch");
  return route(x, [&] { return rms_norm_bwd_cpu(dy, x, w, rstd); },
               [&](auto stream) { return rms_norm_bwd_cuda(dy, x, w, rstd, stream); });
}

std::tuple<at::Tensor, at::Tensor> rope_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                            const at::Tensor& sin, bool inverse) {
  for (auto [t, name] : {std::pair{&q, "q"}, {&k, "k"}, {&cos, "cos"}, {&sin, "sin"}}) check_input(*t, name);
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4, "rope: q and k must be [B, T, H, d]");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3) && q.size(3) % 2 == 0,
              "rope: q and k must share B, T and an even head dim");
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), "rope: q and k must share a dtype");
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.dim() == 3 && cos.size(0) == q.size(0) &&
                  cos.size(1) == q.size(1) && cos.size(2) == q.size(3) / 2,
              "rope: cos/sin must be [B, T, d/2]");
  TORCH_CHECK(cos.scalar_type() == (q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat) &&
                  sin.scalar_type() == cos.scalar_type(),
              "rope: cos/sin must be fp32 (fp64 for fp64 q/k)");
  return route(q, [&] { return rope_cpu(q, k, cos, sin, inverse); },
               [&](auto stream) { return rope_cuda(q, k, cos, sin, inverse, stream); });
}

at::Tensor swiglu_fwd(const at::Tensor& gate, const at::Tensor& up) {
  check_input(gate, "gate");
  check_input(up, "up");
  TORCH_CHECK(gate.sizes() == up.sizes() && gate.scalar_type() == up.scalar_type(),
              "swiglu: gate and up must share shape and dtype");
  return route(gate, [&] { return swiglu_fwd_cpu(gate, up); },
               [&](auto stream) { return swiglu_fwd_cuda(gate, up, stream); });
}

std::tuple<at::Tensor, at::Tensor> swiglu_bwd(const at::Tensor& dy, const at::Tensor& gate, const at::Tensor& up) {
  check_input(dy, "dy");
  TORCH_CHECK(dy.sizes() == gate.sizes() && dy.scalar_type() == gate.scalar_type(), "swiglu_bwd: shape mismatch");
  return route(gate, [&] { return swiglu_bwd_cpu(dy, gate, up); },
               [&](auto stream) { return swiglu_bwd_cuda(dy, gate, up, stream); });
}

at::Tensor ce_chunk(at::Tensor logits, const at::Tensor& target, int64_t ignore_index, double grad_scale,
                    bool with_grad) {
  check_input(logits, "logits");
  TORCH_CHECK(logits.dim() == 2 && target.dim() == 1 && target.size(0) == logits.size(0),
              "ce_chunk: logits [C, V] and target [C]");
  TORCH_CHECK(target.scalar_type() == at::kLong && target.is_contiguous(), "ce_chunk: target must be int64");
  return route(logits, [&] { return ce_chunk_cpu(logits, target, ignore_index, grad_scale, with_grad); },
               [&](auto stream) { return ce_chunk_cuda(logits, target, ignore_index, grad_scale, with_grad, stream); });
}

bool has_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace
}  // namespace puyu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "puyu fused training ops: RMSNorm, RoPE on q and k, SwiGLU, chunked cross-entropy";
  m.def("rms_norm_fwd", &puyu::rms_norm_fwd, "RMSNorm forward -> (y, rstd)");
  m.def("rms_norm_bwd", &puyu::rms_norm_bwd, "RMSNorm backward -> (dx, dweight)");
  m.def("rope_fwd", &puyu::rope_fwd, "RoPE on q and k (inverse=True rotates back, i.e. the backward)");
  m.def("swiglu_fwd", &puyu::swiglu_fwd, "silu(gate) * up");
  m.def("swiglu_bwd", &puyu::swiglu_bwd, "SwiGLU backward -> (dgate, dup)");
  m.def("ce_chunk", &puyu::ce_chunk, "per-row CE loss of a logits chunk; in place softmax gradient");
  m.def("has_cuda", &puyu::has_cuda, "whether CUDA kernels are compiled in");
  m.def("cpu_isa", &puyu::cpu::isa_name, "vector ISA of the CPU kernels: avx2 or baseline");
}
