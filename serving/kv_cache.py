"""Paged KV cache: fixed-size blocks of token slots, a block allocator with reference counts, and
prefix caching of full blocks by content hash.

Why paging: a sequence owns a list of blocks (its block table) that grows a block at a time, so memory
is committed as tokens arrive instead of for the longest possible sequence, and the total is fixed up
front (the scheduler can never exceed it). Why hashes: a full block is identified by the hash of its
tokens chained with its predecessor's hash (so equal hashes mean equal prefixes); a new request whose
prompt starts with cached blocks shares them (reference count + 1) and skips their computation. A block
whose count drops to 0 stays cached and reusable until the allocator needs it for something else
(least recently freed first).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch

from puyu.model.config import ModelArgs


class PagedKVCache:
    """Keys/values [L, Hk, num_blocks, block_size, d] in the model dtype, or int8 with one fp32 scale per
    token and head (symmetric, absmax) when ``kv_dtype == "int8"``, on the model's device.

    Heads lead so that gathering a batch's blocks gives [Hk, B, S, d] contiguous: attention then runs
    as batched matmuls over (Hk, B) without another copy of the keys and values.
    """

    def __init__(self, args: ModelArgs, num_blocks: int, block_size: int, dtype: torch.dtype, kv_dtype: str = "fp",
                 device: torch.device | str = "cpu"):
        self.block_size, self.num_blocks, self.dtype = block_size, num_blocks, dtype
        self.int8 = kv_dtype == "int8"
        shape = (args.n_layers, args.n_kv_heads, num_blocks, block_size, args.head_dim)
        store = torch.int8 if self.int8 else dtype
        self.k = torch.zeros(shape, dtype=store, device=device)
        self.v = torch.zeros(shape, dtype=store, device=device)
        if self.int8:
            self.k_scale = torch.zeros(shape[:-1], dtype=torch.float32, device=device)  # [L, Hk, nb, bs]
            self.v_scale = torch.zeros(shape[:-1], dtype=torch.float32, device=device)

    @staticmethod
    def bytes_per_block(args: ModelArgs, block_size: int, dtype: torch.dtype, kv_dtype: str) -> int:
        per_value = 1 if kv_dtype == "int8" else torch.empty(0, dtype=dtype).element_size()
        per_token_head = args.head_dim * per_value + (4 if kv_dtype == "int8" else 0)
        return 2 * args.n_layers * block_size * args.n_kv_heads * per_token_head

    def nbytes(self) -> int:
        total = self.k.nbytes + self.v.nbytes
        if self.int8:
            total += self.k_scale.nbytes + self.v_scale.nbytes
        return total

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v [N, Hk, d] at flat slots [N]."""
        Hk, d = self.k.shape[1], self.k.shape[-1]
        for t, store, scale in ((k, self.k, "k_scale"), (v, self.v, "v_scale")):
            flat = store[layer].view(Hk, -1, d)  # [Hk, nb * bs, d]
            t = t.transpose(0, 1)  # [Hk, N, d]
            if not self.int8:
                flat.index_copy_(1, slots, t.to(self.dtype))
                continue
            s = (t.float().abs().amax(dim=-1) / 127.0).clamp(min=1e-8)  # [Hk, N]
            flat.index_copy_(1, slots, torch.round(t.float() / s[..., None]).clamp(-127, 127).to(torch.int8))
            getattr(self, scale)[layer].view(Hk, -1).index_copy_(1, slots, s)

    def gather(self, layer: int, block_tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [Hk, B, max_blocks * block_size, d] of the blocks in block_tables [B, max_blocks]."""
        B = block_tables.shape[0]
        flat_tables = block_tables.reshape(-1)
        out = []
        for store, scale in ((self.k, "k_scale"), (self.v, "v_scale")):
            t = store[layer].index_select(1, flat_tables)  # [Hk, B * mb, bs, d]
            if self.int8:
                t = t.to(self.dtype) * getattr(self, scale)[layer].index_select(1, flat_tables)[..., None].to(self.dtype)
            out.append(t.view(t.shape[0], B, -1, t.shape[-1]))
        return out[0], out[1]


def block_hash(parent: Optional[int], tokens: tuple[int, ...]) -> int:
    """Content hash of a full block chained with its predecessor's (equal hashes = equal prefixes)."""
    return hash((parent, tokens))


class BlockAllocator:
    """Reference-counted blocks; free blocks ordered least recently freed first, cached ones reusable."""

    def __init__(self, num_blocks: int, prefix_caching: bool):
        self.num_blocks = num_blocks
        self.prefix_caching = prefix_caching
        self.ref = [0] * num_blocks
        self.hash_of: list[Optional[int]] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.peak_used = 0
        self.prefix_hits = 0  # blocks reused from the prefix cache

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def allocate(self) -> int:
        if not self.free:
            raise RuntimeError("KV cache out of blocks (the scheduler should have prevented this)")
        block, _ = self.free.popitem(last=False)
        if self.hash_of[block] is not None:  # evict its cached content
            self.cached.pop(self.hash_of[block], None)
            self.hash_of[block] = None
        self.ref[block] = 1
        self.peak_used = max(self.peak_used, self.num_used)
        return block

    def release(self, blocks: list[int]) -> None:
        for block in reversed(blocks):  # the tail of a sequence is evicted before its shared prefix
            self.ref[block] -= 1
            if self.ref[block] == 0:
                self.free[block] = None

    def lookup(self, h: int) -> Optional[int]:
        return self.cached.get(h) if self.prefix_caching else None

    def share(self, block: int) -> None:
        """Take a reference to a cached block (reviving it from the free list if unreferenced)."""
        if self.ref[block] == 0:
            del self.free[block]
        self.ref[block] += 1
        self.prefix_hits += 1
        self.peak_used = max(self.peak_used, self.num_used)

    def register(self, block: int, h: int) -> None:
        """Record a block that just became full; the first block with given content wins."""
        if self.prefix_caching and self.hash_of[block] is None and h not in self.cached:
            self.cached[h] = block
            self.hash_of[block] = h
