"""Text <-> token ids for the runtime, and the InternLM2 chat template.

The data stage's tokenizer is a byte-level BPE ``tokenizers`` file whose end-of-document token
``<|endoftext|>`` ends generation. InternLM2's chat format wraps each turn as
``<|im_start|>{role}\\n{content}<|im_end|>\\n`` and leaves ``<|im_start|>assistant\\n`` open; generation
stops at ``<|im_end|>`` (added to the request's stop strings).
"""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from puyu.serving.config import ServingError

EOD = "<|endoftext|>"
IM_END = "<|im_end|>"
ROLES = ("system", "user", "assistant", "environment")


class TextTokenizer:
    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise ServingError(f"tokenizer file {path} not found")
        self.path = path
        self.tok = Tokenizer.from_file(str(path))
        eod = self.tok.token_to_id(EOD)
        self.eos_id = 0 if eod is None else eod

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)


def chat_prompt(messages: list[dict]) -> str:
    """The InternLM2 chat rendering of ``messages`` ([{"role", "content"}]) ending with an open assistant turn."""
    if not isinstance(messages, list) or not messages:
        raise ServingError("messages must be a non-empty list of {role, content}")
    parts = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ServingError(f"messages[{i}] must be {{role: one of {list(ROLES)}, content: str}}, got {m!r}")
        parts.append(f"<|im_start|>{m['role']}\n{m['content']}{IM_END}\n")
    return "".join(parts) + "<|im_start|>assistant\n"
