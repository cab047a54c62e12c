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

import numpy as np
import torch

from puyu.model import Transformer
from puyu.model.state_dict import puyu_state_dict
from puyu.launcher.distributed import resolve_device
from puyu.launcher.stage import Progress
from puyu.serving.config import RuntimeConfig, SamplingParams, ServingError
from puyu.serving.decode_run import DecodeRun, plain_decode
from puyu.serving.detokenize import IncrementalText, stop_cut
from puyu.serving.engine import Engine, engine_tensors, is_quantized, open_engine, place_tensors
from puyu.serving.engine_model import AttentionGroup, EngineModel, PagedBatch
from puyu.serving.host_memory import cached_cpu_allocations
from puyu.serving.kv_cache import PagedKVCache
from puyu.serving.sampling import argmax_rows, sample_rows
from puyu.serving.scheduler import Chunk, Scheduler, Sequence
from puyu.serving.speculative import NgramSpeculator
from puyu.serving.tokenizer import IM_END, TextTokenizer, chat_prompt_ids, uses_internlm2

Prompt = Union[str, list[int]]
DECODE_BUCKET = 32  # decode sequences per attention group (smaller: less padding; 16-32 measured best)
PAGED_MAX_CHUNK = 128  # longest prompt chunk the paged-attention kernel takes (longer ones: SDPA over a padded group)


def long_tensor(values: list[int]) -> torch.Tensor:
    """An int64 tensor from a list of ints, through NumPy's C loop (~4x faster than ``torch.tensor``)."""
    return torch.from_numpy(np.fromiter(values, dtype=np.int64, count=len(values)))


def padded_tables(chunks: list[Chunk], max_blocks: int) -> torch.Tensor:
    """The chunks' sequences' block tables [len(chunks), max_blocks], cut or padded with block 0 (entries past
    a context are masked by position or never read)."""
    flat: list[int] = []
    for c in chunks:
        table = c.seq.block_table
        flat += table[:max_blocks] if len(table) >= max_blocks else table + [0] * (max_blocks - len(table))
    return long_tensor(flat).view(len(chunks), max_blocks)


def pick_logprobs(logits: torch.Tensor, rows: list[int], tokens: list[int], chunk: int = 256) -> list[float]:
    """``log_softmax(logits)[rows, tokens]``, with the log-softmax computed only over the rows asked for
    and ``chunk`` rows at a time (its [rows, V] result is never held whole for a large vocabulary)."""
    r, tk = torch.tensor(rows, device=logits.device), torch.tensor(tokens, device=logits.device)
    need, r = torch.unique(r, return_inverse=True)
    if need.shape[0] < logits.shape[0]:
        logits = logits[need]
    out = torch.empty(len(rows), device=logits.device)
    for s in range(0, logits.shape[0], chunk):
        sel = ((r >= s) & (r < s + chunk)).nonzero()[:, 0]
        if sel.numel():
            out[sel] = torch.log_softmax(logits[s:s + chunk], dim=-1)[r[sel] - s, tk[sel]]
    return out.tolist()


@dataclasses.dataclass
class RequestOutput:
    index: int
    prompt_token_ids: list[int] = dataclasses.field(default_factory=list)
    token_ids: list[int] = dataclasses.field(default_factory=list)
    text: Optional[str] = None
    finish_reason: Optional[str] = None  # "stop" (EOS or a stop string) | "length"
    logprobs: Optional[list[float]] = None
    top_logprobs: Optional[list[list[tuple[int, float]]]] = None  # per token: (id, logprob), most likely first
    prompt_logprobs: Optional[list[Optional[float]]] = None  # None at 0 (nothing predicts it) and before prompt_logprobs_start
    error: Optional[str] = None

    def to_record(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


class LLM:
    """The runtime over one engine (an engine or model directory, an ``Engine``, or an ``EngineModel``;
    ``from_model`` turns a ``Transformer`` into one), on ``runtime.device`` in ``runtime.dtype``.

    Off the CPU the step loop takes the gather path (``decode`` buckets, ``fresh``/``cached`` groups through
    SDPA): the paged-attention kernel, decode runs, oneDNN-packed weights and the caching host allocator
    are CPU-only. Batches are laid out on the host and moved in one copy; a step's tokens come back in one.
    """

    def __init__(self, engine: Union[str, Path, Engine, EngineModel], tokenizer: Union[str, Path, TextTokenizer, None] = None,
                 runtime: Optional[RuntimeConfig] = None, kv_dtype: Optional[str] = None):
        self.cfg = runtime or RuntimeConfig()
        self.cfg.validate()
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        if isinstance(engine, (str, Path)):
            engine = open_engine(engine)
        if isinstance(engine, Engine):
            tokenizer = tokenizer or engine.tokenizer_path
            kv_dtype = kv_dtype or engine.config.get("build", {}).get("kv")
            device = torch.device(resolve_device(self.cfg.device))
            tensors = place_tensors(engine.tensors, device, self._dtype(device, engine.tensors))
            engine = EngineModel(engine.args, tensors)
        else:
            self._check_placed(engine)
        self.model = engine
        self.device = engine.device
        self.args = engine.args
        self.tokenizer = TextTokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
        self.eos_ids = self.tokenizer.eos_ids if self.tokenizer else []
        self.kv_dtype = kv_dtype if kv_dtype and self.cfg.kv_dtype == "fp" else self.cfg.kv_dtype
        bs = self.cfg.block_size
        self.block_bytes = PagedKVCache.bytes_per_block(self.args, bs, engine.dtype, self.kv_dtype)
        self.num_blocks = self.cfg.num_blocks or (self.cfg.kv_cache_mb * 2**20) // self.block_bytes
        if self.num_blocks < 1:
            raise ServingError(f"runtime: kv_cache_mb={self.cfg.kv_cache_mb} holds no {self.block_bytes}-byte block")
        self.cache = PagedKVCache(self.args, self.num_blocks, bs, engine.dtype, self.kv_dtype, self.device)
        self.max_model_len = min(self.cfg.max_model_len or engine.max_seq_len, engine.max_seq_len)
        # one scheduler for the runtime's life, so cached prefix blocks outlive a generate() call
        self.scheduler = Scheduler(self.cfg, self.num_blocks)
        self.speculator = NgramSpeculator(self.cfg) if self.cfg.speculative == "ngram" else None
        self.stats: dict = {}

    @classmethod
    def from_model(cls, model: Transformer, tokenizer=None, runtime: Optional[RuntimeConfig] = None,
                   kv_dtype: Optional[str] = None) -> "LLM":
        """An in-memory engine from a training-side model (unquantized), on its device and in its dtype
        unless ``runtime.device``/``runtime.dtype`` say otherwise."""
        cfg = runtime or RuntimeConfig()
        cfg.validate()
        param = next(model.parameters())
        device = param.device if cfg.device == "auto" else torch.device(cfg.device)
        dtype = param.dtype if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
        tensors = engine_tensors(model.args, {k: v.detach() for k, v in puyu_state_dict(model).items()}, dtype)
        return cls(EngineModel(model.args, place_tensors(tensors, device)), tokenizer, cfg, kv_dtype)

    def _dtype(self, device: torch.device, tensors: dict[str, torch.Tensor]) -> Optional[torch.dtype]:
        """The float dtype an engine's tensors take (None: their own): ``runtime.dtype``, or under auto
        bf16 for an unquantized engine on CUDA (fp32 there only doubles the bytes each step reads)."""
        if self.cfg.dtype != "auto":
            return getattr(torch, self.cfg.dtype)
        return torch.bfloat16 if device.type == "cuda" and not is_quantized(tensors) else None

    def _check_placed(self, model: EngineModel) -> None:
        """An ``EngineModel`` is used where and as it is: an explicit device or dtype must be its own."""
        if self.cfg.device not in ("auto", model.device.type):
            raise ServingError(f"runtime.device={self.cfg.device} but the EngineModel's tensors are on "
                               f"{model.device.type} (pass the engine or model directory to have them moved)")
        if self.cfg.dtype not in ("auto", str(model.dtype).removeprefix("torch.")):
            raise ServingError(f"runtime.dtype={self.cfg.dtype} but the EngineModel's weights are {model.dtype}")

    # ---- end of sequence ---------------------------------------------------------------------------
    @property
    def eos_ids(self) -> list[int]:
        """Every id that ends a sequence (the tokenizer's EOS and its generation config's); none without a
        tokenizer. Kept as a set and an array too, for the per-token checks of the loop and decode runs."""
        return list(self.eos_array)

    @eos_ids.setter
    def eos_ids(self, ids: Seq[int]) -> None:
        self.eos_array = np.asarray(list(ids), dtype=np.int64)
        self.eos_set = frozenset(int(i) for i in ids)

    @property
    def eos_id(self) -> int:
        """The first of ``eos_ids``: the tokenizer's own EOS, which also separates documents (evaluation)."""
        if not len(self.eos_array):
            raise ServingError("no EOS token: the runtime has no tokenizer, or its tokenizer defines none")
        return int(self.eos_array[0])

    @eos_id.setter
    def eos_id(self, value: int) -> None:
        self.eos_ids = [value]

    # ---- requests ----------------------------------------------------------------------------------
    def _tokens(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ServingError("a text prompt needs a tokenizer (engine without tokenizer.json): pass token ids")
            return self.tokenizer.encode(prompt, add_special_tokens=True)  # BOS where the tokenizer adds one
        if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) for t in prompt):
            raise ServingError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        bad = [t for t in prompt if not 0 <= t < self.args.vocab_size]
        if bad:
            raise ServingError(f"prompt token id(s) {bad[:5]} outside the vocabulary [0, {self.args.vocab_size})")
        return list(prompt)

    def _sequence(self, index: int, prompt: Prompt, params: SamplingParams, text: bool = False) -> Sequence:
        """A validated request; ``text``: keep its output text up to date every step (as stop strings do)."""
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
        if params.prompt_logprobs and params.prompt_logprobs_start > len(tokens):
            raise ServingError(f"prompt_logprobs_start ({params.prompt_logprobs_start}) is beyond the prompt "
                               f"({len(tokens)} tokens)")
        seed = params.seed if params.seed is not None else self.cfg.seed * 1_000_003 + index
        seq = Sequence(index, tokens, params, torch.Generator().manual_seed(seed))
        if self.tokenizer is not None and (text or params.stop):
            seq.detok = IncrementalText(self.tokenizer, params.stop)
        return seq

    # ---- step by step (the HTTP server: requests join and leave between steps) ---------------------
    def prepare(self, index: int, prompt: Prompt, params: SamplingParams, constraint=None) -> Sequence:
        """A request checked and tokenized (``ServingError`` if it cannot be served), its text kept up to
        date every step; ``constraint`` limits its tokens (``json_constraint``). Touches no runtime state,
        so request threads call it while ``step`` runs; ``add`` then queues it."""
        seq = self._sequence(index, prompt, params, text=True)
        seq.constraint = constraint
        return seq

    def add(self, seq: Sequence) -> None:
        """Queue a prepared sequence: the next ``step`` may admit it beside those already running."""
        self.scheduler.add(seq)

    def abort(self, seq: Sequence) -> None:
        """Drop an unfinished sequence and free its KV blocks."""
        self.scheduler.abort(seq)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self, outputs: dict, decode_run: bool = False) -> tuple[int, int, int]:
        """One forward step over the running and newly admitted sequences (with ``decode_run``, a run of
        plain decode steps where ``plain_decode`` allows, until a sequence finishes); the output of each
        sequence that finished goes to ``outputs[seq.index]``. Returns (steps, tokens computed, tokens
        generated). Between calls sequences may be added or aborted; the caller reads the new tokens
        (``seq.output``, ``seq.detok``) of the sequences it holds. With ``runtime.speculative``, greedy
        decode chunks grow by their drafts (``speculative``) and there are no decode runs."""
        sched = self.scheduler
        if decode_run and self.speculator is None and plain_decode(self, sched):
            run_steps, run_tokens = DecodeRun(self, sched).run(outputs)
            if run_steps:  # 0: its first step's blocks were not free; the general step preempts
                return run_steps, run_tokens, run_tokens
        chunks = sched.schedule()
        if not chunks:
            raise RuntimeError("scheduler made no progress (a request cannot fit the KV cache)")
        if self.speculator is not None:
            self.speculator.extend(self, sched, chunks)
        chunks, segments = self._order(chunks)
        logits_rows = self._logits_rows(chunks)
        batch = self._batch(chunks, logits_rows, segments)
        logits = self.model.forward_paged(batch, self.cache).float()  # [M, V]
        return 1, sum(c.n for c in chunks), self._after_step(sched, chunks, logits_rows, logits, outputs)

    def chat(self, conversations: list[list[dict]], sampling: Union[SamplingParams, list[SamplingParams], None] = None):
        """``generate`` over the conversations in the tokenizer's chat template (``chat_prompt``); with
        InternLM2's, ``<|im_end|>`` is added to the stop strings."""
        params = self._params(sampling, len(conversations))
        prompts, errors = [], {}
        for i, conv in enumerate(conversations):
            try:
                prompts.append(chat_prompt_ids(conv, self.tokenizer))
            except ServingError as exc:
                prompts.append("")  # served as an empty prompt's error, then replaced below
                errors[i] = str(exc)
        if uses_internlm2(self.tokenizer):
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
    def generate(self, prompts: Seq[Prompt], sampling: Union[SamplingParams, list[SamplingParams], None] = None,
                 progress: Optional[Progress] = None) -> list[RequestOutput]:
        """Every prompt to completion, continuously batched; ``progress`` (a task's counter) counts
        finished requests."""
        params = self._params(sampling, len(prompts))
        outputs: list[Optional[RequestOutput]] = [None] * len(prompts)
        sched = self.scheduler
        sched.reset_counters()
        if self.speculator is not None:
            self.speculator.reset_counters()
        t0 = time.perf_counter()
        host_cache_mb = self.cfg.cpu_alloc_cache_mb if self.device.type == "cpu" else 0  # activations live on the GPU
        with cached_cpu_allocations(host_cache_mb):  # the steps reuse their activations' pages
            try:
                for i, (prompt, p) in enumerate(zip(prompts, params)):
                    try:
                        sched.add(self._sequence(i, prompt, p))
                    except ServingError as exc:
                        outputs[i] = RequestOutput(i, error=str(exc))
                steps, computed, out_tokens = self._steps(sched, outputs, progress)
            except BaseException:
                sched.abort_all()
                raise
        elapsed = time.perf_counter() - t0
        self.stats = {"requests": len(prompts), "steps": steps, "output_tokens": out_tokens,
                      "seconds": elapsed, "output_tokens_per_s": out_tokens / elapsed if elapsed else 0.0,
                      "computed_tokens": computed,  # tokens through the model (prefix-cache hits excluded)
                      "preemptions": sched.preemptions, "prefix_cache_block_hits": sched.allocator.prefix_hits,
                      "kv_blocks": self.num_blocks, "kv_block_bytes": self.block_bytes,
                      "kv_peak_blocks": sched.allocator.peak_used,
                      "kv_peak_bytes": sched.allocator.peak_used * self.block_bytes}
        if self.speculator is not None:  # drafted tokens and those the model's argmax confirmed
            self.stats.update(speculative_drafted=self.speculator.drafted, speculative_accepted=self.speculator.accepted)
        return outputs  # type: ignore[return-value]

    def _steps(self, sched: Scheduler, outputs: list[Optional[RequestOutput]],
               progress: Optional[Progress] = None) -> tuple[int, int, int]:
        """Steps until every request is done; returns (steps, tokens computed, tokens generated).

        Steady-state decoding goes through ``DecodeRun`` (array-only steps); every other step is scheduled,
        laid out and sampled sequence by sequence (``step``)."""
        steps = computed = out_tokens = 0
        # every request is done (refused at admission included) but those the scheduler still holds: two
        # queue lengths per step, not a scan of the outputs
        finished = len(outputs) - len(sched.waiting) - len(sched.running)
        if progress is not None:
            progress.update(finished)
        while sched.has_work():
            s, c, o = self.step(outputs, decode_run=True)
            steps, computed, out_tokens = steps + s, computed + c, out_tokens + o
            if progress is not None:
                now = len(outputs) - len(sched.waiting) - len(sched.running)
                progress.update(now - finished)
                finished = now
        if progress is not None:
            progress.close()
        return steps, computed, out_tokens

    def _logits_rows(self, chunks: list[Chunk]) -> list[list[int]]:
        """Per chunk, the positions whose logits are needed: prompt positions still lacking a logprob,
        and the last token when the chunk completes the sequence (every position of a drafted chunk)."""
        rows = []
        for c in chunks:
            seq, last = c.seq, c.start + c.n - 1
            if c.draft:
                rows.append(list(range(c.start, last + 1)))
                continue
            completes = last + 1 == len(seq.tokens)
            if not seq.wants_prompt_logprobs:
                rows.append([last] if completes else [])
                continue
            first = max(c.start, len(seq.prompt_logprobs) - 1)
            r = list(range(first, min(last + 1, len(seq.prompt) - 1)))
            if completes and (not r or r[-1] != last):
                r.append(last)
            rows.append(r)
        return rows

    def _order(self, chunks: list[Chunk]) -> tuple[list[Chunk], list[tuple[str, int]]]:
        """The step's chunks as the batch lays them out, and its segments (attention kind, chunk count).

        With the fused paged-attention kernel: decode tokens and prompt chunks up to ``PAGED_MAX_CHUNK``
        tokens first (one ``paged`` group: each row reads its sequence's blocks in place), then longer
        chunks from position 0 by length, then longer chunks after cached tokens by length. Without it:
        decode tokens by context length (``decode`` buckets), then the fresh and cached chunks by length.
        Under an int8 KV cache, chunks from position 0 keep attending to their own unquantized keys
        (``fresh``), as they do without the kernel.
        """
        if self.model.paged_kernel:
            paged, rest = [], []
            for c in chunks:
                fresh_int8 = c.start == 0 and c.n > 1 and self.cache.int8
                (paged if c.n <= PAGED_MAX_CHUNK and not fresh_int8 else rest).append(c)
            decode = []
        else:
            paged, rest = [], [c for c in chunks if c.n > 1]
            decode = sorted((c for c in chunks if c.n == 1), key=lambda c: c.start)
        fresh = sorted((c for c in rest if c.start == 0), key=lambda c: c.n)
        cached = sorted((c for c in rest if c.start > 0), key=lambda c: c.n)
        segments = [("paged", len(paged)), ("decode", len(decode)), ("fresh", len(fresh)), ("cached", len(cached))]
        return paged + decode + fresh + cached, [seg for seg in segments if seg[1]]

    def _batch(self, chunks: list[Chunk], logits_rows: list[list[int]], segments: list[tuple[str, int]]) -> PagedBatch:
        """Flatten the step's chunks (in ``_order``'s order) into one ragged batch (see ``PagedBatch``)."""
        bs = self.cfg.block_size
        tokens, positions, slots, logits_index, starts = [], [], [], [], []
        for c, rows in zip(chunks, logits_rows):
            base = len(tokens)
            starts.append(base)
            table, start = c.seq.block_table, c.start
            if c.n == 1:
                tokens.append(c.seq.tokens[start])
                positions.append(start)
                slots.append(table[start // bs] * bs + start % bs)
                if rows:
                    logits_index.append(base)
            else:
                pos = range(start, start + c.n)
                tokens += c.seq.tokens[start:start + c.n]
                positions += pos
                slots += [table[p // bs] * bs + p % bs for p in pos]
                logits_index += [base + p - start for p in rows]
        N = len(tokens)
        starts.append(N)
        tokens_t, positions_t, slots_t = long_tensor(tokens + positions + slots).view(3, N)  # one conversion for the three
        groups = []
        lo = 0
        for kind, count in segments:
            hi = lo + count
            if kind == "paged":  # every row: its sequence's block table and how many keys it sees
                members = chunks[lo:hi]
                tables = padded_tables(members, max(-(-(c.start + c.n) // bs) for c in members))
                stop = starts[hi]
                if stop > len(members):  # prompt chunks among them: one table row per query row
                    tables = tables.repeat_interleave(long_tensor([c.n for c in members]), dim=0)
                groups.append(AttentionGroup("paged", 0, stop, block_tables=tables, context=positions_t[:stop] + 1))
            elif kind == "decode":
                for i in range(lo, hi, DECODE_BUCKET):  # by context length, so few are padded far beyond their own
                    members = chunks[i:min(i + DECODE_BUCKET, hi)]
                    groups.append(AttentionGroup("decode", starts[i], starts[i] + len(members),
                                                 block_tables=padded_tables(members, members[-1].start // bs + 1),
                                                 context=long_tensor([c.start + 1 for c in members])))
            else:
                bucket: list[Chunk] = []
                real = 0
                first = lo
                for j in range(lo, hi):  # ascending length: cap the padding of each group at 25%
                    c = chunks[j]
                    if bucket and c.n * (len(bucket) + 1) > 1.25 * (real + c.n):
                        groups.append(self._padded_group(kind, bucket, starts[first]))
                        bucket, real, first = [], 0, j
                    bucket.append(c)
                    real += c.n
                if bucket:
                    groups.append(self._padded_group(kind, bucket, starts[first]))
            lo = hi
        batch = PagedBatch(tokens_t, positions_t, slots_t, groups, long_tensor(logits_index))
        return batch if self.device.type == "cpu" else batch.to(self.device)

    def _padded_group(self, kind: str, chunks: list[Chunk], start: int) -> AttentionGroup:
        """A ``fresh`` or ``cached`` group of chunks whose tokens are the batch rows from ``start`` on."""
        bs = self.cfg.block_size
        T = max(c.n for c in chunks)
        qidx, real, qpos = [], [], []
        base = start
        for b, c in enumerate(chunks):
            pad = T - c.n
            qidx.append(list(range(base, base + c.n)) + [start] * pad)
            real += range(b * T, b * T + c.n)
            base += c.n
            if kind == "cached":
                qpos.append(list(range(c.start, c.start + c.n)) + [-1] * pad)
        t = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731  (nested lists)
        grp = AttentionGroup(kind, start, base, query_index=t(qidx), real=t(real))
        if kind == "cached":
            grp.block_tables = padded_tables(chunks, max(-(-(c.start + c.n) // bs) for c in chunks))
            grp.query_positions = t(qpos)
        return grp

    def _after_step(self, sched: Scheduler, chunks: list[Chunk], logits_rows: list[list[int]], logits: torch.Tensor,
                    outputs: list[Optional[RequestOutput]]) -> int:
        """Record prompt logprobs, sample for completed chunks, finish sequences; returns tokens generated.

        Log-probabilities are picked for all wanted (row, token) pairs at once (``pick_logprobs``); drafted
        chunks are verified by the speculator."""
        row, seqs, rows_sampled = 0, [], []
        pick_rows, pick_tokens, pick_seqs = [], [], []  # prompt logprobs of this step, in order
        drafted: list[tuple[Chunk, int]] = []  # (chunk, its first logits row)
        for c, rows in zip(chunks, logits_rows):
            seq = c.seq
            if c.draft:
                drafted.append((c, row))
                row += len(rows)
                continue
            sched.computed(c)
            if not rows:
                continue
            if seq.wants_prompt_logprobs:
                prompt, have = seq.prompt, len(seq.prompt_logprobs)
                for j, p in enumerate(rows):  # positions p whose logits predict prompt[p + 1]
                    if p + 1 < len(prompt) and p + 1 >= have:
                        pick_rows.append(row + j)
                        pick_tokens.append(prompt[p + 1])
                        pick_seqs.append(seq)
            row += len(rows)
            if c.completes:
                seqs.append(seq)
                rows_sampled.append(row - 1)
        if pick_rows:
            for seq, lp in zip(pick_seqs, pick_logprobs(logits, pick_rows, pick_tokens)):
                seq.prompt_logprobs.append(lp)
        made = self.speculator.verify(self, sched, drafted, logits, outputs) if drafted else 0
        if not seqs:
            return made
        all_rows = len(rows_sampled) == logits.shape[0]  # decode steps: every row is sampled, in order
        picked = logits if all_rows else logits[torch.tensor(rows_sampled, device=logits.device)]
        constrained = [j for j, s in enumerate(seqs) if s.constraint is not None]
        if constrained:  # the raw logits stay for the logprobs
            picked = picked.clone() if picked is logits else picked
            for j in constrained:
                s = seqs[j]
                left = min(s.params.max_tokens - len(s.output), self.max_model_len - len(s.tokens))
                picked[j].masked_fill_(~s.constraint.allowed(left).to(picked.device), float("-inf"))
        if all(seq.params.greedy for seq in seqs):
            new = argmax_rows(picked)
        else:
            new = sample_rows(picked, [s.params for s in seqs], [s.tokens for s in seqs], [s.generator for s in seqs])
        want = [j for j, s in enumerate(seqs) if s.params.logprobs]
        if want:
            for j, lp in zip(want, pick_logprobs(logits, [rows_sampled[j] for j in want], [new[j] for j in want])):
                seqs[j].logprobs.append(lp)
        top = [j for j, s in enumerate(seqs) if s.params.top_logprobs]
        if top:
            k = max(seqs[j].params.top_logprobs for j in top)
            values, ids = torch.log_softmax(logits[torch.tensor([rows_sampled[j] for j in top], device=logits.device)],
                                            dim=-1).topk(k, dim=-1)
            for j, vs, ts in zip(top, values.tolist(), ids.tolist()):
                n = seqs[j].params.top_logprobs
                seqs[j].top_logprobs.append(list(zip(ts[:n], vs[:n])))
        eos, max_len = self.eos_set, self.max_model_len
        for seq, tok in zip(seqs, new):
            seq.append(tok)
            p = seq.params
            if seq.constraint is not None:
                seq.constraint.advance(tok)
            if ((tok in eos and not p.ignore_eos) or seq.detok is not None or seq.constraint is not None
                    or len(seq.output) >= p.max_tokens or len(seq.tokens) >= max_len):
                self._finish_if_done(sched, seq, tok, outputs)
        return len(seqs) + made

    def _finish_if_done(self, sched: Scheduler, seq: Sequence, tok: int, outputs) -> None:
        """After ``seq`` got ``tok``: if that ended it, release its blocks and record its output
        (``outputs``: a list or dict by request index)."""
        reason = self._finish_reason(seq, tok)
        if reason:
            self._finish(sched, seq, reason, outputs)

    def _finish(self, sched: Scheduler, seq: Sequence, reason: str, outputs) -> None:
        """End ``seq`` for ``reason``: release its blocks and record its output."""
        seq.finish_reason = reason
        sched.finish(seq)
        outputs[seq.index] = self._output(seq)

    def _finish_reason(self, seq: Sequence, tok: int) -> Optional[str]:
        p = seq.params
        if tok in self.eos_set and not p.ignore_eos:
            return "stop"  # before the text takes it: the EOS is not part of the text
        if seq.detok is not None:
            seq.detok.update(seq.output)
            if p.stop:
                seq.text = stop_cut(seq.detok, p.stop)
                if seq.text is not None:
                    return "stop"
        if seq.constraint is not None and seq.constraint.done:
            return "stop"
        if len(seq.output) >= p.max_tokens or len(seq.tokens) >= self.max_model_len:
            return "length"
        return None

    def _output(self, seq: Sequence) -> RequestOutput:
        text = seq.text  # set when a stop string cut it
        if text is None and seq.detok is not None:
            text = seq.detok.flush()
        elif text is None and self.tokenizer is not None:
            ids = seq.output
            if ids and ids[-1] in self.eos_set and not seq.params.ignore_eos:
                ids = ids[:-1]
            text = self.tokenizer.decode(ids)
        return RequestOutput(seq.index, seq.prompt, list(seq.output), text, seq.finish_reason,
                             list(seq.logprobs) if seq.params.logprobs else None,
                             list(seq.top_logprobs) if seq.params.top_logprobs else None,
                             list(seq.prompt_logprobs) if seq.params.prompt_logprobs else None)
