"""DataJobConfig goes through OmegaConf/Hydra unchanged, and bad configs fail with one line naming the key."""
from __future__ import annotations

import pickle

import pytest
from omegaconf import OmegaConf

from puyu.data_pipeline import config as C
from puyu.data_pipeline import job, layout
from puyu.launcher.errors import ConfigError, PuyuError


def test_structured_config_round_trip_builds_stages():
    base = OmegaConf.structured(C.DataJobConfig)
    override = OmegaConf.create({"inputs": [{"kind": "wiki_summaries", "max_docs": 10}], "shards": 3,
                                 "dedup": {"threshold": 0.7}, "filters": {"c4": {"enabled": False}}})
    cfg = OmegaConf.merge(base, override)
    stages = job.build_data_stages(cfg)  # a DictConfig is accepted as well as the dataclass
    assert [s.name for s in stages] == [layout.READ_FILTER, layout.SIGNATURES, layout.BUCKETS, layout.CLUSTERS,
                                        layout.DEDUP, layout.TOKENIZER, layout.TOKENIZE, layout.SUMMARY]
    assert [s.shards for s in stages] == [3, 3, 3, 1, 3, 1, 3, 1]
    restored = pickle.loads(pickle.dumps(stages))[0].fn.keywords["cfg"]
    assert isinstance(restored, C.DataJobConfig) and restored.dedup.threshold == 0.7
    assert restored.filters.gopher_repetition.top_n_grams == {"2": 0.2, "3": 0.18, "4": 0.16}


def test_without_dedup_the_chain_skips_the_minhash_stages():
    cfg = C.DataJobConfig(inputs=[C.InputSpec(kind="wiki_summaries")], dedup=C.DedupConfig(exact=False, near=False))
    assert [s.name for s in job.build_data_stages(cfg)] == [layout.READ_FILTER, layout.TOKENIZER, layout.TOKENIZE,
                                                             layout.SUMMARY]


@pytest.mark.parametrize("change,message", [
    (lambda c: c.inputs.clear(), "inputs is empty"),
    (lambda c: setattr(c.inputs[0], "kind", "xml"), "inputs[0].kind 'xml' is not one of"),
    (lambda c: c.inputs.append(C.InputSpec(kind="debian")), "inputs[1].package is empty"),
    (lambda c: setattr(c.inputs[0], "error_rate_limit", 1.5), "inputs[0].error_rate_limit must be in [0, 1]"),
    (lambda c: setattr(c.output, "format", "txt"), "output.format 'txt'"),
    (lambda c: setattr(c.dedup, "threshold", 1.5), "dedup.threshold must be in (0, 1]"),
    (lambda c: (setattr(c.dedup, "bands", 20), setattr(c.dedup, "rows", 10)), "exceeds num_perm"),
    (lambda c: setattr(c.tokenizer, "path", "/nonexistent/tokenizer.json"), "tokenizer.path"),
    (lambda c: setattr(c.stages.minhash_clusters, "tasks", 4), "stages.minhash_clusters.tasks must be 1"),
    (lambda c: setattr(c.stages.minhash_buckets, "cpus", -1), "stages.minhash_buckets.cpus must be >= 0"),
    (lambda c: setattr(c.stages.read_filter, "mem", "lots"), "stages.read_filter.mem 'lots' is not a size"),
    (lambda c: c.dedup.index.append("/nonexistent/run"), "dedup.index[0] '/nonexistent/run' holds no params.json"),
])
def test_bad_config_fails_naming_the_key(change, message):
    assert issubclass(ConfigError, PuyuError) and issubclass(ConfigError, ValueError)
    cfg = C.DataJobConfig(inputs=[C.InputSpec(kind="jsonl", path="/data/x.jsonl")])
    change(cfg)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        job.build_data_stages(cfg)


def test_per_stage_resources_reach_the_submitit_executor(tmp_path):
    from puyu.launcher.config import ClusterConfig, ClusterKind
    from puyu.launcher.executor import make_executor, sbatch_script, stage_cluster

    cfg = OmegaConf.merge(OmegaConf.structured(C.DataJobConfig), OmegaConf.create({
        "inputs": [{"kind": "wiki_summaries"}], "shards": 3,
        "stages": {"minhash_buckets": {"tasks": 28, "cpus": 4, "mem": "16G", "time": 30},
                   "minhash_clusters": {"mem": "64G", "time": 240}}}))
    stages = {s.name: s for s in job.build_data_stages(cfg)}
    assert {n: s.shards for n, s in stages.items()} == {
        layout.READ_FILTER: 3, layout.SIGNATURES: 3, layout.BUCKETS: 28, layout.CLUSTERS: 1, layout.DEDUP: 3,
        layout.TOKENIZER: 1, layout.TOKENIZE: 3, layout.SUMMARY: 1}
    cluster = ClusterConfig(kind=ClusterKind.slurm, cpus_per_task=1, mem="2G", time_min=60)
    buckets = stage_cluster(cluster, stages[layout.BUCKETS].cluster, layout.BUCKETS)
    params = make_executor(buckets, tmp_path, layout.BUCKETS).parameters
    assert (params["cpus_per_task"], params["mem"], params["time"]) == (4, "16G", 30)
    script = sbatch_script(stage_cluster(cluster, stages[layout.CLUSTERS].cluster, layout.CLUSTERS), tmp_path,
                           layout.CLUSTERS, 1)
    assert "--mem=64G" in script and "--time=240" in script and "--cpus-per-task=1" in script
    untouched = stage_cluster(cluster, stages[layout.SIGNATURES].cluster, layout.SIGNATURES)
    assert (untouched.cpus_per_task, untouched.mem, untouched.time_min) == (1, "2G", 60)


def test_a_misspelt_stage_key_fails():
    with pytest.raises(Exception, match="tasks_count"):
        OmegaConf.merge(OmegaConf.structured(C.DataJobConfig),
                        OmegaConf.create({"stages": {"minhash_buckets": {"tasks_count": 4}}}))
