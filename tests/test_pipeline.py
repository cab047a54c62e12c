"""The main job end to end on a small real corpus (the local executor, real subprocesses)."""
from __future__ import annotations

import json
import re
import subprocess
import sys


def test_pipeline_runs_the_whole_chain_and_a_rerun_resumes(tmp_path):
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "puyu.launcher", "job=pipeline", "cluster=local", f"run={run_dir}",
            "job.data.inputs.0.max_docs=1500", "job.data.inputs.1.max_docs=100", "job.data.tokenizer.vocab_size=2000",
            "job.pretrain.model.vocab_size=2000", "job.pretrain.train.steps=6", "job.pretrain.train.checkpoint_every=3",
            "job.finetune.data.wiki=200", "job.finetune.train.steps=4", "job.finetune.train.checkpoint_every=2",
            "job.engine.vocab_size=2000", "job.engine.build.eval_docs=4", "job.engine.build.calib_docs=4",
            "job.prompts=16", "job.infer.sampling.max_tokens=8", "job.eval.limits.mmlu=8", "job.eval.limits.gsm8k=2",
            "job.eval.limits.humaneval=2", "job.eval.limits.wiki_bpb=4", "job.eval.infer.max_tokens=16",
            "job.agent_tasks=4", "job.agent.sampling.max_tokens=16"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"report: {run_dir / 'report.md'}" in out.stdout
    report = (run_dir / "report.md").read_text()
    for section in ("## Corpus (data stage)", "## Pretraining", "## Finetuning", "## Serving", "### Batch inference: 16 prompts",
                    "## Evaluation", "| mmlu | acc_circular | ppl |", "| humaneval | pass@1 | gen |",
                    "| wiki_bpb | bits_per_byte | ppl |", "## Agents"):
        assert section in report, section
    page = (run_dir / "report.html").read_text()  # the same report as one page, with both loss curves
    assert page.count("<svg") == 2 and "<h2>Evaluation</h2>" in page and "<table>" in page
    # the Debian copyright files hold real copies: the demo's dedup removes some (it removed none before)
    removed = re.search(r"(\d+) exact and (\d+) near duplicates removed", report)
    assert removed and int(removed[1]) + int(removed[2]) > 0, report[:2000]
    outputs = [json.loads(ln) for ln in (run_dir / "infer" / "outputs.jsonl").read_text().splitlines()]
    assert [o["index"] for o in outputs] == list(range(16)) and all("error" not in o for o in outputs)

    again = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "submitted" not in again.stdout + again.stderr, "a rerun of a finished run submitted work again"
