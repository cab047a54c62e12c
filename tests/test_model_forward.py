"""Model behaviour: grouped wqkv layout, packed sequences, KV-cache generation, the fused loss."""
import pytest
import torch
import torch.nn.functional as F

from puyu.model import KVCache, Transformer, generate, get_flavor
from puyu.model.document_attention import DocumentAttention
from puyu.model.model import positions_from_document_ids
from puyu.model.state_dict import to_llama


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Transformer(get_flavor("tiny")).eval()


def test_wqkv_split_follows_internlm2_rearrange(tiny):
    """HF InternLM2: rearrange(qkv, 'b q (h gs d) -> b q h gs d', gs=2+g); q = [..., :g, :], k = [..., -2, :]."""
    args = tiny.args
    wqkv = tiny.layers[0].attention.wqkv.weight.detach()
    x = torch.randn(1, 3, args.dim)
    qkv = (x @ wqkv.T).view(1, 3, args.n_kv_heads, args.n_groups + 2, args.head_dim)
    q_hf = qkv[..., : args.n_groups, :].reshape(1, 3, args.n_heads * args.head_dim)
    k_hf, v_hf = qkv[..., -2, :].reshape(1, 3, -1), qkv[..., -1, :].reshape(1, 3, -1)
    llama = to_llama({"layers.0.attention.wqkv.weight": wqkv}, args)
    torch.testing.assert_close(x @ llama["model.layers.0.self_attn.q_proj.weight"].T, q_hf, rtol=0, atol=0)
    torch.testing.assert_close(x @ llama["model.layers.0.self_attn.k_proj.weight"].T, k_hf, rtol=0, atol=0)
    torch.testing.assert_close(x @ llama["model.layers.0.self_attn.v_proj.weight"].T, v_hf, rtol=0, atol=0)


def document_causal_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """The dense reference [B, 1, T, T]: token i sees j iff j <= i and both are in the same document."""
    T = document_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    return ((document_ids[:, :, None] == document_ids[:, None, :]) & causal)[:, None]


def test_document_positions_and_mask():
    doc = torch.tensor([[0, 0, 0, 1, 1, 2]])
    assert positions_from_document_ids(doc).tolist() == [[0, 1, 2, 0, 1, 0]]
    mask = document_causal_mask(doc)[0, 0]
    assert mask[4].tolist() == [False, False, False, True, True, False]
    assert mask[2].tolist() == [True, True, True, False, False, False]


def random_documents(B: int, T: int, gen: torch.Generator) -> torch.Tensor:
    """[B, T] ids of documents of random lengths 1..70 (a row may be one document), as SFT packs them."""
    rows = []
    for _ in range(B):
        ids, doc = [], 0
        while len(ids) < T:
            ids += [doc] * int(torch.randint(1, 71, (1,), generator=gen))
            doc += 1
        rows.append(ids[:T])
    return torch.tensor(rows)


@pytest.mark.parametrize("dense_below", [0, 512], ids=["buckets", "dense-short-rows"])
@pytest.mark.parametrize("B,T,Hq,Hk", [(1, 1, 2, 2), (2, 37, 4, 2), (3, 200, 8, 2), (1, 130, 2, 1)])
def test_document_attention_equals_sdpa_with_the_dense_mask(B, T, Hq, Hk, dense_below):
    gen = torch.Generator().manual_seed(T)
    doc = random_documents(B, T, gen)
    if T == 130:
        doc[:] = 0  # one document filling the row
    q = torch.randn(B, Hq, T, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(B, Hk, T, 16, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    grad = torch.randn(B, Hq, T, 16, generator=gen, dtype=torch.float64)
    ours = DocumentAttention(doc, dense_below).attend(q, k, v, enable_gqa=Hq != Hk)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=document_causal_mask(doc), enable_gqa=Hq != Hk)
    torch.testing.assert_close(ours, ref)
    g_ours = torch.autograd.grad(ours, (q, k, v), grad)
    g_ref = torch.autograd.grad(ref, (q, k, v), grad)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b)


def test_document_attention_never_builds_a_t_by_t_tensor():
    """Forward and backward of a packed row of 4096 tokens: no tensor anywhere has T² elements (the dense
    mask alone would be [1, 1, 4096, 4096])."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class LargestTensor(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    LargestTensor.largest = max(LargestTensor.largest, t.numel())
            return out

    T = 4096
    doc = random_documents(1, T, torch.Generator().manual_seed(0))
    q, k, v = (torch.randn(1, 2, T, 8, requires_grad=True) for _ in range(3))
    with LargestTensor():
        DocumentAttention(doc).attend(q, k, v, enable_gqa=False).sum().backward()
    assert 0 < LargestTensor.largest < T * T // 64, LargestTensor.largest


@pytest.mark.parametrize("fused", [True, False])
def test_packed_row_equals_documents_run_separately(fused):
    torch.manual_seed(0)
    model = Transformer(get_flavor("tiny", fused_ops=fused)).eval()
    a, b = torch.randint(0, 1024, (1, 13)), torch.randint(0, 1024, (1, 19))
    packed = torch.cat([a, b], dim=1)
    doc_ids = torch.tensor([[0] * 13 + [1] * 19])
    with torch.no_grad():
        together = model(packed, document_ids=doc_ids)
        separate = torch.cat([model(a), model(b)], dim=1)
        unpacked = model(packed)  # without document ids the second document sees the first
    assert (together - separate).abs().max().item() <= 1e-5
    assert (unpacked[:, 13:] - separate[:, 13:]).abs().max().item() > 1e-3


def test_kv_cache_generation_equals_full_recompute(tiny):
    torch.manual_seed(1)
    prompt = torch.randint(0, 1024, (2, 7))
    with_cache = generate(tiny, prompt, max_new_tokens=12, use_cache=True)
    without = generate(tiny, prompt, max_new_tokens=12, use_cache=False)
    assert with_cache.shape == (2, 19)
    assert with_cache.tolist() == without.tolist()


def test_kv_cache_logits_match_full_forward_in_chunks(tiny):
    """Prefill 5, then a 3-token chunk (exercises the in-cache causal mask), then single tokens."""
    tokens = torch.randint(0, 1024, (1, 11))
    cache = KVCache(tiny.args, 1, 11)
    with torch.no_grad():
        full = tiny(tokens)
        parts = [tiny(tokens[:, :5], cache=cache), tiny(tokens[:, 5:8], cache=cache)]
        parts += [tiny(tokens[:, i : i + 1], cache=cache) for i in range(8, 11)]
    assert cache.length == 11
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="KV cache full"), torch.no_grad():
        tiny(tokens[:, :1], cache=cache)


@pytest.mark.parametrize("fused", [True, False])
def test_loss_is_cross_entropy_of_logits(fused):
    torch.manual_seed(0)
    model = Transformer(get_flavor("tiny", fused_ops=fused))
    tokens = torch.randint(0, 1024, (2, 16))
    labels = torch.roll(tokens, -1, dims=1)
    labels[:, -1] = -100
    loss = model.loss(tokens, labels)
    loss.backward()
    grad = model.layers[0].attention.wqkv.weight.grad.clone()
    model.zero_grad()
    expected = F.cross_entropy(model(tokens).flatten(0, 1), labels.flatten(), ignore_index=-100)
    expected.backward()
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, model.layers[0].attention.wqkv.weight.grad, atol=1e-6, rtol=1e-4)


def test_training_step_in_bf16_reduces_loss():
    """Fused ops in bf16 end to end: forward, backward through every op, and a few optimizer steps."""
    torch.manual_seed(0)
    model = Transformer(get_flavor("tiny")).to(torch.bfloat16)
    tokens = torch.randint(0, 1024, (2, 32))
    labels = torch.roll(tokens, -1, dims=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = model.loss(tokens, labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 0.5, losses
