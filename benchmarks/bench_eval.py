"""MMLU in PPL mode: puyu's evaluator vs lm-evaluation-harness 0.4.13 on the same model and items.

The model is puyu's ``tiny`` flavor trained briefly on Wikipedia leads (``tests/toy_models.py``; a random
model would make every option a near tie and the comparison meaningless), exported with ``export_llama``
and loaded by lm-eval's ``hf`` backend as ``LlamaForCausalLM`` with a ``PreTrainedTokenizerFast`` over the
same ``tokenizer.json``, fp32 on CPU. The items are ``load_dataset("mmlu", limit=N)`` (spread over the 57
subjects), written as a local jsonl task whose yaml renders the prompt of lm-eval's own MMLU template
(0-shot: the tiny model's 512-token context cannot hold MMLU's 5-shot prompts; lm-eval's one-task
few-shot sampler could not keep examples within a subject anyway). puyu runs ``predict`` with
``circular=none`` through the serving runtime with the eval job's default runtime config, a fresh runtime
(empty prefix cache) for each timed run.

Printed: per-item agreement of the predicted letter (goal >= 99%), both accuracies (goal: within 0.5
points), the largest difference of an option's log-likelihood, then the wall time of each side's
evaluation (model loading excluded, everything else included: lm-eval builds its task and dataset, both
tokenize), alternating lm-eval, puyu, lm-eval, puyu... so load changes on a shared machine hit both. The
last line is the ratio of best wall times.

Run: ``.venv/bin/python benchmarks/bench_eval.py [--items 285 --train-steps 300 --threads 1 --repeats 2]``
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # toy_models: the tests' trained tiny model

TASK = "puyu_mmlu_xcheck"
TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
description: "The following are multiple choice questions (with answers) about {{{{subject}}}}.\\n\\n"
doc_to_text: "{{{{question.strip()}}}}\\nA. {{{{choices[0]}}}}\\nB. {{{{choices[1]}}}}\\nC. {{{{choices[2]}}}}\\nD. {{{{choices[3]}}}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def export_hf(model, tokenizer_json: Path, out: Path) -> None:
    """``LlamaForCausalLM`` weights + config, and a fast HF tokenizer over the same tokenizer.json."""
    from puyu.model import export_llama
    from puyu.serving.tokenizer import EOD
    from transformers import PreTrainedTokenizerFast

    export_llama(model, out)
    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json), eos_token=EOD, pad_token=EOD)
    hf_tok.save_pretrained(out)


def write_task(items, folder: Path) -> None:
    data = folder / "mmlu_items.jsonl"
    data.write_text("".join(json.dumps({"id": i.id, "question": i.question, "choices": i.choices, "answer": i.answer,
                                        "subject": i.meta["subject"]}) + "\n" for i in items))
    (folder / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, data=data))


def run_lm_eval(lm, task_dir: Path) -> tuple[float, list[dict], float]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(model=lm, tasks=[TASK], task_manager=TaskManager(include_path=str(task_dir)),
                                  num_fewshot=0, log_samples=True, verbosity="ERROR")
    seconds = time.perf_counter() - t0
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    return seconds, samples, 100.0 * out["results"][TASK]["acc,none"]


def run_puyu(dataset, llm) -> tuple[float, list[dict], dict]:
    """One timed evaluation on ``llm``, which must be fresh: its prefix cache would otherwise still hold
    the contexts of an earlier run (lm-eval keeps nothing between runs)."""
    from puyu.evaluation.config import InferenceConfig
    from puyu.evaluation.inferencers import predict

    t0 = time.perf_counter()
    records = predict(dataset, dataset.items, llm, InferenceConfig(circular="none", num_fewshot=0))
    return time.perf_counter() - t0, records, dict(llm.stats)


def prompt_tokens(dataset, item, llm) -> int:
    """Tokens of the item's prompt with its first option (the rest differ only in the last token)."""
    from puyu.evaluation.inferencers import encode_pair
    from puyu.evaluation.templates import render

    prompt = render(dataset, item, 0)
    ctx, cont = encode_pair(llm.tokenizer.encode, prompt.context, prompt.continuations[0])
    return len(ctx) + len(cont)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=285, help="MMLU items, spread over the subjects (>= 200)")
    ap.add_argument("--train-steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--hf-batch", type=int, default=32, help="lm-eval hf batch size")
    ap.add_argument("--max-batched-tokens", type=int, default=0,
                    help="puyu runtime.max_num_batched_tokens (0: the eval job's default)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from lm_eval.models.huggingface import HFLM
    from puyu.evaluation.config import EvalJobConfig
    from puyu.evaluation.datasets import load_dataset
    from puyu.evaluation.metrics import score
    from puyu.serving import LLM
    from toy_models import make_tokenizer, train_tiny, wiki_texts

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for var in ("HF_HOME", "HF_DATASETS_CACHE"):  # nothing cached outside the temporary directory
            os.environ[var] = str(tmp / var.lower())
        os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        texts = wiki_texts()
        tok = make_tokenizer(texts[:3000], tmp / "tokenizer.json", vocab_size=2000)
        t0 = time.perf_counter()
        model = train_tiny(texts[:3000], tok, steps=args.train_steps)
        print(f"tiny model ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters) trained "
              f"{args.train_steps} steps in {time.perf_counter() - t0:.0f} s; {args.threads} threads, torch {torch.__version__}")
        export_hf(model, tmp / "tokenizer.json", tmp / "hf")
        dataset = load_dataset("mmlu", limit=args.items)
        write_task(dataset.items, tmp)
        subjects = len({i.meta["subject"] for i in dataset.items})
        print(f"{len(dataset.items)} MMLU items from {subjects} subjects, 0-shot, 4 options each")

        lm = HFLM(pretrained=str(tmp / "hf"), dtype="float32", batch_size=args.hf_batch, device="cpu")
        runtime = EvalJobConfig().runtime
        if args.max_batched_tokens:
            runtime.max_num_batched_tokens = args.max_batched_tokens
        ref_runs, puyu_runs = [], []
        for _ in range(args.repeats):  # interleaved, so a change of machine load hits both sides
            ref_runs.append(run_lm_eval(lm, tmp))
            llm = LLM.from_model(model, tok, runtime)  # an empty prefix cache for every run (not timed)
            puyu_runs.append(run_puyu(dataset, llm))
        _, samples, ref_acc = ref_runs[0]
        records = puyu_runs[0][1]

        assert [s["doc"]["id"] for s in samples] == [r["origin_id"] for r in records]
        ref_ll = [[float(resp[0]) for resp in s["filtered_resps"]] for s in samples]
        ref_pred = [max(range(4), key=lambda k: (ll[k], -k)) for ll in ref_ll]
        agree = sum(p == r["pred"] for p, r in zip(ref_pred, records))
        lengths = [prompt_tokens(dataset, item, llm) for item in dataset.items]
        fits = [n_tok <= llm.max_model_len - 1 for n_tok in lengths]  # puyu's runtime keeps room for 1 token
        puyu_stats = puyu_runs[0][2]
        ref_tokens = sum(min(n_tok - 1, llm.max_model_len) for n_tok in lengths)
        diffs = [max(abs(a - b) for a, b in zip(ll, r["logprobs"])) for ll, r in zip(ref_ll, records)]
        metrics = score("mc", records)
        n = len(records)
        print(f"per-item agreement of the predicted letter: {agree}/{n} = {100 * agree / n:.1f}% (goal >= 99%)")
        print(f"accuracy: puyu {metrics['acc']:.2f}, lm-eval {ref_acc:.2f} (difference "
              f"{abs(metrics['acc'] - ref_acc):.2f} points, goal <= 0.5); puyu acc_nll {metrics['acc_nll']:.2f}")
        print(f"largest |option log-likelihood difference|: {max(d for d, f in zip(diffs, fits) if f):.2e} nats on the "
              f"{sum(fits)} items within the model length, {max([d for d, f in zip(diffs, fits) if not f], default=0):.2e} "
              f"on the {n - sum(fits)} longer ones (cut from the left: lm-eval keeps 1 token more context)")
        print(f"tokens through the model: puyu {puyu_stats['computed_tokens']:,} (4 requests per item, scored from the "
              f"continuation on: the options share the context's KV blocks, {puyu_stats['prefix_cache_block_hits']:,} "
              f"prefix-cache block hits), lm-eval {ref_tokens:,} (one forward per item: its one-token "
              f"continuations share the context's logits)")
        print(f"lm-eval simple_evaluate (hf, batch {args.hf_batch}): wall s {[round(r[0], 2) for r in ref_runs]}")
        print(f"puyu predict (serving runtime, max_num_batched_tokens {runtime.max_num_batched_tokens}): wall s {[round(r[0], 2) for r in puyu_runs]}")
        ratio = min(r[0] for r in ref_runs) / min(r[0] for r in puyu_runs)
        print(f"MMLU PPL items/s: {ratio:.2f}x vs lm-eval (goal 1.0x)")


if __name__ == "__main__":
    main()
