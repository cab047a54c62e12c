"""The inference-side InternLM2: engine tensors (fused QKV and gate/up, RoPE tables) and two forwards.

- ``forward_paged``: a flat ragged batch of token chunks from many sequences (prefill chunks and
  single decode tokens mixed), keys/values written to and read from a ``PagedKVCache`` through block
  tables. The linear layers see all tokens of the step as one [N, D] matrix, which is what makes
  continuous batching pay off. Attention runs per ``AttentionGroup``: with the fused CPU kernel, decode
  tokens and short prompt chunks read their sequences' blocks in place (``paged``), and the step's q
  comes from ``puyu.serving.ops.rope_cache_write``, which also stores k and v in their slots; without it, decode
  tokens gather their blocks into a padded [b, S] view (buckets of similar context length). Prompt
  chunks that start at position 0 otherwise attend only to their own keys (causal SDPA, nothing read
  from the cache); other chunks gather what the cache holds before them.
- ``forward_dense``: plain causal [B, T] (no cache) for perplexity; ``layer_dense`` one layer of it, for
  calibration that streams through the layers.

Both use the same fused ops as ``puyu.model`` (``ModelArgs.fused_ops``), so greedy decoding matches the
training-side model's reference generation token for token. The tensors may live on any device: off the
CPU there is no paged kernel (the gather path serves every step) and no oneDNN packing (plain ``F.linear``).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.nn.functional as F

from puyu.model import ops
from puyu.model.config import ModelArgs
from puyu.serving import ops as serving_ops
from puyu.serving.kv_cache import PagedKVCache
from puyu.serving.qlinear import QuantLinear

Tensors = dict[str, torch.Tensor]
LINEARS = ("wqkv", "wo", "w13", "w2")


def onednn_packed(weight: torch.Tensor) -> Optional[torch.Tensor]:
    """The weight [O, I] reordered once into oneDNN's blocked layout for CPU inference, or None where
    oneDNN is not available for it (other devices or dtypes, builds without mkldnn).

    Why: torch's ``F.linear`` hands fp32 to MKL's sgemm, which repacks the weight on every call; with
    the packing done once, oneDNN's kernels run 8-25% faster on the runtime's shapes ([32-2048 rows,
    256-2048 columns] on this repo's 2-core AMD VM: 98-112 vs 81-98 GFLOP/s at one thread). It is the
    same reorder inductor's CPU weight prepacking uses. ``EngineLinear`` then keeps only the packed copy.
    """
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous())
    except (AttributeError, RuntimeError):  # an older or mkldnn-less build
        return None


def packed_linear(x: torch.Tensor, packed: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x W^T`` (+ ``residual``) through a weight from ``onednn_packed``; x [..., I] -> [..., O]. The residual
    [..., O] is added in the matmul's epilogue (the same sum as a separate add, without its pass over memory)."""
    if residual is None:
        return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    y = torch.ops.mkldnn._linear_pointwise.binary(x.reshape(-1, x.shape[-1]), residual.reshape(-1, residual.shape[-1]),
                                                  packed, None, "add")
    return y.view(residual.shape)


class EngineLinear:
    """``y = x W^T`` from a dense weight (through ``onednn_packed`` on CPU), or from a quantized one through
    :class:`puyu.serving.qlinear.QuantLinear` (int8/int4 kernels that read each code once per call)."""

    def __init__(self, tensors: Tensors, dtype: torch.dtype):
        self.weight = tensors.get("weight")
        self.bias = tensors.get("bias")  # [O] or None (Qwen2's q/k/v)
        self.packed = onednn_packed(self.weight) if self.weight is not None else None
        self.quant = QuantLinear(tensors, dtype) if self.weight is None else None
        self.dtype = dtype
        if self.packed is not None:
            self.weight = None  # the packed copy serves every call; not holding both halves the weights' memory

    def __call__(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [..., I] -> ``x W^T`` (+ bias) [..., O], plus ``residual`` [..., O] if given."""
        if self.packed is not None and self.bias is None:
            return packed_linear(x.to(self.dtype), self.packed, residual)
        if self.packed is not None:
            y = packed_linear(x.to(self.dtype), self.packed)
        else:
            y = F.linear(x, self.weight) if self.quant is None else self.quant(x)
        if self.bias is not None:
            y = y + self.bias
        return y if residual is None else residual + y


def split_rows(parts: Tensors) -> tuple[Tensors, Tensors]:
    """The parts of a linear (dense ``weight`` or quantized codes/scales/zeros, all [O, ...]) split into
    its first and second half of output rows; input-side parts (``act_scale``, ``in_features``) shared."""
    halves: tuple[Tensors, Tensors] = ({}, {})
    for k, v in parts.items():
        if k in ("act_scale", "in_features", "act_bits"):
            halves[0][k] = halves[1][k] = v
        else:
            top, bottom = v.chunk(2, dim=0)
            halves[0][k], halves[1][k] = top.contiguous(), bottom.contiguous()
    return halves


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor, g: int) -> torch.Tensor:
    """Attention of one query per sequence, q [b, Hq, d], over keys/values [Hk, b, S, d]; ``bias``
    [Hk * b, 1, S] is 0 where a key may be seen and -inf where not.

    Plain batched matmuls with the g query heads of a KV head stacked as g query rows, so keys and
    values are never repeated per query head nor copied again, and the mask is added inside the score
    matmul (``baddbmm``); on CPU this is several times faster than SDPA's flash kernel for decoding.
    """
    b, Hq, d = q.shape
    Hk, S = keys.shape[0], keys.shape[2]
    qg = q.reshape(b, Hk, g, d).transpose(0, 1).reshape(Hk * b, g, d)
    scores = torch.baddbmm(bias, qg, keys.view(Hk * b, S, d).transpose(1, 2), alpha=1.0 / math.sqrt(d))
    out = torch.bmm(scores.softmax(dim=-1), values.view(Hk * b, S, d))  # [Hk b, g, d]
    return out.view(Hk, b, g, d).transpose(0, 1).reshape(b, Hq, d)


@dataclasses.dataclass
class AttentionGroup:
    """Sequences whose attention is computed together; their tokens are the flat batch's rows
    ``[start, stop)``, sequence after sequence.

    - ``paged``: any rows (decode tokens and short prompt chunks alike), each attending to the first
      ``context`` [n] keys of its sequence, read in place from the cache by the fused kernel through
      ``block_tables`` [n, max_blocks] (one row per query row).
    - ``decode``: one query each (a decode step); keys/values gathered from the cache through
      ``block_tables``, ``context`` [b] keys each (the query's position + 1).
    - ``fresh``: prompt chunks from position 0: attention within the chunk only (causal), from the
      step's own keys/values, right-padded to the longest chunk; nothing is read from the cache.
    - ``cached``: chunks after tokens already in the cache (chunked prefill, prefix-cache hits):
      keys/values gathered from the cache, ``query_positions`` [b, T] masks them (pad: -1).
    For ``fresh``/``cached``, ``query_index`` [b, T] gives each padded query slot's flat row (pad: the
    group's first row) and ``real`` [n] the slots of ``[b * T]`` holding the group's tokens, in order.
    """

    kind: str
    start: int
    stop: int
    block_tables: Optional[torch.Tensor] = None  # [b, max_blocks] int64 (padded with 0; masked by position)
    context: Optional[torch.Tensor] = None  # [b] int64 (decode, paged)
    query_index: Optional[torch.Tensor] = None  # [b, T] int64
    real: Optional[torch.Tensor] = None  # [n] int64
    query_positions: Optional[torch.Tensor] = None  # [b, T] int64 (cached)


@dataclasses.dataclass
class PagedBatch:
    """One forward step over sequences contributing N tokens in total (flat, sequence after sequence)."""

    tokens: torch.Tensor  # [N] int64
    positions: torch.Tensor  # [N] int64, position of each token in its sequence
    slots: torch.Tensor  # [N] int64, cache slot (block * block_size + offset) each token's K/V goes to
    groups: list[AttentionGroup]  # covering the N rows
    logits_index: torch.Tensor  # [M] int64 flat rows whose logits are wanted

    def to(self, device: torch.device) -> "PagedBatch":
        """The batch on ``device`` through one host-to-device copy: its index tensors (all int64, built on
        the CPU) are packed into one flat tensor, moved, and viewed back into their shapes. A copy per
        tensor would be up to ~20 transfers a step, each waiting for the stream."""
        groups = [dataclasses.replace(grp) for grp in self.groups]
        moved = dataclasses.replace(self, groups=groups)
        fields = [(moved, name) for name in ("tokens", "positions", "slots", "logits_index")]
        fields += [(grp, f.name) for grp in groups for f in dataclasses.fields(grp)
                   if isinstance(getattr(grp, f.name), torch.Tensor)]
        parts = [getattr(obj, name) for obj, name in fields]
        flat = torch.cat([t.reshape(-1) for t in parts]).to(device)
        for (obj, name), t, piece in zip(fields, parts, flat.split([t.numel() for t in parts])):
            setattr(obj, name, piece.view(t.shape))
        return moved


class EngineModel:
    """Engine tensors bound to ``args``; stateless apart from the weights (the KV cache is passed in)."""

    def __init__(self, args: ModelArgs, tensors: Tensors):
        self.args = args
        self.dtype = tensors["tok_embeddings.weight"].dtype
        self.tok_embeddings = tensors["tok_embeddings.weight"]  # [V, D]
        self.norm = tensors["norm.weight"]
        self.output = EngineLinear({"weight": tensors["output.weight"] if "output.weight" in tensors else self.tok_embeddings},
                                   self.dtype)  # [V, D]
        self.rope_cos, self.rope_sin = tensors["rope.cos"], tensors["rope.sin"]  # [max_seq_len, d/2] fp32
        self.layers = []
        for i in range(args.n_layers):
            p = f"layers.{i}."
            layer = {"attention_norm": tensors[p + "attention_norm.weight"], "ffn_norm": tensors[p + "ffn_norm.weight"]}
            for name in LINEARS:
                parts = {k[len(p + name) + 1:]: v for k, v in tensors.items() if k.startswith(p + name + ".")}
                if name == "w13":  # as w1 and w3: each output is contiguous for SwiGLU (no copies of gate and up)
                    layer["w1"], layer["w3"] = (EngineLinear(half, self.dtype) for half in split_rows(parts))
                else:
                    layer[name] = EngineLinear(parts, self.dtype)
            self.layers.append(layer)
        self.capture: Optional[dict[str, list[torch.Tensor]]] = None  # calibration: linear inputs [rows, I]
        self.capture_stride = 1

    @property
    def paged_kernel(self) -> bool:
        """Whether attention can read the paged cache in place through the fused kernel (``paged`` groups)."""
        return self.args.fused_ops and serving_ops.extension_available(self.device)

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.device

    @property
    def max_seq_len(self) -> int:
        return self.rope_cos.shape[0]

    def _capture(self, i: int, name: str, x: torch.Tensor) -> None:
        if self.capture is not None:  # every capture_stride-th row, so a layer's captures stay bounded
            rows = x.reshape(-1, x.shape[-1])[:: self.capture_stride]
            self.capture.setdefault(f"layers.{i}.{name}", []).append(rows.float())

    def _linear(self, i: int, name: str, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        self._capture(i, name, x)
        return self.layers[i][name](x, residual)

    def _qkv(self, i: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [B, T, D], RoPE tables at the tokens' positions [B, T, d/2] -> q [B, T, Hq, d], k and v
        [B, T, Hk, d] with RoPE applied."""
        a = self.args
        B, T, _ = x.shape
        h = ops.rms_norm(x, self.layers[i]["attention_norm"], a.norm_eps, fused=a.fused_ops)
        qkv = self._linear(i, "wqkv", h)  # [B, T, (Hq + 2 Hk) d], q | k | v
        q, k, v = qkv.split([a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim, a.n_kv_heads * a.head_dim], -1)
        q, k, v = (t.view(B, T, -1, a.head_dim) for t in (q, k, v))
        q, k = ops.apply_rope(q, k, cos, sin, fused=a.fused_ops)
        return q, k, v

    def _ffn(self, i: int, h: torch.Tensor) -> torch.Tensor:
        a = self.args
        x = ops.rms_norm(h, self.layers[i]["ffn_norm"], a.norm_eps, fused=a.fused_ops)
        self._capture(i, "w13", x)
        gate, up = self.layers[i]["w1"](x), self.layers[i]["w3"](x)  # [.., F] each
        return self._linear(i, "w2", ops.swiglu(gate, up, fused=a.fused_ops), residual=h)

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        return self.output(ops.rms_norm(h, self.norm, self.args.norm_eps, fused=self.args.fused_ops))

    @torch.no_grad()
    def forward_dense(self, tokens: torch.Tensor) -> torch.Tensor:
        """Causal logits [B, T, V] for tokens [B, T] (T <= max_seq_len)."""
        h, cos, sin = self.embed_dense(tokens)
        for i in range(self.args.n_layers):
            h = self.layer_dense(i, h, cos, sin)
        return self._head(h)

    def embed_dense(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """tokens [B, T] -> hidden states [B, T, D] and the RoPE tables at positions 0..T-1 [B, T, d/2]."""
        B, T = tokens.shape
        positions = torch.arange(T, device=tokens.device).expand(B, T)
        return self.tok_embeddings[tokens], self.rope_cos[positions], self.rope_sin[positions]

    @torch.no_grad()
    def layer_dense(self, i: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Layer i on hidden states h [B, T, D] (causal, no cache); the engine build streams calibration
        through the layers one at a time with it."""
        B, T, _ = h.shape
        q, k, v = self._qkv(i, h, cos, sin)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True, enable_gqa=self.args.n_groups > 1)
        h = self._linear(i, "wo", out.transpose(1, 2).reshape(B, T, -1), residual=h)
        return self._ffn(i, h)

    @torch.no_grad()
    def forward_paged(self, batch: PagedBatch, cache: PagedKVCache) -> torch.Tensor:
        """Logits [M, V] for ``batch.logits_index``; writes the batch's keys/values into ``cache``."""
        a = self.args
        N = batch.tokens.shape[0]
        masks = [self._mask(grp, cache.block_size) for grp in batch.groups]  # computed once for all layers
        # index_select: 3-5x faster than advanced indexing for these row gathers on CPU
        cos, sin = (t.index_select(0, batch.positions)[None] for t in (self.rope_cos, self.rope_sin))  # [1, N, d/2]
        h = self.tok_embeddings.index_select(0, batch.tokens)[None]  # [1, N, D]
        # Steps whose attention reads only the cache (no ``fresh`` chunks attending to their own keys) take
        # q from the fused RoPE + cache write and never hold k and v apart (fp caches; int8 quantizes them).
        write_fused = self.paged_kernel and not cache.int8 and all(grp.kind != "fresh" for grp in batch.groups)
        for i in range(a.n_layers):
            if write_fused:
                x = ops.rms_norm(h, self.layers[i]["attention_norm"], a.norm_eps, fused=a.fused_ops)
                qkv = self._linear(i, "wqkv", x)[0]  # [N, (Hq + 2 Hk) d]
                q = serving_ops.rope_cache_write(qkv, cos[0], sin[0], cache.k[i], cache.v[i], batch.slots, a.n_heads)
                k = v = None
            else:
                q, k, v = self._qkv(i, h, cos, sin)  # [1, N, H, d]
                q, k, v = q[0], k[0], v[0]
                cache.write(i, batch.slots, k, v)
            out = self._attention(i, q, k, v, batch.groups, masks, cache)  # [N, Hq, d]
            h = self._linear(i, "wo", out.view(1, N, -1), residual=h)
            h = self._ffn(i, h)
        return self._head(h[0].index_select(0, batch.logits_index))  # [M, V]

    def _mask(self, grp: AttentionGroup, block_size: int) -> Optional[torch.Tensor]:
        """The additive (``decode``) or boolean (``cached``) mask of a padded group; None for the others."""
        if grp.kind == "decode":
            S = grp.block_tables.shape[1] * block_size
            hidden = torch.arange(S, device=grp.context.device)[None, :] >= grp.context[:, None]  # [b, S]
            bias = torch.zeros(hidden.shape, dtype=self.dtype, device=hidden.device).masked_fill_(hidden, float("-inf"))
            return bias[None].expand(self.args.n_kv_heads, -1, -1).reshape(-1, 1, S)  # [Hk b, 1, S]
        if grp.kind == "cached":
            key_pos = torch.arange(grp.block_tables.shape[1] * block_size, device=grp.query_positions.device)  # [S]
            return (key_pos[None, None, :] <= grp.query_positions[:, :, None])[:, None]  # [b, 1, T, S]
        return None

    def _attention(self, i: int, q: torch.Tensor, k: Optional[torch.Tensor], v: Optional[torch.Tensor],
                   groups: list[AttentionGroup], masks: list[Optional[torch.Tensor]], cache: PagedKVCache) -> torch.Tensor:
        """Layer i's attention output [N, Hq, d] for the step's queries q [N, Hq, d], group by group; k, v
        [N, Hk, d] are the step's own keys/values (needed by ``fresh`` groups only)."""
        a = self.args
        g, scale = a.n_groups, 1.0 / math.sqrt(a.head_dim)
        scales = (cache.k_scale[i], cache.v_scale[i]) if cache.int8 else (None, None)
        if len(groups) == 1 and groups[0].kind == "paged":  # the usual step: the kernel's output is the whole output
            return serving_ops.paged_decode_attention(q, cache.k[i], cache.v[i], groups[0].block_tables,
                                                      groups[0].context, scale, *scales)
        out = torch.empty_like(q)
        for grp, mask in zip(groups, masks):
            rows = slice(grp.start, grp.stop)
            if grp.kind == "paged":
                out[rows] = serving_ops.paged_decode_attention(q[rows], cache.k[i], cache.v[i], grp.block_tables,
                                                               grp.context, scale, *scales)
                continue
            if grp.kind == "decode":
                keys, values = cache.gather(i, grp.block_tables)  # [Hk, b, S, d]
                out[rows] = decode_attention(q[rows], keys, values, mask, g)
                continue
            qi = grp.query_index
            b, T = qi.shape
            if grp.kind == "fresh":  # causal within the chunk; right padding is never seen by real rows
                o = F.scaled_dot_product_attention(q[qi].transpose(1, 2), k[qi].transpose(1, 2), v[qi].transpose(1, 2),
                                                   is_causal=True, enable_gqa=g > 1)
            else:
                keys, values = cache.gather(i, grp.block_tables)  # [Hk, b, S, d]
                o = F.scaled_dot_product_attention(q[qi].transpose(1, 2), keys.transpose(0, 1), values.transpose(0, 1),
                                                   attn_mask=mask, enable_gqa=g > 1)
            out[rows] = o.transpose(1, 2).reshape(b * T, a.n_heads, a.head_dim)[grp.real]
        return out
