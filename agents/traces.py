"""Agent traces: tool-use episodes made by running the tools for real, as SFT conversations.

Why: a model calls tools only after it has seen itself do so. GSM8K solutions carry their arithmetic as
calculator annotations (``16 - 3 - 4 = <<16-3-4=9>>9``); each annotation is a tool call a solver would
make. ``solve`` turns a question into an episode: every annotation's expression is sent to the tool
(the python tool's live interpreter or the calculator, through the agents' own ``ActionExecutor``), the
tool's real output must equal the annotated result (else the question is skipped, counted by reason),
and the episode ends with ``The answer is <gold>.``

Episodes are written as OpenAI function-call conversations, one JSON object a line::

    {"id": "gsm8k/12", "protocol": "internlm2", "tools": [{"type": "function", "function": <spec>}],
     "messages": [{"role": "system", ...}, {"role": "user", "content": <question>},
                  {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function":
                      {"name": "python", "arguments": "{\\"code\\": \\"16-3-4\\"}"}}]},
                  {"role": "tool", "name": "python", "content": "9"}, ...,
                  {"role": "assistant", "content": "The answer is 18."}]}

and rendered for training by :func:`training_text` through the agents' protocol (``call_text`` for the
calls), prompt for prompt what ``Agent`` sends at serving time, so the finetuned model's replies are what
``protocol.parse`` reads. Trained: each assistant reply with the stop string that ends it.

Split (GSM8K ships only its test set here): the questions agents and evaluation are scored on -- the
evenly spread subsets ``load_dataset("gsm8k", limit=L)`` draws for each ``holdout_limits`` L -- and the
few-shot examples evaluation prompts with are never traced; traces come from the other test questions.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import re
from typing import Any

from puyu.agents.actions import ActionExecutor, ActionResult, ToolCall, make_actions
from puyu.agents.config import AgentJobConfig
from puyu.agents.protocol import IM_END, make_protocol
from puyu.launcher.atomic import atomic_open, atomic_write_text
from puyu.launcher.errors import PuyuError
from puyu.launcher.stage import TaskContext

TRACES, SUMMARY = "traces.jsonl", "summary.json"
ANNOTATION = re.compile(r"<<([^<>=]*)=([^<>]*)>>")
TRACE_TOOLS = {"python": "code", "calculator": "expression"}  # tool -> its one parameter


def solution_steps(solution: str) -> list[tuple[str, str]]:
    """(expression, annotated result) of each ``<<expr=result>>`` in a GSM8K solution."""
    return [(e.strip(), r.strip()) for e, r in ANNOTATION.findall(solution)]


def as_number(text: str) -> float | None:
    try:
        return float(text.strip().replace(",", "").lstrip("$").rstrip("%"))
    except ValueError:
        return None


def same_number(output: str, expected: str) -> bool:
    a, b = as_number(output), as_number(expected)
    return a is not None and b is not None and abs(a - b) <= 1e-6 * max(1.0, abs(b))


def solve(executor: ActionExecutor, tool: str, steps: list[tuple[str, str]], gold: str) -> tuple[list[dict] | None, str]:
    """The episode's messages after the user turn, each call run for real; (None, why) when a result is off."""
    if not steps:
        return None, "no calculator annotation"
    state: dict = {}
    messages: list[dict] = []
    try:
        for expr, expected in steps:
            args = {TRACE_TOOLS[tool]: expr}
            result = executor.execute(ToolCall(tool, args), state)
            if not result.ok:
                return None, "tool error"
            if not same_number(result.output, expected):
                return None, "result differs from the annotation"
            messages += [{"role": "assistant", "content": "", "tool_calls": [
                             {"type": "function", "function": {"name": tool, "arguments": json.dumps(args)}}]},
                         {"role": "tool", "name": tool, "content": result.output}]
    finally:
        executor.release(state)
    messages.append({"role": "assistant", "content": f"The answer is {gold}."})
    return messages, ""


# --------------------------------------------------------------------------- reading + rendering rows
def _arguments(call: Any, where: str, i: int) -> tuple[str, dict]:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise PuyuError(f"{where}: messages[{i}].tool_calls needs {{type: function, function: {{name, arguments}}}}")
    from puyu.serving.job import json_object

    args = fn.get("arguments", {})  # OpenAI writes them as a JSON string; an object is taken as well
    what = f"{where}: messages[{i}] arguments of {fn['name']}"
    if isinstance(args, str):
        args = json_object(args, what, "tool call's arguments")
    if not isinstance(args, dict):
        raise PuyuError(f"{what} must be a JSON object")
    return fn["name"], args


def parse_tool_row(row: dict, where: str) -> list[dict]:
    """A function-call row -> messages whose first (system) one carries ``tools`` (specs) and ``protocol``;
    a malformed row raises a one-line PuyuError naming ``where`` and the message."""
    from puyu.agents.protocol import PROTOCOLS

    tools, proto = row.get("tools"), row.get("protocol", "internlm2")
    if proto not in PROTOCOLS:
        raise PuyuError(f"{where}: protocol {proto!r}; known: {sorted(PROTOCOLS)}")
    if not isinstance(tools, list) or not all(isinstance(t, dict) and isinstance(t.get("function", t), dict)
                                             for t in tools):
        raise PuyuError(f"{where}: 'tools' must be a list of {{type: function, function: <spec>}}")
    specs = [t.get("function", t) for t in tools]
    if not all(isinstance(s.get("name"), str) for s in specs):
        raise PuyuError(f"{where}: every tool spec needs a 'name'")
    msgs = row.get("messages")
    if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
        raise PuyuError(f"{where}: 'messages' must be a list of objects")
    system = msgs[0] if msgs and msgs[0].get("role") == "system" else {"role": "system", "content": ""}
    body = msgs[1:] if msgs and msgs[0].get("role") == "system" else msgs
    if not body or body[0].get("role") != "user" or not isinstance(body[0].get("content"), str):
        raise PuyuError(f"{where}: a tool conversation needs one user turn after the optional system turn")
    out = [{"role": "system", "content": str(system.get("content") or ""), "tools": specs, "protocol": proto},
           {"role": "user", "content": body[0]["content"]}]
    offset = len(msgs) - len(body)
    names = {s["name"] for s in specs}
    i = 1
    while i < len(body):
        m, n = body[i], offset + i
        if m.get("role") != "assistant" or not isinstance(m.get("content", ""), str):
            raise PuyuError(f"{where}: messages[{n}] must be an assistant turn (role assistant, content str)")
        calls = m.get("tool_calls") or []
        if not calls:
            if i != len(body) - 1:
                raise PuyuError(f"{where}: messages[{n}] answers without a tool call but is not the last turn")
            out.append({"role": "assistant", "content": m.get("content", "")})
            return out
        if len(calls) != 1:
            raise PuyuError(f"{where}: messages[{n}] has {len(calls)} tool calls; the agents make one per turn")
        name, args = _arguments(calls[0], where, n)
        if name not in names:
            raise PuyuError(f"{where}: messages[{n}] calls {name!r}, not one of the row's tools {sorted(names)}")
        result = body[i + 1] if i + 1 < len(body) else {}
        if result.get("role") != "tool" or not isinstance(result.get("content"), str):
            raise PuyuError(f"{where}: messages[{n + 1}] must be the tool's result (role tool, content str)")
        out += [{"role": "assistant", "content": m.get("content", ""), "call": {"name": name, "parameters": args}},
                {"role": "tool", "content": result["content"]}]
        i += 2
    raise PuyuError(f"{where}: a tool conversation must end with an assistant answer")


def training_text(messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The text of a parsed tool conversation as the agent's protocol renders its episode, and the
    character spans trained on: each reply plus the stop string the model must write to end it."""
    head = messages[0]
    protocol = make_protocol(head["protocol"], head["content"], head["tools"])
    task, turns, spans = messages[1]["content"], [], []
    for i in range(2, len(messages), 2):
        m = messages[i]
        prompt = protocol.render(task, turns)
        if "call" not in m:
            reply = protocol.final_text(m["content"])
            text = prompt + reply + IM_END
            return text, spans + [(len(prompt), len(text))]
        reply = protocol.call_text(ToolCall(**m["call"]), m["content"])
        step = protocol.parse(reply)
        turns.append((protocol.reply(reply, step), protocol.observation(step, ActionResult("ok", messages[i + 1]["content"]))))
        rest = protocol.render(task, turns)[len(prompt) + len(reply):]
        stop = next((s for s in protocol.stop if rest.startswith(s)), "")
        spans.append((len(prompt), len(prompt) + len(reply) + len(stop)))
    raise AssertionError("parse_tool_row guarantees a final answer")


# --------------------------------------------------------------------------- the stage
def heldout_ids(holdout_limits: list[int]) -> set[str]:
    """The GSM8K items agents and evaluation use at these limits, and the few-shot examples."""
    from puyu.evaluation.datasets import load_dataset

    full = load_dataset("gsm8k")
    held = {item.id for item in full.fewshot}
    for limit in holdout_limits:
        held |= {item.id for item in (load_dataset("gsm8k", limit=limit).items if limit else full.items)}
    return held


@dataclasses.dataclass
class AgentTracesTask:
    """The ``agent_traces`` stage: ``limit`` verified GSM8K episodes (module doc) -> ``traces.jsonl``.

    ``cfg`` is the agents' config, so traces use their protocol, system prompt and tool specs (the
    header the finetuned model will be prompted with); ``tool`` is the one the calls go to."""

    cfg: AgentJobConfig
    limit: int = 400
    holdout_limits: list[int] = dataclasses.field(default_factory=list)
    tool: str = "python"
    workers: int = 2

    def __call__(self, ctx: TaskContext) -> dict:
        from puyu.evaluation.datasets import load_dataset

        cfg = self.cfg
        if self.tool not in TRACE_TOOLS or self.tool not in cfg.tools:
            raise PuyuError(f"agent traces: tool={self.tool!r} must be one of {sorted(TRACE_TOOLS)} and of the "
                            f"agents' tools {list(cfg.tools)}")
        held = heldout_ids(self.holdout_limits)
        items = [it for it in load_dataset("gsm8k").items if it.id not in held]
        if len(items) < self.limit:
            raise PuyuError(f"agent traces: {len(items)} GSM8K questions are left after holding out {len(held)}, "
                            f"fewer than limit={self.limit}")
        executor = ActionExecutor(make_actions(list(cfg.tools), cfg.tool_timeout_s, cfg.tool_memory_mb, cfg.corpus),
                                  timeout_s=cfg.tool_timeout_s + 60)
        protocol = make_protocol(cfg.protocol, cfg.system, executor.specs())
        tools = [{"type": "function", "function": spec} for spec in executor.specs()]
        skipped: dict[str, int] = {}
        written = 0
        out = ctx.stage_dir / TRACES
        try:
            with atomic_open(out, "w", encoding="utf-8") as fh, \
                    concurrent.futures.ThreadPoolExecutor(self.workers) as pool:
                for start in range(0, len(items), 4 * self.workers):
                    batch = items[start:start + 4 * self.workers]
                    solved = pool.map(lambda it: solve(executor, self.tool, solution_steps(it.meta["solution"]),
                                                       it.answer), batch)
                    for item, (messages, why) in zip(batch, solved):
                        if written >= self.limit:
                            break
                        if messages is None:
                            skipped[why] = skipped.get(why, 0) + 1
                            continue
                        row = {"id": item.id, "protocol": protocol.name, "tools": tools, "messages": [
                            {"role": "system", "content": protocol.system},
                            {"role": "user", "content": item.question}, *messages]}
                        fh.write(json.dumps(row, ensure_ascii=False) + "\n")
                        written += 1
                    if written >= self.limit:
                        break
        finally:
            executor.close()
        if not written:
            raise PuyuError(f"agent traces: no GSM8K question could be traced ({skipped})")
        summary = {"traces": written, "file": str(out), "tool": self.tool, "held_out_questions": len(held),
                   "skipped": skipped, "split": (
                       f"GSM8K test: {len(held)} questions held out (scored by agents/evaluation, few-shot), "
                       f"traces from the first {written} verified of the other {len(items)}")}
        atomic_write_text(ctx.stage_dir / SUMMARY, json.dumps(summary, indent=1) + "\n")
        return summary
