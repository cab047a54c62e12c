"""Readers and writers: balanced byte-range sharding, faults reported with file:line, determinism, atomicity."""
from __future__ import annotations

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from puyu.data_pipeline import config as C
from puyu.data_pipeline import corpora
from puyu.data_pipeline.document import Document, run_steps
from puyu.data_pipeline.readers import InputReader, plan_shards
from puyu.data_pipeline.writers import DocWriter, read_docs


def _lines(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [json.dumps({"id": f"d{i}", "text": f"doc {i} " + "x" * rng.randint(0, 400)}) for i in range(n)]


def _read_all(specs, world_size):
    per_rank = []
    for rank in range(world_size):
        reader = InputReader(specs)
        per_rank.append([d.id for d in reader.run((), rank, world_size)])
    return per_rank


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 7])
def test_jsonl_byte_ranges_cover_every_record_once(tmp_path, world_size):
    (tmp_path / "a.jsonl").write_text("\n".join(_lines(500)) + "\n")
    (tmp_path / "b.jsonl").write_text("\n".join(_lines(300, seed=1)))  # no final newline
    specs = [C.InputSpec(kind="jsonl", path=str(tmp_path))]
    per_rank = _read_all(specs, world_size)
    flat = [i for ids in per_rank for i in ids]
    assert flat == [f"d{i}" for i in range(500)] + [f"d{i}" for i in range(300)]
    sizes = [sum(u.end - u.start for u in shard) for shard in plan_shards(specs, world_size)]
    assert max(sizes) - min(sizes) <= 1


def test_text_folder_shards_are_balanced():
    try:
        spec = C.InputSpec(kind="debian", package=corpora.PYTHON_DOC_PACKAGE, glob=corpora.PYTHON_DOC_GLOB)
        shards = plan_shards([spec], 4)
    except corpora.CorpusMissing as err:
        pytest.skip(str(err))
    sizes = [sum(u.size for u in shard) for shard in shards]
    assert sum(len(s) for s in shards) > 400
    assert max(sizes) < 1.25 * sum(sizes) / 4, sizes


def test_wiki_articles_split_across_ranks():
    try:
        per_rank = _read_all([C.InputSpec(kind="wiki_summaries")], 4)
    except corpora.CorpusMissing as err:
        pytest.skip(str(err))
    flat = [i for ids in per_rank for i in ids]
    assert len(flat) == len(set(flat)) > 10_000 - 100
    assert min(len(ids) for ids in per_rank) > len(flat) // 4 - 50


@pytest.mark.parametrize("world_size", [1, 3])
def test_fortune_items_split_by_byte_range(tmp_path, monkeypatch, world_size):
    root = tmp_path / "debs" / "fortunes-x"
    games = root / "usr/share/games/fortunes"
    games.mkdir(parents=True)
    (root / ".unpacked").touch()
    items = [f"\x1b[32m《诗 {i}》\x1b[m\n床前明月光，疑是地上霜。{'举头望明月。' * (i % 5)}" for i in range(40)]
    (games / "poems").write_text("\n%\n".join(items) + "\n")
    (games / "poems.dat").write_bytes(b"\x00\x01binary")
    monkeypatch.setenv("PUYU_DATA_DIR", str(tmp_path))
    per_rank = _read_all([C.InputSpec(kind="fortunes", package="fortunes-x")], world_size)
    assert [i for ids in per_rank for i in ids] == [f"fortunes-x/poems:{n}" for n in range(1, 41)]
    first = next(InputReader([C.InputSpec(kind="fortunes", package="fortunes-x")]).run())
    assert first.text == "《诗 0》\n床前明月光，疑是地上霜。" and first.metadata["line"] == 1


def test_corrupt_inputs_are_reported_and_good_docs_flow(tmp_path):
    good = [json.dumps({"id": f"g{i}", "text": f"good {i}"}).encode() for i in range(6)]
    bad_lines = [good[0], b'{"id": "x", "text": "unterminated', good[1], b'{"id": "y", "text": "caf\xe9 latin-1"}',
                 good[2], b'{"id": "z", "body": "no text field"}', good[3]]
    (tmp_path / "bad.jsonl").write_bytes(b"\n".join(bad_lines) + b"\n")
    payload = b"\n".join(_l.encode() for _l in _lines(2000)) + b"\n"
    compressed = zstandard.ZstdCompressor().compress(payload)
    (tmp_path / "cut.jsonl.zst").write_bytes(compressed[: len(compressed) // 2])
    pq.write_table(pa.table({"body": ["no text column"]}), tmp_path / "nocol.parquet")
    pq.write_table(pa.table({"text": ["parquet ok", None], "id": ["p1", "p2"]}), tmp_path / "ok.parquet")

    lenient = {"error_rate_limit": 1.0}  # these files are mostly bad on purpose: count, do not fail
    reader = InputReader([C.InputSpec(kind="jsonl", path=str(tmp_path / "bad.jsonl"), **lenient),
                          C.InputSpec(kind="jsonl", path=str(tmp_path / "cut.jsonl.zst"), **lenient),
                          C.InputSpec(kind="parquet", path=str(tmp_path), **lenient)])
    docs = list(reader.run())
    ids = [d.id for d in docs]
    assert ids[:4] == ["g0", "g1", "g2", "g3"] and "p1" in ids
    assert 0 < sum(i.startswith("d") for i in ids) < 2000  # the readable start of the cut .zst flows
    messages = reader.stats.error_messages
    bad = str(tmp_path / "bad.jsonl")
    assert any(m.startswith(f"{bad}:2: invalid JSON") for m in messages), messages
    assert any(m.startswith(f"{bad}:4: invalid UTF-8") for m in messages), messages
    assert any(m.startswith(f"{bad}:6: missing field 'text'") for m in messages), messages
    assert any("cut.jsonl.zst:" in m and "truncated" in m for m in messages), messages
    assert any("nocol.parquet: missing column 'text'" in m for m in messages), messages
    assert any("ok.parquet: row 2: missing field 'text'" in m for m in messages), messages
    assert reader.stats.errors == 6


@pytest.mark.parametrize("fmt", ["jsonl.zst", "jsonl", "parquet"])
def test_writers_are_deterministic_and_round_trip(tmp_path, fmt):
    docs = [Document(f"id{i}", f"文本 {i} text\n" * (i % 7), {"lang": "en", "n": i}) for i in range(3000)]
    for name in ("a", "b"):
        writer = DocWriter(tmp_path / f"{name}.{fmt}", row_group=1000)
        assert len(list(writer.run(iter(docs)))) == len(docs)
    assert (tmp_path / f"a.{fmt}").read_bytes() == (tmp_path / f"b.{fmt}").read_bytes()
    back = list(read_docs(tmp_path / f"a.{fmt}"))
    assert [(d.id, d.text, d.metadata) for d in back] == [(d.id, d.text, d.metadata) for d in docs]


def test_interrupted_writer_leaves_nothing(tmp_path):
    def docs():
        yield Document("a", "one")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        run_steps([_Source(docs()), DocWriter(tmp_path / "out.jsonl.zst")])
    assert list(tmp_path.iterdir()) == []


class _Source(InputReader):
    def __init__(self, docs):
        super().__init__([])
        self.docs = docs

    def run(self, docs=(), rank=0, world_size=1):
        yield from self.docs
