"""``job=build_engine``: checkpoint -> engine directory, with quantization and a build report.

The report answers "what did the build cost and what did quantization cost": size on disk, build time,
and perplexity on held-out real text (documents disjoint from the calibration ones) for the unquantized
layout and for the built engine. The perplexity and AWQ calibration forwards (and the AWQ search) run on
``build.device``; the engine is written from CPU tensors either way, so where it was built leaves no trace
in it.
"""
from __future__ import annotations

import dataclasses
import json
import math
import resource
import time
from pathlib import Path
from typing import Optional

import torch

from puyu.data_pipeline.corpora import WIKI_EVAL_DOCS, wiki_summaries_file, wiki_titles
from puyu.launcher.atomic import atomic_write_text
from puyu.launcher.stage import Stage, TaskContext
from puyu.launcher.distributed import resolve_device
from puyu.serving.config import BuildConfig, BuildEngineJobConfig, ServingError
from puyu.model.hf import has_tokenizer
from puyu.serving.engine import engine_tensors, place_tensors, read_checkpoint, save_engine
from puyu.serving.engine_model import EngineModel
from puyu.serving.quant import quantize, quantize_calibrated
from puyu.serving.tokenizer import TextTokenizer

CALIB_ROWS = 2048  # calibration input rows per linear kept for the scale and clip searches (about)


def load_texts(calib_file: str) -> list[str]:
    """Documents of real text: a wiki-summaries JSON ({title: {extract}}), a jsonl with "text", or lines."""
    if not calib_file:
        calib_file = str(wiki_summaries_file())
    path = Path(calib_file)
    if not path.is_file():
        raise ServingError(f"build.calib_file {path} not found")
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        return [data[title]["extract"] for title in wiki_titles(data)]
    if path.suffix == ".jsonl":
        return [json.loads(ln)["text"] for ln in path.read_text().splitlines() if ln.strip()]
    return [ln for ln in path.read_text().splitlines() if ln.strip()]


def split_docs(texts: list[str], tokenizer: TextTokenizer, cfg: BuildConfig) -> tuple[list[list[int]], list[list[int]]]:
    """Calibration documents from the front, held-out evaluation documents from the back (disjoint)."""
    if len(texts) < cfg.calib_docs + cfg.eval_docs:
        raise ServingError(f"build: {len(texts)} documents, need calib_docs + eval_docs = {cfg.calib_docs + cfg.eval_docs}")
    enc = lambda ts: [tokenizer.encode(t)[: cfg.seq_len] for t in ts]  # noqa: E731
    calib = enc(texts[: cfg.calib_docs])
    held_out = enc(texts[len(texts) - cfg.eval_docs:])
    return [d for d in calib if len(d) > 1], [d for d in held_out if len(d) > 1]


@torch.no_grad()
def perplexity(model: EngineModel, docs: list[list[int]]) -> float:
    """exp(mean next-token NLL) over all tokens of ``docs`` (each scored from its own start)."""
    nll, count = 0.0, 0
    for doc in docs:
        tokens = torch.tensor(doc, device=model.device)[None]
        logits = model.forward_dense(tokens[:, :-1]).float()[0]  # [T-1, V]
        nll += float(torch.nn.functional.cross_entropy(logits, tokens[0, 1:], reduction="sum"))
        count += len(doc) - 1
    return math.exp(nll / count)


def layer_captures(model: EngineModel, hidden: list, i: int) -> tuple[list, dict[str, torch.Tensor]]:
    """Layer i (unquantized) over every calibration document's hidden states; returns the next layer's
    hidden states and the inputs of layer i's linears [rows, I] (about ``CALIB_ROWS`` evenly spaced rows)."""
    model.capture_stride = max(1, sum(h.shape[1] for h, _, _ in hidden) // CALIB_ROWS)
    model.capture = {}
    try:
        hidden = [(model.layer_dense(i, h, cos, sin), cos, sin) for h, cos, sin in hidden]
        captured = {k.rsplit(".", 1)[-1]: torch.cat(v) for k, v in model.capture.items()}
    finally:
        model.capture = None
    return hidden, captured


def fold_target(args, name: str) -> tuple[str, slice] | None:
    """Where ``1/s`` of a linear's input scale can be folded: (tensor suffix, rows of it), or None.

    wqkv and w13 read an RMSNorm's output (its weight, all rows); w2 reads ``silu(gate) * up`` (w13's up
    rows); wo reads attention's output, which is v's rows only when every query head has its own kv head.
    """
    if name == "wqkv":
        return "attention_norm.weight", slice(None)
    if name == "w13":
        return "ffn_norm.weight", slice(None)
    if name == "w2":
        return "w13", slice(args.ffn_hidden_dim, None)
    if name == "wo" and args.n_heads == args.n_kv_heads:
        return "wqkv", slice(2 * args.n_heads * args.head_dim, None)
    return None


def divide_rows(t: torch.Tensor, rows: slice, s: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` (a norm weight [D], a linear's weight [O, I] or bias [O]) with ``rows`` divided by
    ``s`` (one per row); a copy, because the unquantized model still reads the original."""
    out = t.clone()
    out[rows] = out[rows] / s.view(-1, *([1] * (t.dim() - 1))).to(t.dtype)
    return out


@torch.no_grad()
def quantize_layer(args, tensors: dict, i: int, cfg: BuildConfig, captured: Optional[dict]) -> dict[str, float]:
    """Quantize layer i's linears in ``tensors`` (CPU) in place; returns their alphas.

    With calibration inputs: wo and w2 first, since their scales fold into wqkv's v rows and w13's up
    rows, which must happen before those two are quantized; then wqkv and w13, whose scales fold into
    the norms. A scale with nowhere to fold stays as the linear's ``act_scale``."""
    alphas = {}
    for name in ("wo", "w2", "wqkv", "w13"):
        key = f"layers.{i}.{name}"
        w = tensors.pop(key + ".weight")
        if captured is None:
            parts, alphas[key] = quantize(w.float(), cfg.quant, cfg.group_size), 0.0
        else:
            x = captured[name]
            parts, s, alphas[key] = quantize_calibrated(w.to(x.device), x, cfg.quant, cfg.group_size)
            s, target = s.cpu(), fold_target(args, name)
            if target is None:
                parts["act_scale"] = s
            else:
                suffix, rows = target
                names = ([f"layers.{i}.{suffix}"] if suffix.endswith("weight")
                         else [f"layers.{i}.{suffix}.weight", f"layers.{i}.{suffix}.bias"])
                for t in (t for t in names if t in tensors):
                    tensors[t] = divide_rows(tensors[t], rows, s)
        tensors.update({f"{key}.{k}": v.cpu() for k, v in parts.items()})
    return alphas


def quantize_tensors(model: EngineModel, tensors: dict, cfg: BuildConfig, calib_docs: Optional[list]) -> dict[str, float]:
    """Replace every linear's ``.weight`` in ``tensors`` (CPU) by its quantized parts; returns the alphas.

    Calibration streams layer by layer: the documents' hidden states enter layer i of the unquantized
    model, which yields layer i's linear inputs (subsampled) and the hidden states for layer i + 1; only
    one layer's inputs are held at a time. The searches run where the model is."""
    hidden = [model.embed_dense(torch.tensor(d, device=model.device)[None]) for d in calib_docs] if calib_docs else None
    alphas = {}
    for i in range(model.args.n_layers):
        captured = None
        if hidden is not None:
            hidden, captured = layer_captures(model, hidden, i)
        alphas.update(quantize_layer(model.args, tensors, i, cfg, captured))
    return alphas


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def build_engine(cfg: BuildEngineJobConfig, out_dir: Path) -> dict:
    """Build the engine into ``out_dir`` and write ``build_report.{json,md}`` there; returns the report."""
    b = cfg.build
    b.validate()
    t0 = time.perf_counter()
    if not cfg.checkpoint:
        raise ServingError("build_engine: checkpoint is not set")
    # a model directory's own tokenizer (a Hugging Face one has it) unless job.tokenizer names another
    tokenizer_src = cfg.tokenizer or (cfg.checkpoint if has_tokenizer(cfg.checkpoint) else "")
    wiki_json = not b.calib_file or Path(b.calib_file).suffix == ".json"  # the default is the wiki summaries
    if tokenizer_src and wiki_json and b.eval_docs > WIKI_EVAL_DOCS:
        raise ServingError(f"build.eval_docs={b.eval_docs}: a wiki summaries file holds out only its last "
                           f"{WIKI_EVAL_DOCS} documents from the data stage (corpora.WIKI_EVAL_DOCS); more would "
                           "score perplexity on text pretraining saw")
    args, state = read_checkpoint(cfg.checkpoint, cfg.layout, cfg.flavor, cfg.vocab_size)
    dtype, device = getattr(torch, b.dtype), torch.device(resolve_device(b.device))
    tensors = engine_tensors(args, state, dtype)  # CPU, what the engine is written from
    fp_model = EngineModel(args, place_tensors(tensors, device))
    tokenizer = TextTokenizer(tokenizer_src) if tokenizer_src else None
    if tokenizer is None and b.quant != "none" and b.awq:
        raise ServingError("build_engine: AWQ calibration needs real text, so tokenizer must be set")
    report: dict = {"checkpoint": str(cfg.checkpoint), "quant": b.quant, "kv": b.kv, "group_size": b.group_size,
                    "awq": b.awq, "dtype": b.dtype, "device": device.type, "params": args.num_params()}
    held_out = []
    if tokenizer is not None:
        calib_docs, held_out = split_docs(load_texts(b.calib_file), tokenizer, b)
        report["ppl_unquantized"] = perplexity(fp_model, held_out)
        report["eval_tokens"] = sum(len(d) - 1 for d in held_out)
    if b.quant != "none":
        report["awq_alpha"] = quantize_tensors(fp_model, tensors, b, calib_docs if b.awq else None)
    if tokenizer is not None:
        report["ppl_engine"] = (perplexity(EngineModel(args, place_tensors(tensors, device)), held_out)
                                if b.quant != "none" else report["ppl_unquantized"])
        report["ppl_change"] = report["ppl_engine"] / report["ppl_unquantized"] - 1
    source = {"checkpoint": str(cfg.checkpoint), "layout": cfg.layout}
    settings = {k: v for k, v in dataclasses.asdict(b).items() if k != "device"}  # the engine is device-independent
    quality = {k: report[k] for k in ("ppl_unquantized", "ppl_engine", "ppl_change", "eval_tokens") if k in report}
    save_engine(out_dir, args, tensors, settings, source, tokenizer_src or None, quality)
    report["size_bytes"] = dir_bytes(out_dir)
    report["build_seconds"] = time.perf_counter() - t0
    report["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    report["engine"] = str(out_dir)
    atomic_write_text(out_dir / "build_report.json", json.dumps(report, indent=2, sort_keys=True) + "\n")
    atomic_write_text(out_dir / "build_report.md", report_markdown(report))
    return report


def report_markdown(r: dict) -> str:
    lines = ["# Engine build", "", f"Checkpoint `{r['checkpoint']}` -> `{r['engine']}`", "",
             "| quant | kv | size on disk | build time | peak RSS | params | held-out ppl before | after | change |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    ppl = (f"{r['ppl_unquantized']:.3f} | {r['ppl_engine']:.3f} | {100 * r['ppl_change']:+.2f}%"
           if "ppl_unquantized" in r else "n/a (no tokenizer) | | ")
    lines.append(f"| {r['quant']} | {r['kv']} | {r['size_bytes'] / 2**20:.2f} MiB | {r['build_seconds']:.1f} s | "
                 f"{r['peak_rss_mb']:.0f} MiB | "
                 f"{r['params']:,} | {ppl} |")
    if "eval_tokens" in r:
        lines += ["", f"Perplexity over {r['eval_tokens']} held-out tokens (documents disjoint from calibration)."]
    return "\n".join(lines) + "\n"


@dataclasses.dataclass
class BuildEngineTask:
    cfg: BuildEngineJobConfig

    def __call__(self, ctx: TaskContext) -> dict:
        out = Path(self.cfg.out) if self.cfg.out else ctx.stage_dir / "engine"
        r = build_engine(self.cfg, out)
        return {k: r[k] for k in ("engine", "size_bytes", "build_seconds", "ppl_unquantized", "ppl_engine") if k in r}


def build_engine_stages(cfg: BuildEngineJobConfig) -> list[Stage]:
    cfg.build.validate()  # a bad setting (build.device=cuda without CUDA) fails here, not in the job
    return [Stage("build_engine", BuildEngineTask(cfg))]
