"""RoPE + paged cache write (puyu.serving.ops.rope_cache_write, csrc/serving/rope_cache_write.cpp): the fused CPU kernel
against its PyTorch reference and against the runtime's unfused path (split, ``apply_rope``,
``PagedKVCache.write``), bit for bit in fp32."""
import pytest
import torch

from puyu.model import ops as model_ops
from puyu.model.config import ModelArgs
from puyu.serving import ops
from puyu.serving.kv_cache import PagedKVCache

pytestmark = pytest.mark.skipif(not ops.extension_available("cpu"), reason="serving ops extension not built")


def _case(N, Hq, Hk, d, num_blocks=12, bs=4, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    opmath = torch.float64 if dtype == torch.float64 else torch.float32
    qkv = torch.randn(N, (Hq + 2 * Hk) * d, generator=g).to(dtype)
    angle = torch.rand(N, d // 2, generator=g, dtype=torch.float64) * 6.3
    cos, sin = angle.cos().to(opmath), angle.sin().to(opmath)
    slots = torch.randperm(num_blocks * bs, generator=g)[:N]  # scattered, distinct
    k_cache = torch.randn(Hk, num_blocks, bs, d, generator=g).to(dtype)
    return qkv, cos, sin, k_cache, k_cache.clone().neg_(), slots


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,Hq,Hk,d", [(1, 8, 2, 32), (37, 8, 2, 32), (20, 4, 4, 64), (9, 6, 3, 6), (48, 16, 1, 128)])
def test_fused_matches_reference(N, Hq, Hk, d, dtype):
    qkv, cos, sin, kc, vc, slots = _case(N, Hq, Hk, d, dtype=dtype)
    kr, vr = kc.clone(), vc.clone()
    q_ref = ops.rope_cache_write_reference(qkv, cos, sin, kr, vr, slots, Hq)
    q = ops.rope_cache_write(qkv, cos, sin, kc, vc, slots, Hq)
    tol = {} if dtype in (torch.float32, torch.float64) else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(q, q_ref, **tol)
    torch.testing.assert_close(kc, kr, **tol)
    assert torch.equal(vc, vr)  # values are copied, not computed
    assert q.shape == (N, Hq, d) and q.is_contiguous()


def test_untouched_slots_keep_their_values():
    qkv, cos, sin, kc, vc, slots = _case(10, 8, 2, 32)
    k0, v0 = kc.clone(), vc.clone()
    ops.rope_cache_write(qkv, cos, sin, kc, vc, slots, 8)
    written = torch.zeros(kc.shape[1] * kc.shape[2], dtype=torch.bool)
    written[slots] = True
    for new, old in ((kc, k0), (vc, v0)):
        flat_new, flat_old = new.view(2, -1, 32), old.view(2, -1, 32)
        assert torch.equal(flat_new[:, ~written], flat_old[:, ~written])
        assert not torch.equal(flat_new[:, written], flat_old[:, written])


def test_bit_equal_to_the_runtime_unfused_path():
    """The serving runtime's older path: split, fused ``apply_rope`` on q and k, ``PagedKVCache.write``."""
    args = ModelArgs(dim=256, n_layers=1, n_heads=8, n_kv_heads=2, vocab_size=64, ffn_hidden_dim=64)
    N, d = 40, args.head_dim
    qkv, cos, sin, _, _, slots = _case(N, 8, 2, d, num_blocks=16, bs=16)
    cache_a = PagedKVCache(args, 16, 16, torch.float32)
    cache_b = PagedKVCache(args, 16, 16, torch.float32)
    q, k, v = qkv.view(1, N, -1, d).split([8, 2, 2], dim=2)
    q_old, k_old = model_ops.apply_rope(q, k, cos[None], sin[None])
    cache_a.write(0, slots, k_old[0], v[0])
    q_new = ops.rope_cache_write(qkv, cos, sin, cache_b.k[0], cache_b.v[0], slots, 8)
    assert torch.equal(q_new, q_old[0])
    assert torch.equal(cache_b.k, cache_a.k) and torch.equal(cache_b.v, cache_a.v)


def test_bad_input_is_named():
    qkv, cos, sin, kc, vc, slots = _case(5, 8, 2, 32)
    bad = slots.clone()
    bad[3] = kc.shape[1] * kc.shape[2]
    with pytest.raises(RuntimeError, match=r"slots\[3\] = 48 is outside"):
        ops.rope_cache_write(qkv, cos, sin, kc, vc, bad, 8)
    with pytest.raises(RuntimeError, match="qkv must be"):
        ops.rope_cache_write(qkv[:, :-32], cos, sin, kc, vc, slots, 8)
    with pytest.raises(RuntimeError, match="cos/sin must be"):
        ops.rope_cache_write(qkv, cos[:, :8], sin[:, :8], kc, vc, slots, 8)
    with pytest.raises(RuntimeError, match="cache must have qkv's dtype"):
        ops.rope_cache_write(qkv, cos, sin, kc.double(), vc.double(), slots, 8)
    with pytest.raises(RuntimeError, match="inference-only"):
        ops.rope_cache_write(qkv.requires_grad_(), cos, sin, kc, vc, slots, 8)
