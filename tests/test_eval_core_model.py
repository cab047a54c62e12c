"""Evaluation core on a model: log-likelihoods from the serving runtime against a direct ``Transformer``
forward, lm-eval's tokenization rule, PPL predictions, generation records and the inference config."""
from __future__ import annotations

import json

import pytest
import torch
from puyu.evaluation.config import InferenceConfig
from puyu.evaluation.datasets import load_dataset
from puyu.evaluation.inferencers import (
    Generation,
    LogLikelihood,
    Rolling,
    encode_pair,
    estimate_cost,
    generate_until,
    loglikelihood,
    loglikelihood_rolling,
    predict,
)
from puyu.evaluation.items import Dataset, EvalError, Item
from puyu.evaluation.metrics import score
from puyu.model import Transformer, get_flavor
from puyu.serving import LLM, RuntimeConfig
from toy_models import make_tokenizer, wiki_texts


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(wiki_texts()[:400], tmp_path_factory.mktemp("tok") / "tokenizer.json", vocab_size=512)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return Transformer(get_flavor("tiny", vocab_size=tokenizer.tok.get_vocab_size(), max_seq_len=128)).eval()


@pytest.fixture(scope="module")
def llm(model, tokenizer):
    return LLM.from_model(model, tokenizer, RuntimeConfig(kv_cache_mb=16))


@torch.no_grad()
def direct_logprobs(model, tokens: list[int]) -> list[float]:
    """log p(token i | tokens < i) for i >= 1 from one plain forward."""
    logp = torch.log_softmax(model(torch.tensor([tokens])).float()[0], dim=-1)
    return [float(logp[i - 1, tokens[i]]) for i in range(1, len(tokens))]


def test_encode_pair_moves_trailing_space_to_the_continuation(tokenizer):
    ctx, cont = encode_pair(tokenizer.encode, "The capital of France is ", "Paris")
    assert ctx == tokenizer.encode("The capital of France is")
    assert ctx + cont == tokenizer.encode("The capital of France is Paris")


def test_loglikelihood_equals_a_direct_forward(llm, model, tokenizer):
    pairs = [("Question: what is it?\nAnswer:", " A"), ("The river flows ", "into the sea."),
             ("Paris is", " the capital of France and its largest city")]
    got = loglikelihood(llm, pairs, greedy=True)
    for (context, continuation), ll in zip(pairs, got):
        ctx, cont = encode_pair(tokenizer.encode, context, continuation)
        want = sum(direct_logprobs(model, ctx + cont)[-len(cont):])
        assert ll.n_tokens == len(cont) and ll.logprob == pytest.approx(want, abs=1e-4)
    # the argmax token after a context is greedy, the runner-up is not (for tokens that re-tokenize as themselves)
    checked = 0
    for context in ["Paris is", "The river", "In 1990 the", "It was a", "The city of", "He was born in"]:
        ctx = tokenizer.encode(context)
        with torch.no_grad():
            ranked = model(torch.tensor([ctx]))[0, -1].argsort(descending=True)[:2].tolist()
        texts = [tokenizer.decode([t]) for t in ranked]
        if [encode_pair(tokenizer.encode, context, t)[1] for t in texts] != [[t] for t in ranked]:
            continue
        assert [ll.is_greedy for ll in loglikelihood(llm, [(context, t) for t in texts], greedy=True)] == [True, False]
        checked += 1
    assert checked
    assert got[0].is_greedy in (True, False) and loglikelihood(llm, pairs[:1])[0].is_greedy is None


def test_options_of_a_context_share_its_cached_blocks_and_score_as_before(model, tokenizer):
    """Continuations are scored from their first token on, so the runtime computes each context once and
    reads its KV blocks from the prefix cache for the other options; the numbers do not change."""
    mc = ("The following are multiple choice questions (with answers).\n\nWhich river flows through Paris?\n"
          "A. Seine\nB. Thames\nC. Danube\nD. Nile\nAnswer:")
    contexts = [mc, "Paris is", "In 1990 the city of "]
    options = [" A", " B", " C", " D", " the capital of France", "London"]
    pairs = [(c, x) for x in options for c in contexts]  # interleaved: the scorer itself groups by context
    runtime = {"block_size": 4, "kv_cache_mb": 16, "max_num_batched_tokens": 32}  # several blocks per context, chunked
    cached = LLM.from_model(model, tokenizer, RuntimeConfig(**runtime))
    got = loglikelihood(cached, pairs)
    assert cached.stats["prefix_cache_block_hits"] > 0
    total = sum(len(ctx) + len(cont) for ctx, cont in (encode_pair(tokenizer.encode, c, x) for c, x in pairs))
    assert cached.stats["computed_tokens"] < 0.5 * total
    uncached = LLM.from_model(model, tokenizer, RuntimeConfig(**runtime, prefix_caching=False))
    want = loglikelihood(uncached, pairs)
    assert uncached.stats["computed_tokens"] == total
    for (context, continuation), a, b in zip(pairs, got, want):
        assert a.n_tokens == b.n_tokens and a.logprob == pytest.approx(b.logprob, abs=1e-5)
        ctx, cont = encode_pair(tokenizer.encode, context, continuation)
        assert a.logprob == pytest.approx(sum(direct_logprobs(model, ctx + cont)[-len(cont):]), abs=1e-4)


def test_rolling_loglikelihood_scores_every_token_once(llm, model, tokenizer):
    short, long = "A short document.", " ".join(wiki_texts()[-3:])
    assert len(tokenizer.encode(long)) > 3 * llm.max_model_len  # several windows
    got = loglikelihood_rolling(llm, [short, long])
    tokens = [llm.eos_id] + tokenizer.encode(short)
    assert got[0].n_tokens == len(tokens) - 1 and got[0].logprob == pytest.approx(sum(direct_logprobs(model, tokens)), abs=1e-4)
    assert got[1].n_tokens == len(tokenizer.encode(long)) and got[1].logprob < 0


def test_ppl_predictions_follow_the_option_logprobs(llm, model, tokenizer, tmp_path):
    rows = [{"question": "Which is a colour?", "choices": ["blue", "table", "run", "seven"], "answer": 0},
            {"question": "The largest planet is", "choices": ["Mars", "Jupiter", "Venus"], "answer": "B"}]
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = load_dataset("colours", custom={"colours": {"path": str(path), "kind": "mc"}})
    records = predict(ds, ds.items, llm, InferenceConfig(circular="circular"))
    assert [r["id"] for r in records] == [f"colours/0@{k}" for k in range(4)] + [f"colours/1@{k}" for k in range(3)]
    first = records[0]
    context = "The following are multiple choice questions (with answers).\n\nWhich is a colour?\n" \
              "A. blue\nB. table\nC. run\nD. seven\nAnswer:"
    for k, letter in enumerate("ABCD"):
        ctx, cont = encode_pair(tokenizer.encode, context, f" {letter}")
        assert first["logprobs"][k] == pytest.approx(sum(direct_logprobs(model, ctx + cont)[-len(cont):]), abs=1e-4)
    for r in records:
        best = max(range(len(r["logprobs"])), key=lambda i: r["logprobs"][i])
        assert r["pred"] == best and r["correct"] == (best == r["gold"])
        assert r["pred_nll"] == max(range(len(r["logprobs"])), key=lambda i: r["logprobs"][i] / r["tokens"][i])
    assert records[5]["gold"] == 0  # "Jupiter" rotated one place to the left
    metrics = score("mc", records)
    assert set(metrics) >= {"acc", "acc_norm", "acc_nll", "acc_origin", "acc_circular", "perf_circular", "more_1"}


class AlwaysA:
    """A ``Scorer`` that likes " A" best and answers generations with a fixed text."""

    def __init__(self, text: str = ""):
        self.text, self.contexts = text, []

    def loglikelihood(self, pairs, greedy=False):
        return [LogLikelihood(-1.0 if cont == " A" else -2.0, None, 1) for _, cont in pairs]

    def loglikelihood_rolling(self, texts):
        return [Rolling(-float(len(t)), len(t)) for t in texts]

    def generate(self, contexts, stop, max_tokens, temperature=0.0, top_p=1.0, seeds=None):
        self.contexts += contexts
        return [Generation(self.text) for _ in contexts]


class PassesOnSeedsOf3(AlwaysA):
    """A sampler whose completion passes exactly when its seed is a multiple of 3."""

    def generate(self, contexts, stop, max_tokens, temperature=0.0, top_p=1.0, seeds=None):
        assert temperature == 0.8 and len(seeds) == len(contexts)
        return [Generation("    return 1\n" if seed % 3 == 0 else "    return 2\n") for seed in seeds]


def test_a_letter_biased_model_under_circular_eval():
    items = [Item(f"q/{i}", f"question {i}", list("wxyz"), i % 4) for i in range(8)]
    ds = Dataset("q", "mc", items)
    circ = score("mc", predict(ds, items, AlwaysA(), InferenceConfig()))
    assert circ["acc"] == 25.0 and circ["acc_circular"] == 25.0 and circ["perf_circular"] == 0.0
    assert len(predict(ds, items, AlwaysA(), InferenceConfig(circular="all_possible"))) == 8 * 24


def test_cloze_choices_are_scored_by_their_text_without_circular_eval():
    class LongestWins(AlwaysA):
        def loglikelihood(self, pairs, greedy=False):  # -1 per continuation character: the shortest has the max
            return [LogLikelihood(-2.0 * len(cont) if "long" in cont else -1.0 * len(cont), None, 1) for _, cont in pairs]

    items = [Item("c/0", "Pick one", ["tiny", "a long option"], 1), Item("c/1", "Again", ["a long option", "x"], 1)]
    ds = Dataset("c", "mc", items, style="arc")
    records = predict(ds, items, LongestWins(), InferenceConfig(circular="circular"))
    assert [r["id"] for r in records] == ["c/0@0", "c/1@0"]  # one variant each: order does not matter in cloze
    assert [r["pred"] for r in records] == [0, 1] and [r["pred_norm"] for r in records] == [0, 1]
    assert records[0]["logprobs"] == [-5.0, -28.0]  # " tiny", " a long option"
    with pytest.raises(EvalError, match="dataset 'c': unknown mc style 'nope'"):
        predict(Dataset("c", "mc", items, style="nope"), items, LongestWins(), InferenceConfig())


def test_generation_records_and_answer_extraction(llm):
    ds = load_dataset("gsm8k", limit=3)
    scorer = AlwaysA(" She makes 9 * 2 = $18.\n#### 18")
    records = predict(ds, ds.items, scorer, InferenceConfig(num_fewshot=2))
    assert scorer.contexts[0].count("Question: ") == 3 and scorer.contexts[0].endswith("\nAnswer:")
    assert [r["extracted"] for r in records] == ["18"] * 3
    assert [r["correct"] for r in records] == [r["gold"] == "18" for r in records]
    # the real runtime: greedy, bounded, cut before a stop string
    outs = generate_until(llm, ["Question: 1+1?\nAnswer:", "The river"], ["Question:"], 8)
    assert all(o.error is None and "Question:" not in o.text for o in outs)
    # counted by the runtime: re-encoding the text is no round trip (a cut UTF-8 sequence decodes to U+FFFD)
    assert 0 < llm.stats["output_tokens"] <= 2 * 8


def test_code_records_come_from_the_sandbox_check():
    """Completions run against the problem's tests in the real sandbox, in the task."""
    problem = {"task_id": "T/0", "prompt": "def f():\n", "test": "def check(candidate):\n    assert candidate() == 1\n",
               "entry_point": "f", "canonical_solution": "    return 1\n"}
    ds = Dataset("humaneval", "code", [Item("humaneval/0", problem["prompt"], meta={"problem": problem})])
    records = predict(ds, ds.items, AlwaysA("    return 1\n"), InferenceConfig(code_timeout_s=5.0))
    assert records == [{"id": "humaneval/0", "task_id": "T/0", "completion": "    return 1\n", "passed": True,
                        "status": "passed", "detail": "", "n": 1, "c": 1, "sandbox": records[0]["sandbox"]}]
    assert records[0]["sandbox"].startswith("rlimits, ")
    assert score("code", records) == {"pass@1": 100.0}
    wrong = predict(ds, ds.items, AlwaysA("    return 2\n"), InferenceConfig(code_timeout_s=5.0))
    assert wrong[0]["passed"] is False and wrong[0]["status"] == "failed"
    assert score("code", wrong) == {"pass@1": 0.0}


def test_pass_at_k_from_n_sampled_completions(llm):
    problem = {"task_id": "T/0", "prompt": "def f():\n", "test": "def check(candidate):\n    assert candidate() == 1\n",
               "entry_point": "f", "canonical_solution": "    return 1\n"}
    ds = Dataset("humaneval", "code", [Item("humaneval/0", problem["prompt"], meta={"problem": problem})])
    cfg = InferenceConfig(code_timeout_s=5.0, num_samples=10, temperature=0.8)
    records = predict(ds, ds.items, PassesOnSeedsOf3(), cfg)  # seeds 0..9: 0, 3, 6 and 9 pass
    assert (records[0]["n"], records[0]["c"], len(records[0]["samples"])) == (10, 4, 9)
    assert [s["passed"] for s in records[0]["samples"]] == [s % 3 == 0 for s in range(1, 10)]
    assert score("code", records) == pytest.approx({"pass@1": 40.0, "pass@10": 100.0})
    assert estimate_cost(ds, ds.items[0], cfg) > 9 * estimate_cost(ds, ds.items[0], InferenceConfig())
    with pytest.raises(EvalError, match="job.infer.temperature must be >= 0, and > 0 when num_samples > 1"):
        predict(ds, ds.items, PassesOnSeedsOf3(), InferenceConfig(num_samples=2))
    # the runtime: a seed fixes a sample, other seeds give other samples
    from puyu.evaluation.inferencers import RuntimeScorer

    outs = RuntimeScorer(llm).generate(["The river"] * 6, [], 12, temperature=1.0, top_p=1.0, seeds=[7, 7, 1, 2, 3, 4])
    assert outs[0].text == outs[1].text and len({o.text for o in outs}) > 2


def test_bpb_records_and_config_errors():
    items = [Item("w/0", "héllo"), Item("w/1", "abc")]
    records = predict(Dataset("w", "bpb", items), items, AlwaysA(), InferenceConfig())
    assert records[0] == {"id": "w/0", "nll": 5.0, "tokens": 5, "bytes": 6}
    for key, value, what in [("circular", "rot", "job.infer.circular must be one of"),
                             ("num_fewshot", -2, "job.infer.num_fewshot must be an integer >= -1"),
                             ("max_tokens", 0, "job.infer.max_tokens must be an integer >= 1"),
                             ("code_timeout_s", 0, "job.infer.code_timeout_s must be > 0")]:
        with pytest.raises(EvalError, match=what):
            predict(Dataset("w", "bpb", items), items, AlwaysA(), InferenceConfig(**{key: value}))


def test_cost_grows_with_options_variants_and_generation():
    item = Item("q/0", "A question of some length?", list("wxyz"), 0)
    ds = Dataset("q", "mc", [item])
    none, circ, every = (estimate_cost(ds, item, InferenceConfig(circular=m)) for m in ("none", "circular", "all_possible"))
    assert 0 < none < circ == 4 * none and every == 24 * none
    gen = Dataset("g", "gen", [Item("g/0", "How many?", [], "3")])
    assert estimate_cost(gen, gen.items[0], InferenceConfig(max_tokens=512)) > \
        estimate_cost(gen, gen.items[0], InferenceConfig(max_tokens=16))
