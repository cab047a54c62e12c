"""From prediction records to numbers: answer extraction, pass@k, and one ``score`` per dataset kind.

All accuracies are percentages (0..100), as OpenCompass and the report print them.
"""
from __future__ import annotations

import math
import re
import string

from puyu.evaluation.circular import circular_metrics
from puyu.evaluation.humaneval import pass_at_k
from puyu.evaluation.items import KINDS, EvalError

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\$?\.\d+")
_ANSWER_IS = re.compile(r"answer is\s*:?\s*(" + _NUMBER.pattern + ")", re.IGNORECASE)
_HASHES = re.compile(r"####\s*(" + _NUMBER.pattern + ")")
PASS_K = (1, 10, 100)  # the k reported, as the Codex paper, each where k <= n
_PUNCTUATION = str.maketrans("", "", string.punctuation)
# lm-eval's regexes_to_ignore per QA task, kept as lm-eval has them (nq_open's removes every "a" and "an")
QA_IGNORE = {"nq_open": [r"\ban|a|the\b"], "triviaqa": []}
# lm-eval 0.4.13's gsm8k task: its two answer filters (strict-match, flexible-extract) and the
# regexes_to_ignore of its exact_match, applied to the answer and to the reference solution alike
GSM8K_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
GSM8K_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
GSM8K_IGNORE = [",", r"\$", r"(?s).*#### ", r"\.$"]


def normalize_number(text: str) -> str:
    """"$1,234.00" -> "1234", "-.5" -> "-0.5", "7." -> "7": one spelling per value."""
    text = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = float(text)
    except ValueError:
        return text
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def extract_number(text: str) -> str | None:
    """The answer a GSM8K-style solution states: after the first ``####``, else after "The answer is",
    else the last number in the text; ``None`` when there is no number."""
    for pattern in (_HASHES, _ANSWER_IS):
        match = pattern.search(text)
        if match:
            return normalize_number(match.group(1))
    numbers = _NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def is_number(text: str) -> bool:
    try:
        float(normalize_number(text))
    except ValueError:
        return False
    return True


def extract_answer(prediction: str, gold: str) -> str | None:
    """The answer compared with ``gold``: a number for numeric golds (GSM8K), else the first line of text."""
    if is_number(gold):
        return extract_number(prediction)
    first = prediction.strip().splitlines()[0] if prediction.strip() else ""
    return " ".join(first.split()).lower() or None


def answer_matches(extracted: str | None, gold: str) -> bool:
    """Exact match after normalisation (numbers by value spelling, text by case and whitespace)."""
    if extracted is None:
        return False
    if is_number(gold):
        return extracted == normalize_number(gold)
    return extracted == " ".join(gold.split()).lower()


def gsm8k_strict(text: str) -> str | None:
    """lm-eval's gsm8k ``strict-match`` filter: the number after the first ``#### `` (None: "[invalid]")."""
    found = GSM8K_STRICT.findall(text)
    return found[0].strip() if found else None


def gsm8k_flexible(text: str) -> str | None:
    """lm-eval's gsm8k ``flexible-extract`` filter: the last number-like run in the text (None: "[invalid]")."""
    found = GSM8K_FLEXIBLE.findall(text)
    groups = [g for g in found[-1] if g] if found else []
    return groups[0].strip() if groups else None


def gsm8k_matches(extracted: str | None, solution: str) -> bool:
    """lm-eval's gsm8k ``exact_match``: commas, dollar signs, everything up to the last ``#### `` and a final
    full stop removed from both the answer and the reference solution, case ignored."""
    if extracted is None:
        return False

    def norm(text: str) -> str:
        for pattern in GSM8K_IGNORE:
            text = re.sub(pattern, "", text)
        return text.lower()

    return norm(extracted) == norm(solution)


def qa_matches(prediction: str, golds: list[str], style: str) -> bool:
    """lm-eval's exact_match for nq_open and triviaqa: the prediction stripped (its remove_whitespace
    filter), the task's regexes removed from both sides, case and punctuation ignored; right when any
    accepted answer matches."""
    def norm(text: str) -> str:
        for pattern in QA_IGNORE[style]:
            text = re.sub(pattern, "", text)
        return text.lower().translate(_PUNCTUATION)

    said = norm(prediction.strip())
    return any(said == norm(gold) for gold in golds)


def _pct(flags: list) -> float:
    return 100.0 * sum(bool(f) for f in flags) / len(flags) if flags else 0.0


def score(kind: str, records: list[dict]) -> dict[str, float]:
    """The metrics of one dataset from its records (as ``inferencers.predict`` writes them).

    mc: ``acc`` (lm-eval's: argmax of the summed log-probability of " X"), ``acc_norm`` (the same divided
    by the continuation's length in bytes), ``acc_nll`` (OpenCompass-style: argmin of mean NLL per
    continuation token) — all on the original option order — plus CircularEval's metrics (acc rule);
    gen: ``accuracy`` (exact match of the extracted answer; GSM8K: lm-eval's strict-match ``exact_match``,
    with its flexible-extract one as ``accuracy_flexible``), and with an LLM judge (``puyu.evaluation.judge``)
    ``judge_accuracy`` (judged correct, over all items) and ``judge_parsed`` (items with a verdict); code: ``pass@k`` for k in ``PASS_K`` up to the
    samples per problem n, the unbiased estimator of Chen et al. (2021) from n and the passing count c,
    averaged over problems (n = 1 greedy: the share of problems passed); bpb: ``bits_per_byte`` (summed NLL in bits over UTF-8 bytes) and ``ppl`` (token perplexity,
    which depends on the tokenizer, unlike bits per byte).
    """
    if kind not in KINDS:
        raise EvalError(f"unknown dataset kind {kind!r}; known: {', '.join(KINDS)}")
    if not records:
        return {}
    if kind == "mc":
        origin = [r for r in records if r["variant"] == 0]
        return {"acc": _pct([r["correct"] for r in origin]),
                "acc_norm": _pct([r["pred_norm"] == r["gold"] for r in origin]),
                "acc_nll": _pct([r["pred_nll"] == r["gold"] for r in origin]),
                **circular_metrics(records)}
    if kind == "gen":
        scores = {"accuracy": _pct([r["correct"] for r in records])}
        if "correct_flexible" in records[0]:
            scores["accuracy_flexible"] = _pct([r["correct_flexible"] for r in records])
        if "judge_verdict" in records[0]:
            scores["judge_accuracy"] = _pct([r["judge_verdict"] == "correct" for r in records])
            scores["judge_parsed"] = _pct([r["judge_verdict"] is not None for r in records])
        return scores
    if kind == "code":
        n = min(r.get("n", 1) for r in records)
        return {f"pass@{k}": 100.0 * sum(pass_at_k(r.get("n", 1), r.get("c", int(r["passed"])), k) for r in records)
                / len(records) for k in PASS_K if k <= n}
    nll = sum(r["nll"] for r in records)
    tokens = sum(r["tokens"] for r in records)
    nbytes = sum(r["bytes"] for r in records)
    return {"bits_per_byte": nll / math.log(2) / nbytes if nbytes else 0.0,
            "ppl": math.exp(nll / tokens) if tokens else 0.0}
