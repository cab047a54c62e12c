"""The array-only decode run (``puyu.serving.decode_run``) against the general step loop: the same tokens,
finishes, statistics and prefix-cache entries, under memory pressure too, requests with stop strings
inside runs with the loop's text cuts, and no run where it does not apply (sampling, log-probabilities,
no fused kernel)."""
from __future__ import annotations

import pytest
import torch

import puyu.serving.llm as llm_module
from puyu.model import Transformer, get_flavor
from puyu.serving import ops
from puyu.serving.config import RuntimeConfig, SamplingParams
from puyu.serving.decode_run import DecodeRun
from puyu.serving.llm import LLM
from toy_models import make_tokenizer, wiki_texts

pytestmark = pytest.mark.skipif(not ops.extension_available("cpu"), reason="decode runs need the paged kernel")
STATS = ("steps", "output_tokens", "computed_tokens", "preemptions", "prefix_cache_block_hits", "kv_peak_blocks")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(2)
    return Transformer(get_flavor("tiny")).eval()


def prompts(n=24):
    g = torch.Generator().manual_seed(3)
    out = [torch.randint(1, 1024, (int(k),), generator=g).tolist() for k in torch.randint(2, 70, (n,), generator=g)]
    for i in range(0, n, 4):  # shared prefixes: full blocks come from the prefix cache
        out[i] = out[0][:33] + out[i][:9]
    return out


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(wiki_texts()[:3000], tmp_path_factory.mktemp("tok") / "tokenizer.json")


def run(model, ps, params, monkeypatch, fast: bool, eos: int = 0, tokenizer=None, stop_seqs=None, **runtime):
    """Outputs, stats and prefix-cache hashes of one generate; counts the decode runs' steps (and adds to
    the set ``stop_seqs`` the requests with stop strings that runs served)."""
    steps = []
    real_run = DecodeRun.run

    def counted(self, outputs):
        n, tokens = real_run(self, outputs)
        steps.append(n)
        if stop_seqs is not None and n:
            stop_seqs.update(s.index for s in self.seqs if s.params.stop)
        return n, tokens

    monkeypatch.setattr(DecodeRun, "run", counted)
    if not fast:
        monkeypatch.setattr(llm_module, "plain_decode", lambda *a: False)
    llm = LLM.from_model(model, tokenizer, runtime=RuntimeConfig(**runtime))
    llm.eos_id = eos
    outs = llm.generate(ps, params)
    monkeypatch.undo()
    return outs, {k: llm.stats[k] for k in STATS}, set(llm.scheduler.allocator.cached), sum(steps)


def test_same_tokens_finishes_and_stats_as_the_general_loop(model, monkeypatch):
    ps = prompts()
    probe = SamplingParams(max_tokens=24, ignore_eos=True)
    first, *_ = run(model, ps, probe, monkeypatch, fast=False, block_size=8, num_blocks=600)
    eos = first[3].token_ids[6]  # a token request 3 (which honours EOS, max 18 tokens) reaches: its EOS
    params = [SamplingParams(max_tokens=3 + (i * 5) % 22, ignore_eos=i % 3 != 0) for i in range(len(ps))]
    runtime = dict(block_size=8, num_blocks=600, max_num_batched_tokens=256, max_num_seqs=16)
    want, want_stats, want_cached, _ = run(model, ps, params, monkeypatch, fast=False, eos=eos, **runtime)
    got, got_stats, got_cached, fast_steps = run(model, ps, params, monkeypatch, fast=True, eos=eos, **runtime)
    assert fast_steps > want_stats["steps"] // 2  # most steps ran as decode runs
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert [o.finish_reason for o in got] == [o.finish_reason for o in want]
    assert "stop" in {o.finish_reason for o in got} and "length" in {o.finish_reason for o in got}
    assert got_stats == want_stats
    assert got_cached == want_cached  # every block that became full was published to the prefix cache


def test_blocks_running_short_hand_over_to_the_general_loop(model, monkeypatch):
    ps = prompts(12)
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    runtime = dict(block_size=8, num_blocks=40, max_num_batched_tokens=128)  # preemption is forced
    want, want_stats, *_ = run(model, ps, params, monkeypatch, fast=False, **runtime)
    got, got_stats, _, fast_steps = run(model, ps, params, monkeypatch, fast=True, **runtime)
    assert fast_steps > 0 and want_stats["preemptions"] > 0
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert got_stats == want_stats


def test_stop_strings_are_checked_inside_runs(model, tokenizer, monkeypatch):
    """Requests with stop strings go through decode runs and end as the general loop ends them: the same
    tokens, text (cut before the stop string) and finish reasons, with stop strings that occur (mid-output,
    at its end, one of two) and ones that never do, beside requests without any."""
    ps = prompts(12)
    runtime = dict(block_size=8, num_blocks=400)
    probe, *_ = run(model, ps, SamplingParams(max_tokens=30, ignore_eos=True), monkeypatch, fast=False,
                    tokenizer=tokenizer, **runtime)
    stops = []
    for i, o in enumerate(probe):
        t = o.text
        stops.append([[t[len(t) // 2:len(t) // 2 + 3]], ["\u2603\u2603", t[-4:]], [], ["\u2603\u2603"]][i % 4])
    params = [SamplingParams(max_tokens=30 - i % 3, stop=stop, ignore_eos=i % 2 == 0) for i, stop in enumerate(stops)]
    want, want_stats, *_ = run(model, ps, params, monkeypatch, fast=False, tokenizer=tokenizer, **runtime)
    served: set[int] = set()
    got, got_stats, _, fast_steps = run(model, ps, params, monkeypatch, fast=True, tokenizer=tokenizer,
                                        stop_seqs=served, **runtime)
    assert [(o.token_ids, o.text, o.finish_reason) for o in got] == \
        [(o.token_ids, o.text, o.finish_reason) for o in want]
    assert got_stats == want_stats
    cut = [o for o, p in zip(want, probe) if o.finish_reason == "stop" and len(o.text) < len(p.text)]
    assert len(cut) >= 4  # stop strings ended requests, their text cut
    assert fast_steps > 0 and served == {i for i, p in enumerate(params) if p.stop}  # all of them ran in runs


@pytest.mark.parametrize("extra", [dict(temperature=0.7, seed=1), dict(logprobs=True)])
def test_no_run_unless_every_request_decodes_greedily_without_extras(model, monkeypatch, extra):
    ps = prompts(6)
    params = [SamplingParams(max_tokens=8, ignore_eos=True, **(extra if i == 2 else {})) for i in range(len(ps))]
    *_, fast_steps = run(model, ps, params, monkeypatch, fast=True, num_blocks=200)
    assert fast_steps == 0


def test_no_run_without_the_fused_kernel(model, monkeypatch):
    monkeypatch.setattr(type(LLM.from_model(model).model), "paged_kernel", property(lambda self: False))
    ps = prompts(6)
    llm = LLM.from_model(model, runtime=RuntimeConfig(num_blocks=200))
    monkeypatch.setattr(DecodeRun, "run", lambda *a: pytest.fail("a decode run without the paged kernel"))
    outs = llm.generate(ps, SamplingParams(max_tokens=5, ignore_eos=True))
    assert all(len(o.token_ids) == 5 for o in outs)


def test_a_failure_inside_a_run_frees_its_blocks_and_the_allocator(model, monkeypatch):
    """A forward that fails mid-run (after blocks were allocated inside it): every block is free again,
    the caching allocator is uninstalled, and the next generate equals a fresh runtime's."""
    from puyu.serving.engine_model import EngineModel

    ps = prompts(8)
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    llm = LLM.from_model(model, runtime=RuntimeConfig(block_size=4, num_blocks=200))
    real_forward, calls = EngineModel.forward_paged, []

    def fails_later(self, batch, cache):
        calls.append(batch.tokens.shape[0])
        if len(calls) == 9:  # a decode step well into the run: blocks have been opened in it
            raise KeyboardInterrupt
        return real_forward(self, batch, cache)

    run_steps = []
    real_run = DecodeRun.run
    monkeypatch.setattr(DecodeRun, "run", lambda self, o: run_steps.append(1) or real_run(self, o))
    with monkeypatch.context() as m:
        m.setattr(EngineModel, "forward_paged", fails_later)
        with pytest.raises(KeyboardInterrupt):
            llm.generate(ps, params)
    assert run_steps  # the failure came inside a decode run
    assert not llm.scheduler.has_work() and llm.scheduler.allocator.num_free == 200
    with pytest.raises(RuntimeError, match="disable without enable"):
        ops.extension().caching_allocator_disable()
    fresh = LLM.from_model(model, runtime=RuntimeConfig(block_size=4, num_blocks=200))
    assert [o.token_ids for o in llm.generate(ps, params)] == [o.token_ids for o in fresh.generate(ps, params)]
