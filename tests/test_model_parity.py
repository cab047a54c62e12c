"""puyu's InternLM2 against transformers' LlamaForCausalLM on an exported checkpoint, and RoPE scaling
against the published formulas."""
import pytest
import torch

from puyu.model import Transformer, export_llama, get_flavor
from puyu.model.config import ModelArgs, RopeScaling
from puyu.model.rope import rope_inv_freq

transformers = pytest.importorskip("transformers")

MID = ModelArgs(dim=512, n_layers=4, n_heads=8, n_kv_heads=2, vocab_size=8192, ffn_hidden_dim=1376, max_seq_len=256)


def _hf_logits(model: Transformer, tokens: torch.Tensor, tmp_path) -> torch.Tensor:
    export_llama(model, tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(tokens).logits


@pytest.mark.parametrize(
    "args",
    [
        get_flavor("tiny"),
        get_flavor("tiny", fused_ops=False),
        get_flavor("tiny", tie_embeddings=True),
        get_flavor("tiny", rope_scaling=RopeScaling("linear", 4.0)),
        MID,
    ],
    ids=["tiny", "tiny-reference-ops", "tiny-tied", "tiny-linear-rope", "mid"],
)
def test_logits_match_transformers_llama(args, tmp_path):
    torch.manual_seed(0)
    model = Transformer(args).eval()
    tokens = torch.randint(0, args.vocab_size, (2, 48))
    with torch.no_grad():
        ours = model(tokens)
    theirs = _hf_logits(model, tokens, tmp_path)
    assert ours.shape == theirs.shape == (2, 48, args.vocab_size)
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_dynamic_ntk_beyond_trained_length_matches_transformers(tmp_path):
    """Trained length 16, sequence 40: the base grows per the NTK formula in both implementations."""
    args = get_flavor("tiny", max_seq_len=16, rope_theta=10000.0, rope_scaling=RopeScaling("dynamic", 2.0))
    torch.manual_seed(0)
    model = Transformer(args).eval()
    tokens = torch.randint(0, args.vocab_size, (1, 40))
    with torch.no_grad():
        ours = model(tokens)
    theirs = _hf_logits(model, tokens, tmp_path)
    assert (ours - theirs).abs().max().item() <= 1e-5
    # and the scaling did act: without it the logits differ
    plain = Transformer(args.replace(rope_scaling=RopeScaling())).eval()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert (plain(tokens) - ours).abs().max().item() > 1e-3


@pytest.mark.parametrize("seq_len", [100, 32768, 32769, 50000, 131072])
def test_dynamic_ntk_inv_freq_is_the_published_formula(seq_len):
    """InternLM2 / Llama HF: base' = base * ((f * L / L_train) - (f - 1)) ** (d / (d - 2)) once L > L_train."""
    args = get_flavor("7b")  # head_dim 128, base 1e6, trained 32768, dynamic factor 2
    d, base, f, trained = args.head_dim, args.rope_theta, args.rope_scaling.factor, args.max_seq_len
    if seq_len > trained:
        base = base * ((f * seq_len / trained) - (f - 1)) ** (d / (d - 2))
    expected = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    torch.testing.assert_close(rope_inv_freq(args, seq_len).double(), expected, rtol=1e-6, atol=0)

    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = transformers.LlamaConfig(
        hidden_size=args.dim, num_attention_heads=args.n_heads, max_position_embeddings=trained,
        rope_parameters={"rope_type": "dynamic", "factor": f, "rope_theta": args.rope_theta},
    )
    hf_inv_freq, _ = ROPE_INIT_FUNCTIONS["dynamic"](cfg, torch.device("cpu"), seq_len)
    torch.testing.assert_close(rope_inv_freq(args, seq_len), hf_inv_freq.float(), rtol=1e-6, atol=0)


def test_published_flavors_have_the_released_shapes():
    sizes = {name: get_flavor(name).num_params() / 1e9 for name in ("1_8b", "7b", "20b")}
    assert 1.8 < sizes["1_8b"] < 2.0 and 7.5 < sizes["7b"] < 7.9 and 19.5 < sizes["20b"] < 20.1, sizes
    for name in ("1_8b", "7b", "20b"):
        a = get_flavor(name)
        assert (a.vocab_size, a.n_kv_heads, a.norm_eps, a.rope_theta, a.head_dim) == (92544, 8, 1e-5, 1e6, 128)
