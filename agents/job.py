"""``job=agent``: tool-using episodes over a jsonl of tasks, as an array, with a merge and a report.

The same shape as ``job=infer`` (``puyu.serving.job``), for the same reasons:
- ``agent`` (an array of ``shards`` tasks): task ``r`` of ``W`` runs the episodes of input lines
  ``[r*N//W, (r+1)*N//W)`` -- all of them advancing together through one runtime (``Agent.run``) -- and
  writes ``agent/parts/{r:05d}.jsonl`` in one atomic write; the launcher's completion marker follows, so
  a rerun of the same run redoes only tasks without a marker and a killed task leaves no partial part.
- ``agent_merge`` (one task): checks every part holds exactly its lines, writes
  ``agent/trajectories.jsonl`` (one record per input line, in input order) and ``agent/report.md``:
  finish reasons, tool use (calls per episode, error rates) and, when the rows carry a gold ``answer``,
  accuracy graded with ``puyu.evaluation.metrics`` (GSM8K answer extraction).
A bad input line becomes ``{"index", "error": "<file>:<line>: why"}``; the rest go on.

``TasksFromDataset`` writes a built-in generation dataset (``gsm8k``) as such a jsonl inside a run, for
pipelines that have no task file of their own.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from puyu.agents.config import AgentJobConfig
from puyu.launcher.atomic import atomic_open, atomic_write_text
from puyu.launcher.stage import Stage, TaskContext
from puyu.serving.config import ServingError

PARTS = "parts"
TRAJECTORIES = "trajectories.jsonl"
REPORT = "report.md"
STAGE, MERGE_STAGE = "agent", "agent_merge"


def shard_range(n: int, rank: int, world: int) -> range:
    return range(rank * n // world, (rank + 1) * n // world)


def gold_answer(answer: Any) -> str:
    """The gold of a row: a GSM8K solution's number after ``####``, else the answer as text."""
    text = str(answer)
    return text.rsplit("####", 1)[1].strip().replace(",", "") if "####" in text else text.strip()


def parse_task(line: str, where: str) -> tuple[str, str | None, Any]:
    """(task text, gold answer or None, id) of one input line; raises ServingError naming ``where``."""
    from puyu.serving.job import json_object

    row = json_object(line, where, "task")
    task = row.get("task", row.get("question"))
    if not isinstance(task, str) or not task.strip():
        raise ServingError(f'{where}: needs "task" or "question", a non-empty string')
    gold = row.get("answer")
    if gold is not None and not isinstance(gold, (str, int, float)):
        raise ServingError(f'{where}: "answer" must be a string or a number')
    return task, (gold_answer(gold) if gold is not None else None), row.get("id")


def grade(final: str | None, gold: str) -> tuple[str | None, bool]:
    from puyu.evaluation.metrics import answer_matches, extract_answer

    extracted = extract_answer(final or "", gold)
    return extracted, answer_matches(extracted, gold)


def make_agent(cfg: AgentJobConfig, model):
    """The ``Agent`` a job config describes, over ``model`` (an ``LLM`` or anything with its ``generate``)."""
    from puyu.agents.actions import ActionExecutor, make_actions
    from puyu.agents.agent import Agent
    from puyu.agents.protocol import make_protocol

    actions = make_actions(list(cfg.tools), cfg.tool_timeout_s, cfg.tool_memory_mb, cfg.corpus)
    # the executor's own bound is only a backstop: the sandbox kills code at its timeout (the slack covers
    # starting an interpreter and the search tool indexing its corpus on its first call)
    executor = ActionExecutor(actions, timeout_s=cfg.tool_timeout_s + 60, workers=cfg.tool_workers)
    protocol = make_protocol(cfg.protocol, cfg.system, executor.specs())
    return Agent(model, protocol, executor, cfg.sampling, cfg.max_turns, cfg.runtime.seed)


@dataclasses.dataclass
class AgentTask:
    cfg: AgentJobConfig
    model: Any = None  # tests: a scripted policy instead of the engine (must pickle)

    def __call__(self, ctx: TaskContext) -> dict:
        cfg = self.cfg
        cfg.validate()
        lines = Path(cfg.input).read_text(encoding="utf-8").splitlines()
        mine = shard_range(len(lines), ctx.rank, ctx.world_size)
        records: dict[int, dict] = {}
        tasks, golds, ids, where = [], [], [], []
        for i in mine:
            try:
                task, gold, task_id = parse_task(lines[i], f"{cfg.input}:{i + 1}")
            except ServingError as exc:
                records[i] = {"index": i, "error": str(exc)}
                continue
            tasks.append(task)
            golds.append(gold)
            ids.append(task_id)
            where.append(i)
        if self.model is None:
            from puyu.serving.llm import LLM

            model = LLM(cfg.engine, runtime=cfg.runtime)
        else:
            model = self.model
        agent = make_agent(cfg, model)
        print(f"agent task {ctx.rank}/{ctx.world_size}: lines {mine.start}-{mine.stop - 1}, {len(tasks)} episodes, "
              f"{len(mine) - len(tasks)} invalid; running", flush=True)
        t0 = time.perf_counter()
        try:
            episodes = agent.run(tasks, where) if tasks else []
        finally:
            agent.executor.close()
        seconds = time.perf_counter() - t0
        for i, gold, task_id, ep in zip(where, golds, ids, episodes):
            rec: dict[str, Any] = {"index": i}
            if task_id is not None:
                rec["id"] = task_id
            rec["task"] = ep.task
            if gold is not None:
                extracted, correct = grade(ep.final, gold)
                rec.update(gold=gold, extracted=extracted, correct=correct)
            body = ep.to_record()
            if "error" in body:
                body["error"] = f"{cfg.input}:{i + 1}: {body['error']}"
            records[i] = {**rec, **body}
        part = ctx.stage_dir / PARTS / f"{ctx.rank:05d}.jsonl"
        with atomic_open(part, "w", encoding="utf-8") as fh:
            for i in mine:
                fh.write(json.dumps(records[i], ensure_ascii=False) + "\n")
        return {"part": str(part), "episodes": len(mine), "errors": sum("error" in r for r in records.values()),
                "seconds": seconds, "episodes_per_s": len(episodes) / seconds if seconds else 0.0,
                "model_calls": agent.stats["model_calls"], "model_seconds": agent.stats["model_seconds"],
                "tool_seconds": agent.stats["tool_seconds"],
                "prefix_cache_block_hits": agent.stats["prefix_cache_block_hits"],
                "output_tokens": sum(e.to_record()["output_tokens"] for e in episodes)}


def summarize(records: list[dict]) -> dict:
    """Counts and rates over trajectory records (percentages 0..100, as the evaluation report prints)."""
    eps = [r for r in records if "finish_reason" in r]
    calls = sum(r["tool_calls"] for r in eps)
    per_tool: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for r in eps:
        for t in r["turns"]:
            if "call" in t:
                name = t["call"]["name"] if isinstance(t["call"]["name"], str) else repr(t["call"]["name"])
                per_tool[name][0] += 1
                per_tool[name][1] += t["observation"]["status"] != "ok"
    graded = [r for r in eps if "gold" in r]
    out = {"records": len(records), "episodes": len(eps),
           "input_errors": sum(1 for r in records if "finish_reason" not in r),
           "finish_reasons": dict(sorted(collections.Counter(r["finish_reason"] for r in eps).items())),
           "turns_per_episode": sum(r["num_turns"] for r in eps) / len(eps) if eps else 0.0,
           "tool_calls": calls, "tool_calls_per_episode": calls / len(eps) if eps else 0.0,
           "tool_error_rate": 100.0 * sum(r["tool_errors"] for r in eps) / calls if calls else 0.0,
           # the two rates agent-trace SFT is judged by: episodes whose model wrote a tool call the protocol
           # parsed, and calls whose tool then ran without an error
           "tool_call_rate": 100.0 * sum(1 for r in eps if r["tool_calls"]) / len(eps) if eps else 0.0,
           "tool_success_rate": 100.0 * (1 - sum(r["tool_errors"] for r in eps) / calls) if calls else 0.0,
           "parse_errors": sum(r["parse_errors"] for r in eps),
           "episodes_using_tools": sum(1 for r in eps if r["tool_calls"]),
           "per_tool": {k: {"calls": v[0], "errors": v[1]} for k, v in sorted(per_tool.items())},
           "output_tokens": sum(r["output_tokens"] for r in eps)}
    if graded:
        out["graded"] = len(graded)
        out["accuracy"] = 100.0 * sum(r["correct"] for r in graded) / len(graded)
        with_tools = [r for r in graded if r["tool_calls"]]
        if with_tools:
            out["accuracy_with_tools"] = 100.0 * sum(r["correct"] for r in with_tools) / len(with_tools)
    return out


def report_markdown(cfg: AgentJobConfig, summary: dict, records: list[dict], tasks: list[dict]) -> str:
    setup = (f"Engine `{cfg.engine}`, input `{cfg.input}`, protocol `{cfg.protocol}`, tools {list(cfg.tools)}, "
             f"max_turns {cfg.max_turns}, {cfg.shards} shard(s).")
    lines = ["# Agent run", "", setup, "",
             "| metric | value |", "|---|---:|",
             f"| episodes | {summary['episodes']} |", f"| invalid input lines | {summary['input_errors']} |"]
    if "accuracy" in summary:
        lines.append(f"| accuracy (graded {summary['graded']}) | {summary['accuracy']:.2f} |")
        if "accuracy_with_tools" in summary:
            lines.append(f"| accuracy of episodes that used tools | {summary['accuracy_with_tools']:.2f} |")
    lines += [f"| turns per episode | {summary['turns_per_episode']:.2f} |",
              f"| tool calls per episode | {summary['tool_calls_per_episode']:.2f} |",
              f"| episodes using tools | {summary['episodes_using_tools']} |",
              f"| tool call rate (episodes with a parseable tool call) | {summary['tool_call_rate']:.1f}% |",
              f"| tool success rate (calls that ran without error) | {summary['tool_success_rate']:.1f}% |",
              f"| tool error rate | {summary['tool_error_rate']:.1f}% |",
              f"| unparseable tool calls | {summary['parse_errors']} |",
              f"| output tokens | {summary['output_tokens']} |"]
    lines += ["", "Finish reasons: " + (", ".join(f"{k} {v}" for k, v in summary["finish_reasons"].items()) or "-")]
    if summary["per_tool"]:
        lines += ["", "| tool | calls | errors |", "|---|---:|---:|"]
        lines += [f"| {k} | {v['calls']} | {v['errors']} |" for k, v in summary["per_tool"].items()]
    if tasks:
        lines += ["", "| task | episodes | errors | seconds | episodes/s | model calls | prefix-cache block hits |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {i} | {t['episodes']} | {t['errors']} | {t['seconds']:.1f} | {t['episodes_per_s']:.2f} | "
                  f"{t['model_calls']} | {t['prefix_cache_block_hits']} |" for i, t in enumerate(tasks)]
    first = [r for r in records if "finish_reason" in r][:2]
    if first:
        lines += ["", "First episodes:"]
        for r in first:
            lines.append(f"- `{r['task'][:80]}` → {r['finish_reason']} after {r['num_turns']} turn(s), "
                         f"{r['tool_calls']} tool call(s): `{(r.get('final') or '')[:80]}`")
    return "\n".join(lines) + "\n"


@dataclasses.dataclass
class AgentMergeTask:
    cfg: AgentJobConfig
    stage: str = STAGE

    def __call__(self, ctx: TaskContext) -> dict:
        n = len(Path(self.cfg.input).read_text(encoding="utf-8").splitlines())
        stage_dir = ctx.run_dir / self.stage
        out = stage_dir / TRAJECTORIES
        records, tasks = [], []
        with atomic_open(out, "w", encoding="utf-8") as fh:
            for rank in range(self.cfg.shards):
                part = stage_dir / PARTS / f"{rank:05d}.jsonl"
                if not part.exists():
                    raise ServingError(f"agent merge: part {part} is missing (rerun the run to finish task {rank})")
                lines = part.read_text(encoding="utf-8").splitlines()
                recs = [json.loads(ln) for ln in lines]
                expected = shard_range(n, rank, self.cfg.shards)
                if [r["index"] for r in recs] != list(expected):
                    raise ServingError(f"agent merge: {part} holds indices {[r['index'] for r in recs][:3]}..., "
                                       f"expected {expected}")
                fh.writelines(ln + "\n" for ln in lines)
                records += recs
                marker = stage_dir / "completions" / f"{rank:05d}"
                if marker.exists():
                    tasks.append(json.loads(marker.read_text())["result"])
        summary = summarize(records)
        report = stage_dir / REPORT
        atomic_write_text(report, report_markdown(self.cfg, summary, records, tasks))
        atomic_write_text(stage_dir / "summary.json", json.dumps(summary, indent=1, sort_keys=True) + "\n")
        return {"trajectories": str(out), "report": str(report), **{k: v for k, v in summary.items()
                                                                     if not isinstance(v, dict)}}


@dataclasses.dataclass
class TasksFromDataset:
    """``<stage>/tasks.jsonl`` from a built-in generation dataset (``{"id", "question", "answer"}`` rows)."""

    dataset: str = "gsm8k"
    limit: int = 50

    def __call__(self, ctx: TaskContext) -> dict:
        from puyu.evaluation.datasets import load_dataset

        ds = load_dataset(self.dataset, limit=self.limit)
        if ds.kind != "gen":
            raise ServingError(f"agent tasks: dataset {self.dataset!r} is {ds.kind}, not a generation dataset")
        out = ctx.stage_dir / "tasks.jsonl"
        with atomic_open(out, "w", encoding="utf-8") as fh:
            for item in ds.items:
                fh.write(json.dumps({"id": item.id, "question": item.question, "answer": item.answer},
                                    ensure_ascii=False) + "\n")
        return {"tasks": len(ds.items), "file": str(out)}


def build_agent_stages(cfg: AgentJobConfig) -> list[Stage]:
    """``job=agent``: the array and its merge (the input must exist when the job is submitted)."""
    if not cfg.engine or not cfg.input:
        raise ServingError("job=agent needs engine=<engine dir> and input=<tasks.jsonl>")
    if not Path(cfg.input).is_file():
        raise ServingError(f"job=agent: input {cfg.input} not found")
    cfg.validate()
    return [Stage(STAGE, AgentTask(cfg), shards=cfg.shards), Stage(MERGE_STAGE, AgentMergeTask(cfg))]


def agent_report(cfg: AgentJobConfig, run_dir: Path, results: dict[str, list]) -> Path:
    return Path(results[MERGE_STAGE][0]["report"])


def report_section(run_dir: Path, stage: str = STAGE) -> list[str]:
    """An "## Agents" section for a pipeline's report.md: the agent report with its headings demoted."""
    text = (Path(run_dir) / stage / REPORT).read_text(encoding="utf-8")
    body = ("\n" + text).replace("\n# Agent run\n", "\n").replace("\n# ", "\n### ").strip()
    return ["## Agents", "", body, "", f"Trajectories: `{Path(run_dir) / stage / TRAJECTORIES}`"]
