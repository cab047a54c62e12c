"""DPO finetuning (``job.method=dpo``): the loss against trl's, a short run on Wikipedia preference pairs,
bad preference rows and settings.

Real data: the tokenizer and a briefly pretrained tiny base come from the Wikipedia lead sections package
(as in tests/test_finetune.py), and the preference pairs from the same package: prompt ``Tell me about
<title>.``, chosen the true lead, rejected the lead with its words shuffled. One torch thread per process.
"""
from __future__ import annotations

import copy
import json
import math
import re
import sys
from pathlib import Path

import cloudpickle
import pytest
import torch

from puyu.data_pipeline import preference
from puyu.launcher.config import ClusterConfig, ClusterKind, LauncherConfig
from puyu.launcher.errors import PuyuError, StageFailed
from puyu.launcher.pipeline import Pipeline
from puyu.model import Transformer, get_flavor, load_model
from puyu.parallel.config import ModelConfig
from puyu.parallel.dpo import batch_loss, pair_batch
from puyu.parallel.finetune import FinetuneTask, add_lora, finetune_stages, merge_lora
from puyu.parallel.ft_config import DPOConfig, FinetuneJobConfig, LoraConfig, SFTDataConfig
from puyu.parallel.parallelize import StageModule

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # FailAfter travels to its processes by value
torch.set_num_threads(1)
VOCAB = 2000  # the finetuning base's vocabulary (conftest's `base` fixture)


def dpo_job(base, paths, eval_paths=(), steps=6, **dpo) -> FinetuneJobConfig:
    cfg = FinetuneJobConfig(kind="finetune", method="dpo", checkpoint=str(base["model"]),
                            tokenizer=str(base["tokenizer"]), device="cpu",
                            model=ModelConfig(flavor="tiny", vocab_size=VOCAB), dpo=DPOConfig(**dpo),
                            data=SFTDataConfig(paths=[str(p) for p in paths], eval_paths=[str(p) for p in eval_paths],
                                               seq_len=96), eval_rows=32)
    cfg.optim.lr, cfg.optim.warmup_steps = 2e-3, 2
    cfg.train.steps, cfg.train.threads, cfg.train.checkpoint_every = steps, 1, 4
    cfg.train.global_batch, cfg.train.micro_batch = 8, 4
    return cfg


def run(cfg: FinetuneJobConfig, run_dir: Path) -> dict:
    return Pipeline(finetune_stages(cfg), run_dir, ClusterConfig(kind=ClusterKind.inline, time_min=10),
                    LauncherConfig(poll_s=0.3)).run()


def records(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "finetune" / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- the loss against trl's
def test_the_dpo_loss_and_rewards_equal_trls_on_the_same_batch(base, tmp_path):
    """trl 1.16's own DPO loss on the batch puyu trains on, within 1e-5.

    puyu: preference rows (two standard, two conversational with a system turn) rendered and masked by
    :mod:`puyu.data_pipeline.preference`, one ``[chosen; rejected]`` batch (:func:`pair_batch`), and
    :func:`puyu.parallel.dpo.batch_loss` on the tiny model with LoRA adapters (B perturbed) as the policy
    and the same model with its adapters disabled as the reference, in float64.
    trl: a real ``DPOTrainer`` (``loss_type=["sigmoid"]``, ``beta=0.1``, an explicit frozen ``ref_model``)
    over the same two models as ``transformers`` Llama models (the policy with the adapters merged, both
    written with puyu's HF export and loaded by ``LlamaForCausalLM.from_pretrained`` in float64), its
    ``compute_loss`` called on the same token ids with ``completion_mask`` = puyu's labelled tokens. That
    runs trl's fused-LM-head per-token log-probs, its summing over the completion, its reference forward and
    its sigmoid loss, and fills its ``rewards/*`` and ``logps/*`` metrics, which are compared too.
    """
    transformers = pytest.importorskip("transformers")
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    from puyu.model.hf import export_hf

    ref = load_model(Transformer(get_flavor("tiny", vocab_size=VOCAB)), base["model"]).double().eval()
    policy = add_lora(copy.deepcopy(ref), LoraConfig(rank=4, alpha=8.0), seed=0).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.05)
    rows = tmp_path / "prefs.jsonl"
    preference.wiki_preference_jsonl(rows, limit=2)
    convo = [{"prompt": [{"role": "system", "content": "Answer in one sentence."},
                         {"role": "user", "content": q}],
              "chosen": [{"role": "assistant", "content": good}], "rejected": [{"role": "assistant", "content": bad}]}
             for q, good, bad in (("What is rain?", "Rain is water falling from clouds.", "Rain is a kind of cheese."),
                                  ("Name a planet.", "Mars is a planet.", "planet a Mars is"))]
    with rows.open("a") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in convo)
    pairs = preference.build_pairs([str(rows)], base["tok"], 96)
    assert len(pairs.tokens) == 4
    b = pair_batch(pairs, [0, 1, 2, 3])
    stage = StageModule(policy, [0, 1], True, True)
    with torch.no_grad():
        loss_sum, sums = batch_loss(stage, None, b.tokens, b.labels, DPOConfig(beta=0.1))
    ours = float(loss_sum) / 4
    assert not math.isclose(ours, math.log(2), abs_tol=1e-3)  # the policy differs from the reference

    merged = merge_lora(copy.deepcopy(policy))
    export_hf(merged, tmp_path / "hf_policy")
    export_hf(ref, tmp_path / "hf_ref")
    load = lambda d: transformers.LlamaForCausalLM.from_pretrained(tmp_path / d, dtype=torch.float64)  # noqa: E731
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(base["tokenizer"]), pad_token="<|pad|>",
                                                     eos_token="<|im_end|>")
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.1, loss_type=["sigmoid"], report_to="none",
                         use_cpu=True, bf16=False, max_length=None)  # (trl defaults to bf16)
    dataset = datasets.Dataset.from_list([json.loads(ln) for ln in rows.read_text().splitlines()[:2]])
    trainer = trl.DPOTrainer(model=load("hf_policy"), ref_model=load("hf_ref"), args=args, train_dataset=dataset,
                             processing_class=tokenizer)
    lengths = torch.cat([torch.from_numpy(pairs.lengths[:, 0]), torch.from_numpy(pairs.lengths[:, 1])])
    attention = (torch.arange(b.tokens.shape[1])[None] < lengths[:, None]).long()
    completion = torch.zeros_like(b.tokens)
    completion[:, 1:] = (b.labels[:, :-1] != -100).long()  # token t is scored iff label t-1 names it
    trainer.model.eval()
    with torch.no_grad():
        theirs = trainer.compute_loss(trainer.model, {"input_ids": b.tokens, "attention_mask": attention,
                                                      "completion_mask": completion})
    assert abs(float(theirs) - ours) < 1e-5, (float(theirs), ours)
    logged = {k: v[-1] for k, v in trainer._metrics["eval"].items()}
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert abs(logged[key] - float(sums[key]) / 4) < 1e-5, (key, logged[key], float(sums[key]) / 4)
    for key in ("logps/chosen", "logps/rejected"):
        assert logged[key] == pytest.approx(float(sums[key]) / 4, rel=1e-7), key


# --------------------------------------------------------------------------- a real run
def test_dpo_on_wikipedia_preference_pairs_raises_reward_accuracy_and_lowers_the_loss(base, tmp_path):
    """LoRA DPO through the launcher (inline): chosen = the true lead, rejected = its words shuffled. The
    training loss falls from ln 2, reward accuracy rises from 0 (policy = reference at step 1), and the
    merged export prefers the chosen side of held-out pairs over the base (loss below ln 2)."""
    train, held = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    preference.wiki_preference_jsonl(train, limit=96)
    preference.wiki_preference_jsonl(held, limit=32, offset=1000)  # titles far from the training ones
    cfg = dpo_job(base, [train], [held], steps=10)
    result = run(cfg, tmp_path / "run")["finetune"][0]
    recs = records(tmp_path / "run")
    assert recs[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and recs[0]["rewards/accuracies"] == 0.0
    late = recs[-3:]
    assert max(r["loss"] for r in late) < math.log(2) - 0.05, [r["loss"] for r in recs]
    assert min(r["rewards/accuracies"] for r in late) >= 0.75, [r["rewards/accuracies"] for r in recs]
    assert all(r["rewards/margins"] > 0 for r in late)
    assert result["method"] == "dpo" and result["reference"] == "the base (adapters disabled)"
    h = result["heldout"]
    assert h["pairs"] == 32 and h["loss"] < math.log(2) - 0.05 and h["rewards/accuracies"] > 0.65, h
    report = (tmp_path / "run" / "finetune" / "report.md").read_text()
    for words in ("DPO, LoRA", "preference pairs", "reward accuracy", "Held-out pairs"):
        assert words in report
    assert (tmp_path / "run" / "finetune" / "model" / "model.safetensors").is_file()


def test_full_finetuning_dpo_keeps_a_frozen_copy_of_the_base_as_reference(base, tmp_path):
    train = tmp_path / "train.jsonl"
    preference.wiki_preference_jsonl(train, limit=16)
    cfg = dpo_job(base, [train], steps=3)
    cfg.lora.rank = 0
    result = run(cfg, tmp_path / "run")["finetune"][0]
    assert result["reference"] == "a frozen copy of the base" and result["trainable_params"] == result["total_params"]
    recs = records(tmp_path / "run")
    assert recs[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference at the first step
    assert recs[-1]["loss"] < math.log(2) and recs[-1]["rewards/margins"] > 0, recs


def test_lora_dpo_on_deepspeed_zero2_follows_the_fsdp_engine(base, tmp_path):
    """The same LoRA DPO run on both engines, one rank each (DeepSpeed in this process): losses, trl's
    reward metrics and gradient norms agree; the reference is the stage with its adapters off on both."""
    train = tmp_path / "train.jsonl"
    preference.wiki_preference_jsonl(train, limit=32)
    cfg = dpo_job(base, [train], steps=4)
    run(cfg, tmp_path / "fsdp")
    cfg.engine, cfg.deepspeed.zero_stage = "deepspeed", 2
    result = run(cfg, tmp_path / "ds")["finetune"][0]
    assert result["layout"] == "world 1, DeepSpeed ZeRO-2" and result["method"] == "dpo"
    for g, w in zip(records(tmp_path / "ds"), records(tmp_path / "fsdp"), strict=True):
        for key in ("loss", "grad_norm", "rewards/margins", "rewards/accuracies", "logps/rejected"):
            assert g[key] == pytest.approx(w[key], rel=1e-4, abs=1e-6), (g["step"], key)
    assert (tmp_path / "ds" / "finetune" / "model" / "model.safetensors").is_file()


class FailAfter(FinetuneTask):
    """Fails after step 3, a step past the last checkpoint (a SIGKILL's path is the same on resume;
    tests/test_finetune.py's kill test takes it, at ~30 s for the local executor to see it)."""

    def on_step_end(self, step: int) -> None:
        if step == 3:
            raise RuntimeError("failing after step 3")


def test_dpo_on_two_fsdp_ranks_follows_one_process_that_failed_and_resumed(base, tmp_path, caplog):
    """Full-finetuning DPO, the frozen reference sharded like the policy: 2 FSDP ranks give the losses and
    rewards of one process that failed after step 3 and resumed from its step-2 checkpoint."""
    train = tmp_path / "train.jsonl"
    preference.wiki_preference_jsonl(train, limit=32)
    cfg = dpo_job(base, [train], steps=4)
    cfg.lora.rank, cfg.train.checkpoint_every, cfg.train.async_checkpoint = 0, 2, False

    def launch(run_dir, task, tasks=1):
        stages = finetune_stages(cfg)
        stages[1].fn = task
        kind = ClusterKind.local if tasks > 1 else ClusterKind.inline
        return Pipeline(stages, run_dir, ClusterConfig(kind=kind, tasks_per_node=tasks, time_min=10),
                        LauncherConfig(poll_s=0.3)).run()

    with pytest.raises(StageFailed, match="failing after step 3"):
        launch(tmp_path / "one", FailAfter(cfg))
    assert [r["step"] for r in records(tmp_path / "one")] == [1, 2, 3]
    with caplog.at_level("INFO", logger="puyu.finetune"):
        launch(tmp_path / "one", FinetuneTask(cfg))
    assert "step-00000002 (step 2)" in caplog.text  # resumed, not restarted
    resumed = records(tmp_path / "one")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]  # kept up to the checkpoint, then the resumed steps
    result = launch(tmp_path / "two", FinetuneTask(cfg), tasks=2)["finetune"][0]
    assert result["layout"] == "world 2 = pp 1 × dp_replicate 1 × dp_shard 2 × tp 1"
    for g, w in zip(records(tmp_path / "two"), resumed, strict=True):
        for key in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen"):
            assert g[key] == pytest.approx(w[key], rel=1e-4, abs=1e-6), (g["step"], key)


# --------------------------------------------------------------------------- bad input
def test_bad_preference_rows_are_one_line_naming_file_and_line(base, tmp_path):
    path = tmp_path / "prefs.jsonl"
    good = json.dumps({"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."})
    cases = {"{oops": r"prefs.jsonl:3: not JSON",
             json.dumps({"prompt": "Hi?", "chosen": "Hello."}): r"prefs.jsonl:3: .*needs 'prompt', 'chosen' and "
                                                                 r"'rejected' \(missing 'rejected'",
             json.dumps({"prompt": "Hi?", "chosen": 3, "rejected": "x"}): r"prefs.jsonl:3: 'chosen' must be a string",
             json.dumps({"prompt": [{"role": "robot", "content": "x"}], "chosen": "a", "rejected": "b"}):
                 r"prefs.jsonl:3: prompt\[0\] must be",
             json.dumps({"prompt": "Hi?", "chosen": [{"role": "user", "content": "x"}], "rejected": "b"}):
                 r"prefs.jsonl:3: 'chosen' must start with an assistant turn",
             json.dumps([1, 2]): r"prefs.jsonl:3: a preference row must be a JSON object"}
    for bad, msg in cases.items():
        path.write_text(f"{good}\n\n{bad}\n")
        with pytest.raises(PuyuError, match=msg) as info:
            preference.read_pairs(path)
        assert "\n" not in str(info.value)
    # through the job: the data stage fails with the same line
    with pytest.raises(StageFailed, match=r"prefs.jsonl:3: not JSON") as info:
        path.write_text(f"{good}\n\n{{oops\n")
        run(dpo_job(base, [path]), tmp_path / "run")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("change, message", [
    ({"engine": "deepspeed", "lora.rank": 0}, "finetune: method=dpo with full finetuning (lora.rank=0) runs on "
                                              "engine=fsdp"),
    ({"method": "ppo"}, "finetune: method='ppo'; choose sft or dpo"),
    ({"dpo.loss_type": "kto"}, "dpo.loss_type='kto'; choose sigmoid, hinge, ipo, robust"),
    ({"dpo.beta": 0.0}, "dpo.beta=0.0 must be > 0"),
    ({"dpo.label_smoothing": 0.1}, "dpo.label_smoothing=0.1 applies to loss_type=robust only"),
])
def test_bad_dpo_settings_are_refused_at_submit_naming_the_key(base, tmp_path, change, message):
    cfg = dpo_job(base, [tmp_path / "x.jsonl"])
    for key, value in change.items():
        obj, _, attr = key.rpartition(".")
        setattr(getattr(cfg, obj) if obj else cfg, attr, value)
    with pytest.raises(PuyuError, match=re.escape(message)) as info:
        finetune_stages(cfg)
    assert "\n" not in str(info.value)
