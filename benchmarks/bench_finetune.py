"""SFT throughput: puyu's LoRA finetuning step, on both engines, vs Hugging Face transformers + peft LoRA.

Same model (a puyu flavor, exported with ``export_llama`` and loaded as ``LlamaForCausalLM``), same
packed chat rows (Wikipedia lead sections as conversations, InternLM2 template, assistant-only labels,
first-fit packing; HF gets per-conversation ``position_ids`` and no attention mask, from which
transformers builds its packed-sequence mask), same LoRA rank/alpha on the same projections (puyu's
fused ``wqkv`` is one adapter, HF's ``q/k/v_proj`` three), same AdamW over the adapters, same loss
(mean cross-entropy over the labelled tokens), same torch thread count, one process, timed in alternating rounds. puyu runs its
finetuning stage module (``StageModule``: fused RMSNorm/RoPE/SwiGLU, chunked linear+cross-entropy that
skips the frozen head's weight gradient); HF its eager model with SDPA attention. Before timing, the
two models' logits on the first packed batch are compared (they must agree: same weights, same masks).

Engines: ``fsdp`` is the stage module stepped by torch's AdamW, what the FSDP engine runs on one rank;
``deepspeed`` is the same stage inside ``deepspeed.initialize`` with the config ``engine=deepspeed`` jobs
get (``puyu.parallel.deepspeed_engine.ds_config``; ZeRO stage ``--zero-stage``, default 2), one gloo rank,
its ``engine.backward``/``engine.step`` as the job calls them.

    .venv/bin/python benchmarks/bench_finetune.py [--flavor tiny] [--vocab 8192] [--seq-len 512] [--zero-stage 2]

One ratio line per engine; the last line, ``SFT tokens/s: <ratio>x vs HF+peft (goal 1.3x)``, is the
lower of the two (the goal holds for both engines).
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # toy_models: the tests' trained tiny model


def packed_batches(workdir: Path, vocab: int, seq_len: int, batch: int, steps: int):
    from puyu.data_pipeline.sft import build_packed, wiki_chat_jsonl
    from toy_models import make_tokenizer, wiki_texts

    make_tokenizer(wiki_texts(), workdir / "tokenizer.json", vocab)
    chat = wiki_chat_jsonl(workdir, limit=steps * batch * seq_len // 50, heldout=8)
    packed = build_packed([chat["train"]], workdir / "tokenizer.json", seq_len)
    n = steps * batch
    if len(packed.tokens) < n:
        raise SystemExit(f"only {len(packed.tokens)} packed rows for {n}")
    as_t = lambda a: torch.from_numpy(a[:n]).long().view(steps, batch, seq_len)  # noqa: E731
    return list(zip(as_t(packed.tokens), as_t(packed.labels), as_t(packed.document_ids))), packed.stats


def time_rounds(step_fns: dict, data, warmup: int, rounds: int) -> dict[str, float]:
    """tokens/s of each step function: after ``warmup`` steps each, the timed steps are cut into ``rounds``
    and the systems alternate round by round (a load change on a shared machine hits both alike); the
    figure is total tokens / total time over all rounds."""
    for fn in step_fns.values():
        for b in data[:warmup]:
            fn(*b)
    timed = data[warmup:]
    per = max(1, len(timed) // rounds)
    elapsed = dict.fromkeys(step_fns, 0.0)
    for r in range(0, len(timed), per):
        for name, fn in step_fns.items():
            start = time.perf_counter()
            for b in timed[r:r + per]:
                fn(*b)
            elapsed[name] += time.perf_counter() - start
    tokens = sum(b[0].numel() for b in timed)
    return {name: tokens / e for name, e in elapsed.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flavor", default="tiny")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=22)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--plain-loss", action="store_true",
                    help="ablation: puyu's loss as in pretraining (head on every position, weight gradient too)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--zero-stage", type=int, default=2, choices=(1, 2, 3))
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from puyu.model import Transformer, export_llama, get_flavor, ops
    from puyu.model.model import positions_from_document_ids
    from puyu.parallel.finetune import add_lora
    from puyu.parallel.parallelize import StageModule
    from puyu.parallel.ft_config import LoraConfig as PuyuLora

    workdir = Path(tempfile.mkdtemp(prefix="bench_finetune_"))
    data, stats = packed_batches(workdir, a.vocab, a.seq_len, a.batch, a.steps)
    args = get_flavor(a.flavor, vocab_size=a.vocab, fused_ops=True)
    torch.manual_seed(0)
    base = Transformer(args)
    export_llama(base, workdir / "hf")

    ds_base = copy.deepcopy(base)
    model = add_lora(base, PuyuLora(rank=a.rank, alpha=2.0 * a.rank), seed=0)
    stage = StageModule(model, list(range(args.n_layers)), first=True, last=True)
    opt = torch.optim.AdamW([p for p in stage.parameters() if p.requires_grad], lr=1e-4)

    def puyu_loss_sum(h, labels):
        if a.plain_loss:
            return ops.linear_cross_entropy(h.flatten(0, 1), stage.output.weight, labels.flatten(), reduction="sum")
        return stage.loss_sum(h, labels)

    def puyu_step(tokens, labels, doc):
        loss = puyu_loss_sum(stage(tokens, doc), labels) / (labels != -100).sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    ds_step, ds_stage = deepspeed_step(ds_base, args, a)

    hf = LlamaForCausalLM.from_pretrained(workdir / "hf", attn_implementation="sdpa", torch_dtype=torch.float32)
    hf = get_peft_model(hf, LoraConfig(r=a.rank, lora_alpha=2.0 * a.rank, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    hf_opt = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=1e-4)

    def hf_logits(tokens, doc):
        return hf(input_ids=tokens, position_ids=positions_from_document_ids(doc), use_cache=False).logits

    def hf_step(tokens, labels, doc):
        logits = hf_logits(tokens, doc)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        loss.backward()
        hf_opt.step()
        hf_opt.zero_grad(set_to_none=True)

    with torch.no_grad():  # same weights and masks: the same logits (adapters start at B = 0)
        tokens, _, doc = data[0]
        ours = stage.output(stage(tokens, doc))
        theirs = hf_logits(tokens, doc)
        diff = max((ours - theirs).abs().max().item(), (ds_stage.output(ds_stage(tokens, doc)) - theirs).abs().max().item())
    if diff > 1e-3:
        raise SystemExit(f"puyu and HF logits differ by {diff:.2e} on the packed batch: not the same computation")

    n_train = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    print(f"flavor {a.flavor} ({args.num_params() / 1e6:.1f}M params), vocab {a.vocab}, batch {a.batch}×{a.seq_len} "
          f"packed chat rows (packing efficiency {stats.packing_efficiency:.1%}, masked {stats.masked_fraction:.1%}), "
          f"LoRA r={a.rank} (puyu {n_train(stage):,} / HF {n_train(hf):,} trainable), {a.steps - a.warmup} timed "
          f"steps in {a.rounds} alternating rounds, {a.threads} threads; logits max diff {diff:.1e}")
    tps = time_rounds({"fsdp": puyu_step, "deepspeed": ds_step, "hf": hf_step}, data, a.warmup, a.rounds)
    hf_tps = tps["hf"]
    print(f"HF LlamaForCausalLM + peft LoRA: {hf_tps:,.0f} tokens/s")
    for engine in ("fsdp", "deepspeed"):
        detail = f"ZeRO-{a.zero_stage}, " if engine == "deepspeed" else ""
        print(f"puyu engine={engine} (LoRA, {detail}fused ops{', plain loss' if a.plain_loss else ''}): "
              f"{tps[engine]:,.0f} tokens/s, {tps[engine] / hf_tps:.2f}x vs HF+peft")
    print(f"SFT tokens/s: {min(tps['fsdp'], tps['deepspeed']) / hf_tps:.2f}x vs HF+peft (goal 1.3x)")


def deepspeed_step(base, args, a):
    """The LoRA stage of ``base`` inside a DeepSpeed engine configured as ``engine=deepspeed`` jobs are,
    on one gloo rank; returns its step function and the stage."""
    import torch.distributed as dist

    from puyu.launcher.distributed import dist_env
    from puyu.parallel.deepspeed_engine import ds_config, import_deepspeed
    from puyu.parallel.finetune import SFTLoss, add_lora
    from puyu.parallel.ft_config import FinetuneJobConfig
    from puyu.parallel.ft_config import LoraConfig as PuyuLora
    from puyu.parallel.parallelize import StageModule

    cfg = FinetuneJobConfig(kind="finetune")
    cfg.train.global_batch = cfg.train.micro_batch = a.batch
    cfg.deepspeed.zero_stage = a.zero_stage
    device = torch.device("cpu")
    deepspeed = import_deepspeed(device)
    dist_env().export()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    stage = StageModule(add_lora(base, PuyuLora(rank=a.rank, alpha=2.0 * a.rank), seed=0),
                        list(range(args.n_layers)), first=True, last=True)
    opt = torch.optim.AdamW([p for p in stage.parameters() if p.requires_grad], lr=1e-4)
    loss = SFTLoss(stage)
    if a.zero_stage == 3:  # as the job does: the loss reads the head's weight outside output's forward
        from deepspeed.runtime.zero import register_external_parameter

        register_external_parameter(loss, stage.output.weight)
    engine, *_ = deepspeed.initialize(model=loss, optimizer=opt,
                                      config=ds_config(cfg, 1, device), dist_init_required=False)

    def step(tokens, labels, doc):
        loss_sum = engine(tokens, doc, labels)
        engine.backward(loss_sum / (labels != -100).sum(), scale_wrt_gas=False)
        engine.step()

    return step, stage


if __name__ == "__main__":
    main()
