"""Quantized linears at run time: the CPU kernels of ``csrc/serving/quant_linear.cpp`` and their PyTorch references.

Why kernels: decoding one token reads every weight once, so a step costs the weights' bytes over memory
bandwidth. Expanding the int8/int4 codes into a float copy of the whole weight on every call (what serving
did) moves more bytes than fp32 weights would. The kernels read each code once and expand it in registers
or in a few cache-resident rows, so w8 streams a quarter and w4 about an eighth of fp32's bytes.

Modes (parts as stored by :mod:`puyu.serving.quant`, weight [O, I]):
- ``w8``: ``qweight`` int8 [O, I], ``scales`` [O]; ``y = (x q^T) * scales``.
- ``w4``: ``qweight`` uint8 [O, Ip/2], ``scales``/``zeros`` [O, G]; ``w = (q - zero) * scale``, which the
  kernel takes as ``q * scale + offset`` with ``offset = -zero * scale`` computed here once.
- ``w8a8``: as ``w8`` plus ``act_bits`` (8): x is quantized per row (token) to int8 at run time and the
  dot products are integer ones (SmoothQuant's W8A8; the smoothing itself is folded in at build time).
``act_scale`` [I], where present, divides x first (AWQ/SmoothQuant scales not folded into a norm).

The kernels serve fp32 inputs on CPUs where the extension was built with AVX2; anything else (bf16
engines, CUDA, a baseline build) takes the reference, which expands the weight per call.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from puyu.serving import ops

Tensors = dict[str, torch.Tensor]


def _kernels() -> object | None:
    """The serving extension when it has the (AVX2-only) quantized-linear kernels, else None."""
    ext = ops.extension()
    return ext if ext is not None and ext.cpu_isa() == "avx2" else None


# ---- references ---------------------------------------------------------------------------------------------
def w8_linear_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, I] -> [M, O]: ``(x q^T) * scales`` in x's dtype."""
    return F.linear(x, qweight.to(x.dtype)) * scales.to(x.dtype)


def w4_weight(qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, in_features: int) -> torch.Tensor:
    """The float weight [O, in_features] of packed int4 codes [O, Ip/2] (low nibble first) and per-group
    ``scales``/``offsets`` [O, G]: ``q * scale + offset``."""
    O, G = scales.shape
    q = torch.stack([qweight & 0xF, qweight >> 4], dim=2).view(O, G, -1).to(scales.dtype)  # [O, G, g]
    return (q * scales[..., None] + offsets[..., None]).view(O, -1)[:, :in_features]


def w4_linear_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                        offsets: torch.Tensor) -> torch.Tensor:
    """x [M, I] -> [M, O] through ``w4_weight`` (I = x's width, at most the padded width of the codes)."""
    return F.linear(x, w4_weight(qweight, scales, offsets, x.shape[-1]).to(x.dtype))


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 of x [M, I]: codes (as x's dtype, -127..127, rounded half to even) and
    scales [M, 1] = max|row| / 127 (1 for an all-zero row)."""
    amax = x.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    return torch.round(x / scale), scale


def w8a8_linear_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, I] -> [M, O]: x quantized per row, exact integer dot products (fp64), both scales after."""
    xq, xs = quantize_rows(x.float())
    return (F.linear(xq.double(), qweight.double()) * xs.double() * scales.double()).to(x.dtype)


# ---- run-time linear --------------------------------------------------------------------------------------
class QuantLinear:
    """A quantized linear's parts, prepared once (float tensors in ``dtype``; w4 offsets), called as
    ``x [..., I] -> x W^T [..., O]`` through the kernel where it applies, else the reference."""

    def __init__(self, parts: Tensors, dtype: torch.dtype):
        self.qweight = parts["qweight"]
        self.act_scale = parts["act_scale"].to(dtype) if "act_scale" in parts else None  # [I]
        self.mode = "w4" if "zeros" in parts else ("w8a8" if "act_bits" in parts else "w8")
        self.scales = parts["scales"].to(torch.float32)  # [O] or [O, G]
        if self.mode == "w4":
            self.offsets = -parts["zeros"].to(torch.float32) * self.scales  # [O, G]
            self.group = self.qweight.shape[1] * 2 // self.scales.shape[1]
        self.dtype = dtype
        self.ext = _kernels() if self.qweight.device.type == "cpu" else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_scale is not None:
            x = x / self.act_scale
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # [M, I]
        if self.ext is not None and x2.dtype == torch.float32 and (self.mode != "w4" or self.group % 16 == 0):
            x2 = x2.contiguous()
            if self.mode == "w4":
                y = self.ext.w4_linear(x2, self.qweight, self.scales, self.offsets)
            else:
                y = self.ext.w8_linear(x2, self.qweight, self.scales, self.mode == "w8a8")
        elif self.mode == "w4":
            y = w4_linear_reference(x2, self.qweight, self.scales, self.offsets)
        elif self.mode == "w8a8":
            y = w8a8_linear_reference(x2, self.qweight, self.scales)
        else:
            y = w8_linear_reference(x2, self.qweight, self.scales)
        return y.view(*shape[:-1], y.shape[-1])
