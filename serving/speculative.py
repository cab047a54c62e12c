"""N-gram prompt-lookup speculative decoding (vLLM's ``ngram`` method, HF's ``prompt_lookup_num_tokens``):
``runtime.speculative=ngram``.

Why: a decode step computes one token per sequence, yet when the output copies its context (quoting,
editing, extracting, repeating) the next tokens can be read off that context. Greedy decoding stays
exact: the drafted tokens are verified in the same forward pass that computes the last real token, and
only those equal to the model's own argmax are kept, so the output is token for token what plain
greedy decoding gives (up to floating-point summation order between a 1-row and a k+1-row forward); a
step just yields 1 to k+1 tokens instead of 1.

A step: after ``Scheduler.schedule``, ``NgramSpeculator.extend`` looks, for each decoding greedy sequence
(no log-probabilities, no constraint), for its last n tokens (n from ``prompt_lookup_max`` down to
``prompt_lookup_min``) earlier in its prompt + output, and appends the (at most
``num_speculative_tokens``) tokens that followed their latest occurrence to the sequence's tokens and to
its decode chunk, which grows from 1 to k+1 positions (within the step's token budget and the free KV
blocks; new blocks are allocated for the drafted positions). The chunk goes through the forward as a
prompt chunk does (positions [start, start + k], causal over the paged cache), with logits at every
position (``LLM._logits_rows``). ``verify`` then takes the argmax of each row, accepts the longest
prefix of the draft equal to it, appends the accepted tokens and the model's token after them one at a
time through the general loop's finish checks (EOS, stop strings, lengths: a finish mid-draft drops the
rest), counts as cached only the verified positions (so rejected ones are never published to the prefix
cache; their KV slots are overwritten by later steps) and releases the blocks that only rejected
positions used. Decode runs are off while speculating: every step goes through the general loop.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from puyu.serving.config import RuntimeConfig
from puyu.serving.sampling import argmax_rows
from puyu.serving.scheduler import Chunk, Scheduler

if TYPE_CHECKING:
    from puyu.serving.llm import LLM


class NgramIndex:
    """One sequence's n-grams (n in [min_n, max_n], as token tuples) -> the position after their latest
    occurrence that is not the sequence's end. Built incrementally: each verified token is indexed once,
    so a lookup costs O(max_n - min_n + 1) whatever the sequence's length."""

    __slots__ = ("after", "indexed")

    def __init__(self):
        self.after: dict[tuple[int, ...], int] = {}
        self.indexed = 0  # n-grams ending before position ``indexed`` are in ``after``

    def propose(self, tokens: list[int], k: int, min_n: int, max_n: int) -> list[int]:
        """Up to ``k`` tokens that followed the latest earlier occurrence of the longest matching suffix."""
        end = len(tokens) - 1  # n-grams ending at the last token are the suffix itself: not indexed yet
        for e in range(self.indexed, end):
            for n in range(min_n, min(max_n, e + 1) + 1):
                self.after[tuple(tokens[e - n + 1:e + 1])] = e + 1
        self.indexed = max(self.indexed, end)
        for n in range(min(max_n, len(tokens)), min_n - 1, -1):
            at = self.after.get(tuple(tokens[-n:]))
            if at is not None:
                return tokens[at:at + k]
        return []


class NgramSpeculator:
    """Drafts by prompt lookup and verifies them; counts drafted and accepted tokens."""

    def __init__(self, cfg: RuntimeConfig):
        self.k, self.min_n, self.max_n = cfg.num_speculative_tokens, cfg.prompt_lookup_min, cfg.prompt_lookup_max
        self.drafted = self.accepted = 0

    def reset_counters(self) -> None:
        self.drafted = self.accepted = 0

    def extend(self, llm: LLM, sched: Scheduler, chunks: list[Chunk]) -> None:
        """Grow the decode chunks of sequences that may speculate by their drafts (see the module)."""
        budget = llm.cfg.max_num_batched_tokens - sum(c.n for c in chunks)
        alloc, bs = sched.allocator, sched.block_size
        for c in chunks:
            if budget <= 0:
                return
            seq, p = c.seq, c.seq.params
            if (c.n != 1 or not c.completes or not p.greedy or p.logprobs or p.top_logprobs
                    or seq.constraint is not None):
                continue
            L = len(seq.tokens)
            # a+1 <= k+1 tokens are appended: neither max_tokens nor the model length may be passed, and
            # positions up to L-1+k need blocks (those held plus the free ones)
            k = min(self.k, budget, p.max_tokens - len(seq.output) - 1, llm.max_model_len - L - 1,
                    (len(seq.block_table) + alloc.num_free) * bs - L)
            if k <= 0:
                continue
            if seq.ngrams is None:
                seq.ngrams = NgramIndex()
            draft = seq.ngrams.propose(seq.tokens, k, self.min_n, self.max_n)
            if not draft:
                continue
            need = (L - 1 + len(draft)) // bs + 1 - len(seq.block_table)
            seq.block_table += [alloc.allocate() for _ in range(need)]
            seq.tokens += draft  # until verify: tokens [L, L+k) are the draft
            c.n += len(draft)
            c.draft = len(draft)
            budget -= len(draft)
            self.drafted += len(draft)

    def verify(self, llm: LLM, sched: Scheduler, drafted: list[tuple[Chunk, int]], logits: torch.Tensor,
               outputs) -> int:
        """Accept each drafted chunk's verified tokens; ``drafted``: (chunk, its first row of ``logits``
        [M, V]), the chunk's k+1 rows following. Returns the tokens appended."""
        rows = [r for c, first in drafted for r in range(first, first + c.n)]
        picked = logits if len(rows) == logits.shape[0] else logits[torch.tensor(rows, device=logits.device)]
        best = argmax_rows(picked)  # [R]: row j of a chunk predicts the token after position start + j
        made = at = 0
        for c, _ in drafted:
            seq, k = c.seq, c.draft
            target = best[at:at + c.n]
            at += c.n
            draft = seq.tokens[-k:]
            del seq.tokens[-k:]
            a = 0
            while a < k and draft[a] == target[a]:
                a += 1
            self.accepted += a
            reason = None
            for tok in draft[:a] + [target[a]]:  # one at a time, as the loop would have appended them
                seq.append(tok)
                made += 1
                reason = llm._finish_reason(seq, tok)
                if reason:
                    break
            sched.computed(Chunk(seq, c.start, len(seq.tokens) - 1 - c.start))  # the verified positions
            if reason:
                llm._finish(sched, seq, reason, outputs)
                continue
            keep = -(-seq.num_computed // sched.block_size)  # blocks holding cached positions
            sched.allocator.release(seq.block_table[keep:])
            del seq.block_table[keep:]
        return made
