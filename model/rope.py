"""Rotary position embeddings (RoPE) with the scaling kinds Hugging Face checkpoints declare.

InternLM2, Llama and Qwen2 HF all rotate the two halves of each head (``rotate_half``), so one convention
serves every layout and no weight permutation is needed when converting checkpoints.

Scaling (``ModelArgs.rope_scaling``), computed the way ``transformers`` computes it so that logits agree
to fp32 rounding:
- linear: inverse frequencies divided by ``factor``;
- dynamic NTK: while the sequence fits the trained length nothing changes; beyond it the base grows to
  ``base * (factor * L / L_train - (factor - 1)) ** (d / (d - 2))`` where ``L = max(position) + 1``;
- llama3: low frequencies (long wavelengths) divided by ``factor``, high ones kept, a smooth ramp between;
- yarn: a ramp between interpolated and extrapolated frequencies over the dimensions whose rotation count
  in the original context lies between ``beta_slow`` and ``beta_fast``; cos and sin are multiplied by an
  attention factor (``0.1 * ln(factor) + 1`` unless given).
"""
from __future__ import annotations

import math

import torch

from puyu.model.config import ModelArgs


def _base_inv_freq(base: float, d: int, device) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))  # [d/2]


def _llama3(inv_freq: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    s = args.rope_scaling
    old_len = s.original_max_seq_len or args.max_seq_len
    low_wavelen, high_wavelen = old_len / s.low_freq_factor, old_len / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(args: ModelArgs, device) -> torch.Tensor:
    s, d, base = args.rope_scaling, args.head_dim, args.rope_theta
    old_len = s.original_max_seq_len or args.max_seq_len

    def correction_dim(rotations: float) -> float:  # the dimension that turns ``rotations`` times in old_len
        return d * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    pos_freqs = base ** (torch.arange(0, d, 2, device=device).float() / d)
    ramp = ((torch.arange(d // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1: keep the original frequency, 0: interpolate it by factor
    return (1.0 / (s.factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate


def rope_attention_scaling(args: ModelArgs) -> float:
    """The factor cos and sin are multiplied by (yarn's attention temperature; 1 for every other kind)."""
    s = args.rope_scaling
    if s.kind != "yarn":
        return 1.0
    if s.attention_factor:
        return s.attention_factor

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if s.mscale and s.mscale_all_dim:
        return mscale(s.factor, s.mscale) / mscale(s.factor, s.mscale_all_dim)
    return mscale(s.factor)


def rope_inv_freq(args: ModelArgs, seq_len: int, device: torch.device | None = None) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] (fp32) for a forward pass whose longest sequence is ``seq_len``."""
    d, s = args.head_dim, args.rope_scaling
    if s.kind == "yarn":
        return _yarn(args, device)
    base = args.rope_theta
    if s.kind == "dynamic" and seq_len > args.max_seq_len:
        base = base * ((s.factor * seq_len / args.max_seq_len) - (s.factor - 1)) ** (d / (d - 2))
    inv_freq = _base_inv_freq(base, d, device)
    if s.kind == "linear":
        return inv_freq / s.factor
    if s.kind == "llama3":
        return _llama3(inv_freq, args)
    return inv_freq


def rope_cos_sin(args: ModelArgs, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles for ``positions`` [B, T] -> two fp32 tensors [B, T, head_dim / 2].

    Positions are per token, so packed documents (positions restarting at 0) and KV-cache decoding
    (positions continuing from the cache length) need nothing special here.
    """
    seq_len = int(positions.max()) + 1 if positions.numel() else 0
    inv_freq = rope_inv_freq(args, seq_len, positions.device)  # [d/2]
    angles = positions.float()[..., None] * inv_freq  # [B, T, d/2]
    scale = rope_attention_scaling(args)
    if scale != 1.0:
        return angles.cos() * scale, angles.sin() * scale
    return angles.cos(), angles.sin()
