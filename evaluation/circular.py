"""CircularEval (OpenCompass): ask every multiple-choice question with its options reordered, and call a
question solved only if the model gets it right in every order.

A model that prefers a letter (or a position) is right by luck on a fixed order; over rotated orders that
luck averages out (``acc_circular``) and rarely survives all of them (``perf_circular``). Modes:
``none`` (the original order only), ``circular`` (the n cyclic shifts: variant k puts original option
``(j + k) % n`` at position j) and ``all_possible`` (all n! permutations, in ``itertools.permutations``
order). Variant 0 is always the original order.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import NamedTuple

from puyu.evaluation.items import EvalError, Item

MODES = ("none", "circular", "all_possible")
MAX_ALL_POSSIBLE = 6  # 720 variants per question; more is an error, not a silent blow-up


class Variant(NamedTuple):
    variant_id: str  # "<origin id>@<variant index>"
    origin_id: str
    variant_index: int
    item: Item  # choices permuted, answer remapped


def orders(n: int, mode: str) -> list[tuple[int, ...]]:
    """The option orders of one n-option question: ``order[j]`` is the original index shown at position j."""
    if mode == "none":
        return [tuple(range(n))]
    if mode == "circular":
        return [tuple((j + k) % n for j in range(n)) for k in range(n)]
    if mode == "all_possible":
        if n > MAX_ALL_POSSIBLE:
            raise EvalError(f"job.infer.circular=all_possible: {n} options give {n}! variants "
                            f"(at most {MAX_ALL_POSSIBLE} options); use circular")
        return list(itertools.permutations(range(n)))
    raise EvalError(f"job.infer.circular must be one of {', '.join(MODES)}, got {mode!r}")


def num_variants(n: int, mode: str) -> int:
    """How many orders ``orders(n, mode)`` gives, without listing them (for cost estimates)."""
    if mode == "all_possible" and n <= MAX_ALL_POSSIBLE:
        return math.factorial(n)
    return n if mode == "circular" else len(orders(n, mode))


def expand(items: list[Item], mode: str) -> list[Variant]:
    """Every item as its variants, item after item."""
    out = []
    for item in items:
        for k, order in enumerate(orders(len(item.choices), mode)):
            choices = [item.choices[i] for i in order]
            answer = order.index(item.answer)
            permuted = dataclasses.replace(item, choices=choices, answer=answer)
            out.append(Variant(f"{item.id}@{k}", item.id, k, permuted))
    return out


def circular_metrics(records: list[dict]) -> dict[str, float]:
    """Percentages (0..100) over questions from per-variant records ``{origin_id, variant, correct}``.

    - ``acc_origin``: accuracy on the original order (variant 0) alone, the plain benchmark number;
    - ``acc_circular``: accuracy over all variants of all questions (each variant counts once);
    - ``perf_circular``: the share of questions answered correctly in every one of their variants;
    - ``more_N`` (N = 1 .. n-1, n the most variants a question has): the share of questions with at least
      N correct variants. ``more_1`` is "right at least once"; ``perf_circular`` is "at least n".

    A model that always answers "A" on 4-option questions under ``circular`` is right in exactly one of the
    4 rotations: acc_circular 25, perf_circular 0, more_1 100, more_2 0.
    """
    if not records:
        return {}
    by_origin: dict[str, list[dict]] = {}
    for r in records:
        by_origin.setdefault(r["origin_id"], []).append(r)
    questions = len(by_origin)
    correct_counts = [sum(bool(r["correct"]) for r in rs) for rs in by_origin.values()]
    origin = [r for r in records if r["variant"] == 0]
    pct = lambda x, n: 100.0 * x / n if n else 0.0
    out = {
        "acc_origin": pct(sum(bool(r["correct"]) for r in origin), len(origin)),
        "acc_circular": pct(sum(correct_counts), len(records)),
        "perf_circular": pct(sum(c == len(rs) for c, rs in zip(correct_counts, by_origin.values())), questions),
    }
    n = max(len(rs) for rs in by_origin.values())
    for k in range(1, n):
        out[f"more_{k}"] = pct(sum(c >= k for c in correct_counts), questions)
    return out
