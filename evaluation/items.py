"""What every part of evaluation passes around: items of a dataset, and the one error type.

An ``Item`` is one question as the dataset ships it (before few-shot prompting and before CircularEval
expands a multiple-choice item into rotated variants). Its ``id`` is stable across runs (the dataset
name and the item's position in the shipped file), so cached predictions can be matched to it.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from puyu.launcher.errors import PuyuError

KINDS = ("mc", "gen", "code", "bpb")  # multiple choice | free generation | code + tests | bits per byte


class EvalError(PuyuError, ValueError):
    """Bad evaluation input (dataset row, dataset or model name, config): one line naming what is at fault."""


@dataclasses.dataclass
class Item:
    id: str  # "<dataset>/<index in the shipped file>"
    question: str  # mc/gen: the question text; code: the function prompt; bpb: the document
    choices: list[str] = dataclasses.field(default_factory=list)  # mc only
    answer: Any = None  # mc: index into choices; gen: the reference answer, or a list of accepted ones; code/bpb: None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)  # subject, task_id, tests, ...


@dataclasses.dataclass
class Dataset:
    name: str
    kind: str  # one of KINDS
    items: list[Item]
    fewshot: list[Item] = dataclasses.field(default_factory=list)  # examples for the prompt, never scored
    style: str = ""  # the prompt format (templates.STYLES); "" is the kind's own (MMLU letters, GSM8K chain)
