"""The main job, ``puyu job=pipeline``: every stage of the chain that exists, in one run directory.

data (read → filter → dedup → tokenize) → pretrain (on that corpus) → agent_traces (GSM8K tool-use
episodes, the tools run for real; :mod:`puyu.agents.traces`) → sft_data → finetune (on chat
conversations and those traces) → build_engine (from the finetuned model and the data stage's tokenizer) →
prompts (opening words of corpus documents) → infer (batch generation, sharded) → eval (benchmarks on
that engine, an array of tasks) → eval_summary → agent_tasks (GSM8K questions) → agent (tool-using
episodes on that engine, sharded; the finetuned model makes the tool calls) → agent_merge. Later stages learn where earlier ones left their outputs
only at run time (``<run>/<stage>/...``), so their configs name paths *inside the run* and :class:`InRun` resolves
them when the task starts.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
import re
from pathlib import Path
from typing import Any

from puyu.agents.config import AgentJobConfig
from puyu.data_pipeline.config import DataJobConfig
from puyu.evaluation.config import EvalJobConfig
from puyu.launcher.atomic import atomic_open, atomic_write_text
from puyu.launcher.config import JobConfig
from puyu.launcher.errors import ConfigError
from puyu.launcher.report_html import write_report_html
from puyu.launcher.stage import Stage, TaskContext
from puyu.parallel.config import PretrainJobConfig
from puyu.parallel.ft_config import FinetuneJobConfig, SFTDataConfig
from puyu.serving.config import BuildEngineJobConfig, InferJobConfig


@dataclasses.dataclass
class PipelineJobConfig(JobConfig):
    """The main job: every stage of the chain that exists, in order (grows with each stage)."""

    data: DataJobConfig = dataclasses.field(default_factory=DataJobConfig)
    # trains on the data stage's corpus (its data.paths are filled in from the run directory)
    pretrain: PretrainJobConfig = dataclasses.field(default_factory=lambda: PretrainJobConfig(kind="pretrain"))
    pretrain_cluster: dict[str, Any] = dataclasses.field(default_factory=dict)  # e.g. {tasks_per_node: 2}
    # supervised finetuning (LoRA, merged) of the pretrained model on chat conversations made from the
    # Wikipedia leads; its model and vocabulary follow pretrain.model
    finetune: FinetuneJobConfig = dataclasses.field(default_factory=lambda: FinetuneJobConfig(
        kind="finetune", data=SFTDataConfig(wiki=2000, wiki_heldout=32)))
    finetune_cluster: dict[str, Any] = dataclasses.field(default_factory=dict)
    # the engine is built from the finetuned model; checkpoint/tokenizer/out are filled in
    engine: BuildEngineJobConfig = dataclasses.field(default_factory=lambda: BuildEngineJobConfig(kind="build_engine"))
    prompts: int = 64  # batch inference over the opening words of this many corpus documents
    prompt_words: int = 12
    infer: InferJobConfig = dataclasses.field(default_factory=lambda: InferJobConfig(kind="infer"))
    # benchmarks on the built engine, named "finetuned" (job.eval.model_paths may add more models)
    eval: EvalJobConfig = dataclasses.field(default_factory=lambda: EvalJobConfig(kind="eval"))
    # tool-using agent episodes on the built engine over this many GSM8K questions (graded); the search
    # tool, when listed in agent.tools, searches the run's own deduplicated corpus
    agent_tasks: int = 16
    agent: AgentJobConfig = dataclasses.field(default_factory=lambda: AgentJobConfig(kind="agent"))
    # agent-trace SFT: this many GSM8K episodes (calls to agent_trace_tool, one of agent.tools) join the
    # finetuning data, made from questions neither the agents nor evaluation score (0: none)
    agent_traces: int = 400
    agent_trace_tool: str = "python"


PIPELINE_MODEL = "finetuned"  # the eval stage's name for the engine this pipeline builds


@dataclasses.dataclass
class InRun:
    """A stage function built from ``cfg`` once the fields in ``paths`` point into this run."""

    task_cls: type
    cfg: Any
    paths: dict[str, str]  # config field -> path relative to the run directory

    def __call__(self, ctx: TaskContext) -> Any:
        cfg = copy.deepcopy(self.cfg)
        for field, rel in self.paths.items():
            setattr(cfg, field, str(ctx.run_dir / rel))
        return self.task_cls(cfg)(ctx)


@dataclasses.dataclass
class PromptsFromCorpus:
    """``prompts/prompts.jsonl``: the opening words of the last documents of the deduplicated corpus."""

    count: int
    words: int

    def __call__(self, ctx: TaskContext) -> dict:
        from puyu.data_pipeline.writers import read_docs

        files = sorted((ctx.run_dir / "minhash_filter" / "out").glob("*"))
        docs = [d for f in files for d in read_docs(f)][-self.count:]
        out = ctx.stage_dir / "prompts.jsonl"
        with atomic_open(out, "w", encoding="utf-8") as fh:
            for d in docs:
                prompt = " ".join(d.text.split()[: self.words])
                fh.write(json.dumps({"id": d.id, "prompt": prompt}, ensure_ascii=False) + "\n")
        return {"prompts": len(docs), "file": str(out)}


@dataclasses.dataclass
class WithTraces:
    """The ``sft_data`` task with the run's agent traces added to its chat data."""

    task: Any  # puyu.parallel.finetune.SFTDataTask

    def __call__(self, ctx: TaskContext) -> Any:
        from puyu.agents.traces import TRACES

        task = copy.deepcopy(self.task)
        task.cfg.data.paths = [*task.cfg.data.paths, str(ctx.run_dir / "agent_traces" / TRACES)]
        return task(ctx)


def trace_stages(cfg: PipelineJobConfig, agent_paths: dict[str, str]) -> list[Stage]:
    """``agent_traces`` with the agents' own config (protocol, system prompt, tools: the prompt the finetuned
    model will be served), holding out the GSM8K questions the agent and eval stages score."""
    from puyu.agents.traces import TRACE_TOOLS, AgentTracesTask

    if not cfg.agent_traces:
        return []
    if cfg.agent_trace_tool not in TRACE_TOOLS or cfg.agent_trace_tool not in cfg.agent.tools:
        raise ConfigError(f"job.agent_trace_tool={cfg.agent_trace_tool!r} must be one of {sorted(TRACE_TOOLS)} and "
                          f"of job.agent.tools {list(cfg.agent.tools)}")
    holdout = [cfg.agent_tasks] + ([cfg.eval.limits.get("gsm8k", 0)] if "gsm8k" in cfg.eval.datasets else [])
    task = functools.partial(AgentTracesTask, limit=cfg.agent_traces, holdout_limits=holdout,
                             tool=cfg.agent_trace_tool)
    settings = {"traces": cfg.agent_traces, "holdout_limits": holdout, "tool": cfg.agent_trace_tool,
                "tools": list(cfg.agent.tools), "protocol": cfg.agent.protocol, "system": cfg.agent.system}
    paths = {k: v for k, v in agent_paths.items() if k == "corpus"}
    return [Stage("agent_traces", InRun(task, cfg.agent, paths), config=settings)]


def pipeline_stages(cfg: PipelineJobConfig) -> list[Stage]:
    from puyu.agents.job import AgentMergeTask, AgentTask, TasksFromDataset
    from puyu.data_pipeline.job import build_data_stages
    from puyu.evaluation.job import eval_stages
    from puyu.parallel.finetune import finetune_stages
    from puyu.parallel.pretrain import pretrain_stages
    from puyu.serving.build import BuildEngineTask
    from puyu.serving.job import InferMergeTask, InferTask

    infer_paths = {"engine": "build_engine/engine", "input": "prompts/prompts.jsonl"}
    agent_paths = {"engine": "build_engine/engine", "input": "agent_tasks/tasks.jsonl"}
    if not cfg.agent.corpus:  # the search tool's documents: the run's own deduplicated corpus
        agent_paths["corpus"] = "minhash_filter/out"
    dataclasses.replace(cfg.agent, corpus=cfg.agent.corpus or agent_paths["corpus"]).validate()
    finetune = dataclasses.replace(cfg.finetune, model=cfg.pretrain.model)  # the checkpoint's shapes
    sft_data, finetune_stage = finetune_stages(
        finetune, in_run={"checkpoint": "pretrain/model", "tokenizer": "tokenizer/tokenizer.json"},
        cluster=cfg.finetune_cluster)
    if cfg.agent_traces:
        sft_data = dataclasses.replace(sft_data, fn=WithTraces(sft_data.fn))
    return (build_data_stages(cfg.data)
            + pretrain_stages(cfg.pretrain, corpus_in_run="summary/corpus", cluster=cfg.pretrain_cluster)
            + trace_stages(cfg, agent_paths) + [sft_data, finetune_stage]
            + [Stage("build_engine", InRun(BuildEngineTask, cfg.engine, {
                       "checkpoint": "finetune/model", "tokenizer": "tokenizer/tokenizer.json",
                       "out": "build_engine/engine"})),
               Stage("prompts", PromptsFromCorpus(cfg.prompts, cfg.prompt_words)),
               Stage("infer", InRun(InferTask, cfg.infer, infer_paths), shards=cfg.infer.shards),
               Stage("infer_merge", InRun(InferMergeTask, cfg.infer, infer_paths))]
            + eval_stages(cfg.eval, in_run_models={PIPELINE_MODEL: "build_engine/engine"})
            + [Stage("agent_tasks", TasksFromDataset("gsm8k", cfg.agent_tasks)),
               Stage("agent", InRun(AgentTask, cfg.agent, agent_paths), shards=cfg.agent.shards),
               Stage("agent_merge", InRun(AgentMergeTask, cfg.agent, agent_paths))])


def _nested(markdown: str) -> str:
    """A stage's own report as a part of report.md: its headings two levels down (# -> ###, ## -> ####)."""
    return re.sub(r"^(#{1,4}) ", lambda m: "#" * (len(m.group(1)) + 2) + " ", markdown, flags=re.M).strip()


def _serving_section(run_dir: Path, results: dict[str, list]) -> list[str]:
    build = (run_dir / "build_engine" / "engine" / "build_report.md").read_text()
    tasks = results["infer"]
    tokens = sum(t["output_tokens"] for t in tasks)
    lines = ["## Serving", "", _nested(build), "",
             f"### Batch inference: {sum(t['requests'] for t in tasks)} prompts, {len(tasks)} tasks, "
             f"{tokens} output tokens", "", "| task | requests | errors | output tokens | tokens/s |",
             "|---:|---:|---:|---:|---:|"]
    lines += [f"| {i} | {t['requests']} | {t['errors']} | {t['output_tokens']} | {t['tokens_per_s']:.0f} |"
              for i, t in enumerate(tasks)]
    outputs = run_dir / "infer" / "outputs.jsonl"
    prompts = (run_dir / "prompts" / "prompts.jsonl").read_text().splitlines()
    lines += ["", f"Outputs: `{outputs}`. The first three:", ""]
    for record in map(json.loads, outputs.read_text().splitlines()[:3]):
        prompt = json.loads(prompts[record["index"]])["prompt"]
        lines.append(f"- `{prompt}` → `{record.get('text', record.get('error', ''))}`")
    return lines


def _traces_lines(run_dir: Path) -> list[str]:
    path = run_dir / "agent_traces" / "summary.json"
    if not path.is_file():
        return []
    t = json.loads(path.read_text())
    skipped = ", ".join(f"{v} {k}" for k, v in t["skipped"].items()) or "none"
    return ["", f"The finetuned model was trained on {t['traces']} agent traces (GSM8K episodes, every "
                f"`{t['tool']}` call run for real; skipped: {skipped}): {t['split']}. Traces: `{t['file']}`"]


def pipeline_report(cfg: PipelineJobConfig, run_dir: Path, results: dict[str, list]) -> Path:
    """``report.md`` in the run directory: what each part of the chain produced, with links; the same as
    one page, ``report.html``, with the pretraining and finetuning loss curves drawn."""
    from puyu.agents.job import report_section as agent_report_section
    from puyu.parallel.finetune import finetune_report
    from puyu.parallel.pretrain import pretrain_report

    data_summary = (run_dir / "summary" / "summary.md").read_text()
    lines = ["# puyu pipeline report", "", f"Run directory: `{run_dir}`", "", "| stage | shards |", "|---|---|"]
    lines += [f"| {stage} | {len(shard_results)} |" for stage, shard_results in results.items()]
    lines += ["", "## Corpus (data stage)", "", _nested(data_summary)]
    lines += ["", "## Pretraining", "", pretrain_report(run_dir, results["pretrain"][0])]
    lines += ["", "## Finetuning", "", finetune_report(run_dir, results["finetune"][0])]
    lines += ["", *_serving_section(run_dir, results)]
    evaluation = Path(results["eval_summary"][0]["report"]).read_text()
    lines += ["", "## Evaluation", "", _nested(evaluation),
              "", f"Report files: `{run_dir / 'eval_summary'}`"]
    lines += ["", *agent_report_section(run_dir), *_traces_lines(run_dir)]
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    write_report_html("\n".join(lines), run_dir / "report.html",
                      {"Pretraining": (run_dir / "pretrain" / "metrics.jsonl", "pretraining loss"),
                       "Finetuning": (run_dir / "finetune" / "metrics.jsonl", "finetuning loss")})
    return path
