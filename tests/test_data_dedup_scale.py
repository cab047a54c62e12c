"""MinHash dedup at scale: buckets over any number of tasks, clusters over arrays, an index of earlier corpora."""
from __future__ import annotations

import json
import random
import tracemalloc

import numpy as np
import pytest

from puyu.data_pipeline import corpora, dedup, layout
from puyu.data_pipeline.config import DedupConfig
from puyu.data_pipeline.document import Document
from puyu.launcher.errors import ConfigError


def _wiki(n: int, skip: int = 0) -> list[str]:
    try:
        articles = json.loads(corpora.wiki_summaries_file().read_text())
    except corpora.CorpusMissing as err:
        pytest.skip(str(err))
    texts = [t for t in (corpora.wiki_extract(a) for a in articles.values()) if len(t.split()) > 80]
    return texts[skip:skip + n]


def _near_copy(text: str, rng: random.Random) -> str:
    """One word dropped inside a text of more than 80 words: Jaccard of 5-word shingles about 0.9."""
    words = text.split()
    del words[rng.randrange(5, len(words) - 5)]
    return " ".join(words)


def _corpus(texts: list[str], seed: int) -> list[str]:
    rng = random.Random(seed)
    docs = list(texts)
    docs += [_near_copy(t, rng) for t in texts[::3]] + texts[::7]  # near and exact copies
    rng.shuffle(docs)
    return docs


def _sign(folder, docs: list[str], files: int, cfg: DedupConfig) -> list[int]:
    for n in range(files):
        dedup.write_signatures(iter(Document(str(i), t) for i, t in enumerate(docs[n::files])), folder, n, cfg)
    return list(range(files))


def _run_buckets(sig_dir, cfg: DedupConfig, world: int) -> np.ndarray:
    sources = dedup.signature_sources(sig_dir, cfg)
    store = dedup.SignatureStore(sources, cfg.num_perm)
    found = []
    for rank in range(world):
        for unit in layout.owned(dedup.bucket_units(cfg, world), rank, world):
            found.append(dedup.unit_pairs(sources, unit, cfg, store)[0])
    return np.unique(np.concatenate(found))


def _removals(out_dir, numbers) -> dict[int, list]:
    return {n: np.load(out_dir / "remove" / f"{n:05d}.npy").tolist() for n in numbers}


def test_buckets_split_over_any_task_count_give_the_one_task_result(tmp_path, monkeypatch):
    cfg = DedupConfig()
    numbers = _sign(tmp_path / "sig", _corpus(_wiki(400), 0), 3, cfg)
    assert len(dedup.band_names(cfg)) == 18  # 17 bands + exact: 23 tasks cut each band into 2 hash ranges
    one = _run_buckets(tmp_path / "sig", cfg, 1)
    assert len(one) > 150
    for world in (4, 23):
        assert np.array_equal(_run_buckets(tmp_path / "sig", cfg, world), one), world
    monkeypatch.setattr(dedup, "CHUNK", 64)  # a unit bigger than CHUNK is cut into narrower hash ranges
    assert np.array_equal(_run_buckets(tmp_path / "sig", cfg, 2), one)
    dedup.save_pairs(tmp_path / "pairs" / "00000.npy", [one])
    stats = dedup.cluster([tmp_path / "pairs" / "00000.npy"], tmp_path / "clusters", numbers)
    assert stats["removed"] >= 0.97 * (len(range(0, 400, 3)) + len(range(0, 400, 7)))


def test_cluster_memory_grows_with_duplicates_not_with_the_key_space(tmp_path):
    """Keys spread over file numbers up to 99999 and indices up to 4e9: nothing may be sized by the corpus."""
    def run(n_pairs: int) -> tuple[int, dict]:
        rng = np.random.default_rng(n_pairs)
        files = rng.integers(0, 100_000, n_pairs, dtype=np.uint64)
        first = files << np.uint64(32) | rng.integers(0, 4_000_000_000, n_pairs, dtype=np.uint64)
        pairs = np.empty(2 * n_pairs, dtype=dedup.PAIR_DTYPE)  # chains of three: a-b, b-c
        pairs["a"], pairs["b"], pairs["exact"] = np.r_[first, first + 1], np.r_[first + 1, first + 2], 0
        path = tmp_path / f"{n_pairs}.npy"
        np.save(path, pairs)
        tracemalloc.start()
        stats = dedup.cluster([path], tmp_path / f"out{n_pairs}", [])
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak, stats

    dedup.cluster([], tmp_path / "warm", [])  # numba load outside the measurement
    small, stats = run(5_000)
    assert (stats["clusters"], stats["removed"], stats["largest_cluster"]) == (5_000, 10_000, 3)
    large, _ = run(20_000)
    print(f"\ncluster peak traced memory: {small / 2**20:.1f} MiB at 10k pairs, {large / 2**20:.1f} MiB at 40k")
    assert large < 20 * 2**20  # ~ hundreds of bytes per pair
    assert 2.5 < large / small < 6  # linear in the pairs


def test_dedup_against_an_existing_index(tmp_path):
    cfg = DedupConfig()
    earlier = _wiki(120)
    _sign(tmp_path / "old" / layout.SIGNATURES, earlier, 2, cfg)
    rng = random.Random(1)
    fresh = _wiki(60, skip=120)
    new_docs = [_near_copy(t, rng) for t in earlier[:30]] + fresh + [_near_copy(fresh[0], rng)]
    indexed = DedupConfig(index=[str(tmp_path / "old")])  # a run directory: its signatures folder is found
    dedup.check_index(indexed)
    numbers = _sign(tmp_path / "new", new_docs, 2, indexed)
    dedup.save_pairs(tmp_path / "pairs.npy", [_run_buckets(tmp_path / "new", indexed, 3)])
    stats = dedup.cluster([tmp_path / "pairs.npy"], tmp_path / "clusters", numbers)
    removed = {i * 2 + n for n, items in _removals(tmp_path / "clusters", numbers).items() for i, _ in items}
    assert removed == set(range(30)) | {90}  # near copies of the index, and the later copy of fresh[0]
    assert stats["removed_by_index"] == 30
    with pytest.raises(ConfigError, match=r"dedup.index\[0\] .* other num_perm \(128 vs 64\)"):
        dedup.check_index(DedupConfig(num_perm=64, index=[str(tmp_path / "old")]))
    with pytest.raises(ConfigError, match=r"dedup.index\[1\] .* holds no params.json"):
        dedup.check_index(DedupConfig(index=[str(tmp_path / "old"), str(tmp_path / "nothing")]))


def test_exact_jaccard_of_stored_shingle_sets(tmp_path):
    from puyu.data_pipeline import lsh, minhash

    cfg = DedupConfig()
    texts = _corpus(_wiki(40), 3) + ["", "床前明月光，疑是地上霜。举头望明月，低头思故乡。", "床前明月光，疑是地上霜。举头望明月。"]
    numbers = _sign(tmp_path, texts, 2, cfg)
    store = dedup.SignatureStore(dedup.signature_sources(tmp_path, cfg), cfg.num_perm)
    rng = np.random.default_rng(0)
    pick = rng.integers(0, len(texts), (300, 2))
    pick[:3] = [[len(texts) - 2, len(texts) - 1], [len(texts) - 3, len(texts) - 3], [0, 0]]
    keys = [np.array([(i % 2) << 32 | (i // 2) for i in col], np.uint64) for col in pick.T]
    got = lsh.set_jaccard(*store.shingle_sets(keys[0]), *store.shingle_sets(keys[1]))
    sets = [{minhash.shingle_hash32(s) for s in minhash.shingles(t, cfg.ngram)} for t in texts]
    want = [len(sets[a] & sets[b]) / max(len(sets[a] | sets[b]), 1) if sets[a] | sets[b] else 1.0 for a, b in pick]
    assert numbers == [0, 1] and np.allclose(got, want)
