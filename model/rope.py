"""Rotary position embeddings (RoPE) with linear and dynamic-NTK scaling.

InternLM2 and Llama HF both rotate the two halves of each head (``rotate_half``), so one convention
serves both layouts and no weight permutation is needed when converting checkpoints.

Scaling, as published with InternLM2 / Llama HF:
- linear: ``angle = (position / factor) * inv_freq``;
- dynamic NTK: while the sequence fits the trained length nothing changes; beyond it the base grows to
  ``base * (factor * L / L_train - (factor - 1)) ** (d / (d - 2))`` where ``L = max(position) + 1``.
"""
from __future__ import annotations

import torch

from puyu.model.config import ModelArgs


def rope_inv_freq(args: ModelArgs, seq_len: int, device: torch.device | None = None) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] (fp32) for a forward pass whose longest sequence is ``seq_len``."""
    d = args.head_dim
    base = args.rope_theta
    scaling = args.rope_scaling
    if scaling.kind == "dynamic" and seq_len > args.max_seq_len:
        base = base * ((scaling.factor * seq_len / args.max_seq_len) - (scaling.factor - 1)) ** (d / (d - 2))
    exponents = torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d
    return 1.0 / (base**exponents)


def rope_cos_sin(args: ModelArgs, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles for ``positions`` [B, T] -> two fp32 tensors [B, T, head_dim / 2].

    Positions are per token, so packed documents (positions restarting at 0) and KV-cache decoding
    (positions continuing from the cache length) need nothing special here.
    """
    seq_len = int(positions.max()) + 1 if positions.numel() else 0
    inv_freq = rope_inv_freq(args, seq_len, positions.device)  # [d/2]
    pos = positions.float()
    if args.rope_scaling.kind == "linear":
        pos = pos / args.rope_scaling.factor
    angles = pos[..., None] * inv_freq  # [B, T, d/2]
    return angles.cos(), angles.sin()
