"""The data job through the launcher on the real Slurm cluster: 4-way stages over a real corpus, each
submitted as two arrays because the test cluster's MaxArraySize is 3."""
from __future__ import annotations

import json

from puyu.data_pipeline.writers import read_docs


def test_data_job_runs_as_arrays_on_slurm_and_megatron_reads_the_corpus(slurm_corpus):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    run_dir, out = slurm_corpus
    manifest = json.loads((run_dir / "launch.json").read_text())["submissions"]
    arrays = [s for s in manifest if s["shards"] == 4]
    assert len(arrays) >= 4 and all(s["cluster"] == "slurm" for s in manifest)
    # MaxArraySize=3 (tests/cluster/start_cluster.sh): 4 tasks go as an array of 3 and one of 1, and the
    # next stage waits for both
    for s in arrays:
        roots = [j.split("_")[0] for j in s["job_ids"]]
        assert len(roots) == 4 and len(set(roots)) == 2 and roots.count(roots[0]) == 3, s["job_ids"]
    summary = json.loads((run_dir / "summary" / "summary.json").read_text())
    dataset = IndexedDataset(str(run_dir / "summary" / "corpus"))
    assert len(dataset) == summary["docs_out"] > 500
    assert int(dataset.sequence_lengths.sum()) == summary["tokens"]["tokens"]
    assert f"report: {run_dir / 'summary' / 'summary.md'}" in out.stdout
    # the copyright files' real duplicates were found across the 4-way arrays and removed
    clusters = summary["dedup_clusters"]
    assert clusters["removed_exact"] > 10 and clusters["removed_exact"] + clusters["removed_near"] < 600, clusters
    kept = [d.text for f in sorted((run_dir / "minhash_filter" / "out").glob("[0-9]*")) for d in read_docs(f)
            if "copyright" in d.id]
    assert len(kept) == len(set(kept)) > 10, "an exact copy of a licence text survived, or too few were kept"
