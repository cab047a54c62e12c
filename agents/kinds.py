"""What the agents package adds to ``puyu``: the ``agent`` job kind and two chain steps — agent traces
for finetuning (before it) and tool-using episodes on the built engine (at the end).

Registered through the ``puyu.jobs`` entry point (see :mod:`puyu.launcher.registry`).
"""
from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

from puyu.agents.config import AgentJobConfig
from puyu.launcher.errors import ConfigError
from puyu.launcher.registry import ChainStep, JobSpec, Registry
from puyu.launcher.stage import Stage

TRACES_STAGE = "agent_traces"


def _corpus(cfg: Any, run) -> dict[str, str]:
    """The search tool's documents: the run's own deduplicated corpus unless job.agent.corpus names one."""
    return {} if cfg.agent.corpus else {"corpus": run.rel("documents", "agent")}


def trace_chain_stages(cfg: Any, run) -> list[Stage]:
    """``agent_traces`` with the agents' own config (protocol, system prompt, tools: the prompt the finetuned
    model will be served), holding out the GSM8K questions the agent and eval steps score."""
    from puyu.agents.traces import TRACE_TOOLS, AgentTracesTask
    from puyu.launcher.chain import InRun

    if not cfg.agent_traces:
        return []
    if cfg.agent_trace_tool not in TRACE_TOOLS or cfg.agent_trace_tool not in cfg.agent.tools:
        raise ConfigError(f"job.agent_trace_tool={cfg.agent_trace_tool!r} must be one of {sorted(TRACE_TOOLS)} and "
                          f"of job.agent.tools {list(cfg.agent.tools)}")
    evaluated = getattr(cfg, "eval", None)  # the eval step's section, when that step is installed
    holdout = [cfg.agent_tasks] + ([evaluated.limits.get("gsm8k", 0)]
                                   if evaluated is not None and "gsm8k" in evaluated.datasets else [])
    task = functools.partial(AgentTracesTask, limit=cfg.agent_traces, holdout_limits=holdout,
                             tool=cfg.agent_trace_tool)
    settings = {"traces": cfg.agent_traces, "holdout_limits": holdout, "tool": cfg.agent_trace_tool,
                "tools": list(cfg.agent.tools), "protocol": cfg.agent.protocol, "system": cfg.agent.system}
    return [Stage(TRACES_STAGE, InRun(task, cfg.agent, _corpus(cfg, run)), config=settings)]


def agent_chain_stages(cfg: Any, run) -> list[Stage]:
    """Tool-using episodes over ``agent_tasks`` GSM8K questions on the run's ``engine``, graded."""
    from puyu.agents.job import AgentMergeTask, AgentTask, TasksFromDataset
    from puyu.launcher.chain import InRun

    paths = {"engine": run.rel("engine", "agent"), "input": "agent_tasks/tasks.jsonl", **_corpus(cfg, run)}
    dataclasses.replace(cfg.agent, corpus=cfg.agent.corpus or paths.get("corpus", "")).validate()
    return [Stage("agent_tasks", TasksFromDataset("gsm8k", cfg.agent_tasks)),
            Stage("agent", InRun(AgentTask, cfg.agent, paths), shards=cfg.agent.shards),
            Stage("agent_merge", InRun(AgentMergeTask, cfg.agent, paths))]


def agent_chain_report(cfg: Any, run_dir: Path, results: dict[str, list], run) -> list[str]:
    from puyu.agents.job import report_section

    lines = report_section(run_dir)
    path = run_dir / TRACES_STAGE / "summary.json"
    if path.is_file():
        t = json.loads(path.read_text())
        skipped = ", ".join(f"{v} {k}" for k, v in t["skipped"].items()) or "none"
        lines += ["", f"The finetuned model was trained on {t['traces']} agent traces (GSM8K episodes, every "
                      f"`{t['tool']}` call run for real; skipped: {skipped}): {t['split']}. Traces: `{t['file']}`"]
    return lines


def register(registry: Registry) -> None:
    from puyu.agents.traces import TRACES

    registry.add_job("agent", JobSpec(AgentJobConfig, stages="puyu.agents.job:build_agent_stages",
                                      report="puyu.agents.job:agent_report"))
    # agent-trace SFT: this many GSM8K episodes (calls to agent_trace_tool, one of agent.tools) join the
    # finetuning data, made from questions neither the agents nor evaluation score (0: none)
    registry.add_chain_step(ChainStep(
        "agent_traces", order=30, stages="puyu.agents.kinds:trace_chain_stages",
        fields=(("agent_traces", int, lambda: 400), ("agent_trace_tool", str, lambda: "python")),
        outputs={"sft_conversations": f"{TRACES_STAGE}/{TRACES}"}))
    # tool-using agent episodes on the built engine over this many GSM8K questions (graded); the search
    # tool, when listed in agent.tools, searches the run's own deduplicated corpus
    registry.add_chain_step(ChainStep(
        "agents", order=70, stages="puyu.agents.kinds:agent_chain_stages", report="puyu.agents.kinds:agent_chain_report",
        fields=(("agent_tasks", int, lambda: 16), ("agent", AgentJobConfig, lambda: AgentJobConfig(kind="agent")))))
