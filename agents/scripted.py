"""A scripted policy: a stand-in for a tool-using model, for tests and the benchmark.

Why: a tiny test model writes noise, never a tool call, so its episodes end after one turn and the loop's
multi-turn paths (tool calls, observations, growing prompts) would go unexercised. ``ScriptedPolicy``
answers each prompt from a script keyed by the episode's task. Given a real ``model`` it still sends every
prompt through ``model.generate`` -- so the runtime does the real work (batching, prefix cache, token
counts, context-length errors) -- and only replaces the text of each successful reply with the script's.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any, Union

from puyu.agents.protocol import IM_END

Reply = Union[str, Callable[[str], str]]  # noqa: UP007 (a runtime alias: 3.9-style for clarity)
LENGTH_MARK = "[LENGTH]"  # a reply ending with it is returned with finish_reason "length", the mark removed


@dataclasses.dataclass
class ScriptedOutput:
    text: str
    finish_reason: str | None = "stop"
    token_ids: list = dataclasses.field(default_factory=list)
    prompt_token_ids: list = dataclasses.field(default_factory=list)
    error: str | None = None


def task_of(prompt: str) -> str:
    """The episode's task: the first user turn of an InternLM2-chat rendering."""
    return prompt.split("<|im_start|>user\n", 1)[1].split(IM_END, 1)[0]


def conversation(prompt: str) -> str:
    """The prompt from the user turn on (the system prompt may show the formats it documents)."""
    return prompt.split("<|im_start|>user\n", 1)[1]


def turn_of(prompt: str) -> int:
    """How many model turns the episode already had (InternLM2 turns or ReAct observations)."""
    convo = conversation(prompt)
    return convo.count("<|im_start|>assistant\n") - 1 + convo.count("Observation:")


def last_observation(prompt: str) -> str:
    found = re.findall(r"environment name=<\|[a-z]+\|>\n(.*?)<\|im_end\|>|Observation: (.*?)\n",
                       conversation(prompt), re.DOTALL)
    return [a or b for a, b in found][-1] if found else ""


def answer_from_observation(prompt: str) -> str:
    return f"The answer is {last_observation(prompt).strip()}."


@dataclasses.dataclass
class ScriptedPolicy:
    """``generate`` with the reply to a prompt = ``script[task][turn]`` (the last one repeats), a string or a
    function of the prompt, cut at the first stop string as the runtime cuts it. ``calls`` records the
    batch size of every ``generate`` call."""

    script: dict[str, list[Reply]]
    model: Any = None
    calls: list = dataclasses.field(default_factory=list)

    def generate(self, prompts: list[str], sampling) -> list:
        self.calls.append(len(prompts))
        real = self.model.generate(prompts, sampling) if self.model is not None else [None] * len(prompts)
        params = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
        outs = []
        for prompt, p, out in zip(prompts, params, real):
            if out is not None and out.error:
                outs.append(out)
                continue
            replies = self.script[task_of(prompt)]
            reply = replies[min(turn_of(prompt), len(replies) - 1)]
            text = reply(prompt) if callable(reply) else reply
            reason = "stop"
            if text.endswith(LENGTH_MARK):
                text, reason = text[:-len(LENGTH_MARK)], "length"
            cut = min((text.find(s) for s in p.stop if s in text), default=-1)
            text = text[:cut] if cut >= 0 else text
            if out is None:
                outs.append(ScriptedOutput(text, reason, [1, 2, 3], [1]))
            else:
                changes = {"text": text}
                if hasattr(out, "finish_reason"):  # the script's reply is whole unless it says otherwise
                    changes["finish_reason"] = reason
                outs.append(dataclasses.replace(out, **changes))
        return outs
