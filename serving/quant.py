"""Weight-only quantization: int8 per output channel, int4 group-wise with AWQ activation-aware scales.

Why weight-only: decoding is memory-bound, so shrinking weights is what speeds it up and saves memory;
activations stay in floating point. AWQ (Lin et al., 2023) observes that a few input channels carry
large activations; scaling those weight columns up by ``s`` before rounding (and the activations down by
``s`` at run time, which is exact in real arithmetic) protects them. ``s = mean|x|^alpha`` with ``alpha``
searched per linear on calibration activations, minimising the error of the layer's output;
``alpha = 0`` (plain rounding) is in the grid, so the search never does worse than no scaling on them.

Storage per quantized linear ``name`` (weight [O, I]):
- ``name.qweight``: int8 [O, I] (w8) or uint8 [O, Ipad/2] two int4 codes per byte (w4, I padded to groups);
- ``name.scales``: fp32 [O] (w8) or [O, Ipad/g] (w4); ``name.zeros``: uint8 [O, Ipad/g] (w4, asymmetric);
- ``name.act_scale``: fp32 [I], present when AWQ scaled the weight (inputs are divided by it).
"""
from __future__ import annotations

import torch

Tensors = dict[str, torch.Tensor]
ALPHA_GRID = [i / 20 for i in range(21)]


# ---- int8 per output channel (symmetric) ------------------------------------------------------------
def quantize_w8(w: torch.Tensor) -> Tensors:
    scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # [O]
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return {"qweight": q, "scales": scales.float()}


def dequantize_w8(t: Tensors, dtype: torch.dtype) -> torch.Tensor:
    return (t["qweight"].to(dtype) * t["scales"].to(dtype)[:, None])


# ---- int4 group-wise (asymmetric, zero point per group) --------------------------------------------
def _pad_groups(w: torch.Tensor, group: int) -> torch.Tensor:
    pad = (-w.shape[1]) % group
    return torch.nn.functional.pad(w, (0, pad)) if pad else w


def quantize_w4(w: torch.Tensor, group: int) -> Tensors:
    O, I = w.shape
    wg = _pad_groups(w.float(), group).view(O, -1, group)  # [O, G, g]
    lo, hi = wg.amin(dim=2).clamp(max=0), wg.amax(dim=2).clamp(min=0)  # the range always holds 0 (padding)
    scales = ((hi - lo) / 15.0).clamp(min=1e-12)  # [O, G]
    zeros = torch.round(-lo / scales).clamp(0, 15)
    q = (torch.round(wg / scales[..., None]) + zeros[..., None]).clamp(0, 15).to(torch.uint8).view(O, -1)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)  # [O, Ipad/2]
    return {"qweight": packed, "scales": scales, "zeros": zeros.to(torch.uint8),
            "in_features": torch.tensor(I, dtype=torch.int64)}


def dequantize_w4(t: Tensors, dtype: torch.dtype) -> torch.Tensor:
    packed = t["qweight"]
    O = packed.shape[0]
    q = torch.stack([packed & 0xF, packed >> 4], dim=2).view(O, -1)  # [O, Ipad]
    scales, zeros = t["scales"], t["zeros"]
    group = q.shape[1] // scales.shape[1]
    w = (q.view(O, -1, group).to(dtype) - zeros[..., None].to(dtype)) * scales[..., None].to(dtype)
    return w.view(O, -1)[:, : int(t["in_features"])]


def quantize(w: torch.Tensor, mode: str, group: int) -> Tensors:
    return quantize_w8(w) if mode == "w8" else quantize_w4(w, group)


def dequantize(t: Tensors, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight [O, I] a quantized linear stands for (still multiplied by ``act_scale``)."""
    return dequantize_w4(t, dtype) if "zeros" in t else dequantize_w8(t, dtype)


# ---- AWQ scale search -------------------------------------------------------------------------------
def awq_search(w: torch.Tensor, x: torch.Tensor, mode: str, group: int) -> tuple[torch.Tensor, float]:
    """Per-input-channel scale [I] for ``w`` [O, I] given calibration inputs ``x`` [N, I], and its alpha.

    Minimises ``|x w^T - (x / s) deq(quant(w * s))^T|^2``; ``s`` is normalised to geometric mean 1 so
    the search does not trade against the quantization range.
    """
    w, x = w.float(), x.float()
    ref = x @ w.T  # [N, O]
    act = x.abs().mean(dim=0).clamp(min=1e-8)  # [I]
    best_err, best_s, best_alpha = float("inf"), torch.ones_like(act), 0.0
    for alpha in ALPHA_GRID:
        s = act.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        wq = dequantize(quantize(w * s[None, :], mode, group))
        err = float((ref - (x / s) @ wq.T).pow(2).mean())
        if err < best_err:
            best_err, best_s, best_alpha = err, s, alpha
    return best_s, best_alpha


def quantize_linear(w: torch.Tensor, mode: str, group: int, calib_x: torch.Tensor | None) -> tuple[Tensors, float]:
    """Quantized tensors for one linear (with ``act_scale`` when calibration inputs are given) and alpha."""
    if calib_x is None:
        return quantize(w.float(), mode, group), 0.0
    s, alpha = awq_search(w, calib_x, mode, group)
    out = quantize(w.float() * s[None, :], mode, group)
    out["act_scale"] = s.float()
    return out, alpha
