"""Predictions for items: log-likelihood scoring and greedy generation over the serving runtime.

``predict(dataset, items, llm, cfg)`` is what one evaluation task runs. It sends every request of the task
to the runtime in one ``generate`` call (continuous batching keeps the batch full) and returns JSON-able
records, one per scored unit (an mc variant, a question, a problem, a document); ``metrics.score`` turns
them into numbers.

Log-likelihoods follow lm-eval's ``loglikelihood`` exactly, so the two agree on the same model: trailing
whitespace of the context moves to the continuation, the continuation's tokens are those of
``encode(context + continuation)`` after the first ``len(encode(context))`` ("Answer:" + " A" is tokenized
as one string, as the model saw text in training), an empty context is conditioned on the EOS token, and an
input longer than the model is cut from the left. The runtime scores a prompt with
``SamplingParams(prompt_logprobs=True, prompt_logprobs_start=<first continuation token>)``:
``prompt_logprobs[i] = log p(token i | tokens < i)`` from that position on, so the options of one question
share the context's KV blocks through the runtime's prefix cache (the context is computed once).

Multiple-choice prediction rules (all three are recorded; ``correct`` uses the first):
- ``pred`` (lm-eval ``acc``): argmax of the continuation's summed log-probability;
- ``pred_norm`` (lm-eval ``acc_norm``): argmax of that sum divided by the characters of the bare option
  (the letter for MMLU, so there it is ``acc``; the option's text for ARC and HellaSwag);
- ``pred_nll`` (OpenCompass PPL-style): argmin of the mean NLL per continuation token.
Ties go to the first option, as ``numpy.argmax`` does.
"""
from __future__ import annotations

from typing import NamedTuple, Protocol

from puyu.evaluation.circular import MODES, expand, num_variants
from puyu.evaluation.config import InferenceConfig
from puyu.evaluation.items import Dataset, EvalError, Item
from puyu.evaluation.metrics import (answer_matches, extract_answer, gsm8k_flexible, gsm8k_matches, gsm8k_strict,
                                     qa_matches)
from puyu.evaluation.templates import render

GROUP_KEYS = ("category", "subject")
CHARS_PER_TOKEN = 4.0  # rough, for cost estimates only
SANDBOX_COST = 500.0  # a program run in the sandbox, in token-equivalents

__all__ = [
    "Generation",
    "InferenceConfig",
    "LogLikelihood",
    "Rolling",
    "RuntimeScorer",
    "Scorer",
    "encode_pair",
    "estimate_cost",
    "generate_until",
    "loglikelihood",
    "loglikelihood_rolling",
    "predict",
    "validate",
]


class LogLikelihood(NamedTuple):
    logprob: float  # sum over the continuation's tokens
    is_greedy: bool | None  # every continuation token is the argmax (None: not asked for)
    n_tokens: int


class Rolling(NamedTuple):
    logprob: float  # sum over every token of the text
    n_tokens: int


class Generation(NamedTuple):
    text: str
    error: str | None = None


class Scorer(Protocol):
    """What predictions need from a model; ``RuntimeScorer`` serves it from ``puyu.serving.LLM``."""

    def loglikelihood(self, pairs: list[tuple[str, str]], greedy: bool = False) -> list[LogLikelihood]: ...

    def loglikelihood_rolling(self, texts: list[str]) -> list[Rolling]: ...

    def generate(self, contexts: list[str], stop: list[str], max_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seeds: list[int] | None = None) -> list[Generation]: ...


def encode_pair(encode, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's ``_encode_pair`` for causal models (``context`` non-empty)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = encode(context + continuation)
    context_enc = encode(context)
    return context_enc, whole[len(context_enc):]


class RuntimeScorer:
    """The ``Scorer`` over an ``LLM``: every call is one ``generate`` over all its requests."""

    def __init__(self, llm):
        if llm.tokenizer is None:
            raise EvalError("the engine has no tokenizer.json: evaluation needs text prompts")
        self.llm = llm
        self.max_len = llm.max_model_len

    def _run(self, prompts: list[list[int]], params, order: list[int] | None = None) -> list:
        """``generate`` over the prompts (in ``order`` when given; outputs come back in the prompts' order)."""
        order = order if order is not None else list(range(len(prompts)))
        if isinstance(params, list):
            params = [params[i] for i in order]
        sent = self.llm.generate([prompts[i] for i in order], params)
        outs = [None] * len(prompts)
        for i, out in zip(order, sent):
            if out.error:
                raise EvalError(f"runtime refused request {i} ({len(prompts[i])} tokens): {out.error}")
            outs[i] = out
        return outs

    def _pair_tokens(self, context: str, continuation: str, encode=None) -> tuple[list[int], list[int]]:
        encode = encode or self.llm.tokenizer.encode
        if context:
            return encode_pair(encode, context, continuation)
        cont = encode(continuation)
        return ([self.llm.eos_id], cont) if cont[:1] != [self.llm.eos_id] else (cont[:1], cont[1:])

    def loglikelihood(self, pairs: list[tuple[str, str]], greedy: bool = False) -> list[LogLikelihood]:
        from puyu.serving import SamplingParams

        limit = self.max_len - 1  # the runtime wants room for one generated token
        memo: dict[str, list[int]] = {}  # a context is encoded once for all its options

        def encode(text: str) -> list[int]:
            if text not in memo:
                memo[text] = self.llm.tokenizer.encode(text)
            return memo[text]

        encoded = [self._pair_tokens(c, x, encode) for c, x in pairs]
        for i, (_, cont) in enumerate(encoded):
            if not cont or len(cont) >= limit:
                raise EvalError(f"loglikelihood pair {i}: continuation of {len(cont)} tokens "
                                f"(needs 1..{limit - 1} for model length {self.max_len})")
        prompts = [(ctx + cont)[-limit:] for ctx, cont in encoded]
        # scored from the continuation on, so the runtime may take the context's KV blocks from its prefix
        # cache; sorted by tokens, so requests sharing a context (or any prefix) are adjacent and hit it
        params = [SamplingParams(max_tokens=1, prompt_logprobs=True, prompt_logprobs_start=len(p) - len(cont))
                  for p, (_, cont) in zip(prompts, encoded)]
        outs = self._run(prompts, params, order=sorted(range(len(prompts)), key=prompts.__getitem__))
        sums = [sum(o.prompt_logprobs[-len(cont):]) for o, (_, cont) in zip(outs, encoded)]
        greedy_flags: list[bool | None] = [None] * len(pairs)
        if greedy:  # greedy decoding from the context reproduces the continuation iff it is the argmax path
            gen = self._run([ctx[-(self.max_len - len(cont)):] for ctx, cont in encoded],
                            [SamplingParams(max_tokens=len(cont), ignore_eos=True) for _, cont in encoded])
            greedy_flags = [o.token_ids == cont for o, (_, cont) in zip(gen, encoded)]
        return [LogLikelihood(s, g, len(cont)) for s, g, (_, cont) in zip(sums, greedy_flags, encoded)]

    def loglikelihood_rolling(self, texts: list[str]) -> list[Rolling]:
        """Every token of each text scored once, after an EOS, in windows of the model length: a window
        scores the tokens after the previous one's with as much preceding context as fits (lm-eval's
        disjoint rolling windows)."""
        from puyu.serving import SamplingParams

        width = self.max_len - 1
        windows, owner, scored = [], [], []
        for t, text in enumerate(texts):
            seq = [self.llm.eos_id] + self.llm.tokenizer.encode(text)
            pos = 1  # next token to score
            while pos < len(seq):
                end = min(pos + width - 1, len(seq))
                windows.append(seq[max(0, end - width):end])
                owner.append(t)
                scored.append(end - pos)
                pos = end
        outs = self._run(windows, [SamplingParams(max_tokens=1, prompt_logprobs=True, prompt_logprobs_start=len(w) - n)
                                   for w, n in zip(windows, scored)])
        totals = [[0.0, 0] for _ in texts]
        for o, t, n in zip(outs, owner, scored):
            totals[t][0] += sum(o.prompt_logprobs[-n:])
            totals[t][1] += n
        return [Rolling(lp, n) for lp, n in totals]

    def generate(self, contexts: list[str], stop: list[str], max_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seeds: list[int] | None = None) -> list[Generation]:
        """Continuations cut at the first stop string (greedy at temperature 0, else sampled with context
        i's ``seeds[i]``); a context too long keeps its last tokens."""
        from puyu.serving import SamplingParams

        if max_tokens >= self.max_len:
            raise EvalError(f"job.infer.max_tokens={max_tokens} leaves no room for a prompt (model length {self.max_len})")
        room = self.max_len - max_tokens
        memo: dict[str, list[int]] = {}  # n samples of one problem share its context
        prompts = [memo.setdefault(c, self.llm.tokenizer.encode(c)[-room:]) for c in contexts]
        seeds = seeds if seeds is not None else [None] * len(contexts)
        outs = self.llm.generate(prompts, [SamplingParams(max_tokens=max_tokens, stop=list(stop), temperature=temperature,
                                                          top_p=top_p, seed=seed) for seed in seeds])
        return [Generation(o.text or "", o.error) for o in outs]


def _scorer(llm) -> Scorer:
    return llm if hasattr(llm, "loglikelihood") else RuntimeScorer(llm)


def loglikelihood(llm, pairs: list[tuple[str, str]], greedy: bool = False) -> list[LogLikelihood]:
    """Summed log-probability of each continuation given its context (lm-eval's rule); ``greedy`` also
    says whether greedy decoding would produce the continuation (one more, generating, runtime call)."""
    return _scorer(llm).loglikelihood(pairs, greedy)


def loglikelihood_rolling(llm, texts: list[str]) -> list[Rolling]:
    return _scorer(llm).loglikelihood_rolling(texts)


def generate_until(llm, contexts: list[str], stop: list[str], max_tokens: int) -> list[Generation]:
    return _scorer(llm).generate(contexts, stop, max_tokens)


# ---- one task's predictions ------------------------------------------------------------------------------
def validate(cfg: InferenceConfig) -> None:
    checks = [
        (cfg.circular in MODES, "circular", f"must be one of {', '.join(MODES)}"),
        (isinstance(cfg.num_fewshot, int) and cfg.num_fewshot >= -1, "num_fewshot", "must be an integer >= -1"),
        (isinstance(cfg.max_tokens, int) and cfg.max_tokens >= 1, "max_tokens", "must be an integer >= 1"),
        (cfg.code_timeout_s > 0, "code_timeout_s", "must be > 0"),
        (isinstance(cfg.num_samples, int) and cfg.num_samples >= 1, "num_samples", "must be an integer >= 1"),
        (cfg.temperature >= 0 and (cfg.num_samples == 1 or cfg.temperature > 0), "temperature",
         "must be >= 0, and > 0 when num_samples > 1 (n greedy samples are one sample n times)"),
        (0 < cfg.top_p <= 1, "top_p", "must be in (0, 1]"),
    ]
    for ok, key, what in checks:
        if not ok:
            raise EvalError(f"job.infer.{key} {what}, got {getattr(cfg, key)!r}")


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # first of equal maxima


def groups_of(item: Item) -> dict:
    """The item's subject and category, which the report breaks scores down by."""
    return {key: item.meta[key] for key in GROUP_KEYS if item.meta.get(key)}


def circular_mode(dataset: Dataset, cfg: InferenceConfig) -> str:
    """CircularEval only where options are shown with letters: a cloze option is scored by its own text,
    so reordering the options changes nothing."""
    return "none" if dataset.style else cfg.circular


def predict_mc(dataset: Dataset, items: list[Item], scorer: Scorer, cfg: InferenceConfig) -> list[dict]:
    variants = expand(items, circular_mode(dataset, cfg))
    prompts = [render(dataset, v.item, cfg.num_fewshot) for v in variants]
    lls = scorer.loglikelihood([(p.context, c) for p in prompts for c in p.continuations])
    records, at = [], 0
    for v, p in zip(variants, prompts):
        mine, at = lls[at:at + len(p.continuations)], at + len(p.continuations)
        logprobs = [ll.logprob for ll in mine]
        pred = _argmax(logprobs)
        records.append({
            "id": v.variant_id, "origin_id": v.origin_id, "variant": v.variant_index, "gold": v.item.answer,
            "pred": pred,
            "pred_norm": _argmax([lp / len(c) for lp, c in zip(logprobs, p.choices)]),
            "pred_nll": _argmax([ll.logprob / ll.n_tokens for ll in mine]),
            "correct": pred == v.item.answer, "logprobs": logprobs, "tokens": [ll.n_tokens for ll in mine],
            **groups_of(v.item),
        })
    return records


def predict_gen(dataset: Dataset, items: list[Item], scorer: Scorer, cfg: InferenceConfig) -> list[dict]:
    prompts = [render(dataset, item, cfg.num_fewshot) for item in items]
    outs = scorer.generate([p.context for p in prompts], prompts[0].stop if prompts else [], cfg.max_tokens)
    records = []
    for item, out in zip(items, outs):
        also = {}
        if dataset.style == "gsm8k":  # lm-eval's strict-match, and its flexible-extract beside it
            solution = item.meta.get("solution", str(item.answer))
            extracted, flexible = gsm8k_strict(out.text), gsm8k_flexible(out.text)
            correct = gsm8k_matches(extracted, solution)
            also = {"extracted_flexible": flexible, "correct_flexible": gsm8k_matches(flexible, solution)}
        elif dataset.style:  # open-domain QA: lm-eval's exact match against every accepted answer
            extracted, correct = out.text.strip(), qa_matches(out.text, item.answer, dataset.style)
        else:
            extracted = extract_answer(out.text, item.answer)
            correct = answer_matches(extracted, item.answer)
        record = {"id": item.id, "prediction": out.text, "extracted": extracted, "gold": item.answer,
                  "correct": correct, **also, **groups_of(item)}
        records.append({**record, "error": out.error} if out.error else record)
    return records


def predict_code(dataset: Dataset, items: list[Item], scorer: Scorer, cfg: InferenceConfig) -> list[dict]:
    """``num_samples`` completions per problem (greedy at temperature 0), each run against the problem's
    tests in the sandbox right here in the task; a record per problem keeps n, the passing count c (what
    pass@k is estimated from) and every sample beyond the first."""
    from puyu.evaluation.humaneval import check_many

    n = cfg.num_samples
    prompts = [render(dataset, item) for item in items]
    outs = scorer.generate([p.context for p in prompts for _ in range(n)], prompts[0].stop if prompts else [],
                           cfg.max_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                           seeds=[cfg.sample_seed + s for _ in prompts for s in range(n)])
    problems = [item.meta["problem"] for item in items for _ in range(n)]
    ran = iter(check_many([(problem, out.text) for problem, out in zip(problems, outs) if not out.error],
                          timeout_s=cfg.code_timeout_s))
    results = [{"passed": False, "status": "error", "detail": out.error, "sandbox": ""} if out.error else next(ran)
               for out in outs]
    records = []
    for i, item in enumerate(items):
        mine = [(out.text, r) for out, r in zip(outs[i * n:(i + 1) * n], results[i * n:(i + 1) * n])]
        (completion, first), rest = mine[0], mine[1:]
        record = {"id": item.id, "task_id": item.meta["problem"].get("task_id"), "completion": completion,
                  "passed": bool(first["passed"]), "status": first["status"], "detail": first.get("detail", ""),
                  "n": n, "c": sum(bool(r["passed"]) for _, r in mine), "sandbox": first["sandbox"]}
        if rest:
            record["samples"] = [{"completion": text, "passed": bool(r["passed"]), "status": r["status"]}
                                 for text, r in rest]
        records.append(record)
    return records


def predict_bpb(dataset: Dataset, items: list[Item], scorer: Scorer, cfg: InferenceConfig) -> list[dict]:
    rolled = scorer.loglikelihood_rolling([item.question for item in items])
    return [{"id": item.id, "nll": -r.logprob, "tokens": r.n_tokens, "bytes": len(item.question.encode())}
            for item, r in zip(items, rolled)]


PREDICT = {"mc": predict_mc, "gen": predict_gen, "code": predict_code, "bpb": predict_bpb}


def predict(dataset: Dataset, items: list[Item], llm, cfg: InferenceConfig) -> list[dict]:
    """Records for ``items`` (a slice of ``dataset.items``) from ``llm`` (an ``LLM`` or any ``Scorer``).

    mc, one per variant: id ("<item id>@<variant>"), origin_id, variant, gold, pred, pred_norm, pred_nll,
    correct, logprobs (per option), tokens (per option)[, category, subject]; gen: id, prediction, extracted,
    gold, correct[, extracted_flexible, correct_flexible (GSM8K)][, category, subject][, error]; code: id, task_id, completion, passed, status, detail, n,
    c, sandbox (its active protections)[, samples]; bpb: id, nll (nats), tokens, bytes.
    """
    validate(cfg)
    if not items:
        return []
    return PREDICT[dataset.kind](dataset, items, _scorer(llm), cfg)


def estimate_cost(dataset: Dataset, item: Item, cfg: InferenceConfig) -> float:
    """Roughly the tokens the item makes the model process: prompt tokens × options × variants for mc,
    prompt + ``max_tokens`` for generation (+ a sandbox run for code), the document for bpb."""
    validate(cfg)
    prompt_tokens = len(render(dataset, item, cfg.num_fewshot).context) / CHARS_PER_TOKEN + 1
    if dataset.kind == "mc":
        return prompt_tokens * len(item.choices) * num_variants(len(item.choices), circular_mode(dataset, cfg))
    if dataset.kind == "gen":
        return prompt_tokens + cfg.max_tokens
    if dataset.kind == "code":
        return prompt_tokens + (cfg.max_tokens + SANDBOX_COST) * cfg.num_samples
    return prompt_tokens
