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
import json
import random

import numpy as np
import pytest

from dedup_truth import filtered_docs, precision_recall, predicted_clusters, true_pairs
from jobs_for_tests import run_inline
from puyu.data_pipeline import config as C
from puyu.data_pipeline import corpora, job, layout

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
    kept = filtered_docs(run)
    assert len(kept) == len(docs)  # nothing filtered: every page is judged
    truth = true_pairs([d.text for _, d in kept], cfg.dedup.ngram, cfg.dedup.threshold)
    clusters = predicted_clusters(run, [k for k, _ in kept])
    precision, recall, predicted = precision_recall(clusters, truth)
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
    for members in clusters:  # every cluster keeps exactly one document
        assert sum(kept[m][0] not in removed for m in members) == 1
