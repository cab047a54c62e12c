"""Token selection from logits: repetition penalty, temperature, top-k, top-p, per-request generators.

Greedy rows (temperature 0, no penalty) are one batched argmax with the reference generation's rule
(the first maximal logit), so greedy output is bit-for-bit the model's choice. Other rows draw from their own
``torch.Generator`` seeded per request, so a request's output does not depend on what it was batched
with or whether it was preempted.
"""
from __future__ import annotations

import numpy as np
import torch

from puyu.serving.config import SamplingParams


def apply_repetition_penalty(logits: torch.Tensor, seen: list[int], penalty: float) -> torch.Tensor:
    """CTRL's penalty on logits [V] of tokens already in the sequence: positive / p, negative * p."""
    if penalty == 1.0 or not seen:
        return logits
    idx = torch.tensor(sorted(set(seen)), dtype=torch.long)
    vals = logits[idx]
    logits = logits.clone()
    logits[idx] = torch.where(vals > 0, vals / penalty, vals * penalty)
    return logits


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Logits [V] with everything outside the top-k and the top-p nucleus set to -inf."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def first_argmax(logits: torch.Tensor) -> np.ndarray:
    """Index [B] (int64) of the first maximal value of each row of CPU logits [B, V], through NumPy, whose
    vectorised argmax is ~10x torch's on [256, 2000] fp32 (41 vs 452 us at one thread); same rule."""
    return logits.numpy().argmax(-1)


def argmax_rows(logits: torch.Tensor) -> list[int]:
    """``first_argmax`` as a list of ints, on any device."""
    if logits.device.type == "cpu":
        return first_argmax(logits).tolist()
    return logits.argmax(-1).tolist()


def sample_rows(
    logits: torch.Tensor,  # [B, V] fp32
    params: list[SamplingParams],
    histories: list[list[int]],  # each row's tokens so far (prompt + output) for the penalty
    generators: list[torch.Generator],
) -> list[int]:
    """One next token per row."""
    greedy = [p.greedy for p in params]
    if all(greedy):
        return argmax_rows(logits)
    out = [0] * len(params)
    if any(greedy):
        rows = [i for i, g in enumerate(greedy) if g]
        for i, tok in zip(rows, argmax_rows(logits[rows])):
            out[i] = tok
    for i, p in enumerate(params):
        if greedy[i]:
            continue
        row = apply_repetition_penalty(logits[i].float(), histories[i], p.repetition_penalty)
        if p.temperature == 0:
            out[i] = int(row.argmax())
            continue
        row = filter_top_k_top_p(row / p.temperature, p.top_k, p.top_p)
        out[i] = int(torch.multinomial(row.softmax(-1), 1, generator=generators[i]))
    return out
