"""Chat templates: a model's jinja ``chat_template`` rendered as ``transformers`` renders it.

A Hugging Face model describes its chat format as a jinja template; the text it renders is what the
model was finetuned on, so puyu renders it the way ``tokenizer.apply_chat_template(messages,
tokenize=False)`` of ``transformers`` 5 does, or prompts and training data drift from the model's:

- the environment: jinja's ``ImmutableSandboxedEnvironment`` (templates come with downloaded models and
  are untrusted code) with ``trim_blocks`` and ``lstrip_blocks`` on and the ``loopcontrols`` extension
  (``{% break %}``/``{% continue %}``); ``{% generation %}…{% endgeneration %}`` (transformers' assistant
  mask marker) renders its body unchanged;
- globals: ``raise_exception(msg)`` (a template's own input check, reported as :class:`ChatTemplateError`),
  ``strftime_now(fmt)`` (today's date, as Llama 3.1 templates print it), ``namespace`` refusing
  underscore-prefixed attributes and a plain ``dict``; the ``tojson`` filter is ``json.dumps`` without
  jinja's HTML escaping, with ``ensure_ascii``/``indent``/``separators``/``sort_keys``;
- variables: ``messages`` (each message without its ``None``-valued keys, and a message's reasoning under
  every name templates read it by: ``reasoning_content``, ``thinking``), ``tools`` (JSON-schema dicts) and
  ``documents`` (``None`` when not given), ``add_generation_prompt``, the tokenizer's named special tokens
  (``bos_token``, ``eos_token``, ... as strings) and any extra keyword, which overrides a special token
  of the same name.

Not mirrored: Python callables as ``tools`` (transformers derives a schema from their docstring; pass
the schema), ``continue_final_message`` and assistant masks (:mod:`puyu.data_pipeline.sft` finds the
assistant's text by rendering prefixes instead, which works for templates without generation markers).

Which template: a tokenizer may carry several (``{name: template}``); the one named ``tool_use`` serves
requests with tools when there is one, else ``default`` (:func:`select_template`). A tokenizer with
none, like puyu's own, is rendered with :data:`INTERNLM2_CHAT_TEMPLATE`, the template InternLM2's chat
models publish in their ``tokenizer_config.json``.
"""
from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Optional

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from puyu.launcher.errors import PuyuError

# internlm/internlm2-chat-7b's tokenizer_config.json "chat_template", verbatim
INTERNLM2_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TEMPLATE_FILE, TEMPLATE_DIR = "chat_template.jinja", "additional_chat_templates"
LEGACY_TEMPLATE_FILE = "chat_template.json"
REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")  # the first one is what templates read


class ChatTemplateError(PuyuError, ValueError):
    """A template that does not compile, raises on the conversation, or is missing: one line naming it."""


class _Namespace(jinja2.utils.Namespace):
    """jinja's ``namespace()`` without underscore-prefixed attributes (a way into CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: B902 (jinja's own signature trick)
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a chat template cannot set the namespace attribute {name!r}")


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}body{% endgeneration %}`` renders ``body``: the tag only marks assistant text."""

    tags = {"generation"}

    def parse(self, parser) -> list[jinja2.nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _plain_dict(*args: Any, **kwargs: Any) -> dict:
    return dict(*args, **kwargs)


@functools.lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
    """The compiled template (cached by its text: serving renders every request with the same one)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, namespace=_Namespace,
                       dict=_plain_dict)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"chat template does not compile: {exc.message} (line {exc.lineno})") from None


def _message(message: Any, i: int) -> dict:
    if not isinstance(message, Mapping):
        raise ChatTemplateError(f"messages[{i}] must be a dict, got {type(message).__name__}")
    out = {key: value for key, value in message.items() if value is not None}
    reasoning = next((out[key] for key in REASONING_KEYS if key in out), None)
    if reasoning is not None:
        out = {"thinking": reasoning, **out, "reasoning_content": reasoning}
    return out


def render_chat(template: str, messages: list[Mapping], *, add_generation_prompt: bool = False,
                tools: Optional[list[Mapping]] = None, documents: Optional[list[Mapping]] = None,
                special_tokens: Optional[Mapping[str, str]] = None, **kwargs: Any) -> str:
    """``messages`` rendered with ``template`` as ``apply_chat_template(..., tokenize=False)`` renders them.

    ``special_tokens`` are the tokenizer's named tokens (``bos_token`` -> ``"<s>"``); ``kwargs`` reach
    the template as variables (e.g. ``enable_thinking``). A template's ``raise_exception`` and any
    other rendering error become a one-line :class:`ChatTemplateError`.
    """
    if not isinstance(messages, list) or not messages:
        raise ChatTemplateError("messages must be a non-empty list of {role, content} dicts")
    for name, items in (("tools", tools), ("documents", documents)):
        if items is not None and not (isinstance(items, list) and all(isinstance(x, Mapping) for x in items)):
            raise ChatTemplateError(f"{name} must be a list of dicts (JSON schemas for tools)")
    variables = {**(special_tokens or {}), **kwargs}
    try:
        return compile_template(template).render(
            messages=[_message(m, i) for i, m in enumerate(messages)], tools=tools, documents=documents,
            add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.exceptions.TemplateError as exc:
        raise ChatTemplateError(f"chat template: {exc}".splitlines()[0]) from None


def select_template(templates: Mapping[str, str], tools: Optional[list] = None) -> str:
    """The template to render with: ``tool_use`` for a request with tools when there is one, else
    ``default``, else InternLM2's when the tokenizer carries none."""
    if not templates:
        return INTERNLM2_CHAT_TEMPLATE
    if tools is not None and "tool_use" in templates:
        return templates["tool_use"]
    if "default" in templates:
        return templates["default"]
    raise ChatTemplateError(f"several chat templates {sorted(templates)} and none named 'default'")


def _templates_value(value: Any, where: str) -> dict[str, str]:
    """A config's ``chat_template``: a string, or a list of ``{name, template}`` (several templates)."""
    if value is None:
        return {}
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list) and all(isinstance(t, Mapping) and isinstance(t.get("name"), str)
                                       and isinstance(t.get("template"), str) for t in value):
        return {t["name"]: t["template"] for t in value}
    raise ChatTemplateError(f"{where}: 'chat_template' must be a string or a list of {{name, template}}")


def read_json_object(path: Path, error: type[Exception]) -> dict:
    """A JSON file holding an object, or ``error`` naming the file, the line and what is wrong."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise error(f"{path}: not JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(value, dict):
        raise error(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def read_chat_templates(directory: Path, config: Mapping) -> dict[str, str]:
    """A model directory's chat templates by name, as ``transformers`` loads them: ``chat_template.jinja``
    (the default) and ``additional_chat_templates/<name>.jinja`` over ``tokenizer_config.json``'s
    ``chat_template``; ``chat_template.json`` (``{"chat_template": ...}``, where processors keep it) last."""
    directory = Path(directory)
    templates = {}
    if (directory / TEMPLATE_FILE).is_file():
        templates["default"] = (directory / TEMPLATE_FILE).read_text(encoding="utf-8")
    if (directory / TEMPLATE_DIR).is_dir():
        for path in sorted((directory / TEMPLATE_DIR).glob("*.jinja")):
            templates[path.name.removesuffix(".jinja")] = path.read_text(encoding="utf-8")
    if templates:
        return templates
    templates = _templates_value(config.get("chat_template"), str(directory / "tokenizer_config.json"))
    legacy = directory / LEGACY_TEMPLATE_FILE
    if not templates and legacy.is_file():
        value = read_json_object(legacy, ChatTemplateError)
        templates = _templates_value(value.get("chat_template"), str(legacy))
    return templates
