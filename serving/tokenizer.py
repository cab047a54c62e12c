"""Text <-> token ids for the runtime, and chat prompts in the model's own chat template.

The tokenizer is :class:`puyu.model.tokenizer.Tokenizer`: puyu's own byte-level BPE ``tokenizer.json``
from the data stage (its ``<|endoftext|>`` ends generation), or a Hugging Face model directory (its
``tokenizer.json`` or ``tokenizer.model``, special tokens, generation config and chat template).
Generation stops at every id of ``eos_ids``.

Text prompts are encoded with the tokenizer's special tokens (BOS for a Llama-style tokenizer), as
``tokenizer(text)`` in transformers and vLLM's text prompts; chat prompts are encoded without them, since
the template writes its own. Chat prompts are the tokenizer's chat template rendered with the
generation prompt, as transformers'
``apply_chat_template(messages, add_generation_prompt=True, tokenize=False)``; a tokenizer without a
template (puyu's own) and no tokenizer at all render InternLM2's, which wraps each turn as
``<|im_start|>{role}\\n{content}<|im_end|>\\n`` after the BOS token (none in puyu's tokenizer) and leaves
``<|im_start|>assistant\\n`` open. With InternLM2's template ``<|im_end|>`` is also a stop string
(:func:`uses_internlm2`), since puyu's tokenizer has it as a token but not as its EOS.
"""
from __future__ import annotations

from typing import Optional, Union

from puyu.model.chat_template import INTERNLM2_CHAT_TEMPLATE, ChatTemplateError, render_chat
from puyu.model.tokenizer import EOD, Tokenizer  # noqa: F401 (EOD: puyu's end-of-document token, re-exported)
from puyu.serving.config import ServingError

IM_END = "<|im_end|>"
ROLES = ("system", "user", "assistant", "environment")


class TextTokenizer(Tokenizer):
    """The runtime's tokenizer: a ``tokenizer.json``, a ``tokenizer.model`` or a model directory."""

    @property
    def tok(self):
        """The ``tokenizers.Tokenizer`` behind a ``tokenizer.json`` (None for a sentencepiece model)."""
        return self.backend_tokenizer


def uses_internlm2(tokenizer: Optional[Tokenizer]) -> bool:
    """Whether chats are rendered with InternLM2's template (no tokenizer, or one without a template)."""
    return tokenizer is None or tokenizer.chat_template is None


def chat_prompt_ids(messages: list[dict], tokenizer: Optional[Tokenizer]) -> Union[list[int], str]:
    """A chat request's prompt: the rendered template's token ids, encoded without special tokens (the
    template writes its own BOS; adding one would double it, as transformers' ``apply_chat_template``
    does not either). Without a tokenizer, the text (which the runtime then refuses, asking for ids)."""
    text = chat_prompt(messages, tokenizer)
    return tokenizer.encode(text, add_special_tokens=False) if tokenizer is not None else text


def chat_prompt(messages: list[dict], tokenizer: Optional[Tokenizer] = None) -> str:
    """``messages`` ([{"role", "content"}]) in the tokenizer's chat template, ending with an open assistant turn."""
    if not isinstance(messages, list) or not messages:
        raise ServingError("messages must be a non-empty list of {role, content}")
    internlm2 = uses_internlm2(tokenizer)
    for i, m in enumerate(messages):
        if internlm2 and not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
            raise ServingError(f"messages[{i}] must be {{role: one of {list(ROLES)}, content: str}}, got {m!r}")
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ServingError(f"messages[{i}] must be {{role: str, content: ...}}, got {m!r}")
    try:
        if tokenizer is None:
            return render_chat(INTERNLM2_CHAT_TEMPLATE, messages, add_generation_prompt=True)
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    except ChatTemplateError as exc:
        raise ServingError(str(exc)) from None
