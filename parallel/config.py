"""Configuration of ``puyu job=pretrain``: plain dataclasses, registered in Hydra's ConfigStore.

Kept free of torch imports so the ``puyu`` command composes and checks configs quickly.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

from puyu.launcher.config import JobConfig
from puyu.launcher.errors import PuyuError


@dataclasses.dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = -1  # -1: the rest of the world
    pp_schedule: str = "1F1B"  # 1F1B | GPipe | Interleaved1F1B | InterleavedZeroBubble
    pp_virtual_stages: int = 1  # stages per pipeline rank (the Interleaved schedules need > 1)
    sequence_parallel: bool = True  # with tp > 1: norms and residual stream sharded on the sequence
    vocab_parallel: bool = True  # with tp > 1: embedding and head sharded on the vocabulary, loss_parallel
    activation_checkpointing: str = "none"  # none | full | attention | every_<N> (every N-th block)
    compile: bool = False


@dataclasses.dataclass
class PretrainDataConfig:
    # .bin/.idx prefixes (path without extension); a folder stands for every *.idx prefix in it
    paths: list[str] = dataclasses.field(default_factory=list)
    weights: Optional[list[float]] = None  # blend weights, one per path; None = by size
    seq_len: int = 128
    seed: int = 1234
    eod_token: int = 0  # the tokenizer's end-of-document id
    cache_dir: Optional[str] = None  # megatron's index cache; default <first path's folder>/cache


@dataclasses.dataclass
class ModelConfig:
    flavor: str = "tiny"
    vocab_size: int = 0  # 0: the flavor's; set it to the data stage's tokenizer size
    n_layers: int = 0  # 0: the flavor's
    fused_ops: bool = True

    def args(self):
        """The ModelArgs of this flavor with the overrides applied."""
        from puyu.model import get_flavor

        changes = {"fused_ops": self.fused_ops}
        if self.vocab_size:
            changes["vocab_size"] = self.vocab_size
        if self.n_layers:
            changes["n_layers"] = self.n_layers
        try:
            return get_flavor(self.flavor, **changes)
        except (KeyError, ValueError) as exc:
            raise PuyuError(f"model: {exc}") from exc


@dataclasses.dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping

    def lr_at(self, step: int, total: int) -> float:
        """Linear warmup to ``lr``, then cosine down to ``min_lr`` at ``total`` steps."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, total - self.warmup_steps))
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * progress))


@dataclasses.dataclass
class TrainConfig:
    steps: int = 50
    global_batch: int = 8  # sequences per optimizer step, over all data-parallel ranks
    micro_batch: int = 2
    seed: int = 0
    checkpoint_every: int = 25
    keep_checkpoints: int = 2
    async_checkpoint: bool = True  # write checkpoints in the background while training goes on
    nan_policy: str = "stop"  # stop: fail naming the step | skip: drop that step's update
    collective_timeout_s: int = 600
    peak_tflops: Optional[float] = None  # per device, for MFU (e.g. 989 for H100/H200 bf16 dense)
    threads: int = 0  # torch intra-op threads per process; 0 = torch's default
    export: bool = True  # write the final model as single-device safetensors (for serving)
    # step each parameter as soon as its gradient is ready and free that gradient (torchtitan's
    # early_step_in_backward): a rank never holds all its gradients at once. Needs grad_clip=0 (no global
    # norm), one micro-batch per rank per step, tp=1, pp=1 and nan_policy=stop (the update precedes the loss)
    optimizer_in_backward: bool = False


@dataclasses.dataclass
class PretrainJobConfig(JobConfig):
    device: str = "auto"  # auto | cpu | cuda (auto: CUDA where the ranks see a GPU); see puyu.parallel.device
    precision: str = "auto"  # auto | bf16 | fp32 (auto: bf16 on CUDA, fp32 on CPU); the same in every layout
    # continued pretraining: start from this model dir's weights (a Hugging Face one also gives the shapes,
    # and the export is then an HF dir in its layout) instead of a seeded initialisation; "" = from scratch
    init_from: str = ""
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: PretrainDataConfig = dataclasses.field(default_factory=PretrainDataConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
