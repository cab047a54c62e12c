"""Fused ops (puyu.model.ops, csrc/) against their PyTorch references: forward, backward, gradcheck."""
import logging
import subprocess
import sys

import pytest
import torch

from puyu.model import ops

needs_ext = pytest.mark.skipif(not ops.extension_available("cpu"), reason="fused ops extension not built")
DTYPES = [torch.float32, torch.bfloat16]
# (forward, gradient) tolerances: bf16 outputs are compared after one rounding on each side
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _grads(fn, inputs, grad_out):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward(outs, grad_out)
    return outs, [t.grad for t in leaves]


def _assert_same(fused_fn, ref_fn, inputs, dtype):
    torch.manual_seed(1)
    ref_outs = ref_fn(*inputs)
    ref_outs = ref_outs if isinstance(ref_outs, tuple) else (ref_outs,)
    grad_out = tuple(torch.randn_like(o) for o in ref_outs)
    f_outs, f_grads = _grads(fused_fn, inputs, grad_out)
    r_outs, r_grads = _grads(ref_fn, inputs, grad_out)
    for f, r in zip(f_outs, r_outs):
        assert f.dtype == r.dtype and f.shape == r.shape
        torch.testing.assert_close(f, r, **TOL[dtype])
    for f, r in zip(f_grads, r_grads):
        torch.testing.assert_close(f, r, **TOL[dtype])


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 7), (2, 5, 256), (64, 1000)])
def test_rms_norm_matches_reference(dtype, shape):
    x = torch.randn(shape, dtype=dtype)
    w = torch.randn(shape[-1], dtype=dtype)
    _assert_same(lambda x, w: ops.rms_norm(x, w, 1e-5), lambda x, w: ops.rms_norm_reference(x, w, 1e-5), [x, w], dtype)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 4, 1, 2), (2, 9, 8, 2, 64), (1, 33, 6, 6, 16)])
def test_rope_matches_reference(dtype, shape):
    B, T, hq, hk, d = shape
    q, k = torch.randn(B, T, hq, d, dtype=dtype), torch.randn(B, T, hk, d, dtype=dtype)
    angles = torch.rand(B, T, d // 2) * 100
    cos, sin = angles.cos(), angles.sin()
    _assert_same(
        lambda q, k: ops.apply_rope(q, k, cos, sin), lambda q, k: ops.rope_reference(q, k, cos, sin), [q, k], dtype
    )


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5,), (3, 17), (2, 64, 688)])
def test_swiglu_matches_reference(dtype, shape):
    gate, up = torch.randn(shape, dtype=dtype) * 4, torch.randn(shape, dtype=dtype)
    gate.view(-1)[0] = 100.0  # saturating sigmoid on both sides
    gate.view(-1)[-1] = -100.0
    _assert_same(ops.swiglu, ops.swiglu_reference, [gate, up], dtype)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("n_tokens,vocab,chunk_rows", [(1, 7, None), (37, 500, 8), (64, 3000, 64)])
def test_linear_cross_entropy_matches_reference(dtype, reduction, n_tokens, vocab, chunk_rows):
    hidden = torch.randn(n_tokens, 32, dtype=dtype)
    weight = torch.randn(vocab, 32, dtype=dtype) * 0.5
    target = torch.randint(0, vocab, (n_tokens,))
    target[::5] = -100  # ignored positions (the first one too)
    if n_tokens == 1:
        target[0] = 3
    torch.manual_seed(2)
    grad = torch.randn(())

    def run(fn):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        loss = fn(h, w)
        (loss * grad).backward()
        return loss, h.grad, w.grad

    f = run(lambda h, w: ops.linear_cross_entropy(h, w, target, reduction=reduction, chunk_rows=chunk_rows))
    r = run(lambda h, w: ops.linear_cross_entropy_reference(h, w, target, reduction=reduction))
    assert f[0].dtype == r[0].dtype == torch.float32
    if dtype == torch.float32:
        torch.testing.assert_close(f[0], r[0], atol=1e-4, rtol=1e-5)
        tol = TOL[dtype]
    else:  # bf16 logits and gradients are rounded on both sides, in different orders
        torch.testing.assert_close(f[0], r[0], atol=2e-2, rtol=1e-2)
        tol = dict(atol=3e-2, rtol=3e-2)
    for a, b in zip(f[1:], r[1:]):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("use_ext", [False, pytest.param(True, marks=needs_ext)])
def test_linear_cross_entropy_under_no_grad(monkeypatch, use_ext):
    """Evaluation: no gradient work (the kernel is asked for none) and the same loss."""
    hidden, weight = torch.randn(20, 16, requires_grad=True), torch.randn(300, 16, requires_grad=True)
    target = torch.randint(0, 300, (20,))
    kernel = ops._ext.ce_chunk if use_ext else ops._ce_chunk_torch
    asked = []
    spy = lambda *a: asked.append(a[-1]) or kernel(*a)  # noqa: E731
    monkeypatch.setattr(ops, "_ce_chunk_torch", spy)
    if use_ext:
        monkeypatch.setattr(ops._ext, "ce_chunk", spy)
    else:
        monkeypatch.setattr(ops, "_use_ext", lambda fused, t: False)
    with torch.no_grad():
        loss = ops.linear_cross_entropy(hidden, weight, target, chunk_rows=8)
    assert asked == [False, False, False] and loss.grad_fn is None
    torch.testing.assert_close(loss, ops.linear_cross_entropy_reference(hidden, weight, target).detach())


@pytest.mark.parametrize("frozen", ["weight", "hidden"])
def test_linear_cross_entropy_with_a_frozen_input_computes_only_the_other_gradient(monkeypatch, frozen):
    """LoRA freezes the output head: its [V, D] gradient product is skipped, the hidden gradient is exact."""
    hidden, weight = torch.randn(40, 16, dtype=torch.float64), torch.randn(300, 16, dtype=torch.float64)
    target = torch.randint(0, 300, (40,))
    target[::7] = -100
    (hidden if frozen == "weight" else weight).requires_grad_(True)
    calls = []
    mm = torch.Tensor.addmm_
    monkeypatch.setattr(torch.Tensor, "addmm_", lambda self, *a, **k: calls.append("grad_weight") or mm(self, *a, **k))
    got = ops.linear_cross_entropy(hidden, weight, target, reduction="sum", chunk_rows=16)
    want = ops.linear_cross_entropy_reference(hidden, weight, target, reduction="sum")
    live = hidden if frozen == "weight" else weight
    (g_got,), (g_want,) = torch.autograd.grad(got * 2, [live]), torch.autograd.grad(want * 2, [live])
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g_got, g_want)
    assert (calls == []) == (frozen == "weight")


@pytest.mark.parametrize("use_ext", [False, pytest.param(True, marks=needs_ext)])
def test_linear_cross_entropy_under_autocast_multiplies_in_the_autocast_dtype(monkeypatch, use_ext):
    """Autocast cannot reach the chunked products (they write into a buffer), so the op casts as a linear
    is cast: fp32 master weights then give the bf16 product the reference gives under autocast, not an
    fp32 one (on a GPU the head is the largest matmul of a step)."""
    if not use_ext:
        monkeypatch.setattr(ops, "_ext", None)
    torch.manual_seed(0)
    hidden, weight = torch.randn(300, 64), torch.randn(1000, 64)
    target = torch.randint(0, 1000, (300,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (fused, ref), grads = zip(*(_grads(lambda h, w: ops.linear_cross_entropy(h, w, target, fused=f), (hidden, weight),
                                           (torch.tensor(1.0),)) for f in (True, False)))
    assert fused[0].dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads[0])
    torch.testing.assert_close(fused[0], ref[0], atol=1e-5, rtol=1e-5)  # an fp32 product is off by ~1e-2
    for g_fused, g_ref in zip(*grads):
        torch.testing.assert_close(g_fused, g_ref, atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("use_ext", [False, pytest.param(True, marks=needs_ext)])
def test_cross_entropy_chunk_kernel_contract(use_ext):
    """The per-chunk kernel (extension or torch) leaves grad_scale * (softmax - onehot) in the logits."""
    logits = torch.randn(6, 50, dtype=torch.float64)
    target = torch.tensor([0, 49, -100, 7, 7, 3])
    kernel = ops._ext.ce_chunk if use_ext else ops._ce_chunk_torch
    work = logits.clone()
    loss = kernel(work, target, -100, 0.5, True)
    valid = target != -100
    expected_loss = torch.nn.functional.cross_entropy(logits, target.clamp(min=0), reduction="none") * valid
    expected_grad = (logits.softmax(-1) - torch.nn.functional.one_hot(target.clamp(min=0), 50)) * 0.5 * valid[:, None]
    torch.testing.assert_close(loss, expected_loss)
    torch.testing.assert_close(work, expected_grad)


@needs_ext
def test_gradcheck_double():
    torch.manual_seed(0)
    d = dict(dtype=torch.float64, requires_grad=True)
    x, w = torch.randn(4, 6, **d), torch.randn(6, **d)
    assert torch.autograd.gradcheck(lambda x, w: ops.rms_norm(x, w, 1e-5), (x, w))
    q, k = torch.randn(2, 3, 4, 8, **d), torch.randn(2, 3, 2, 8, **d)
    angles = torch.rand(2, 3, 4, dtype=torch.float64) * 10
    assert torch.autograd.gradcheck(lambda q, k: ops.apply_rope(q, k, angles.cos(), angles.sin()), (q, k))
    g, u = torch.randn(3, 5, **d), torch.randn(3, 5, **d)
    assert torch.autograd.gradcheck(ops.swiglu, (g, u))
    h, wo = torch.randn(5, 4, **d), torch.randn(11, 4, **d)
    t = torch.tensor([1, -100, 10, 0, 4])
    assert torch.autograd.gradcheck(lambda h, wo: ops.linear_cross_entropy(h, wo, t, chunk_rows=2), (h, wo))


def test_fallback_to_reference_without_extension(monkeypatch):
    """With no extension the fused path is the reference, and a CUDA-less build says so for cuda."""
    x, w = torch.randn(4, 8), torch.randn(8)
    monkeypatch.setattr(ops, "_ext", None)
    assert not ops.extension_available("cpu")
    assert torch.equal(ops.rms_norm(x, w, 1e-5, fused=True), ops.rms_norm_reference(x, w, 1e-5))
    h, wo, t = torch.randn(9, 4), torch.randn(13, 4), torch.randint(0, 13, (9,))
    torch.testing.assert_close(ops.linear_cross_entropy(h, wo, t, chunk_rows=4),
                               ops.linear_cross_entropy_reference(h, wo, t))


def test_missing_extension_logs_a_line():
    code = (
        "import logging, sys; logging.basicConfig(level=logging.WARNING); "
        "sys.modules['puyu.model._fused_ops'] = None; "
        "from puyu.model import ops; assert not ops.extension_available('cpu')"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "fused ops extension not built" in res.stderr and "PyTorch reference" in res.stderr


@needs_ext
def test_device_without_kernels_falls_back_and_warns_once(monkeypatch, caplog):
    monkeypatch.setattr(ops, "_warned_devices", set())
    on_meta = torch.empty(0, device="meta")
    with caplog.at_level(logging.WARNING, logger=ops.__name__):
        assert not ops._use_ext(True, on_meta)
        assert not ops._use_ext(True, on_meta)
    assert sum("no meta kernels" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_kernels_match_reference(dtype):
    assert ops.extension_available("cuda"), "extension was built without CUDA kernels"
    dev = "cuda"
    x, w = torch.randn(33, 1000, dtype=dtype, device=dev), torch.randn(1000, dtype=dtype, device=dev)
    _assert_same(lambda x, w: ops.rms_norm(x, w, 1e-5), lambda x, w: ops.rms_norm_reference(x, w, 1e-5), [x, w], dtype)
    q, k = torch.randn(2, 9, 8, 64, dtype=dtype, device=dev), torch.randn(2, 9, 2, 64, dtype=dtype, device=dev)
    ang = torch.rand(2, 9, 32, device=dev) * 50
    _assert_same(lambda q, k: ops.apply_rope(q, k, ang.cos(), ang.sin()),
                 lambda q, k: ops.rope_reference(q, k, ang.cos(), ang.sin()), [q, k], dtype)
    g, u = torch.randn(7, 300, dtype=dtype, device=dev), torch.randn(7, 300, dtype=dtype, device=dev)
    _assert_same(ops.swiglu, ops.swiglu_reference, [g, u], dtype)
    h, wo = torch.randn(50, 64, dtype=dtype, device=dev), torch.randn(5000, 64, dtype=dtype, device=dev)
    t = torch.randint(0, 5000, (50,), device=dev)
    t[::7] = -100
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(ops.linear_cross_entropy(h, wo, t, chunk_rows=16),
                               ops.linear_cross_entropy_reference(h, wo, t), **tol)
