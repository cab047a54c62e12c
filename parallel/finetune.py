"""``puyu job=finetune``: XTuner-style supervised finetuning (full or LoRA) of a puyu checkpoint.

Two stages. ``sft_data`` (one task) reads the chat jsonl (and/or builds conversations from the
Wikipedia package), renders and masks them with the InternLM2 template and packs them into
``seq_len`` rows with document ids (:mod:`puyu.data_pipeline.sft`) → ``<run>/sft_data/train.npz``
(+ ``heldout.npz``). ``finetune`` (1..N processes) is pretraining's task with another data source,
model and loss: it builds the base model on the meta device, adds LoRA adapters with ``peft``
(``inject_adapter_in_model`` on the blocks' ``nn.Linear``s, base frozen) or trains every weight,
wraps it as pretraining's :class:`~puyu.parallel.parallelize.StageModule` (given ``document_ids``, so packed
conversations attend only within themselves and positions restart), shards it with pretraining's
FSDP2 (+ activation checkpointing / compile), then materialises each rank's shards from the base
weights in ``checkpoint`` read tensor by tensor (:func:`read_base`; adapters seeded per name, see
:mod:`puyu.parallel.meta_init`), and runs the same step loop machinery: warmup + cosine
AdamW, global grad-norm clipping, NaN policy, ``metrics.jsonl``/TensorBoard, DCP checkpoints with
``complete.json`` and resume, USR2 → checkpoint + requeue. Checkpoints hold only the trainable
parameters (the adapters) and their optimizer state; the frozen base comes from ``checkpoint`` again.
``engine=deepspeed`` runs the same model, data, loss and schedule under DeepSpeed ZeRO instead of FSDP2
(:mod:`puyu.parallel.deepspeed_engine`, dispatched from :meth:`FinetuneTask._train` and ``_export``).

``method=dpo`` swaps the data stage for ``dpo_data`` (preference pairs) and the loss for trl's DPO loss
against a reference model (:mod:`puyu.parallel.dpo`); the rest is this module's.

The loss is the mean cross-entropy over the *global batch's* labelled tokens (each micro-batch's
sum divided by the step's total label count, all-reduced), so the curve does not depend on how
rows are split over ranks and micro-batches. At the end rank 0 merges the adapters into the base
weights (``W + alpha/r · B A``, peft's ``merge``), exports the merged model as the base came in (a
Hugging Face directory with its tokenizer, in the base's layout, or a plain puyu model dir as pretraining
exports; ``job=build_engine`` takes either), scores the held-out conversations' masked loss
with the base and the merged model, and writes ``finetune/report.md``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from submitit.helpers import DelayedSubmission

from puyu.launcher.atomic import atomic_write_text
from puyu.launcher.errors import PuyuError
from puyu.launcher.stage import Stage, TaskContext
from puyu.model import ModelArgs, Transformer, ops, save_model
from puyu.model.checkpoint import INDEX_FILE, SINGLE_FILE
from puyu.model.hf import copy_tokenizer_files, export_hf, is_hf_model_dir, open_model_dir, read_hf_config
from puyu.model.state_dict import StateDictError
from puyu.parallel import checkpoint
from puyu.parallel.data import StepBatches
from puyu.parallel.device import check_device, check_precision, compute_dtype
from puyu.parallel.dims import ParallelDims
from puyu.parallel.ft_config import FinetuneJobConfig, LoraConfig
from puyu.parallel.meta_init import FullValue, materialize, meta_model, seeded_full
from puyu.parallel.metrics import MetricsLog, flops_per_token, mfu
from puyu.parallel.parallelize import StageModule, apply_ac, apply_compile, apply_precision, check_parallel_config
from puyu.parallel.pretrain import PretrainTask, _all_reduce

log = logging.getLogger("puyu.finetune")
IGNORE = -100
SFT_DATA = "sft_data"  # the data stage's folder in the run


def check_checkpoint(path: str) -> Path:
    p = Path(path)
    if not is_hf_model_dir(p) and not (p / SINGLE_FILE).is_file() and not (p / INDEX_FILE).is_file():
        raise PuyuError(f"checkpoint {path}: neither a Hugging Face model directory (config.json) nor a puyu "
                        f"model dir (model.safetensors or its index) as pretraining exports it (<run>/pretrain/model)")
    return p


def read_base(path: str, args: ModelArgs) -> tuple[ModelArgs, Mapping[str, torch.Tensor]]:
    """The base model to finetune: its shapes and its weights by puyu name (read as they are used, so a
    rank holds only its shards; :func:`puyu.model.hf.open_model_dir`).

    The one place finetuning reads the base (training, export and the report's "before" loss all come
    through here). A Hugging Face model directory's ``config.json`` gives the shapes; a puyu model dir
    (what pretraining exports) holds none, so they are ``args`` (``job.model``), checked against the
    tensors' (one error naming every missing, unexpected or mis-shaped one).
    """
    try:
        return open_model_dir(check_checkpoint(path), args)
    except StateDictError as exc:
        fix = "its config.json" if is_hf_model_dir(path) else "model.flavor / vocab_size / n_layers"
        raise PuyuError(f"checkpoint {path} does not fit the configured model ({fix}): "
                        f"{' '.join(str(exc).split())[:300]}") from exc


def add_lora(model: torch.nn.Module, lora: LoraConfig, seed: int = 0) -> torch.nn.Module:
    """Freeze ``model`` and add peft LoRA adapters to the target linears (B = 0: the output is unchanged).

    On a real model peft draws A under ``seed``; on a meta model it draws nothing (shapes only) and
    :func:`base_values` gives the adapters their values when the shards are materialised.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(seed)  # the same adapters on every rank
    return inject_adapter_in_model(PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                  target_modules=list(lora.targets)), model)


def merge_lora(model: torch.nn.Module) -> torch.nn.Module:
    """Fold every adapter into its base weight (peft's ``merge``) and put the plain ``nn.Linear`` back."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge(safe_merge=True)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.get_base_layer())
    return model


def meta_finetune_model(args: ModelArgs, lora: LoraConfig) -> Transformer:
    """The model to finetune on the meta device: the base, with frozen weights and adapters if LoRA."""
    model = meta_model(args)
    return add_lora(model, lora) if lora.rank else model


def base_values(weights: Mapping[str, torch.Tensor], seed: int) -> FullValue:
    """Full values for :func:`~puyu.parallel.meta_init.materialize`: the base's weights (a LoRA-wrapped
    linear's weight under its plain name), and new adapters as peft's default draws them (A
    Kaiming-uniform, seeded per name; B zeros, so the adapted model starts as the base)."""

    def full_value(name: str, p: torch.Tensor) -> torch.Tensor:
        if ".lora_B." in name:
            return torch.zeros(p.shape, dtype=p.dtype, device=p.device)
        if ".lora_A." in name:
            return seeded_full(seed, name, p, lambda full: torch.nn.init.kaiming_uniform_(full, a=math.sqrt(5)))
        return weights[name.replace(".base_layer.", ".")]

    return full_value


def load_base(path: str, args: ModelArgs, lora: Optional[LoraConfig] = None) -> Transformer:
    """The whole base model in this process (export and evaluation on rank 0), with fresh adapters if LoRA."""
    args, weights = read_base(path, args)
    model = meta_finetune_model(args, lora or LoraConfig(rank=0))
    materialize([model], args, torch.device("cpu"), base_values(weights, 0))
    return model


def trainable_params(model: torch.nn.Module) -> tuple[int, int]:
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# --------------------------------------------------------------------------- checkpoints of the trainable part
def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=True, ignore_frozen_params=True)


def _trainable_state(parts, optimizers) -> dict[str, dict]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = {}, {}
    for part, opt in zip(parts, optimizers):
        m, o = get_state_dict(part, opt, options=_options())
        model_sd.update(m)
        optim_sd.update(o)
    return {"model": model_sd, "optim": optim_sd}


class TrainableCheckpointer(checkpoint.Checkpointer):
    """Pretraining's checkpointer (DCP shards, ``complete.json`` last, async, pruning) over the
    trainable parameters only: with LoRA a checkpoint is the adapters and their optimizer state."""

    def state(self, parts, optimizers) -> dict:
        return _trainable_state(parts, optimizers)


def load_trainable(path: Path, parts, optimizers=None) -> dict:
    """Load a :class:`TrainableCheckpointer` checkpoint into ``parts`` (+ optimizers); returns its record."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, set_model_state_dict,
                                                         set_state_dict)

    record = json.loads((Path(path) / checkpoint.COMPLETE).read_text())
    options = dataclasses.replace(_options(), strict=False)
    if optimizers is None:
        for part in parts:
            sd = get_model_state_dict(part, options=_options())
            dcp.load({"model": sd}, checkpoint_id=str(path))
            set_model_state_dict(part, sd, options=options)
    else:
        state = _trainable_state(parts, optimizers)
        dcp.load(state, checkpoint_id=str(path))
        for part, opt in zip(parts, optimizers):
            set_state_dict(part, opt, model_state_dict=state["model"], optim_state_dict=state["optim"],
                           options=options)
    log.info("resumed from %s (step %d)", path, record["step"])
    return record


# --------------------------------------------------------------------------- data
@dataclasses.dataclass
class SFTBatch:
    tokens: torch.Tensor  # [micro_batch, seq_len]
    labels: torch.Tensor  # [micro_batch, seq_len], IGNORE where no loss
    document_ids: torch.Tensor  # [micro_batch, seq_len]


class SFTBatches(StepBatches):
    """Pretraining's step slicing (global sample ``s·G + i``; rank ``r`` takes its contiguous share;
    state = consumed samples) over the packed rows, reshuffled each epoch with ``seed + epoch``."""

    def __init__(self, packed, global_batch, micro_batch, dp_rank, dp_size, consumed_samples=0, seed=0):
        super().__init__(packed, global_batch, micro_batch, dp_rank, dp_size, consumed_samples)
        self.seed, self._perms = seed, {}
        self.rows = len(packed.tokens)

    def _row(self, sample: int) -> int:
        epoch, i = divmod(sample, self.rows)
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng(self.seed + epoch).permutation(self.rows)}
        return int(self._perms[epoch][i])

    def next_step(self) -> list[SFTBatch]:
        per_rank = self.global_batch // self.dp_size
        first = self.consumed_samples + self.dp_rank * per_rank
        rows = [self._row(first + i) for i in range(per_rank)]
        self.consumed_samples += self.global_batch
        d = self.dataset
        return [SFTBatch(*(torch.from_numpy(a[rows[m:m + self.micro_batch]]).long()
                           for a in (d.tokens, d.labels, d.document_ids)))
                for m in range(0, per_rank, self.micro_batch)]


def load_sft_rows(ctx: TaskContext, cfg: FinetuneJobConfig):
    """The ``sft_data`` stage's packed training rows, checked against ``data.seq_len``."""
    from puyu.data_pipeline.sft import Packed

    data = Packed.load(ctx.run_dir / SFT_DATA / "train.npz")
    if data.tokens.shape[1] != cfg.data.seq_len:
        raise PuyuError(f"sft_data rows are {data.tokens.shape[1]} long but data.seq_len={cfg.data.seq_len}")
    return data


def run_mode(cfg: FinetuneJobConfig) -> str:
    """What trains, for the result and the report."""
    if cfg.lora.rank:
        kind = "QLoRA (NF4 base)" if cfg.lora.quant == "nf4" else "LoRA"
        return f"{kind} r={cfg.lora.rank} alpha={cfg.lora.alpha} on {','.join(cfg.lora.targets)}"
    return "full finetuning"


def build_stage(cfg: FinetuneJobConfig, args: ModelArgs, dims: ParallelDims, mesh, device,
                frozen: bool = False) -> tuple[StageModule, int, int, dict]:
    """This rank's model to train: the base (+ LoRA adapters per ``cfg.lora``) as one FSDP-sharded
    :class:`StageModule` (activation checkpointing, compile, precision as configured), built on meta and
    sharded there, then each rank reads its own shards of the base; NF4 base under ``lora.quant=nf4``.
    ``frozen``: the plain base with every weight frozen (DPO's reference under full finetuning).
    Returns the stage, its trainable and total parameter counts and QLoRA's sizes (or ``{}``)."""
    lora = LoraConfig(rank=0) if frozen else cfg.lora
    model = meta_finetune_model(args, lora)
    if frozen:
        model.requires_grad_(False)
    trainable, total = trainable_params(model)
    stage = StageModule(model, list(range(args.n_layers)), first=True, last=True)
    apply_ac(stage, cfg.parallel.activation_checkpointing)
    if cfg.parallel.compile:
        apply_compile(stage)
    apply_precision(stage, dims, mesh, compute_dtype(cfg.precision, device), False)
    materialize([stage], args, device, base_values(read_base(cfg.checkpoint, args)[1], cfg.train.seed))
    quantized = {}
    if lora.quant == "nf4":
        if dims.world_size > 1:  # FSDP would shard the packed 4-bit weights it cannot gather
            raise PuyuError(f"lora.quant=nf4 (QLoRA) runs in one process; this job has {dims.world_size} "
                            "(set cluster.nodes=1 cluster.tasks_per_node=1, or lora.quant=none)")
        from puyu.parallel.qlora import quantize_frozen_base

        quantized = quantize_frozen_base(stage, compute_dtype(cfg.precision, device))
    return stage, trainable, total, quantized


# --------------------------------------------------------------------------- stages
def _with_in_run(cfg: FinetuneJobConfig, in_run: dict[str, str], run_dir: Path) -> FinetuneJobConfig:
    changes = {field: str(run_dir / rel) for field, rel in in_run.items()}
    return dataclasses.replace(cfg, **changes) if changes else cfg


class SFTDataTask:
    """The ``sft_data`` stage: chat jsonl → packed, masked rows (``train.npz``, ``heldout.npz``)."""

    def __init__(self, cfg: FinetuneJobConfig, in_run: Optional[dict[str, str]] = None):
        self.cfg, self.in_run = cfg, dict(in_run or {})

    def __call__(self, ctx: TaskContext) -> dict:
        from puyu.data_pipeline.sft import prepare

        cfg = _with_in_run(self.cfg, self.in_run, ctx.run_dir)
        d = cfg.data
        vocab = read_base(cfg.checkpoint, cfg.model.args())[0].vocab_size  # the checkpoint's (HF: config.json)
        return prepare(ctx.stage_dir, cfg.tokenizer or cfg.checkpoint, d.paths, d.eval_paths, d.seq_len, d.overlong,
                       d.wiki, d.wiki_heldout, vocab_size=vocab)


class SFTLoss(torch.nn.Module):
    """The SFT stage with its loss as one forward (``tokens, document_ids, labels -> summed loss``): what
    the step loop calls, and the module a DeepSpeed engine wraps."""

    def __init__(self, stage: StageModule):
        super().__init__()
        self.stage = stage

    def forward(self, tokens, document_ids, labels):
        return self.stage.loss_sum(self.stage(tokens, document_ids), labels)


@dataclasses.dataclass
class StepSums:
    """One step's outcome, summed over the data-parallel ranks: the loss (a global mean), labelled and
    all tokens, and the method's own metrics (means over the global batch)."""

    loss: float
    trained_tokens: int
    tokens: int
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)


class SFTSteps:
    """What ``method=sft`` plugs into :meth:`FinetuneTask._train`'s step loop: packed rows, and the mean
    cross-entropy over the global batch's labelled tokens."""

    def __init__(self, ctx: TaskContext, cfg: FinetuneJobConfig, dims: ParallelDims, device: torch.device):
        self.cfg, self.dims, self.device = cfg, dims, device
        self.data = load_sft_rows(ctx, cfg)

    def batches(self, rank: int, consumed: int) -> SFTBatches:
        t = self.cfg.train
        return SFTBatches(self.data, t.global_batch, t.micro_batch, self.dims.dp_rank(rank), self.dims.dp, consumed,
                          self.cfg.data.seed)

    @staticmethod
    def flops_factor(full: bool) -> float:
        """Forward 2N + input gradients 2N (+ weight gradients 2N when every weight trains), per token."""
        return 6.0 if full else 4.0

    @staticmethod
    def loss_module(stage: StageModule) -> torch.nn.Module:
        return SFTLoss(stage)

    def forward_backward(self, loss: torch.nn.Module, micro: list[SFTBatch], backward) -> StepSums:
        """``loss``: :meth:`loss_module`'s module (or a DeepSpeed engine around it); ``backward(scaled)``
        runs the backward of one micro-batch's scaled loss (and DeepSpeed's step)."""
        device, dp = self.device, self.dims.dp
        n_labels = _all_reduce(torch.tensor([float(sum(int((b.labels != IGNORE).sum()) for b in micro))],
                                            device=device)).item()
        total_loss = torch.zeros((), device=device)
        for b in micro:  # (the stage applies the precision policy itself: see apply_precision)
            loss_sum = loss(b.tokens.to(device), b.document_ids.to(device), b.labels.to(device))
            # FSDP and DeepSpeed average gradients over the dp ranks: scale so they sum to the global token mean
            backward(loss_sum * (dp / max(n_labels, 1.0)))
            total_loss += loss_sum.detach()
        loss = _all_reduce(total_loss.reshape(1).clone()).item() / max(n_labels, 1.0)
        return StepSums(loss, int(n_labels), self.cfg.train.global_batch * self.cfg.data.seq_len)

    @staticmethod
    def result(last: StepSums) -> dict:
        return {}


def method_steps(ctx: TaskContext, cfg: FinetuneJobConfig, args: ModelArgs, dims: ParallelDims, mesh,
                 device: torch.device):
    """The step loop's parts for ``cfg.method`` (both engines' loops take them), built after the policy stage."""
    if cfg.method == "dpo":
        from puyu.parallel.dpo import DPOSteps

        return DPOSteps(ctx, cfg, args, dims, mesh, device)
    return SFTSteps(ctx, cfg, dims, device)


class FinetuneTask(PretrainTask):
    """The training process of one rank; pretraining's task (process group, mesh, signals, requeue,
    clipping, collective timeouts) with the SFT data, model, loss and export."""

    def __init__(self, cfg: FinetuneJobConfig, in_run: Optional[dict[str, str]] = None):
        super().__init__(cfg)
        self.in_run = dict(in_run or {})

    def checkpoint(self, ctx: TaskContext) -> DelayedSubmission:
        return DelayedSubmission(type(self)(self.cfg, self.in_run), ctx)

    def _in_run(self, ctx: TaskContext) -> FinetuneJobConfig:
        cfg = _with_in_run(self.cfg, self.in_run, ctx.run_dir)
        cfg.validate(in_run=False)
        check_checkpoint(cfg.checkpoint)
        data = "dpo_data" if cfg.method == "dpo" else SFT_DATA
        if not (ctx.run_dir / data / "train.npz").is_file():
            raise PuyuError(f"{ctx.run_dir / data / 'train.npz'} not found: the {data} stage has not run")
        return cfg

    def model_args(self) -> ModelArgs:
        """The base model's shapes (checked against its weights before any process group starts)."""
        return read_base(self.cfg.checkpoint, self.cfg.model.args())[0]

    def on_step_end(self, step: int) -> None:
        """Called after each finished step (tests hook in here)."""

    def _train(self, ctx, env, dims: ParallelDims, args: ModelArgs, mesh, device, previous_handler) -> dict:
        cfg, t = self.cfg, self.cfg.train
        if dims.tp != 1 or dims.pp != 1:
            raise PuyuError(f"finetune runs data parallel only (FSDP/HSDP); got {dims.describe()}")
        if cfg.engine == "deepspeed":
            from puyu.parallel import deepspeed_engine

            return deepspeed_engine.train(self, ctx, env, dims, args, device, previous_handler)
        stage, trainable, total, quantized = build_stage(cfg, args, dims, mesh, device)
        method = method_steps(ctx, cfg, args, dims, mesh, device)
        loss = method.loss_module(stage)
        stages = [stage]
        params = [q for q in stage.parameters() if q.requires_grad]
        optimizers = [self._optimizer(stage)]
        ckpt_root = ctx.stage_dir / "checkpoints"
        checkpointer = TrainableCheckpointer(ckpt_root, t.keep_checkpoints, t.async_checkpoint)
        start_step, consumed = 0, 0
        latest = checkpoint.latest_complete(ckpt_root)
        if latest is not None:
            record = load_trainable(latest, stages, optimizers)
            start_step, consumed = record["step"], record["consumed_samples"]
        batches = method.batches(env.rank, consumed)
        metrics = (MetricsLog(ctx.stage_dir, start_step, progress=ctx.progress("steps", t.steps, done=start_step))
                   if env.rank == 0 else None)
        flops = flops_per_token(args, cfg.data.seq_len, method.flops_factor(trainable == total))
        last = StepSums(float("nan"), 0, 0)
        for step in range(start_step, t.steps):
            if bool(_all_reduce(torch.tensor([float(self._signalled)], device=device), dist.ReduceOp.MAX).item()):
                self._stop_for_requeue(checkpointer, step, stages, optimizers, batches, env, previous_handler)
            lr = cfg.optim.lr_at(step, t.steps)
            for group in optimizers[0].param_groups:
                group["lr"] = lr
            started = time.perf_counter()
            sums = method.forward_backward(loss, batches.next_step(), torch.Tensor.backward)
            grad_norm = self._clip(params, mesh, dims)
            if not self._step_optimizers(optimizers, step, sums.loss, grad_norm, t.nan_policy):
                continue
            last = sums
            tokens_per_s = sums.tokens / (time.perf_counter() - started)
            if metrics:
                metrics.log({"step": step + 1, "loss": sums.loss, "grad_norm": grad_norm, "lr": lr, **sums.metrics,
                             "tokens_per_s": tokens_per_s, "trained_tokens": sums.trained_tokens,
                             "mfu": mfu(tokens_per_s, flops, t.peak_tflops, dims.world_size)})
            if (step + 1) % t.checkpoint_every == 0 or step + 1 == t.steps:
                checkpointer.save(step + 1, stages, optimizers, {"consumed_samples": batches.consumed_samples})
            self.on_step_end(step + 1)
        checkpointer.wait()
        if metrics:
            metrics.close()
        return {"steps": t.steps, "final_loss": last.loss, "layout": dims.describe(),
                "trainable_params": trainable, "total_params": total, "mode": run_mode(cfg), **quantized,
                **method.result(last)}

    def __call__(self, ctx: TaskContext) -> dict[str, Any]:
        result = super().__call__(ctx)
        if self._rank() == 0:
            report = finetune_report(ctx.run_dir, result)
            atomic_write_text(ctx.stage_dir / "report.md", "# Finetuning\n\n" + report + "\n")
            result["report"] = str(ctx.stage_dir / "report.md")
        return result

    @staticmethod
    def _rank() -> int:
        from puyu.launcher.distributed import dist_env

        return dist_env().rank

    def _export(self, ctx: TaskContext, args: ModelArgs) -> dict[str, Any]:
        """Rank 0: base + final trainable weights → merged plain model dir; held-out loss before/after."""
        cfg = self.cfg
        final = checkpoint.latest_complete(ctx.stage_dir / "checkpoints")
        model = load_base(cfg.checkpoint, args, cfg.lora)
        if cfg.lora.quant == "nf4":  # merge into the base the adapters were trained on
            from puyu.parallel.qlora import round_trip_nf4

            round_trip_nf4(model)
        if cfg.engine == "deepspeed":
            from puyu.parallel.deepspeed_engine import load_final

            load_final(final, model, args)
        else:
            load_trainable(final, [model])
        merged = merge_lora(model).eval()
        out = ctx.stage_dir / "model"
        if is_hf_model_dir(cfg.checkpoint):  # what came in as a Hugging Face directory goes out as one
            family = "internlm2" if read_hf_config(cfg.checkpoint)["model_type"] == "internlm2" else "llama"
            export_hf(merged, out, family)
            copy_tokenizer_files(cfg.tokenizer or cfg.checkpoint, out)
        else:
            save_model(merged, out)
        result: dict[str, Any] = {"model": str(out)}
        heldout = ctx.run_dir / SFT_DATA / "heldout.npz"
        if cfg.method == "dpo":
            from puyu.parallel import dpo

            if (ctx.run_dir / dpo.DPO_DATA / "heldout.npz").is_file():
                pairs = dpo.load_pairs(ctx.run_dir, cfg, "heldout.npz")
                result["heldout"] = dpo.heldout_metrics(merged, load_base(cfg.checkpoint, args).eval(), pairs,
                                                        cfg.dpo, cfg.eval_rows)
        elif heldout.is_file():
            from puyu.data_pipeline.sft import Packed

            rows = Packed.load(heldout)
            result["heldout_loss_after"] = masked_loss(merged, rows, cfg.eval_rows)
            result["heldout_loss_before"] = masked_loss(load_base(cfg.checkpoint, args).eval(), rows, cfg.eval_rows)
        return result


@torch.no_grad()
def masked_loss(model: Transformer, packed, max_rows: int = 0, batch: int = 8) -> float:
    """Mean cross-entropy over the labelled tokens of (the first ``max_rows``) packed rows."""
    n = len(packed.tokens) if not max_rows else min(max_rows, len(packed.tokens))
    total, count = 0.0, 0
    for s in range(0, n, batch):
        tok, lab, doc = (torch.from_numpy(a[s:min(n, s + batch)]).long()
                         for a in (packed.tokens, packed.labels, packed.document_ids))
        h = model.hidden_states(tok, document_ids=doc)
        total += float(ops.linear_cross_entropy(h.flatten(0, 1), model.output.weight, lab.flatten(),
                                                reduction="sum", fused=model.args.fused_ops))
        count += int((lab != IGNORE).sum())
    return total / max(count, 1)


def finetune_stages(cfg: FinetuneJobConfig, in_run: Optional[dict[str, str]] = None,
                    cluster: Optional[dict] = None) -> list[Stage]:
    """``sft_data`` then ``finetune``. ``in_run`` maps config fields (``checkpoint``, ``tokenizer``) to paths
    inside the run directory (pipeline use: they exist only once earlier stages ran)."""
    in_run = dict(in_run or {})
    cfg.validate(in_run=bool(in_run))
    check_device(cfg.device)
    check_precision(cfg.precision)
    check_parallel_config(cfg.parallel)
    if "checkpoint" not in in_run:
        check_checkpoint(cfg.checkpoint)
    if "tokenizer" not in in_run and cfg.tokenizer and not Path(cfg.tokenizer).exists():
        raise PuyuError(f"job.tokenizer: {cfg.tokenizer} not found")
    if cfg.method == "dpo":
        from puyu.parallel.dpo import DPO_DATA, DPODataTask

        data = Stage(DPO_DATA, DPODataTask(cfg, in_run))
    else:
        data = Stage(SFT_DATA, SFTDataTask(cfg, in_run))
    return [data, Stage("finetune", FinetuneTask(cfg, in_run), cluster=dict(cluster or {}))]


def finetune_report(run_dir: Path, result: dict) -> str:
    """Markdown: mode, data (packing, masking), loss curve, throughput, held-out loss, the export."""
    if result.get("method") == "dpo":
        from puyu.parallel.dpo import dpo_report

        return dpo_report(run_dir, result)
    data = json.loads((run_dir / SFT_DATA / "train.json").read_text())
    records = [json.loads(ln) for ln in (run_dir / "finetune" / "metrics.jsonl").read_text().splitlines()]
    every = max(1, len(records) // 10)
    shown = records[::every] + ([records[-1]] if (len(records) - 1) % every else [])
    timed = [r["tokens_per_s"] for r in records[1:]] or [r["tokens_per_s"] for r in records]
    lines = [f"Mode: {result['mode']}; trainable parameters {result['trainable_params']:,} of "
             f"{result['total_params']:,} ({result['trainable_params'] / result['total_params']:.2%}); "
             f"layout: {result['layout']}.", "",
             f"Data: {data['conversations']} conversations → {data['rows']} packed rows of {data['seq_len']} tokens "
             f"(packing efficiency {data['packing_efficiency']:.1%}; {data['truncated']} truncated, "
             f"{data['dropped']} dropped); masked (no-loss) share of real tokens {data['masked_fraction']:.1%}.", "",
             f"Loss: {records[0]['loss']:.4f} at step 1 → {result['final_loss']:.4f} at step {result['steps']} "
             f"(min {min(r['loss'] for r in records):.4f}); mean {sum(timed) / len(timed):,.0f} tokens/s "
             f"(positions incl. padding; steps after the first).", ""]
    if "heldout_loss_after" in result:
        lines += [f"Held-out masked loss: {result['heldout_loss_before']:.4f} (base) → "
                  f"{result['heldout_loss_after']:.4f} (finetuned, merged).", ""]
    if result.get("model"):
        form = ("a Hugging Face directory with its tokenizer" if (Path(result["model"]) / "config.json").is_file()
                else "plain puyu safetensors")
        lines += [f"Merged model exported to `{result['model']}` ({form}; `job=build_engine` takes it).", ""]
    lines += ["| step | loss | grad norm | lr | trained tokens | tokens/s |", "|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['step']} | {r['loss']:.4f} | {r['grad_norm']:.3f} | {r['lr']:.2e} | {r['trained_tokens']} | "
              f"{r['tokens_per_s']:.0f} |" for r in shown]
    return "\n".join(lines)


def write_report(cfg: FinetuneJobConfig, run_dir: Path, results: dict[str, list]) -> Path:
    """``finetune/report.md`` (written by the task's rank 0) for ``puyu job=finetune``."""
    return run_dir / "finetune" / "report.md"
