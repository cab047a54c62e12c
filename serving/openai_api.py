"""The OpenAI request and response formats: checking a request's fields, the chat prompt with tools, tool
calls read back from the model's text, and the JSON of responses and stream chunks.

Why every field is checked: a client that sends a field the server silently ignores (``n``, ``tools``,
``response_format``, a penalty) gets a plausible answer to a question it did not ask. An unknown field,
a field this server does not implement (or only with its default value) and a bad value are each a 400
whose one-line message names the field.

Tool calls: the model writes them in its own format; two are read. InternLM2's, which puyu's agents use
(``puyu.agents.protocol``: ``<|action_start|><|plugin|>{"name", "parameters"}<|action_end|>``, the tools
announced in a ``system name=<|plugin|>`` turn), for chats in InternLM2's template; and Qwen/Hermes-style
``<tool_call>{"name", "arguments"}</tool_call>`` blocks, for models whose own chat template renders the
tools. ``tool_choice`` may be ``auto`` or ``none`` (forcing a call would need a grammar per tool).
"""
from __future__ import annotations

import dataclasses
import json
import re
import uuid
from typing import Any

from puyu.agents.protocol import (
    ACTION_END,
    ACTION_START,
    IM_START,
    PLUGIN,
    PLUGIN_PROMPT,
    InternLM2Protocol,
)
from puyu.model.chat_template import (
    INTERNLM2_CHAT_TEMPLATE,
    ChatTemplateError,
    render_chat,
)
from puyu.serving.config import MAX_TOP_LOGPROBS, SamplingParams, ServingError
from puyu.serving.tokenizer import IM_END, chat_prompt, uses_internlm2

MAX_N = 16
COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed", "user",
          "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "top_k", "repetition_penalty",
          "ignore_eos"}
COMPLETION_FIELDS = COMMON | {"prompt", "echo", "best_of", "suffix"}
CHAT_FIELDS = COMMON | {"messages", "top_logprobs", "max_completion_tokens", "tools", "tool_choice",
                        "parallel_tool_calls", "response_format"}
# accepted only with the value that asks for nothing: what this server does in any case
NEUTRAL = {"presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logit_bias": ({},), "echo": (False,),
           "best_of": (1,), "suffix": ("",)}
HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


@dataclasses.dataclass
class ParsedRequest:
    """What a request asks for, in the runtime's terms."""

    prompts: list  # each a string, token ids, or (chat) token ids of the rendered conversation
    params: SamplingParams
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    json_object: bool = False
    tools: list[dict] | None = None  # parse tool calls from the output (tool_choice auto)
    internlm2: bool = False  # tool calls in InternLM2's format (else Hermes)


def _int(body: dict, key: str, lo: int, hi: int | None = None) -> int | None:
    v = body.get(key)
    if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < lo or (hi is not None and v > hi)):
        span = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ServingError(f"{key} must be an integer {span}, got {v!r}")
    return v


def _number(body: dict, key: str, lo: float, hi: float = float("inf"), lo_open: bool = False) -> float | None:
    v = body.get(key)
    if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not (lo < v if lo_open else lo <= v)
                          or v > hi):
        raise ServingError(f"{key} must be a number in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {v!r}")
    return v


def _bool(body: dict, key: str) -> bool:
    v = body.get(key)
    if v is not None and not isinstance(v, bool):
        raise ServingError(f"{key} must be true or false, got {v!r}")
    return bool(v)


def check_fields(body: dict, allowed: set[str]) -> None:
    unknown = sorted(k for k in body if k not in allowed)
    if unknown:
        raise ServingError(f"unknown field {unknown[0]!r}; this endpoint takes {', '.join(sorted(allowed))}")
    for key, neutral in NEUTRAL.items():
        if body.get(key) is not None and body[key] not in neutral:
            raise ServingError(f"{key}={body[key]!r} is not supported (only {neutral[0]!r})")


def sampling(body: dict, max_tokens_key: str = "max_tokens") -> SamplingParams:
    """The sampling fields shared by both endpoints (``logprobs`` and ``top_logprobs`` are the caller's)."""
    stop = body.get("stop")
    if stop is not None and not (isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))):
        raise ServingError(f"stop must be a string or a list of strings, got {stop!r}")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and "" in stop:
        raise ServingError("stop strings must not be empty")
    values = {"max_tokens": _int(body, max_tokens_key, 1) or 16, "temperature": _number(body, "temperature", 0, 2),
              "top_p": _number(body, "top_p", 0, 1, lo_open=True), "top_k": _int(body, "top_k", 0),
              "repetition_penalty": _number(body, "repetition_penalty", 0, lo_open=True),
              "seed": _int(body, "seed", -(2**63), 2**63 - 1), "stop": stop,
              "ignore_eos": _bool(body, "ignore_eos")}
    return SamplingParams.from_dict({k: v for k, v in values.items() if v is not None})


def _stream_fields(body: dict, req: ParsedRequest) -> None:
    req.n = _int(body, "n", 1, MAX_N) or 1
    req.stream = _bool(body, "stream")
    opts = body.get("stream_options")
    if opts is not None:
        if not req.stream:
            raise ServingError("stream_options is only allowed with stream: true")
        if not isinstance(opts, dict) or set(opts) - {"include_usage"}:
            raise ServingError(f"stream_options must be {{\"include_usage\": bool}}, got {opts!r}")
        req.include_usage = _bool(opts, "include_usage")


def parse_completion(body: dict) -> ParsedRequest:
    check_fields(body, COMPLETION_FIELDS)
    prompt = body.get("prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = prompt
    else:
        raise ServingError("prompt must be a string, a list of strings or a list of token ids")
    params = sampling(body)
    top = _int(body, "logprobs", 0, MAX_TOP_LOGPROBS)
    if top is not None:  # the chosen token's logprob, and the top-n's when n > 0
        params.logprobs, params.top_logprobs = True, top
    req = ParsedRequest(prompts, params)
    _stream_fields(body, req)
    return req


def parse_chat(body: dict, tokenizer) -> ParsedRequest:
    check_fields(body, CHAT_FIELDS)
    if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
        raise ServingError("give max_tokens or max_completion_tokens, not both")
    params = sampling(body, "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens")
    params.logprobs = _bool(body, "logprobs")
    top = _int(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top and not params.logprobs:
        raise ServingError("top_logprobs needs logprobs: true")
    params.top_logprobs = top or 0
    _bool(body, "parallel_tool_calls")
    req = ParsedRequest([], params, internlm2=uses_internlm2(tokenizer))
    _stream_fields(body, req)
    fmt = body.get("response_format")
    if fmt is not None:
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind not in ("text", "json_object"):
            raise ServingError(f"response_format must be {{\"type\": \"text\"}} or {{\"type\": \"json_object\"}}, "
                               f"got {fmt!r}")
        req.json_object = kind == "json_object"
    if req.json_object and params.stop:
        raise ServingError("stop cannot be combined with response_format json_object (a stop string could cut the JSON)")
    if req.json_object and params.max_tokens < 2:
        raise ServingError("max_tokens must be >= 2 with response_format json_object (the shortest object is {})")
    tools = _tools(body)
    req.tools = tools if tools and body.get("tool_choice", "auto") != "none" else None
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise ServingError("messages must be a non-empty list of {role, content}")
    req.prompts = [_chat_ids(messages, tools, tokenizer, req.internlm2)]
    if req.internlm2 and not req.json_object:  # puyu's own tokenizer has no <|im_end|> token to stop at
        params.stop = list(params.stop) + [IM_END] + ([ACTION_END] if req.tools else [])
        params.validate()
    return req


def _tools(body: dict) -> list[dict] | None:
    tools, choice = body.get("tools"), body.get("tool_choice")
    if choice is not None and choice not in ("auto", "none"):
        raise ServingError(f"tool_choice={choice!r} is not supported (only \"auto\" and \"none\")")
    if tools is None:
        return None
    if not isinstance(tools, list) or not tools:
        raise ServingError("tools must be a non-empty list of {type: function, function: {name, ...}}")
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ServingError(f"tools[{i}] must be {{type: function, function: {{name: str, ...}}}}, got {t!r}")
    return tools


def _arguments(call: dict, where: str) -> Any:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ServingError(f"{where} must be {{type: function, function: {{name, arguments}}}}, got {call!r}")
    try:
        return fn["name"], json.loads(fn.get("arguments") or "{}")
    except json.JSONDecodeError:
        raise ServingError(f"{where}.function.arguments must be a JSON string, got {fn.get('arguments')!r}") from None


def _chat_ids(messages: list[dict], tools: list[dict] | None, tokenizer, internlm2: bool) -> list[int] | str:
    """The conversation in the model's template with the tools announced, as token ids (text without a
    tokenizer, which the runtime then refuses)."""
    if internlm2:  # InternLM2's agent format, as puyu.agents.protocol writes it
        msgs = []
        for i, m in enumerate(messages):
            m = dict(m)
            text = m.get("content") or ""
            if m.get("role") == "tool":
                m = {"role": "environment", "content": text}
            for j, call in enumerate(m.pop("tool_calls", None) or []):
                name, args = _arguments(call, f"messages[{i}].tool_calls[{j}]")
                text += f"{ACTION_START}{PLUGIN}\n{json.dumps({'name': name, 'parameters': args})}{ACTION_END}"
            msgs.append({**m, "content": text})
        text = chat_prompt(msgs, tokenizer)
        if tools:
            lead = msgs[:next((k for k, m in enumerate(msgs) if m["role"] != "system"), len(msgs))]  # system turns
            if not lead:  # the template's BOS
                prefix = (tokenizer.bos_token or "") if tokenizer is not None else ""
            else:
                prefix = (tokenizer.apply_chat_template(lead) if tokenizer is not None
                          else render_chat(INTERNLM2_CHAT_TEMPLATE, lead))
            specs = json.dumps([t["function"] for t in tools], ensure_ascii=False)
            text = f"{prefix}{IM_START}system name={PLUGIN}\n{PLUGIN_PROMPT}\n{specs}{IM_END}\n{text[len(prefix):]}"
    else:
        msgs = []
        for i, m in enumerate(messages):
            m = dict(m)
            if m.get("tool_calls"):  # templates read the arguments as a mapping
                m["tool_calls"] = [{"type": "function", "function": dict(zip(("name", "arguments"),
                                                                             _arguments(c, f"messages[{i}].tool_calls[{j}]")))}
                                   for j, c in enumerate(m["tool_calls"])]
            if m.get("content") is None:
                m["content"] = ""
            msgs.append(m)
        if not msgs:
            raise ServingError("messages must be a non-empty list of {role, content}")
        try:
            text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tools=tools)
        except ChatTemplateError as exc:
            raise ServingError(str(exc)) from None
    return tokenizer.encode(text, add_special_tokens=False) if tokenizer is not None else text


def tool_calls(text: str, internlm2: bool) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) read from an assistant reply; a call that cannot be read stays in the content."""
    calls = []
    if internlm2:
        step = InternLM2Protocol().parse(text)
        if step.call is None or step.call.name == "python":
            return text, []
        calls.append((step.call.name, step.call.parameters))
        content = step.thought
    else:
        content = text
        for m in HERMES_CALL.finditer(text):
            try:
                obj = json.loads(m.group(1))
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict) and isinstance(obj.get("name"), str):
                calls.append((obj["name"], obj.get("arguments", obj.get("parameters", {}))))
                content = content.replace(m.group(0), "", 1)
        content = content.strip()
    return content or None, [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                              "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}
                             for name, args in calls]


# ---- log-probabilities in the two endpoints' shapes --------------------------------------------------
def completion_logprobs(tokenizer, ids: list[int], lps: list[float], tops: list | None, offset: int) -> dict:
    """``{tokens, token_logprobs, top_logprobs, text_offset}`` of /v1/completions; ``offset``: the text
    length before these tokens."""
    tokens = [tokenizer.decode([i]) for i in ids]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    top = [{tokenizer.decode([i]): lp for i, lp in row} for row in tops] if tops else None
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(tokenizer, ids: list[int], lps: list[float], tops: list | None) -> dict:
    """``{content: [{token, logprob, bytes, top_logprobs}]}`` of /v1/chat/completions."""
    def entry(i: int, lp: float) -> dict:
        t = tokenizer.decode([i])
        return {"token": t, "logprob": lp, "bytes": list(t.encode())}
    return {"content": [{**entry(i, lp), "top_logprobs": [entry(j, v) for j, v in (tops[k] if tops else [])]}
                        for k, (i, lp) in enumerate(zip(ids, lps))]}
