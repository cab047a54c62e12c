"""The OpenAI-compatible endpoint, on loopback, with bounded requests."""
from __future__ import annotations

import http.client
import json
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from puyu.model import Transformer, get_flavor
from puyu.serving.config import RuntimeConfig, SamplingParams
from puyu.serving.llm import LLM
from puyu.serving.server import make_server
from toy_models import make_tokenizer, wiki_texts


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tok = make_tokenizer(wiki_texts()[:1000], tmp_path_factory.mktemp("tok") / "tokenizer.json", vocab_size=600)
    torch.manual_seed(4)
    llm = LLM.from_model(Transformer(get_flavor("tiny", vocab_size=tok.tok.get_vocab_size())).eval(), tok,
                         RuntimeConfig(block_size=8, num_blocks=256))
    server = make_server(llm)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address
    yield llm, f"http://{host}:{port}"
    server.shutdown()
    server.server_close()


def post(url, path, body, timeout=60):
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_binds_loopback(served):
    _, url = served
    assert url.startswith("http://127.0.0.1:")


def test_completions_match_the_offline_runtime(served):
    llm, url = served
    status, body = post(url, "/v1/completions", {"model": "puyu", "prompt": "The river", "max_tokens": 6,
                                                 "ignore_eos": True, "logprobs": 1})
    assert status == 200 and body["object"] == "text_completion"
    choice = body["choices"][0]
    want = llm.generate(["The river"], SamplingParams(max_tokens=6, ignore_eos=True))[0]
    assert choice["text"] == want.text and choice["token_ids"] == want.token_ids
    assert len(choice["logprobs"]["token_logprobs"]) == 6 and body["usage"]["completion_tokens"] == 6


def test_concurrent_clients_are_batched_and_all_answered(served):
    _, url = served
    prompts = [f"Number {i} is" for i in range(6)]
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda p: post(url, "/v1/completions", {"prompt": p, "max_tokens": 4,
                                                                         "ignore_eos": True}), prompts))
    assert all(s == 200 and len(b["choices"][0]["token_ids"]) == 4 for s, b in results)


def test_chat_completions(served):
    _, url = served
    status, body = post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello"}],
                                                      "max_tokens": 5, "temperature": 0.7, "seed": 1})
    assert status == 200 and body["choices"][0]["message"]["role"] == "assistant"
    assert isinstance(body["choices"][0]["message"]["content"], str) and body["usage"]["prompt_tokens"] > 5


def test_bad_requests_are_400_with_a_message(served):
    _, url = served
    status, body = post(url, "/v1/completions", {"prompt": "x", "temperature": -1})
    assert status == 400 and "temperature" in body["error"]["message"]
    status, body = post(url, "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]})
    assert status == 400 and "messages[0]" in body["error"]["message"]
    status, body = post(url, "/v1/completions", {"prompt": "x " * 2000, "max_tokens": 4})
    assert status == 400 and "exceeds the model length" in body["error"]["message"]
    status, _ = post(url, "/v1/nothing", {})
    assert status == 404
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("POST", "/v1/completions")
    conn.putheader("Content-Length", str(2 << 20))  # refused from the header, before any body is read
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413 and "exceeds" in json.loads(resp.read())["error"]["message"]
    conn.close()
