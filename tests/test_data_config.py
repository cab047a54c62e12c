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
])
def test_bad_config_fails_naming_the_key(change, message):
    assert issubclass(ConfigError, PuyuError) and issubclass(ConfigError, ValueError)
    cfg = C.DataJobConfig(inputs=[C.InputSpec(kind="jsonl", path="/data/x.jsonl")])
    change(cfg)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        job.build_data_stages(cfg)
