"""The data job: stage functions the launcher runs as array tasks, and the chain that links them.

``build_data_stages(cfg)`` returns, in order: read_filter (N) -> minhash_signatures (N) ->
minhash_buckets (N) -> minhash_clusters (1) -> minhash_filter (N) -> tokenizer (1) -> tokenize (N)
-> summary (1), N being ``shards`` unless ``stages.<name>.tasks`` gives the stage its own (with its own
``cpus``, ``mem`` and ``time``). Each function takes a :class:`TaskContext`, reads the previous stage's folder under
``ctx.run_dir`` and returns JSON-friendly stats, which the launcher keeps in the completion marker;
the summary stage merges the token shards into ``summary/corpus.{bin,idx}`` and reports. A stage
function imports the readers, filters, writers and tokenizers it uses itself: a task unpickles this
module to start, and a dedup task need not load fsspec, lingua or tokenizers to do so.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import re
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

from puyu.data_pipeline import dedup, layout
from puyu.data_pipeline.config import DataJobConfig, StageResources
from puyu.data_pipeline.document import Document, Step, run_steps
from puyu.launcher.atomic import atomic_write_bytes
from puyu.launcher.errors import ConfigError
from puyu.launcher.stage import Stage, TaskContext

log = logging.getLogger("puyu.data_pipeline.job")
INTERMEDIATE = ".jsonl.zst"
OUTPUT_FORMATS = ("jsonl.zst", "jsonl", "parquet")
INPUT_KINDS = ("jsonl", "parquet", "csv", "warc", "hf_dataset", "text", "debian", "fortunes", "wiki_summaries")


def _logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")


def _announce(stage: str, ctx: TaskContext) -> float:
    """Log the task's start and clear temp files a killed earlier attempt of this rank left behind."""
    _logging()
    for stale in ctx.stage_dir.rglob(f".{ctx.rank:05d}*.tmp") if ctx.stage_dir.exists() else ():
        stale.unlink(missing_ok=True)
    log.info("%s: task %d/%d starting in %s", stage, ctx.rank, ctx.world_size, ctx.stage_dir)
    return time.perf_counter()


def corpus_files(cfg: DataJobConfig, run_dir: Path) -> list[tuple[int, Path]]:
    """The deduplicated corpus (or the filtered one when dedup is off), by file number."""
    if cfg.dedup.exact or cfg.dedup.near:
        return layout.numbered_files(run_dir / layout.DEDUP / "out", "." + cfg.output.format)
    return layout.numbered_files(run_dir / layout.READ_FILTER / "out", INTERMEDIATE)


def read_filter_stage(ctx: TaskContext, cfg: DataJobConfig) -> dict[str, Any]:
    from puyu.data_pipeline.readers import InputReader
    from puyu.data_pipeline.steps import build_chain
    from puyu.data_pipeline.writers import DocWriter, ExclusionFile

    start = _announce(layout.READ_FILTER, ctx)
    out = ctx.stage_dir / "out" / f"{ctx.rank:05d}{INTERMEDIATE}"
    sink = ExclusionFile(ctx.stage_dir / "excluded" / f"{ctx.rank:05d}{INTERMEDIATE}",
                         cfg.output.zstd_level) if cfg.filters.write_exclusions else None
    try:
        steps = [InputReader(cfg.inputs, cfg.data_dir), *build_chain(cfg.filters, sink),
                 DocWriter(out, cfg.output.zstd_level)]
        stats = run_steps(steps, ctx.rank, ctx.world_size, ctx.progress("documents"))
    except BaseException:
        if sink is not None:
            sink.close(failed=True)
        raise
    if sink is not None:
        sink.close()
    return {"steps": [s.to_dict() for s in stats], "seconds": round(time.perf_counter() - start, 3)}


def signatures_stage(ctx: TaskContext, cfg: DataJobConfig) -> dict[str, Any]:
    from puyu.data_pipeline.writers import read_docs

    _announce(layout.SIGNATURES, ctx)
    files = layout.numbered_files(ctx.run_dir / layout.READ_FILTER / "out", INTERMEDIATE)
    return {f"{n:05d}": dedup.write_signatures(read_docs(path), ctx.stage_dir, n, cfg.dedup)
            for n, path in layout.owned(files, ctx.rank, ctx.world_size)}


def buckets_stage(ctx: TaskContext, cfg: DataJobConfig) -> dict[str, Any]:
    _announce(layout.BUCKETS, ctx)
    sources = dedup.signature_sources(ctx.run_dir / layout.SIGNATURES, cfg.dedup)
    store = dedup.SignatureStore(sources, cfg.dedup.num_perm)
    pairs, stats = [], {}
    for unit in layout.owned(dedup.bucket_units(cfg.dedup, ctx.world_size), ctx.rank, ctx.world_size):
        unit_pairs, stats[f"{unit[0]}/{unit[1]}of{unit[2]}"] = dedup.unit_pairs(sources, unit, cfg.dedup, store)
        pairs.append(unit_pairs)
        log.info("buckets: band %s part %d/%d: %s", *unit, stats[f"{unit[0]}/{unit[1]}of{unit[2]}"])
    dedup.save_pairs(ctx.stage_dir / "pairs" / f"{ctx.rank:05d}.npy", pairs)
    return stats


def clusters_stage(ctx: TaskContext, cfg: DataJobConfig) -> dict[str, Any]:
    _announce(layout.CLUSTERS, ctx)
    pair_files = [p for _, p in layout.numbered_files(ctx.run_dir / layout.BUCKETS / "pairs", ".npy")]
    numbers = [n for n, _ in layout.numbered_files(ctx.run_dir / layout.SIGNATURES / "sigs", ".u32")]
    stats = dedup.cluster(pair_files, ctx.stage_dir, numbers)
    log.info("clusters: %s", stats)
    return stats


class DropListed(Step):
    """Drops the documents whose index in the file is listed (as exact or near duplicates)."""

    name = "dedup"

    def __init__(self, source: Iterable[Document], removals: dict[int, int]) -> None:
        super().__init__()
        self.source, self.removals = source, removals

    def run(self, docs: Iterable[Document] = (), rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        for index, doc in enumerate(self.source):
            self.stats.docs_in += 1
            size = len(doc.text.encode("utf-8", "surrogatepass"))
            self.stats.bytes_in += size
            if index in self.removals:
                self.stats.drop("exact_duplicate" if self.removals[index] else "near_duplicate")
                continue
            self.stats.docs_out += 1
            self.stats.bytes_out += size
            yield doc


def dedup_filter_stage(ctx: TaskContext, cfg: DataJobConfig) -> dict[str, Any]:
    from puyu.data_pipeline.writers import DocWriter, read_docs

    _announce(layout.DEDUP, ctx)
    files = layout.numbered_files(ctx.run_dir / layout.READ_FILTER / "out", INTERMEDIATE)
    results = {}
    progress = ctx.progress("documents")  # kept, summed over this task's files
    for n, path in layout.owned(files, ctx.rank, ctx.world_size):
        removals = dedup.load_removals(ctx.run_dir / layout.CLUSTERS / "remove" / f"{n:05d}.npy")
        out = ctx.stage_dir / "out" / f"{n:05d}.{cfg.output.format}"
        steps = [DropListed(read_docs(path), removals),
                 DocWriter(out, cfg.output.zstd_level, cfg.output.parquet_row_group)]
        results[f"{n:05d}"] = [s.to_dict() for s in run_steps(steps, ctx.rank, ctx.world_size, progress)]
    return results


def _sample_texts(files: list[Path], budget: int) -> Iterator[str]:
    """The first ``budget / len(files)`` bytes of documents of every file: a deterministic even sample."""
    from puyu.data_pipeline.writers import read_docs

    share = budget // max(len(files), 1)
    for path in files:
        taken = 0
        for doc in read_docs(path):
            if taken >= share:
                break
            taken += len(doc.text.encode("utf-8", "surrogatepass"))
            yield doc.text


def tokenizer_stage(ctx: TaskContext, cfg: DataJobConfig) -> dict[str, Any]:
    from puyu.data_pipeline import tokenize

    start = _announce(layout.TOKENIZER, ctx)
    target = ctx.stage_dir / "tokenizer.json"
    if cfg.tokenizer.path:
        atomic_write_bytes(target, Path(cfg.tokenizer.path).read_bytes())
        source = cfg.tokenizer.path
    else:
        files = [p for _, p in corpus_files(cfg, ctx.run_dir)]
        tokenize.train_tokenizer(_sample_texts(files, cfg.tokenizer.sample_bytes), cfg.tokenizer.vocab_size,
                                 cfg.tokenizer.min_frequency, target)
        source = "trained"
    tok = tokenize.Tokenizer.from_file(str(target))
    if cfg.tokenizer.append_eod and tok.token_to_id(tokenize.EOD) is None:
        raise ConfigError(f"tokenizer {source}: no {tokenize.EOD} token; add it or set tokenizer.append_eod=false")
    vocab = tok.get_vocab_size()
    log.info("tokenizer: %s, vocab %d (%.1fs)", source, vocab, time.perf_counter() - start)
    return {"source": source, "vocab_size": vocab, "path": str(target)}


def tokenize_stage(ctx: TaskContext, cfg: DataJobConfig) -> dict[str, Any]:
    """Token shards of this rank's corpus files, and (for the summary) tokens of what was dropped."""
    from puyu.data_pipeline import tokenize
    from puyu.data_pipeline.summary import dropped_tokens
    from puyu.data_pipeline.writers import read_docs

    _announce(layout.TOKENIZE, ctx)
    tok = tokenize.Tokenizer.from_file(str(ctx.run_dir / layout.TOKENIZER / "tokenizer.json"))
    dtype = tokenize.token_dtype(tok.get_vocab_size())
    eod = [tok.token_to_id(tokenize.EOD)] if cfg.tokenizer.append_eod else []
    files, numbers = {}, []
    for n, path in layout.owned(corpus_files(cfg, ctx.run_dir), ctx.rank, ctx.world_size):
        ids = (doc_ids + eod for doc_ids in tokenize.token_ids(tok, (d.text for d in read_docs(path))))
        files[f"{n:05d}"] = tokenize.write_indexed_dataset(ctx.stage_dir / "shards" / f"{n:05d}", ids, dtype)
        numbers.append(n)
        log.info("tokenize: file %05d: %s", n, files[f"{n:05d}"])
    dropped = dropped_tokens(ctx.run_dir, tok, numbers) if cfg.tokenizer.count_dropped else None
    return {"files": files, "dropped_tokens": dropped}


def summary_stage(ctx: TaskContext, cfg: DataJobConfig) -> dict[str, Any]:
    """Merge the token shards into ``summary/corpus.{bin,idx}`` and write summary.json/.md."""
    from puyu.data_pipeline import tokenize
    from puyu.data_pipeline.summary import write_summary

    _announce(layout.SUMMARY, ctx)
    shards = [p.with_suffix("") for _, p in layout.numbered_files(ctx.run_dir / layout.TOKENIZE / "shards", ".idx")]
    packed = tokenize.merge_indexed_datasets(shards, ctx.stage_dir / "corpus")
    summary = write_summary(ctx.run_dir, cfg, packed)
    log.info("summary: %d documents, %d tokens in %s", packed["documents"], packed["tokens"], ctx.stage_dir)
    return {"corpus": packed, "docs_out": summary["docs_out"]}


def _as_dataclass(cfg: Any) -> DataJobConfig:
    if isinstance(cfg, DataJobConfig):
        return cfg
    from omegaconf import OmegaConf  # a DictConfig built from the structured config

    obj = OmegaConf.to_object(cfg)
    if not isinstance(obj, DataJobConfig):
        raise TypeError(f"data job config must be a DataJobConfig, got {type(obj).__name__}")
    return obj


def validate(cfg: DataJobConfig) -> None:
    """Reject a config that cannot run, with one line naming the key, before anything is submitted."""
    from puyu.data_pipeline.steps import validate_chain

    if not cfg.inputs:
        raise ConfigError("data job: inputs is empty; give at least one input (kind + path or package)")
    for i, spec in enumerate(cfg.inputs):
        if spec.kind not in INPUT_KINDS:
            raise ConfigError(f"data job: inputs[{i}].kind {spec.kind!r} is not one of {', '.join(INPUT_KINDS)}")
        if spec.kind in ("jsonl", "parquet", "csv", "warc", "hf_dataset", "text") and not spec.path:
            raise ConfigError(f"data job: inputs[{i}].path is empty (kind {spec.kind})")
        if spec.kind in ("debian", "fortunes") and not spec.package:
            raise ConfigError(f"data job: inputs[{i}].package is empty (kind {spec.kind})")
        if spec.include_eval_tail and spec.kind != "wiki_summaries":
            raise ConfigError(f"data job: inputs[{i}].include_eval_tail is only for wiki_summaries inputs "
                              f"(kind {spec.kind})")
        if not 0 <= spec.error_rate_limit <= 1:
            raise ConfigError(f"data job: inputs[{i}].error_rate_limit must be in [0, 1], got {spec.error_rate_limit}")
    if cfg.shards < 1:
        raise ConfigError(f"data job: shards must be >= 1, got {cfg.shards}")
    if cfg.output.format not in OUTPUT_FORMATS:
        raise ConfigError(f"data job: output.format {cfg.output.format!r} is not one of {', '.join(OUTPUT_FORMATS)}")
    if not 0 < cfg.dedup.threshold <= 1:
        raise ConfigError(f"data job: dedup.threshold must be in (0, 1], got {cfg.dedup.threshold}")
    dedup.lsh_params(cfg.dedup)  # bands x rows must fit num_perm
    dedup.check_index(cfg.dedup)
    _check_resources(cfg)
    validate_chain(cfg.filters)
    if cfg.tokenizer.path and not Path(cfg.tokenizer.path).is_file():
        raise ConfigError(f"data job: tokenizer.path {cfg.tokenizer.path!r} does not exist")


SINGLE_TASK = (layout.CLUSTERS, layout.TOKENIZER, layout.SUMMARY)
_MEM = re.compile(r"^[0-9]+[KMGT]?$")


def _check_resources(cfg: DataJobConfig) -> None:
    for f in dataclasses.fields(cfg.stages):
        res, key = getattr(cfg.stages, f.name), f"stages.{f.name}"
        for field in ("tasks", "cpus", "time"):
            if getattr(res, field) < 0:
                raise ConfigError(f"data job: {key}.{field} must be >= 0 (0: the default), got {getattr(res, field)}")
        if f.name in SINGLE_TASK and res.tasks > 1:
            raise ConfigError(f"data job: {key}.tasks must be 1 (the stage runs as one task), got {res.tasks}")
        if res.mem is not None and not _MEM.match(str(res.mem)):
            raise ConfigError(f"data job: {key}.mem {res.mem!r} is not a size like 4G or 512M")


def _cluster_overrides(res: StageResources) -> dict[str, Any]:
    """The stage's own cluster options, only those it sets (the rest stay the job's ``cluster.*``)."""
    overrides = {"cpus_per_task": res.cpus or None, "mem": res.mem, "time_min": res.time or None}
    return {k: v for k, v in overrides.items() if v is not None}


def _settings(cfg: DataJobConfig) -> dict[str, dict[str, Any]]:
    """Per stage, the settings its outputs depend on (the launcher refuses a rerun that changes them; a
    change upstream redoes every later stage too, so each stage names only its own)."""
    asdict = dataclasses.asdict
    dedup_cfg = asdict(cfg.dedup)
    return {layout.READ_FILTER: {"inputs": [asdict(s) for s in cfg.inputs], "filters": asdict(cfg.filters),
                                 "data_dir": cfg.data_dir},
            layout.SIGNATURES: dedup_cfg, layout.BUCKETS: dedup_cfg, layout.CLUSTERS: dedup_cfg,
            layout.DEDUP: {"dedup": dedup_cfg, "output": asdict(cfg.output)},
            layout.TOKENIZER: asdict(cfg.tokenizer), layout.TOKENIZE: asdict(cfg.tokenizer), layout.SUMMARY: {}}


def build_data_stages(cfg: Any) -> list[Stage]:
    """The data job's stages in dependency order (each reads the folder of the one before)."""
    cfg = _as_dataclass(cfg)
    validate(cfg)
    settings = _settings(cfg)

    def stage(name: str, fn) -> Stage:
        res = getattr(cfg.stages, name)
        tasks = 1 if name in SINGLE_TASK else res.tasks or cfg.shards
        return Stage(name, functools.partial(fn, cfg=cfg), tasks, cluster=_cluster_overrides(res),
                     config=settings[name])

    stages = [stage(layout.READ_FILTER, read_filter_stage)]
    if cfg.dedup.exact or cfg.dedup.near:
        stages += [stage(layout.SIGNATURES, signatures_stage), stage(layout.BUCKETS, buckets_stage),
                   stage(layout.CLUSTERS, clusters_stage), stage(layout.DEDUP, dedup_filter_stage)]
    stages += [stage(layout.TOKENIZER, tokenizer_stage), stage(layout.TOKENIZE, tokenize_stage),
               stage(layout.SUMMARY, summary_stage)]
    return stages
