"""The runtime against the model's reference generation, and its sampling options.

Real prompts: Wikipedia lead sections through a byte-level BPE trained on them; a random tiny model
with that vocabulary (equality of greedy decoding does not need a trained model).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from puyu.model import Transformer, generate, get_flavor
from puyu.serving.config import RuntimeConfig, SamplingParams, ServingError
from puyu.model.state_dict import puyu_state_dict
from puyu.serving import llm as llm_module
from puyu.serving.engine import engine_tensors
from puyu.serving.engine_model import EngineModel
from puyu.serving.llm import LLM
from puyu.serving.tokenizer import chat_prompt
from toy_models import make_tokenizer, wiki_texts

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def texts():
    return wiki_texts()


@pytest.fixture(scope="module")
def tokenizer(texts, tmp_path_factory):
    return make_tokenizer(texts[:2000], tmp_path_factory.mktemp("tok") / "tokenizer.json", vocab_size=1024)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return Transformer(get_flavor("tiny", vocab_size=tokenizer.tok.get_vocab_size())).eval()


@pytest.fixture(scope="module")
def prompts(texts, tokenizer):
    """Real prompts of mixed lengths; half share a long common prefix (a system prompt) for prefix caching."""
    system = "You are a helpful assistant that answers questions about history and science. " * 2
    out = []
    for i, t in enumerate(texts[3000:3016]):
        words = t.split()[: 5 + (i * 7) % 40]
        out.append((system if i % 2 else "") + " ".join(words))
    return [tokenizer.encode(p) for p in out]


def reference(model, prompt, n=MAX_TOKENS):
    return generate(model, torch.tensor([prompt]), n)[0, len(prompt):].tolist()


@pytest.mark.parametrize("attention", ["kernel", "kernel_for_decode_only", "gather", "gather_moved"])
def test_greedy_equals_reference_with_paging_prefix_caching_and_chunked_prefill(model, prompts, attention, monkeypatch):
    # kernel: every row reads its blocks in place (fused paged attention); kernel_for_decode_only: prompt
    # chunks through SDPA; gather: no kernel (decode buckets over gathered blocks, as without the extension);
    # gather_moved: that, with every batch through the one-copy move a GPU's batches take (PagedBatch.to)
    if attention.startswith("gather"):
        monkeypatch.setattr(EngineModel, "paged_kernel", property(lambda self: False))
    elif not EngineModel(model.args, engine_tensors(model.args, puyu_state_dict(model))).paged_kernel:
        pytest.skip("the serving ops extension is not built: no paged-attention kernel")
    if attention == "gather_moved":
        laid_out = llm_module.LLM._batch
        monkeypatch.setattr(llm_module.LLM, "_batch", lambda self, *a: laid_out(self, *a).to(torch.device("cpu")))
    if attention == "kernel_for_decode_only":
        monkeypatch.setattr(llm_module, "PAGED_MAX_CHUNK", 1)
    cfg = RuntimeConfig(block_size=8, num_blocks=40, max_num_batched_tokens=32, max_num_seqs=6)
    llm = LLM.from_model(model, runtime=cfg)
    outs = llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
    assert max(len(p) for p in prompts) > cfg.max_num_batched_tokens  # some prompts are prefilled in chunks
    assert llm.stats["prefix_cache_block_hits"] > 0 and llm.stats["preemptions"] > 0
    assert llm.stats["kv_peak_blocks"] <= cfg.num_blocks
    for i, (p, o) in enumerate(zip(prompts, outs)):
        assert o.error is None and o.finish_reason == "length"
        assert o.token_ids == reference(model, p), f"prompt {i} ({len(p)} tokens) differs from the reference"
    # and the same requests again: cached blocks of the first call serve the second
    first_hits = llm.stats["prefix_cache_block_hits"]
    again = llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
    assert [o.token_ids for o in again] == [o.token_ids for o in outs]
    assert llm.stats["prefix_cache_block_hits"] > first_hits


def test_prompt_and_output_logprobs_are_the_models(model, prompts):
    llm = LLM.from_model(model, runtime=RuntimeConfig(block_size=4, num_blocks=64, max_num_batched_tokens=16))
    p = prompts[5]
    out = llm.generate([p], SamplingParams(max_tokens=4, logprobs=True, prompt_logprobs=True, ignore_eos=True))[0]
    full = torch.tensor([p + out.token_ids])
    ref = torch.log_softmax(model(full)[0].float(), -1)  # [T, V]
    want_prompt = [ref[j - 1, p[j]].item() for j in range(1, len(p))]
    want_out = [ref[len(p) - 1 + j, t].item() for j, t in enumerate(out.token_ids)]
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(p)
    assert out.prompt_logprobs[1:] == pytest.approx(want_prompt, abs=1e-4)
    assert out.logprobs == pytest.approx(want_out, abs=1e-4)


def scoring_requests(prompts, texts, tokenizer, bs):
    """(context + continuation, start) pairs: contexts cut from one long shared text so their first
    token of interest falls at every offset around block boundaries, each with several continuations."""
    base = prompts[1] + tokenizer.encode(" " + texts[3100])
    conts = [tokenizer.encode(" " + w) for w in ("the", "river flows", "in 1990 it was", "A")]
    out = []
    for k in (3, 5, 6):
        for off in (-1, 0, 1, 2):
            ctx = base[:k * bs + off]
            out += [(ctx + c, len(ctx)) for c in conts]
    out += [(prompts[7] + c, len(prompts[7])) for c in conts]  # another context
    return out


@pytest.mark.parametrize("budget", [512, 24])  # everything in one step / chunked prefill
def test_prompt_logprobs_from_a_start_reuse_the_prefix_cache_exactly(model, prompts, texts, tokenizer, budget):
    bs = 8
    reqs = scoring_requests(prompts, texts, tokenizer, bs)
    assert max(len(p) for p, _ in reqs) > 2 * budget or budget == 512
    nocache = LLM.from_model(model, runtime=RuntimeConfig(block_size=bs, num_blocks=200, prefix_caching=False,
                                                          max_num_batched_tokens=budget))
    whole = nocache.generate([p for p, _ in reqs], SamplingParams(max_tokens=1, prompt_logprobs=True))
    assert nocache.stats["computed_tokens"] == sum(len(p) for p, _ in reqs)
    llm = LLM.from_model(model, runtime=RuntimeConfig(block_size=bs, num_blocks=200, max_num_batched_tokens=budget))
    params = [SamplingParams(max_tokens=1, prompt_logprobs=True, prompt_logprobs_start=s) for _, s in reqs]
    for call in range(2):  # blocks shared within a call (one computes them, the next ones read them), then across calls
        outs = llm.generate([p for p, _ in reqs], params)
        hits = llm.stats["prefix_cache_block_hits"]
        assert hits > 0 and llm.stats["computed_tokens"] == sum(len(p) for p, _ in reqs) - hits * bs
        for i, ((p, start), o, w) in enumerate(zip(reqs, outs, whole)):
            assert o.error is None and len(o.prompt_logprobs) == len(p) and o.token_ids == w.token_ids
            assert all(lp is None for lp in o.prompt_logprobs[:start]), i
            assert o.prompt_logprobs[start:] == pytest.approx(w.prompt_logprobs[start:], abs=1e-5), i
        if call == 0:
            first_hits = hits
    assert hits > first_hits  # the second call finds every context cached
    # the same against a plain forward of the model
    p, start = reqs[9]
    ref = torch.log_softmax(model(torch.tensor([p]))[0].float(), -1)
    assert outs[9].prompt_logprobs[start:] == pytest.approx([ref[j - 1, p[j]].item() for j in range(start, len(p))],
                                                            abs=1e-4)


def test_options_of_one_context_share_its_blocks_within_one_step(model, prompts):
    """The first request computes the context; the others, admitted in the same step, read its blocks."""
    ctx = (prompts[1] * 2)[:43]  # 5 full blocks of 8, the last one holding position 42 (the start - 1)
    llm = LLM.from_model(model, runtime=RuntimeConfig(block_size=8, num_blocks=64, max_num_batched_tokens=512))
    reqs = [ctx + [t] for t in (5, 6, 7, 8)]
    outs = llm.generate(reqs, SamplingParams(max_tokens=1, prompt_logprobs=True, prompt_logprobs_start=43))
    assert llm.stats["steps"] == 1 and llm.stats["prefix_cache_block_hits"] == 3 * 5
    assert llm.stats["computed_tokens"] == 44 + 3 * 4
    logits = model(torch.tensor([ctx]))[0, -1].float().log_softmax(-1)
    for t, o in zip((5, 6, 7, 8), outs):
        assert o.prompt_logprobs[:43] == [None] * 43 and o.prompt_logprobs[43] == pytest.approx(logits[t].item(), abs=1e-5)
    # start 0 (every position) and a start in the first block take nothing from the cache
    for start in (0, 1, 8):
        llm.generate(reqs[:1], SamplingParams(max_tokens=1, prompt_logprobs=True, prompt_logprobs_start=start))
        assert llm.stats["prefix_cache_block_hits"] == 0
    llm.generate(reqs[:1], SamplingParams(max_tokens=1, prompt_logprobs=True, prompt_logprobs_start=10))
    assert llm.stats["prefix_cache_block_hits"] == 1  # block 0 (positions 0-7) lies wholly before position 9
    bad = llm.generate(reqs[:1], SamplingParams(max_tokens=1, prompt_logprobs=True, prompt_logprobs_start=45))[0]
    assert "beyond the prompt" in bad.error
    with pytest.raises(ServingError, match="prompt_logprobs_start"):
        SamplingParams.from_dict({"prompt_logprobs_start": -1})


def test_seeded_sampling_is_reproducible_and_independent_of_batching(model, prompts):
    sp = SamplingParams(max_tokens=10, temperature=0.9, top_k=50, top_p=0.9, repetition_penalty=1.2, seed=7,
                        ignore_eos=True)
    alone = LLM.from_model(model).generate([prompts[3]], sp)[0].token_ids
    small_cache = RuntimeConfig(block_size=4, num_blocks=64, max_num_batched_tokens=16)
    batched = LLM.from_model(model, runtime=small_cache).generate(prompts[:8], sp)
    assert all(o.error is None for o in batched)
    assert batched[3].token_ids == alone
    other_seed = LLM.from_model(model).generate([prompts[3]], dataclasses.replace(sp, seed=8))[0].token_ids
    assert other_seed != alone
    # top_k=1 sampling is greedy whatever the temperature
    top1 = LLM.from_model(model).generate([prompts[3]], SamplingParams(max_tokens=8, temperature=2.0, top_k=1,
                                                                      ignore_eos=True))[0].token_ids
    assert top1 == reference(model, prompts[3], 8)


def test_repetition_penalty_discourages_repeats(model, prompts):
    plain = LLM.from_model(model).generate([prompts[1]], SamplingParams(max_tokens=24, ignore_eos=True))[0].token_ids
    penal = LLM.from_model(model).generate([prompts[1]], SamplingParams(max_tokens=24, ignore_eos=True,
                                                                       repetition_penalty=5.0))[0].token_ids
    assert len(set(penal)) > len(set(plain))


def test_stop_strings_max_tokens_and_eos(model, tokenizer, prompts):
    llm = LLM.from_model(model, tokenizer)

    def stop_window(text: str):
        """3 characters from the second half of ``text``, clear of U+FFFD (bytes of a character the token
        boundaries cut, which the incremental detokenizer never emits as text)."""
        return next((text[i:i + 3] for i in range(len(text) // 2, len(text) - 2)
                     if "\ufffd" not in text[i:i + 3] and text[i:i + 3].strip()), None)

    # the first prompt whose free-running text (a random model's) has such a window
    prompt, free = next((p, out) for p in prompts[2:]
                        for out in llm.generate([p], SamplingParams(max_tokens=16, ignore_eos=True))
                        if stop_window(out.text))
    assert len(free.token_ids) == 16 and free.finish_reason == "length"
    stop = stop_window(free.text)
    cut = llm.generate([prompt], SamplingParams(max_tokens=16, ignore_eos=True, stop=[stop]))[0]
    assert cut.finish_reason == "stop" and cut.text == free.text[: free.text.find(stop)]
    assert len(cut.token_ids) < 16
    # EOS ends generation: make the model's first choice the EOS id
    first = free.token_ids[0]
    eos_llm = LLM.from_model(model, tokenizer)
    eos_llm.eos_id = first
    out = eos_llm.generate([prompt], SamplingParams(max_tokens=16))[0]
    assert out.token_ids == [first] and out.finish_reason == "stop" and out.text == ""
    # any id of eos_ids ends it (a generation config lists several), in the decode steps too
    eos_llm.eos_ids = [free.token_ids[9], free.token_ids[5]]
    k = next(i for i, t in enumerate(free.token_ids) if t in eos_llm.eos_ids)
    assert k > 0 and eos_llm.eos_id == free.token_ids[9]
    out = eos_llm.generate([prompt], SamplingParams(max_tokens=16))[0]
    assert out.token_ids == free.token_ids[:k + 1] and out.finish_reason == "stop"
    assert out.text == tokenizer.decode(free.token_ids[:k])


def test_invalid_requests_get_errors_and_the_rest_goes_on(model, tokenizer, prompts):
    llm = LLM.from_model(model, tokenizer, RuntimeConfig(block_size=16, num_blocks=8))
    too_long = list(range(1, 100)) * 3
    outs = llm.generate([prompts[0], [], too_long, prompts[1], [5000]],
                        [SamplingParams(max_tokens=4), SamplingParams(), SamplingParams(max_tokens=4),
                         SamplingParams(max_tokens=4, ignore_eos=True), SamplingParams()])
    assert outs[0].error is None and outs[3].error is None and len(outs[3].token_ids) == 4
    assert "empty prompt" in outs[1].error
    assert "exceed" in outs[2].error
    assert "outside the vocabulary" in outs[4].error
    with pytest.raises(ServingError, match="top_p"):
        SamplingParams.from_dict({"top_p": 0})
    with pytest.raises(ServingError, match="unknown key"):
        SamplingParams.from_dict({"temprature": 1.0})


def test_int8_kv_cache_stays_close(model, prompts):
    # a prompt chunk attends to its own keys in full precision; what comes from the cache (earlier
    # chunks of a long prompt, every decode step) is int8: prefill in chunks of 16 to read it
    cfg = RuntimeConfig(block_size=8, num_blocks=64, kv_dtype="int8", max_num_batched_tokens=16)
    llm = LLM.from_model(model, runtime=cfg)
    fp_bytes = LLM.from_model(model, runtime=RuntimeConfig(block_size=8, num_blocks=64)).cache.nbytes()
    assert llm.cache.nbytes() < 0.4 * fp_bytes
    p = prompts[4]
    assert len(p) > 32
    sp = SamplingParams(max_tokens=6, logprobs=True, prompt_logprobs=True, ignore_eos=True)
    out = llm.generate([p], sp)[0]
    exact = LLM.from_model(model).generate([p], sp)[0]
    diff = max(abs(a - b) for a, b in zip(out.prompt_logprobs[1:], exact.prompt_logprobs[1:]))
    assert 0 < diff < 0.05
    # the first chunk reads no int8 cache: equal to the fp run up to the rounding of another attention
    # kernel (the fp run's chunk reads its keys in place through the fused paged kernel)
    assert out.prompt_logprobs[1:16] == pytest.approx(exact.prompt_logprobs[1:16], abs=1e-5)
    assert out.token_ids == exact.token_ids
    assert 0 < max(abs(a - b) for a, b in zip(out.logprobs, exact.logprobs)) < 0.05


def test_chat_template_is_internlm2(model, tokenizer):
    text = chat_prompt([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                    "<|im_start|>assistant\n")
    llm = LLM.from_model(model, tokenizer)
    outs = llm.chat([[{"role": "user", "content": "Hi"}], [{"role": "robot", "content": "x"}]],
                    SamplingParams(max_tokens=3, ignore_eos=True))
    assert outs[0].prompt_token_ids == tokenizer.encode(chat_prompt([{"role": "user", "content": "Hi"}]))
    assert "messages[0]" in outs[1].error


def test_a_failed_generate_leaves_the_runtime_usable(model, prompts, monkeypatch):
    llm = LLM.from_model(model, runtime=RuntimeConfig(block_size=8, num_blocks=64))
    sp = SamplingParams(max_tokens=4, ignore_eos=True)
    with monkeypatch.context() as m:
        m.setattr(llm.model, "forward_paged", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            llm.generate(prompts[:4], sp)
    assert not llm.scheduler.has_work() and llm.scheduler.allocator.num_free == 64
    assert [o.token_ids for o in llm.generate(prompts[:2], sp)] == [reference(model, p, 4) for p in prompts[:2]]


def test_argmax_rows_picks_the_first_maximum_like_torch():
    from puyu.serving.sampling import argmax_rows

    g = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 4, (64, 50), generator=g).float()  # many ties within a row
    logits[3] = float("-inf")
    logits[5, 7] = float("inf")
    assert argmax_rows(logits) == logits.argmax(-1).tolist()
    assert argmax_rows(logits[::2]) == logits[::2].argmax(-1).tolist()  # strided rows
