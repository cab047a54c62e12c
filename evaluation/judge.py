"""LLM-as-judge for open answers: a judge model reads the question, the reference answer(s) and a
prediction, and says whether the prediction is right.

Exact match undercounts free-form answers ("Paris, France" for "Paris"); OpenCompass's subjective and
LLM-judge evaluators ask a stronger model instead. Here ``job.judges`` names a judge per generation
dataset: a puyu engine directory, run inside the eval task through ``puyu.serving.LLM`` after the
candidate's predictions are made (the candidate is freed first), or the base URL of an OpenAI-compatible
server (puyu's own ``python -m puyu.serving.server``, or any other), asked with the ``openai`` client.
Both take the prompt as one user turn of a chat in the judge's template, at temperature 0, so the same
predictions get the same verdicts (and an engine and a server over the same engine give the same text).

The judge is asked to end with ``[[A]]`` (correct) or ``[[B]]`` (incorrect); ``parse_verdict`` reads the
last such marker, so a judge that restates the instructions before deciding is read right. Every record
keeps the judge's raw output (``judge_output``) and its ``judge_verdict``: "correct", "incorrect", or null
with ``judge_error`` saying why (no verdict in the text, or the request failed). ``metrics.score`` adds
``judge_accuracy`` (items judged correct, over all items: an unreadable verdict counts as wrong) and
``judge_parsed`` (items with a verdict).

The judge is named in the task's cache key by its settings (engine path or URL, model, prompt,
max_tokens), not by its weights: rebuilding a judge engine in place needs a new run (or no ``job.reuse``).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import re
from pathlib import Path
from typing import Any

from puyu.evaluation.items import Dataset, EvalError, Item

DEFAULT_PROMPT = (
    "You are grading an answer to a question. Decide whether the predicted answer gives the same answer as "
    "the reference (any one of them, if several are listed); wording, spelling variants and extra explanation "
    "do not matter, a different or missing answer does.\n\n"
    "Question: {question}\nReference answer(s): {reference}\nPredicted answer: {prediction}\n\n"
    "Explain briefly, then end with your verdict on its own line: [[A]] if the predicted answer is correct, "
    "[[B]] if it is not.")
FIELDS = ("question", "reference", "prediction")
SERVER_WORKERS = 8  # requests in flight to a server at once (it batches them continuously)
_MARKER = re.compile(r"\[\[\s*([AB])\s*\]\]", re.IGNORECASE)
_LEADING_WORD = re.compile(r"^\W*(yes|no|correct|incorrect)\b", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class JudgeSpec:
    """One dataset's judge (``job.judges.<dataset>``): exactly one of ``engine`` and ``base_url``."""

    engine: str = ""  # a puyu engine directory (job=build_engine output)
    base_url: str = ""  # an OpenAI-compatible endpoint, e.g. http://host:8000/v1
    model: str = "puyu"  # the model name sent to the server
    prompt: str = DEFAULT_PROMPT  # with {question}, {reference} and {prediction}; literal braces doubled
    max_tokens: int = 256  # of the judge's reply

    def describe(self) -> str:
        return f"engine {self.engine}" if self.engine else f"{self.base_url} (model {self.model})"


def judge_spec(dataset: str, raw: Any) -> JudgeSpec:
    """``job.judges.<dataset>`` checked; a bad one fails in one line naming the key."""
    where = f"job.judges.{dataset}"
    if not isinstance(raw, dict) and not hasattr(raw, "keys"):
        raise EvalError(f"{where}: expected {{engine: <dir> | base_url: <url>, model, prompt, max_tokens}}, got {raw!r}")
    raw = dict(raw)
    known = [f.name for f in dataclasses.fields(JudgeSpec)]
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise EvalError(f"{where}: unknown key(s) {unknown}; known: {known}")
    for key in ("engine", "base_url", "model", "prompt"):
        if key in raw and not isinstance(raw[key], str):
            raise EvalError(f"{where}.{key}: must be a string, got {raw[key]!r}")
    spec = JudgeSpec(**raw)
    if bool(spec.engine) == bool(spec.base_url):
        raise EvalError(f"{where}: set exactly one of engine (an engine directory) and base_url (a server)")
    if spec.engine and not (Path(spec.engine) / "manifest.json").is_file():
        raise EvalError(f"{where}.engine: {spec.engine} is not an engine directory (no manifest.json)")
    if spec.base_url and not re.match(r"https?://[^/\s]+", spec.base_url):
        raise EvalError(f"{where}.base_url: must be an http(s):// URL, got {spec.base_url!r}")
    if not spec.model:
        raise EvalError(f"{where}.model: must not be empty")
    if isinstance(spec.max_tokens, bool) or not isinstance(spec.max_tokens, int) or spec.max_tokens < 1:
        raise EvalError(f"{where}.max_tokens: must be an integer >= 1, got {spec.max_tokens!r}")
    try:
        spec.prompt.format(**{name: name for name in FIELDS})
    except (KeyError, IndexError, ValueError) as exc:
        raise EvalError(f"{where}.prompt: only {{question}}, {{reference}} and {{prediction}} may be filled in "
                        f"(double literal braces): {type(exc).__name__} {exc}") from None
    if "{prediction}" not in spec.prompt:
        raise EvalError(f"{where}.prompt: must contain {{prediction}}")
    return spec


def check_judges(judges: Any, datasets: dict[str, Dataset]) -> dict[str, JudgeSpec]:
    """Every ``job.judges`` entry checked against the datasets being run (before anything is submitted)."""
    specs = {}
    for name, raw in dict(judges or {}).items():
        if name not in datasets:
            raise EvalError(f"job.judges.{name}: {name!r} is not in job.datasets {list(datasets)}")
        if datasets[name].kind != "gen":
            raise EvalError(f"job.judges.{name}: a judge scores open answers (generation datasets); "
                            f"{name!r} is {datasets[name].kind}")
        specs[name] = judge_spec(name, raw)
    return specs


def parse_verdict(text: str) -> str | None:
    """"correct" or "incorrect" from a judge's reply: its last ``[[A]]``/``[[B]]``, else a reply that starts
    with yes/no/correct/incorrect; None when it says neither (or is not text)."""
    if not isinstance(text, str):
        return None
    markers = _MARKER.findall(text)
    if markers:
        return "correct" if markers[-1].upper() == "A" else "incorrect"
    word = _LEADING_WORD.match(text)
    if word:
        return "correct" if word.group(1).lower() in ("yes", "correct") else "incorrect"
    return None


def render(spec: JudgeSpec, item: Item, prediction: str) -> str:
    reference = item.answer if isinstance(item.answer, list) else [item.answer]
    return spec.prompt.format(question=item.question, reference=" | ".join(map(str, reference)),
                              prediction=prediction.strip())


def ask_engine(spec: JudgeSpec, prompts: list[str], runtime) -> list[tuple[str, str | None]]:
    """(reply, error) per prompt from the engine, greedy, in one continuously batched call."""
    from puyu.serving import LLM, SamplingParams

    llm = LLM(spec.engine, runtime=runtime)
    outs = llm.chat([[{"role": "user", "content": p}] for p in prompts],
                    SamplingParams(max_tokens=spec.max_tokens, temperature=0.0))
    return [(o.text or "", o.error) for o in outs]


def ask_server(spec: JudgeSpec, prompts: list[str]) -> list[tuple[str, str | None]]:
    """(reply, error) per prompt from the server at temperature 0. A refused request (4xx) is that item's
    error; a server that cannot be reached fails the task in one line."""
    import openai

    client = openai.OpenAI(base_url=spec.base_url, api_key=os.environ.get("OPENAI_API_KEY", "none"),
                           max_retries=2, timeout=600)

    def ask(prompt: str) -> tuple[str, str | None]:
        try:
            reply = client.chat.completions.create(model=spec.model, messages=[{"role": "user", "content": prompt}],
                                                   temperature=0, max_tokens=spec.max_tokens)
        except openai.APIStatusError as exc:
            if exc.status_code >= 500:
                raise
            return "", f"judge refused the request ({exc.status_code}): {exc.message}"
        return reply.choices[0].message.content or "", None

    try:
        with concurrent.futures.ThreadPoolExecutor(SERVER_WORKERS) as pool:
            return list(pool.map(ask, prompts))
    except openai.APIError as exc:
        raise EvalError(f"judge at {spec.base_url}: {type(exc).__name__}: {exc}") from None


def judge_records(spec: JudgeSpec, items: list[Item], records: list[dict], runtime) -> list[dict]:
    """``records`` (generation records of ``items``, in order) with the judge's output and verdict added."""
    prompts = [render(spec, item, r["prediction"]) for item, r in zip(items, records, strict=True)]
    replies = ask_engine(spec, prompts, runtime) if spec.engine else ask_server(spec, prompts)
    judged = []
    for record, (text, error) in zip(records, replies):
        verdict = None if error else parse_verdict(text)
        record = {**record, "judge_output": text, "judge_verdict": verdict}
        if verdict is None:
            record["judge_error"] = error or "no [[A]]/[[B]] verdict in the judge's output"
        judged.append(record)
    return judged
