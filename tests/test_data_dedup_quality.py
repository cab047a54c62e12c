"""Near-dedup quality on a multilingual set: one manual in many languages, Chinese in both scripts.

The Linux kernel documentation (deb linux-doc-6.1) ships its English pages and their Italian, Japanese,
Korean, Simplified and Traditional Chinese translations; each Simplified page is also converted to
Traditional script with OpenCC (``s2twp``). Translations of a page share its code blocks, names and
numbers, and the two Chinese scripts share most characters, so they are hard negatives; near copies are
made as datatrove's tests make them, from real pages: every other page again with 1-6 of its lines
deleted, which spreads their Jaccard over both sides of the threshold. Truth is exact Jaccard over the
same shingles, all pairs.
"""
from __future__ import annotations

import collections
import itertools
import json
import random

import numpy as np
import pytest
from scipy import sparse

from jobs_for_tests import run_inline
from puyu.data_pipeline import config as C
from puyu.data_pipeline import corpora, job, layout, lsh, minhash
from puyu.data_pipeline.writers import read_docs

LANGS = ("it_IT", "ja_JP", "ko_KR", "zh_CN", "zh_TW")


def _pages() -> list[tuple[str, str]]:
    """(language, text) of every translated page, its English original, and the zh_CN pages in Traditional."""
    try:
        root = corpora.debian_root("linux-doc-6.1") / "usr/share/doc/linux-doc-6.1/html/_sources"
    except corpora.CorpusMissing as err:
        pytest.skip(str(err))
    opencc = pytest.importorskip("opencc")
    to_traditional = opencc.OpenCC("s2twp")
    pages, originals = [], set()
    for lang in LANGS:
        for path in sorted((root / "translations" / lang).rglob("*.txt")):
            text = path.read_text(errors="replace")
            pages.append((lang, text))
            if lang == "zh_CN":
                pages.append(("zh_CN>TW", to_traditional.convert(text)))
            original = root / path.relative_to(root / "translations" / lang)
            if original.is_file() and original not in originals:
                originals.add(original)
                pages.append(("en", original.read_text(errors="replace")))
    return pages


def _near_copies(pages: list[tuple[str, str]]) -> list[tuple[str, str]]:
    rng = random.Random(0)
    copies = []
    for lang, text in pages[::2]:
        lines = text.splitlines()
        for _ in range(min(rng.randint(1, 6), len(lines) // 4)):
            del lines[rng.randrange(len(lines))]
        copies.append((lang, "\n".join(lines)))
    return copies


def _true_pairs(texts: list[str], ngram: int, threshold: float) -> tuple[set, np.ndarray]:
    shingle_sets = [set(minhash.shingles(text, ngram)) for text in texts]
    vocab: dict[bytes, int] = {}
    rows, cols = zip(*[(j, vocab.setdefault(s, len(vocab))) for j, sh in enumerate(shingle_sets) for s in sh])
    incidence = sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(texts), len(vocab)))
    shared = (incidence @ incidence.T).tocoo()
    sizes = np.array([len(s) for s in shingle_sets])
    jaccard = shared.data / (sizes[shared.row] + sizes[shared.col] - shared.data)
    keep = (shared.row < shared.col) & (jaccard >= threshold)
    return set(zip(shared.row[keep].tolist(), shared.col[keep].tolist())), sizes


@pytest.mark.slow  # 25 s to 2 min on 2 cores: exact Jaccard over all pairs of 1,220 pages (1.9M shingles)
def test_near_dedup_quality_on_a_multilingual_manual(tmp_path):
    pages = _pages()
    docs = pages + _near_copies(pages)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": str(i), "text": text, "lang": lang}) + "\n"
                           for i, (lang, text) in enumerate(docs)))
    filters = C.FilterConfig(chain=["normalize"], write_exclusions=False)
    cfg = C.DataJobConfig(inputs=[C.InputSpec(kind="jsonl", path=str(src))], filters=filters, shards=2)
    stages = [s for s in job.build_data_stages(cfg)
              if s.name in (layout.READ_FILTER, layout.SIGNATURES, layout.BUCKETS, layout.CLUSTERS)]
    run_inline(stages, tmp_path / "run")

    run = tmp_path / "run"
    kept = [((n << 32) | i, d) for n, p in layout.numbered_files(run / layout.READ_FILTER / "out", ".jsonl.zst")
            for i, d in enumerate(read_docs(p))]
    assert len(kept) == len(docs)  # nothing filtered: every page is judged
    truth, _ = _true_pairs([d.text for _, d in kept], cfg.dedup.ngram, cfg.dedup.threshold)

    pairs = np.concatenate([np.load(p) for _, p in layout.numbered_files(run / layout.BUCKETS / "pairs", ".npy")])
    keys, left, right = lsh.dense_ids(pairs["a"], pairs["b"])
    root_of = dict(zip(keys.tolist(), keys[lsh.union_roots(len(keys), left, right)].tolist()))
    position = {key: j for j, (key, _) in enumerate(kept)}
    clusters = collections.defaultdict(list)
    for key, _ in kept:
        clusters[root_of.get(key, key)].append(position[key])
    predicted = {pair for members in clusters.values() for pair in itertools.combinations(sorted(members), 2)}
    hits = predicted & truth
    precision, recall = len(hits) / max(len(predicted), 1), len(hits) / max(len(truth), 1)
    print(f"\nmultilingual near-dedup @{cfg.dedup.threshold}: {len(kept)} docs, {len(truth)} true pairs, "
          f"{len(predicted)} predicted, precision {precision:.4f}, recall {recall:.4f}")
    by_lang = collections.Counter(kept[a][1].metadata["lang"] for a, _ in truth)
    wrong = collections.Counter(kept[a][1].metadata["lang"] for a, _ in predicted - truth)
    missed = collections.Counter(kept[a][1].metadata["lang"] for a, _ in truth - predicted)
    print(f"true pairs by language {dict(by_lang)}; wrong {dict(wrong)}; missed {dict(missed)}")
    assert len(truth) > 200 and {"zh_CN", "zh_TW", "it_IT", "en"} <= set(by_lang)
    assert precision >= 0.99 and recall >= 0.96

    removed = {(n << 32) | int(i) for n, _ in layout.numbered_files(run / layout.READ_FILTER / "out", ".jsonl.zst")
               for i, _ in np.load(run / layout.CLUSTERS / "remove" / f"{n:05d}.npy").tolist()}
    for members in clusters.values():  # every cluster keeps exactly one document
        assert sum(kept[m][0] not in removed for m in members) == 1
