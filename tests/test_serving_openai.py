"""The OpenAI endpoint through the official ``openai`` client against the running server (a real socket on
127.0.0.1): streaming, n, logprobs, stop, seed, tools, JSON mode, continuous batching across clients, and
the 400s; plus the incremental detokenizer and the JSON grammar on their own."""
from __future__ import annotations

import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
from puyu.model import Transformer, get_flavor
from puyu.serving.config import RuntimeConfig, SamplingParams
from puyu.serving.detokenize import IncrementalText
from puyu.serving.json_constraint import JsonConstraint, JsonGrammar
from puyu.serving.llm import LLM
from puyu.serving.openai_api import tool_calls
from puyu.serving.server import make_server
from toy_models import make_tokenizer, wiki_texts

PROMPTS = ["The river", "In 1990 the city", "A small dog", "Music of the", "She was born in"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = make_tokenizer(wiki_texts()[:1000], tmp_path_factory.mktemp("tok") / "tokenizer.json", vocab_size=600)
    torch.manual_seed(4)
    model = Transformer(get_flavor("tiny", vocab_size=tok.tok.get_vocab_size())).eval()
    llm = LLM.from_model(model, tok, RuntimeConfig(block_size=8, num_blocks=512))
    reference = LLM.from_model(model, tok, RuntimeConfig(block_size=8, num_blocks=512))  # not shared with the server
    server = make_server(llm)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host, port = server.server_address
    client = openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key="none", max_retries=0, timeout=60)
    yield llm, reference, client
    server.shutdown()
    server.server_close()


def greedy(reference: LLM, prompt, max_tokens: int, **kw):
    return reference.generate([prompt], SamplingParams(max_tokens=max_tokens, ignore_eos=True, **kw))[0]


def test_completions_equal_the_offline_runtime(setup):
    _, reference, client = setup
    r = client.completions.create(model="puyu", prompt="The river", max_tokens=8, extra_body={"ignore_eos": True})
    want = greedy(reference, "The river", 8)
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens == len(want.prompt_token_ids)


def test_concurrent_streaming_clients_equal_the_non_streamed_greedy_outputs(setup):
    _, reference, client = setup

    def stream(prompt):
        pieces, reasons = [], []
        for chunk in client.completions.create(model="puyu", prompt=prompt, max_tokens=12, stream=True,
                                               extra_body={"ignore_eos": True}):
            pieces.append(chunk.choices[0].text)
            reasons.append(chunk.choices[0].finish_reason)
        return "".join(pieces), reasons

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        results = list(pool.map(stream, PROMPTS))
    for prompt, (text, reasons) in zip(PROMPTS, results):
        assert text == greedy(reference, prompt, 12).text
        assert reasons[-1] == "length" and all(r is None for r in reasons[:-1]) and len(reasons) > 2


def test_chat_stream_equals_the_non_streamed_reply(setup):
    _, _, client = setup
    messages = [{"role": "user", "content": "Tell me about rivers"}]
    whole = client.chat.completions.create(model="puyu", messages=messages, max_tokens=10)
    chunks = list(client.chat.completions.create(model="puyu", messages=messages, max_tokens=10, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_a_request_arriving_mid_generation_joins_the_running_batch(setup):
    _, _, client = setup
    long_done, events = threading.Event(), {}

    def long_request():
        stream = client.completions.create(model="puyu", prompt="Once upon a time", max_tokens=400, stream=True,
                                           extra_body={"ignore_eos": True})
        for i, _ in enumerate(stream):
            if i == 3:
                events["long_started"] = time.perf_counter()
        events["long_done"] = time.perf_counter()
        long_done.set()

    t = threading.Thread(target=long_request)
    t.start()
    while "long_started" not in events:
        time.sleep(0.001)
    stream = client.completions.create(model="puyu", prompt="A cat", max_tokens=3, stream=True,
                                       extra_body={"ignore_eos": True})
    next(iter(stream))
    first_token = time.perf_counter()
    t.join(60)
    assert first_token < events["long_done"], "the short request waited for the long one to finish"


def test_n_seed_and_logprobs(setup):
    _, _, client = setup
    kw = {"model": "puyu", "prompt": "The river", "max_tokens": 6, "temperature": 1.0, "n": 3, "seed": 7}
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices] and len({c.text for c in a.choices}) > 1
    r = client.completions.create(model="puyu", prompt="The river", max_tokens=5, logprobs=3,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    # the legacy format keys top_logprobs by text: tokens that decode alike (cut bytes: U+FFFD) share a key
    assert len(lp.tokens) == len(lp.token_logprobs) == 5
    assert all(len(t) == 3 or (len(t) == 2 and "\ufffd" in t) for t in lp.top_logprobs), lp.top_logprobs
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):  # greedy: the chosen token is the most likely
        assert chosen == pytest.approx(max(top.values()), abs=1e-5)
    chat = client.chat.completions.create(model="puyu", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                          logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(c.top_logprobs) == 2 for c in content)


def test_stop_strings_cut_the_text_streamed_or_not(setup):
    _, reference, client = setup
    full = greedy(reference, "The river", 30).text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    want = full[:full.find(stop)]
    r = client.completions.create(model="puyu", prompt="The river", max_tokens=30, stop=[stop],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="puyu", prompt="The river", max_tokens=30, stop=stop, stream=True, extra_body={"ignore_eos": True}))
    assert streamed == want


def test_json_object_is_always_valid_json(setup):
    _, _, client = setup
    for seed, max_tokens in [(0, 40), (1, 40), (2, 6), (3, 2)]:
        r = client.chat.completions.create(model="puyu", messages=[{"role": "user", "content": "Give JSON"}],
                                           response_format={"type": "json_object"}, temperature=1.0, seed=seed,
                                           max_tokens=max_tokens)
        assert isinstance(json.loads(r.choices[0].message.content), dict)
        assert r.usage.completion_tokens <= max_tokens


def test_tools_are_announced_and_tool_calls_parsed(setup):
    _, _, client = setup
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    plain = client.chat.completions.create(model="puyu", messages=messages, max_tokens=2)
    with_tools = client.chat.completions.create(model="puyu", messages=messages, max_tokens=2, tools=tools)
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens + 10  # the plugin turn is in the prompt
    content, calls = tool_calls('Let me check.<|action_start|><|plugin|>\n{"name": "get_weather", '
                                '"parameters": {"city": "Paris"}}', internlm2=True)
    assert content == "Let me check." and calls[0]["function"]["name"] == "get_weather"
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}
    content, calls = tool_calls('<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n'
                                '<tool_call>{"name": "b", "arguments": {}}</tool_call>', internlm2=False)
    assert content is None and [c["function"]["name"] for c in calls] == ["a", "b"]
    assert tool_calls("no call here", internlm2=False) == ("no call here", [])


@pytest.mark.parametrize("kw, field", [
    ({"extra_body": {"frobnicate": 1}}, "frobnicate"),
    ({"n": 0}, "n"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": "hot"}, "temperature"),
    ({"stop": ["x"], "response_format": {"type": "json_object"}}, "stop"),
])
def test_bad_fields_are_400_naming_the_field(setup, kw, field):
    _, _, client = setup
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="puyu", messages=[{"role": "user", "content": "x"}], **kw)
    assert field in str(err.value)


def test_a_client_leaving_mid_stream_frees_its_sequence(setup):
    llm, _, client = setup
    stream = client.completions.create(model="puyu", prompt="The river", max_tokens=400, stream=True,
                                       extra_body={"ignore_eos": True})
    next(iter(stream))
    stream.close()
    deadline = time.time() + 30
    while llm.scheduler.has_work() and time.time() < deadline:
        time.sleep(0.01)
    assert not llm.scheduler.has_work() and llm.scheduler.allocator.num_used == 0


def test_incremental_text_equals_the_whole_decode(setup):
    llm, _, _ = setup
    tok = llm.tokenizer
    rng = random.Random(0)
    ids = tok.encode("naïve café — 東京 ✓ rivers 1990") + [rng.randrange(tok.vocab_size) for _ in range(200)]
    text = IncrementalText(tok, ["zz"])
    pieces = [text.update(ids[:k]) for k in range(1, len(ids) + 1)]
    assert "".join(pieces) + text.flush()[len("".join(pieces)):] == tok.decode(ids)
    stopper = IncrementalText(tok, ["café"])
    hits = [stopper.update(ids[:k]) and stopper.find_stop(["café"]) for k in range(1, len(ids) + 1)]
    assert tok.decode(ids).find("café") in hits


def test_json_grammar_masks_only_valid_continuations(setup):
    llm, _, _ = setup
    grammar = JsonGrammar(llm.tokenizer, llm.args.vocab_size)
    rng = random.Random(1)
    for _ in range(100):  # random walks through the mask: every one ends as a JSON object within budget
        c, out, budget = JsonConstraint(grammar), [], rng.randint(2, 50)
        while not c.done:
            allowed = c.allowed(budget - len(out)).nonzero()[:, 0].tolist()
            out.append(rng.choice(allowed))
            c.advance(out[-1])
        assert len(out) <= budget and isinstance(json.loads(llm.tokenizer.decode(out)), dict)
    c = JsonConstraint(grammar)
    mask = c.allowed(10)
    for s in ["{", "{\""]:
        assert mask[llm.tokenizer.token_to_id(s)] if llm.tokenizer.token_to_id(s) is not None else True
    assert not mask[llm.tokenizer.token_to_id("a")] and not mask[llm.tokenizer.eos_id]
