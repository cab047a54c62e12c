"""Paged decode attention (puyu.serving.ops, csrc/serving/paged_attention.cpp): the fused CPU kernel against the
PyTorch reference, the reference against a per-token loop, and both against the serving runtime's
gather + ``decode_attention``."""
import math

import pytest
import torch

from puyu.model.config import ModelArgs
from puyu.serving import ops
from puyu.serving.engine_model import decode_attention
from puyu.serving.kv_cache import PagedKVCache

needs_ext = pytest.mark.skipif(not ops.extension_available("cpu"), reason="serving ops extension not built")
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    # both sides compute in fp32 and round once; one bf16/fp16 ulp apart at most
    torch.bfloat16: dict(atol=1e-2, rtol=1e-2),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
}


def _lengths(b: int, bs: int, g: torch.Generator) -> torch.Tensor:
    """Ragged context lengths [b]: 1, exact multiples of the block size and one off them, then random."""
    fixed = [1, bs, 2 * bs, bs - 1, bs + 1, 3 * bs, 2]
    if b <= 2:
        return torch.tensor([2 * bs, 1][:b])
    if b <= len(fixed):
        return torch.tensor(fixed[:b])
    rest = torch.randint(1, 6 * bs, (b - len(fixed),), generator=g).tolist()
    return torch.tensor(fixed + rest)


def _case(b, Hq, Hk, d, bs, dtype=torch.float32, int8=False, seed=0):
    """A paged cache with each sequence's blocks scattered (shuffled ids) and block tables padded with 0
    past the context (one padding column at least). Block 0 is never any sequence's block: it holds large
    values, which a kernel reading padding entries would let into the output."""
    g = torch.Generator().manual_seed(seed)
    lens = _lengths(b, bs, g)
    need = (lens + bs - 1) // bs  # [b] blocks per sequence
    mb = int(need.max()) + 1
    NB = int(need.sum()) + 5
    ids = (torch.randperm(NB - 1, generator=g) + 1).tolist()
    tables = torch.zeros(b, mb, dtype=torch.int64)
    for i, n in enumerate(need.tolist()):
        tables[i, :n] = torch.tensor([ids.pop() for _ in range(n)])
    q = torch.randn(b, Hq, d, generator=g).to(dtype)
    if int8:
        k = torch.randint(-127, 128, (Hk, NB, bs, d), generator=g, dtype=torch.int8)
        v = torch.randint(-127, 128, (Hk, NB, bs, d), generator=g, dtype=torch.int8)
        k_scale, v_scale = torch.rand(Hk, NB, bs, generator=g) / 40, torch.rand(Hk, NB, bs, generator=g) / 40
        k[:, 0], v[:, 0], k_scale[:, 0], v_scale[:, 0] = 127, 127, 1e3, 1e3
        return q, k, v, tables, lens, 1 / math.sqrt(d), k_scale, v_scale
    k = (torch.randn(Hk, NB, bs, d, generator=g) * 2).to(dtype)
    v = torch.randn(Hk, NB, bs, d, generator=g).to(dtype)
    k[:, 0], v[:, 0] = 1e3, 1e3
    return q, k, v, tables, lens, 1 / math.sqrt(d)


def _loop_reference(q, k, v, tables, lens, scale, k_scale=None, v_scale=None):
    """Token by token, straight from the definition (fp64)."""
    b, Hq, d = q.shape
    Hk, _, bs, _ = k.shape
    out = torch.empty(b, Hq, d, dtype=torch.float64)
    for i in range(b):
        for h in range(Hq):
            kv = h // (Hq // Hk)
            keys, values = [], []
            for t in range(int(lens[i])):
                blk, off = int(tables[i, t // bs]), t % bs
                ks = 1.0 if k_scale is None else float(k_scale[kv, blk, off])
                vs = 1.0 if v_scale is None else float(v_scale[kv, blk, off])
                keys.append(k[kv, blk, off].double() * ks)
                values.append(v[kv, blk, off].double() * vs)
            p = torch.softmax(torch.stack(keys) @ q[i, h].double() * scale, dim=0)
            out[i, h] = p @ torch.stack(values)
    return out


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("Hq,Hk", [(2, 2), (4, 1), (6, 3)])
def test_reference_matches_the_definition(Hq, Hk, int8):
    args = _case(5, Hq, Hk, 8, 4, torch.float64, int8=int8)
    torch.testing.assert_close(ops.paged_decode_attention_reference(*args), _loop_reference(*args), **TOL[torch.float64])


@needs_ext
@pytest.mark.parametrize("b", [1, 37])
@pytest.mark.parametrize("bs", [16, 32])
@pytest.mark.parametrize("d", [32, 64, 128, 48])  # 48: the kernel's any-head-dim instantiation
@pytest.mark.parametrize("Hq,Hk", [(4, 4), (8, 2), (6, 3), (32, 8)])
def test_fused_matches_reference_fp32(Hq, Hk, d, bs, b):
    args = _case(b, Hq, Hk, d, bs)
    out = ops.paged_decode_attention(*args)
    assert out.shape == (b, Hq, d) and out.dtype == torch.float32
    torch.testing.assert_close(out, ops.paged_decode_attention_reference(*args), **TOL[torch.float32])


@needs_ext
@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("bs", [16, 12, 4])
def test_slots_past_a_context_never_reach_the_output(bs, int8):
    """The kernel scores a context's last partial group of 8 keys as a whole group (their slots exist in
    the block): NaN and inf in those slots must not matter. The reference sees the same cache with zeros there."""
    args = list(_case(37, 8, 2, 32, bs, int8=int8))
    k, v, tables, lens = args[1], args[2], args[3], args[4]
    clean_k, clean_v = k.clone(), v.clone()
    for i, n in enumerate(lens.tolist()):
        if n % bs:
            last = int(tables[i, (n - 1) // bs])
            k[:, last, n % bs:] = 127 if int8 else float("nan")
            v[:, last, n % bs:] = -127 if int8 else float("inf")
            clean_k[:, last, n % bs:] = 0
            clean_v[:, last, n % bs:] = 0
    if int8:  # NaN/inf scales of the slots past the context instead
        for scale, bad in ((args[6], float("nan")), (args[7], float("inf"))):
            for i, n in enumerate(lens.tolist()):
                if n % bs:
                    scale[:, int(tables[i, (n - 1) // bs]), n % bs:] = bad
    out = ops.paged_decode_attention(*args)
    assert torch.isfinite(out).all()
    clean = list(args)
    clean[1], clean[2] = clean_k, clean_v
    if int8:
        clean[6], clean[7] = torch.nan_to_num(args[6], nan=0.0, posinf=0.0), torch.nan_to_num(args[7], nan=0.0, posinf=0.0)
    torch.testing.assert_close(out, ops.paged_decode_attention_reference(*clean), **TOL[torch.float32])


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("d", [32, 128])
def test_fused_matches_reference_other_dtypes(dtype, d):
    args = _case(37, 8, 2, d, 16, dtype)
    out = ops.paged_decode_attention(*args)
    assert out.dtype == dtype
    torch.testing.assert_close(out, ops.paged_decode_attention_reference(*args), **TOL[dtype])


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("Hq,Hk,d,bs", [(8, 2, 32, 16), (4, 4, 64, 32), (6, 3, 48, 16)])
def test_fused_matches_reference_int8_cache(Hq, Hk, d, bs, dtype):
    args = _case(37, Hq, Hk, d, bs, dtype, int8=True)
    out = ops.paged_decode_attention(*args)
    assert out.dtype == dtype
    torch.testing.assert_close(out, ops.paged_decode_attention_reference(*args), **TOL[dtype])


@needs_ext
@pytest.mark.parametrize("trend", [1.0, -1.0, 0.0])
@pytest.mark.parametrize("bs", [16, 32])
def test_fused_matches_reference_long_contexts(bs, trend):
    """Contexts over the kernel's 256-key chunk (merged by an online softmax), with scores that grow (the
    running max moves up chunk after chunk), shrink or stay level along the context."""
    q, k, v, tables, lens, scale = _case(5, 8, 2, 64, bs)
    lens = torch.tensor([255, 256, 257, 700, 1000])
    need = (lens + bs - 1) // bs
    ids = (torch.randperm(int(need.sum()), generator=torch.Generator().manual_seed(3)) + 1).tolist()
    tables = torch.zeros(5, int(need.max()) + 2, dtype=torch.int64)
    for i, n in enumerate(need.tolist()):
        tables[i, :n] = torch.tensor([ids.pop() for _ in range(n)])
    NB = int(tables.max()) + 1
    k = torch.randn(2, NB, bs, 64, generator=torch.Generator().manual_seed(4))
    v = torch.randn(2, NB, bs, 64, generator=torch.Generator().manual_seed(5))
    u = torch.randn(64, generator=torch.Generator().manual_seed(6))
    q = q + u  # every query head leans towards u; key t gets trend * t / 300 of u
    for i in range(5):
        for t in range(int(lens[i])):
            k[:, tables[i, t // bs], t % bs] += trend * t / 300 * u
    args = (q, k, v, tables, lens, scale)
    torch.testing.assert_close(ops.paged_decode_attention(*args), ops.paged_decode_attention_reference(*args),
                               **TOL[torch.float32])
    k8, v8 = (k * 20).clamp(-127, 127).to(torch.int8), (v * 40).clamp(-127, 127).to(torch.int8)
    ks, vs = torch.full(k.shape[:3], 1 / 20), torch.full(v.shape[:3], 1 / 40)
    args = (q, k8, v8, tables, lens, scale, ks, vs)
    torch.testing.assert_close(ops.paged_decode_attention(*args), ops.paged_decode_attention_reference(*args),
                               **TOL[torch.float32])


@needs_ext
def test_padding_entries_are_never_read():
    """Entries past a context may name any block, even block 0 full of NaN, or none at all (-1)."""
    q, k, v, tables, lens, scale = _case(37, 8, 2, 32, 16)
    expected = ops.paged_decode_attention(q, k, v, tables, lens, scale)
    k[:, 0], v[:, 0] = float("nan"), float("nan")
    torch.testing.assert_close(ops.paged_decode_attention(q, k, v, tables, lens, scale), expected, rtol=0, atol=0)
    past = torch.arange(tables.shape[1]) * 16 >= lens[:, None]  # [b, max_blocks] entries past the context
    torch.testing.assert_close(ops.paged_decode_attention(q, k, v, tables.masked_fill(past, -1), lens, scale),
                               expected, rtol=0, atol=0)


@needs_ext
def test_same_result_for_any_thread_count():
    args = _case(37, 8, 2, 64, 16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.paged_decode_attention(*args)
        torch.set_num_threads(2)
        two = ops.paged_decode_attention(*args)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("kv_dtype", ["fp", "int8"])
def test_matches_serving_decode_attention_on_the_gathered_cache(kv_dtype, fused):
    """The runtime's path today: PagedKVCache.gather, a -inf bias past each context, decode_attention."""
    if fused and not ops.extension_available("cpu"):
        pytest.skip("serving ops extension not built")
    b, Hq, Hk, d, bs, layer = 37, 8, 2, 32, 16, 1
    args = ModelArgs(dim=Hq * d, n_layers=2, n_heads=Hq, n_kv_heads=Hk)
    q, _, _, tables, lens, scale = _case(b, Hq, Hk, d, bs)
    NB = int(tables.max()) + 1
    cache = PagedKVCache(args, NB, bs, torch.float32, kv_dtype)
    g = torch.Generator().manual_seed(1)
    slots = torch.arange(NB * bs)  # every slot of the layer, block 0 included
    cache.write(layer, slots, torch.randn(NB * bs, Hk, d, generator=g) * 2, torch.randn(NB * bs, Hk, d, generator=g))
    scales = (cache.k_scale[layer], cache.v_scale[layer]) if kv_dtype == "int8" else (None, None)

    keys, values = cache.gather(layer, tables)  # [Hk, b, S, d]
    S = keys.shape[2]
    bias = torch.zeros(b, S).masked_fill_(torch.arange(S) >= lens[:, None], float("-inf"))
    serving = decode_attention(q, keys, values, bias[None].expand(Hk, -1, -1).reshape(-1, 1, S), Hq // Hk)
    out = ops.paged_decode_attention(q, cache.k[layer], cache.v[layer], tables, lens, scale, *scales, fused=fused)
    torch.testing.assert_close(out, serving, **TOL[torch.float32])


def test_fused_false_and_no_extension_take_the_reference(monkeypatch):
    args = _case(7, 4, 2, 32, 16)
    expected = ops.paged_decode_attention_reference(*args)
    assert torch.equal(ops.paged_decode_attention(*args, fused=False), expected)
    monkeypatch.setattr(ops, "_ext", None)
    assert torch.equal(ops.paged_decode_attention(*args), expected)


@needs_ext
def test_inference_only():
    q, *rest = _case(3, 4, 2, 32, 16)
    with pytest.raises(RuntimeError, match="inference-only"):
        ops.paged_decode_attention(q.requires_grad_(True), *rest)
    with torch.no_grad():
        assert ops.paged_decode_attention(q, *rest).grad_fn is None


@needs_ext
@pytest.mark.parametrize("change,message", [
    (lambda a: {**a, "q": a["q"][0]}, "q must be \\[b, Hq, d\\]"),
    (lambda a: {**a, "q": a["q"].transpose(0, 1)}, "q must be contiguous"),
    (lambda a: {**a, "q": a["q"].to(torch.int32)}, "q must be a floating-point tensor"),
    (lambda a: {**a, "k_cache": a["k_cache"][0]}, "k_cache must be \\[Hk, num_blocks, block_size, d\\]"),
    (lambda a: {**a, "v_cache": a["v_cache"][:, :-1]}, "v_cache must match k_cache"),
    (lambda a: {**a, "k_cache": a["k_cache"].transpose(1, 2), "v_cache": a["v_cache"].transpose(1, 2)},
     "must be contiguous"),
    (lambda a: {**a, "q": a["q"][..., :16].contiguous()}, "head dim of q \\(16\\) and of the cache \\(32\\) differ"),
    (lambda a: {**a, "q": a["q"][:, :3].contiguous()}, "query heads \\(3\\) must be a multiple of kv heads \\(2\\)"),
    (lambda a: {**a, "q": a["q"].double()}, "the cache must have q's dtype"),
    (lambda a: {**a, "k_cache": a["k_cache"].to(torch.int8), "v_cache": a["v_cache"].to(torch.int8)},
     "k_scale and v_scale are required for an int8 cache"),
    (lambda a: {**a, "k_scale": torch.ones(a["k_cache"].shape[:3]), "v_scale": torch.ones(a["k_cache"].shape[:3])},
     "k_scale and v_scale are required for an int8 cache and only for it"),
    (lambda a: {**a, "k_cache": a["k_cache"].to(torch.int8), "v_cache": a["v_cache"].to(torch.int8),
                "k_scale": torch.ones(a["k_cache"].shape[:3]), "v_scale": torch.ones(a["k_cache"].shape[:2])},
     "k_scale/v_scale must be contiguous fp32 \\[Hk, num_blocks, block_size\\]"),
    (lambda a: {**a, "block_tables": a["block_tables"].int()}, "block_tables must be contiguous int64"),
    (lambda a: {**a, "block_tables": a["block_tables"][:-1]}, "block_tables must be .* with b = 5"),
    (lambda a: {**a, "context_lens": a["context_lens"].int()}, "context_lens must be contiguous int64"),
    (lambda a: {**a, "context_lens": a["context_lens"] * 0}, "context_lens\\[0\\] = 0 is outside"),
    (lambda a: {**a, "context_lens": a["context_lens"] + 1000}, "is outside \\[1, max_blocks \\* block_size"),
    (lambda a: {**a, "block_tables": a["block_tables"] + 1000}, "is not a block of the cache"),
    (lambda a: {**a, "block_tables": a["block_tables"] - 1000}, "is not a block of the cache"),
])
def test_bad_inputs_raise_clear_errors(change, message):
    q, k, v, tables, lens, scale = _case(5, 4, 2, 32, 16)
    a = change(dict(q=q, k_cache=k, v_cache=v, block_tables=tables, context_lens=lens))
    with pytest.raises(RuntimeError, match=message):
        ops.extension().paged_decode_attention(a["q"], a["k_cache"], a["v_cache"], a["block_tables"], a["context_lens"],
                                               scale, a.get("k_scale"), a.get("v_scale"))
