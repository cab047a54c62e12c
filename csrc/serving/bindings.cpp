// Python bindings of puyu.serving._serving_ops, the serving runtime's CPU kernels: RoPE into a paged KV
// cache, paged decode attention, the quantized linears and the caching CPU allocator. They check shapes,
// dtypes and devices once here (the kernels trust them: a wrong stride would read past a buffer). There
// are no CUDA kernels: serving/ops.py sends CUDA tensors to the PyTorch references.
#include <torch/extension.h>

#include "cpu/common.h"
#include "serving_ops.h"

namespace puyu {
namespace {

using cpu::check_input;

// The kernels here are CPU only; `op` names the call in the message.
void check_cpu(const at::Tensor& t, const char* op) {
  TORCH_CHECK(t.is_cpu(), op, ": no kernel for device ", t.device(), " (CPU only; use the PyTorch reference)");
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
  check_cpu(qkv, "rope_cache_write");
  return rope_cache_write_cpu(qkv, cos, sin, k_cache, v_cache, slots, n_heads);
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
  check_cpu(q, "paged_decode_attention");
  return paged_decode_attention_cpu(q, k_cache, v_cache, block_tables, context_lens, scale, k_scale, v_scale);
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

}  // namespace
}  // namespace puyu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "puyu serving ops: RoPE into a paged cache, paged decode attention, quantized linears, caching CPU allocator";
  m.def("rope_cache_write", &puyu::rope_cache_write,
        "RoPE on the q and k heads of packed QKV rows; k and v written into a paged cache layer at slots -> q",
        py::arg("qkv"), py::arg("cos"), py::arg("sin"), py::arg("k_cache"), py::arg("v_cache"), py::arg("slots"),
        py::arg("n_heads"));
  m.def("paged_decode_attention", &puyu::paged_decode_attention,
        "attention of one query per sequence over a paged KV cache read in place (CPU, inference only)",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"), py::arg("context_lens"),
        py::arg("scale"), py::arg("k_scale") = py::none(), py::arg("v_scale") = py::none());
  m.def("w8_linear", &puyu::w8_linear,
        "x [M, K] fp32 times int8 weights [N, K] with per-row scales [N] (quantize_x: x per-row int8 too)",
        py::arg("x"), py::arg("qweight"), py::arg("scales"), py::arg("quantize_x") = false);
  m.def("w4_linear", &puyu::w4_linear,
        "x [M, K] fp32 times group-wise int4 weights (packed [N, Kp/2], scales/offsets [N, G])", py::arg("x"),
        py::arg("qweight"), py::arg("scales"), py::arg("offsets"));
  m.def("caching_allocator_enable", &puyu::caching_allocator_enable,
        "install the caching CPU allocator (counted); False if another allocator outranks it", py::arg("limit_bytes"));
  m.def("caching_allocator_disable", &puyu::caching_allocator_disable,
        "drop one user of the caching CPU allocator; the last restores the previous one -> (hits, misses)");
  m.def("cpu_isa", &puyu::cpu::isa_name, "vector ISA of the CPU kernels: avx2 or baseline");
}
