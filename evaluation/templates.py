"""Few-shot prompts: what the model is shown for an item, and what is scored or where generation stops.

Multiple choice follows lm-eval's MMLU task character for character (description line, ``question.strip()``,
``"A. choice"`` lines, ``"Answer:"``, the gold letter after a space, examples separated by a blank line), so
puyu's numbers can be checked against lm-eval on the same model. The continuations scored are ``" A"``,
``" B"``...: the space belongs to the continuation, as lm-eval's target delimiter does.

Cloze-style multiple choice (ARC, HellaSwag) scores each option's own text as the continuation after
lm-eval's prompt for the task (ARC ``"Question: ...\\nAnswer:"``, HellaSwag the cleaned context), so the
option order does not matter and CircularEval is not applied to them. Open-domain QA (NQ-open, TriviaQA)
is lm-eval's prompt, generation stopped at a newline, full stop or comma.

GSM8K is lm-eval's ``gsm8k`` task character for character: "Question: ...\\nAnswer: <solution>" with the
examples' solutions as the dataset ships them (calculator annotations ``<<48/2=24>>`` and the closing
``#### <number>`` included), 5 of them, examples separated by a blank line, generation stopped at
"Question:" (and the ``</s>`` / ``<|im_end|>`` end markers). A custom gen dataset is "Question: ...\\nAnswer:".
HumanEval is the bare function prompt, stopped at lm-eval's (and the Codex paper's) stop sequences
``\\nclass``, ``\\ndef``, ``\\n#``, ``\\nif``, ``\\nprint``.
"""
from __future__ import annotations

import dataclasses

from puyu.evaluation.datasets import LETTERS
from puyu.evaluation.items import Dataset, EvalError, Item

DEFAULT_FEWSHOT = {"mc": 5, "gen": 5, "code": 0, "bpb": 0}  # MMLU's 5; GSM8K 5 as lm-eval's gsm8k
GEN_STOP = ["Question:", "</s>", "<|im_end|>"]  # lm-eval's gsm8k
QA_STOP = ["\n", ".", ","]  # lm-eval's nq_open and triviaqa
CLOZE = {"arc": "Question: {question}\nAnswer:", "hellaswag": "{question}"}
QA = {"nq_open": ("Answer these questions:\n", "Q: {question}?\nA:", "\n"),  # description, question, between shots
      "triviaqa": ("", "Question: {question}?\nAnswer:", "\n\n")}
STYLES = {"mc": ("", *CLOZE), "gen": ("", "gsm8k", *QA), "code": ("",), "bpb": ("",)}
CODE_STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]  # lm-eval's humaneval, the Codex paper's


@dataclasses.dataclass
class Prompt:
    context: str
    continuations: list[str] = dataclasses.field(default_factory=list)  # mc: one per choice
    choices: list[str] = dataclasses.field(default_factory=list)  # mc: the options as scored, without the space
    stop: list[str] = dataclasses.field(default_factory=list)  # gen/code


def mc_question(item: Item) -> str:
    """One question as lm-eval's MMLU ``doc_to_text`` renders it (ends with "Answer:")."""
    lines = [item.question.strip()] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(item.choices)]
    return "\n".join(lines) + "\nAnswer:"


def mc_description(subject: str | None) -> str:
    about = f" about {subject}" if subject else ""
    return f"The following are multiple choice questions (with answers){about}.\n\n"


def mc_prompt(item: Item, shots: list[Item]) -> Prompt:
    examples = "".join(f"{mc_question(s)} {LETTERS[s.answer]}\n\n" for s in shots)
    context = mc_description(item.meta.get("subject")) + examples + mc_question(item)
    letters = [LETTERS[i] for i in range(len(item.choices))]
    return Prompt(context, [f" {x}" for x in letters], letters)


def cloze_prompt(style: str, item: Item, shots: list[Item]) -> Prompt:
    examples = "".join(f"{CLOZE[style].format(question=s.question)} {s.choices[s.answer]}\n\n" for s in shots)
    return Prompt(examples + CLOZE[style].format(question=item.question), [f" {c}" for c in item.choices],
                  list(item.choices))


def qa_prompt(style: str, item: Item, shots: list[Item]) -> Prompt:
    description, question, between = QA[style]
    examples = "".join(f"{question.format(question=s.question)} {s.answer[0]}{between}" for s in shots)
    return Prompt(description + examples + question.format(question=item.question), stop=list(QA_STOP))


def gen_solution(item: Item) -> str:
    """A few-shot example's worked answer: GSM8K's solution as shipped (lm-eval's target), else the answer."""
    return item.meta.get("solution", str(item.answer))


def gen_prompt(item: Item, shots: list[Item]) -> Prompt:
    examples = "".join(f"Question: {s.question}\nAnswer: {gen_solution(s)}\n\n" for s in shots)
    return Prompt(examples + f"Question: {item.question}\nAnswer:", stop=list(GEN_STOP))


def code_prompt(item: Item) -> Prompt:
    return Prompt(item.question, stop=list(CODE_STOP))


def fewshot_for(dataset: Dataset, item: Item, k: int) -> list[Item]:
    """The first ``k`` examples of the pool that share the item's subject (all of the pool when it has none)."""
    subject = item.meta.get("subject")
    pool = [s for s in dataset.fewshot if s.meta.get("subject") == subject] if subject else dataset.fewshot
    if k > len(pool):
        raise EvalError(f"job.infer.num_fewshot={k}: dataset {dataset.name!r} has only {len(pool)} few-shot "
                        f"examples{f' for subject {subject!r}' if subject else ''}")
    return pool[:k]


def num_shots(dataset: Dataset, num_fewshot: int) -> int:
    """``num_fewshot``, or the dataset kind's default when it is -1 (capped by what the pool holds)."""
    if num_fewshot >= 0:
        return num_fewshot
    return min(DEFAULT_FEWSHOT[dataset.kind], len(dataset.fewshot))


def render(dataset: Dataset, item: Item, num_fewshot: int = -1) -> Prompt:
    """The prompt for ``item`` of ``dataset`` (bpb items are scored as they are: the document is the context)."""
    if dataset.style not in STYLES[dataset.kind]:
        raise EvalError(f"dataset {dataset.name!r}: unknown {dataset.kind} style {dataset.style!r}; "
                        f"known: {', '.join(repr(s) for s in STYLES[dataset.kind])}")
    k = num_shots(dataset, num_fewshot)
    if dataset.kind == "mc":
        shots = fewshot_for(dataset, item, k)
        return cloze_prompt(dataset.style, item, shots) if dataset.style else mc_prompt(item, shots)
    if dataset.kind == "gen":
        shots = fewshot_for(dataset, item, k)
        return qa_prompt(dataset.style, item, shots) if dataset.style in QA else gen_prompt(item, shots)
    if dataset.kind == "code":
        return code_prompt(item)
    return Prompt(item.question)
