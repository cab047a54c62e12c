"""Causal attention within each document of packed rows, without a [B, 1, T, T] mask.

Packed rows (SFT conversations, pretraining documents) must not attend across documents. A dense boolean
mask costs ``B·T²`` bytes and forces SDPA off its fused kernels; at T = 32k that is a gigabyte per row
before any score is computed. Here each document is attended on its own, varlen-style, with plain
``is_causal`` SDPA (flash kernels on CPU and GPU, no mask at all):

1. documents are the runs of equal ``document_ids`` in a row (they never span rows);
2. they are bucketed by length rounded up to a power of two (at least :data:`MIN_BUCKET`), so a bucket is one
   batched SDPA call over ``[n_docs, H, L, d]`` and padding at most doubles a document's work;
3. each document is right-padded inside its bucket: a causal query never sees the keys after it, so the
   padding needs no mask either, and the padded queries' outputs are dropped;
4. the outputs go back to their packed positions through one permutation (gathers only, so autograd
   scatters the gradients back by the same indices).

Memory is ``O(B·T·H·d)`` whatever T is. The plan (indices per bucket) is built once per forward and shared
by every layer. Rows shorter than :data:`DENSE_BELOW` tokens keep the dense mask: there it costs at most
B·64 KiB, and one masked SDPA call beats several small ones (on 2 CPU cores, `benchmarks/
bench_document_attention.py`: 0.75x at T=256, 0.9-1.2x at 512, 1.7-2.1x at 1024, 3.1x at 2048).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

MIN_BUCKET = 16  # shorter documents share one bucket: fewer SDPA calls for chat turns of a few tokens
DENSE_BELOW = 512  # rows shorter than this attend through one SDPA call with the dense mask


class DocumentAttention:
    """Per-document causal attention for packed rows of ``document_ids`` [B, T]."""

    def __init__(self, document_ids: torch.Tensor, dense_below: int = DENSE_BELOW):
        B, T = document_ids.shape
        device = document_ids.device
        self.shape = (B, T)
        self.mask = None  # [B, 1, T, T] bool for short rows
        if T < dense_below:
            causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
            self.mask = ((document_ids[:, :, None] == document_ids[:, None, :]) & causal)[:, None]
            return
        new = torch.ones_like(document_ids, dtype=torch.bool)
        new[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
        starts = new.flatten().nonzero().squeeze(1)  # [n_docs] flat index of each document's first token
        lengths = torch.diff(starts, append=torch.tensor([B * T], device=device))
        caps = torch.clamp(lengths, min=MIN_BUCKET).sub(1).log2().floor().add(1).exp2().long()
        self.buckets: list[tuple[torch.Tensor, torch.Tensor]] = []  # (gather index [n, L], valid [n, L])
        order = []
        for cap in torch.unique(caps).tolist():  # one host sync per forward: the bucket sizes
            sel = (caps == cap).nonzero().squeeze(1)
            offsets = torch.arange(cap, device=device)
            valid = offsets[None, :] < lengths[sel, None]
            index = torch.where(valid, starts[sel, None] + offsets[None, :], starts[sel, None])
            self.buckets.append((index, valid))
            order.append(index[valid])
        # packed position p's output is row inverse[p] of the buckets' concatenated valid outputs
        self.inverse = torch.empty(B * T, dtype=torch.long, device=device)
        order_cat = torch.cat(order)
        self.inverse[order_cat] = torch.arange(order_cat.numel(), device=device)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, enable_gqa: bool) -> torch.Tensor:
        """q [B, Hq, T, d], k and v [B, Hk, T, d] -> [B, Hq, T, d], as SDPA with the document-causal mask."""
        if self.mask is not None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, enable_gqa=enable_gqa)
        B, T = self.shape
        flat = [t.transpose(1, 2).reshape(B * T, t.shape[1], t.shape[3]) for t in (q, k, v)]  # [B*T, H, d]
        pieces = []
        for index, valid in self.buckets:
            qb, kb, vb = (t[index].transpose(1, 2) for t in flat)  # [n, H, L, d]
            out = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, enable_gqa=enable_gqa)
            pieces.append(out.transpose(1, 2)[valid])  # [n_valid, Hq, d]
        out = torch.cat(pieces)[self.inverse]  # [B*T, Hq, d] in packed order
        return out.view(B, T, q.shape[1], q.shape[3]).transpose(1, 2)
