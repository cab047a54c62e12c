"""The serving runtime's kernels with their PyTorch references: RoPE into a paged KV cache
(``rope_cache_write``) and paged decode attention, plus the compiled extension ``puyu.serving._serving_ops``
(``csrc/serving``) that also holds the quantized linears (``puyu.serving.qlinear``) and the caching CPU
allocator (``puyu.serving.host_memory``).

Why apart from ``puyu.model.ops``: these kernels only serve inference (no backward) and only on the CPU, so
the training extension ``puyu.model._fused_ops`` carries none of them, and the model package never imports
serving. The conventions are the training ops': a ``*_reference`` defines each op's semantics; the fused
path takes the extension when it was built (and suits this CPU), else falls back to the reference; each
kernel is a ``torch.ops.puyu`` custom op with a fake kernel, so the ops stay traceable (torch.compile, the
meta device), and eager calls go straight to the extension (``puyu.model.ops.route`` decides). CUDA tensors
always take the references.
"""
from __future__ import annotations

from types import ModuleType

import torch

from puyu.model.ops import load_extension, opmath_dtype, rope_reference, route

_ext, _ext_problem = load_extension("puyu.serving._serving_ops", "serving ops")


def extension() -> ModuleType | None:
    """The compiled module, vetted for this CPU, or None: for the kernels serving calls directly (quantized
    linears, the caching allocator)."""
    return _ext


def extension_available(device: torch.device | str = "cpu") -> bool:
    """Whether the compiled kernels serve tensors on ``device`` (the CPU, when built; nothing else)."""
    return _ext is not None and torch.device(device).type == "cpu"


def extension_problem() -> str | None:
    """One line saying why the compiled kernels are not in use, or None when they are (``make test`` fails on it)."""
    return _ext_problem


def _usable(t: torch.Tensor) -> bool:
    return extension_available(t.device)


# ----------------------------------------------------------------------------------------------------
# RoPE + paged cache write (inference only)
# ----------------------------------------------------------------------------------------------------
def rope_cache_write_reference(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                               v_cache: torch.Tensor, slots: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Split packed QKV rows, rotate q and k (``rope_reference``), store k and v in a paged cache; -> q.

    qkv [N, (n_heads + 2 Hk) d] (each row q | k | v), cos/sin [N, d/2], k_cache/v_cache [Hk, num_blocks,
    block_size, d] (one layer, qkv's dtype), slots [N] int64: token r's key and value go to flat slot
    ``slots[r]`` (= block * block_size + offset) of every kv head. Returns q [N, n_heads, d].
    """
    N, (Hk, _, _, d) = qkv.shape[0], k_cache.shape
    q, k, v = qkv.view(N, -1, d).split([n_heads, Hk, Hk], dim=1)
    q, k = rope_reference(q[None], k[None], cos[None], sin[None])
    for cache, t in ((k_cache, k[0]), (v_cache, v)):
        cache.view(Hk, -1, d).index_copy_(1, slots, t.transpose(0, 1))
    return q[0]


def _rope_cache_write(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, slots: torch.Tensor, n_heads: int) -> torch.Tensor:
    return _ext.rope_cache_write(qkv, cos, sin, k_cache, v_cache, slots, n_heads)


_rope_cache_write_op = torch.library.custom_op(
    "puyu::rope_cache_write", _rope_cache_write, mutates_args=("k_cache", "v_cache")
)


@_rope_cache_write_op.register_fake
def _(qkv, cos, sin, k_cache, v_cache, slots, n_heads):
    return qkv.new_empty(qkv.shape[0], n_heads, k_cache.shape[3])


def rope_cache_write(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, slots: torch.Tensor, n_heads: int, fused: bool = True) -> torch.Tensor:
    """RoPE on the q and k heads of packed QKV rows, with k and v written into a paged KV cache layer at
    ``slots``; returns the rotated q [N, n_heads, d]. Semantics: ``rope_cache_write_reference``.

    Why fused: serving's decode step would otherwise split the projection, copy q and k contiguous,
    rotate them, then transpose and ``index_copy_`` k and v into the cache: five passes over small rows.
    The CPU kernel reads each row once and writes q, k and v where they belong, with the same rotation
    as ``apply_rope`` (bit for bit). Inference only; CUDA tensors and ``fused=False`` take the reference.
    """
    path = route(fused, qkv, _usable)
    if path == "reference":
        return rope_cache_write_reference(qkv, cos, sin, k_cache, v_cache, slots, n_heads)
    if torch.is_grad_enabled() and qkv.requires_grad:
        raise RuntimeError("rope_cache_write is inference-only: qkv must not require a gradient")
    opmath = opmath_dtype(qkv.dtype)
    return (_rope_cache_write if path == "ext" else _rope_cache_write_op)(
        qkv, cos.to(opmath).contiguous(), sin.to(opmath).contiguous(), k_cache, v_cache, slots, n_heads
    )


# ----------------------------------------------------------------------------------------------------
# Paged decode attention (inference only)
# ----------------------------------------------------------------------------------------------------
def paged_decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one query per sequence over its keys/values in a paged cache: gather + masked softmax.

    Sequence i's token t lives in block ``block_tables[i, t // block_size]`` at offset ``t % block_size``;
    its first ``context_lens[i]`` tokens are visible. Query head h reads kv head ``h // (Hq / Hk)`` (GQA).
    An int8 cache is dequantized as ``code * scale`` (one fp32 scale per token and kv head). Computed in fp32
    (fp64 for fp64 q) and rounded once to q's dtype. Block-table entries past a context are gathered and
    masked, so they must name existing blocks (padding with 0 is the convention).
    """
    b, Hq, d = q.shape
    Hk, _, bs, _ = k_cache.shape
    S = block_tables.shape[1] * bs
    opmath = opmath_dtype(q.dtype)
    flat = block_tables.reshape(-1)  # [b * max_blocks]

    def gather(cache: torch.Tensor, cache_scale: torch.Tensor | None) -> torch.Tensor:
        t = cache.index_select(1, flat).to(opmath)  # [Hk, b * max_blocks, bs, d]
        if cache_scale is not None:
            t = t * cache_scale.index_select(1, flat)[..., None].to(opmath)
        return t.view(Hk, b, S, d)

    keys, values = gather(k_cache, k_scale), gather(v_cache, v_scale)  # [Hk, b, S, d]
    qg = q.to(opmath).view(b, Hk, Hq // Hk, d)  # [b, Hk, g, d]
    scores = torch.einsum("bhgd,hbsd->bhgs", qg, keys) * scale  # [b, Hk, g, S]
    visible = torch.arange(S, device=q.device) < context_lens[:, None]  # [b, S]
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    out = torch.einsum("bhgs,hbsd->bhgd", scores.softmax(dim=-1), values)  # [b, Hk, g, d]
    return out.reshape(b, Hq, d).to(q.dtype)


def _paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                            k_scale: torch.Tensor | None, v_scale: torch.Tensor | None) -> torch.Tensor:
    return _ext.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, k_scale, v_scale)


_paged_decode_attention_op = torch.library.custom_op(
    "puyu::paged_decode_attention", _paged_decode_attention, mutates_args=()
)


@_paged_decode_attention_op.register_fake
def _(q, k_cache, v_cache, block_tables, context_lens, scale, k_scale, v_scale):
    return q.new_empty(q.shape)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    fused: bool = True,
) -> torch.Tensor:
    """Decode attention over a paged KV cache: q [b, Hq, d] -> out [b, Hq, d] in q's dtype.

    k_cache, v_cache: [Hk, num_blocks, block_size, d] (one layer of ``PagedKVCache``), q's dtype, or int8 with
    k_scale, v_scale [Hk, num_blocks, block_size] fp32; block_tables [b, max_blocks] int64; context_lens [b]
    int64 (1..max_blocks * block_size keys each). Semantics: ``paged_decode_attention_reference``.

    Why fused: the reference (like the serving runtime before it) copies every sequence's blocks into a
    padded [Hk, b, S, d] tensor before its matmuls; the CPU kernel reads the blocks in place through the
    block table, once for all query heads of a kv head, and never reads the entries past a context.

    Inference only: the fused path records no autograd graph (it refuses inputs that need a gradient).
    CUDA tensors, ``fused=False`` or a missing extension take the reference.
    """
    path = route(fused, q, _usable)
    if path == "reference":
        return paged_decode_attention_reference(q, k_cache, v_cache, block_tables, context_lens, scale, k_scale,
                                                v_scale)
    if torch.is_grad_enabled() and q.requires_grad:
        raise RuntimeError("paged_decode_attention is inference-only: q must not require a gradient")
    return (_paged_decode_attention if path == "ext" else _paged_decode_attention_op)(
        q.contiguous(), k_cache, v_cache, block_tables.contiguous(), context_lens.contiguous(), float(scale), k_scale,
        v_scale,
    )
