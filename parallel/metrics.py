"""Per-step training metrics: a jsonl file, TensorBoard events and a progress line in the job log.

MFU follows the PaLM/Megatron accounting: ``6·N`` FLOPs per token (forward + backward) for the weights
that multiply — every parameter but the input embedding table, whose lookup is no matmul (a tied table
is the output head, so it counts) — plus ``12·L·d·T`` for attention scores and values (PaLM's
``6·L·H·Q·T`` doubled for forward + backward, with ``H·Q = d``), divided by the hardware's peak.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

from puyu.launcher.stage import Progress

log = logging.getLogger("puyu.train")


def matmul_params(args) -> int:
    """Parameters that multiply activations: all but the (untied) input embedding table."""
    return args.num_params() - (0 if args.tie_embeddings else args.vocab_size * args.dim)


def flops_per_token(args, seq_len: int, weight_flops_per_param: float = 6.0) -> float:
    """Model FLOPs per trained token of a ``ModelArgs`` model at ``seq_len`` (see the module docstring).
    ``weight_flops_per_param``: 6 (forward, input and weight gradients), 4 when no weight gradient is
    needed for most weights (LoRA)."""
    return weight_flops_per_param * matmul_params(args) + 12.0 * args.n_layers * args.dim * seq_len


class MetricsLog:
    """Written by global rank 0 only. On resume, records past the resumed step are dropped first."""

    def __init__(self, folder: Path, resume_step: int = 0, tensorboard: bool = True,
                 progress: Optional[Progress] = None):
        self.progress = progress  # the task's step counter, for ``puyu job=status``
        self.path = Path(folder) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # keep what led up to the checkpoint we resume from
            kept = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln)["step"] <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in kept))
        self._fh = self.path.open("a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(folder) / "tensorboard"), purge_step=resume_step + 1)

    def log(self, record: dict) -> None:
        self._fh.write(json.dumps(record, sort_keys=True) + "\n")
        self._fh.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"train/{key}", value, record["step"])
        mfu = f" mfu {record['mfu']:.1%}" if record.get("mfu") is not None else ""
        log.info("step %d loss %.4f grad_norm %.3f lr %.2e tokens/s %.0f%s", record["step"], record["loss"],
                 record["grad_norm"], record["lr"], record["tokens_per_s"], mfu)
        if self.progress is not None:
            self.progress.update(record["step"] - self.progress.n)

    def close(self) -> None:
        self._fh.close()
        if self.progress is not None:
            self.progress.close()
        if self._tb is not None:
            self._tb.close()


def mfu(tokens_per_s: float, flops_token: float, peak_tflops: Optional[float], world_size: int) -> Optional[float]:
    """Model FLOPs utilisation across the job; None when the peak is unknown (e.g. CPU runs)."""
    if not peak_tflops:
        return None
    return tokens_per_s * flops_token / (peak_tflops * 1e12 * world_size)
