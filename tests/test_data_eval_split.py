"""The Wikipedia documents wiki_bpb scores are held out of the data stage: one split, defined in corpora."""
from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError

from puyu.data_pipeline import config as C
from puyu.data_pipeline import corpora, job
from puyu.data_pipeline.readers import InputReader
from puyu.evaluation.datasets import WIKI_HELD_OUT, load_dataset


@pytest.fixture(scope="module")
def articles():
    try:
        return json.loads(corpora.wiki_summaries_file().read_text(encoding="utf-8"))
    except corpora.CorpusMissing as err:
        pytest.skip(str(err))


def _read(spec: C.InputSpec, world_size: int):
    docs, extra = [], {}
    for rank in range(world_size):
        reader = InputReader([spec])
        docs += list(reader.run(rank=rank, world_size=world_size))
        for key, value in reader.stats.extra.items():
            extra[key] = extra.get(key, 0) + value
    return docs, extra


def test_data_stage_reads_none_of_the_wiki_bpb_documents(articles):
    bpb = load_dataset("wiki_bpb")
    assert len(bpb.items) == WIKI_HELD_OUT == corpora.WIKI_EVAL_DOCS
    n = len(corpora.wiki_titles(articles))
    assert [i.id for i in bpb.items] == [f"wiki_bpb/{k}" for k in range(n - WIKI_HELD_OUT, n)]  # ids as before
    eval_titles = corpora.wiki_eval_titles(articles)
    assert eval_titles == sorted(articles)[-WIKI_HELD_OUT:]
    assert [i.question for i in bpb.items] == [articles[t]["extract"] for t in eval_titles]

    docs, extra = _read(C.InputSpec(kind="wiki_summaries"), 3)
    assert len(docs) == len(articles) - WIKI_HELD_OUT and extra == {"wiki_eval_held_out": WIKI_HELD_OUT}
    assert not {d.metadata["title"] for d in docs} & set(eval_titles)
    assert not {d.text for d in docs} & {i.question for i in bpb.items}  # nor the same text under another title


def test_include_eval_tail_reads_every_document(articles):
    docs, extra = _read(C.InputSpec(kind="wiki_summaries", include_eval_tail=True), 2)
    assert sorted(d.metadata["title"] for d in docs) == sorted(articles) and not extra


def test_max_docs_counts_only_the_documents_read(articles):
    keep = len(articles) - WIKI_HELD_OUT - 5
    docs, _ = _read(C.InputSpec(kind="wiki_summaries", max_docs=keep), 2)
    assert len(docs) == keep and not {d.metadata["title"] for d in docs} & set(corpora.wiki_eval_titles(articles))


def test_eval_tail_of_a_small_or_odd_file():
    small = {"b": {"extract": "B"}, "a": {"extract": "A"}, "c": {"extract": ""}, "d": "not an article"}
    assert corpora.wiki_titles(small) == ["a", "b"]
    assert corpora.wiki_eval_titles(small) == ["a", "b"]  # fewer titles than the tail: all of them


def test_the_option_is_checked():
    base = OmegaConf.structured(C.DataJobConfig)
    with pytest.raises(ConfigKeyError, match="include_eval_tails"):
        OmegaConf.merge(base, {"inputs": [{"kind": "wiki_summaries", "include_eval_tails": True}]})
    cfg = C.DataJobConfig(inputs=[C.InputSpec(kind="jsonl", path="/data/x.jsonl", include_eval_tail=True)])
    with pytest.raises(ValueError, match=r"inputs\[0\]\.include_eval_tail is only for wiki_summaries"):
        job.build_data_stages(cfg)


def test_wiki_chat_finetuning_data_leaves_the_wiki_bpb_documents_out(articles, tmp_path):
    """All of the wiki chat data (limit 0): its held-out tail is the last 32 titles; the training
    conversations hold none of the evaluation tail, which wiki_bpb scores."""
    from puyu.data_pipeline.sft import wiki_chat_jsonl

    out = wiki_chat_jsonl(tmp_path, limit=0, heldout=32)
    train = [json.loads(line)["messages"][0]["content"] for line in open(out["train"])]
    held = [json.loads(line)["messages"][0]["content"] for line in open(out["heldout"])]
    scored = {f"Tell me about {t}." for t in corpora.wiki_eval_titles(articles)}
    assert not scored & set(train)
    assert len(held) == 32 and set(held) <= scored
    assert len(train) == out["train_conversations"] > 9000
