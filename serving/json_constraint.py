"""Constrained decoding for ``response_format: {"type": "json_object"}``: every output is one valid JSON object.

Why a token mask rather than checking afterwards: a model (and certainly a small or untuned one) writes
invalid JSON often; resampling does not bound the cost. Here each step only tokens that keep the text a
prefix of some JSON object may be chosen, and the output ends when the object closes.

How: a character-level pushdown automaton of JSON (``feed``: state, character -> next state or None)
runs over the decoded text of every vocabulary token. The tokens are kept in a trie, so a walk from a
state shares the work of common prefixes and stops at the first character that cannot follow. The mask
of a state is memoised (states recur: inside a string, after a value, ...). Inside a string, tokens
without a quote, backslash or control character keep the state as it is; they are allowed in one
vector operation and only the rest of the vocabulary is walked.

Ending within ``max_tokens``: ``closing_len`` is how many characters at least close the object from a
state (the quote of an open string, ``:0`` after a key, a ``0`` for an expected value, one bracket per
open container). A token is allowed only if, after it, the object can still close in the tokens left;
since every state has a one-character token that brings it one character closer, the object always
closes in time (the vocabulary is checked to have those tokens). Whitespace between tokens is JSON's
own; a stop string could cut the object, so the server refuses ``stop`` with this format.
"""
from __future__ import annotations

import collections
import threading

import torch
from puyu.serving.config import ServingError

START, OBJ_OPEN, OBJ_KEY, KEY, COLON, VALUE, ARR_OPEN, STR, NUM, LIT, AFTER, DONE = range(12)
WHITESPACE = frozenset(" \t\n\r")
HEX = frozenset("0123456789abcdefABCDEF")
ESCAPES = frozenset('"\\/bfnrt')
# number sub-states: - sign, z leading zero, i integer digits, . dot, f fraction, e exponent mark,
# s exponent sign, x exponent digits; the final ones may end the number
NUM_FINAL = frozenset("zifx")
MAX_DEPTH = 32
UNREACHABLE = 32767  # closing length of a token that cannot follow (int16 masks)
NEEDED_CHARS = '{}[]":0rueals'  # the one-character tokens closing_len counts on (brackets, :0, literals)

State = tuple  # (mode, aux, stack): stack a string of "{" and "[" (innermost last)


def _num(aux: str, ch: str) -> str | None:
    digit = ch.isascii() and ch.isdigit()
    if aux in "-":
        return "z" if ch == "0" else "i" if digit else None
    if aux in "iz":
        if aux == "i" and digit:
            return "i"
        return "." if ch == "." else "e" if ch in "eE" else None
    if aux in ".f":
        return "f" if digit else "e" if aux == "f" and ch in "eE" else None
    if aux == "e":
        return "s" if ch in "+-" else "x" if digit else None
    return "x" if digit else None  # s, x


def _value(stack: str, ch: str) -> State | None:
    """The state after ``ch`` where a value must start."""
    if ch in "{[":
        return ((OBJ_OPEN if ch == "{" else ARR_OPEN), 0, stack + ch) if len(stack) < MAX_DEPTH else None
    if ch == '"':
        return STR, 0, stack
    if ch == "-" or (ch.isascii() and ch.isdigit()):
        return NUM, "-" if ch == "-" else "z" if ch == "0" else "i", stack
    literal = {"t": "rue", "f": "alse", "n": "ull"}.get(ch)
    return (LIT, literal, stack) if literal else None


def _close(stack: str) -> State:
    return (DONE, 0, "") if len(stack) == 1 else (AFTER, 0, stack[:-1])


def feed(state: State, ch: str) -> State | None:
    """The automaton's state after one more character, or None if no JSON object continues that way."""
    mode, aux, stack = state
    if mode in (STR, KEY):
        if aux == 0:
            if ch == '"':
                return (COLON, 0, stack) if mode == KEY else (AFTER, 0, stack)
            if ch == "\\":
                return mode, -1, stack
            return None if ord(ch) < 0x20 else state
        if aux == -1:
            return (mode, 0, stack) if ch in ESCAPES else (mode, 4, stack) if ch == "u" else None
        return (mode, aux - 1, stack) if ch in HEX else None  # \uXXXX: aux hex digits left
    if mode == NUM:
        nxt = _num(aux, ch)
        if nxt is not None:
            return NUM, nxt, stack
        return feed((AFTER, 0, stack), ch) if aux in NUM_FINAL else None
    if mode == LIT:
        if ch != aux[0]:
            return None
        return (LIT, aux[1:], stack) if len(aux) > 1 else (AFTER, 0, stack)
    if ch in WHITESPACE:
        return None if mode == DONE else state
    if mode == START:
        return (OBJ_OPEN, 0, "{") if ch == "{" else None
    if mode in (OBJ_OPEN, OBJ_KEY):
        if ch == '"':
            return KEY, 0, stack
        return _close(stack) if ch == "}" and mode == OBJ_OPEN else None
    if mode == COLON:
        return (VALUE, 0, stack) if ch == ":" else None
    if mode in (VALUE, ARR_OPEN):
        return _close(stack) if ch == "]" and mode == ARR_OPEN else _value(stack, ch)
    if mode == AFTER:
        obj = stack[-1] == "{"
        if ch == ",":
            return (OBJ_KEY if obj else VALUE), 0, stack
        return _close(stack) if ch == ("}" if obj else "]") else None
    return None  # DONE


def closing_len(state: State) -> int:
    """The fewest characters that close the object from ``state`` (0: closed)."""
    mode, aux, stack = state
    own = {START: 2, OBJ_KEY: 4, COLON: 2, VALUE: 1}.get(mode, 0)  # {} / "":0 / :0 / 0
    if mode in (STR, KEY):
        own = 1 + (1 if aux == -1 else aux) + (2 if mode == KEY else 0)  # escape, quote, :0 after a key
    elif mode == NUM:
        own = 0 if aux in NUM_FINAL else 1
    elif mode == LIT:
        own = len(aux)
    return own + len(stack)


class _Node:
    __slots__ = ("children", "ids")

    def __init__(self):
        self.children: dict[str, _Node] = {}
        self.ids: list[int] = []


def _trie(strings: dict[int, str]) -> _Node:
    root = _Node()
    for i, s in strings.items():
        node = root
        for ch in s:
            child = node.children.get(ch)
            if child is None:
                child = node.children[ch] = _Node()
            node = child
        node.ids.append(i)
    return root


def token_strings(tokenizer, vocab_size: int) -> dict[int, str]:
    """Each non-special token's text where it follows other text (a SentencePiece token's leading space
    is kept: it is decoded after a reference token whose text is then cut off)."""
    ref = tokenizer.encode("0", add_special_tokens=False)[-1:]
    base = tokenizer.decode(ref, skip_special_tokens=True)
    out = {}
    for i in range(min(vocab_size, tokenizer.vocab_size)):
        both = tokenizer.decode(ref + [i], skip_special_tokens=True)
        s = both[len(base):] if both.startswith(base) else tokenizer.decode([i], skip_special_tokens=True)
        if s:  # special tokens (EOS, template markers) decode to nothing and are never allowed
            out[i] = s
    return out


class JsonGrammar:
    """The vocabulary's tries and the memoised per-state masks; one per runtime, shared by requests
    (``JsonConstraint``) and safe to use from several threads."""

    def __init__(self, tokenizer, vocab_size: int, memo_states: int = 128):
        self.vocab_size = vocab_size
        self.strings = token_strings(tokenizer, vocab_size)
        singles = {s for s in self.strings.values() if len(s) == 1}
        missing = sorted(set(NEEDED_CHARS) - singles)
        if missing:
            raise ServingError(f"response_format json_object: the vocabulary has no single-character token for "
                               f"{''.join(missing)!r}, which closing a JSON object may need")
        plain = {i: s for i, s in self.strings.items() if '"' not in s and "\\" not in s and min(map(ord, s)) >= 0x20}
        self.plain = torch.zeros(vocab_size, dtype=torch.bool)
        self.plain[list(plain)] = True
        self.trie = _trie(self.strings)
        self.special_trie = _trie({i: s for i, s in self.strings.items() if i not in plain})
        self._memo: collections.OrderedDict[State, torch.Tensor] = collections.OrderedDict()
        self._memo_states = memo_states
        self._lock = threading.Lock()

    def closing_after(self, state: State) -> torch.Tensor:
        """int16 [V]: per token, ``closing_len`` after it (``UNREACHABLE`` where it cannot follow)."""
        with self._lock:
            out = self._memo.get(state)
            if out is not None:
                self._memo.move_to_end(state)
                return out
        out = torch.full((self.vocab_size,), UNREACHABLE, dtype=torch.int16)
        mode, aux, _ = state
        if mode in (STR, KEY) and aux == 0:  # plain text keeps the string open as it is
            out[self.plain] = closing_len(state)
            self._walk(self.special_trie, state, out)
        else:
            self._walk(self.trie, state, out)
        with self._lock:
            self._memo[state] = out
            if len(self._memo) > self._memo_states:
                self._memo.popitem(last=False)
        return out

    @staticmethod
    def _walk(root: _Node, state: State, out: torch.Tensor) -> None:
        todo = [(root, state)]
        found_ids, found_len = [], []
        while todo:
            node, st = todo.pop()
            for ch, child in node.children.items():
                nxt = feed(st, ch)
                if nxt is None:
                    continue
                if child.ids:
                    found_ids += child.ids
                    found_len += [closing_len(nxt)] * len(child.ids)
                if child.children:
                    todo.append((child, nxt))
        if found_ids:
            out[torch.tensor(found_ids)] = torch.tensor(found_len, dtype=torch.int16)

    def advance(self, state: State, token: int) -> State:
        for ch in self.strings.get(token, "\0"):
            state = feed(state, ch)
            if state is None:
                raise RuntimeError(f"json constraint: token {token} ({self.strings.get(token)!r}) cannot follow")
        return state


class JsonConstraint:
    """One request's position in the grammar; the runtime asks ``allowed`` before and calls ``advance``
    after each of its tokens, and ends the sequence once ``done``."""

    def __init__(self, grammar: JsonGrammar):
        self.grammar, self.state = grammar, (START, 0, "")

    def allowed(self, tokens_left: int) -> torch.Tensor:
        """bool [V]: the tokens after which the object still closes within ``tokens_left - 1`` tokens."""
        return self.grammar.closing_after(self.state) <= min(tokens_left - 1, UNREACHABLE - 1)

    def advance(self, token: int) -> None:
        self.state = self.grammar.advance(self.state, token)

    @property
    def done(self) -> bool:
        return self.state[0] == DONE
