"""``puyu job=finetune job.method=dpo``: Direct Preference Optimization, as trl 1.16's ``DPOTrainer``.

Data: the ``dpo_data`` stage renders preference pairs with the model's chat template as SFT does and
masks the prompt (:mod:`puyu.data_pipeline.preference`). A step takes ``train.global_batch`` *pairs*
(``train.micro_batch`` pairs a micro-batch, run as one batch of chosen rows then rejected rows, as trl's).

Loss, per pair: the policy's summed log-probabilities of the chosen and rejected completion tokens
(``pc``, ``pr``; the prompt masked), the same under the frozen reference (``rc``, ``rr``), and with
``d = (pc - rc) - (pr - rr)`` trl's ``loss_type``: ``sigmoid`` ``-logsigmoid(beta d)`` (DPO, the default),
``hinge`` ``relu(1 - beta d)``, ``ipo`` ``((pc - rc) / n_c - (pr - rr) / n_r - 1 / (2 beta))^2`` (per-token
averages, as trl's) and ``robust`` (rDPO with ``label_smoothing``); the step's loss is the mean over the
global batch's pairs (each micro-batch's sum times ``dp / pairs``, as SFT scales its token sums). The
metrics log carries trl's ``rewards/chosen``, ``rewards/rejected`` (``beta`` times each log-ratio, batch
means), ``rewards/accuracies`` (share of pairs with chosen reward > rejected reward), ``rewards/margins``
and ``logps/chosen``, ``logps/rejected``.

The reference is the base model without a second copy where LoRA trains: the same FSDP-sharded stage
with every adapter switched off (peft's ``disable_adapters`` flag, set on each LoRA layer for the
reference forward; the NF4 base under QLoRA). Full finetuning keeps a frozen, sharded copy of the
initial weights (read from ``job.checkpoint`` as the trained one is). Model building, AdamW, the warmup +
cosine schedule, clipping, NaN policy, checkpoints of the trainable part, resume and requeue are SFT's
(:class:`~puyu.parallel.finetune.FinetuneTask`: :class:`DPOSteps` plugs into its step loop, and into the
DeepSpeed engine's for LoRA); so are the merge and export. With held-out pairs
(``data.eval_paths`` or the wiki pairs' tail) the export scores the merged model against the base on them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from puyu.launcher.errors import PuyuError
from puyu.launcher.stage import TaskContext
from puyu.model import ModelArgs, Transformer
from puyu.parallel.dims import ParallelDims
from puyu.parallel.finetune import IGNORE, SFTBatches, StepSums, _with_in_run, build_stage, read_base, run_mode
from puyu.parallel.ft_config import DPOConfig, FinetuneJobConfig
from puyu.parallel.parallelize import StageModule
from puyu.parallel.pretrain import _all_reduce

DPO_DATA = "dpo_data"  # the data stage's folder in the run
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")


# --------------------------------------------------------------------------- the loss
def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, dpo: DPOConfig, chosen_tokens: Optional[torch.Tensor] = None,
             rejected_tokens: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses ``[N]`` and the chosen and rejected rewards (``beta`` × log-ratio, detached), from the
    summed completion log-probs of policy and reference; trl 1.16's ``_compute_loss`` for ``dpo.loss_type``
    (``ipo`` needs the completions' token counts)."""
    beta = dpo.beta
    chosen_logratios, rejected_logratios = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    delta = chosen_logratios - rejected_logratios
    if dpo.loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * delta)
    elif dpo.loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif dpo.loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("loss_type=ipo averages over the completion tokens: pass their counts")
        ipo_delta = (chosen_logratios / chosen_tokens.clamp(min=1.0)
                     - rejected_logratios / rejected_tokens.clamp(min=1.0))
        losses = (ipo_delta - 1 / (2 * beta)) ** 2
    elif dpo.loss_type == "robust":
        ls = dpo.label_smoothing
        losses = (-(1 - ls) * F.logsigmoid(beta * delta) + ls * F.logsigmoid(-beta * delta)) / (1 - 2 * ls)
    else:
        raise ValueError(f"unknown DPO loss_type {dpo.loss_type!r}")
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def sequence_logps(stage: StageModule, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each row's summed log-probability of its labelled next tokens ``[B]`` (minus its summed
    cross-entropy, through the stage's fused head: only labelled positions reach it)."""
    h = stage(tokens)
    return torch.stack([-stage.loss_sum(h[i:i + 1], labels[i:i + 1]) for i in range(len(tokens))])


@contextlib.contextmanager
def adapters_disabled(module: torch.nn.Module):
    """Every peft LoRA layer of ``module`` computes its base layer only (the reference model), then back.

    Sets the layers' ``_disable_adapters`` flag (what peft's ``disable_adapters`` property reads) rather
    than calling ``enable_adapters``, which would also flip the adapters' ``requires_grad``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
    saved = [m._disable_adapters for m in layers]
    for m in layers:
        m._disable_adapters = True
    try:
        yield
    finally:
        for m, was in zip(layers, saved):
            m._disable_adapters = was


def pair_logps(policy: StageModule, reference: Optional[StageModule], tokens: torch.Tensor,
               labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Policy (with gradients) and reference (without) summed log-probs of a ``[chosen; rejected]`` batch;
    ``reference=None``: the policy with its adapters off."""
    with torch.no_grad():
        if reference is None:
            with adapters_disabled(policy):
                ref = sequence_logps(policy, tokens, labels)
        else:
            ref = sequence_logps(reference, tokens, labels)
    return sequence_logps(policy, tokens, labels), ref


def batch_loss(policy: StageModule, reference: Optional[StageModule], tokens: torch.Tensor,
               labels: torch.Tensor, dpo: DPOConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The summed DPO loss of a ``[chosen; rejected]`` batch (differentiable) and the summed metrics."""
    pol, ref = pair_logps(policy, reference, tokens, labels)
    n = len(tokens) // 2
    counts = (labels != IGNORE).sum(1).to(pol.dtype)
    losses, chosen_r, rejected_r = dpo_loss(pol[:n], pol[n:], ref[:n], ref[n:], dpo, counts[:n], counts[n:])
    sums = {"rewards/chosen": chosen_r.sum(), "rewards/rejected": rejected_r.sum(),
            "rewards/accuracies": (chosen_r > rejected_r).to(pol.dtype).sum(),
            "rewards/margins": (chosen_r - rejected_r).sum(),
            "logps/chosen": pol[:n].detach().sum(), "logps/rejected": pol[n:].detach().sum()}
    return losses.sum(), sums


# --------------------------------------------------------------------------- data
@dataclasses.dataclass
class PairBatch:
    tokens: torch.Tensor  # [2m, T]: the m chosen rows, then the m rejected ones (cut to the longest)
    labels: torch.Tensor  # [2m, T], IGNORE off the completions


def pair_batch(pairs, index) -> PairBatch:
    t, lab = pairs.tokens[index], pairs.labels[index]  # [m, 2, L]
    longest = int(pairs.lengths[index].max())
    return PairBatch(*(torch.from_numpy(np.concatenate([a[:, 0], a[:, 1]])[:, :longest]).long() for a in (t, lab)))


class PairBatches(SFTBatches):
    """SFT's step slicing and per-epoch reshuffling over preference *pairs* (global batch and micro-batch
    count pairs; a micro-batch is ``2 × micro_batch`` rows)."""

    def next_step(self) -> list[PairBatch]:
        per_rank = self.global_batch // self.dp_size
        first = self.consumed_samples + self.dp_rank * per_rank
        rows = [self._row(first + i) for i in range(per_rank)]
        self.consumed_samples += self.global_batch
        return [pair_batch(self.dataset, rows[m:m + self.micro_batch]) for m in range(0, per_rank, self.micro_batch)]


def load_pairs(run_dir: Path, cfg: FinetuneJobConfig, name: str = "train.npz"):
    from puyu.data_pipeline.preference import Pairs

    data = Pairs.load(run_dir / DPO_DATA / name)
    if data.tokens.shape[2] != cfg.data.seq_len:
        raise PuyuError(f"dpo_data rows are {data.tokens.shape[2]} long but data.seq_len={cfg.data.seq_len}")
    return data


class DPODataTask:
    """The ``dpo_data`` stage: preference jsonl → rendered, prompt-masked pairs (``train.npz``, ``heldout.npz``)."""

    def __init__(self, cfg: FinetuneJobConfig, in_run: Optional[dict[str, str]] = None):
        self.cfg, self.in_run = cfg, dict(in_run or {})

    def __call__(self, ctx: TaskContext) -> dict:
        from puyu.data_pipeline.preference import prepare

        cfg = _with_in_run(self.cfg, self.in_run, ctx.run_dir)
        d = cfg.data
        vocab = read_base(cfg.checkpoint, cfg.model.args())[0].vocab_size
        return prepare(ctx.stage_dir, cfg.tokenizer or cfg.checkpoint, d.paths, d.eval_paths, d.seq_len, d.overlong,
                       d.wiki, d.wiki_heldout, vocab_size=vocab)


# --------------------------------------------------------------------------- the step loop's parts
class DPOLoss(torch.nn.Module):
    """Policy and reference on one ``[chosen; rejected]`` batch as one forward (``tokens, labels ->
    (summed loss, summed metrics)``): what the step loop calls, and the module a DeepSpeed engine wraps."""

    def __init__(self, stage: StageModule, reference: Optional[StageModule], dpo: DPOConfig):
        super().__init__()
        self.stage, self.reference, self.dpo = stage, reference, dpo

    def forward(self, tokens, labels):
        return batch_loss(self.stage, self.reference, tokens, labels, self.dpo)


class DPOSteps:
    """What ``method=dpo`` plugs into SFT's step loop (:meth:`FinetuneTask._train`): preference pairs, the
    reference, and the DPO loss with trl's metrics."""

    def __init__(self, ctx: TaskContext, cfg: FinetuneJobConfig, args: ModelArgs, dims: ParallelDims, mesh,
                 device: torch.device):
        self.cfg, self.dims, self.device = cfg, dims, device
        self.data = load_pairs(ctx.run_dir, cfg)
        # built after the policy (build_stage), as its LoRA draws come first
        self.reference = None if cfg.lora.rank else build_stage(cfg, args, dims, mesh, device, frozen=True)[0]
        if self.reference is not None:
            self.reference.eval()

    def batches(self, rank: int, consumed: int) -> PairBatches:
        t = self.cfg.train
        return PairBatches(self.data, t.global_batch, t.micro_batch, self.dims.dp_rank(rank), self.dims.dp, consumed,
                           self.cfg.data.seed)

    @staticmethod
    def flops_factor(full: bool) -> float:
        """Per token: policy forward 2N + backward 4N (LoRA: input gradients only, 2N) + reference forward 2N."""
        return 8.0 if full else 6.0

    def loss_module(self, stage: StageModule) -> torch.nn.Module:
        return DPOLoss(stage, self.reference, self.cfg.dpo)

    def forward_backward(self, loss: torch.nn.Module, micro: list[PairBatch], backward) -> StepSums:
        """As :meth:`~puyu.parallel.finetune.SFTSteps.forward_backward`, over pairs."""
        device, pairs = self.device, self.cfg.train.global_batch
        sums = torch.zeros(len(METRICS) + 3, device=device, dtype=torch.float64)
        for b in micro:
            tokens, labels = b.tokens.to(device), b.labels.to(device)
            loss_sum, parts = loss(tokens, labels)
            # FSDP and DeepSpeed average gradients over the dp ranks: scale so they sum to the global pair mean
            backward(loss_sum * (self.dims.dp / pairs))
            sums += torch.stack([loss_sum.detach().double(), *(parts[k].double() for k in METRICS),
                                 torch.tensor(float((labels != IGNORE).sum()), device=device, dtype=torch.float64),
                                 torch.tensor(float(tokens.numel()), device=device, dtype=torch.float64)])
        sums = _all_reduce(sums)
        return StepSums(float(sums[0]) / pairs, int(sums[-2]), int(sums[-1]),
                        {k: float(v) / pairs for k, v in zip(METRICS, sums[1:1 + len(METRICS)])})

    def result(self, last: StepSums) -> dict:
        return {"method": "dpo", "mode": f"DPO, {run_mode(self.cfg)}",
                "reference": "the base (adapters disabled)" if self.cfg.lora.rank else "a frozen copy of the base",
                **{f"final_{k}": v for k, v in last.metrics.items()}}


# --------------------------------------------------------------------------- held-out pairs, report
@torch.no_grad()
def heldout_metrics(policy: Transformer, reference: Transformer, pairs, dpo: DPOConfig, max_pairs: int = 0,
                    batch: int = 4) -> dict[str, float]:
    """Mean DPO loss and trl's reward metrics of ``policy`` against ``reference`` over (the first
    ``max_pairs``) held-out pairs."""
    n = len(pairs.tokens) if not max_pairs else min(max_pairs, len(pairs.tokens))
    pol_stage = StageModule(policy, list(range(policy.args.n_layers)), True, True)
    ref_stage = StageModule(reference, list(range(reference.args.n_layers)), True, True)
    totals = dict.fromkeys(("loss", *METRICS), 0.0)
    for s in range(0, n, batch):
        b = pair_batch(pairs, list(range(s, min(n, s + batch))))
        pol = sequence_logps(pol_stage, b.tokens, b.labels)
        ref = sequence_logps(ref_stage, b.tokens, b.labels)
        m = len(b.tokens) // 2
        counts = (b.labels != IGNORE).sum(1).to(pol.dtype)
        losses, cr, rr = dpo_loss(pol[:m], pol[m:], ref[:m], ref[m:], dpo, counts[:m], counts[m:])
        totals["loss"] += float(losses.sum())
        for k, v in (("rewards/chosen", cr.sum()), ("rewards/rejected", rr.sum()),
                     ("rewards/accuracies", (cr > rr).float().sum()), ("rewards/margins", (cr - rr).sum()),
                     ("logps/chosen", pol[:m].sum()), ("logps/rejected", pol[m:].sum())):
            totals[k] += float(v)
    return {k: v / max(n, 1) for k, v in totals.items()} | {"pairs": n}


def dpo_report(run_dir: Path, result: dict) -> str:
    """Markdown: mode, data (pairs, truncation), loss and reward curves, throughput, held-out pairs, export."""
    data = json.loads((run_dir / DPO_DATA / "train.json").read_text())
    records = [json.loads(ln) for ln in (run_dir / "finetune" / "metrics.jsonl").read_text().splitlines()]
    every = max(1, len(records) // 10)
    shown = records[::every] + ([records[-1]] if (len(records) - 1) % every else [])
    timed = [r["tokens_per_s"] for r in records[1:]] or [r["tokens_per_s"] for r in records]
    lines = [f"Mode: {result['mode']}; reference: {result['reference']}; trainable parameters "
             f"{result['trainable_params']:,} of {result['total_params']:,}; layout: {result['layout']}.", "",
             f"Data: {data['pairs']} preference pairs → {data['kept']} kept ({data['truncated']} truncated to "
             f"{data['seq_len']} tokens, {data['dropped']} dropped); {data['completion_tokens']} completion "
             f"tokens scored.", "",
             f"Loss: {records[0]['loss']:.4f} at step 1 → {result['final_loss']:.4f} at step {result['steps']}; "
             f"reward accuracy {records[0]['rewards/accuracies']:.3f} → {records[-1]['rewards/accuracies']:.3f}, "
             f"margin {records[0]['rewards/margins']:.4f} → {records[-1]['rewards/margins']:.4f}; mean "
             f"{sum(timed) / len(timed):,.0f} tokens/s (steps after the first).", ""]
    if "heldout" in result:
        h = result["heldout"]
        lines += [f"Held-out pairs ({h['pairs']}), merged model against the base: DPO loss {h['loss']:.4f} "
                  f"(the base's own: {np.log(2):.4f}), reward accuracy {h['rewards/accuracies']:.3f}, "
                  f"margin {h['rewards/margins']:.4f}.", ""]
    if result.get("model"):
        lines += [f"Merged model exported to `{result['model']}` (`job=build_engine` takes it).", ""]
    lines += ["| step | loss | reward acc. | margin | chosen | rejected | grad norm | lr |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['step']} | {r['loss']:.4f} | {r['rewards/accuracies']:.3f} | {r['rewards/margins']:.4f} | "
              f"{r['rewards/chosen']:.4f} | {r['rewards/rejected']:.4f} | {r['grad_norm']:.3f} | {r['lr']:.2e} |"
              for r in shown]
    return "\n".join(lines)
