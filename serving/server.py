"""An OpenAI-compatible HTTP endpoint over the runtime: ``/v1/completions``, ``/v1/chat/completions``
(both with ``stream: true`` as server-sent events), ``/v1/models``. Standard library only
(``http.server``); bound to 127.0.0.1 unless told otherwise. Request fields: ``openai_api``.

Why an engine loop that steps: the runtime is one model and one KV cache, while HTTP handlers run one
thread per connection. Handlers check and tokenize their request (``LLM.prepare``) and hand its
sequences to a single ``EngineLoop`` thread, which admits them between forward steps (``LLM.add`` /
``LLM.step``, the runtime's own scheduler): a request that arrives while others generate joins the
running batch at the next step instead of waiting for it to finish, and every step's new tokens go back
to their handlers at once, which stream them or collect them until their sequences finish. A client that
disconnects mid-stream has its sequences aborted and their KV blocks freed.

Run: ``python -m puyu.serving.server --engine <dir> [--port 8000] [--host 127.0.0.1] [--device auto|cpu|cuda]``.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from puyu.launcher.distributed import DEVICES
from puyu.serving.config import RuntimeConfig, ServingError
from puyu.serving.host_memory import cached_cpu_allocations
from puyu.serving.json_constraint import JsonConstraint, JsonGrammar
from puyu.serving.llm import LLM, RequestOutput
from puyu.serving.openai_api import (
    ParsedRequest,
    chat_logprobs,
    completion_logprobs,
    parse_chat,
    parse_completion,
    tool_calls,
)
from puyu.serving.scheduler import Sequence

MAX_BODY_BYTES = 1 << 20


@dataclasses.dataclass
class Delta:
    """New output of one choice since its last event; ``final`` (the output) when the choice finished."""

    choice: int
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list
    text: str
    final: RequestOutput | None = None


class Job:
    """One HTTP request's sequences (one per choice) and the events the engine loop sends its handler."""

    def __init__(self, seqs: list[Sequence]):
        self.seqs = seqs
        self.events: queue.Queue = queue.Queue()  # Delta, or a str: the runtime failed
        self.sent_tokens = [0] * len(seqs)
        self.sent_text = [0] * len(seqs)

    def delta(self, choice: int, final: RequestOutput | None) -> Delta | None:
        """The choice's output not yet sent (None if nothing new). Text that could still turn out to be
        the start of a stop string is held back until it is known not to be."""
        seq = self.seqs[choice]
        lo, hi = self.sent_tokens[choice], len(seq.output)
        if final is not None:
            text = final.text or ""
        else:
            text = seq.detok.text[:seq.detok.stable(False)] if seq.detok is not None else ""
        if hi == lo and len(text) == self.sent_text[choice] and final is None:
            return None
        out = Delta(choice, seq.output[lo:hi], seq.logprobs[lo:hi], seq.top_logprobs[lo:hi],
                    text[self.sent_text[choice]:], final)
        self.sent_tokens[choice], self.sent_text[choice] = hi, max(len(text), self.sent_text[choice])
        return out


class EngineLoop(threading.Thread):
    """Owns the ``LLM``: admits queued jobs between steps, steps while any sequence runs, and sends
    each job its new output after every step."""

    def __init__(self, llm: LLM):
        super().__init__(daemon=True, name="puyu-serving-engine")
        self.llm = llm
        self.inbox: queue.Queue = queue.Queue()  # ("add" | "abort", Job)
        self.live: dict[int, tuple[Job, int]] = {}  # sequence index -> (job, choice)
        self.indices = itertools.count()
        self._grammar: JsonGrammar | None = None
        self._grammar_lock = threading.Lock()

    def grammar(self) -> JsonGrammar:
        """The vocabulary's JSON grammar, built on the first request that asks for JSON."""
        with self._grammar_lock:
            if self._grammar is None:
                if self.llm.tokenizer is None:
                    raise ServingError("response_format json_object needs the engine's tokenizer")
                self._grammar = JsonGrammar(self.llm.tokenizer, self.llm.args.vocab_size)
            return self._grammar

    def prepare(self, req: ParsedRequest) -> Job:
        """The request's sequences, choice by choice (prompt-major, ``n`` per prompt; the k-th of ``n``
        sampled with ``seed + k``); raises ``ServingError`` for one the runtime cannot serve."""
        seqs = []
        for prompt in req.prompts:
            for k in range(req.n):
                params = req.params
                if k and params.seed is not None:
                    params = dataclasses.replace(params, seed=params.seed + k)
                constraint = JsonConstraint(self.grammar()) if req.json_object else None
                seqs.append(self.llm.prepare(next(self.indices), prompt, params, constraint))
        return Job(seqs)

    def submit(self, job: Job) -> None:
        self.inbox.put(("add", job))

    def abort(self, job: Job) -> None:
        self.inbox.put(("abort", job))

    def _take(self, block: bool) -> None:
        while True:
            try:
                kind, job = self.inbox.get(block=block)
            except queue.Empty:
                return
            block = False
            for choice, seq in enumerate(job.seqs):
                if kind == "add":
                    self.llm.add(seq)
                    self.live[seq.index] = (job, choice)
                elif self.live.pop(seq.index, None) is not None:
                    self.llm.abort(seq)

    def run(self) -> None:
        host_cache_mb = self.llm.cfg.cpu_alloc_cache_mb if self.llm.device.type == "cpu" else 0
        while True:
            self._take(block=True)
            with cached_cpu_allocations(host_cache_mb):  # while busy: the steps reuse their activations' pages
                while self.llm.has_work():
                    outputs: dict[int, RequestOutput] = {}
                    try:
                        self.llm.step(outputs)
                    except Exception as exc:  # noqa: BLE001 - the clients get the failure, the loop lives on
                        self.llm.scheduler.abort_all()
                        for job in {id(j): j for j, _ in self.live.values()}.values():
                            job.events.put(f"the runtime failed: {type(exc).__name__}: {exc}")
                        self.live.clear()
                    self._publish(outputs)
                    self._take(block=False)

    def _publish(self, outputs: dict[int, RequestOutput]) -> None:
        for index, (job, choice) in list(self.live.items()):
            final = outputs.get(index)
            delta = job.delta(choice, final)
            if delta is not None:
                job.events.put(delta)
            if final is not None:
                del self.live[index]


def _usage(req: ParsedRequest, job: Job) -> dict:
    p = sum(len(s.prompt) for s in job.seqs[::req.n])
    c = sum(len(s.output) for s in job.seqs)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


class Handler(BaseHTTPRequestHandler):
    engine: EngineLoop
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

    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": self.model_name, "object": "model", "owned_by": "puyu"}]})
        else:
            self._error(404, f"no route GET {self.path}")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            self._error(413, f"request body of {length} bytes exceeds {MAX_BODY_BYTES}")
            return
        route = self.path.rstrip("/")
        if route not in ("/v1/completions", "/v1/chat/completions"):
            self._error(404, f"no route POST {self.path}")
            return
        chat = route == "/v1/chat/completions"
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
            if not isinstance(body, dict):
                raise ServingError("the request body must be a JSON object")
            req = parse_chat(body, self.engine.llm.tokenizer) if chat else parse_completion(body)
            job = self.engine.prepare(req)
        except (ServingError, json.JSONDecodeError) as exc:
            self._error(400, str(exc))
            return
        self.engine.submit(job)
        try:
            if req.stream:
                self._stream(req, job, chat)
            else:
                self._complete(req, job, chat)
        except (BrokenPipeError, ConnectionResetError):  # the client left: stop generating for it
            self.engine.abort(job)
            self.close_connection = True

    def _events(self, job: Job) -> Iterator[Delta]:
        """The job's deltas until every choice finished; a runtime failure raises ``RuntimeError``."""
        left = len(job.seqs)
        while left:
            event = job.events.get()
            if isinstance(event, str):
                raise RuntimeError(event)
            left -= event.final is not None
            yield event

    def _head(self, chat: bool) -> dict:
        return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": self.model_name}

    # ---- whole responses ---------------------------------------------------------------------------
    def _complete(self, req: ParsedRequest, job: Job, chat: bool) -> None:
        try:
            finals = {d.choice: d.final for d in self._events(job) if d.final is not None}
        except RuntimeError as exc:
            self._error(500, str(exc))
            return
        tok = self.engine.llm.tokenizer
        choices = []
        for i in range(len(job.seqs)):
            o = finals[i]
            text = o.text or ""
            if chat:
                message: dict = {"role": "assistant", "content": text}
                reason = o.finish_reason
                if req.tools:
                    message["content"], calls = tool_calls(text, req.internlm2)
                    if calls:
                        message["tool_calls"], reason = calls, "tool_calls"
                lps = chat_logprobs(tok, o.token_ids, o.logprobs, o.top_logprobs) if o.logprobs is not None else None
                choices.append({"index": i, "message": message, "logprobs": lps, "finish_reason": reason})
            else:
                lps = (completion_logprobs(tok, o.token_ids, o.logprobs, o.top_logprobs, 0)
                       if o.logprobs is not None else None)
                choices.append({"index": i, "text": text, "finish_reason": o.finish_reason, "token_ids": o.token_ids,
                                "logprobs": lps})
        self._send(200, {**self._head(chat), "choices": choices, "usage": _usage(req, job)})

    # ---- server-sent events ------------------------------------------------------------------------
    def _chunk(self, payload: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(payload).encode() + b"\n\n")
        self.wfile.flush()

    def _stream(self, req: ParsedRequest, job: Job, chat: bool) -> None:
        """One chunk per choice and step with new text (chat: a first chunk with the role); tool calls are
        read from the whole reply, so with tools a choice's content and calls come in its last chunk."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the stream ends when the connection does
        self.end_headers()
        self.close_connection = True
        head = {**self._head(chat), "object": "chat.completion.chunk" if chat else "text_completion"}
        tok = self.engine.llm.tokenizer
        if chat:
            for i in range(len(job.seqs)):
                self._chunk({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                  "logprobs": None, "finish_reason": None}]})
        texts, offsets = [""] * len(job.seqs), [0] * len(job.seqs)
        try:
            for d in self._events(job):
                reason = d.final.finish_reason if d.final is not None else None
                wants_lp = job.seqs[d.choice].params.logprobs and d.token_ids
                if chat:
                    delta: dict = {"content": d.text}
                    if req.tools:
                        texts[d.choice] += d.text
                        if d.final is None:
                            continue
                        delta["content"], calls = tool_calls(texts[d.choice], req.internlm2)
                        if calls:
                            delta["tool_calls"] = [{"index": k, **c} for k, c in enumerate(calls)]
                            reason = "tool_calls"
                    lps = chat_logprobs(tok, d.token_ids, d.logprobs, d.top_logprobs) if wants_lp else None
                    choice = {"index": d.choice, "delta": delta, "logprobs": lps, "finish_reason": reason}
                else:
                    lps = (completion_logprobs(tok, d.token_ids, d.logprobs, d.top_logprobs, offsets[d.choice])
                           if wants_lp else None)
                    offsets[d.choice] += sum(len(t) for t in lps["tokens"]) if lps else 0
                    choice = {"index": d.choice, "text": d.text, "logprobs": lps, "finish_reason": reason}
                self._chunk({**head, "choices": [choice]})
        except RuntimeError as exc:
            self._chunk({"error": {"message": str(exc), "type": "server_error", "code": 500}})
        if req.include_usage:
            self._chunk({**head, "choices": [], "usage": _usage(req, job)})
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


def make_server(llm: LLM, host: str = "127.0.0.1", port: int = 0, model_name: str = "puyu") -> ThreadingHTTPServer:
    """A server (not yet serving: call ``serve_forever``) and its engine loop; port 0 picks a free port."""
    engine = EngineLoop(llm)
    engine.start()
    handler = type("PuyuHandler", (Handler,), {"engine": engine, "model_name": model_name})
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
