"""The InternLM2 transformer, single-device and readable; ``puyu.parallel`` shards it from outside.

Layout follows the released checkpoints so weights load without reshuffling: a packed ``wqkv`` per layer
in InternLM2's grouped order (for each KV head: its ``g`` query heads, then its key, then its value;
with ``qkv_bias`` its bias packed the same way, as Qwen2 has one),
``wo``, a SwiGLU FFN ``w2(silu(w1 x) * w3 x)``, pre-norm RMSNorms ``attention_norm``/``ffn_norm``, and
untied ``tok_embeddings``/``output`` (tied is an option: ``output`` then reuses the embedding matrix).

Inputs beyond plain causal LM:
- packed sequences: ``document_ids`` [B, T] marks which document each token belongs to; tokens attend only
  within their document and positions restart at 0 per document (unless ``positions`` is given);
- generation: a ``KVCache`` holds past keys/values; each call appends and attends to everything cached.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from puyu.model import ops
from puyu.model.config import ModelArgs
from puyu.model.document_attention import DocumentAttention
from puyu.model.rope import rope_cos_sin


class KVCache:
    """Keys and values of past tokens for every layer, preallocated to ``max_len`` positions.

    All rows of the batch advance together (generation of equal-length prompts or one prompt per row);
    ``length`` is the number of positions filled, which is also the position of the next token.
    """

    def __init__(self, args: ModelArgs, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (args.n_layers, batch_size, args.n_kv_heads, max_len, args.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # [L, B, Hk, S, d]
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, Hk, T, d] after the cached positions; return all keys/values [B, Hk, length+T, d]."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions needed, {self.max_len} allocated")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


def positions_from_document_ids(document_ids: torch.Tensor) -> torch.Tensor:
    """Per-document positions [B, T]: 0, 1, 2, ... restarting wherever the document id changes."""
    B, T = document_ids.shape
    idx = torch.arange(T, device=document_ids.device).expand(B, T)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    # index of the most recent document start at or before each token
    last_start = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - last_start


def block_inputs(
    args: ModelArgs,
    batch: int,
    length: int,
    device: torch.device,
    positions: torch.Tensor | None = None,  # [B, T] int64
    document_ids: torch.Tensor | None = None,  # [B, T] int, packed sequences
) -> tuple[torch.Tensor, torch.Tensor, DocumentAttention | None]:
    """What every block of a [B, T] row needs: RoPE tables [B, T, d/2] and the attention mask (None:
    plain causal; per-document causal when ``document_ids`` is given, positions restarting per document).

    The one place the training forwards (whole model, pipeline stage, finetuning stage) set up attention,
    so they cannot drift apart."""
    mask = None
    if document_ids is not None:
        mask = DocumentAttention(document_ids)
        if positions is None:
            positions = positions_from_document_ids(document_ids)
    if positions is None:
        positions = torch.arange(length, device=device).expand(batch, length)
    cos, sin = rope_cos_sin(args, positions)
    return cos, sin, mask


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, fused: bool):
        super().__init__()
        self.eps, self.fused = eps, fused
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps, fused=self.fused)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.n_groups = args.n_groups
        self.fused = args.fused_ops
        self.wqkv = nn.Linear(args.dim, (args.n_heads + 2 * args.n_kv_heads) * args.head_dim, bias=args.qkv_bias)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,  # [B, T, D]
        cos: torch.Tensor,  # [B, T, d/2]
        sin: torch.Tensor,
        mask: torch.Tensor | DocumentAttention | None,  # [B, 1, T, S] bool, packed documents, or plain causal
        cache: KVCache | None,
        layer_id: int,
    ) -> torch.Tensor:
        qkv = self.wqkv(x)  # [B, T, (Hq + 2 Hk) d]: T from here, as a sequence-parallel wqkv gathers x's T
        B, T = qkv.shape[:2]
        qkv = qkv.view(B, T, self.n_kv_heads, self.n_groups + 2, self.head_dim)
        q = qkv[..., : self.n_groups, :].reshape(B, T, self.n_heads, self.head_dim)  # [B, T, Hq, d]
        k, v = qkv[..., -2, :], qkv[..., -1, :]  # [B, T, Hk, d]
        q, k = ops.apply_rope(q, k, cos, sin, fused=self.fused)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, d]
        if cache is not None:
            k, v = cache.update(layer_id, k, v)  # [B, Hk, S, d]
        if isinstance(mask, DocumentAttention):
            out = mask.attend(q, k, v, enable_gqa=self.n_groups > 1)  # [B, Hq, T, d]
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None and cache is None, enable_gqa=self.n_groups > 1
            )  # [B, Hq, T, d]
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.fused = args.fused_ops
        self.w1 = nn.Linear(args.dim, args.ffn_hidden_dim, bias=False)  # gate
        self.w3 = nn.Linear(args.dim, args.ffn_hidden_dim, bias=False)  # up
        self.w2 = nn.Linear(args.ffn_hidden_dim, args.dim, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(ops.swiglu(self.w1(x), self.w3(x), fused=self.fused))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps, args.fused_ops)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps, args.fused_ops)

    def forward(self, x, cos, sin, mask, cache):
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, cache, self.layer_id)
        return h + self.feed_forward(self.ffn_norm(h))


def init_parameter(args: ModelArgs, name: str, p: torch.Tensor) -> None:
    """Initialise the parameter called ``name`` (its puyu name) in place: normal(0, init_std) for
    matrices, with the residual-stream outputs (wo, w2) scaled by 1/sqrt(2 * n_layers) so the residual
    variance does not grow with depth; ones for norms, zeros for biases. One rule per name, so a
    sharded model can draw each full parameter on its own (``puyu.parallel.meta_init``)."""
    if name.endswith(".bias"):
        nn.init.zeros_(p)
    elif p.dim() == 1:
        nn.init.ones_(p)
    else:
        std = args.init_std
        if name.endswith(("wo.weight", "w2.weight")):
            std = std / math.sqrt(2 * args.n_layers)
        nn.init.normal_(p, std=std)


class Transformer(nn.Module):
    """InternLM2 decoder. ``forward`` gives logits; ``loss`` gives the fused chunked cross-entropy."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, args) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps, args.fused_ops)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.init_weights()

    def init_weights(self) -> None:
        """Every parameter by :func:`init_parameter`'s rule."""
        for name, p in self.named_parameters():
            init_parameter(self.args, name, p)

    def hidden_states(
        self,
        tokens: torch.Tensor,  # [B, T] int64
        positions: torch.Tensor | None = None,  # [B, T] int64
        document_ids: torch.Tensor | None = None,  # [B, T] int, packed sequences
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states [B, T, D] (the input of the output projection)."""
        B, T = tokens.shape
        if cache is None:
            cos, sin, mask = block_inputs(self.args, B, T, tokens.device, positions, document_ids)
        else:
            if document_ids is not None:
                raise ValueError("packed sequences (document_ids) and a KV cache cannot be combined")
            if positions is None:
                positions = torch.arange(cache.length, cache.length + T, device=tokens.device).expand(B, T)
            mask = None
            if T > 1:  # a query at cache slot length+i sees slots 0..length+i
                key_slot = torch.arange(cache.length + T, device=tokens.device)
                query_slot = torch.arange(cache.length, cache.length + T, device=tokens.device)
                mask = (key_slot[None, :] <= query_slot[:, None])[None, None]  # [1, 1, T, S]
            cos, sin = rope_cos_sin(self.args, positions)  # [B, T, d/2]
        h = self.tok_embeddings(tokens)  # [B, T, D]
        for layer in self.layers:
            h = layer(h, cos, sin, mask, cache)
        if cache is not None:
            cache.length += T
        return self.norm(h)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, vocab] (in the parameters' dtype)."""
        return self.output(self.hidden_states(tokens, positions, document_ids, cache))

    def loss(
        self,
        tokens: torch.Tensor,  # [B, T]
        labels: torch.Tensor,  # [B, T] int64, ignore_index where no loss
        positions: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        ignore_index: int = -100,
    ) -> torch.Tensor:
        """Mean next-token cross-entropy over labelled tokens; never holds the [B*T, vocab] logits when
        ``fused_ops`` is on (chunked and fused with the output projection)."""
        h = self.hidden_states(tokens, positions, document_ids)
        return ops.linear_cross_entropy(
            h.flatten(0, 1), self.output.weight, labels.flatten(), ignore_index=ignore_index, fused=self.args.fused_ops
        )


@torch.no_grad()
def generate(model: Transformer, prompt: torch.Tensor, max_new_tokens: int, use_cache: bool = True) -> torch.Tensor:
    """Greedy decoding: prompt [B, T] -> [B, T + max_new_tokens]. Without the cache every step reruns
    the whole sequence, which is the reference the cached path must match token for token."""
    tokens = prompt
    if not use_cache:
        for _ in range(max_new_tokens):
            next_tok = model(tokens)[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, next_tok], dim=1)
        return tokens
    p = next(model.parameters())
    cache = KVCache(model.args, prompt.shape[0], prompt.shape[1] + max_new_tokens, p.device, p.dtype)
    logits = model(prompt, cache=cache)
    for step in range(max_new_tokens):
        next_tok = logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
        tokens = torch.cat([tokens, next_tok], dim=1)
        if step + 1 < max_new_tokens:
            logits = model(next_tok, cache=cache)
    return tokens
