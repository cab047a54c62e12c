"""Quantization: int8 per output channel (w8), int4 group-wise (w4), and W8A8 (int8 weights, int8 activations).

Why weight-only (w8, w4): decoding is memory-bound, so shrinking weights is what speeds it up and saves
memory; activations stay in floating point. AWQ (Lin et al., 2023) observes that a few input channels carry
large activations; scaling those weight columns up by ``s`` before rounding (and the activations down by
``s``, which is exact in real arithmetic) protects them. ``s = mean|x|^alpha`` with ``alpha`` searched per
linear on calibration activations, minimising the error of the layer's output; ``alpha = 0`` (plain
rounding) is in the grid, so the search never does worse than no scaling on them. AWQ's clip search then
shrinks each output row's (w8) or group's (w4) range where rounding the few largest weights less
coarsely lowers that row's or group's output error; ratio 1 (no clip) is in the grid.

W8A8 (SmoothQuant, Xiao et al., 2023): activations are quantized per token at run time, and their outlier
channels would swamp an int8 range; ``s = max|x|^0.5 / max|w|^0.5`` per input channel moves half of the
difficulty into the weights. The build folds ``1/s`` into the RMSNorm before the linear where one exists.

Storage per quantized linear ``name`` (weight [O, I]):
- ``name.qweight``: int8 [O, I] (w8) or uint8 [O, Ipad/2] two int4 codes per byte (w4, I padded to groups);
- ``name.scales``: fp32 [O] (w8) or [O, Ipad/g] (w4); ``name.zeros``: uint8 [O, Ipad/g] (w4, asymmetric);
- ``name.act_scale``: fp32 [I], present when AWQ/SmoothQuant scaled the weight and the build could not fold
  ``1/s`` into what produces the linear's input (inputs are divided by it at run time);
- ``name.act_bits``: int64 scalar 8 for W8A8 (codes and scales as w8; inputs quantized per token at run time).
"""
from __future__ import annotations

import torch

Tensors = dict[str, torch.Tensor]
ALPHA_GRID = [i / 20 for i in range(21)]
CLIP_GRID = [1 - i / 20 for i in range(10)]  # fractions of a row's or group's range kept: 1.0 .. 0.55
CLIP_ROWS = 256  # calibration rows the clip search scores on
SMOOTH_ALPHA = 0.5  # SmoothQuant's migration strength


# ---- int8 per output channel (symmetric) ------------------------------------------------------------
def quantize_w8(w: torch.Tensor, clip: torch.Tensor | None = None) -> Tensors:
    """``clip`` [O]: fraction of each row's max |w| the int8 range spans (None: 1)."""
    amax = w.abs().amax(dim=1) if clip is None else w.abs().amax(dim=1) * clip
    scales = (amax / 127.0).clamp(min=1e-12)  # [O]
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return {"qweight": q, "scales": scales.float()}


def dequantize_w8(t: Tensors, dtype: torch.dtype) -> torch.Tensor:
    return (t["qweight"].to(dtype) * t["scales"].to(dtype)[:, None])


# ---- int4 group-wise (asymmetric, zero point per group) --------------------------------------------
def _pad_groups(w: torch.Tensor, group: int) -> torch.Tensor:
    pad = (-w.shape[1]) % group
    return torch.nn.functional.pad(w, (0, pad)) if pad else w


def quantize_w4(w: torch.Tensor, group: int, clip: torch.Tensor | None = None) -> Tensors:
    """``clip`` [O, G]: fraction of each group's range the 16 levels span (None: 1)."""
    O, I = w.shape
    wg = _pad_groups(w.float(), group).view(O, -1, group)  # [O, G, g]
    lo, hi = wg.amin(dim=2).clamp(max=0), wg.amax(dim=2).clamp(min=0)  # the range always holds 0 (padding)
    if clip is not None:
        lo, hi = lo * clip, hi * clip
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


def quantize(w: torch.Tensor, mode: str, group: int, clip: torch.Tensor | None = None) -> Tensors:
    """Parts of ``w`` [O, I] in ``mode`` w8 | w4 | w8a8; ``clip`` as ``quantize_w8``/``quantize_w4`` take it."""
    if mode == "w4":
        return quantize_w4(w, group, clip)
    parts = quantize_w8(w, clip)
    if mode == "w8a8":
        parts["act_bits"] = torch.tensor(8, dtype=torch.int64)
    return parts


def dequantize(t: Tensors, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight [O, I] a quantized linear stands for (still multiplied by ``act_scale``; W8A8's
    activation rounding is not part of it)."""
    return dequantize_w4(t, dtype) if "zeros" in t else dequantize_w8(t, dtype)


# ---- calibration: AWQ / SmoothQuant scales, clip search ------------------------------------------------
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


def smooth_scales(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """SmoothQuant's per-input-channel scale [I] for ``w`` [O, I] and calibration inputs ``x`` [N, I]."""
    xmax = x.float().abs().amax(dim=0).clamp(min=1e-5)
    wmax = w.float().abs().amax(dim=0).clamp(min=1e-5)
    return (xmax.pow(SMOOTH_ALPHA) / wmax.pow(1 - SMOOTH_ALPHA)).clamp(min=1e-5)


def search_scales(w: torch.Tensor, x: torch.Tensor, mode: str, group: int) -> tuple[torch.Tensor, float]:
    """The input-channel scale [I] for ``mode`` (w8a8: SmoothQuant's; else AWQ's search) and its alpha."""
    if mode == "w8a8":
        return smooth_scales(w, x), SMOOTH_ALPHA
    return awq_search(w, x, mode, group)


def clip_search(w: torch.Tensor, x: torch.Tensor, mode: str, group: int) -> torch.Tensor:
    """AWQ's clip ratios for ``w`` [O, I] on calibration inputs ``x`` [N, I]: [O] (w8, w8a8) or [O, G] (w4).

    Each row's (or group's) ratio from ``CLIP_GRID`` minimises its own share of the output error,
    ``sum_n (x_n,group . (w - deq(quant(w)))_group)^2``, on ``CLIP_ROWS`` evenly spaced rows of x. Output
    rows are scored in blocks so that the [N, rows, G] error tensor stays small.
    """
    w = w.float()
    x = x.float()[torch.linspace(0, x.shape[0] - 1, min(CLIP_ROWS, x.shape[0]), device=x.device).long()]
    g = group if mode == "w4" else w.shape[1]
    wp, xp = _pad_groups(w, g), _pad_groups(x, g)
    O, G = w.shape[0], wp.shape[1] // g
    xg = xp.view(-1, G, g)  # [N, G, g]
    best_err = torch.full((O, G), float("inf"), device=w.device)
    best = torch.ones(O, G, device=w.device)
    for ratio in CLIP_GRID:
        clip = torch.full((O, G), ratio, device=w.device)
        deq = dequantize(quantize(w, mode, group, clip if mode == "w4" else clip[:, 0]))
        diff = (wp - _pad_groups(deq, g)).view(O, G, g)
        for o in range(0, O, 1024):
            err = torch.einsum("ngk,ogk->nog", xg, diff[o:o + 1024]).pow(2).sum(dim=0)  # [rows, G]
            better = err < best_err[o:o + 1024]
            best_err[o:o + 1024] = torch.where(better, err, best_err[o:o + 1024])
            best[o:o + 1024] = torch.where(better, ratio, best[o:o + 1024])
    return best if mode == "w4" else best[:, 0]


def quantize_calibrated(w: torch.Tensor, x: torch.Tensor, mode: str, group: int) -> tuple[Tensors, torch.Tensor, float]:
    """Parts of ``w * s`` [O, I] with clip ratios from ``clip_search``, for calibration inputs ``x`` [N, I];
    also the scale ``s`` [I] that the inputs must be divided by (kept or folded by the caller) and alpha."""
    s, alpha = search_scales(w, x, mode, group)
    ws, xs = w.float() * s, x.float() / s
    return quantize(ws, mode, group, clip_search(ws, xs, mode, group)), s, alpha


def quantize_linear(w: torch.Tensor, mode: str, group: int, calib_x: torch.Tensor | None) -> tuple[Tensors, float]:
    """Quantized tensors for one linear and its alpha: plain rounding without calibration inputs; with them,
    ``quantize_calibrated`` with its scale kept as ``act_scale`` (the engine build folds it instead)."""
    if calib_x is None:
        return quantize(w.float(), mode, group), 0.0
    parts, s, alpha = quantize_calibrated(w, calib_x, mode, group)
    parts["act_scale"] = s.float()
    return parts, alpha
