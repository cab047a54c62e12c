"""Corpus inputs as crawls come: compressed by extension, and a mostly-bad or unparsable file fails in one line."""
from __future__ import annotations

import bz2
import gzip
import json
import lzma
import re

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from puyu.data_pipeline import config as C
from puyu.data_pipeline import corpora
from puyu.data_pipeline.readers import InputReader
from puyu.launcher.cli import preflight
from puyu.launcher.config import register_configs
from puyu.launcher.errors import ConfigError, PuyuError

CODECS = {
    "gz": gzip.compress,
    "bz2": bz2.compress,
    "xz": lzma.compress,
    # two frames: a concatenated .zst must be read to its end, not to the end of the first frame
    "zst": lambda data: b"".join(zstandard.ZstdCompressor().compress(half)
                                 for half in (data[: len(data) // 2], data[len(data) // 2:])),
}


@pytest.fixture(scope="module")
def wiki_lines() -> list[bytes]:
    """1000 real Wikipedia leads as JSONL records."""
    try:
        articles = json.loads(corpora.wiki_summaries_file().read_text(encoding="utf-8"))
    except corpora.CorpusMissing as err:
        pytest.skip(str(err))
    titles = corpora.wiki_titles(articles)[:1000]
    return [json.dumps({"id": t, "text": corpora.wiki_extract(articles[t])}).encode() + b"\n" for t in titles]


def _docs(spec: C.InputSpec, world_size: int = 1) -> list[tuple]:
    reader = InputReader([spec])
    return [(d.id, d.text, d.metadata.get("line")) for r in range(world_size) for d in reader.run((), r, world_size)]


@pytest.mark.parametrize("codec", ["gz", "bz2", "xz"])  # .jsonl.zst had its own reader already (test_data_io)
def test_compressed_jsonl_gives_the_plain_documents(tmp_path, wiki_lines, codec):
    payload = b"".join(wiki_lines)
    (tmp_path / "wiki.jsonl").write_bytes(payload)
    (tmp_path / f"wiki.jsonl.{codec}").write_bytes(CODECS[codec](payload))
    plain = _docs(C.InputSpec(kind="jsonl", path=str(tmp_path / "wiki.jsonl")))
    assert len(plain) == len(wiki_lines)
    packed = C.InputSpec(kind="jsonl", path=str(tmp_path / f"wiki.jsonl.{codec}"))
    assert _docs(packed) == plain
    assert _docs(packed, world_size=3) == plain  # a compressed file is one unit, read whole by one rank


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_compressed_text_and_fortune_files_give_the_plain_documents(tmp_path, monkeypatch, wiki_lines, codec):
    texts = [json.loads(line)["text"] for line in wiki_lines[:30]]
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / f"a.txt.{codec}").write_bytes(CODECS[codec](texts[0].encode()))
    got = _docs(C.InputSpec(kind="text", path=str(tmp_path / "txt"), glob="*.txt*"))
    assert [text for _, text, _ in got] == [texts[0]]

    games = tmp_path / "debs" / "fortunes-w" / "usr/share/games/fortunes"
    games.mkdir(parents=True)
    (tmp_path / "debs" / "fortunes-w" / ".unpacked").touch()
    (games / f"wiki.{codec}").write_bytes(CODECS[codec](("\n%\n".join(texts) + "\n").encode()))
    monkeypatch.setenv("PUYU_DATA_DIR", str(tmp_path))
    got = _docs(C.InputSpec(kind="fortunes", package="fortunes-w"), world_size=2)
    assert [text for _, text, _ in got] == [t.strip() for t in texts]


def test_a_corrupt_gz_is_named_with_its_error(tmp_path, wiki_lines):
    payload = gzip.compress(b"".join(wiki_lines))
    (tmp_path / "broken.jsonl.gz").write_bytes(payload[:10] + b"\x00" * 64 + payload[74:])
    broken = str(tmp_path / "broken.jsonl.gz")
    with pytest.raises(ConfigError, match=f"^{re.escape(broken)}:1: corrupt or truncated gzip stream .*" + re.escape(
            "; rest of file skipped (first of 1 bad records out of 1: 100.0% > error_rate_limit 0.01)") + "$"):
        _docs(C.InputSpec(kind="jsonl", path=broken))

    (tmp_path / "cut.jsonl.gz").write_bytes(payload[: len(payload) // 2])
    reader = InputReader([C.InputSpec(kind="jsonl", path=str(tmp_path / "cut.jsonl.gz"))])
    docs = list(reader.run())
    assert 0 < len(docs) < len(wiki_lines)  # the readable start flows; the cut is one bad record
    assert reader.stats.errors == 1
    assert reader.stats.error_messages[0].startswith(f"{tmp_path / 'cut.jsonl.gz'}:{len(docs) + 1}: corrupt or "
                                                     f"truncated gzip stream")


def _with_bad_lines(lines: list[bytes], every: int) -> bytes:
    """Every ``every``-th record cut in half (unterminated JSON), as a broken crawl has them."""
    return b"".join(line[: len(line) // 2] + b"\n" if i % every == every - 1 else line for i, line in enumerate(lines))


def test_a_file_with_too_many_bad_records_fails_naming_the_first(tmp_path, wiki_lines):
    (tmp_path / "few.jsonl").write_bytes(_with_bad_lines(wiki_lines, 200))  # 5 of 1000: 0.5%
    (tmp_path / "many.jsonl").write_bytes(_with_bad_lines(wiki_lines, 50))  # 20 of 1000: 2%
    reader = InputReader([C.InputSpec(kind="jsonl", path=str(tmp_path / "few.jsonl"))])
    assert len(list(reader.run())) == 995 and reader.stats.errors == 5

    many = str(tmp_path / "many.jsonl")
    with pytest.raises(ConfigError, match=f"^{re.escape(many)}:50: invalid JSON .*" + re.escape(
            " (first of 20 bad records out of 1000: 2.0% > error_rate_limit 0.01)") + "$"):
        _docs(C.InputSpec(kind="jsonl", path=many))
    assert len(_docs(C.InputSpec(kind="jsonl", path=many, error_rate_limit=0.03))) == 980


def test_error_rate_limit_is_a_config_key_and_a_misspelt_one_is_named():
    register_configs()
    cfg = preflight(["job=data", "job.data.inputs=[{kind: jsonl, path: /x, error_rate_limit: 0.2}]"])
    assert cfg.job.data.inputs[0].error_rate_limit == 0.2
    with pytest.raises(PuyuError, match="error_rate_limt") as info:
        preflight(["job=data", "job.data.inputs=[{kind: jsonl, path: /x, error_rate_limt: 0.2}]"])
    assert "\n" not in str(info.value)


def _broken_file(tmp_path, kind: str, wiki_lines: list[bytes]) -> tuple[str, str]:
    """(input path, path of the broken file) for a file of ``kind`` broken the way real ones break."""
    records = [json.loads(line) for line in wiki_lines[:50]]
    if kind == "parquet":  # cut short by a failed upload: no footer
        pq.write_table(pa.Table.from_pylist(records), tmp_path / "part.parquet")
        data = (tmp_path / "part.parquet").read_bytes()
        (tmp_path / "part.parquet").write_bytes(data[: len(data) // 2])
        return str(tmp_path), str(tmp_path / "part.parquet")
    if kind == "csv":  # written in Latin-1, not UTF-8
        rows = "id,text\n" + "".join(f'{r["id"]},"{r["text"]} café"\n' for r in records)
        (tmp_path / "part.csv").write_bytes(rows.replace('"', "").encode("latin-1", "replace"))
        return str(tmp_path), str(tmp_path / "part.csv")
    if kind == "warc":  # a jsonl.gz under a WARC name
        (tmp_path / "part.warc.gz").write_bytes(gzip.compress(b"".join(wiki_lines[:50])))
        return str(tmp_path), str(tmp_path / "part.warc.gz")
    # hf_dataset: an Arrow file cut short
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "ds"))
    arrow = tmp_path / "ds" / "data-00000-of-00001.arrow"
    arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 3])
    return str(tmp_path / "ds"), str(arrow)


@pytest.mark.parametrize("kind,error", [("parquet", "unreadable parquet"), ("csv", "unreadable csv .*'utf-8' codec"),
                                        ("warc", "not a WARC record"),
                                        ("hf_dataset", "unreadable Arrow stream")])
def test_a_file_that_cannot_be_parsed_is_named_with_its_error(tmp_path, wiki_lines, kind, error):
    path, broken = _broken_file(tmp_path, kind, wiki_lines)
    with pytest.raises(ConfigError, match=f"^{re.escape(broken)}(:[0-9]+)?: .*{error}.*" + re.escape(
            " (first of 1 bad records out of 1: 100.0% > error_rate_limit 0.01)") + "$") as info:
        _docs(C.InputSpec(kind=kind, path=path))
    assert "\n" not in str(info.value)


def test_csv_rows_with_the_wrong_number_of_fields_are_bad_records(tmp_path, wiki_lines):
    texts = [json.loads(line)["text"].replace('"', "'") for line in wiki_lines[:200]]
    rows = [f'd{i},"{t}"' if i % 40 else f'd{i},"{t}",extra' for i, t in enumerate(texts, 1)]  # 5 of 200
    (tmp_path / "crawl.csv").write_text("id,text\n" + "\n".join(rows) + "\n")
    first = 2 + sum(t.count("\n") + 1 for t in texts[:39])
    with pytest.raises(ConfigError, match=f"^{re.escape(str(tmp_path / 'crawl.csv'))}:{first}: 3 fields, the header "
                                          f"has 2 .first of 5 bad records out of 200: 2.5%"):
        _docs(C.InputSpec(kind="csv", path=str(tmp_path)))
    assert len(_docs(C.InputSpec(kind="csv", path=str(tmp_path), error_rate_limit=0.05))) == 195


def test_an_input_that_matches_no_file_is_a_config_error(tmp_path):
    (tmp_path / "a.json").write_text("{}")
    with pytest.raises(ConfigError, match=re.escape(f"input 0 (jsonl {tmp_path}): no file matches '**/*.jsonl*'")):
        _docs(C.InputSpec(kind="jsonl", path=str(tmp_path)))
    with pytest.raises(ConfigError, match="not a datasets save_to_disk folder"):
        _docs(C.InputSpec(kind="hf_dataset", path=str(tmp_path)))
