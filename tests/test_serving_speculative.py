"""N-gram speculative decoding (``runtime.speculative=ngram``, ``puyu.serving.speculative``): greedy output
token for token, text and finish reason what ``speculative=off`` gives, drafts accepted where the text
repeats itself, finishes in the middle of a draft, preemption, the SDPA path, no KV block leaked, no
drafts for sampled or log-probability requests, and the config's checks.

The model is the random ``tiny`` flavor: its greedy outputs fall into loops, so prompts that end inside
such a loop (a prompt followed by its own greedy output up to there) continue by repeating themselves,
as a model copying a passage does."""
from __future__ import annotations

import pytest
import torch

from puyu.model import Transformer, get_flavor
from puyu.serving.config import RuntimeConfig, SamplingParams, ServingError
from puyu.serving.llm import LLM
from puyu.serving.speculative import NgramIndex, NgramSpeculator
from toy_models import make_tokenizer, wiki_texts

RUNTIME = dict(block_size=8, num_blocks=400)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(2)
    return Transformer(get_flavor("tiny")).eval()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(wiki_texts()[:3000], tmp_path_factory.mktemp("tok") / "tokenizer.json")


def generate(model, tokenizer, ps, params, speculative="off", **runtime):
    llm = LLM.from_model(model, tokenizer, runtime=RuntimeConfig(speculative=speculative, **{**RUNTIME, **runtime}))
    outs = llm.generate(ps, params)
    alloc = llm.scheduler.allocator
    assert not llm.scheduler.has_work() and alloc.num_free == alloc.num_blocks and not any(alloc.ref)  # no leak
    return outs, llm.stats


def random_prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(1, 1024, (int(k),), generator=g).tolist() for k in torch.randint(2, 70, (n,), generator=g)]


@pytest.fixture(scope="module")
def looping(model, tokenizer):
    """Prompts that end inside a stretch where the model's greedy output repeats itself (period <= 4)."""
    ps = random_prompts(24)
    probe, _ = generate(model, tokenizer, ps, SamplingParams(max_tokens=96, ignore_eos=True), num_blocks=800)
    out = []
    for p, o in zip(ps, probe):
        t = o.token_ids
        at = next((i for i in range(4, len(t) - 16) for d in range(1, 5) if t[i:i + 16] == t[i - d:i + 16 - d]), None)
        if at is not None:
            out.append(p + t[:at + 4])
    assert len(out) >= 6
    return out


def same(a, b) -> None:
    assert [(o.token_ids, o.text, o.finish_reason) for o in a] == [(o.token_ids, o.text, o.finish_reason) for o in b]


def test_greedy_output_identical_with_drafts_accepted(model, tokenizer, looping):
    ps = random_prompts(8) + looping
    params = [SamplingParams(max_tokens=20 + i % 7 * 6, ignore_eos=i % 2 == 0) for i in range(len(ps))]
    want, _ = generate(model, tokenizer, ps, params)
    got, stats = generate(model, tokenizer, ps, params, "ngram")
    same(got, want)
    assert stats["speculative_accepted"] > 0.5 * stats["speculative_drafted"] > 50


def test_eos_and_stop_strings_end_a_sequence_in_the_middle_of_its_draft(model, tokenizer, looping, monkeypatch):
    """EOS or a stop string reached by an accepted draft token: the sequence ends there, the draft's rest
    and the model's own next token dropped, as one token at a time would have ended it."""
    base, _ = generate(model, tokenizer, looping, SamplingParams(max_tokens=24, ignore_eos=True))
    eos_params = [SamplingParams(max_tokens=24) for _ in looping]  # EOS: each continuation's 4th token
    stop_params = [SamplingParams(max_tokens=24, ignore_eos=True, stop=[o.text[2:5]]) for o in base]
    mid = []
    real_verify = NgramSpeculator.verify

    def verify(self, llm, sched, drafted, logits, outputs):
        before = [(c.seq, len(c.seq.output), c.seq.tokens[-c.draft:]) for c, _ in drafted]
        made = real_verify(self, llm, sched, drafted, logits, outputs)
        for seq, n, draft in before:  # finished on an accepted draft token, not on the model's own token
            if seq.finish_reason and seq.output[n:] == draft[:len(seq.output) - n]:
                mid.append(seq.index)
        return made

    monkeypatch.setattr(NgramSpeculator, "verify", verify)
    for params in (eos_params, stop_params):
        eos = [o.token_ids[3] for o in base]
        results = []
        for speculative in ("off", "ngram"):
            llm = LLM.from_model(model, tokenizer, runtime=RuntimeConfig(speculative=speculative, **RUNTIME))
            outs = []
            for p, e, prm in zip(looping, eos, params):  # one by one: each request its own EOS
                llm.eos_id = e if params is eos_params else 1023
                outs += llm.generate([p], prm)
            results.append(outs)
        same(results[1], results[0])
        assert sum(o.finish_reason == "stop" for o in results[0]) >= len(looping) - 1
        assert len(mid) >= len(looping) // 2, mid
        mid.clear()


def test_preemption_and_the_sdpa_path(model, tokenizer, looping, monkeypatch):
    """Blocks running short (preemption by recomputation) and the gather/SDPA attention of GPUs (drafted
    chunks as ``cached`` groups) give the same tokens too."""
    ps = random_prompts(8) + looping
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    tight = dict(num_blocks=60, max_num_batched_tokens=128)
    want, want_stats = generate(model, tokenizer, ps, params, **tight)
    got, stats = generate(model, tokenizer, ps, params, "ngram", **tight)
    same(got, want)
    assert want_stats["preemptions"] > 0 and stats["preemptions"] > 0 and stats["speculative_accepted"] > 0
    monkeypatch.setattr(type(LLM.from_model(model).model), "paged_kernel", property(lambda self: False))
    got, stats = generate(model, tokenizer, ps, params, "ngram")
    same(got, want)
    assert stats["speculative_accepted"] > 0


@pytest.mark.parametrize("extra", [dict(temperature=0.8, seed=4), dict(logprobs=True), dict(top_logprobs=2)])
def test_sampled_and_logprob_requests_do_not_speculate(model, tokenizer, looping, extra):
    params = SamplingParams(max_tokens=16, **extra)
    want, _ = generate(model, tokenizer, looping, params)
    got, stats = generate(model, tokenizer, looping, params, "ngram")
    same(got, want)
    assert [o.logprobs for o in got] == [o.logprobs for o in want]
    assert stats["speculative_drafted"] == 0


def test_ngram_index_proposes_what_followed_the_latest_longest_match():
    index = NgramIndex()
    tokens = [1, 2, 3, 9, 1, 2, 4, 5, 7, 2, 3, 9, 6, 2]
    assert index.propose(tokens, 3, 1, 3) == [3, 9, 6]  # "2" last seen at 9 (followed by 3 9 6)
    tokens += [4]
    assert index.propose(tokens, 2, 1, 3) == [5, 7]  # "2 4" at 5
    tokens += [8]
    assert index.propose(tokens, 2, 1, 3) == []  # "8" never seen before
    assert NgramIndex().propose([5, 5], 4, 2, 3) == []  # a 2-gram "5 5" needs an earlier occurrence


@pytest.mark.parametrize("bad, message", [
    (dict(speculative="eagle"), "runtime.speculative must be off or ngram, got 'eagle'"),
    (dict(num_speculative_tokens=0), "runtime.num_speculative_tokens must be >= 1, got 0"),
    (dict(prompt_lookup_min=0), "runtime.prompt_lookup_min must be >= 1, got 0"),
    (dict(prompt_lookup_min=3, prompt_lookup_max=2), r"runtime.prompt_lookup_max must be >= runtime.prompt_lookup_min \(3\), got 2"),
])
def test_config_errors_name_the_key(bad, message):
    with pytest.raises(ServingError, match=message):
        RuntimeConfig(**bad).validate()
