"""Preference pairs for DPO: read, render with the model's chat template, mask the prompt, store.

Rows are trl's preference formats, one JSON object a line: *standard* ``{"prompt": str, "chosen": str,
"rejected": str}`` and *conversational* ``{"prompt": [messages], "chosen": [messages], "rejected":
[messages]}`` (``messages`` as in :mod:`puyu.data_pipeline.sft`). A string prompt is one user turn and a
string completion one assistant turn, as SFT's Alpaca rows become, so every pair is rendered with the chat
template exactly as SFT renders a conversation (:func:`puyu.data_pipeline.sft.render`, the model's own
template; InternLM2's for puyu's tokenizer): ``prompt + chosen`` and ``prompt + rejected`` are each
tokenized as one string and a token is a completion token iff it starts inside an assistant turn *of the
completion* (with its end-of-turn token; the prompt's own assistant turns, if any, are context).
Labels are next-token targets as SFT's (``labels[t] = ids[t+1]`` when ``t+1`` is a completion token,
else -100), so a sequence's summed log-probability is minus its summed cross-entropy.

Sequences longer than ``seq_len`` keep their first ``seq_len`` tokens (trl's ``keep_start``;
``overlong="drop"`` drops the pair instead); a pair whose chosen or rejected sequence keeps no completion
token is dropped. Stored unpacked, one sequence a
row: ``tokens``/``labels`` ``[pairs, 2, seq_len]`` (0: chosen, 1: rejected) and ``lengths``
``[pairs, 2]``; a batch is cut to its longest sequence.
"""
from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Optional

import numpy as np

from puyu.launcher.atomic import atomic_open
from puyu.launcher.errors import PuyuError
from puyu.data_pipeline.sft import (IGNORE, PAD, ROLES, _trained_flags, load_arrays, load_tokenizer,
                                    read_jsonl_rows, render, save_arrays)

KEYS = ("prompt", "chosen", "rejected")


# --------------------------------------------------------------------------- reading
def _messages(value, key: str, where: str, role: str) -> list[dict]:
    if isinstance(value, str):
        if not value.strip():
            raise PuyuError(f"{where}: {key!r} is empty")
        return [{"role": role, "content": value}]
    if not isinstance(value, list) or not value:
        raise PuyuError(f"{where}: {key!r} must be a string or a non-empty list of {{role, content}} messages, "
                        f"got {type(value).__name__}")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise PuyuError(f"{where}: {key}[{i}] must be {{role: one of {list(ROLES)}, content: str}}, "
                            f"got {json.dumps(m)[:80]}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def parse_pair(row, where: str) -> tuple[list[dict], list[dict], list[dict]]:
    """One jsonl row -> (prompt, chosen, rejected) messages; a bad row raises a one-line PuyuError naming
    ``where`` (file:line)."""
    if not isinstance(row, dict):
        raise PuyuError(f"{where}: a preference row must be a JSON object, got {type(row).__name__}")
    missing = [k for k in KEYS if k not in row]
    if missing:
        raise PuyuError(f"{where}: a preference row needs 'prompt', 'chosen' and 'rejected' (missing "
                        f"{', '.join(repr(k) for k in missing)}; keys: {sorted(row)[:6]})")
    prompt = _messages(row["prompt"], "prompt", where, "user")
    if prompt[-1]["role"] == "assistant":
        raise PuyuError(f"{where}: 'prompt' ends with an assistant turn; the completion is the assistant's answer")
    chosen, rejected = (_messages(row[k], k, where, "assistant") for k in ("chosen", "rejected"))
    for key, msgs in (("chosen", chosen), ("rejected", rejected)):
        if msgs[0]["role"] != "assistant":
            raise PuyuError(f"{where}: {key!r} must start with an assistant turn (got {msgs[0]['role']!r})")
    return prompt, chosen, rejected


def read_pairs(path: str | Path) -> list[tuple[list[dict], list[dict], list[dict]]]:
    """All pairs of a jsonl file; errors name ``file:line``."""
    return read_jsonl_rows(path, parse_pair, "preference data")


def wiki_preference_jsonl(path: str | Path, limit: int = 0, offset: int = 0, seed: int = 0,
                          lang: str = "en-us") -> int:
    """Preference pairs nobody here wrote, from the Wikipedia lead sections package (as SFT's wiki data):
    prompt ``Tell me about <title>.``, chosen the true lead, rejected the same lead with its words shuffled
    (seeded per title). Titles sorted, ``limit`` of them from ``offset``; returns the pairs written."""
    from puyu.data_pipeline.corpora import wiki_summaries_file

    data = json.loads(wiki_summaries_file(lang).read_text())
    titles = [t for t in sorted(data) if len((data[t].get("extract") or "").split()) >= 4]
    titles = titles[offset:offset + limit] if limit else titles[offset:]
    n = 0
    with atomic_open(Path(path), "w", encoding="utf-8") as fh:
        for title in titles:
            lead = data[title]["extract"].strip()
            words = lead.split()
            rng = random.Random(f"{seed}:{title}")
            shuffled = words[:]
            while shuffled == words:
                rng.shuffle(shuffled)
            fh.write(json.dumps({"prompt": f"Tell me about {title}.", "chosen": lead,
                                 "rejected": " ".join(shuffled)}, ensure_ascii=False) + "\n")
            n += 1
    return n


# --------------------------------------------------------------------------- encoding
def completion_labels(tokenizer, prompt: list[dict], completions: list[list[dict]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, labels) of ``prompt + completion`` for each completion: labels on the completion's assistant
    turns only (the module doc)."""
    skip = sum(m["role"] == "assistant" for m in prompt)
    rendered = []
    for completion in completions:
        text, spans = render(prompt + completion, tokenizer)
        rendered.append((text, spans[skip:]))
    out = []
    for (_, spans), (ids, starts) in zip(rendered, tokenizer.encode_with_offsets([t for t, _ in rendered])):
        ids = np.asarray(ids, dtype=np.int64)
        trained = _trained_flags(starts, spans)
        labels = np.full(len(ids), IGNORE, dtype=np.int64)
        labels[:-1] = np.where(trained[1:], ids[1:], IGNORE)
        out.append((ids, labels))
    return out


@dataclasses.dataclass
class PairStats:
    pairs: int = 0  # read
    kept: int = 0
    truncated: int = 0  # pairs with a sequence cut to seq_len (still kept)
    dropped: int = 0  # pairs with a sequence that kept no completion token
    seq_len: int = 0
    tokens: int = 0  # real tokens of the kept sequences
    completion_tokens: int = 0  # labelled positions

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Pairs:
    tokens: np.ndarray  # [pairs, 2, seq_len] int64 (0: chosen, 1: rejected), padded
    labels: np.ndarray  # [pairs, 2, seq_len] int64, IGNORE off the completion
    lengths: np.ndarray  # [pairs, 2] real tokens of each sequence
    stats: PairStats

    def save(self, path: Path) -> None:
        save_arrays(path, {"tokens": self.tokens, "labels": self.labels, "lengths": self.lengths}, self.stats)

    @classmethod
    def load(cls, path: Path) -> Pairs:
        arrays, stats = load_arrays(path, ("tokens", "labels", "lengths"), PairStats)
        return cls(**arrays, stats=stats)


def build_pairs(paths: list[str], tokenizer, seq_len: int, overlong: str = "truncate") -> Pairs:
    """Read every jsonl in ``paths``, render and encode each pair, truncate, pad to ``seq_len``."""
    pairs = [p for path in paths for p in read_pairs(path)]
    if not pairs:
        raise PuyuError(f"no preference pairs in {paths}")
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.token_to_id(PAD)
    stats = PairStats(pairs=len(pairs), seq_len=seq_len)
    kept = []
    for prompt, chosen, rejected in pairs:
        both, cut = [], False
        for ids, labels in completion_labels(tokenizer, prompt, [chosen, rejected]):
            if len(ids) > seq_len:
                if overlong == "drop":
                    both.append((ids[:0], labels[:0]))
                    continue
                ids, labels, cut = ids[:seq_len], labels[:seq_len].copy(), True
                labels[-1] = IGNORE  # its target was cut off
            both.append((ids, labels))
        if any(not (labels != IGNORE).any() for _, labels in both):
            stats.dropped += 1
            continue
        stats.truncated += cut
        kept.append(both)
    if not kept:
        raise PuyuError(f"no preference pair of {paths} keeps a completion token within data.seq_len={seq_len}")
    tokens = np.full((len(kept), 2, seq_len), 0 if pad is None else pad, dtype=np.int64)
    out_labels = np.full((len(kept), 2, seq_len), IGNORE, dtype=np.int64)
    lengths = np.zeros((len(kept), 2), dtype=np.int64)
    for i, both in enumerate(kept):
        for j, (ids, labels) in enumerate(both):
            tokens[i, j, :len(ids)], out_labels[i, j, :len(ids)], lengths[i, j] = ids, labels, len(ids)
    stats.kept, stats.tokens = len(kept), int(lengths.sum())
    stats.completion_tokens = int((out_labels != IGNORE).sum())
    return Pairs(tokens, out_labels, lengths, stats)


def prepare(out_dir: str | Path, tokenizer_path: str | Path, paths: list[str], eval_paths: list[str],
            seq_len: int, overlong: str = "truncate", wiki: int = 0, wiki_heldout: int = 32,
            vocab_size: Optional[int] = None) -> dict:
    """The ``dpo_data`` stage: (wiki pairs +) ``train.npz`` / ``heldout.npz`` with stats ``.json``."""
    out_dir = Path(out_dir)
    tok = load_tokenizer(tokenizer_path)
    if vocab_size and tok.vocab_size > vocab_size:
        raise PuyuError(f"tokenizer {tokenizer_path} has {tok.vocab_size} tokens but the model's "
                        f"vocab_size is {vocab_size}")
    paths, eval_paths = list(paths), list(eval_paths)
    result: dict = {}
    if wiki > 0:
        train_path, held_path = out_dir / "wiki_train.jsonl", out_dir / "wiki_heldout.jsonl"
        result["wiki"] = {"train": wiki_preference_jsonl(train_path, limit=wiki),
                          "heldout": wiki_preference_jsonl(held_path, limit=wiki_heldout, offset=wiki)}
        paths.append(str(train_path))
        eval_paths.append(str(held_path))
    train = build_pairs(paths, tok, seq_len, overlong)
    train.save(out_dir / "train.npz")
    result["train"] = train.stats.to_dict()
    if eval_paths:
        held = build_pairs(eval_paths, tok, seq_len, overlong)
        held.save(out_dir / "heldout.npz")
        result["heldout"] = held.stats.to_dict()
    return result
