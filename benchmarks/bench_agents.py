"""Agent episodes/s: puyu's batched agent loop vs the same episodes one at a time (the Lagent way).

Lagent runs one agent over one conversation: each turn is one model call, and the next episode starts
when the last one ends. puyu's ``Agent.run`` advances all unfinished episodes together: one ``generate``
call per round for all of them, their tool calls on 2 sandbox workers at once. Both sides here use the
same ``Agent`` code, runtime (``LLM``, defaults: continuous batching, paged KV, prefix caching), model,
tasks and tools; only ``run`` vs ``run_sequential`` differs.

Model: puyu's ``tiny`` flavor (random weights: it writes noise, so what each turn *says* comes from a
script -- ``puyu.agents.scripted.ScriptedPolicy`` over the real runtime: every prompt is still generated
for ``--max-tokens`` tokens, greedy, and only the reply text is replaced). Tasks: the first ``--episodes``
GSM8K items of ``load_dataset("gsm8k", limit=...)``; each episode has 3 turns: a python call in the
sandbox, a calculator call, the answer. BPE with vocabulary 8192 trained on Wikipedia leads (the tools'
system prompt is ~350 tokens; the context is raised to 1024 so 3 turns fit). Runs alternate sequential, batched (``--repeats``
each); the last line is the ratio of the best wall times.

Lagent itself (0.2.4 on PyPI) requires jupyter, streamlit, duckduckgo-search and more; it is not installed,
so its loop is represented by ``run_sequential`` on puyu's runtime (the same per-turn work).

Run: ``.venv/bin/python benchmarks/bench_agents.py [--episodes 32 --max-tokens 32 --repeats 2 --threads 1]``
"""
from __future__ import annotations

import argparse
import tempfile
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # toy_models: the tests' trained tiny model
from puyu.agents.actions import ActionExecutor, make_actions
from puyu.agents.agent import Agent
from puyu.agents.protocol import ACTION_END, ACTION_START, INTERPRETER, PLUGIN, InternLM2Protocol
from puyu.agents.scripted import ScriptedPolicy, last_observation
from puyu.evaluation.datasets import load_dataset
from puyu.model import Transformer, get_flavor
from puyu.serving.config import RuntimeConfig, SamplingParams
from puyu.serving.llm import LLM
from toy_models import make_tokenizer, wiki_texts


def code_turn(i: int) -> str:
    return f"Let me compute.{ACTION_START}{INTERPRETER}\n```python\nprint({i} * 3 + 1)\n```{ACTION_END}"


def calc_turn(prompt: str) -> str:
    value = last_observation(prompt).strip()
    return f'Check it.{ACTION_START}{PLUGIN}\n{{"name": "calculator", "parameters": {{"expression": "{value} * 2"}}}}{ACTION_END}'


def answer_turn(prompt: str) -> str:
    return f"The answer is {last_observation(prompt).strip()}."


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--episodes", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tok = make_tokenizer(wiki_texts()[:4000], Path(tmp) / "tokenizer.json", vocab_size=8192)
        torch.manual_seed(0)
        model = Transformer(get_flavor("tiny", vocab_size=tok.tok.get_vocab_size(), max_seq_len=1024)).eval()
        llm = LLM.from_model(model, tok, RuntimeConfig(threads=args.threads))
    items = load_dataset("gsm8k", limit=args.episodes).items
    tasks = [it.question for it in items]
    script = {t: [code_turn(i), calc_turn, answer_turn] for i, t in enumerate(tasks)}
    executor = ActionExecutor(make_actions(["python", "calculator"], timeout_s=10.0, memory_mb=256), workers=2)
    protocol = InternLM2Protocol(tools=executor.specs())
    sampling = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    print(f"{len(tasks)} episodes x 3 turns, {args.max_tokens} generated tokens per turn, system prompt "
          f"{len(tok.encode(protocol.header()))} tokens, {args.threads} torch thread(s)")
    best = {"sequential": float("inf"), "batched": float("inf")}
    finals = {}
    for r in range(args.repeats):
        for mode in ("sequential", "batched"):
            policy = ScriptedPolicy(script, model=llm)
            agent = Agent(policy, protocol, executor, sampling, max_turns=4)
            t0, c0 = time.perf_counter(), time.process_time()
            eps = (agent.run_sequential if mode == "sequential" else agent.run)(tasks)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            best[mode] = min(best[mode], wall)
            finals[mode] = [e.final for e in eps]
            bad = sum(e.finish_reason != "answer" for e in eps)
            if bad:
                print("unfinished:", sorted({(e.finish_reason, e.error) for e in eps if e.finish_reason != "answer"}))
            print(f"{mode:>10} run {r}: {wall:7.2f} s wall, {cpu:7.2f} s CPU, {len(eps) / wall:6.2f} episodes/s, "
                  f"{len(policy.calls)} generate calls, model {agent.stats['model_seconds']:.2f} s, "
                  f"tools {agent.stats['tool_seconds']:.2f} s, unfinished {bad}", flush=True)
    executor.close()
    same = sum(a == b for a, b in zip(finals["sequential"], finals["batched"]))
    print(f"final answers equal: {same}/{len(tasks)}")
    print(f"agent episodes/s: {best['sequential'] / best['batched']:.2f}x vs sequential Lagent-style loop (goal 2x)")


if __name__ == "__main__":
    main()
