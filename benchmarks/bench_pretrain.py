"""Pretraining throughput: puyu's training step vs a plain Hugging Face LlamaForCausalLM loop.

Same shapes (a puyu flavor exported as a Llama config), same batches (megatron-core GPTDataset over
the same token shards), same optimizer (fused AdamW: puyu's trainer builds it, and it is the default
``optim`` of transformers' Trainer), same torch thread count, same precision, one process.
puyu uses its fused ops (RMSNorm, RoPE, SwiGLU, chunked linear+cross-entropy); HF uses its eager model
with SDPA attention and the standard loss. Steps alternate (puyu, HF, puyu, HF, ...) so that a change
of machine load hits both sides; the ratio is the median of the per-step ratios.

    .venv/bin/python benchmarks/bench_pretrain.py [--corpus runs/<data run>/summary/corpus] [--flavor tiny|small]
        [--precision fp32|bf16]

``--flavor small`` is a ~100M-parameter model (12 layers, dim 768), where the matmuls weigh as they do in
real training; ``tiny`` (2 layers, dim 256) is the demo's. Without ``--corpus`` it builds a corpus from
real text first (the data job, in process, on the Wikipedia summaries package), which takes about a minute.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

import torch


def build_corpus(workdir: Path, vocab: int) -> Path:
    from puyu.data_pipeline.config import DataJobConfig, InputSpec
    from puyu.launcher.config import ClusterConfig, ClusterKind, LauncherConfig
    from puyu.data_pipeline.kinds import DataJob, data_stages
    from puyu.launcher.pipeline import Pipeline

    cfg = DataJobConfig(inputs=[InputSpec(kind="wiki_summaries")], shards=2)
    cfg.tokenizer.vocab_size = vocab
    Pipeline(data_stages(DataJob(kind="data", data=cfg)), workdir, ClusterConfig(kind=ClusterKind.inline),
             LauncherConfig()).run()
    return workdir / "summary" / "corpus"


def batches(corpus: Path, seq_len: int, batch: int, steps: int, vocab: int):
    from puyu.parallel.config import PretrainDataConfig
    from puyu.parallel.data import StepBatches, build_dataset

    ds = build_dataset(PretrainDataConfig(paths=[str(corpus)], seq_len=seq_len), steps * batch, vocab)
    sb = StepBatches(ds, global_batch=batch, micro_batch=batch, dp_rank=0, dp_size=1)
    return [sb.next_step()[0] for _ in range(steps)]


def timed(step_fn, batch) -> float:
    """Seconds for one step (the loss is read back, as a training loop logging it does)."""
    start = time.perf_counter()
    step_fn(batch)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path)
    ap.add_argument("--flavor", default="tiny")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: both sides under autocast")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from transformers import LlamaConfig, LlamaForCausalLM

    from puyu.model import get_flavor, llama_config
    from puyu.model.model import Transformer
    from puyu.parallel.parallelize import StageModule

    corpus = a.corpus or build_corpus(Path(tempfile.mkdtemp(prefix="bench_pretrain_")), a.vocab)
    data = batches(corpus, a.seq_len, a.batch, a.steps, a.vocab)
    args = get_flavor(a.flavor, vocab_size=a.vocab, fused_ops=True)

    torch.manual_seed(0)
    model = Transformer(args)
    stage = StageModule(model, list(range(args.n_layers)), first=True, last=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def autocast():
        return torch.autocast("cpu", torch.bfloat16) if a.precision == "bf16" else contextlib.nullcontext()

    def puyu_step(b):
        with autocast():
            loss = stage.loss(stage(b.tokens), b.labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    hf_cfg = LlamaConfig(**{k: v for k, v in llama_config(args).items() if k not in ("architectures", "torch_dtype")})
    hf_cfg._attn_implementation = "sdpa"
    hf = LlamaForCausalLM(hf_cfg)
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, fused=True)  # TrainingArguments' adamw_torch_fused

    def hf_step(b):
        with autocast():
            logits = hf(input_ids=b.tokens).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), b.labels.flatten())
        loss.backward()
        hf_opt.step()
        hf_opt.zero_grad(set_to_none=True)
        return loss.item()

    print(f"flavor {a.flavor} ({args.num_params() / 1e6:.1f}M params), vocab {a.vocab}, batch {a.batch}×{a.seq_len}, "
          f"{a.precision}, {a.steps - a.warmup} timed steps each, interleaved, {a.threads} threads, torch {torch.__version__}")
    for b in data[: a.warmup]:
        puyu_step(b), hf_step(b)
    pairs = [(timed(puyu_step, b), timed(hf_step, b)) for b in data[a.warmup:]]
    tokens = data[0].tokens.numel()
    for name, times in (("puyu (fused ops)", [p for p, _ in pairs]), ("HF LlamaForCausalLM", [h for _, h in pairs])):
        print(f"{name}: median step {statistics.median(times):.3f} s, {tokens / statistics.median(times):,.0f} tokens/s; "
              f"steps {[round(t, 3) for t in times]}")
    ratio = statistics.median(h / p for p, h in pairs)
    print(f"pretrain tokens/s ({a.flavor}, median of interleaved steps): {ratio:.2f}x vs HF transformers "
          f"LlamaForCausalLM (goal 1.3x)")


if __name__ == "__main__":
    main()
