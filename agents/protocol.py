"""How an agent's conversation is written for the model and how the model's reply is read back.

Two protocols, as in Lagent:

``InternLM2Protocol`` -- InternLM2-chat's native agent format. Tools are announced in system turns
(``<|im_start|>system name=<|plugin|>`` with the tools' JSON specs, ``system name=<|interpreter|>`` for
code); the model calls a tool inside its assistant turn::

    thought<|action_start|><|plugin|>
    {"name": "calculator", "parameters": {"expression": "2+2"}}<|action_end|>

or runs code with ``<|action_start|><|interpreter|>\\n```python ...```<|action_end|>``; the result comes
back as ``<|im_start|>environment name=<|plugin|>\\n...<|im_end|>``; an assistant turn without an action is
the final answer.

``ReActProtocol`` -- the text format (Yao et al. 2022) for models never tuned on special tokens::

    Thought: ...
    Action: calculator
    Action Input: {"expression": "2+2"}
    Observation: 4
    ...
    Final Answer: 4

Why the rendering is append-only: each turn's prompt is the previous prompt plus the reply and the
observation, so the serving runtime's prefix cache finds every earlier block of the episode (and the
system prompt, shared by every episode of a job) already computed; only the new tokens are prefilled.

Parsing never raises: a reply the protocol cannot read (broken JSON, an unknown action marker) becomes a
``Step`` with ``error`` set, which the agent returns to the model as an error observation.

``call_text``/``final_text`` are ``parse``'s inverse: the reply a model should write for a tool call or an
answer (as the runtime returns it, the stop string cut). Agent-trace SFT data (:mod:`puyu.agents.traces`)
is written with them, so a model finetuned on it writes what ``parse`` reads. InternLM2's interpreter call
is written in its shortest form, the code right after ``<|interpreter|>`` (``parse`` reads the fenced
form too): a small model then learns "after the assistant header comes <|action_start|>, after
<|interpreter|> comes code" from a few traces. Measured on the pipeline test's tiny model after 60
finetuning steps on 100 traces: with the fence no episode made a call (it answered with a fence), with the
newline but no fence every call's code was more markers, in this form every episode called and every
call ran.
"""
from __future__ import annotations

import dataclasses
import json
import re

from puyu.agents.actions import ActionResult, ToolCall

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
ACTION_START, ACTION_END = "<|action_start|>", "<|action_end|>"
PLUGIN, INTERPRETER = "<|plugin|>", "<|interpreter|>"
PYTHON_TOOL = "python"  # the tool <|interpreter|> calls run on

DEFAULT_SYSTEM = ("You are a helpful assistant that solves problems step by step. Use the tools when a "
                  "computation is needed, then state the final answer.")
INTERPRETER_PROMPT = ("You now have access to a Python interpreter. Send code to it to run it; variables are "
                      "kept between calls. Use it for mathematical calculations and anything that needs exact "
                      "results, and print what you need to see.")
PLUGIN_PROMPT = "You can use the following tools (call one with its JSON name and parameters):"


@dataclasses.dataclass
class Step:
    """One parsed assistant reply: a tool call, a final answer, or an error the model should see."""

    thought: str = ""
    call: ToolCall | None = None
    final: str | None = None
    error: str | None = None


def _fenced_code(text: str) -> str:
    """The code inside a ```python fence (or the text itself without one)."""
    m = re.search(r"```(?:python|py)?[ \t]*\n(.*?)(?:```|$)", text, re.DOTALL)
    return (m.group(1) if m else text).strip("\n")


def _first_json_object(text: str):
    """The first JSON object in ``text`` (a model may add words after it); raises ValueError naming why."""
    start = text.find("{")
    if start < 0:
        raise ValueError("no JSON object")
    try:
        obj, _ = json.JSONDecoder().raw_decode(text[start:])
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON ({exc.msg} at column {exc.colno})") from None
    return obj


class InternLM2Protocol:
    name = "internlm2"
    stop = (ACTION_END, IM_END)

    def __init__(self, system: str = "", tools: list[dict] | None = None):
        self.system = system or DEFAULT_SYSTEM
        self.tools = list(tools or [])

    def header(self) -> str:
        """The system turns: instructions, plugin specs, the interpreter. Identical for every episode."""
        parts = [f"{IM_START}system\n{self.system}{IM_END}\n"]
        plugins = [t for t in self.tools if t["name"] != PYTHON_TOOL]
        if plugins:
            parts.append(f"{IM_START}system name={PLUGIN}\n{PLUGIN_PROMPT}\n"
                         f"{json.dumps(plugins, ensure_ascii=False)}{IM_END}\n")
        if any(t["name"] == PYTHON_TOOL for t in self.tools):
            parts.append(f"{IM_START}system name={INTERPRETER}\n{INTERPRETER_PROMPT}{IM_END}\n")
        return "".join(parts)

    def render(self, task: str, turns: list[tuple[str, str | None]]) -> str:
        """The prompt for the next assistant turn: header, the task, then each (reply, observation) so far."""
        out = [self.header(), f"{IM_START}user\n{task}{IM_END}\n"]
        for reply, observation in turns:
            out.append(f"{IM_START}assistant\n{reply}{IM_END}\n")
            if observation is not None:
                out.append(observation)
        out.append(f"{IM_START}assistant\n")
        return "".join(out)

    def parse(self, text: str) -> Step:
        text = text.split(ACTION_END)[0]  # a runtime without stop strings leaves the rest
        if ACTION_START not in text:
            return Step(final=text.strip())
        thought, _, action = text.partition(ACTION_START)
        thought = thought.strip()
        if action.startswith(INTERPRETER):
            code = _fenced_code(action[len(INTERPRETER):].lstrip("\n"))
            if not code.strip():
                return Step(thought, error="the interpreter call holds no code")
            return Step(thought, call=ToolCall(PYTHON_TOOL, {"code": code}))
        if not action.startswith(PLUGIN):
            return Step(thought, error=f"an action must start with {PLUGIN} or {INTERPRETER}, got {action[:30]!r}")
        try:
            obj = _first_json_object(action[len(PLUGIN):])
        except ValueError as exc:
            return Step(thought, error=f"could not read the tool call: {exc}; write "
                                       '{"name": <tool>, "parameters": {...}}')
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return Step(thought, error='a tool call needs "name" (a string) and "parameters" (an object)')
        params = obj.get("parameters", obj.get("arguments", {}))
        return Step(thought, call=ToolCall(obj["name"], params))

    def call_text(self, call: ToolCall, thought: str = "") -> str:
        if call.name == PYTHON_TOOL and any(t["name"] == PYTHON_TOOL for t in self.tools):
            return f"{thought}{ACTION_START}{INTERPRETER}{call.parameters['code']}"
        return f"{thought}{ACTION_START}{PLUGIN}\n{json.dumps(call.to_record(), ensure_ascii=False)}"

    def final_text(self, answer: str) -> str:
        return answer

    def reply(self, text: str, step: Step) -> str:
        """The assistant turn as it stays in the conversation (the stop string the runtime cut is put back)."""
        text = text.split(ACTION_END)[0]
        return text + ACTION_END if ACTION_START in text else text

    def observation(self, step: Step, result: ActionResult | None) -> str:
        """The environment turn after ``step``: the tool's output, or the parse error."""
        name = INTERPRETER if step.call is not None and step.call.name == PYTHON_TOOL else PLUGIN
        if result is None:
            body = f"error: {step.error}"
        else:
            body = result.output if result.ok else f"error: {result.output}"
        return f"{IM_START}environment name={name}\n{body}{IM_END}\n"


class ReActProtocol:
    """The ReAct text format inside one assistant turn; an observation continues that same turn."""

    name = "react"
    stop = ("Observation:", IM_END)

    def __init__(self, system: str = "", tools: list[dict] | None = None):
        self.system = system or DEFAULT_SYSTEM
        self.tools = list(tools or [])

    def header(self) -> str:
        lines = [self.system, "", "Tools:"]
        lines += [f"- {t['name']}: {t['description']} Parameters: {json.dumps(t['parameters'])}" for t in self.tools]
        names = ", ".join(t["name"] for t in self.tools)
        lines += ["", "Use this format:", "Thought: what to do next",
                  f"Action: the tool to use, one of [{names}]",
                  "Action Input: the tool's parameters as a JSON object",
                  "Observation: the tool's result", "... (Thought/Action/Action Input/Observation may repeat)",
                  "Thought: I know the final answer", "Final Answer: the answer"]
        return f"{IM_START}system\n" + "\n".join(lines) + f"{IM_END}\n"

    def render(self, task: str, turns: list[tuple[str, str | None]]) -> str:
        out = [self.header(), f"{IM_START}user\n{task}{IM_END}\n{IM_START}assistant\n"]
        for reply, observation in turns:
            out.append(reply)
            if observation is not None:
                out.append(observation)
        return "".join(out)

    def parse(self, text: str) -> Step:
        text = text.split("Observation:")[0].split(IM_END)[0]
        final = re.search(r"Final Answer\s*:(.*)", text, re.DOTALL)
        action = re.search(r"Action\s*:(.*?)(?:\n|$)", text)
        if final and (not action or final.start() < action.start()):
            return Step(text[:final.start()].replace("Thought:", "").strip(), final=final.group(1).strip())
        if not action:
            return Step(final=text.replace("Thought:", "").strip())  # as Lagent: no action means the answer
        thought = text[:action.start()].replace("Thought:", "").strip()
        name = action.group(1).strip().strip("`'\"")
        if not name:
            return Step(thought, error="Action names no tool")
        inp = re.search(r"Action Input\s*:(.*)", text[action.end():], re.DOTALL)
        if not inp:
            return Step(thought, error=f"Action {name} has no Action Input")
        raw = inp.group(1).strip()
        raw = _fenced_code(raw) if raw.startswith("```") else raw
        try:
            params = _first_json_object(raw)
        except ValueError:
            params = self._plain_argument(name, raw)
            if params is None:
                return Step(thought, error=f"could not read the Action Input of {name} as a JSON object")
        return Step(thought, call=ToolCall(name, params))

    def _plain_argument(self, name: str, raw: str) -> dict | None:
        """A non-JSON input for a tool with exactly one required string parameter (as Lagent passes it)."""
        for t in self.tools:
            req = t["parameters"].get("required", [])
            if t["name"] == name and len(req) == 1 and raw:
                return {req[0]: raw}
        return None

    def call_text(self, call: ToolCall, thought: str = "") -> str:
        return (f"Thought: {thought or 'I need a tool.'}\nAction: {call.name}\n"
                f"Action Input: {json.dumps(call.parameters, ensure_ascii=False)}\n")

    def final_text(self, answer: str) -> str:
        return f"Final Answer: {answer}"

    def reply(self, text: str, step: Step) -> str:
        text = text.split("Observation:")[0].split(IM_END)[0]
        return text if text.endswith("\n") or step.final is not None else text + "\n"

    def observation(self, step: Step, result: ActionResult | None) -> str:
        if result is None:
            return f"Observation: error: {step.error}\n"
        body = result.output if result.ok else f"error: {result.output}"
        return f"Observation: {body}\n"


PROTOCOLS = {"internlm2": InternLM2Protocol, "react": ReActProtocol}


def make_protocol(name: str, system: str = "", tools: list[dict] | None = None):
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; known: {sorted(PROTOCOLS)}")
    return PROTOCOLS[name](system, tools)
