"""Steady-state decoding without per-sequence Python: a run of plain greedy decode steps over a fixed set
of running sequences, their state in NumPy arrays.

Why: once every running sequence is decoding, a step of the general loop (``Scheduler.schedule``,
``LLM._order``/``_batch``/``_after_step``) spends ~5 us of interpreter time per sequence on bookkeeping
whose outcome is known in advance: each sequence adds one token at the next position, a new block is
needed exactly when that position starts one, and a greedy token is the argmax of its row. At 256
sequences that was ~1.3 ms a step, 10% of a 2-thread decode step of the serving benchmark. Here a step is
a handful of array operations; tokens are written to the ``Sequence`` objects when the run ends.

A run covers only what the general loop would do identically: it starts when the fused paged-attention
kernel serves the engine (the run's one ``paged`` attention group), nothing waits for admission, every
running sequence has all but its last token in the cache, samples greedily, wants no log-probabilities,
has no constraint on its tokens, and the step budget holds them all. It ends (after writing its tokens
back and publishing newly full blocks to the prefix cache, as ``Scheduler.computed`` does after every
step) before a step whose blocks are not free (the general loop then preempts) and after a step in which
a sequence finished (the general loop then admits the next requests).

Sequences with stop strings stay in the run: after each step their new token goes to their
``IncrementalText`` and only the text it completed is searched (``stop_cut``), as the general loop does
token by token; a stop string found ends the run like any finish, the text cut where the loop cuts it.
A run without such sequences skips that check (one empty-list test a step).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from puyu.serving.detokenize import IncrementalText, stop_cut
from puyu.serving.engine_model import AttentionGroup, PagedBatch
from puyu.serving.sampling import first_argmax
from puyu.serving.scheduler import Chunk, Scheduler, Sequence

if TYPE_CHECKING:
    from puyu.serving.llm import LLM, RequestOutput


def plain_decode(llm: LLM, sched: Scheduler) -> bool:
    """Whether the next steps are plain greedy decode steps of all running sequences (see the module)."""
    running = sched.running
    if not llm.model.paged_kernel or sched.waiting or not running or len(running) > llm.cfg.max_num_batched_tokens:
        return False
    for seq in running:
        p = seq.params
        if (not p.greedy or p.logprobs or p.top_logprobs or seq.constraint is not None
                or seq.num_computed != len(seq.tokens) - 1 or seq.wants_prompt_logprobs):
            return False
    return True


class DecodeRun:
    """The running sequences' decode state as arrays [b]: positions (= tokens in the cache), the last
    token, generated-token counts and limits, and block tables [b, max_blocks] padded with block 0; the
    sequences that keep a text (stop strings) and the stop-string cuts found during the run."""

    def __init__(self, llm: LLM, sched: Scheduler):
        self.llm, self.sched = llm, sched
        self.seqs: list[Sequence] = list(sched.running)
        self.bs = sched.block_size
        b = len(self.seqs)
        self.start = np.fromiter((s.num_computed for s in self.seqs), np.int64, b)
        self.pos = self.start.copy()
        self.tokens = np.fromiter((s.tokens[-1] for s in self.seqs), np.int64, b)
        self.n_out = np.fromiter((len(s.output) for s in self.seqs), np.int64, b)
        self.max_out = np.fromiter((s.params.max_tokens for s in self.seqs), np.int64, b)
        self.stop_at_eos = np.fromiter((not s.params.ignore_eos for s in self.seqs), bool, b)
        width = -(-llm.max_model_len // self.bs)
        self.tables = np.zeros((b, width), np.int64)
        self.n_blocks = np.fromiter((len(s.block_table) for s in self.seqs), np.int64, b)
        for i, s in enumerate(self.seqs):
            self.tables[i, :len(s.block_table)] = s.block_table
        self.rows = np.arange(b)
        self.texts: list[tuple[int, IncrementalText, list[str]]] = [
            (i, s.detok, s.params.stop) for i, s in enumerate(self.seqs) if s.detok is not None]
        self.text_rows = np.fromiter((i for i, _, _ in self.texts), np.int64, len(self.texts))
        self.cuts: dict[int, str] = {}  # row -> the text before its first stop string
        self.generated: list[np.ndarray] = []  # per step: the new token of every sequence [b]

    def run(self, outputs: list[Optional[RequestOutput]]) -> tuple[int, int]:
        """Steps until a sequence finishes or blocks run short; returns (steps, tokens generated)."""
        llm, b = self.llm, len(self.seqs)
        while True:
            need = np.flatnonzero(self.pos // self.bs >= self.n_blocks)  # positions that open a block
            if len(need) > self.sched.allocator.num_free:
                break
            for i in need.tolist():  # in running order, as Scheduler.schedule allocates
                block = self.sched.allocator.allocate()
                self.seqs[i].block_table.append(block)
                self.tables[i, self.n_blocks[i]] = block
            self.n_blocks[need] += 1
            width = int(self.pos.max()) // self.bs + 1
            tables = torch.from_numpy(np.ascontiguousarray(self.tables[:, :width]))
            slots = self.tables[self.rows, self.pos // self.bs] * self.bs + self.pos % self.bs
            positions = torch.from_numpy(self.pos.copy())
            batch = PagedBatch(torch.from_numpy(self.tokens), positions, torch.from_numpy(slots),
                               [AttentionGroup("paged", 0, b, block_tables=tables, context=positions + 1)],
                               torch.from_numpy(self.rows))
            logits = llm.model.forward_paged(batch, llm.cache)  # [b, V]
            self.tokens = first_argmax(logits.float())  # [b] int64
            self.generated.append(self.tokens)
            self.pos += 1
            self.n_out += 1
            done = (self.n_out >= self.max_out) | (self.pos + 1 >= llm.max_model_len) | \
                (self.stop_at_eos & np.isin(self.tokens, llm.eos_array))
            if self.texts:
                self._feed_texts()
            if done.any() or self.cuts:
                break
        self._write_back(outputs)
        return len(self.generated), len(self.generated) * b

    def _feed_texts(self) -> None:
        """The step's tokens into the texts kept, each searched for stop strings in its new text only
        (as ``LLM._finish_reason`` after each token); an EOS that ends its sequence is not text."""
        eos = self.llm.eos_set
        for (i, detok, stops), tok in zip(self.texts, self.tokens[self.text_rows].tolist()):
            if tok in eos and self.stop_at_eos[i]:
                continue
            if detok.extend([tok]) and stops:
                cut = stop_cut(detok, stops)
                if cut is not None:
                    self.cuts[i] = cut

    def _write_back(self, outputs: list[Optional[RequestOutput]]) -> None:
        """Append the run's tokens to the sequences, publish their full blocks (``Scheduler.computed``)
        and finish those that ended, as the general loop's ``_after_step`` would have."""
        if not self.generated:
            return
        new = np.stack(self.generated, axis=1).tolist()  # [b, steps]
        llm, sched = self.llm, self.sched
        for seq, start, toks in zip(self.seqs, self.start.tolist(), new):
            for tok in toks:
                seq.append(tok)
            sched.computed(Chunk(seq, start, len(toks)))
        for i, (seq, toks) in enumerate(zip(self.seqs, new)):
            cut = self.cuts.get(i)
            if cut is not None:  # its text already took the tokens: a second search would miss the stop
                seq.text = cut
                llm._finish(sched, seq, "stop", outputs)
            else:
                llm._finish_if_done(sched, seq, toks[-1], outputs)
