"""The CUDA kernels (csrc/cuda) against the PyTorch references on a GPU: forward and gradients of RMSNorm,
RoPE, SwiGLU and the chunked linear + cross-entropy over shapes that reach each kernel's edge cases, the
per-chunk cross-entropy kernel's in-place contract, fp64 gradchecks, opcheck of the custom ops with CUDA
tensors, and a compiled block. Every test is ``cuda``-marked: skipped without a GPU, run by
scripts/gpu_check.sh (which builds the extension with CUDA first)."""
import pytest
import torch

from puyu.model import ops
from test_ops_custom import _OpLog, compiled_block_matches_eager

pytestmark = pytest.mark.cuda
DEV = "cuda"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (forward and gradient) tolerances: low-precision outputs are compared after one rounding on each side
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
       torch.float16: dict(atol=2e-3, rtol=2e-3)}


@pytest.fixture(autouse=True)
def _cuda_kernels_built():
    assert ops.extension_available(DEV), "the extension was built without CUDA kernels (CUDA_HOME unset at build?)"


def _check(op, fused_fn, ref_fn, inputs, tol):
    """Outputs and input gradients of ``fused_fn`` and ``ref_fn`` for the same random output gradients; the
    fused call must run the custom ``op`` forward and backward (not the reference fallback)."""
    ref_outs = ref_fn(*inputs)
    ref_outs = ref_outs if isinstance(ref_outs, tuple) else (ref_outs,)
    grads_out = tuple(torch.randn_like(o) for o in ref_outs)
    results = []
    for fn in (fused_fn, ref_fn):
        leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
        with _OpLog() as log:
            outs = fn(*leaves)
            outs = outs if isinstance(outs, tuple) else (outs,)
            torch.autograd.backward(outs, grads_out)
        results.append((outs, [t.grad for t in leaves], log.names))
    (f_outs, f_grads, f_ops), (r_outs, r_grads, _) = results
    assert op in f_ops, f"{op} did not run: {sorted(f_ops)}"
    for f, r in zip(f_outs, r_outs):
        assert f.dtype == r.dtype and f.shape == r.shape and f.device.type == DEV
        torch.testing.assert_close(f, r, **tol)
    for f, r in zip(f_grads, r_grads):
        torch.testing.assert_close(f, r, **tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (33, 1000), (130, 4099), (2, 3, 8192)])
def test_rms_norm(shape, dtype):
    """Rows shorter and longer than a block (256 threads); more rows than dweight's 64 row slices."""
    x, w = torch.randn(shape, dtype=dtype, device=DEV), torch.randn(shape[-1], dtype=dtype, device=DEV)
    _check("puyu.rms_norm_backward", lambda x, w: ops.rms_norm(x, w, 1e-5),
           lambda x, w: ops.rms_norm_reference(x, w, 1e-5), [x, w], TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,Hq,Hk,d", [(1, 1, 4, 1, 2), (2, 9, 8, 2, 64), (1, 300, 32, 8, 128)])
def test_rope(B, T, Hq, Hk, d, dtype):
    """The backward is the same kernel rotating back (inverse=True)."""
    q = torch.randn(B, T, Hq, d, dtype=dtype, device=DEV)
    k = torch.randn(B, T, Hk, d, dtype=dtype, device=DEV)
    angles = torch.rand(B, T, d // 2, device=DEV) * 100
    cos, sin = angles.cos(), angles.sin()
    _check("puyu.rope", lambda q, k: ops.apply_rope(q, k, cos, sin), lambda q, k: ops.rope_reference(q, k, cos, sin),
           [q, k], TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5,), (7, 300), (4, 512, 2752)])
def test_swiglu(shape, dtype):
    gate = torch.randn(shape, dtype=dtype, device=DEV) * 4
    up = torch.randn(shape, dtype=dtype, device=DEV)
    gate.view(-1)[0], gate.view(-1)[-1] = 30.0, -30.0  # saturated sigmoid at both ends
    _check("puyu.swiglu_backward", ops.swiglu, ops.swiglu_reference, [gate, up], TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("n_tokens,vocab,chunk_rows", [(1, 7, None), (50, 5000, 16), (300, 32003, 128)])
def test_linear_cross_entropy(n_tokens, vocab, chunk_rows, reduction, dtype):
    """Loss, grad_hidden and grad_weight against the full-logits reference, over several chunks."""
    hidden = torch.randn(n_tokens, 64, dtype=dtype, device=DEV)
    weight = torch.randn(vocab, 64, dtype=dtype, device=DEV) * 0.5
    target = torch.randint(0, vocab, (n_tokens,), device=DEV)
    target[1::7] = -100
    scale = torch.randn((), device=DEV)

    def run(fn):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        loss = fn(h, w)
        (loss * scale).backward()
        return loss, h.grad, w.grad

    with _OpLog() as log:
        got = run(lambda h, w: ops.linear_cross_entropy(h, w, target, reduction=reduction, chunk_rows=chunk_rows))
    assert "puyu.ce_chunk" in log.names
    want = run(lambda h, w: ops.linear_cross_entropy_reference(h, w, target, reduction=reduction))
    assert got[0].dtype == want[0].dtype == torch.float32
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [50, 32003])
def test_ce_chunk_kernel_contract(vocab, dtype):
    """grad_scale * (softmax - onehot) left in the logits, per-row loss, zeros for ignored rows."""
    logits = torch.randn(6, vocab, device=DEV, dtype=torch.float64) * 3
    target = torch.tensor([0, vocab - 1, -100, 7, 7, 3], device=DEV)
    work = logits.to(dtype)
    loss = ops._ext.ce_chunk(work, target, -100, 0.5, True)
    valid = (target != -100)[:, None]
    lf = logits.to(dtype).double()
    onehot = torch.nn.functional.one_hot(target.clamp(min=0), vocab)
    want_loss = torch.nn.functional.cross_entropy(lf, target.clamp(min=0), reduction="none") * valid[:, 0]
    want_grad = (lf.softmax(-1) - onehot) * 0.5 * valid
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), want_loss, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(work.double(), want_grad, **TOL[dtype])
    kept = logits.to(dtype)
    ops._ext.ce_chunk(kept, target, -100, 0.5, False)
    assert torch.equal(kept, logits.to(dtype))  # no gradient asked: logits untouched


def test_gradcheck_double():
    torch.manual_seed(0)
    d = dict(dtype=torch.float64, device=DEV, requires_grad=True)
    x, w = torch.randn(4, 300, **d), torch.randn(300, **d)
    assert torch.autograd.gradcheck(lambda x, w: ops.rms_norm(x, w, 1e-5), (x, w))
    q, k = torch.randn(2, 3, 4, 8, **d), torch.randn(2, 3, 2, 8, **d)
    angles = torch.rand(2, 3, 4, dtype=torch.float64, device=DEV) * 10
    assert torch.autograd.gradcheck(lambda q, k: ops.apply_rope(q, k, angles.cos(), angles.sin()), (q, k))
    g, u = torch.randn(3, 5, **d), torch.randn(3, 5, **d)
    assert torch.autograd.gradcheck(ops.swiglu, (g, u))
    h, wo = torch.randn(5, 4, **d), torch.randn(11, 4, **d)
    t = torch.tensor([1, -100, 10, 0, 4], device=DEV)
    assert torch.autograd.gradcheck(lambda h, wo: ops.linear_cross_entropy(h, wo, t, chunk_rows=2), (h, wo))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_training_ops(dtype):
    """Fake kernels against the CUDA kernels, autograd registration, AOT tracing with dynamic shapes."""
    def leaf(*shape):
        return torch.randn(*shape, dtype=dtype, device=DEV, requires_grad=True)

    torch.library.opcheck(torch.ops.puyu.rms_norm, (leaf(2, 5, 300), leaf(300), 1e-5))
    angles = torch.rand(2, 5, 16, device=DEV)
    torch.library.opcheck(torch.ops.puyu.rope, (leaf(2, 5, 4, 32), leaf(2, 5, 2, 32), angles.cos(), angles.sin(),
                                                False))
    torch.library.opcheck(torch.ops.puyu.swiglu, (leaf(3, 700), leaf(3, 700)))
    target = torch.tensor([0, 49, -100, 7], device=DEV)
    torch.library.opcheck(torch.ops.puyu.ce_chunk, (leaf(4, 50).detach(), target, -100, 0.25, True))


def test_compiled_block_matches_eager():
    compiled_block_matches_eager(DEV, tol=dict(atol=1e-4, rtol=1e-4))
