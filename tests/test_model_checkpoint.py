"""State-dict adapters and safetensors checkpoints: exact round trips, sharding, bad input."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from puyu.model import (
    StateDictError,
    Transformer,
    args_from_hf_config,
    convert,
    export_llama,
    get_flavor,
    llama_config,
    load_model,
    load_safetensors,
    save_model,
    save_safetensors,
)
from puyu.model.state_dict import puyu_state_dict


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Transformer(get_flavor("tiny"))


def _assert_equal_states(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_round_trips_are_exact(tiny):
    state = puyu_state_dict(tiny)
    internlm2 = convert(state, "puyu", "internlm2", tiny.args)
    llama = convert(state, "puyu", "llama", tiny.args)
    assert "model.layers.0.attention.wqkv.weight" in internlm2 and "output.weight" in internlm2
    assert "model.layers.1.self_attn.k_proj.weight" in llama and "lm_head.weight" in llama
    _assert_equal_states(convert(internlm2, "internlm2", "puyu", tiny.args), state)
    _assert_equal_states(convert(llama, "llama", "puyu", tiny.args), state)
    _assert_equal_states(convert(convert(internlm2, "internlm2", "llama", tiny.args), "llama", "internlm2",
                                 tiny.args), internlm2)


@pytest.mark.parametrize("layout", ["puyu", "internlm2", "llama"])
def test_save_load_in_each_layout(tiny, tmp_path, layout):
    save_model(tiny, tmp_path, layout)
    fresh = load_model(Transformer(get_flavor("tiny")), tmp_path, layout)
    _assert_equal_states(puyu_state_dict(fresh), puyu_state_dict(tiny))


def test_sharded_checkpoint_with_index(tiny, tmp_path):
    files = save_model(tiny, tmp_path, "internlm2", max_shard_bytes=1_000_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in files if p.suffix == ".safetensors")
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(set(index["weight_map"].values())) == shards
    assert index["metadata"]["total_size"] == sum(p.numel() * p.element_size() for p in tiny.state_dict().values())
    fresh = load_model(Transformer(get_flavor("tiny")), tmp_path, "internlm2")
    _assert_equal_states(puyu_state_dict(fresh), puyu_state_dict(tiny))


def test_sharded_llama_export_loads_in_transformers(tiny, tmp_path):
    transformers = pytest.importorskip("transformers")
    export_llama(tiny, tmp_path, max_shard_bytes=1_000_000)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert type(hf).__name__ == "LlamaForCausalLM"
    ours = puyu_state_dict(tiny)
    torch.testing.assert_close(hf.model.layers[1].mlp.down_proj.weight, ours["layers.1.feed_forward.w2.weight"])
    assert args_from_hf_config(json.loads((tmp_path / "config.json").read_text())) == tiny.args


def test_tied_embeddings_save_one_matrix(tmp_path):
    torch.manual_seed(0)
    model = Transformer(get_flavor("tiny", tie_embeddings=True))
    assert model.output.weight is model.tok_embeddings.weight
    export_llama(model, tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in saved and llama_config(model.args)["tie_word_embeddings"] is True
    fresh = load_model(Transformer(get_flavor("tiny", tie_embeddings=True)), tmp_path, "llama")
    assert torch.equal(fresh.output.weight, model.tok_embeddings.weight)


def test_bad_checkpoint_lists_every_offending_tensor(tiny, tmp_path):
    state = convert(puyu_state_dict(tiny), "puyu", "internlm2", tiny.args)
    del state["model.layers.1.feed_forward.w3.weight"]
    state["model.layers.0.attention.bias"] = torch.zeros(3)
    state["model.norm.weight"] = torch.ones(7)
    save_safetensors(state, tmp_path)
    with pytest.raises(StateDictError) as err:
        load_model(Transformer(get_flavor("tiny")), tmp_path, "internlm2")
    msg = str(err.value)
    assert "missing (1): layers.1.feed_forward.w3.weight" in msg
    assert "unexpected (1): layers.0.attention.bias" in msg
    assert "mis-shaped (1): norm.weight: got (7,), expected (256,)" in msg


def test_bad_llama_checkpoint_names_the_broken_projection(tiny, tmp_path):
    state = convert(puyu_state_dict(tiny), "puyu", "llama", tiny.args)
    state["model.layers.0.self_attn.k_proj.weight"] = state["model.layers.0.self_attn.k_proj.weight"][:-1]
    del state["model.layers.1.self_attn.v_proj.weight"]
    save_safetensors(state, tmp_path)
    with pytest.raises(StateDictError) as err:
        load_model(Transformer(get_flavor("tiny")), tmp_path, "llama")
    msg = str(err.value)
    assert "layers.0.attention.wqkv.weight" in msg and "layers.1.attention.wqkv.weight" in msg
    assert "model.layers.0.self_attn.k_proj.weight" in msg and "model.layers.1.self_attn.q_proj.weight" in msg


def test_index_disagreeing_with_shards_is_reported(tmp_path):
    save_file({"a": torch.zeros(2)}, tmp_path / "model-00001-of-00001.safetensors")
    weight_map = {"a": "model-00001-of-00001.safetensors", "b": "model-00001-of-00001.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match=r"listed but absent \['b'\]"):
        load_safetensors(tmp_path)
