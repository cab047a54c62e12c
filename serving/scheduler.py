"""Continuous batching over a fixed pool of KV blocks: sequences, and the scheduler that picks each step's work.

Every step the scheduler fills a token budget (``max_num_batched_tokens``): first the running sequences
(one decode token each, or the next chunk of a prompt still being prefilled), then new requests in
arrival order while their blocks fit. Admission never preempts. When a running sequence needs a block
and none is free, the most recently admitted running sequence is preempted by recomputation: its blocks
are released and it goes back to the front of the queue with its prompt and the tokens generated so far,
to be prefilled again (its full blocks usually survive in the prefix cache). Because all blocks come from
one allocator of fixed size, the KV memory in use can never exceed the configured budget.
"""
from __future__ import annotations

import dataclasses
from collections import deque
from typing import Any, Optional

import torch

from puyu.serving.config import RuntimeConfig, SamplingParams
from puyu.serving.detokenize import IncrementalText
from puyu.serving.kv_cache import BlockAllocator, block_hash


@dataclasses.dataclass(eq=False, slots=True)
class Sequence:
    """One request's state. ``num_computed`` tokens of ``tokens`` have their K/V in the cache."""

    index: int
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator
    output: list[int] = dataclasses.field(default_factory=list)
    num_computed: int = 0
    block_table: list[int] = dataclasses.field(default_factory=list)
    block_hashes: list[int] = dataclasses.field(default_factory=list)  # of the first full blocks
    prompt_logprobs: list[Optional[float]] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)  # per output token
    finish_reason: Optional[str] = None
    text: Optional[str] = None  # the output text cut at a stop string, once one appeared
    detok: Optional[IncrementalText] = None  # the output's text as it grows (stop strings, streaming)
    constraint: Any = None  # limits the next token (``json_constraint.JsonConstraint``); None: any token
    ngrams: Any = None  # where its n-grams occurred, for speculative drafts (``speculative.NgramIndex``)
    tokens: list[int] = dataclasses.field(init=False)  # prompt + output, kept up to date by append()

    def __post_init__(self) -> None:
        self.tokens = list(self.prompt) + self.output
        if self.params.prompt_logprobs and not self.prompt_logprobs:  # None before the first position asked for
            self.prompt_logprobs = [None] * max(1, min(self.params.prompt_logprobs_start, len(self.prompt)))

    def append(self, token: int) -> None:
        self.output.append(token)
        self.tokens.append(token)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.params.prompt_logprobs and len(self.prompt_logprobs) < len(self.prompt)

    @property
    def cacheable_tokens(self) -> int:
        """How many leading tokens may come from the prefix cache: all but the last, and none from the
        position whose logit gives the next prompt logprob still wanted."""
        limit = self.num_tokens - 1
        if self.wants_prompt_logprobs:
            limit = min(limit, len(self.prompt_logprobs) - 1)
        return limit


@dataclasses.dataclass(slots=True)
class Chunk:
    """Tokens ``[start, start + n)`` of ``seq`` computed in this step; the last ``draft`` of them are
    speculative tokens still to be verified (``speculative``)."""

    seq: Sequence
    start: int
    n: int
    draft: int = 0

    @property
    def completes(self) -> bool:
        """The chunk reaches the sequence's last token, so its last logits choose the next token."""
        return self.start + self.n == self.seq.num_tokens


class Scheduler:
    def __init__(self, cfg: RuntimeConfig, num_blocks: int):
        self.cfg = cfg
        self.block_size = cfg.block_size
        self.allocator = BlockAllocator(num_blocks, cfg.prefix_caching)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0

    def reset_counters(self) -> None:
        """Start the statistics of a new ``generate`` call (cached blocks are kept)."""
        self.preemptions = 0
        self.allocator.prefix_hits = 0
        self.allocator.peak_used = self.allocator.num_used

    def abort_all(self) -> None:
        """Drop every unfinished sequence (a failed ``generate`` must not leak into the next one)."""
        for seq in self.running:
            self.allocator.release(seq.block_table)
        self.running.clear()
        self.waiting.clear()

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def abort(self, seq: Sequence) -> None:
        """Drop one unfinished sequence (its HTTP client went away), releasing its blocks."""
        if seq in self.running:
            self.allocator.release(seq.block_table)
            seq.block_table = []
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _preempt(self, seq: Sequence) -> None:
        self.allocator.release(seq.block_table)
        seq.block_table, seq.block_hashes, seq.num_computed = [], [], 0
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def _prefix_hits(self, seq: Sequence, pending: dict[int, int]) -> tuple[list[int], list[int]]:
        """Cached blocks (and their hashes) covering a prefix of ``seq`` within its ``cacheable_tokens``.

        ``pending``: blocks that chunks scheduled earlier in this step fill (hash -> block). Sharing one is
        exact: every layer writes the whole step's keys/values into the cache before any attention reads it.
        """
        blocks, hashes, parent = [], [], None
        tokens, bs = seq.tokens, self.block_size
        for j in range(seq.cacheable_tokens // bs):
            h = block_hash(parent, tuple(tokens[j * bs:(j + 1) * bs]))
            block = self.allocator.lookup(h)
            if block is None:
                block = pending.get(h)
                if block is None:
                    break
            blocks.append(block)
            hashes.append(h)
            parent = h
        return blocks, hashes

    def _fills(self, seq: Sequence, stop: int, pending: dict[int, int]) -> None:
        """Record in ``pending`` the blocks of ``seq`` that its chunk ending at token ``stop`` makes full."""
        bs = self.block_size
        parent = seq.block_hashes[-1] if seq.block_hashes else None
        for j in range(len(seq.block_hashes), stop // bs):
            parent = block_hash(parent, tuple(seq.tokens[j * bs:(j + 1) * bs]))
            pending.setdefault(parent, seq.block_table[j])

    def schedule(self) -> list[Chunk]:
        budget = self.cfg.max_num_batched_tokens
        chunks: list[Chunk] = []
        alloc = self.allocator
        pending: dict[int, int] = {}  # blocks this step's chunks fill, for requests admitted after them
        share = alloc.prefix_caching and bool(self.waiting)
        i = 0
        bs = self.block_size
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            done = seq.num_computed
            n = min(len(seq.tokens) - done, budget)
            need = -(-(done + n) // bs) - len(seq.block_table)
            if need > 0:
                while need > alloc.num_free and self.running[-1] is not seq:
                    self._preempt(self.running[-1])
                if need > alloc.num_free:  # it is the lowest-priority one left: it yields
                    self._preempt(seq)
                    break
                seq.block_table += [alloc.allocate() for _ in range(need)]
            chunks.append(Chunk(seq, done, n))
            if share:
                self._fills(seq, seq.num_computed + n, pending)
            budget -= n
            i += 1
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs:
            seq = self.waiting[0]
            hits, hashes = self._prefix_hits(seq, pending)
            start = len(hits) * self.block_size
            n = min(seq.num_tokens - start, budget)
            revived = sum(1 for b in hits if alloc.ref[b] == 0)
            need = self._blocks_for(start + n) - len(hits)
            if need + revived > alloc.num_free:
                break
            for b in hits:
                alloc.share(b)
            seq.block_table = hits + [alloc.allocate() for _ in range(need)]
            seq.block_hashes, seq.num_computed = hashes, start
            self.waiting.popleft()
            self.running.append(seq)
            chunks.append(Chunk(seq, start, n))
            budget -= n
            if share:
                self._fills(seq, start + n, pending)
        return chunks

    def computed(self, chunk: Chunk) -> None:
        """After the forward: count the chunk's tokens as cached and publish newly full blocks."""
        seq, bs = chunk.seq, self.block_size
        seq.num_computed = chunk.start + chunk.n
        if seq.num_computed // bs == len(seq.block_hashes):  # no block became full (most decode steps)
            return
        tokens = seq.tokens
        for j in range(len(seq.block_hashes), seq.num_computed // bs):
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            h = block_hash(parent, tuple(tokens[j * bs:(j + 1) * bs]))
            self.allocator.register(seq.block_table[j], h)
            seq.block_hashes.append(h)

    def finish(self, seq: Sequence) -> None:
        self.allocator.release(seq.block_table)
        seq.block_table = []
        self.running.remove(seq)
