"""The inference-side InternLM2: engine tensors (fused QKV and gate/up, RoPE tables) and two forwards.

- ``forward_paged``: a flat ragged batch of token chunks from many sequences (prefill chunks and
  single decode tokens mixed), keys/values written to and read from a ``PagedKVCache`` through block
  tables. The linear layers see all tokens of the step as one [N, D] matrix, which is what makes
  continuous batching pay off; attention gathers each sequence's blocks into a padded [B, S] view.
- ``forward_dense``: plain causal [B, T] (no cache) for perplexity and AWQ calibration.

Both use the same fused ops as ``puyu.model`` (``ModelArgs.fused_ops``), so greedy decoding matches the
training-side model's reference generation token for token.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.nn.functional as F

from puyu.model import ops
from puyu.model.config import ModelArgs
from puyu.serving.kv_cache import PagedKVCache
from puyu.serving.quant import dequantize

Tensors = dict[str, torch.Tensor]
LINEARS = ("wqkv", "wo", "w13", "w2")
QUANT_PARTS = ("qweight", "scales", "zeros", "in_features", "act_scale")


class EngineLinear:
    """``y = x W^T`` from a dense weight, or from a weight-only quantized one dequantized on use
    (inputs divided by the AWQ ``act_scale`` first)."""

    def __init__(self, tensors: Tensors, dtype: torch.dtype):
        self.weight = tensors.get("weight")
        self.quant = {k: v for k, v in tensors.items() if k in QUANT_PARTS}
        self.act_scale = self.quant.pop("act_scale", None)
        self.dtype = dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is not None:
            return F.linear(x, self.weight)
        if self.act_scale is not None:
            x = x / self.act_scale.to(x.dtype)
        return F.linear(x, dequantize(self.quant, self.dtype))


def grouped_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, g: int) -> torch.Tensor:
    """Attention of q [B, T, Hq, d] over keys/values [Hk, B, S, d] where mask [B, T, S] allows.

    Plain batched matmuls with the g query heads of a KV head stacked as extra query rows, so keys and
    values are never repeated per query head nor copied again; on CPU this is several times faster than
    SDPA's flash kernel for the one-query-per-sequence shape of decoding. Padded query rows (all
    masked) give NaN and are never read.
    """
    B, T, Hq, d = q.shape
    Hk, S = keys.shape[0], keys.shape[2]
    qg = q.view(B, T, Hk, g, d).permute(2, 0, 3, 1, 4).reshape(Hk, B, g * T, d)
    scores = torch.matmul(qg, keys.transpose(-1, -2)).mul_(1.0 / math.sqrt(d))  # [Hk, B, g T, S]
    blocked = ~mask[:, None].expand(B, g, T, S).reshape(B, g * T, S)
    probs = scores.masked_fill_(blocked, float("-inf")).softmax(dim=-1)
    out = torch.matmul(probs, values)  # [Hk, B, g T, d]
    return out.view(Hk, B, g, T, d).permute(1, 3, 0, 2, 4).reshape(B, T, Hq, d)


@dataclasses.dataclass
class AttentionGroup:
    """Sequences whose attention is computed together: the decode group (one query each, matmul
    attention) or the prefill group (chunks of several queries, SDPA). Keeping them apart means decode
    rows are never padded to a prefill chunk's length."""

    block_tables: torch.Tensor  # [b, max_blocks] int64 (padded with 0; masked by position)
    query_index: torch.Tensor  # [b, T] int64 flat index of each sequence's i-th new token (pad: 0)
    query_positions: torch.Tensor  # [b, T] int64 position of that token (pad: -1, attends to nothing)
    token_index: torch.Tensor  # [n] int64 flat indices of the group's tokens
    seq_of_token: torch.Tensor  # [n] int64 row in the group
    offset_of_token: torch.Tensor  # [n] int64 query slot in that row


@dataclasses.dataclass
class PagedBatch:
    """One forward step over sequences contributing N tokens in total (flat, sequence after sequence)."""

    tokens: torch.Tensor  # [N] int64
    positions: torch.Tensor  # [N] int64, position of each token in its sequence
    slots: torch.Tensor  # [N] int64, cache slot (block * block_size + offset) each token's K/V goes to
    groups: list[AttentionGroup]
    logits_index: torch.Tensor  # [M] int64 flat rows whose logits are wanted


class EngineModel:
    """Engine tensors bound to ``args``; stateless apart from the weights (the KV cache is passed in)."""

    def __init__(self, args: ModelArgs, tensors: Tensors):
        self.args = args
        self.dtype = tensors["tok_embeddings.weight"].dtype
        self.tok_embeddings = tensors["tok_embeddings.weight"]  # [V, D]
        self.norm = tensors["norm.weight"]
        self.output = tensors["output.weight"] if "output.weight" in tensors else self.tok_embeddings
        self.rope_cos, self.rope_sin = tensors["rope.cos"], tensors["rope.sin"]  # [max_seq_len, d/2] fp32
        self.layers = []
        for i in range(args.n_layers):
            p = f"layers.{i}."
            layer = {"attention_norm": tensors[p + "attention_norm.weight"], "ffn_norm": tensors[p + "ffn_norm.weight"]}
            for name in LINEARS:
                parts = {k[len(p + name) + 1:]: v for k, v in tensors.items() if k.startswith(p + name + ".")}
                layer[name] = EngineLinear(parts, self.dtype)
            self.layers.append(layer)
        self.capture: Optional[dict[str, list[torch.Tensor]]] = None  # AWQ calibration: linear inputs

    @property
    def max_seq_len(self) -> int:
        return self.rope_cos.shape[0]

    def _linear(self, i: int, name: str, x: torch.Tensor) -> torch.Tensor:
        if self.capture is not None:
            self.capture.setdefault(f"layers.{i}.{name}", []).append(x.reshape(-1, x.shape[-1]).detach())
        return self.layers[i][name](x)

    def _qkv(self, i: int, x: torch.Tensor, positions: torch.Tensor):
        """x [B, T, D], positions [B, T] -> q [B, T, Hq, d], k and v [B, T, Hk, d] with RoPE applied."""
        a = self.args
        B, T, _ = x.shape
        h = ops.rms_norm(x, self.layers[i]["attention_norm"], a.norm_eps, fused=a.fused_ops)
        qkv = self._linear(i, "wqkv", h)  # [B, T, (Hq + 2 Hk) d], q | k | v
        q, k, v = qkv.split([a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim, a.n_kv_heads * a.head_dim], -1)
        q, k, v = (t.view(B, T, -1, a.head_dim) for t in (q, k, v))
        q, k = ops.apply_rope(q, k, self.rope_cos[positions], self.rope_sin[positions], fused=a.fused_ops)
        return q, k, v

    def _ffn(self, i: int, h: torch.Tensor) -> torch.Tensor:
        a = self.args
        x = ops.rms_norm(h, self.layers[i]["ffn_norm"], a.norm_eps, fused=a.fused_ops)
        gate, up = self._linear(i, "w13", x).chunk(2, dim=-1)  # [.., F] each
        return h + self._linear(i, "w2", ops.swiglu(gate, up, fused=a.fused_ops))

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(ops.rms_norm(h, self.norm, self.args.norm_eps, fused=self.args.fused_ops), self.output)

    @torch.no_grad()
    def forward_dense(self, tokens: torch.Tensor) -> torch.Tensor:
        """Causal logits [B, T, V] for tokens [B, T] (T <= max_seq_len)."""
        B, T = tokens.shape
        positions = torch.arange(T).expand(B, T)
        h = self.tok_embeddings[tokens]  # [B, T, D]
        for i in range(self.args.n_layers):
            q, k, v = self._qkv(i, h, positions)
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 is_causal=True, enable_gqa=self.args.n_groups > 1)
            h = h + self._linear(i, "wo", out.transpose(1, 2).reshape(B, T, -1))
            h = self._ffn(i, h)
        return self._head(h)

    @torch.no_grad()
    def forward_paged(self, batch: PagedBatch, cache: PagedKVCache) -> torch.Tensor:
        """Logits [M, V] for ``batch.logits_index``; writes the batch's keys/values into ``cache``."""
        a = self.args
        N = batch.tokens.shape[0]
        masks = []
        for grp in batch.groups:
            key_pos = torch.arange(grp.block_tables.shape[1] * cache.block_size)  # [S]
            masks.append(key_pos[None, None, :] <= grp.query_positions[:, :, None])  # [b, T, S]
        h = self.tok_embeddings[batch.tokens][None]  # [1, N, D]
        for i in range(a.n_layers):
            q, k, v = self._qkv(i, h, batch.positions[None])  # [1, N, H, d]
            cache.write(i, batch.slots, k[0], v[0])
            out = torch.empty(N, a.n_heads, a.head_dim, dtype=q.dtype)
            for grp, mask in zip(batch.groups, masks):
                keys, values = cache.gather(i, grp.block_tables)  # [Hk, b, S, d]
                qg = q[0][grp.query_index]  # [b, T, Hq, d]
                if qg.shape[1] == 1:
                    o = grouped_attention(qg, keys, values, mask, a.n_groups)
                else:
                    o = F.scaled_dot_product_attention(qg.transpose(1, 2), keys.transpose(0, 1), values.transpose(0, 1),
                                                       attn_mask=mask[:, None], enable_gqa=a.n_groups > 1).transpose(1, 2)
                out[grp.token_index] = o[grp.seq_of_token, grp.offset_of_token]  # [n, Hq, d]
            h = h + self._linear(i, "wo", out.reshape(1, N, -1))
            h = self._ffn(i, h)
        return self._head(h[0][batch.logits_index])  # [M, V]
