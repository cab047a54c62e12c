"""Apply parallelism to the single-device model from outside, in one fixed order.

The model comes on the meta device (shapes only); every step below works on meta parameters, and
:func:`puyu.parallel.meta_init.materialize` allocates each rank's shards afterwards.

1. pipeline split: each pipeline rank keeps a :class:`StageModule` holding its slice of the
   model's own submodules under their original names (``layers.3.attention.wqkv``), so
   checkpoints keep the single-device names and load into any layout;
2. tensor parallel (DTensor): ``wqkv``/``w1``/``w3`` column-wise, ``wo``/``w2`` row-wise. InternLM2's
   grouped ``wqkv`` layout (per KV head: its queries, key, value) makes a column shard a whole set
   of KV groups, so each rank attends with its own heads and no reordering is needed. With
   ``sequence_parallel`` (Megatron's SP) the residual stream and the norms hold ``T / tp`` tokens per
   rank: each column-parallel linear all-gathers the sequence itself, saving only the local shard for
   backward (:mod:`puyu.parallel.sequence_parallel`), and the row-parallel ones reduce-scatter instead of
   all-reducing; the norms run on plain local tensors, so the fused ops stay in use, and their weights'
   gradients are summed over the TP group after backward (:func:`reduce_sequence_parallel_grads`). With ``vocab_parallel`` the embedding and the output head
   are sharded on the vocabulary and the loss is computed from vocab-sharded logits (``loss_parallel``),
   never gathering the full [tokens, vocab] logits;
3. activation checkpointing (:data:`AC_MODES`): every block, every N-th block, or each block's
   attention only (its projections and scores are recomputed; the MLP keeps its activations);
4. ``torch.compile`` per block;
5. precision and data parallel: FSDP2 ``fully_shard`` per block and on the stage (HSDP with
   ``dp_replicate > 1``), its ``MixedPrecisionPolicy`` carrying bf16; without data parallelism the stage
   runs its forward and loss under autocast instead (:mod:`puyu.parallel.device`).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from puyu.launcher.errors import PuyuError
from puyu.model import ModelArgs, Transformer
from puyu.model import ops
from puyu.model.model import block_inputs
from puyu.parallel.config import ParallelConfig
from puyu.parallel.dims import ParallelDims


def check_layout(dims: ParallelDims, args: ModelArgs, pcfg: ParallelConfig) -> None:
    """Fail before any process group starts when the model cannot be split this way."""
    if args.n_kv_heads % dims.tp:
        raise PuyuError(f"parallel.tp={dims.tp} does not divide the model's {args.n_kv_heads} KV heads "
                        f"({args.n_heads} query heads)")
    if args.ffn_hidden_dim % dims.tp:
        raise PuyuError(f"parallel.tp={dims.tp} does not divide ffn_hidden_dim {args.ffn_hidden_dim}")
    stages = dims.pp * pcfg.pp_virtual_stages
    if args.n_layers % stages:
        raise PuyuError(f"{args.n_layers} layers cannot be split into pp {dims.pp} × virtual stages "
                        f"{pcfg.pp_virtual_stages} = {stages} equal pipeline stages")
    if dims.tp > 1 and pcfg.vocab_parallel and not args.tie_embeddings and args.vocab_size % dims.tp:
        raise PuyuError(f"parallel.tp={dims.tp} does not divide the vocabulary of {args.vocab_size} "
                        f"(parallel.vocab_parallel=true shards it; set it false or pad the vocabulary)")
    check_parallel_config(pcfg)


PP_SCHEDULES = ("1F1B", "GPipe", "Interleaved1F1B", "InterleavedZeroBubble")
LOOPED_SCHEDULES = ("Interleaved1F1B", "InterleavedZeroBubble")  # several stages per rank, looped placement


def check_parallel_config(pcfg: ParallelConfig) -> None:
    """The settings that need no model: schedule, virtual stages, activation checkpointing."""
    if pcfg.pp_schedule not in PP_SCHEDULES:
        raise PuyuError(f"parallel.pp_schedule={pcfg.pp_schedule!r}; choose one of {', '.join(PP_SCHEDULES)}")
    if (pcfg.pp_schedule in LOOPED_SCHEDULES) != (pcfg.pp_virtual_stages > 1):
        raise PuyuError(f"parallel.pp_schedule={pcfg.pp_schedule} and parallel.pp_virtual_stages="
                        f"{pcfg.pp_virtual_stages}: {' and '.join(LOOPED_SCHEDULES)} go with "
                        f"pp_virtual_stages > 1 (and only they)")
    ac_every(pcfg.activation_checkpointing)


AC_MODES = "none, full, attention or every_<N>"


def ac_every(mode: str) -> int:
    """Block period of ``parallel.activation_checkpointing``: 0 none, 1 full, N for every_<N>, -1 attention."""
    fixed = {"none": 0, "full": 1, "attention": -1}
    if mode in fixed:
        return fixed[mode]
    n = mode.removeprefix("every_")
    if mode.startswith("every_") and n.isdigit() and int(n) >= 1:
        return int(n)
    raise PuyuError(f"parallel.activation_checkpointing={mode!r}; choose {AC_MODES}")


class StageModule(nn.Module):
    """A contiguous slice of the Transformer: embeddings if first, some blocks, final norm + head if last.

    The training forward of every layout — a pipeline stage, or the whole model in pretraining and
    finetuning — the layers kept in a ``ModuleDict`` under their global ids (torchtitan's pruned model),
    so checkpoints name them as the full model does. ``forward(x, document_ids=None)``: token ids [B, T]
    (first stage) or hidden states [B, T, D] -> hidden states [B, T, D] (normed on the last stage).
    Without ``document_ids`` attention is causal over the packed row, positions 0..T-1 (Megatron's default
    for pretraining on EOD-separated documents); with them (finetuning's packed samples) it is causal
    within each document. :meth:`loss` and :meth:`loss_sum` turn the last stage's output into the
    cross-entropy, fused with the output projection.
    """

    def __init__(self, model: Transformer, layer_ids: list[int], first: bool, last: bool):
        super().__init__()
        self.args = model.args
        self.tok_embeddings = model.tok_embeddings if first else None
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layer_ids})
        self.norm = model.norm if last else None
        self.output = model.output if last else None
        self.autocast_dtype: Optional[torch.dtype] = None  # set by apply_precision when FSDP does not cast
        self.seq_shards = 1  # tp under sequence parallelism: each rank holds T / seq_shards positions
        self.vocab_parallel = False  # the head is sharded on the vocabulary (apply_tp)

    def autocast(self, x: torch.Tensor):
        """The context this stage computes in: autocast to ``autocast_dtype``, or nothing."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(x.device.type, dtype=self.autocast_dtype)

    def forward(self, x: torch.Tensor, document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        with self.autocast(x):
            h = self.tok_embeddings(x) if self.tok_embeddings is not None else x  # [B, T / seq_shards, D]
            B, T = h.shape[0], h.shape[1] * self.seq_shards  # attention sees all T
            cos, sin, mask = block_inputs(self.args, B, T, h.device, document_ids=document_ids)
            for layer in self.layers.values():
                h = layer(h, cos, sin, mask, None)
            return self.norm(h) if self.norm is not None else h

    def loss(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over every position of the last stage's output."""
        with self.autocast(h):
            if self.vocab_parallel:  # run under loss_context(), backward included
                logits = self.output(h)  # DTensor [B, T, V] sharded on V
                return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten()).to_local()
            return ops.linear_cross_entropy(h.flatten(0, 1), self.output.weight, labels.flatten(),
                                            fused=self.args.fused_ops)

    def loss_sum(self, h: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """Summed cross-entropy over the labelled positions (fused with the output projection).

        Only labelled positions reach the head (in SFT the prompts, template tokens and padding, often
        most of a row, need no logits); a frozen head (LoRA) gets no weight gradient computed.
        """
        labels = labels.flatten()
        keep = (labels != ignore_index).nonzero().squeeze(1)
        hidden, target = h.flatten(0, 1).index_select(0, keep), labels.index_select(0, keep)
        with self.autocast(h):
            return ops.linear_cross_entropy(hidden, self.output.weight, target, ignore_index=ignore_index,
                                            reduction="sum", fused=self.args.fused_ops)

    def loss_context(self):
        """What forward, loss and backward of a vocab-parallel head run under (DTensor's ``loss_parallel``:
        max, sum of exponentials and the target logit are reduced over the vocabulary shards)."""
        if not self.vocab_parallel:
            return contextlib.nullcontext()
        from torch.distributed.tensor.parallel import loss_parallel

        return loss_parallel()


def split_stages(model: Transformer, pp_rank: int, pp: int, virtual: int) -> list[StageModule]:
    """This pipeline rank's stages (``virtual`` of them, looped: rank r holds stages r, r+pp, ...)."""
    n_stages = pp * virtual
    per = model.args.n_layers // n_stages
    stage_ids = [pp_rank + v * pp for v in range(virtual)]
    return [StageModule(model, list(range(s * per, (s + 1) * per)), s == 0, s == n_stages - 1) for s in stage_ids]


def apply_tp(stage: StageModule, tp_mesh: DeviceMesh, sequence_parallel: bool, vocab_parallel: bool) -> None:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from puyu.parallel.sequence_parallel import GatheredColwiseParallel

    tp = tp_mesh.size()
    stream = Shard(1) if sequence_parallel else Replicate()  # the residual stream's layout between blocks
    outer = {}
    if vocab_parallel and stage.tok_embeddings is not None:  # partial lookups, reduced (and scattered on T)
        outer["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=stream)
    if vocab_parallel and stage.output is not None:  # logits [B, T, V] stay a DTensor sharded on V
        outer["output"] = ColwiseParallel(input_layouts=stream, output_layouts=Shard(-1), use_local_output=False)
    if outer:
        parallelize_module(stage, tp_mesh, outer)
    # under SP the column-parallel linears gather the normed [B, T/tp, D] themselves, keeping only the shard
    colwise = GatheredColwiseParallel if sequence_parallel else ColwiseParallel
    plan = {"attention.wqkv": colwise(), "attention.wo": RowwiseParallel(output_layouts=stream),
            "feed_forward.w1": colwise(), "feed_forward.w3": colwise(),
            "feed_forward.w2": RowwiseParallel(output_layouts=stream)}
    for block in stage.layers.values():
        parallelize_module(block, tp_mesh, plan)
        block.attention.n_heads //= tp  # the block now computes only its own heads
        block.attention.n_kv_heads //= tp
    stage.seq_shards = tp if sequence_parallel else 1
    stage.vocab_parallel = vocab_parallel and stage.output is not None


SEQUENCE_PARALLEL_PARAMS = "norm.weight"  # names ending so see T / tp tokens per rank under SP


def reduce_sequence_parallel_grads(stages: list[StageModule], tp_group) -> None:
    """Sum the norms' weight gradients over the TP group: under sequence parallelism each rank's norms
    saw only its own ``T / tp`` tokens (Megatron all-reduces these "sequence parallel" gradients too)."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    for stage in stages:
        for name, p in stage.named_parameters():
            if name.endswith(SEQUENCE_PARALLEL_PARAMS) and p.grad is not None:
                grad = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad  # FSDP: this rank's shard
                dist.all_reduce(grad, group=tp_group)


def apply_ac(stage: StageModule, mode: str) -> None:
    """Recompute activations in backward, per ``mode`` (:data:`AC_MODES`). Layer names are global layer
    ids, so ``every_<N>`` picks the same blocks whatever the pipeline split."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    every = ac_every(mode)
    for name, block in list(stage.layers.items()):
        if every == -1:
            block.attention = checkpoint_wrapper(block.attention, preserve_rng_state=False)
        elif every and int(name) % every == 0:
            stage.layers[name] = checkpoint_wrapper(block, preserve_rng_state=False)


def apply_compile(stage: StageModule) -> None:
    # torch 2.13 on CPU: a block loaded warm from the AOTAutograd cache fails in backward with
    # garbage shapes (seen here with our fused ops); compiling afresh is correct, so skip that cache
    import torch._functorch.config

    torch._functorch.config.enable_autograd_cache = False
    for name, block in list(stage.layers.items()):
        stage.layers[name] = torch.compile(block)


def apply_fsdp(stage: StageModule, dp_mesh: DeviceMesh, param_dtype: Optional[torch.dtype], pp_enabled: bool) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in stage.layers.values():
        # with PP the same block runs once per microbatch: keep it gathered between them
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=not pp_enabled)
    # The stage's own parameters (embeddings, norm, head) stay gathered after forward: the loss
    # reads the head's weight outside forward, before backward reaches this module.
    fully_shard(stage, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=False)


def apply_precision(stage: StageModule, dims: ParallelDims, mesh: Optional[DeviceMesh],
                    dtype: Optional[torch.dtype], pp_enabled: bool) -> None:
    """bf16 compute over fp32 master weights (``dtype``; None: fp32): through FSDP2 when data parallelism
    shards the stage, else through autocast around the stage's forward and loss."""
    if dims.dp > 1:
        dp_mesh = mesh["dp_replicate", "dp_shard"] if dims.dp_replicate > 1 else mesh["dp_shard"]
        apply_fsdp(stage, dp_mesh, dtype, pp_enabled)
    else:
        stage.autocast_dtype = dtype


def precision_summary(stages: list[StageModule], dims: ParallelDims, dtype: Optional[torch.dtype]) -> dict:
    """What :func:`apply_precision` set up, for the run's result and report."""
    return {"weights": str(next(stages[0].parameters()).dtype).removeprefix("torch."),
            "matmul": str(dtype or torch.float32).removeprefix("torch."),
            "cast_by": "none" if dtype is None else ("fsdp" if dims.dp > 1 else "autocast")}


def parallelize(model: Transformer, dims: ParallelDims, pcfg: ParallelConfig, mesh: Optional[DeviceMesh],
                pp_rank: int, compute_dtype: Optional[torch.dtype] = None) -> list[StageModule]:
    """Split and shard ``model`` for this rank; returns its stage modules (several with looped PP)."""
    stages = split_stages(model, pp_rank, dims.pp, pcfg.pp_virtual_stages)
    for stage in stages:
        if dims.tp > 1:
            apply_tp(stage, mesh["tp"], pcfg.sequence_parallel, pcfg.vocab_parallel and not model.args.tie_embeddings)
        apply_ac(stage, pcfg.activation_checkpointing)
        if pcfg.compile:
            apply_compile(stage)
        apply_precision(stage, dims, mesh, compute_dtype, dims.pp > 1)
    return stages
