"""The data job through the launcher on the real Slurm cluster: 4-way arrays over a real corpus."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from puyu.data_pipeline import corpora

pytestmark = pytest.mark.usefixtures("slurm_cluster")


def test_data_job_runs_as_arrays_on_slurm_and_megatron_reads_the_corpus(tmp_path):
    try:
        corpora.wiki_summaries_file()
        corpora.debian_root("python3.11-doc")
    except corpora.CorpusMissing as err:
        pytest.fail(f"real corpus missing ({err}); `make data` fetches it")
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    run_dir = tmp_path / "corpus"
    out = subprocess.run([sys.executable, "-m", "puyu.launcher", "job=data", "cluster=slurm", "job.data.shards=4",
                          "job.data.inputs.0.max_docs=3000", "job.data.inputs.1.max_docs=200",
                          "job.data.tokenizer.vocab_size=2000", f"run={run_dir}"],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    manifest = json.loads((run_dir / "launch.json").read_text())["submissions"]
    arrays = [s for s in manifest if s["shards"] == 4]
    assert len(arrays) >= 4 and all(s["cluster"] == "slurm" for s in manifest)
    assert all(len({j.split("_")[0] for j in s["job_ids"]}) == 1 and len(s["job_ids"]) == 4 for s in arrays)
    summary = json.loads((run_dir / "summary" / "summary.json").read_text())
    dataset = IndexedDataset(str(run_dir / "summary" / "corpus"))
    assert len(dataset) == summary["docs_out"] > 500
    assert int(dataset.sequence_lengths.sum()) == summary["tokens"]["tokens"]
    assert f"report: {run_dir / 'summary' / 'summary.md'}" in out.stdout
