"""Quantized-linear kernels (csrc/serving/quant_linear.cpp) against their PyTorch references, across shapes.

Shapes cover both kernel paths (M <= 4: codes expanded in registers; larger M: rows expanded into a
buffer), row and column tails (N not a multiple of the 4- and 2-row tiles, K not a multiple of 16),
tiny dims, and w4 group sizes 16..128 with padded last groups.
"""
from __future__ import annotations

import pytest
import torch

from puyu.serving import ops, qlinear
from puyu.serving.qlinear import (QuantLinear, quantize_rows, w4_linear_reference, w8_linear_reference,
                                  w8a8_linear_reference)
from puyu.serving.quant import dequantize, quantize

ext = qlinear._kernels()  # noqa: SLF001
needs_kernels = pytest.mark.skipif(ext is None, reason="no AVX2 quantized-linear kernels in this build")
SHAPES = [(1, 1, 1), (1, 7, 3), (2, 16, 4), (3, 17, 5), (4, 33, 9), (5, 31, 7), (9, 200, 130), (32, 256, 67)]


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    """fp32 sums in another order: relative to the output's scale, plus a few ulps of each entry."""
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()) + 1e-7)


@needs_kernels
@pytest.mark.parametrize("M,K,N", SHAPES)
def test_w8_kernel_matches_reference(M, K, N):
    g = torch.Generator().manual_seed(M * 1000 + K)
    parts = quantize(torch.randn(N, K, generator=g), "w8", 128)
    x = torch.randn(M, K, generator=g)
    close(ext.w8_linear(x, parts["qweight"], parts["scales"]), w8_linear_reference(x, parts["qweight"], parts["scales"]))


@needs_kernels
@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("group", [16, 32, 128])
def test_w4_kernel_matches_reference(M, K, N, group):
    g = torch.Generator().manual_seed(M * 1000 + K + group)
    parts = quantize(torch.randn(N, K, generator=g), "w4", group)
    offsets = -parts["zeros"].float() * parts["scales"]
    x = torch.randn(M, K, generator=g)
    got = ext.w4_linear(x, parts["qweight"], parts["scales"], offsets)
    close(got, w4_linear_reference(x, parts["qweight"], parts["scales"], offsets))
    close(got, x @ dequantize(parts).T)  # the offsets form is the stored (q - zero) * scale


@needs_kernels
@pytest.mark.parametrize("M,K,N", SHAPES)
def test_w8a8_kernel_matches_reference(M, K, N):
    g = torch.Generator().manual_seed(M * 1000 + K + 7)
    parts = quantize(torch.randn(N, K, generator=g), "w8", 128)
    x = torch.randn(M, K, generator=g)
    x[0] = 0  # an all-zero row (scale 1, output 0)
    got = ext.w8_linear(x, parts["qweight"], parts["scales"], True)
    want = w8a8_linear_reference(x, parts["qweight"], parts["scales"])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))
    assert torch.equal(got[0], torch.zeros(N))


def test_w8a8_reference_is_the_per_token_int8_product():
    x = torch.tensor([[1.0, -0.5, 0.25], [0.0, 0.0, 0.0]])
    xq, xs = quantize_rows(x)
    assert xq.tolist() == [[127, -64, 32], [0, 0, 0]] and xs[:, 0].tolist() == pytest.approx([1 / 127, 1.0])
    q, s = torch.tensor([[1, 2, 3]], dtype=torch.int8), torch.tensor([0.5])
    assert w8a8_linear_reference(x, q, s)[:, 0].tolist() == pytest.approx([(127 - 128 + 96) / 127 * 0.5, 0.0])


@needs_kernels
def test_kernels_refuse_bad_shapes_and_dtypes():
    x, q8, s = torch.randn(2, 8), torch.zeros(4, 8, dtype=torch.int8), torch.ones(4)
    with pytest.raises(RuntimeError, match="w8_linear: x must be contiguous fp32"):
        ext.w8_linear(x.double(), q8, s)
    with pytest.raises(RuntimeError, match="w8_linear: x .M, K., qweight .N, K."):
        ext.w8_linear(torch.randn(2, 9), q8, s)
    with pytest.raises(RuntimeError, match="w8a8_linear: scales/offsets must be"):
        ext.w8_linear(x, q8, torch.ones(3), True)
    q4, s4 = torch.zeros(4, 12, dtype=torch.uint8), torch.ones(4, 2)
    with pytest.raises(RuntimeError, match="multiple of 16"):  # 24 columns in 2 groups of 12
        ext.w4_linear(torch.randn(2, 24), q4, s4, s4)
    q4 = torch.zeros(4, 16, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="do not fit"):  # 32 padded columns, 2 groups of 16: 17..32 fit
        ext.w4_linear(torch.randn(2, 16), q4, s4, s4)


@pytest.mark.parametrize("mode", ["w8", "w4", "w8a8"])
def test_quant_linear_routes_to_the_kernel_and_keeps_its_semantics(mode):
    """QuantLinear (AWQ ``act_scale`` included) gives its reference on fp32 CPU inputs, through the kernel
    when built, and the same on bf16 inputs, which always take the reference."""
    g = torch.Generator().manual_seed(1)
    w, act = torch.randn(70, 200, generator=g), torch.rand(200, generator=g) + 0.5
    parts = {**quantize(w * act, "w4" if mode == "w4" else "w8", 32), "act_scale": act}
    if mode == "w8a8":
        parts["act_bits"] = torch.tensor(8)
    lin = QuantLinear(parts, torch.float32)
    assert (lin.ext is not None) == (qlinear._kernels() is not None) and lin.mode == mode  # noqa: SLF001
    x = torch.randn(2, 3, 200, generator=g)  # [B, T, I]
    got = lin(x)
    xs = (x / act).reshape(6, 200)
    want = (w8a8_linear_reference(xs, parts["qweight"], parts["scales"]) if mode == "w8a8"
            else xs @ dequantize({k: v for k, v in parts.items() if k != "act_scale"}).T).view(2, 3, 70)
    close(got, want)
    lo = QuantLinear(parts, torch.bfloat16)(x.bfloat16())
    assert lo.dtype == torch.bfloat16 and (lo.float() - want).abs().max() < 0.05 * want.abs().max()
    assert ops.extension_available("cpu") or lin.ext is None
