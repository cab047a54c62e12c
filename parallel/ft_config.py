"""Configuration of ``puyu job=finetune`` (XTuner-style supervised finetuning): plain dataclasses.

Torch-free like :mod:`puyu.parallel.config`, whose model/parallel/optim/train sections it reuses, so
the ``puyu`` command composes and checks a finetuning config without importing torch or peft.
"""
from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

from puyu.launcher.config import JobConfig
from puyu.launcher.errors import PuyuError
from puyu.parallel.config import ModelConfig, OptimConfig, ParallelConfig, TrainConfig

LORA_TARGETS = ("wqkv", "wo", "w1", "w2", "w3")
LORA_QUANTS = ("none", "nf4")


@dataclasses.dataclass
class LoraConfig:
    rank: int = 8  # 0: full finetuning (every weight trains)
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0
    targets: list[str] = dataclasses.field(default_factory=lambda: list(LORA_TARGETS))
    # none | nf4: QLoRA, the frozen base linears held in 4-bit NormalFloat (bitsandbytes), adapters in full
    quant: str = "none"

    def validate(self) -> None:
        if self.rank < 0:
            raise PuyuError(f"lora.rank={self.rank} must be >= 0 (0: full finetuning)")
        if self.quant not in LORA_QUANTS:
            raise PuyuError(f"lora.quant={self.quant!r}; choose {' or '.join(LORA_QUANTS)}")
        if self.quant != "none" and not self.rank:
            raise PuyuError(f"lora.quant={self.quant} quantizes the frozen base under LoRA adapters: set lora.rank > 0")
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown:
            raise PuyuError(f"lora.targets: unknown {unknown}; choose among {', '.join(LORA_TARGETS)}")
        if self.rank and not self.targets:
            raise PuyuError("lora.targets is empty; name at least one of " + ", ".join(LORA_TARGETS))


@dataclasses.dataclass
class SFTDataConfig:
    # jsonl files of conversations: {"messages": [{role, content}, ...]} or {"instruction", "input", "output"};
    # method=dpo: preference pairs {"prompt", "chosen", "rejected"} (strings or messages; data_pipeline.preference)
    paths: list[str] = dataclasses.field(default_factory=list)
    # held-out conversations (same formats): their masked loss is measured before and after finetuning
    eval_paths: list[str] = dataclasses.field(default_factory=list)
    # > 0: also build this many chat conversations from the Wikipedia lead sections package
    # ("Tell me about <title>." -> the lead), written to <run>/sft_data/wiki_{train,heldout}.jsonl;
    # method=dpo: that many pairs (chosen the lead, rejected its words shuffled) in <run>/dpo_data/
    wiki: int = 0
    wiki_heldout: int = 32  # the sorted titles' tail kept out of training (used as eval data)
    seq_len: int = 256  # packed row length
    overlong: str = "truncate"  # conversations longer than seq_len: truncate (keep the start) | drop
    seed: int = 1234  # shuffles the packed rows (per epoch)

    def validate(self) -> None:
        if self.overlong not in ("truncate", "drop"):
            raise PuyuError(f"data.overlong={self.overlong!r}; choose truncate or drop")
        if not self.paths and self.wiki <= 0:
            raise PuyuError("no chat data: set job.data.paths=[file.jsonl,...] and/or job.data.wiki=<conversations>")
        if self.seq_len < 8:
            raise PuyuError(f"data.seq_len={self.seq_len} is too short for a chat turn")


ENGINES = ("fsdp", "deepspeed")
METHODS = ("sft", "dpo")
DPO_LOSSES = ("sigmoid", "hinge", "ipo", "robust")  # trl 1.16's DPOTrainer loss_type values puyu computes


@dataclasses.dataclass
class DPOConfig:
    """``method=dpo``: Direct Preference Optimization as trl's ``DPOTrainer`` (its defaults)."""

    beta: float = 0.1  # how far the policy may move from the reference (the implicit reward's scale)
    loss_type: str = "sigmoid"  # sigmoid (DPO) | hinge (SLiC) | ipo (length-normalized) | robust (rDPO)
    label_smoothing: float = 0.0  # loss_type=robust: the probability that a preference label is flipped

    def validate(self) -> None:
        if not self.beta > 0:
            raise PuyuError(f"dpo.beta={self.beta} must be > 0")
        if self.loss_type not in DPO_LOSSES:
            raise PuyuError(f"dpo.loss_type={self.loss_type!r}; choose {', '.join(DPO_LOSSES)}")
        if self.loss_type == "robust" and not 0.0 <= self.label_smoothing < 0.5:
            raise PuyuError(f"dpo.label_smoothing={self.label_smoothing} must lie in [0, 0.5) for loss_type=robust")
        if self.loss_type != "robust" and self.label_smoothing:
            raise PuyuError(f"dpo.label_smoothing={self.label_smoothing} applies to loss_type=robust only "
                            f"(as in trl 1.16; got loss_type={self.loss_type})")


@dataclasses.dataclass
class DeepSpeedConfig:
    """ZeRO settings of ``engine=deepspeed``, set by the presets under ``conf/job/deepspeed/`` (XTuner's
    ``deepspeed_zero{1,2,3}[_offload]``: ``puyu job=finetune job/deepspeed=deepspeed_zero3``)."""

    zero_stage: int = 2  # 1: optimizer states sharded; 2: + gradients; 3: + parameters
    offload_optimizer: bool = False  # optimizer states and update on the CPU (ZeRO-Offload)
    offload_param: bool = False  # ZeRO-3 only: parameters wait on the CPU between uses (ZeRO-Infinity)
    overlap_comm: bool = True  # reduce gradients while backward still runs (as XTuner's presets)

    def validate(self) -> None:
        if self.zero_stage not in (1, 2, 3):
            raise PuyuError(f"deepspeed.zero_stage={self.zero_stage}; choose 1, 2 or 3 "
                            "(or a preset: job/deepspeed=deepspeed_zero{1,2,3}[_offload])")
        if self.offload_param and self.zero_stage != 3:
            raise PuyuError(f"deepspeed.offload_param=true needs deepspeed.zero_stage=3 (got {self.zero_stage}): "
                            "only ZeRO-3 partitions the parameters")


def _ft_optim() -> OptimConfig:
    return OptimConfig(lr=2e-4, min_lr=2e-5, warmup_steps=3, weight_decay=0.0)


def _ft_train() -> TrainConfig:
    return TrainConfig(steps=30, global_batch=8, micro_batch=2, checkpoint_every=10)


@dataclasses.dataclass
class FinetuneJobConfig(JobConfig):
    method: str = "sft"  # sft (chat jsonl) | dpo (preference jsonl: prompt/chosen/rejected; the dpo section)
    checkpoint: str = ""  # the base model: a Hugging Face model dir, or a puyu one (<pretrain run>/pretrain/model)
    tokenizer: str = ""  # tokenizer.json or tokenizer dir; "" = the checkpoint's own (an HF model dir has one)
    device: str = "auto"  # auto | cpu | cuda, as pretraining's (puyu.parallel.device)
    precision: str = "auto"  # auto | bf16 | fp32, as pretraining's (auto: bf16 on CUDA, fp32 on CPU)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)  # flavor/vocab_size of the checkpoint
    data: SFTDataConfig = dataclasses.field(default_factory=SFTDataConfig)
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    dpo: DPOConfig = dataclasses.field(default_factory=DPOConfig)
    engine: str = "fsdp"  # fsdp (FSDP2, parallel.dp_*) | deepspeed (ZeRO, the deepspeed section)
    deepspeed: DeepSpeedConfig = dataclasses.field(default_factory=DeepSpeedConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    optim: OptimConfig = dataclasses.field(default_factory=_ft_optim)
    train: TrainConfig = dataclasses.field(default_factory=_ft_train)
    eval_rows: int = 64  # at most this many packed held-out rows are scored for the report

    def validate(self, in_run: bool = False) -> None:
        """One-line errors for what can be checked before anything runs (paths filled from the run: not yet)."""
        if self.method not in METHODS:
            raise PuyuError(f"finetune: method={self.method!r}; choose {' or '.join(METHODS)}")
        self.lora.validate()
        self.data.validate()
        if self.method == "dpo":
            self.dpo.validate()
            if self.engine == "deepspeed" and not self.lora.rank:
                raise PuyuError("finetune: method=dpo with full finetuning (lora.rank=0) runs on engine=fsdp, which "
                                "shards the frozen reference copy; DeepSpeed would hold a whole one per rank. Set "
                                "engine=fsdp, or lora.rank > 0 (the reference is then the base, adapters off)")
        if self.parallel.pp != 1:
            raise PuyuError("finetune: parallel.pp must be 1 (packed chat rows need the document mask, which "
                            "the pipeline schedule does not carry); use data parallelism (FSDP or DeepSpeed ZeRO)")
        if self.parallel.tp != 1:  # (the step loop is data parallel only)
            raise PuyuError(f"finetune: parallel.tp={self.parallel.tp} is not supported; finetuning runs data "
                            "parallel only (FSDP or DeepSpeed ZeRO over all ranks): set parallel.tp=1")
        if self.engine not in ENGINES:
            raise PuyuError(f"finetune: engine={self.engine!r}; choose {' or '.join(ENGINES)}")
        if self.engine == "deepspeed" and self.lora.quant != "none":
            raise PuyuError(f"finetune: lora.quant={self.lora.quant} (QLoRA) runs on engine=fsdp in one process; "
                            "set engine=fsdp")
        if self.engine == "deepspeed":
            self.deepspeed.validate()
            if importlib.util.find_spec("deepspeed") is None:
                raise PuyuError("finetune: engine=deepspeed but the deepspeed package is not installed "
                                "(pip install deepspeed, or engine=fsdp)")
            if self.parallel.dp_replicate != 1:
                raise PuyuError(f"finetune: parallel.dp_replicate={self.parallel.dp_replicate} is FSDP's HSDP; "
                                "with engine=deepspeed ZeRO shards over all ranks: set it to 1")
            if self.parallel.compile:
                raise PuyuError("finetune: parallel.compile=true is for engine=fsdp; set it false with "
                                "engine=deepspeed")
        if not in_run:
            if not self.checkpoint:
                raise PuyuError("finetune: set job.checkpoint=<Hugging Face or puyu model dir> "
                                "(e.g. runs/pt1/pretrain/model)")
            own = any((Path(self.checkpoint) / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))
            if not self.tokenizer and not own:
                raise PuyuError(f"finetune: set job.tokenizer=<tokenizer.json or tokenizer dir> ({self.checkpoint} "
                                "has no tokenizer of its own)")
