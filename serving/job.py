"""``job=infer`` and ``job=build_engine``: stage builders for the launcher.

Batch inference is two stages:
- ``infer`` (an array of ``shards`` tasks): task ``r`` of ``W`` serves input lines
  ``[r*N//W, (r+1)*N//W)`` (contiguous, so concatenating parts in rank order is input order) and writes
  ``infer/parts/{r:05d}.jsonl`` in one atomic write; the launcher's completion marker follows it, so a
  rerun after a kill redoes only tasks without a marker, and a killed task leaves no partial part.
- ``infer_merge`` (one task): checks every part is there with exactly its lines, and writes
  ``infer/outputs.jsonl`` (one record per input line, in input order) atomically.
An input line that is not valid JSON or not a valid request becomes ``{"index", "error"}``; the rest go on.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Optional

from puyu.launcher.atomic import atomic_open
from puyu.launcher.stage import Stage, TaskContext
from puyu.serving.build import build_engine_stages  # noqa: F401  (re-exported for the job registry)
from puyu.serving.config import InferJobConfig, SamplingParams, ServingError
from puyu.serving.llm import LLM, RequestOutput
from puyu.serving.tokenizer import IM_END, Tokenizer, chat_prompt_ids, uses_internlm2

PARTS = "parts"
OUTPUTS = "outputs.jsonl"


def shard_range(n: int, rank: int, world: int) -> range:
    return range(rank * n // world, (rank + 1) * n // world)


def json_object(line: str, where: str, what: str) -> dict:
    """One jsonl input line as a dict; otherwise a ServingError naming ``where`` (file:line) and ``what``."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ServingError(f"{where}: invalid JSON ({exc.msg})") from None
    if not isinstance(rec, dict):
        raise ServingError(f"{where}: a {what} must be a JSON object")
    return rec


def parse_request(line: str, where: str, base: SamplingParams, seed: int, tokenizer: Optional[Tokenizer] = None):
    """(prompt, sampling, id) of one input line; raises ServingError naming ``where`` (file:line).
    ``messages`` are rendered with ``tokenizer``'s own chat template (InternLM2's when it has none)."""
    rec = json_object(line, where, "request")
    try:
        params = SamplingParams.from_dict(rec.get("sampling") or {}, base)
        if params.seed is None:
            params = dataclasses.replace(params, seed=seed)
        if "messages" in rec:
            if uses_internlm2(tokenizer):  # no <|im_end|> token to stop at in puyu's own tokenizer
                params = dataclasses.replace(params, stop=params.stop + [IM_END])
            return chat_prompt_ids(rec["messages"], tokenizer), params, rec.get("id")
        for key in ("prompt", "prompt_token_ids"):
            if key in rec:
                return rec[key], params, rec.get("id")
        raise ServingError("no prompt, prompt_token_ids or messages")
    except (ServingError, TypeError) as exc:
        raise ServingError(f"{where}: {exc}") from None


def output_record(index: int, req_id, out: RequestOutput) -> dict:
    rec = {"index": index}
    if req_id is not None:
        rec["id"] = req_id
    body = out.to_record()
    body.pop("index")
    if "prompt_token_ids" in body:
        body["num_prompt_tokens"] = len(body.pop("prompt_token_ids"))
    return {**rec, **body}


@dataclasses.dataclass
class InferTask:
    cfg: InferJobConfig

    def __call__(self, ctx: TaskContext) -> dict:
        cfg = self.cfg
        lines = Path(cfg.input).read_text(encoding="utf-8").splitlines()
        mine = shard_range(len(lines), ctx.rank, ctx.world_size)
        cfg.sampling.validate()
        llm = LLM(cfg.engine, runtime=cfg.runtime)
        records: dict[int, dict] = {}
        prompts, params, ids, where = [], [], [], []
        for i in mine:
            try:
                prompt, p, req_id = parse_request(lines[i], f"{cfg.input}:{i + 1}", cfg.sampling,
                                                  cfg.runtime.seed * 1_000_003 + i, llm.tokenizer)
            except ServingError as exc:
                records[i] = {"index": i, "error": str(exc)}
                continue
            prompts.append(prompt)
            params.append(p)
            ids.append(req_id)
            where.append(i)
        print(f"infer task {ctx.rank}/{ctx.world_size}: lines {mine.start}-{mine.stop - 1}, {len(prompts)} requests, "
              f"{len(mine) - len(prompts)} invalid; generating", flush=True)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, ctx.progress("requests", len(prompts))) if prompts else []
        seconds = time.perf_counter() - t0
        for i, req_id, out in zip(where, ids, outs):
            if out.error:
                out.error = f"{cfg.input}:{i + 1}: {out.error}"
            records[i] = output_record(i, req_id, out)
        part = ctx.stage_dir / PARTS / f"{ctx.rank:05d}.jsonl"
        with atomic_open(part, "w", encoding="utf-8") as fh:
            for i in mine:
                fh.write(json.dumps(records[i], ensure_ascii=False) + "\n")
        out_tokens = sum(len(o.token_ids) for o in outs)
        return {"part": str(part), "requests": len(mine), "errors": sum("error" in r for r in records.values()),
                "output_tokens": out_tokens, "seconds": seconds,
                "tokens_per_s": out_tokens / seconds if seconds else 0.0,
                "preemptions": llm.stats.get("preemptions", 0)}


@dataclasses.dataclass
class InferMergeTask:
    cfg: InferJobConfig
    infer_stage: str = "infer"

    def __call__(self, ctx: TaskContext) -> dict:
        n = len(Path(self.cfg.input).read_text(encoding="utf-8").splitlines())
        stage = ctx.run_dir / self.infer_stage
        out = stage / OUTPUTS
        with atomic_open(out, "w", encoding="utf-8") as fh:
            for rank in range(self.cfg.shards):
                part = stage / PARTS / f"{rank:05d}.jsonl"
                if not part.exists():
                    raise ServingError(f"infer merge: part {part} is missing (rerun the run to finish task {rank})")
                expected = shard_range(n, rank, self.cfg.shards)
                lines = part.read_text(encoding="utf-8").splitlines()
                got = [json.loads(ln)["index"] for ln in lines]
                if got != list(expected):
                    raise ServingError(f"infer merge: {part} holds indices {got[:3]}..., expected {expected}")
                fh.writelines(ln + "\n" for ln in lines)
        return {"outputs": str(out), "records": n}


def build_infer_stages(cfg: InferJobConfig) -> list[Stage]:
    if not cfg.engine or not cfg.input:
        raise ServingError("job=infer needs engine=<engine dir> and input=<prompts.jsonl>")
    if not Path(cfg.input).is_file():
        raise ServingError(f"job=infer: input {cfg.input} not found")
    if cfg.shards < 1:
        raise ServingError(f"job=infer: shards must be >= 1, got {cfg.shards}")
    cfg.sampling.validate()
    cfg.runtime.validate()
    return [Stage("infer", InferTask(cfg), shards=cfg.shards), Stage("infer_merge", InferMergeTask(cfg))]
