"""Continuous batching under memory pressure, and the block allocator's prefix cache."""
from __future__ import annotations

import pytest
import torch

import puyu.serving.llm as llm_module
from puyu.model import Transformer, get_flavor
from puyu.serving.config import RuntimeConfig, SamplingParams
from puyu.serving.kv_cache import BlockAllocator, block_hash
from puyu.serving.llm import LLM
from puyu.serving.scheduler import Scheduler


class RecordingScheduler(Scheduler):
    """Records blocks in use and sequences running after every scheduling decision."""

    trace: list[tuple[int, int]] = []

    def schedule(self):
        chunks = super().schedule()
        RecordingScheduler.trace.append((self.allocator.num_used, len(self.running)))
        return chunks


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(1)
    return Transformer(get_flavor("tiny")).eval()


def requests(n=100):
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(2, 90, (n,), generator=g).tolist()
    prompts = [torch.randint(1, 1024, (length,), generator=g).tolist() for length in lengths]
    # a few shared prefixes, as when many requests carry the same instructions
    for i in range(0, n, 5):
        prompts[i] = prompts[0][:40] + prompts[i][:20]
    params = [SamplingParams(max_tokens=1 + i % 9, ignore_eos=True) if i % 3 else
              SamplingParams(max_tokens=6, temperature=0.8, top_p=0.9, seed=i, ignore_eos=True) for i in range(n)]
    return prompts, params


def test_hundred_requests_finish_within_a_small_kv_budget_and_match_the_unconstrained_run(model, monkeypatch):
    prompts, params = requests()
    free = LLM.from_model(model, runtime=RuntimeConfig(block_size=8, num_blocks=2000, max_num_batched_tokens=8192,
                                                       prefix_caching=False))
    expected = free.generate(prompts, params)
    assert free.stats["preemptions"] == 0

    monkeypatch.setattr(llm_module, "Scheduler", RecordingScheduler)
    RecordingScheduler.trace = []
    budget_blocks = 14  # 112 token slots: room for one to three of these requests at a time
    tight = LLM.from_model(model, runtime=RuntimeConfig(block_size=8, num_blocks=budget_blocks,
                                                        max_num_batched_tokens=64))
    assert tight.cache.nbytes() == budget_blocks * tight.block_bytes
    got = tight.generate(prompts, params)
    used = [u for u, _ in RecordingScheduler.trace]
    assert max(used) <= budget_blocks and tight.stats["kv_peak_blocks"] <= budget_blocks
    assert max(r for _, r in RecordingScheduler.trace) <= 4  # only a few requests fit at once
    assert tight.stats["preemptions"] > 0  # memory pressure forced recomputation
    assert tight.stats["prefix_cache_block_hits"] > 0
    for i, (a, b) in enumerate(zip(got, expected)):
        assert a.error is None and a.token_ids == b.token_ids, f"request {i} differs from the unconstrained run"


def test_scoring_from_a_start_under_memory_pressure_equals_the_uncached_run(model):
    """Prompt logprobs from a start, with prefix-cache hits (within a step and across steps), chunked
    prefill and preemption, equal those of a run that computes every prompt whole."""
    g = torch.Generator().manual_seed(3)
    contexts = [torch.randint(1, 1024, (int(n),), generator=g).tolist() for n in torch.randint(20, 70, (8,), generator=g)]
    contexts[1] = contexts[0][:33] + contexts[1][:10]  # contexts sharing a prefix too
    reqs = [(ctx + torch.randint(1, 1024, (1 + k,), generator=g).tolist(), len(ctx)) for ctx in contexts for k in range(4)]
    free = LLM.from_model(model, runtime=RuntimeConfig(block_size=8, num_blocks=2000, max_num_batched_tokens=8192,
                                                       prefix_caching=False))
    want = free.generate([p for p, _ in reqs], SamplingParams(max_tokens=8, prompt_logprobs=True, ignore_eos=True))
    tight = LLM.from_model(model, runtime=RuntimeConfig(block_size=8, num_blocks=14, max_num_batched_tokens=40))
    got = tight.generate([p for p, _ in reqs], [SamplingParams(max_tokens=8, prompt_logprobs=True, prompt_logprobs_start=s,
                                                               ignore_eos=True) for _, s in reqs])
    assert tight.stats["preemptions"] > 0 and tight.stats["prefix_cache_block_hits"] > 0
    assert tight.stats["kv_peak_blocks"] <= 14
    for i, ((p, start), a, b) in enumerate(zip(reqs, got, want)):
        assert a.error is None and a.token_ids == b.token_ids, i
        assert a.prompt_logprobs[:start] == [None] * start
        assert a.prompt_logprobs[start:] == pytest.approx(b.prompt_logprobs[start:], abs=1e-5), i


def test_allocator_shares_cached_blocks_and_evicts_least_recently_freed():
    alloc = BlockAllocator(3, prefix_caching=True)
    a, b = alloc.allocate(), alloc.allocate()
    ha, hb = block_hash(None, (1, 2)), block_hash(block_hash(None, (1, 2)), (3, 4))
    alloc.register(a, ha)
    alloc.register(b, hb)
    alloc.release([a, b])  # b (the tail) is freed first, so it is evicted first
    assert alloc.num_free == 3 and alloc.lookup(ha) == a and alloc.lookup(hb) == b
    alloc.share(a)
    assert alloc.ref[a] == 1 and alloc.num_free == 2
    c = alloc.allocate()  # the never-used block goes first
    d = alloc.allocate()  # then b, whose cached content is dropped
    assert {c, d} == {3 - a - b, b} and d == b and alloc.lookup(hb) is None and alloc.lookup(ha) == a
    with pytest.raises(RuntimeError, match="out of blocks"):
        alloc.allocate()
    assert alloc.peak_used == 3


def test_block_hash_chains_the_prefix():
    assert block_hash(None, (1, 2)) != block_hash(block_hash(None, (9, 9)), (1, 2))
