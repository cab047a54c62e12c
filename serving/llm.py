"""``LLM``: the offline runtime. ``generate(prompts, sampling)`` runs every request to completion with
continuous batching over a paged KV cache, prefix caching and chunked prefill.

Prompts are strings (needs a tokenizer) or lists of token ids. A request that cannot be served (empty,
longer than the model or the KV cache allows, bad sampling values) gets a ``RequestOutput`` with
``error`` set and the others go on: batch jobs turn it into an error record.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Optional, Sequence as Seq, Union

import torch

from puyu.model import Transformer
from puyu.model.state_dict import puyu_state_dict
from puyu.serving.config import RuntimeConfig, SamplingParams, ServingError
from puyu.serving.engine import Engine, engine_tensors, load_engine
from puyu.serving.engine_model import AttentionGroup, EngineModel, PagedBatch
from puyu.serving.kv_cache import PagedKVCache
from puyu.serving.sampling import sample_rows
from puyu.serving.scheduler import Chunk, Scheduler, Sequence
from puyu.serving.tokenizer import IM_END, TextTokenizer, chat_prompt

Prompt = Union[str, list[int]]
DECODE_BUCKET = 64  # decode sequences per attention group


@dataclasses.dataclass
class RequestOutput:
    index: int
    prompt_token_ids: list[int] = dataclasses.field(default_factory=list)
    token_ids: list[int] = dataclasses.field(default_factory=list)
    text: Optional[str] = None
    finish_reason: Optional[str] = None  # "stop" (EOS or a stop string) | "length"
    logprobs: Optional[list[float]] = None
    prompt_logprobs: Optional[list[Optional[float]]] = None  # first entry None: nothing predicts it
    error: Optional[str] = None

    def to_record(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


class LLM:
    """The runtime over one engine (a directory, an ``Engine`` or a ``Transformer`` turned into one)."""

    def __init__(self, engine: Union[str, Path, Engine, EngineModel], tokenizer: Union[str, Path, TextTokenizer, None] = None,
                 runtime: Optional[RuntimeConfig] = None, kv_dtype: Optional[str] = None):
        self.cfg = runtime or RuntimeConfig()
        self.cfg.validate()
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        if isinstance(engine, (str, Path)):
            engine = load_engine(engine)
        if isinstance(engine, Engine):
            tokenizer = tokenizer or engine.tokenizer_path
            kv_dtype = kv_dtype or engine.config.get("build", {}).get("kv")
            engine = EngineModel(engine.args, engine.tensors)
        self.model = engine
        self.args = engine.args
        self.tokenizer = TextTokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
        self.eos_id = self.tokenizer.eos_id if self.tokenizer else 0
        self.kv_dtype = kv_dtype if kv_dtype and self.cfg.kv_dtype == "fp" else self.cfg.kv_dtype
        bs = self.cfg.block_size
        self.block_bytes = PagedKVCache.bytes_per_block(self.args, bs, engine.dtype, self.kv_dtype)
        self.num_blocks = self.cfg.num_blocks or (self.cfg.kv_cache_mb * 2**20) // self.block_bytes
        if self.num_blocks < 1:
            raise ServingError(f"runtime: kv_cache_mb={self.cfg.kv_cache_mb} holds no {self.block_bytes}-byte block")
        self.cache = PagedKVCache(self.args, self.num_blocks, bs, engine.dtype, self.kv_dtype)
        self.max_model_len = min(self.cfg.max_model_len or engine.max_seq_len, engine.max_seq_len)
        # one scheduler for the runtime's life, so cached prefix blocks outlive a generate() call
        self.scheduler = Scheduler(self.cfg, self.num_blocks)
        self.stats: dict = {}

    @classmethod
    def from_model(cls, model: Transformer, tokenizer=None, runtime: Optional[RuntimeConfig] = None,
                   kv_dtype: Optional[str] = None) -> "LLM":
        """An in-memory engine from a training-side model (unquantized, in its dtype)."""
        dtype = next(model.parameters()).dtype
        tensors = engine_tensors(model.args, {k: v.detach() for k, v in puyu_state_dict(model).items()}, dtype)
        return cls(EngineModel(model.args, tensors), tokenizer, runtime, kv_dtype)

    # ---- requests ----------------------------------------------------------------------------------
    def _tokens(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ServingError("a text prompt needs a tokenizer (engine without tokenizer.json): pass token ids")
            return self.tokenizer.encode(prompt)
        if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) for t in prompt):
            raise ServingError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        bad = [t for t in prompt if not 0 <= t < self.args.vocab_size]
        if bad:
            raise ServingError(f"prompt token id(s) {bad[:5]} outside the vocabulary [0, {self.args.vocab_size})")
        return list(prompt)

    def _sequence(self, index: int, prompt: Prompt, params: SamplingParams) -> Sequence:
        params.validate()
        tokens = self._tokens(prompt)
        if not tokens:
            raise ServingError("empty prompt")
        total = len(tokens) + params.max_tokens
        if total > self.max_model_len:
            raise ServingError(f"prompt ({len(tokens)} tokens) + max_tokens ({params.max_tokens}) = {total} "
                               f"exceeds the model length {self.max_model_len}")
        if -(-total // self.cfg.block_size) > self.num_blocks:
            raise ServingError(f"prompt + max_tokens = {total} tokens exceed the whole KV cache "
                               f"({self.num_blocks} blocks of {self.cfg.block_size})")
        seed = params.seed if params.seed is not None else self.cfg.seed * 1_000_003 + index
        return Sequence(index, tokens, params, torch.Generator().manual_seed(seed))

    def chat(self, conversations: list[list[dict]], sampling: Union[SamplingParams, list[SamplingParams], None] = None):
        """``generate`` over InternLM2 chat renderings; ``<|im_end|>`` is added to the stop strings."""
        params = self._params(sampling, len(conversations))
        prompts, errors = [], {}
        for i, conv in enumerate(conversations):
            try:
                prompts.append(chat_prompt(conv))
            except ServingError as exc:
                prompts.append("")  # served as an empty prompt's error, then replaced below
                errors[i] = str(exc)
        params = [dataclasses.replace(p, stop=list(p.stop) + [IM_END]) for p in params]
        outs = self.generate(prompts, params)
        for i, msg in errors.items():
            outs[i] = RequestOutput(i, error=msg)
        return outs

    @staticmethod
    def _params(sampling, n: int) -> list[SamplingParams]:
        if sampling is None or isinstance(sampling, SamplingParams):
            return [sampling or SamplingParams()] * n
        if len(sampling) != n:
            raise ServingError(f"{len(sampling)} sampling params for {n} prompts")
        return list(sampling)

    # ---- the loop ----------------------------------------------------------------------------------
    def generate(self, prompts: Seq[Prompt], sampling: Union[SamplingParams, list[SamplingParams], None] = None
                 ) -> list[RequestOutput]:
        params = self._params(sampling, len(prompts))
        outputs: list[Optional[RequestOutput]] = [None] * len(prompts)
        sched = self.scheduler
        sched.reset_counters()
        t0, steps, out_tokens = time.perf_counter(), 0, 0
        try:
            for i, (prompt, p) in enumerate(zip(prompts, params)):
                try:
                    sched.add(self._sequence(i, prompt, p))
                except ServingError as exc:
                    outputs[i] = RequestOutput(i, error=str(exc))
            while sched.has_work():
                chunks = sched.schedule()
                if not chunks:
                    raise RuntimeError("scheduler made no progress (a request cannot fit the KV cache)")
                logits_rows = self._logits_rows(chunks)
                batch = self._batch(chunks, logits_rows)
                logits = self.model.forward_paged(batch, self.cache).float()  # [M, V]
                steps += 1
                out_tokens += self._after_step(sched, chunks, logits_rows, logits, outputs)
        except BaseException:
            sched.abort_all()
            raise
        elapsed = time.perf_counter() - t0
        self.stats = {"requests": len(prompts), "steps": steps, "output_tokens": out_tokens,
                      "seconds": elapsed, "output_tokens_per_s": out_tokens / elapsed if elapsed else 0.0,
                      "preemptions": sched.preemptions, "prefix_cache_block_hits": sched.allocator.prefix_hits,
                      "kv_blocks": self.num_blocks, "kv_block_bytes": self.block_bytes,
                      "kv_peak_blocks": sched.allocator.peak_used,
                      "kv_peak_bytes": sched.allocator.peak_used * self.block_bytes}
        return outputs  # type: ignore[return-value]

    def _logits_rows(self, chunks: list[Chunk]) -> list[list[int]]:
        """Per chunk, the positions whose logits are needed: prompt positions still lacking a logprob,
        and the last token when the chunk completes the sequence."""
        rows = []
        for c in chunks:
            seq, r = c.seq, []
            if seq.wants_prompt_logprobs:
                first = max(c.start, len(seq.prompt_logprobs) - 1)
                r = list(range(first, min(c.start + c.n, len(seq.prompt) - 1)))
            if c.completes and (not r or r[-1] != c.start + c.n - 1):
                r.append(c.start + c.n - 1)
            rows.append(r)
        return rows

    def _batch(self, chunks: list[Chunk], logits_rows: list[list[int]]) -> PagedBatch:
        """Flatten the step's chunks into one ragged batch (see ``PagedBatch``)."""
        bs = self.cfg.block_size
        tokens, positions, slots, logits_index, starts = [], [], [], [], []
        for c, rows in zip(chunks, logits_rows):
            base = len(tokens)
            starts.append(base)
            pos = range(c.start, c.start + c.n)
            tokens += c.seq.tokens[c.start:c.start + c.n]
            positions += pos
            slots += [c.seq.block_table[p // bs] * bs + p % bs for p in pos]
            logits_index += [base + p - c.start for p in rows]
        # decode rows by context length, in buckets, so few are padded far beyond their own length
        decode = sorted((b for b, c in enumerate(chunks) if c.n == 1), key=lambda b: chunks[b].start)
        buckets = [decode[i:i + DECODE_BUCKET] for i in range(0, len(decode), DECODE_BUCKET)]
        prefill = [b for b, c in enumerate(chunks) if c.n > 1]
        groups = [self._group([chunks[b] for b in members], [starts[b] for b in members])
                  for members in buckets + [prefill] if members]
        t = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
        return PagedBatch(t(tokens), t(positions), t(slots), groups, t(logits_index))

    def _group(self, chunks: list[Chunk], starts: list[int]) -> AttentionGroup:
        """Padded per-sequence views of some of the step's chunks (built as lists: one tensor each)."""
        bs = self.cfg.block_size
        tmax = max(c.n for c in chunks)
        mb = max(-(-(c.start + c.n) // bs) for c in chunks)
        qidx, qpos, tables, token_index, seq_of, off_of = [], [], [], [], [], []
        for b, (c, base) in enumerate(zip(chunks, starts)):
            pad = tmax - c.n
            qidx.append(list(range(base, base + c.n)) + [0] * pad)
            qpos.append(list(range(c.start, c.start + c.n)) + [-1] * pad)
            tables.append(c.seq.block_table + [0] * (mb - len(c.seq.block_table)))
            token_index += range(base, base + c.n)
            seq_of += [b] * c.n
            off_of += range(c.n)
        t = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
        return AttentionGroup(t(tables), t(qidx), t(qpos), t(token_index), t(seq_of), t(off_of))

    def _after_step(self, sched: Scheduler, chunks: list[Chunk], logits_rows: list[list[int]], logits: torch.Tensor,
                    outputs: list[Optional[RequestOutput]]) -> int:
        """Record prompt logprobs, sample for completed chunks, finish sequences; returns tokens generated."""
        logp = None
        if any(c.seq.params.logprobs or c.seq.wants_prompt_logprobs for c in chunks):
            logp = torch.log_softmax(logits, dim=-1)  # [M, V]
        row, sampled = 0, []
        for c, rows in zip(chunks, logits_rows):
            seq = c.seq
            sched.computed(c)
            for p in rows:
                if seq.wants_prompt_logprobs and p + 1 < len(seq.prompt):
                    if not seq.prompt_logprobs:
                        seq.prompt_logprobs.append(None)
                    if len(seq.prompt_logprobs) == p + 1:
                        seq.prompt_logprobs.append(float(logp[row, seq.prompt[p + 1]]))
                row += 1
            if c.completes:
                sampled.append((seq, row - 1))
        if not sampled:
            return 0
        seqs = [s for s, _ in sampled]
        idx = torch.tensor([r for _, r in sampled])
        new = sample_rows(logits[idx], [s.params for s in seqs], [s.tokens for s in seqs], [s.generator for s in seqs])
        for (seq, r), tok in zip(sampled, new):
            seq.output.append(tok)
            if seq.params.logprobs:
                seq.logprobs.append(float(logp[r, tok]))
            reason = self._finish_reason(seq, tok)
            if reason:
                seq.finish_reason = reason
                sched.finish(seq)
                outputs[seq.index] = self._output(seq)
        return len(sampled)

    def _finish_reason(self, seq: Sequence, tok: int) -> Optional[str]:
        p = seq.params
        if tok == self.eos_id and not p.ignore_eos:
            return "stop"
        if p.stop and self.tokenizer is not None:
            text = self.tokenizer.decode(seq.output)
            cut = min((text.find(s) for s in p.stop if s in text), default=-1)
            if cut >= 0:
                seq.text = text[:cut]
                return "stop"
        if len(seq.output) >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _output(self, seq: Sequence) -> RequestOutput:
        text = seq.text  # set when a stop string cut it
        if text is None and self.tokenizer is not None:
            ids = seq.output
            if ids and ids[-1] == self.eos_id and not seq.params.ignore_eos:
                ids = ids[:-1]
            text = self.tokenizer.decode(ids)
        return RequestOutput(seq.index, seq.prompt, list(seq.output), text, seq.finish_reason,
                             list(seq.logprobs) if seq.params.logprobs else None,
                             list(seq.prompt_logprobs) if seq.params.prompt_logprobs else None)
