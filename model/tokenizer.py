"""Tokenizers as Hugging Face model directories ship them, read as ``transformers`` 5 reads them.

:func:`load_tokenizer` takes a model directory, or a bare ``tokenizer.json`` / ``tokenizer.model``.
A directory with both files is read through ``tokenizer.json`` (transformers' fast tokenizers do the
same). What the directory says besides the vocabulary:

- ``tokenizer_config.json``: the named special tokens (``bos_token``, ``eos_token``, ``pad_token``, ...,
  and model-specific ``*_token`` keys; each a string or an ``{"content": ...}`` dict), ``added_tokens_decoder``
  (id -> token), ``add_bos_token``/``add_eos_token``, ``legacy``, ``add_prefix_space`` and the chat template
  (also ``chat_template.jinja`` and friends: :func:`puyu.model.chat_template.read_chat_templates`);
  ``special_tokens_map.json`` fills named tokens the config leaves out;
- ``generation_config.json``: ``eos_token_id``, an int or a list. Generation stops at every id in
  :attr:`Tokenizer.eos_ids`: the tokenizer's ``eos_token`` first (so :attr:`Tokenizer.eos_id`, the one
  old callers and document separators use, is the tokenizer's own), then the generation config's others
  (Llama 3 instruct models end turns with ``<|eot_id|>`` but documents with ``<|end_of_text|>``).

A tokenizer that names no EOS has ``eos_ids == []``, and :attr:`Tokenizer.eos_id` raises: nothing falls back
to id 0. The one convention of puyu's own: a tokenizer without a named EOS whose vocabulary has
``<|endoftext|>`` (the data stage's end-of-document token, and GPT-2's) ends documents with it.

``tokenizer.json`` is run by the ``tokenizers`` library as saved (its normalizer, pre-tokenizer,
post-processor and added tokens); the config's added or named tokens that the file lacks are added, as
transformers adds them. ``add_bos_token``/``add_eos_token`` are left to the file's post-processor, as
transformers ignores them when a ``tokenizer.json`` is present.

``tokenizer.model`` is run by ``sentencepiece`` with the semantics of transformers 5's ``LlamaTokenizer``
(which converts the model to a BPE with a ``Metaspace`` pre-tokenizer):

- added tokens (``added_tokens_decoder`` and the named tokens) are split out of the text before
  sentencepiece sees it, longest first, honouring ``lstrip``/``rstrip``; named tokens count as special;
- the prefix space: a text piece gets sentencepiece's ``▁`` prefix unless it already starts with a space.
  Non-legacy (``legacy: false``, transformers 5's default) only the piece at the very start of the text gets
  one, so ``</s>Hi`` encodes ``Hi`` as at a word's middle; ``legacy: true`` gives every piece after an added
  token one. ``add_prefix_space: false`` gives none. (sentencepiece itself would prefix a text that starts
  with a space a second time; transformers 5 does not, and neither does this.)
- BOS/EOS are added by ``encode(..., add_special_tokens=True)`` when ``add_bos_token``/``add_eos_token`` are
  true; both default to false, as in transformers 5 (Llama 2 configs set ``add_bos_token: true``). Named
  tokens the config leaves out default to the model's own ``<s>``/``</s>``/``<unk>`` pieces;
- decoding joins the pieces, turns ``▁`` into spaces, byte pieces (``<0x..>``) into UTF-8 (``\\ufffd`` per
  byte of an invalid run) and drops one leading space (with the prefix space on).
The model's own normalizer runs as saved; Llama-style models have none (``identity``, no whitespace
removal), which is what transformers 5 assumes. ``single_word`` added tokens and
``clean_up_tokenization_spaces`` (which transformers 5 ignores for BPE models) are not implemented.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import sentencepiece
from google.protobuf.message import DecodeError
from sentencepiece import sentencepiece_model_pb2
from tokenizers import AddedToken as HFAddedToken, Tokenizer as HFTokenizer

from puyu.launcher.errors import PuyuError
from puyu.model.chat_template import read_chat_templates, read_json_object, render_chat, select_template

TOKENIZER_JSON, SPM_MODEL = "tokenizer.json", "tokenizer.model"
CONFIG_FILE, SPECIAL_MAP_FILE = "tokenizer_config.json", "special_tokens_map.json"
GENERATION_FILE = "generation_config.json"
EOD = "<|endoftext|>"
NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
SPACE = "\u2581"  # sentencepiece's "▁"
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenizerError(PuyuError, ValueError):
    """A tokenizer that cannot be read: one line naming the file or key at fault."""


@dataclasses.dataclass(frozen=True)
class AddedToken:
    content: str
    special: bool = False
    lstrip: bool = False
    rstrip: bool = False


def _content(value: Any, where: str) -> Optional[str]:
    """A token entry: a string, an ``{"content": ...}`` dict, or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"{where} must be a string or {{\"content\": ...}}, got {json.dumps(value)[:80]}")


def _added_tokens(config: Mapping, where: str) -> dict[int, AddedToken]:
    out = {}
    for key, entry in (config.get("added_tokens_decoder") or {}).items():
        spot = f"{where}: added_tokens_decoder[{key!r}]"
        if not (isinstance(key, str) and key.isdigit()) or not isinstance(entry, Mapping):
            raise TokenizerError(f"{spot} must map an integer id to {{\"content\": ...}}")
        out[int(key)] = AddedToken(_content(entry, spot), bool(entry.get("special", False)),
                                   bool(entry.get("lstrip", False)), bool(entry.get("rstrip", False)))
    return out


def _named_tokens(config: Mapping, where: str) -> dict[str, Optional[str]]:
    """``bos_token`` ... and model-specific ``*_token`` keys that the config sets (None for an explicit null)."""
    keys = [k for k in NAMED_TOKENS if k in config]
    keys += [k for k, v in config.items() if k.endswith("_token") and k not in NAMED_TOKENS
             and (isinstance(v, str) or isinstance(v, Mapping) and isinstance(v.get("content"), str))]
    return {k: _content(config[k], f"{where}: {k}") for k in keys}


class _TokenizersBackend:
    """``tokenizer.json`` through the ``tokenizers`` library (batch encoding runs in Rust threads)."""

    def __init__(self, path: Path, added: dict[int, AddedToken], named: Mapping[str, Optional[str]]):
        self.named = dict(named)
        try:
            self.tok = HFTokenizer.from_file(str(path))
        except Exception as exc:  # the Rust error is one line, but not a Python type to catch
            raise TokenizerError(f"{path}: not a tokenizers file ({str(exc).splitlines()[0]})") from None
        known = {t.content for t in self.tok.get_added_tokens_decoder().values()}
        missing = [t for _, t in sorted(added.items()) if t.content not in known]
        missing += [AddedToken(c, special=True) for c in dict.fromkeys(c for c in named.values() if c)
                    if c not in known and c not in {t.content for t in missing}]
        as_hf = lambda t: HFAddedToken(t.content, lstrip=t.lstrip, rstrip=t.rstrip, normalized=False,  # noqa: E731
                                       special=t.special)
        self.tok.add_special_tokens([as_hf(t) for t in missing if t.special])
        self.tok.add_tokens([as_hf(t) for t in missing if not t.special])
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch_fast(texts, add_special_tokens=add_special_tokens)]

    def encode_with_offsets(self, texts: list[str]) -> list[tuple[list[int], list[int]]]:
        return [(e.ids, [a for a, _ in e.offsets]) for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> Optional[int]:
        return self.tok.token_to_id(token)


class _SentencePieceBackend:
    """``tokenizer.model`` through ``sentencepiece``, as transformers 5's ``LlamaTokenizer`` (module doc)."""

    def __init__(self, path: Path, added: dict[int, AddedToken], named: Mapping[str, Optional[str]], legacy: bool,
                 add_prefix_space: bool):
        # one processor that adds the prefix "▁" and one that does not; which one encodes a piece of
        # text is decided here (sentencepiece itself always adds it)
        proto = sentencepiece_model_pb2.ModelProto()
        self.sp = {}
        try:
            proto.ParseFromString(path.read_bytes())
            for prefix in (True, False):
                proto.normalizer_spec.add_dummy_prefix = prefix
                self.sp[prefix] = sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())
        except (DecodeError, RuntimeError):
            raise TokenizerError(f"{path}: not a sentencepiece model") from None
        sp = self.sp[True]
        self.legacy, self.add_prefix_space = legacy, add_prefix_space
        self.pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
        # named tokens the config leaves out: the model's own pieces (LlamaTokenizer's <s>, </s>, <unk>)
        defaults = {"bos_token": sp.bos_id(), "eos_token": sp.eos_id(), "unk_token": sp.unk_id()}
        self.named = {**{k: self.pieces[i] for k, i in defaults.items() if i >= 0}, **named}
        named = [c for c in self.named.values() if c]
        self.id_to_added = dict(added)
        for content in named:  # named tokens are matched in text too; new ones get the next free ids
            if content not in {t.content for t in self.id_to_added.values()}:
                piece = sp.piece_to_id(content)
                tid = piece if self.pieces[piece] == content else max([len(self.pieces) - 1, *self.id_to_added]) + 1
                self.id_to_added[tid] = AddedToken(content, special=True)
        named_set = set(named)
        self.special_ids = frozenset(i for i, t in self.id_to_added.items() if t.special or t.content in named_set)
        self.added_ids = {t.content: i for i, t in sorted(self.id_to_added.items())}
        self.vocab_size = max([len(self.pieces) - 1, *self.id_to_added]) + 1
        ordered = sorted(self.added_ids, key=len, reverse=True)  # the longest token wins where two match
        self._tokens = [self.added_ids[c] for c in ordered]
        alternatives = []
        for c in ordered:
            t = self.id_to_added[self.added_ids[c]]
            alternatives.append(("\\s*" if t.lstrip else "") + f"({re.escape(c)})" + ("\\s*" if t.rstrip else ""))
        self._split = re.compile("|".join(alternatives)) if alternatives else None

    def _parts(self, text: str) -> list[tuple[Any, int]]:
        """``text`` as (text piece, start) and (added token id, start) in order."""
        parts, pos = [], 0
        for m in self._split.finditer(text) if self._split else ():
            if m.start() > pos:
                parts.append((text[pos:m.start()], pos))
            parts.append((self._tokens[m.lastindex - 1], m.start()))
            pos = m.end()
        if pos < len(text):
            parts.append((text[pos:], pos))
        return parts

    def _prefixed(self, piece: str, start: int) -> bool:
        return self.add_prefix_space and (self.legacy or start == 0) and not piece.startswith((" ", SPACE))

    def _encode(self, texts: list[str], offsets: bool) -> list[tuple[list[int], list[int]]]:
        parts = [self._parts(t) for t in texts]
        batches: dict[bool, list[str]] = {True: [], False: []}
        for ps in parts:
            for p, start in ps:
                if isinstance(p, str):
                    batches[self._prefixed(p, start)].append(p)
        kind = "offset_mapping" if offsets else int
        encoded = {k: iter(self.sp[k].encode(v, return_type=kind)) if v else iter(()) for k, v in batches.items()}
        out = []
        for ps in parts:
            ids, starts = [], []
            for p, start in ps:
                if not isinstance(p, str):
                    ids.append(p)
                    starts.append(start)
                    continue
                enc = next(encoded[self._prefixed(p, start)])
                if offsets:
                    ids += enc["ids"]
                    starts += [start + a for a, _ in enc["offsets"]]
                else:
                    ids += enc
            out.append((ids, starts))
        return out

    def encode(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        return [ids for ids, _ in self._encode(texts, offsets=False)]

    def encode_with_offsets(self, texts: list[str]) -> list[tuple[list[int], list[int]]]:
        return self._encode(texts, offsets=True)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        out: list[str] = []
        run = bytearray()  # consecutive byte pieces, decoded together

        def flush():
            if run:
                try:
                    out.append(run.decode("utf-8"))
                except UnicodeDecodeError:
                    out.append("\ufffd" * len(run))
                run.clear()

        n = len(self.pieces)
        for i in ids:
            if i in self.id_to_added:
                if skip_special_tokens and i in self.special_ids:
                    continue
                token = self.id_to_added[i].content
            elif 0 <= i < n:
                token = self.pieces[i]
            else:
                continue  # an id past the vocabulary (a padded embedding) decodes to nothing, as in tokenizers
            byte = _BYTE_PIECE.fullmatch(token)
            if byte:
                run.append(int(byte.group(1), 16))
                continue
            flush()
            out.append(token.replace(SPACE, " "))
        flush()
        text = "".join(out)
        return text[1:] if self.add_prefix_space and text.startswith(" ") else text

    def token_to_id(self, token: str) -> Optional[int]:
        if token in self.added_ids:
            return self.added_ids[token]
        piece = self.sp[True].piece_to_id(token)
        return piece if self.pieces[piece] == token else None


class Tokenizer:
    """A tokenizer directory or file (module doc): ``encode``/``decode``, special tokens, EOS ids, chat template."""

    def __init__(self, path: str | Path):
        path = Path(path)
        config: dict = {}
        generation: dict = {}
        self.chat_templates: dict[str, str] = {}
        if path.is_dir():
            files = [path / TOKENIZER_JSON, path / SPM_MODEL]
            source = next((f for f in files if f.is_file()), None)
            if source is None:
                raise TokenizerError(f"{path}: neither {TOKENIZER_JSON} nor {SPM_MODEL} in the directory")
            if (path / CONFIG_FILE).is_file():
                config = read_json_object(path / CONFIG_FILE, TokenizerError)
            if (path / SPECIAL_MAP_FILE).is_file():
                special_map = read_json_object(path / SPECIAL_MAP_FILE, TokenizerError)
                config.update({k: v for k, v in special_map.items() if k in NAMED_TOKENS and k not in config})
            if (path / GENERATION_FILE).is_file():
                generation = read_json_object(path / GENERATION_FILE, TokenizerError)
            self.chat_templates = read_chat_templates(path, config)
        elif path.is_file():
            if path.suffix not in (".json", ".model"):
                raise TokenizerError(f"tokenizer {path}: expected a {TOKENIZER_JSON} or {SPM_MODEL} file "
                                     "or a directory")
            source = path
        else:
            raise TokenizerError(f"tokenizer {path} not found")
        self.path, self.source = path, source
        where = str(path / CONFIG_FILE)
        added = _added_tokens(config, where)
        named = _named_tokens(config, where)
        if source.suffix == ".model":
            self.kind = "sentencepiece"
            self._backend = _SentencePieceBackend(source, added, named, legacy=bool(config.get("legacy", False)),
                                                  add_prefix_space=config.get("add_prefix_space") is not False)
            self.add_bos_token = bool(config.get("add_bos_token", False))
            self.add_eos_token = bool(config.get("add_eos_token", False))
        else:
            self.kind = "tokenizers"
            self._backend = _TokenizersBackend(source, added, named)
            self.add_bos_token = self.add_eos_token = False  # the file's post-processor decides
        # every named token is in the vocabulary now (the backends add those missing, as transformers does)
        self.special_tokens: dict[str, str] = {k: v for k, v in self._backend.named.items() if v}
        self.bos_id, self.pad_id = self._named_id("bos_token"), self._named_id("pad_token")
        eos = self._named_id("eos_token")
        if eos is None and "eos_token" not in self._backend.named:
            eos = self.token_to_id(EOD)
        self.eos_ids: list[int] = [] if eos is None else [eos]
        for tid in self._generation_eos(generation, path / GENERATION_FILE):
            if tid not in self.eos_ids:
                self.eos_ids.append(tid)

    def _named_id(self, key: str) -> Optional[int]:
        token = self.special_tokens.get(key)
        return None if token is None else self.token_to_id(token)

    def _generation_eos(self, generation: Mapping, where: Path) -> list[int]:
        value = generation.get("eos_token_id")
        ids = [] if value is None else [value] if isinstance(value, int) else value
        if not isinstance(ids, list) or not all(isinstance(i, int) and 0 <= i < self.vocab_size for i in ids):
            raise TokenizerError(f"{where}: eos_token_id must be an id or a list of ids below {self.vocab_size}, "
                                 f"got {value!r}")
        return ids

    # ---- the vocabulary ---------------------------------------------------------------------------
    @property
    def eos_id(self) -> int:
        """The tokenizer's own EOS (first of :attr:`eos_ids`): what ends a document."""
        if not self.eos_ids:
            raise TokenizerError(f"tokenizer {self.path} defines no EOS token (eos_token in {CONFIG_FILE}, "
                                 f"eos_token_id in {GENERATION_FILE})")
        return self.eos_ids[0]

    @property
    def bos_token(self) -> Optional[str]:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> Optional[str]:
        return self.special_tokens.get("eos_token")

    @property
    def pad_token(self) -> Optional[str]:
        return self.special_tokens.get("pad_token")

    @property
    def vocab_size(self) -> int:
        """Every id the tokenizer can produce, added tokens included (``len(tokenizer)`` in transformers)."""
        return self._backend.vocab_size

    @property
    def chat_template(self) -> Optional[str]:
        """The model's own default chat template, or None (then :meth:`apply_chat_template` uses InternLM2's)."""
        return self.chat_templates.get("default")

    @property
    def backend_tokenizer(self):
        """The ``tokenizers.Tokenizer`` behind a ``tokenizer.json`` (None for a sentencepiece model)."""
        return self._backend.tok if isinstance(self._backend, _TokenizersBackend) else None

    def token_to_id(self, token: str) -> Optional[int]:
        return self._backend.token_to_id(token)

    # ---- text <-> ids -----------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.encode_batch([text], add_special_tokens)[0]

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        """Token ids of each text; ``add_special_tokens`` adds BOS/EOS as the tokenizer is configured to."""
        out = self._backend.encode(list(texts), add_special_tokens)
        if add_special_tokens and self.kind == "sentencepiece":
            head = [self.bos_id] if self.add_bos_token and self.bos_id is not None else []
            tail = [self.eos_ids[0]] if self.add_eos_token and self.eos_ids else []
            out = [head + ids + tail for ids in out]
        return out

    def encode_with_offsets(self, texts: list[str]) -> list[tuple[list[int], list[int]]]:
        """(ids, start character of each token) per text, without BOS/EOS: for masking by character spans."""
        return self._backend.encode_with_offsets(list(texts))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._backend.decode(ids, skip_special_tokens)

    # ---- chat -------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[Mapping], add_generation_prompt: bool = False,
                            tools: Optional[list[Mapping]] = None, documents: Optional[list[Mapping]] = None,
                            **kwargs: Any) -> str:
        """The chat rendered with the model's template (InternLM2's without one), as transformers'
        ``apply_chat_template(..., tokenize=False)``: encode the result with ``encode(text)``."""
        return render_chat(select_template(self.chat_templates, tools), messages,
                           add_generation_prompt=add_generation_prompt, tools=tools, documents=documents,
                           special_tokens=self.special_tokens, **kwargs)

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, {self.kind}, vocab {self.vocab_size}, eos_ids {self.eos_ids})"


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A Hugging Face model/tokenizer directory, or a bare ``tokenizer.json`` / ``tokenizer.model`` (read
    alone: configuration files beside a file are not looked at; pass the directory for those)."""
    return Tokenizer(path)
