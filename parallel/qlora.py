"""QLoRA (Dettmers et al., 2023): LoRA adapters over a frozen base held in 4-bit NormalFloat.

``lora.quant=nf4`` swaps the ``base_layer`` of every peft LoRA linear for a ``bitsandbytes``
``Linear4bit`` once the base weights are materialised: the frozen weights take half a byte per value
(plus one absmax per 64) instead of four, the adapters stay in full precision and train as before, and
the base's output is ``x @ dequant(W_nf4).T`` (bitsandbytes computes it in ``compute_dtype``).

The model trained is therefore ``dequant(W_nf4) + B A``, not ``W + B A``: the export merges the adapters
into the base after the same NF4 round trip (:func:`round_trip_nf4`), so the merged model is the one
whose loss the run reported.
"""
from __future__ import annotations

import torch
from torch import nn

from puyu.launcher.errors import PuyuError


def _bitsandbytes():
    try:
        import bitsandbytes
    except Exception as exc:  # missing, or no backend for this platform: a clear refusal
        raise PuyuError(f"lora.quant=nf4 needs bitsandbytes with 4-bit support here ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}); set lora.quant=none") from exc
    return bitsandbytes


def _lora_bases(model: nn.Module):
    """(LoRA layer, its plain ``nn.Linear`` base) for every adapted linear."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer) and type(module.base_layer) is nn.Linear:
            yield module, module.base_layer


def quantize_frozen_base(model: nn.Module, compute_dtype: torch.dtype) -> dict[str, int]:
    """Replace each LoRA base linear by an NF4 ``Linear4bit`` on the same device; returns the base bytes
    before and after (what the report shows)."""
    bnb = _bitsandbytes()
    before = after = 0
    for lora_layer, linear in list(_lora_bases(model)):
        weight = linear.weight.detach()  # [O, I]
        device = weight.device
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute_dtype, quant_type="nf4", device="cpu")
        q.weight = bnb.nn.Params4bit(weight.to("cpu", torch.float32), requires_grad=False, quant_type="nf4")
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        q = q.to(device)  # Params4bit quantizes when moved
        before += weight.numel() * weight.element_size()
        absmax = q.weight.quant_state.absmax  # one per 64 weights (uint8 when double-quantized)
        after += q.weight.numel() * q.weight.element_size() + absmax.numel() * absmax.element_size()
        lora_layer.base_layer = q
    if not before:
        raise PuyuError("lora.quant=nf4: no LoRA-adapted linear to quantize (check lora.targets)")
    return {"base_bytes_fp": before, "base_bytes_nf4": after}


@torch.no_grad()
def round_trip_nf4(model: nn.Module) -> None:
    """Set each LoRA base weight to ``dequant(quant_nf4(W))``: the base the adapters were trained on."""
    bnb = _bitsandbytes()
    for _, linear in _lora_bases(model):
        w = linear.weight
        # as Params4bit does it: blocks of 64, their absmax quantized again (QLoRA's double quantization)
        packed, state = bnb.functional.quantize_4bit(w.detach().to("cpu", torch.float32), quant_type="nf4",
                                                     compress_statistics=True)
        w.copy_(bnb.functional.dequantize_4bit(packed, state).to(w.device, w.dtype))
