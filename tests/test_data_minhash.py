"""MinHash: signatures equal datasketch's, LSH parameters equal datasketch's, dedup quality on real data."""
from __future__ import annotations

import collections
import itertools
import json

import numpy as np
import pytest
from datasketch import MinHash
from datasketch.lsh import _optimal_param
from scipy import sparse

from jobs_for_tests import run_inline
from puyu.data_pipeline import config as C
from puyu.data_pipeline import corpora, job, layout, lsh, minhash
from puyu.data_pipeline.writers import read_docs


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

    docs = [((n << 32) | i, d.text) for n, p in layout.numbered_files(tmp_path / layout.READ_FILTER / "out", ".jsonl.zst")
            for i, d in enumerate(read_docs(p))]
    shingle_sets = [set(minhash.shingles(text, cfg.dedup.ngram)) for _, text in docs]
    vocab: dict[bytes, int] = {}
    rows, cols = zip(*[(j, vocab.setdefault(s, len(vocab))) for j, sh in enumerate(shingle_sets) for s in sh])
    incidence = sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(docs), len(vocab)))
    shared = (incidence @ incidence.T).tocoo()
    sizes = np.array([len(s) for s in shingle_sets])
    truth = {(a, b) for a, b, v in zip(shared.row, shared.col, shared.data)
             if a < b and v / (sizes[a] + sizes[b] - v) >= cfg.dedup.threshold}

    pairs = np.concatenate([np.load(p) for _, p in layout.numbered_files(tmp_path / layout.BUCKETS / "pairs", ".npy")])
    keys, left, right = lsh.dense_ids(pairs["a"], pairs["b"])
    root_of = dict(zip(keys.tolist(), keys[lsh.union_roots(len(keys), left, right)].tolist()))
    position = {key: j for j, (key, _) in enumerate(docs)}
    clusters = collections.defaultdict(list)
    for key, _ in docs:
        clusters[root_of.get(key, key)].append(position[key])
    predicted = {pair for members in clusters.values() for pair in itertools.combinations(sorted(members), 2)}
    hits = len(predicted & truth)
    precision, recall = hits / max(len(predicted), 1), hits / max(len(truth), 1)
    print(f"\ncopyright near-dedup @0.8: {len(docs)} docs, {len(truth)} true pairs, {len(predicted)} predicted, "
          f"precision {precision:.3f}, recall {recall:.3f}")
    assert len(truth) > 100  # the corpus really has near duplicates
    assert precision >= 0.99 and recall >= 0.96
