"""``runtime.device``/``runtime.dtype`` and ``build.device``: on the CPU the runtime serves as before (same
tokens, weights not copied), ``cuda`` without CUDA is refused when a job is configured, the batched sampler
GPUs use draws from the same distributions, and, on a GPU, the runtime and the build's forwards run there.

The gather path CUDA takes (no paged kernel, batches moved in one copy) is checked against the model's
reference on the CPU by ``test_serving_runtime``'s ``gather_moved`` case.
"""
from __future__ import annotations

import json

import pytest
import torch

from puyu.agents.config import AgentJobConfig
from puyu.agents.job import build_agent_stages
from puyu.evaluation.config import EvalJobConfig
from puyu.evaluation.job import eval_stages
from puyu.model import Transformer, generate, get_flavor
from puyu.model.state_dict import puyu_state_dict
from puyu.serving import llm as llm_module
from puyu.serving import server
from puyu.serving.build import build_engine_stages, layer_captures, perplexity, quantize_tensors
from puyu.serving.config import (BuildConfig, BuildEngineJobConfig, InferJobConfig, RuntimeConfig, SamplingParams,
                                 ServingError)
from puyu.serving.engine import Engine, engine_tensors, place_tensors
from puyu.serving.engine_model import LINEARS, EngineModel
from puyu.serving.job import build_infer_stages
from puyu.serving.llm import LLM
from puyu.serving.quant import quantize_linear
from puyu.serving.sampling import filter_top_k_top_p, sample_rows, sample_rows_batched

cuda = pytest.mark.cuda  # skipped without a GPU (tests/conftest.py); failed instead under PUYU_REQUIRE_CUDA=1
without_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here (auto means cuda)")
RUNTIME = dict(block_size=8, num_blocks=40, max_num_batched_tokens=64, max_num_seqs=8)  # chunked prefill, preemption
GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(2)
    return Transformer(get_flavor("tiny")).eval()


@pytest.fixture(scope="module")
def prompts():
    """Random token prompts of 2-69 tokens; every fourth shares a 33-token prefix (prefix-cache hits)."""
    g = torch.Generator().manual_seed(3)
    out = [torch.randint(1, 1024, (int(k),), generator=g).tolist() for k in torch.randint(2, 70, (16,), generator=g)]
    for i in range(0, len(out), 4):
        out[i] = out[0][:33] + out[i][:9]
    return out


@pytest.fixture(scope="module")
def reference(model, prompts):
    """The training-side model's own greedy tokens (fp32, CPU): what the runtime serves today."""
    return [generate(model, torch.tensor([p]), GREEDY.max_tokens)[0, len(p):].tolist() for p in prompts]


def fp_tensors(model) -> dict[str, torch.Tensor]:
    return engine_tensors(model.args, {k: v.detach() for k, v in puyu_state_dict(model).items()})


def engine_of(model, tmp_path, tensors=None) -> Engine:
    tensors = tensors or fp_tensors(model)
    return Engine(tmp_path, model.args, tensors, {"build": {"quant": "none", "kv": "fp"}})


def tokens(llm: LLM, prompts, sampling=GREEDY) -> list[list[int]]:
    outs = llm.generate(prompts, sampling)
    assert all(o.error is None for o in outs)
    return [o.token_ids for o in outs]


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """The fraction of positions where two runs' tokens agree."""
    return sum(x == y for s, t in zip(a, b) for x, y in zip(s, t)) / sum(len(s) for s in a)


# ---- CPU ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", ["cpu", pytest.param("auto", marks=without_cuda)])
def test_cpu_and_auto_serve_as_before_without_copying_the_weights(model, prompts, reference, tmp_path, device):
    engine = engine_of(model, tmp_path)
    llm = LLM(engine, runtime=RuntimeConfig(device=device, **RUNTIME))
    assert llm.device.type == "cpu" and llm.cache.k.device.type == "cpu"
    assert llm.model.tok_embeddings is engine.tensors["tok_embeddings.weight"]  # placed where it was: no copy
    assert tokens(llm, prompts) == reference
    assert llm.stats["prefix_cache_block_hits"] > 0 and llm.stats["preemptions"] > 0
    assert tokens(LLM.from_model(model, runtime=RuntimeConfig(device=device, **RUNTIME)), prompts) == reference


def test_unknown_device_or_dtype_is_refused_naming_the_valid_ones():
    with pytest.raises(ServingError, match=r"^runtime\.device='gpu'; choose one of auto, cpu, cuda$"):
        RuntimeConfig(device="gpu").validate()
    with pytest.raises(ServingError, match=r"^build\.device='tpu'; choose one of auto, cpu, cuda$"):
        BuildConfig(device="tpu").validate()
    with pytest.raises(ServingError, match=r"^runtime\.dtype='fp8'; choose one of auto, float32, bfloat16, float16$"):
        RuntimeConfig(dtype="fp8").validate()


@without_cuda
def test_cuda_without_cuda_is_refused_when_a_job_is_configured(model, tmp_path, capsys):
    cuda_runtime = RuntimeConfig(device="cuda")
    message = r"^runtime\.device=cuda but CUDA is not available here \(torch .*\); use runtime\.device=cpu, or auto"
    with pytest.raises(ServingError, match=message) as exc:
        cuda_runtime.validate()
    assert "\n" not in str(exc.value)
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"prompt_token_ids": [1, 2]}\n')
    with pytest.raises(ServingError, match=message):
        build_infer_stages(InferJobConfig(kind="infer", engine=str(tmp_path), input=str(inputs), runtime=cuda_runtime))
    with pytest.raises(ServingError, match=message):
        eval_stages(EvalJobConfig(kind="eval", runtime=cuda_runtime))
    with pytest.raises(ServingError, match=message):
        build_agent_stages(AgentJobConfig(kind="agent", engine=str(tmp_path), input=str(inputs), runtime=cuda_runtime))
    with pytest.raises(ServingError, match=message):
        LLM.from_model(model, runtime=cuda_runtime)
    with pytest.raises(ServingError, match=r"^build\.device=cuda but CUDA is not available here"):
        build_engine_stages(BuildEngineJobConfig(kind="build_engine", checkpoint=str(tmp_path),
                                                 build=BuildConfig(device="cuda")))
    with pytest.raises(SystemExit):
        server.main(["--engine", str(tmp_path), "--device", "cuda"])
    assert "--device=cuda but CUDA is not available here" in capsys.readouterr().err


def test_bfloat16_casts_weights_and_kv_cache_but_not_rope_tables_or_codes(model, prompts, reference, tmp_path):
    llm = LLM(engine_of(model, tmp_path), runtime=RuntimeConfig(device="cpu", dtype="bfloat16", **RUNTIME))
    assert llm.model.dtype == llm.cache.k.dtype == torch.bfloat16 and llm.model.rope_cos.dtype == torch.float32
    assert agreement(tokens(llm, prompts), reference) > 0.75
    # a w8 engine: its int8 codes stay, its float tensors take the dtype
    w8 = fp_tensors(model)
    for i in range(model.args.n_layers):
        for name in LINEARS:
            key = f"layers.{i}.{name}"
            parts, _ = quantize_linear(w8.pop(key + ".weight"), "w8", 128, None)
            w8.update({f"{key}.{k}": v for k, v in parts.items()})
    placed = place_tensors(w8, "cpu", torch.bfloat16)
    assert placed["layers.0.wqkv.qweight"].dtype == torch.int8
    assert placed["layers.0.wqkv.scales"].dtype == placed["norm.weight"].dtype == torch.bfloat16
    quantized = LLM(engine_of(model, tmp_path, w8), runtime=RuntimeConfig(device="cpu", dtype="bfloat16", **RUNTIME))
    assert quantized.model.dtype == torch.bfloat16 and agreement(tokens(quantized, prompts), reference) > 0.6


def test_an_engine_model_is_used_as_it_is(model):
    engine = EngineModel(model.args, fp_tensors(model))
    assert LLM(engine, runtime=RuntimeConfig(device="cpu", dtype="float32")).model is engine
    message = r"^runtime\.dtype=bfloat16 but the EngineModel's weights are torch\.float32$"
    with pytest.raises(ServingError, match=message):
        LLM(engine, runtime=RuntimeConfig(dtype="bfloat16"))


# ---- the batched sampler (GPU logits; checked here on CPU tensors) --------------------------------------
@pytest.mark.parametrize("params", [dict(temperature=0.8, top_k=4, top_p=0.9), dict(temperature=1.5),
                                    dict(temperature=1.0, top_p=0.7), dict(temperature=1.0, top_k=2)])
def test_batched_sampler_draws_from_the_filtered_distribution(params):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 3.0])
    p = SamplingParams(**params)
    n = 4000
    drawn = sample_rows_batched(logits.expand(n, -1), [p] * n, [[]] * n,
                                [torch.Generator().manual_seed(i) for i in range(n)])
    freq = torch.bincount(torch.tensor(drawn), minlength=6).float() / n
    expected = filter_top_k_top_p(logits / p.temperature, p.top_k, p.top_p).softmax(-1)
    assert torch.all(freq[expected == 0] == 0), (freq, expected)  # filtered-out tokens are never drawn
    assert torch.allclose(freq, expected, atol=0.03), (freq, expected)


def test_batched_sampler_matches_the_per_row_one_where_it_is_deterministic():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    logits[3, 7] = logits[3].max() + 0.01  # a penalised token that would otherwise win
    params = [SamplingParams(), SamplingParams(temperature=0.7, top_k=1), SamplingParams(repetition_penalty=1.3),
              SamplingParams(repetition_penalty=4.0), SamplingParams(temperature=0.9, seed=5)]
    histories = [[1, 2], [], [int(logits[2].argmax()), 3], [7, 7, 9], [4]]
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(5)]  # noqa: E731
    batched = sample_rows_batched(logits, params, histories, gens())
    assert batched[:4] == sample_rows(logits, params, histories, gens())[:4]
    assert batched[3] != 7
    # a sampled row's token depends on its own generator only, not on its batch
    alone = sample_rows_batched(logits[4:], params[4:], histories[4:], gens()[4:])
    assert alone == batched[4:]


# ---- on a GPU -------------------------------------------------------------------------------------------
@cuda
def test_cuda_fp32_gives_the_cpu_tokens_and_logprobs(model, prompts, reference, monkeypatch):
    host_cache = []
    real = llm_module.cached_cpu_allocations
    monkeypatch.setattr(llm_module, "cached_cpu_allocations", lambda mb: host_cache.append(mb) or real(mb))
    llm = LLM.from_model(model, runtime=RuntimeConfig(device="cuda", dtype="float32", **RUNTIME))
    assert llm.device.type == llm.cache.k.device.type == "cuda" and not llm.model.paged_kernel
    assert all(lin.packed is None for layer in llm.model.layers for lin in layer.values() if hasattr(lin, "packed"))
    assert tokens(llm, prompts) == reference
    assert llm.stats["prefix_cache_block_hits"] > 0 and llm.stats["preemptions"] > 0 and host_cache == [0]
    scored = SamplingParams(max_tokens=4, ignore_eos=True, logprobs=True, prompt_logprobs=True)
    on_gpu = llm.generate(prompts[:4], scored)
    on_cpu = LLM.from_model(model, runtime=RuntimeConfig(device="cpu", **RUNTIME)).generate(prompts[:4], scored)
    for g, c in zip(on_gpu, on_cpu):
        assert g.token_ids == c.token_ids
        assert torch.allclose(torch.tensor(g.logprobs), torch.tensor(c.logprobs), atol=1e-3)
        assert torch.allclose(torch.tensor(g.prompt_logprobs[1:]), torch.tensor(c.prompt_logprobs[1:]), atol=1e-3)


@cuda
def test_cuda_auto_serves_an_engine_in_bfloat16_close_to_fp32(model, prompts, reference, tmp_path):
    llm = LLM(engine_of(model, tmp_path), runtime=RuntimeConfig(**RUNTIME))
    assert llm.device.type == "cuda" and llm.model.dtype == llm.cache.k.dtype == torch.bfloat16
    assert llm.model.rope_cos.dtype == torch.float32
    out = tokens(llm, prompts)
    assert all(0 <= t < model.args.vocab_size for s in out for t in s)
    assert sum(a[0] == b[0] for a, b in zip(out, reference)) >= 0.75 * len(prompts)
    assert agreement(out, reference) > 0.75
    int8 = LLM(engine_of(model, tmp_path), runtime=RuntimeConfig(dtype="float32", kv_dtype="int8", **RUNTIME))
    assert int8.cache.k.dtype == torch.int8 and agreement(tokens(int8, prompts), reference) > 0.75


@cuda
def test_cuda_sampling_is_seeded_per_request(model, prompts):
    llm = LLM.from_model(model, runtime=RuntimeConfig(device="cuda", **RUNTIME))
    sp = SamplingParams(max_tokens=8, temperature=0.9, top_p=0.9, repetition_penalty=1.2, ignore_eos=True, seed=11)
    alone = tokens(llm, [prompts[3]], sp)[0]
    batched = tokens(llm, prompts[:8], [SamplingParams(ignore_eos=True)] * 3 + [sp] + [GREEDY] * 4)
    assert batched[3] == alone and len(set(alone)) > 1


@cuda
def test_cuda_build_forwards_and_awq_search_leave_cpu_tensors(model, prompts):
    fp = fp_tensors(model)
    on_cpu, on_gpu = EngineModel(model.args, fp), EngineModel(model.args, place_tensors(fp, "cuda"))
    assert perplexity(on_gpu, prompts) == pytest.approx(perplexity(on_cpu, prompts), rel=1e-4)
    hidden = [on_gpu.embed_dense(torch.tensor(p, device="cuda")[None]) for p in prompts]
    _, captured = layer_captures(on_gpu, hidden, 0)
    assert set(captured) == set(LINEARS) and all(x.device.type == "cuda" for x in captured.values())
    tensors = dict(fp)
    alphas = quantize_tensors(on_gpu, tensors, BuildConfig(quant="w4", device="cuda"), prompts)
    assert all(t.device.type == "cpu" for t in tensors.values()) and len(alphas) == model.args.n_layers * len(LINEARS)
    assert json.dumps(alphas)  # plain floats, as the build report stores them
    served = LLM(EngineModel(model.args, tensors), runtime=RuntimeConfig(device="cpu", **RUNTIME))
    assert all(0 <= t < model.args.vocab_size for s in tokens(served, prompts) for t in s)
