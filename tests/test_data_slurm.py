"""The data job through the launcher on the real Slurm cluster: 4-way arrays over a real corpus."""
from __future__ import annotations

import json


def test_data_job_runs_as_arrays_on_slurm_and_megatron_reads_the_corpus(slurm_corpus):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    run_dir, out = slurm_corpus
    manifest = json.loads((run_dir / "launch.json").read_text())["submissions"]
    arrays = [s for s in manifest if s["shards"] == 4]
    assert len(arrays) >= 4 and all(s["cluster"] == "slurm" for s in manifest)
    assert all(len({j.split("_")[0] for j in s["job_ids"]}) == 1 and len(s["job_ids"]) == 4 for s in arrays)
    summary = json.loads((run_dir / "summary" / "summary.json").read_text())
    dataset = IndexedDataset(str(run_dir / "summary" / "corpus"))
    assert len(dataset) == summary["docs_out"] > 500
    assert int(dataset.sequence_lengths.sum()) == summary["tokens"]["tokens"]
    assert f"report: {run_dir / 'summary' / 'summary.md'}" in out.stdout
