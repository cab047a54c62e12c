"""The fused kernels as ``torch.ops.puyu`` custom ops (puyu.model.ops, puyu.serving.ops):
``torch.library.opcheck`` of each (schema, fake kernel against the real one, autograd registration, AOT
tracing with dynamic shapes), a ``torch.compile(fullgraph=True)`` TransformerBlock against eager, shape
propagation on the meta device, and the session check that makes ``make test`` fail when either extension
did not build."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch.utils._python_dispatch import TorchDispatchMode

from puyu.model import ops
from puyu.model.config import ModelArgs
from puyu.model.model import TransformerBlock
from puyu.model.rope import rope_cos_sin
from puyu.serving import ops as serving_ops

REPO = Path(__file__).resolve().parents[1]
needs_ext = pytest.mark.skipif(not ops.extension_available("cpu"),
                               reason=f"fused ops extension not built: {ops.extension_problem()}")
needs_serving_ext = pytest.mark.skipif(not serving_ops.extension_available("cpu"),
                                       reason=f"serving ops extension not built: {serving_ops.extension_problem()}")
DTYPES = [torch.float32, torch.bfloat16]


def _angles(*shape: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos and sin of random rotation angles."""
    a = torch.rand(*shape, dtype=torch.float64) * 50
    return a.cos().float(), a.sin().float()


class _OpLog(TorchDispatchMode):
    """Records the overload packets of the ops that reach the dispatcher, e.g. ``puyu.rms_norm``."""

    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


# ---- opcheck: every op, CPU ----------------------------------------------------------------------------
@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 7), (2, 5, 64)])
def test_opcheck_rms_norm(shape, dtype):
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    w = torch.randn(shape[-1], dtype=dtype, requires_grad=True)
    torch.library.opcheck(torch.ops.puyu.rms_norm, (x, w, 1e-5))
    y, rstd = torch.ops.puyu.rms_norm(x.detach(), w.detach(), 1e-5)
    torch.library.opcheck(torch.ops.puyu.rms_norm_backward, (torch.randn_like(y), x.detach(), w.detach(), rstd))


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("B,T,Hq,Hk,d", [(1, 1, 4, 1, 2), (2, 9, 8, 2, 32)])
def test_opcheck_rope(B, T, Hq, Hk, d, inverse, dtype):
    # q and k as the model slices them out of the packed projection: not contiguous
    qkv = torch.randn(B, T, Hk, Hq // Hk + 2, d, dtype=dtype)
    q = qkv[..., : Hq // Hk, :].reshape(B, T, Hq, d).requires_grad_(True)
    k = qkv[..., -2, :].requires_grad_(True)
    cos, sin = _angles(B, T, d // 2)
    torch.library.opcheck(torch.ops.puyu.rope, (q, k, cos, sin, inverse))


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5,), (2, 3, 688)])
def test_opcheck_swiglu(shape, dtype):
    gate = torch.randn(shape, dtype=dtype, requires_grad=True)
    up = torch.randn(shape, dtype=dtype, requires_grad=True)
    torch.library.opcheck(torch.ops.puyu.swiglu, (gate, up))
    dy = torch.randn(shape, dtype=dtype)
    torch.library.opcheck(torch.ops.puyu.swiglu_backward, (dy, gate.detach(), up.detach()))


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_grad", [False, True])
def test_opcheck_ce_chunk(with_grad, dtype):
    logits = torch.randn(6, 50, dtype=dtype)
    target = torch.tensor([0, 49, -100, 7, 7, 3])
    torch.library.opcheck(torch.ops.puyu.ce_chunk, (logits, target, -100, 0.25, with_grad))


@needs_serving_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,Hq,Hk,d", [(1, 8, 2, 32), (9, 6, 3, 6)])
def test_opcheck_rope_cache_write(N, Hq, Hk, d, dtype):
    num_blocks, bs = 6, 4
    qkv = torch.randn(N, (Hq + 2 * Hk) * d, dtype=dtype)
    cos, sin = _angles(N, d // 2)
    k_cache, v_cache = torch.randn(Hk, num_blocks, bs, d, dtype=dtype), torch.randn(Hk, num_blocks, bs, d, dtype=dtype)
    slots = torch.randperm(num_blocks * bs)[:N]
    torch.library.opcheck(torch.ops.puyu.rope_cache_write, (qkv, cos, sin, k_cache, v_cache, slots, Hq))


@needs_serving_ext
@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck_paged_decode_attention(dtype, int8):
    b, Hq, Hk, d, num_blocks, bs = 3, 8, 2, 16, 7, 4
    q = torch.randn(b, Hq, d, dtype=dtype)
    tables = torch.tensor([[1, 2, 0], [3, 0, 0], [4, 5, 6]])
    lens = torch.tensor([6, 1, 12])
    if int8:
        k, v = (torch.randint(-127, 128, (Hk, num_blocks, bs, d), dtype=torch.int8) for _ in range(2))
        k_scale, v_scale = torch.rand(Hk, num_blocks, bs) / 40, torch.rand(Hk, num_blocks, bs) / 40
    else:
        k, v = torch.randn(Hk, num_blocks, bs, d, dtype=dtype), torch.randn(Hk, num_blocks, bs, d, dtype=dtype)
        k_scale = v_scale = None
    torch.library.opcheck(torch.ops.puyu.paged_decode_attention,
                          (q, k, v, tables, lens, 1 / math.sqrt(d), k_scale, v_scale))


# ---- torch.compile of a block ----------------------------------------------------------------------------
def _block_case(device: str = "cpu", dtype=torch.float32):
    """A fused-ops TransformerBlock built on ``device``, an input x [2, 8, 64] and the rotation's cos/sin."""
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=32, ffn_hidden_dim=96, fused_ops=True)
    B, T = 2, 8
    cos, sin = rope_cos_sin(args, torch.arange(T).expand(B, T))  # on the CPU: it reads the positions' values
    torch.manual_seed(0)
    with torch.device(device):
        block = TransformerBlock(0, args).to(dtype)
        x = torch.randn(B, T, args.dim, dtype=dtype)
    return block, x, cos.to(device), sin.to(device)


def _block_run(block, run, x, cos, sin):
    """Output of ``run`` (``block`` or its compiled form) and the gradients of the input and of every parameter
    of ``block``, for one random output gradient."""
    x = x.detach().clone().requires_grad_(True)
    block.zero_grad(set_to_none=True)
    out = run(x, cos, sin, None, None)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out))
    return out.detach(), x.grad, {n: p.grad for n, p in block.named_parameters()}


def compiled_block_matches_eager(device: str, dtype=torch.float32, tol=None) -> None:
    """Compiles a fused-ops TransformerBlock with inductor in one graph holding the puyu ops, and checks its
    output and gradients against eager (also run by tests/test_ops_cuda.py on a GPU)."""
    block, x, cos, sin = _block_case(device, dtype)
    want = _block_run(block, block, x, cos, sin)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    got = _block_run(block, torch.compile(block, backend=counter, fullgraph=True), x, cos, sin)
    assert counter.frame_count == 1
    in_graph = sorted(str(n.target) for n in counter.graphs[0].graph.nodes if str(n.target).startswith("puyu."))
    assert in_graph == ["puyu.rms_norm.default", "puyu.rms_norm.default", "puyu.rope.default",
                        "puyu.swiglu.default"]
    tol = tol or {}
    torch.testing.assert_close(got[0], want[0], **tol)
    torch.testing.assert_close(got[1], want[1], **tol)
    assert got[2].keys() == want[2].keys()
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], **tol, msg=lambda m: f"{name}: {m}")


@needs_ext
def test_compiled_block_has_no_graph_break_and_matches_eager():
    compiled_block_matches_eager("cpu")


@needs_ext
def test_backward_graph_runs_the_fused_backward_kernels():
    """AOTAutograd's backward graph of the block calls the registered backward ops, not decompositions."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = {}

    def keep(kind):
        def compiler(gm, example_inputs):
            graphs[kind] = {str(n.target) for n in gm.graph.nodes if str(n.target).startswith("puyu.")}
            return make_boxed_func(gm.forward)
        return compiler

    block, x, cos, sin = _block_case()
    torch._dynamo.reset()
    compiled = torch.compile(block, backend=aot_autograd(fw_compiler=keep("fw"), bw_compiler=keep("bw")),
                             fullgraph=True)
    _block_run(block, compiled, x, cos, sin)
    assert graphs["fw"] == {"puyu.rms_norm.default", "puyu.rope.default", "puyu.swiglu.default"}
    assert graphs["bw"] == {"puyu.rms_norm_backward.default", "puyu.rope.default", "puyu.swiglu_backward.default"}


# ---- meta device ---------------------------------------------------------------------------------------
def _public_calls(dtype):
    """Each public fused op on small inputs: name -> (the custom op it runs, a call taking ``fused``)."""
    N, D, Hq, Hk, d, V = 6, 16, 4, 2, 8, 30
    num_blocks, bs = 5, 4
    x, w = torch.randn(2, 3, D, dtype=dtype), torch.randn(D, dtype=dtype)
    q, k = torch.randn(2, 3, Hq, d, dtype=dtype), torch.randn(2, 3, Hk, d, dtype=dtype)
    cos, sin = _angles(2, 3, d // 2)
    gate, up = torch.randn(2, 3, 40, dtype=dtype), torch.randn(2, 3, 40, dtype=dtype)
    hidden, head, target = torch.randn(N, D, dtype=dtype), torch.randn(V, D, dtype=dtype), torch.arange(N)
    qkv = torch.randn(N, (Hq + 2 * Hk) * d, dtype=dtype)
    kc, vc = torch.zeros(Hk, num_blocks, bs, d, dtype=dtype), torch.zeros(Hk, num_blocks, bs, d, dtype=dtype)
    slots, qd = torch.arange(N), torch.randn(3, Hq, d, dtype=dtype)
    tables, lens = torch.tensor([[1, 2], [3, 0], [4, 0]]), torch.tensor([7, 2, 4])
    c2, s2 = cos[0, :1].expand(N, -1).contiguous(), sin[0, :1].expand(N, -1).contiguous()
    return {
        "rms_norm": ("puyu.rms_norm", lambda f: ops.rms_norm(x, w, 1e-5, fused=f)),
        "apply_rope": ("puyu.rope", lambda f: ops.apply_rope(q, k, cos, sin, fused=f)),
        "swiglu": ("puyu.swiglu", lambda f: ops.swiglu(gate, up, fused=f)),
        "linear_cross_entropy": ("puyu.ce_chunk", lambda f: ops.linear_cross_entropy(hidden, head, target, fused=f)),
        "rope_cache_write": ("puyu.rope_cache_write",
                             lambda f: serving_ops.rope_cache_write(qkv, c2, s2, kc, vc, slots, Hq, fused=f)),
        "paged_decode_attention": ("puyu.paged_decode_attention",
                                   lambda f: serving_ops.paged_decode_attention(qd, kc, vc, tables, lens, 0.3,
                                                                              fused=f)),
    }


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(_public_calls(torch.float32)))
def test_meta_tensors_run_the_op_and_get_the_reference_shapes(name, dtype):
    """On meta tensors each public op reaches its custom op (fake kernel) and gives the shapes and dtypes the
    reference gives on real tensors; no extension needed."""
    op, call = _public_calls(dtype)[name]
    want = call(False)  # the reference on CPU
    with torch.device("meta"):
        _, call_meta = _public_calls(dtype)[name]
        with _OpLog() as log:
            got = call_meta(True)
    assert op in log.names
    want, got = (want, got) if isinstance(want, tuple) else ((want,), (got,))
    assert [(g.shape, g.dtype, g.device.type) for g in got] == [(w.shape, w.dtype, "meta") for w in want]


def test_block_built_on_meta_propagates_shapes_through_the_fused_ops():
    block, x, cos, sin = _block_case("meta")
    with _OpLog() as log:
        out = block(x, cos, sin, None, None)
    assert out.shape == x.shape and out.is_meta
    assert {"puyu.rms_norm", "puyu.rope", "puyu.swiglu"} <= log.names


# ---- eager calls that record no graph skip the dispatcher ------------------------------------------------
@needs_ext
@needs_serving_ext
def test_inference_calls_skip_the_dispatcher_and_training_calls_take_the_op():
    """Serving's decode step calls the extensions directly (see ops.route); autograd goes through the op. The
    cross-entropy always takes its chunk op: it runs once per chunk of up to 128 MiB of logits."""
    calls = _public_calls(torch.float32)
    with torch.no_grad(), _OpLog() as log:
        for name, (_, call) in calls.items():
            call(True)
    assert {n for n in log.names if n.startswith("puyu.")} == {"puyu.ce_chunk"}
    x = torch.randn(3, 8, requires_grad=True)
    with _OpLog() as log:
        ops.rms_norm(x, torch.ones(8), 1e-5).sum().backward()
    assert {"puyu.rms_norm", "puyu.rms_norm_backward"} <= log.names


# ---- `make test` requires the extensions -------------------------------------------------------------------
def _pytest_without(module: str, require: bool, *args: str) -> subprocess.CompletedProcess:
    """pytest in a fresh interpreter where the extension ``module`` cannot be imported."""
    code = (f"import sys; sys.modules[{module!r}] = None; import pytest; "
            f"raise SystemExit(pytest.main({list(args)!r}))")
    env = {k: v for k, v in os.environ.items() if k != "PUYU_REQUIRE_EXTENSION"}
    if require:
        env["PUYU_REQUIRE_EXTENSION"] = "1"
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("module,name,test", [
    ("puyu.model._fused_ops", "fused ops", "test_opcheck_swiglu"),
    ("puyu.serving._serving_ops", "serving ops", "test_opcheck_paged_decode_attention"),
], ids=["fused", "serving"])  # ids that -k <test> does not select again
def test_make_test_fails_without_an_extension_and_plain_pytest_skips(module, name, test):
    selected = ["tests/test_ops_custom.py", "-k", test]
    required = _pytest_without(module, True, *selected)
    assert required.returncode == 1, required.stdout[-2000:] + required.stderr[-2000:]
    reason = [line for line in required.stderr.splitlines() if "PUYU_REQUIRE_EXTENSION" in line]
    assert len(reason) == 1 and f"the {name} extension is not in use: {module} does not import" in reason[0], \
        required.stderr[-2000:]
    assert "collected" not in required.stdout  # stopped before collecting a test

    plain = _pytest_without(module, False, *selected)
    assert plain.returncode == 0, plain.stdout[-2000:] + plain.stderr[-2000:]
    assert f"puyu {name} extension: not in use" in plain.stdout
    assert "4 skipped" in plain.stdout and f"{name} extension not built" in plain.stdout
