"""Quantized linears through ATen's integer kernels: each path against the dequantized weight, the
fallbacks, and greedy decoding of a quantized engine against its dequantized-weight reference.

The kernels take bf16 activations and return bf16, so they are compared within bf16 rounding (a relative
2^-8 of the output's scale per linear), not bit for bit; decoding is held to >= 95% token agreement."""
from __future__ import annotations

import pytest
import torch

import puyu.serving.engine_model as em
from puyu.model import Transformer, get_flavor
from puyu.model.state_dict import puyu_state_dict
from puyu.serving.config import RuntimeConfig, SamplingParams
from puyu.serving.engine import engine_tensors
from puyu.serving.engine_model import LINEARS, EngineLinear, EngineModel
from puyu.serving.llm import LLM
from puyu.serving.quant import dequantize, quantize

KERNELS_AVAILABLE = all(hasattr(torch.ops.aten, op) for op in (
    "_weight_int8pack_mm", "_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu"))
needs_kernels = pytest.mark.skipif(not KERNELS_AVAILABLE, reason="this torch build lacks the integer kernels")


def reference(parts: dict, x: torch.Tensor) -> torch.Tensor:
    """``(x / act_scale) W^T`` over the dequantized weight, in fp32."""
    w = dequantize({k: v for k, v in parts.items() if k != "act_scale"})
    return torch.nn.functional.linear(x / parts.get("act_scale", torch.ones(x.shape[-1])), w)


def assert_bf16_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    assert float((got - want).abs().max()) <= 2 ** -7 * float(want.abs().max())


@needs_kernels
@pytest.mark.parametrize("mode,group", [("w8", 128), ("w4", 32), ("w4", 64), ("w4", 128), ("w4", 256)])
@pytest.mark.parametrize("shape", [(64, 256), (48, 512), (160, 768)])
def test_kernel_path_matches_the_dequantized_weight(mode, group, shape):
    """Decode-sized calls (odd row counts, 3-D inputs) go through the kernel and match the reference."""
    g = torch.Generator().manual_seed(0)
    O, I = shape
    w = torch.randn(O, I, generator=g)
    act = torch.rand(I, generator=g) + 0.5
    for parts in (quantize(w, mode, group), {**quantize(w * act, mode, group), "act_scale": act}):
        lin = EngineLinear(dict(parts), torch.float32)
        assert lin.kernel is not None
        for rows in ((1,), (3,), (7,), (2, 5), (lin.max_rows,)):
            x = torch.randn(*rows, I, generator=g)
            assert_bf16_close(lin(x), reference(parts, x))


@needs_kernels
@pytest.mark.parametrize("mode", ["w8", "w4"])
def test_calls_past_the_crossover_expand_the_weight_exactly(mode):
    """More rows than ``max_rows`` take the float path, which is the dequantized weight's result."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 256, generator=g)
    parts = quantize(w, mode, 128)
    lin = EngineLinear(dict(parts), torch.float32)
    x = torch.randn(lin.max_rows + 1, 256, generator=g)
    torch.testing.assert_close(lin(x), reference(parts, x), rtol=1e-5, atol=1e-5 * float(reference(parts, x).abs().max()))
    assert lin.scratch.buf is not None  # the weight was expanded, not sent through the kernel


@pytest.mark.parametrize("mode,group,shape,why", [
    ("w8", 128, (64, 200), "inputs not a multiple of 64"),
    ("w4", 128, (64, 200), "inputs padded to whole groups"),
    ("w4", 16, (64, 256), "group size the op lacks"),
    ("w4", 128, (40, 256), "outputs not a multiple of 16"),
])
def test_shapes_the_kernels_cannot_take_fall_back(mode, group, shape, why):
    g = torch.Generator().manual_seed(2)
    parts = quantize(torch.randn(*shape, generator=g), mode, group)
    lin = EngineLinear(dict(parts), torch.float32)
    assert lin.kernel is None, why
    x = torch.randn(3, shape[1], generator=g)
    want = reference(parts, x)
    torch.testing.assert_close(lin(x), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("mode", ["w8", "w4"])
def test_a_missing_op_falls_back(monkeypatch, mode):
    """A torch build without the kernel (the op raises) serves the linear through the float path."""
    def missing(*args):
        raise NotImplementedError("no CPU kernel")

    name = "_weight_int8pack_mm" if mode == "w8" else "_weight_int4pack_mm_for_cpu"
    monkeypatch.setattr(torch.ops.aten, name, missing, raising=False)
    g = torch.Generator().manual_seed(3)
    parts = quantize(torch.randn(64, 256, generator=g), mode, 128)
    lin = EngineLinear(dict(parts), torch.float32)
    assert lin.kernel is None
    x = torch.randn(1, 256, generator=g)
    want = reference(parts, x)
    torch.testing.assert_close(lin(x), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


@needs_kernels
@pytest.mark.parametrize("mode", ["w8", "w4"])
def test_quantized_engine_decodes_like_its_dequantized_reference(mode):
    """Greedy tokens of a quantized engine (kernels on decode steps) vs the same engine over the
    dequantized weights: bf16 activations may flip a near-tie (and every later token of that sequence
    with it), so >= 95% of tokens agree, position by position, rather than all."""
    torch.manual_seed(4)
    args = get_flavor("tiny")
    base = engine_tensors(args, {k: v.detach() for k, v in puyu_state_dict(Transformer(args).eval()).items()})
    quant, ref = dict(base), dict(base)
    for i in range(args.n_layers):
        for name in LINEARS:
            key = f"layers.{i}.{name}"
            parts = quantize(quant.pop(key + ".weight"), mode, 128)
            quant.update({f"{key}.{k}": v for k, v in parts.items()})
            ref[key + ".weight"] = dequantize(parts)
    model = EngineModel(args, quant)
    assert sum(lin.kernel is not None for layer in model.layers for lin in layer.values() if isinstance(lin, EngineLinear)) >= 4
    prompts = [[(5 * i + j) % 1000 + 1 for j in range(9 + i)] for i in range(5)]
    sp = SamplingParams(max_tokens=24, ignore_eos=True)
    got = [o.token_ids for o in LLM(model, runtime=RuntimeConfig(num_blocks=64)).generate(prompts, sp)]
    want = [o.token_ids for o in LLM(EngineModel(args, ref), runtime=RuntimeConfig(num_blocks=64)).generate(prompts, sp)]
    agree = sum(a == b for g_, w_ in zip(got, want) for a, b in zip(g_, w_))
    assert agree >= 0.95 * len(prompts) * sp.max_tokens, (agree, got, want)
