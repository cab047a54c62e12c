"""``job.engine=deepspeed``: finetuning's step loop under DeepSpeed ZeRO 1/2/3 instead of FSDP2.

XTuner trains under DeepSpeed and names its setups ``deepspeed_zero{1,2,3}[_offload]``; the same presets
live in ``conf/job/deepspeed/`` and fill :class:`~puyu.parallel.ft_config.DeepSpeedConfig`, which
:func:`ds_config` turns into DeepSpeed's JSON in the shape of XTuner's files. Everything that decides the
numbers is the FSDP path's, so the engines train the same curve: the same model (the base with peft
adapters, an :class:`~puyu.parallel.parallelize.StageModule`), the same seeded adapter values, the same data
slicing, the same AdamW (passed to DeepSpeed, which shards its state), the same warmup + cosine learning
rate, the same global-norm clipping (DeepSpeed's ``gradient_clipping``, computed the same way) and the same
loss scaling: each micro-batch's summed cross-entropy times ``dp / labelled tokens of the global batch``,
with DeepSpeed's division by the accumulation steps turned off, as its average over the ranks leaves the
global token mean. The method's parts (SFT's or LoRA DPO's: batches, loss module, metrics) are the FSDP
loop's own (:class:`~puyu.parallel.finetune.SFTSteps`, :class:`~puyu.parallel.dpo.DPOSteps`); the engine
wraps their loss module. bf16 is autocast over fp32 weights, as the FSDP path's single-rank case (DeepSpeed's
own ``bf16`` section would keep bf16 weights and train other numbers).

Each rank builds the whole model on its device (the base read once per rank) and ``deepspeed.initialize``
partitions it: ZeRO-1/2 keep full weights per rank anyway, ZeRO-3 drops the other ranks' parts right
there, so the peak is one full copy per rank during setup. Checkpoints are DeepSpeed's own
(``save_checkpoint`` of the trainable parameters and their optimizer partitions, one folder per step in
``finetune/checkpoints``) with pretraining's ``complete.json`` written last, so a killed or requeued job
resumes from the newest complete one; the export reads the fp32 trainable weights back with DeepSpeed's
``zero_to_fp32`` (any stage, one process) and then goes through the FSDP path's merge and export.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from puyu.launcher.errors import PuyuError
from puyu.model import ModelArgs
from puyu.parallel import checkpoint
from puyu.parallel.device import backend, compute_dtype
from puyu.parallel.dims import ParallelDims
from puyu.parallel.finetune import (StepSums, base_values, meta_finetune_model, method_steps, read_base, run_mode,
                                    trainable_params)
from puyu.parallel.ft_config import FinetuneJobConfig
from puyu.parallel.meta_init import materialize, single_device_name
from puyu.parallel.metrics import MetricsLog, flops_per_token, mfu
from puyu.parallel.parallelize import StageModule, apply_ac
from puyu.parallel.pretrain import _all_reduce

log = logging.getLogger("puyu.finetune")


def import_deepspeed(device: torch.device):
    """``deepspeed`` for ``device``'s accelerator (``job.device=cpu`` on a GPU node means CPU), without
    the shared-memory all-reduce op, which DeepSpeed would compile with g++ at the first CPU run (~100 s)
    for a speed-up gloo does not need."""
    os.environ["DS_ACCELERATOR"] = "cpu" if device.type == "cpu" else device.type
    import deepspeed  # noqa: WPS433 - heavy; only jobs with engine=deepspeed pay for it

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    return deepspeed


def ds_config(cfg: FinetuneJobConfig, dp: int, device: torch.device) -> dict:
    """DeepSpeed's JSON config, shaped as XTuner's presets, with the batch and clipping of ``cfg``
    (offloaded states are pinned only when they travel to and from a GPU)."""
    t, z = cfg.train, cfg.deepspeed
    if t.global_batch % (t.micro_batch * dp):
        raise PuyuError(f"train.global_batch={t.global_batch} is not a multiple of train.micro_batch="
                        f"{t.micro_batch} × {dp} data-parallel ranks")
    zero: dict = {"stage": z.zero_stage, "overlap_comm": z.overlap_comm}
    if z.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
    if z.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
    return {"train_batch_size": t.global_batch, "train_micro_batch_size_per_gpu": t.micro_batch,
            "gradient_accumulation_steps": t.global_batch // (t.micro_batch * dp),
            "gradient_clipping": cfg.optim.grad_clip, "zero_optimization": zero,
            # puyu's AdamW (torch's, on the CPU copies when offloading): the update the FSDP path makes
            "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False,
            "steps_per_print": 1 << 30, "wall_clock_breakdown": False}


class EngineCheckpointer(checkpoint.Checkpointer):
    """Pretraining's checkpoint folders and ``complete.json`` (written last, by rank 0, after every rank
    saved; pruned to ``keep``) around DeepSpeed's own save of the trainable parameters and their optimizer
    partitions. ``save``'s ``parts``/``optimizers`` are ignored: the engine holds both."""

    def __init__(self, root: Path, keep: int, engine):
        super().__init__(root, keep, async_save=False)
        self.engine = engine

    def save(self, step, parts, optimizers, extra) -> Path:
        path, record = checkpoint.step_dir(self.root, step), {"step": step, **extra}
        self.engine.save_checkpoint(str(self.root), tag=path.name, save_latest=False, exclude_frozen_parameters=True)
        self._complete(path, record)
        return path


def _layout(cfg: FinetuneJobConfig) -> str:
    z = cfg.deepspeed
    offload = "+".join(k for k, on in (("optimizer", z.offload_optimizer), ("param", z.offload_param)) if on)
    return f"DeepSpeed ZeRO-{z.zero_stage}" + (f" (offload {offload} to CPU)" if offload else "")


def train(task, ctx, env, dims: ParallelDims, args: ModelArgs, device: torch.device, previous_handler) -> dict:
    """:meth:`FinetuneTask._train` for ``engine=deepspeed``: the same steps, metrics and result."""
    cfg, t = task.cfg, task.cfg.train
    deepspeed = import_deepspeed(device)
    if not dist.is_initialized():  # one rank: DeepSpeed still wants a process group (no port needed), and
        env.export()  # reads LOCAL_RANK from the environment
        dist.init_process_group(backend(device), store=dist.HashStore(), rank=0, world_size=1)
    model = meta_finetune_model(args, cfg.lora)
    trainable, total = trainable_params(model)
    stage = StageModule(model, list(range(args.n_layers)), first=True, last=True)
    apply_ac(stage, cfg.parallel.activation_checkpointing)
    stage.autocast_dtype = compute_dtype(cfg.precision, device)
    materialize([stage], args, device, base_values(read_base(cfg.checkpoint, args)[1], t.seed))
    # (DPO here is LoRA only, ft_config: its reference is the stage with its adapters off, so no mesh)
    method = method_steps(ctx, cfg, args, dims, None, device)
    loss_module = method.loss_module(stage)
    if cfg.deepspeed.zero_stage == 3:  # the loss reads the head's weight outside output's own forward
        from deepspeed.runtime.zero import register_external_parameter

        register_external_parameter(loss_module, stage.output.weight)
    # DeepSpeed keeps a clone of the world group per process; a job run before this one in the same
    # process (inline, tests) destroyed the group it cloned
    deepspeed.utils.groups._WORLD_GROUP = None
    engine, *_ = deepspeed.initialize(model=loss_module, optimizer=task._optimizer(stage),
                                      config=ds_config(cfg, dims.dp, device), dist_init_required=False)

    def backward(scaled: torch.Tensor) -> None:
        engine.backward(scaled, scale_wrt_gas=False)  # (the scale already makes the global mean)
        engine.step()  # the update (clipped) happens at the last micro-batch of the step
    ckpt_root = ctx.stage_dir / "checkpoints"
    checkpointer = EngineCheckpointer(ckpt_root, t.keep_checkpoints, engine)
    start_step, consumed = 0, 0
    latest = checkpoint.latest_complete(ckpt_root)
    if latest is not None:
        engine.load_checkpoint(str(ckpt_root), tag=latest.name, load_module_strict=False,
                               load_optimizer_states=True, load_lr_scheduler_states=False)
        record = json.loads((latest / checkpoint.COMPLETE).read_text())
        start_step, consumed = record["step"], record["consumed_samples"]
        log.info("resumed from %s (step %d)", latest, start_step)
    batches = method.batches(env.rank, consumed)
    metrics = (MetricsLog(ctx.stage_dir, start_step, progress=ctx.progress("steps", t.steps, done=start_step))
               if env.rank == 0 else None)
    flops = flops_per_token(args, cfg.data.seq_len, method.flops_factor(trainable == total))
    last = StepSums(float("nan"), 0, 0)
    for step in range(start_step, t.steps):
        if bool(_all_reduce(torch.tensor([float(task._signalled)], device=device), dist.ReduceOp.MAX).item()):
            task._stop_for_requeue(checkpointer, step, [], [], batches, env, previous_handler)
        lr = cfg.optim.lr_at(step, t.steps)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        started = time.perf_counter()
        sums = method.forward_backward(engine, batches.next_step(), backward)
        loss = sums.loss
        grad_norm = float(engine.get_global_grad_norm() or 0.0)
        if not math.isfinite(loss) or not math.isfinite(grad_norm):  # DeepSpeed has dropped the update
            if t.nan_policy == "stop":
                raise PuyuError(f"step {step + 1}: loss {loss} / grad norm {grad_norm} is not finite "
                                f"(train.nan_policy=stop; set skip to drop such steps)")
            log.warning("step %d: non-finite loss %s, update skipped (train.nan_policy=skip)", step + 1, loss)
            continue
        last = sums
        tokens_per_s = sums.tokens / (time.perf_counter() - started)
        if metrics:
            metrics.log({"step": step + 1, "loss": loss, "grad_norm": grad_norm, "lr": lr, **sums.metrics,
                         "tokens_per_s": tokens_per_s, "trained_tokens": sums.trained_tokens,
                         "mfu": mfu(tokens_per_s, flops, t.peak_tflops, dims.world_size)})
        if (step + 1) % t.checkpoint_every == 0 or step + 1 == t.steps:
            checkpointer.save(step + 1, [], [], {"consumed_samples": batches.consumed_samples})
        task.on_step_end(step + 1)
    if metrics:
        metrics.close()
    return {"steps": t.steps, "final_loss": last.loss, "layout": f"world {dims.world_size}, {_layout(cfg)}",
            "trainable_params": trainable, "total_params": total, "mode": run_mode(cfg), **method.result(last)}


def load_final(path: Path, model: nn.Module, args: ModelArgs) -> None:
    """Put a checkpoint's trainable weights (fp32, gathered from every rank's partitions by DeepSpeed's
    ``zero_to_fp32``, in this one process) into ``model`` (the base with fresh adapters)."""
    import_deepspeed(torch.device("cpu"))
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    saved = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name, exclude_frozen_parameters=True)
    weights = {single_device_name(name.removeprefix("stage."), args): w for name, w in saved.items()}
    missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in weights]
    unexpected = sorted(set(weights) - {n for n, _ in model.named_parameters()})
    if missing or unexpected:
        raise PuyuError(f"{path}: the DeepSpeed checkpoint does not fit the model (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
    model.load_state_dict(weights, strict=False)
