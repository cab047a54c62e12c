"""A sequence's text as it grows, decoding a few tokens per step instead of the whole output.

Why: stop strings and streamed text need the output's text after every token. Decoding the whole output
each step costs O(length) per token (O(length^2) per request). Here each new token decodes only the
window since the last fully decoded text (the incremental detokenization of TGI and vLLM): the text of
``ids[prefix:]`` minus that of ``ids[prefix:read]`` is the new text, held back while it ends in an
incomplete UTF-8 character (U+FFFD) that the next token may complete. Decoding from ``prefix`` rather
than from the new token alone keeps what a token's text depends on its neighbours (SentencePiece's
leading space, byte-level BPE's multi-byte characters). The text starts with the first output token, as
``tokenizer.decode(output)`` does, so the joined pieces equal the whole decode.

Stop strings are searched only in the new text and the ``len(stop) - 1`` characters before it.
"""
from __future__ import annotations

REPLACEMENT = "\ufffd"


class IncrementalText:
    """The text of the token ids fed to ``update`` (with special tokens, as ``decode`` gives them)."""

    __slots__ = ("ids", "max_stop", "prefix", "read", "searched", "text", "tokenizer")

    def __init__(self, tokenizer, stops: list[str] = ()):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] decode to the tail of ``text``
        self.text = ""
        self.searched = 0  # text before this offset holds no stop string's start
        self.max_stop = max((len(s) for s in stops), default=0)

    def update(self, output: list[int]) -> str:
        """Take the tokens of ``output`` not yet seen; returns the text they completed (maybe "")."""
        if len(output) == len(self.ids):
            return ""
        return self.extend(output[len(self.ids):])

    def extend(self, ids: list[int]) -> str:
        """Take the next tokens ``ids`` (decode runs feed each step's token without an output list)."""
        self.ids.extend(ids)
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix:self.read]) if self.read > self.prefix else ""
        after = decode(self.ids[self.prefix:])
        if len(after) <= len(before) or after.endswith(REPLACEMENT):
            return ""
        new = after[len(before):]
        self.text += new
        self.prefix, self.read = self.read, len(self.ids)
        return new

    def flush(self) -> str:
        """The whole text, tokens still held back included (a sequence that ended mid-character)."""
        if self.read < len(self.ids):
            before = self.tokenizer.decode(self.ids[self.prefix:self.read]) if self.read > self.prefix else ""
            self.text += self.tokenizer.decode(self.ids[self.prefix:])[len(before):]
            self.prefix = self.read = len(self.ids)
        return self.text

    def find_stop(self, stops: list[str]) -> int:
        """Where the first stop string begins in ``text`` (-1: none), looking only at text not searched
        before (and the overlap a stop string may straddle)."""
        start = max(0, self.searched - self.max_stop + 1)
        hits = [i for i in (self.text.find(s, start) for s in stops) if i >= 0]
        self.searched = len(self.text)
        return min(hits) if hits else -1

    def stable(self, finished: bool) -> int:
        """How much of ``text`` may be shown while generating: all of it once finished, else all but the
        tail that could still become the start of a stop string (cut from the output if it does)."""
        return len(self.text) if finished else max(0, len(self.text) - max(0, self.max_stop - 1))


def stop_cut(text: IncrementalText, stops: list[str]) -> str | None:
    """The text before the first stop string, once one appeared; None before."""
    cut = text.find_stop(stops)
    return text.text[:cut] if cut >= 0 else None
