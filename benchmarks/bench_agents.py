"""Agent episodes/s over the finetuned model: puyu's batched agent loop vs the same episodes one at a time
(the Lagent way).

Lagent runs one agent over one conversation: each turn is one model call, and the next episode starts
when the last one ends. puyu's ``Agent.run`` advances all unfinished episodes together: one ``generate``
call per round for all of them, their tool calls on the sandbox workers at once. Both sides use the same
``Agent`` code, runtime (``LLM`` over the run's built engine: continuous batching, paged KV, prefix
caching), tools and agent settings (the run's ``job.agent`` section); only ``run`` vs ``run_sequential``
differs.

Model: the engine of a ``puyu job=pipeline`` run (``make demo``): puyu's tiny model pretrained on the
run's corpus, then finetuned on agent traces (GSM8K episodes whose tool calls were run for real), so
every tool call here is written by the model itself. Tasks: the run's own agent tasks (GSM8K questions
held out of the traces), or ``--episodes N`` GSM8K questions (``load_dataset("gsm8k", limit=N)``; beyond
the held-out ones they may have been traced). Greedy, so both loops should write the same trajectories:
the benchmark counts how many are identical (turn texts, tool calls, observations, final answers).

Lagent itself (0.2.4 on PyPI) requires jupyter, streamlit, duckduckgo-search and more; it is not installed,
so its loop is represented by ``run_sequential`` on puyu's runtime (the same per-turn work).

Run: ``.venv/bin/python benchmarks/bench_agents.py [--run DIR] [--episodes N] [--repeats 2] [--threads 1]``.
Without ``--run`` it first runs ``puyu job=pipeline`` (the demo, a few minutes) into a temporary directory.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from puyu.agents.config import AgentJobConfig
from puyu.agents.job import make_agent
from puyu.evaluation.datasets import load_dataset
from puyu.serving.llm import LLM


def pipeline_run(tmp: str) -> Path:
    run = Path(tmp) / "run"
    print(f"no --run given: running `puyu job=pipeline run={run}` first", flush=True)
    subprocess.run([sys.executable, "-m", "puyu.launcher", "job=pipeline", f"run={run}"], check=True)
    return run


def agent_config(run: Path, threads: int) -> AgentJobConfig:
    """The run's agent settings, over its built engine."""
    section = OmegaConf.load(run / "config.yaml").job.agent
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(AgentJobConfig(kind="agent")), section))
    cfg.engine = str(run / "build_engine" / "engine")
    cfg.runtime.threads = threads
    return cfg


def trajectory(ep) -> str:
    """What the episode said and did: each turn's text, call and tool output (not its timing), the answer."""
    turns = [(t.text, t.call, t.observation and (t.observation["status"], t.observation["output"])) for t in ep.turns]
    return json.dumps([turns, ep.final, ep.finish_reason], sort_keys=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, help="a finished `puyu job=pipeline` run directory")
    ap.add_argument("--episodes", type=int, default=0, help="GSM8K questions; 0: the run's own agent tasks")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or pipeline_run(tmp)
        cfg = agent_config(run, args.threads)
        if args.episodes:
            tasks = [it.question for it in load_dataset("gsm8k", limit=args.episodes).items]
        else:
            rows = (run / "agent_tasks" / "tasks.jsonl").read_text(encoding="utf-8").splitlines()
            tasks = [json.loads(line)["question"] for line in rows]
        llm = LLM(cfg.engine, runtime=cfg.runtime)
        print(f"{len(tasks)} episodes, engine {cfg.engine}, tools {list(cfg.tools)}, max_turns {cfg.max_turns}, "
              f"{cfg.sampling.max_tokens} tokens per turn, {args.threads} torch thread(s)", flush=True)
        best = {"sequential": float("inf"), "batched": float("inf")}
        paths: dict[str, list[str]] = {}
        for r in range(args.repeats):
            for mode in ("sequential", "batched"):
                agent = make_agent(cfg, llm)
                t0, c0 = time.perf_counter(), time.process_time()
                try:
                    eps = (agent.run_sequential if mode == "sequential" else agent.run)(tasks)
                finally:
                    agent.executor.close()
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                best[mode] = min(best[mode], wall)
                paths[mode] = [trajectory(e) for e in eps]
                calls = sum(t.call is not None for e in eps for t in e.turns)
                print(f"{mode:>10} run {r}: {wall:7.2f} s wall, {cpu:7.2f} s CPU, {len(eps) / wall:6.2f} episodes/s, "
                      f"{agent.stats['model_calls']} generate calls, model {agent.stats['model_seconds']:.2f} s, "
                      f"tools {agent.stats['tool_seconds']:.2f} s, tool calls by the model {calls}", flush=True)
    same = sum(a == b for a, b in zip(paths["sequential"], paths["batched"]))
    print(f"identical trajectories: {same}/{len(tasks)}")
    print(f"agent episodes/s: {best['sequential'] / best['batched']:.2f}x vs sequential Lagent-style loop (goal 2x)")


if __name__ == "__main__":
    main()
