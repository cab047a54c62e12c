"""The caching CPU allocator the runtime installs during ``generate`` (csrc/serving/caching_allocator.cpp,
``puyu.serving.host_memory``): blocks are reused, values survive, blocks cross the install boundary in
both directions (tensors and ideep's raw allocations), and the runtime's tokens do not change."""
import pytest
import torch

from puyu.model import Transformer, get_flavor
from puyu.serving import ops
from puyu.serving.config import RuntimeConfig, SamplingParams, ServingError
from puyu.serving.host_memory import cached_cpu_allocations
from puyu.serving.llm import LLM

pytestmark = pytest.mark.skipif(not ops.extension_available("cpu"), reason="serving ops extension not built")


def _ext():
    return ops.extension()


def test_freed_blocks_are_reused_and_restored_on_exit():
    with cached_cpu_allocations(64) as active:
        assert active
        a = torch.empty(1 << 16)  # 256 KiB: cached size class
        addr = a.data_ptr()
        del a
        b = torch.empty(1 << 16)
        assert b.data_ptr() == addr  # the freed block came back
        c = torch.empty(1 << 16)
        assert c.data_ptr() != addr
        small = torch.ones(16)  # passes through to torch's allocator
        assert small.sum().item() == 16
    with pytest.raises(RuntimeError, match="disable without enable"):  # the scope's exit uninstalled it
        _ext().caching_allocator_disable()
    b.fill_(3.0)  # blocks made inside stay valid after the allocator is gone, and free normally
    assert b.sum().item() == 3.0 * (1 << 16)
    del b, c


def test_counts_hits_and_nests():
    ext = _ext()
    assert ext.caching_allocator_enable(1 << 26)
    assert ext.caching_allocator_enable(1 << 20)  # a second user shares the installation
    for _ in range(5):
        x = torch.empty(300_000)
        del x
    assert ext.caching_allocator_disable() == (4, 1)  # still installed: first allocation missed, 4 reused
    y = torch.empty(300_000)
    assert ext.caching_allocator_disable() == (5, 1)  # the last user restores torch's allocator
    del y
    with pytest.raises(RuntimeError, match="disable without enable"):
        ext.caching_allocator_disable()


def test_limit_bounds_the_cache():
    ext = _ext()
    assert ext.caching_allocator_enable(1 << 20)  # 1 MiB of cache
    xs = [torch.empty(1 << 17) for _ in range(4)]  # 4 x 512 KiB
    addrs = {x.data_ptr() for x in xs}
    del xs  # only two fit the limit; the other two are freed
    ys = [torch.empty(1 << 17) for _ in range(4)]
    reused = sum(y.data_ptr() in addrs for y in ys)
    hits, misses = ext.caching_allocator_disable()
    assert (hits, misses) == (2, 6)
    assert reused >= 2  # the two cached ones (malloc may hand back a freed address too)
    del ys


def test_tensors_and_packed_weights_cross_the_boundary():
    """oneDNN's packed weights come from ideep's raw allocate/deallocate through whichever allocator is
    current: one made before and freed inside, one made inside and freed after."""
    w_out = torch.randn(64, 128)
    packed_out = torch.ops.mkldnn._reorder_linear_weight(w_out)
    outside = torch.randn(70_000)
    x = torch.randn(512, 128)
    want = x @ w_out.t()
    with cached_cpu_allocations(64):
        got = torch.ops.mkldnn._linear_pointwise(x, packed_out, None, "none", [], "")
        del packed_out, outside  # made by torch's allocator, freed while the caching one is installed
        w_in = torch.randn(96, 128)
        packed_in = torch.ops.mkldnn._reorder_linear_weight(w_in)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.ops.mkldnn._linear_pointwise(x, packed_in, None, "none", [], ""), x @ w_in.t())
    del packed_in, got  # made inside, freed with torch's allocator back


def test_off_and_bad_limit():
    with cached_cpu_allocations(0) as active:
        assert not active
    with pytest.raises(ServingError, match="cpu_alloc_cache_mb"):
        LLM.from_model(Transformer(get_flavor("tiny")).eval(), runtime=RuntimeConfig(cpu_alloc_cache_mb=-1))


def test_generate_tokens_unchanged():
    torch.manual_seed(0)
    model = Transformer(get_flavor("tiny")).eval()
    prompts = [[(5 * i + j) % 1000 + 1 for j in range(3 + 7 * i)] for i in range(12)]
    sp = SamplingParams(max_tokens=12, ignore_eos=True)
    outs = {}
    for mb in (0, 64):
        llm = LLM.from_model(model, runtime=RuntimeConfig(num_blocks=64, cpu_alloc_cache_mb=mb, max_num_batched_tokens=64))
        outs[mb] = [o.token_ids for o in llm.generate(prompts, sp)]
    assert outs[0] == outs[64]
    assert all(len(t) == 12 for t in outs[0])
