"""MinHash: signatures equal datasketch's, LSH parameters equal datasketch's, dedup quality on real data."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from datasketch import MinHash
from datasketch.lsh import _optimal_param

from dedup_truth import filtered_docs, precision_recall, predicted_clusters, true_pairs
from jobs_for_tests import run_inline
from puyu.data_pipeline import config as C
from puyu.data_pipeline import corpora, job, layout, lsh, minhash


ZH = ["我们的数据处理流程会读取文本，过滤低质量内容，然后去除重复的文档。",
      "床前明月光，疑是地上霜。举头望明月，低头思故乡。", "中文 and English 混合 text 测试 一下",
      "ÀÉÎ ΟΔΥΣΣΕΥΣ İstanbul \u212a Ǆemal ＡＢＣ Straße 𐐀𐐨 \U0001e900 end"]  # case mapping edge cases


def _wiki_texts(n: int) -> list[str]:
    try:
        path = corpora.wiki_summaries_file()
    except corpora.CorpusMissing as err:
        pytest.skip(str(err))
    articles = json.loads(path.read_text())
    return [a["extract"] for a in itertools.islice(articles.values(), n)]


def _datasketch(text: str, num_perm: int, seed: int, ngram: int) -> np.ndarray:
    m = MinHash(num_perm=num_perm, seed=seed, hashfunc=minhash.shingle_hash32)
    m.update_batch(minhash.shingles(text, ngram))
    return m.hashvalues


@pytest.mark.parametrize("num_perm,seed,ngram", [(128, 1, 5), (64, 7, 3)])
def test_signatures_equal_datasketch(num_perm, seed, ngram):
    texts = _wiki_texts(300) + ZH + ["", "one", "Two words.", "tab\tand\nnewline  spaces"]
    sigs = minhash.signatures(texts, num_perm, seed, ngram)
    mismatched = [i for i, t in enumerate(texts) if not np.array_equal(sigs[i], _datasketch(t, num_perm, seed, ngram))]
    assert mismatched == []
    assert sigs.dtype == np.uint32 and sigs.shape == (len(texts), num_perm)


def test_han_characters_are_words():
    assert minhash.shingles("床前明月光", 2) == [w.encode() for w in ["床 前", "前 明", "明 月", "月 光"]]
    assert minhash.shingles("Hello, World!", 5) == [b"hello world"]


@pytest.mark.parametrize("threshold,num_perm", [(0.8, 128), (0.5, 64), (0.9, 256)])
def test_bands_rows_equal_datasketch(threshold, num_perm):
    assert minhash.optimal_bands(threshold, num_perm) == _optimal_param(threshold, num_perm, 0.5, 0.5)


def test_union_find_root_is_smallest_key_or_an_index_document():
    a, b = np.array([9, 7, 3, 8, 20, 21], np.uint64), np.array([5, 9, 8, 7, 22, 22], np.uint64)
    keys, left, right = lsh.dense_ids(a, b)
    assert keys[lsh.union_roots(len(keys), left, right)].tolist() == [3, 3, 3, 3, 3, 20, 20, 20]
    indexed = int(lsh.INDEX_BIT) | 40  # an earlier corpus's document wins over any key of this one
    keys, left, right = lsh.dense_ids(np.array([3, indexed], np.uint64), np.array([5, 5], np.uint64))
    assert set(keys[lsh.union_roots(len(keys), left, right)].tolist()) == {indexed}


def test_near_dedup_quality_on_debian_copyright(tmp_path):
    """Precision/recall of 'same cluster' against exact Jaccard >= 0.8 over the same 5-word shingles."""
    try:
        corpora.debian_copyright_files()
    except corpora.CorpusMissing as err:
        pytest.skip(str(err))
    filters = C.FilterConfig(length=C.LengthConfig(min_chars=1), write_exclusions=False)
    for name in ("language", "gopher_quality", "gopher_repetition", "c4", "fineweb"):
        getattr(filters, name).enabled = False
    cfg = C.DataJobConfig(inputs=[C.InputSpec(kind="text", path="/usr/share/doc", glob="*/copyright")],
                          filters=filters)
    stages = [s for s in job.build_data_stages(cfg)
              if s.name in (layout.READ_FILTER, layout.SIGNATURES, layout.BUCKETS, layout.CLUSTERS)]
    run_inline(stages, tmp_path)

    docs = filtered_docs(tmp_path)
    truth = true_pairs([d.text for _, d in docs], cfg.dedup.ngram, cfg.dedup.threshold)
    precision, recall, predicted = precision_recall(predicted_clusters(tmp_path, [k for k, _ in docs]), truth)
    print(f"\ncopyright near-dedup @0.8: {len(docs)} docs, {len(truth)} true pairs, {len(predicted)} predicted, "
          f"precision {precision:.3f}, recall {recall:.3f}")
    assert len(truth) > 100  # the corpus really has near duplicates
    assert precision >= 0.99 and recall >= 0.96
