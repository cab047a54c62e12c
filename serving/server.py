"""An OpenAI-compatible HTTP endpoint over the runtime: ``/v1/completions``, ``/v1/chat/completions``,
``/v1/models``. Standard library only (``http.server``); bound to 127.0.0.1 unless told otherwise.

Why a batching worker: HTTP handlers run one thread per connection, but the runtime is one model and one
KV cache. Handlers queue their requests; a single worker takes everything queued and runs it as one
``generate`` call, so concurrent clients are batched together instead of serialised.

Run: ``python -m puyu.serving.server --engine <dir> [--port 8000] [--host 127.0.0.1] [--device auto|cpu|cuda]``.
"""
from __future__ import annotations

import argparse
import json
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from puyu.launcher.distributed import DEVICES
from puyu.serving.config import RuntimeConfig, SamplingParams, ServingError
from puyu.serving.llm import LLM, RequestOutput
from puyu.serving.tokenizer import IM_END, chat_prompt_ids, uses_internlm2

MAX_BODY_BYTES = 1 << 20
# OpenAI request field -> SamplingParams field
FIELDS = {"max_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
          "stop": "stop", "seed": "seed", "repetition_penalty": "repetition_penalty", "ignore_eos": "ignore_eos"}


class BatchingWorker(threading.Thread):
    """Owns the ``LLM``; serves queued (prompt, params) items in batches."""

    def __init__(self, llm: LLM):
        super().__init__(daemon=True, name="puyu-serving-worker")
        self.llm, self.queue = llm, queue.Queue()

    def submit(self, prompts: list, params: list[SamplingParams]) -> list[RequestOutput]:
        futures = []
        for p, sp in zip(prompts, params):
            fut: Future = Future()
            self.queue.put((p, sp, fut))
            futures.append(fut)
        return [f.result() for f in futures]

    def run(self) -> None:
        while True:
            items = [self.queue.get()]
            while not self.queue.empty():
                items.append(self.queue.get_nowait())
            try:
                outs = self.llm.generate([p for p, _, _ in items], [sp for _, sp, _ in items])
                for (_, _, fut), out in zip(items, outs):
                    fut.set_result(out)
            except Exception as exc:  # noqa: BLE001 - the clients get the failure, the worker lives on
                for _, _, fut in items:
                    fut.set_exception(exc)


def sampling_from(body: dict) -> SamplingParams:
    values = {FIELDS[k]: v for k, v in body.items() if k in FIELDS and v is not None}
    lp = body.get("logprobs")
    if lp:  # completions: an int (top-n, we return the chosen token's); chat: a bool
        values["logprobs"] = True
    values.setdefault("max_tokens", 16)
    return SamplingParams.from_dict(values)


def _usage(outs: list[RequestOutput]) -> dict:
    p = sum(len(o.prompt_token_ids) for o in outs)
    c = sum(len(o.token_ids) for o in outs)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


class Handler(BaseHTTPRequestHandler):
    worker: BatchingWorker
    model_name: str = "puyu"
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args) -> None:  # quiet by default; errors still go to the client
        pass

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        self._send(status, {"error": {"message": message, "type": "invalid_request_error", "code": status}})

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        if self.path.rstrip("/") == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": self.model_name, "object": "model", "owned_by": "puyu"}]})
        else:
            self._error(404, f"no route GET {self.path}")

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            self._error(413, f"request body of {length} bytes exceeds {MAX_BODY_BYTES}")
            return
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
            if not isinstance(body, dict):
                raise ServingError("the request body must be a JSON object")
            route = self.path.rstrip("/")
            if route == "/v1/completions":
                self._send(200, self._completions(body))
            elif route == "/v1/chat/completions":
                self._send(200, self._chat(body))
            else:
                self._error(404, f"no route POST {self.path}")
        except (ServingError, json.JSONDecodeError, TypeError, KeyError) as exc:
            self._error(400, str(exc))

    def _run(self, prompts: list, params: SamplingParams) -> list[RequestOutput]:
        outs = self.worker.submit(prompts, [params] * len(prompts))
        errors = [o.error for o in outs if o.error]
        if errors:
            raise ServingError(errors[0])
        return outs

    def _completions(self, body: dict) -> dict[str, Any]:
        prompt = body.get("prompt")
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = prompt
        else:
            raise ServingError("prompt must be a string, a list of strings or a list of token ids")
        outs = self._run(prompts, sampling_from(body))
        choices = [{"index": i, "text": o.text if o.text is not None else "", "finish_reason": o.finish_reason,
                    "token_ids": o.token_ids,
                    "logprobs": {"token_logprobs": o.logprobs} if o.logprobs is not None else None}
                   for i, o in enumerate(outs)]
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.model_name, "choices": choices, "usage": _usage(outs)}

    def _chat(self, body: dict) -> dict[str, Any]:
        params = sampling_from(body)
        tokenizer = self.worker.llm.tokenizer
        if uses_internlm2(tokenizer):  # puyu's own tokenizer has no <|im_end|> token to stop at
            params.stop = list(params.stop) + [IM_END]
        outs = self._run([chat_prompt_ids(body.get("messages"), tokenizer)], params)
        o = outs[0]
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.model_name, "usage": _usage(outs),
                "choices": [{"index": 0, "finish_reason": o.finish_reason,
                             "message": {"role": "assistant", "content": o.text if o.text is not None else ""}}]}


def make_server(llm: LLM, host: str = "127.0.0.1", port: int = 0, model_name: str = "puyu") -> ThreadingHTTPServer:
    """A server (not yet serving: call ``serve_forever``) and its worker; port 0 picks a free port."""
    worker = BatchingWorker(llm)
    worker.start()
    handler = type("PuyuHandler", (Handler,), {"worker": worker, "model_name": model_name})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="OpenAI-compatible HTTP endpoint over a puyu engine")
    ap.add_argument("--engine", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--kv-cache-mb", type=int, default=256)
    ap.add_argument("--device", choices=DEVICES, default="auto", help="auto: CUDA when this machine has a GPU")
    args = ap.parse_args(argv)
    runtime = RuntimeConfig(kv_cache_mb=args.kv_cache_mb, device=args.device)
    try:
        runtime.validate()
    except ServingError as exc:
        ap.error(str(exc).replace("runtime.device", "--device"))
    llm = LLM(args.engine, runtime=runtime)
    server = make_server(llm, args.host, args.port)
    print(f"serving {args.engine} on http://{server.server_address[0]}:{server.server_address[1]}/v1", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
