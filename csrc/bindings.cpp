// Python bindings of puyu.model._fused_ops: checks the inputs once and routes each call to the CPU or
// CUDA kernel by device. CUDA kernels exist only in builds made with a CUDA toolkit and CUDA torch
// (WITH_CUDA); model/ops.py asks has_cuda() and otherwise falls back to the PyTorch reference.
#include <torch/extension.h>

#include "fused_ops.h"

#ifdef WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace puyu {
namespace {

void check_input(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.is_floating_point(), name, " must be a floating-point tensor, got ", t.scalar_type());
}

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

at::Tensor rope_cache_write(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor k_cache,
                            at::Tensor v_cache, const at::Tensor& slots, int64_t n_heads) {
  for (auto [t, name] : {std::pair{&qkv, "qkv"}, {&cos, "cos"}, {&sin, "sin"}, {&k_cache, "k_cache"},
                         {&v_cache, "v_cache"}})
    check_input(*t, name);
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes() && v_cache.scalar_type() == k_cache.scalar_type(),
              "rope_cache_write: k_cache and v_cache must be [Hk, num_blocks, block_size, d] alike, got ",
              k_cache.sizes(), " and ", v_cache.sizes());
  const int64_t hk = k_cache.size(0), d = k_cache.size(3);
  TORCH_CHECK(n_heads > 0 && d % 2 == 0 && qkv.dim() == 2 && qkv.size(1) == (n_heads + 2 * hk) * d,
              "rope_cache_write: qkv must be [N, (n_heads + 2 Hk) d] = [N, ", (n_heads + 2 * hk) * d, "] with an even d, got ",
              qkv.sizes());
  TORCH_CHECK(k_cache.scalar_type() == qkv.scalar_type(), "rope_cache_write: the cache must have qkv's dtype (",
              qkv.scalar_type(), "), got ", k_cache.scalar_type());
  const auto opmath = qkv.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(cos.scalar_type() == opmath && sin.scalar_type() == opmath && cos.dim() == 2 &&
                  cos.sizes() == sin.sizes() && cos.size(0) == qkv.size(0) && cos.size(1) == d / 2,
              "rope_cache_write: cos/sin must be ", opmath, " [N, d/2] = [", qkv.size(0), ", ", d / 2, "], got ",
              cos.scalar_type(), " ", cos.sizes());
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 1 && slots.is_contiguous() &&
                  slots.size(0) == qkv.size(0),
              "rope_cache_write: slots must be contiguous int64 [N = ", qkv.size(0), "], got ", slots.scalar_type(),
              " ", slots.sizes());
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&cos, &sin, &k_cache, &v_cache, &slots})
    TORCH_CHECK(t->device() == qkv.device(), "rope_cache_write: all tensors must be on ", qkv.device());
  return route(qkv, [&] { return rope_cache_write_cpu(qkv, cos, sin, k_cache, v_cache, slots, n_heads); },
               [&](auto) -> at::Tensor {
                 TORCH_CHECK(false, "rope_cache_write: no CUDA kernel (use the PyTorch reference)");
                 return {};
               });
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

// Shapes and dtypes here; the values of block_tables/context_lens are checked by the CPU kernel.
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                                  const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale) {
  check_input(q, "q");
  TORCH_CHECK(q.dim() == 3, "paged_decode_attention: q must be [b, Hq, d], got ", q.sizes());
  TORCH_CHECK(k_cache.dim() == 4, "paged_decode_attention: k_cache must be [Hk, num_blocks, block_size, d], got ",
              k_cache.sizes());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes() && v_cache.scalar_type() == k_cache.scalar_type(),
              "paged_decode_attention: v_cache must match k_cache's shape and dtype, got ", v_cache.sizes(), " ",
              v_cache.scalar_type(), " vs ", k_cache.sizes(), " ", k_cache.scalar_type());
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "paged_decode_attention: k_cache and v_cache must "
              "be contiguous (a layer of the cache, read in place)");
  const int64_t Hq = q.size(1), Hk = k_cache.size(0);
  TORCH_CHECK(k_cache.size(3) == q.size(2), "paged_decode_attention: head dim of q (", q.size(2),
              ") and of the cache (", k_cache.size(3), ") differ");
  TORCH_CHECK(Hk > 0 && Hq % Hk == 0, "paged_decode_attention: query heads (", Hq,
              ") must be a multiple of kv heads (", Hk, ")");
  TORCH_CHECK(k_cache.size(1) > 0 && k_cache.size(2) > 0, "paged_decode_attention: empty cache ", k_cache.sizes());
  const bool quantized = k_cache.scalar_type() == at::kChar;
  TORCH_CHECK(quantized || k_cache.scalar_type() == q.scalar_type(), "paged_decode_attention: the cache must have "
              "q's dtype (", q.scalar_type(), ") or be int8, got ", k_cache.scalar_type());
  TORCH_CHECK(quantized == (k_scale.has_value() && v_scale.has_value()) && k_scale.has_value() == v_scale.has_value(),
              "paged_decode_attention: k_scale and v_scale are required for an int8 cache and only for it");
  const at::Tensor* scales[] = {k_scale ? &*k_scale : nullptr, v_scale ? &*v_scale : nullptr};
  for (const at::Tensor* s : scales) {
    if (s == nullptr) continue;
    TORCH_CHECK(s->scalar_type() == at::kFloat && s->is_contiguous() && s->sizes() == k_cache.sizes().slice(0, 3),
                "paged_decode_attention: k_scale/v_scale must be contiguous fp32 [Hk, num_blocks, block_size] = ",
                k_cache.sizes().slice(0, 3), ", got ", s->scalar_type(), " ", s->sizes());
    TORCH_CHECK(s->device() == q.device(), "paged_decode_attention: scales on ", s->device(), ", q on ", q.device());
  }
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && block_tables.dim() == 2 && block_tables.is_contiguous() &&
                  block_tables.size(0) == q.size(0),
              "paged_decode_attention: block_tables must be contiguous int64 [b, max_blocks] with b = ", q.size(0),
              ", got ", block_tables.scalar_type(), " ", block_tables.sizes());
  TORCH_CHECK(context_lens.scalar_type() == at::kLong && context_lens.dim() == 1 && context_lens.is_contiguous() &&
                  context_lens.size(0) == q.size(0),
              "paged_decode_attention: context_lens must be contiguous int64 [b] with b = ", q.size(0), ", got ",
              context_lens.scalar_type(), " ", context_lens.sizes());
  for (auto [t, name] : {std::pair{&k_cache, "k_cache"}, {&v_cache, "v_cache"}, {&block_tables, "block_tables"},
                         {&context_lens, "context_lens"}})
    TORCH_CHECK(t->device() == q.device(), "paged_decode_attention: ", name, " on ", t->device(), ", q on ",
                q.device());
  return route(q, [&] { return paged_decode_attention_cpu(q, k_cache, v_cache, block_tables, context_lens, scale,
                                                          k_scale, v_scale); },
               [&](auto) -> at::Tensor {
                 TORCH_CHECK(false, "paged_decode_attention: no CUDA kernel (use the PyTorch reference)");
                 return {};
               });
}

// Shapes, dtypes and devices of the quantized linears (the kernels trust them; a wrong stride would read
// past a buffer). `kind` names the op in messages.
void check_quant_linear(const char* kind, const at::Tensor& x, const at::Tensor& qweight, at::ScalarType code_type,
                        const std::vector<const at::Tensor*>& fp32_parts) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(), kind,
              ": x must be contiguous fp32 [M, K] on the CPU, got ", x.scalar_type(), " ", x.sizes(), " on ",
              x.device());
  TORCH_CHECK(qweight.device().is_cpu() && qweight.scalar_type() == code_type && qweight.dim() == 2 &&
                  qweight.is_contiguous() && qweight.size(0) > 0 && qweight.size(1) > 0,
              kind, ": qweight must be contiguous ", code_type, " [N, *] on the CPU, got ", qweight.scalar_type(), " ",
              qweight.sizes());
  for (const at::Tensor* t : fp32_parts)
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous() &&
                    t->size(0) == qweight.size(0),
                kind, ": scales/offsets must be contiguous fp32 with N = ", qweight.size(0), " rows, got ",
                t->scalar_type(), " ", t->sizes());
}

at::Tensor w8_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, bool quantize_x) {
  const char* kind = quantize_x ? "w8a8_linear" : "w8_linear";
  check_quant_linear(kind, x, qweight, at::kChar, {&scales});
  TORCH_CHECK(x.size(1) == qweight.size(1) && scales.dim() == 1, kind, ": x [M, K], qweight [N, K] and scales [N], got ",
              x.sizes(), ", ", qweight.sizes(), ", ", scales.sizes());
  return quantize_x ? w8a8_linear_cpu(x, qweight, scales) : w8_linear_cpu(x, qweight, scales);
}

at::Tensor w4_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                     const at::Tensor& offsets) {
  check_quant_linear("w4_linear", x, qweight, at::kByte, {&scales, &offsets});
  const int64_t Kp = qweight.size(1) * 2, G = scales.size(1);
  TORCH_CHECK(scales.dim() == 2 && offsets.sizes() == scales.sizes() && G > 0 && Kp % G == 0 && (Kp / G) % 16 == 0,
              "w4_linear: scales and offsets must be [N, G] with a group size 2 * qweight.size(1) / G that is a "
              "multiple of 16, got qweight ", qweight.sizes(), ", scales ", scales.sizes(), ", offsets ",
              offsets.sizes());
  TORCH_CHECK(x.size(1) <= Kp && x.size(1) > Kp - Kp / G, "w4_linear: x has ", x.size(1),
              " features; qweight's ", Kp, " (padded to groups of ", Kp / G, ") do not fit them");
  return w4_linear_cpu(x, qweight, scales, offsets);
}

bool has_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

// The vector ISA the CPU kernels were compiled for; running an AVX2 build on an older CPU would crash.
std::string cpu_isa() {
#ifdef PUYU_CPU_AVX2
  return "avx2";
#else
  return "baseline";
#endif
}

}  // namespace
}  // namespace puyu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "puyu fused ops: RMSNorm, RoPE (q and k; into a paged cache), SwiGLU, chunked cross-entropy, paged decode attention, quantized linears";
  m.def("rms_norm_fwd", &puyu::rms_norm_fwd, "RMSNorm forward -> (y, rstd)");
  m.def("rms_norm_bwd", &puyu::rms_norm_bwd, "RMSNorm backward -> (dx, dweight)");
  m.def("rope_fwd", &puyu::rope_fwd, "RoPE on q and k (inverse=True rotates back, i.e. the backward)");
  m.def("rope_cache_write", &puyu::rope_cache_write,
        "RoPE on the q and k heads of packed QKV rows; k and v written into a paged cache layer at slots -> q",
        py::arg("qkv"), py::arg("cos"), py::arg("sin"), py::arg("k_cache"), py::arg("v_cache"), py::arg("slots"),
        py::arg("n_heads"));
  m.def("swiglu_fwd", &puyu::swiglu_fwd, "silu(gate) * up");
  m.def("swiglu_bwd", &puyu::swiglu_bwd, "SwiGLU backward -> (dgate, dup)");
  m.def("ce_chunk", &puyu::ce_chunk, "per-row CE loss of a logits chunk; in place softmax gradient");
  m.def("paged_decode_attention", &puyu::paged_decode_attention,
        "attention of one query per sequence over a paged KV cache read in place (CPU, inference only)",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"), py::arg("context_lens"),
        py::arg("scale"), py::arg("k_scale") = py::none(), py::arg("v_scale") = py::none());
  m.def("caching_allocator_enable", &puyu::caching_allocator_enable,
        "install the caching CPU allocator (counted); False if another allocator outranks it", py::arg("limit_bytes"));
  m.def("caching_allocator_disable", &puyu::caching_allocator_disable,
        "drop one user of the caching CPU allocator; the last restores the previous one -> (hits, misses)");
  m.def("w8_linear", &puyu::w8_linear,
        "x [M, K] fp32 times int8 weights [N, K] with per-row scales [N] (quantize_x: x per-row int8 too)",
        py::arg("x"), py::arg("qweight"), py::arg("scales"), py::arg("quantize_x") = false);
  m.def("w4_linear", &puyu::w4_linear,
        "x [M, K] fp32 times group-wise int4 weights (packed [N, Kp/2], scales/offsets [N, G])", py::arg("x"),
        py::arg("qweight"), py::arg("scales"), py::arg("offsets"));
  m.def("has_cuda", &puyu::has_cuda, "whether CUDA kernels are compiled in");
  m.def("cpu_isa", &puyu::cpu_isa, "vector ISA of the CPU kernels: avx2 or baseline");
}
