"""From prediction records to numbers: answer extraction, pass@k, and one ``score`` per dataset kind.

All accuracies are percentages (0..100), as OpenCompass and the report print them.
"""
from __future__ import annotations

import math
import re

from puyu.evaluation.circular import circular_metrics
from puyu.evaluation.humaneval import pass_at_k  # noqa: F401  (the one estimator, re-exported)
from puyu.evaluation.items import KINDS, EvalError

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\$?\.\d+")
_ANSWER_IS = re.compile(r"answer is\s*:?\s*(" + _NUMBER.pattern + ")", re.IGNORECASE)
_HASHES = re.compile(r"####\s*(" + _NUMBER.pattern + ")")


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


def _pct(flags: list) -> float:
    return 100.0 * sum(bool(f) for f in flags) / len(flags) if flags else 0.0


def score(kind: str, records: list[dict]) -> dict[str, float]:
    """The metrics of one dataset from its records (as ``inferencers.predict`` writes them).

    mc: ``acc`` (lm-eval's: argmax of the summed log-probability of " X"), ``acc_norm`` (the same divided
    by the continuation's length in bytes), ``acc_nll`` (OpenCompass-style: argmin of mean NLL per
    continuation token) — all on the original option order — plus CircularEval's metrics (acc rule);
    gen: ``accuracy`` (exact match of the extracted answer); code: ``pass@1`` (one greedy completion per
    problem); bpb: ``bits_per_byte`` (summed NLL in bits over UTF-8 bytes) and ``ppl`` (token perplexity,
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
        return {"accuracy": _pct([r["correct"] for r in records])}
    if kind == "code":
        return {"pass@1": _pct([r["passed"] for r in records])}
    nll = sum(r["nll"] for r in records)
    tokens = sum(r["tokens"] for r in records)
    nbytes = sum(r["bytes"] for r in records)
    return {"bits_per_byte": nll / math.log(2) / nbytes if nbytes else 0.0,
            "ppl": math.exp(nll / tokens) if tokens else 0.0}
