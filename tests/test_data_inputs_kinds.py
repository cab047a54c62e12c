"""Input kinds beyond jsonl: parquet (row groups over ranks), csv, datasets save_to_disk folders, WARC/WAT/WET
from real pages; every field of a record in the metadata; max_docs for every kind; a resumed read stage."""
from __future__ import annotations

import csv
import datetime
import gzip
import io
import json
from html import unescape
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from jobs_for_tests import run_inline
from puyu.data_pipeline import config as C
from puyu.data_pipeline import corpora, job, layout
from puyu.data_pipeline.readers import InputReader, plan_shards
from puyu.data_pipeline.writers import read_docs

DOC_HTML = "usr/share/doc/python3.11/html"


def wiki_records() -> list[dict]:
    """600 real Wikipedia leads as a crawl's records: url, date, a score, nested metadata."""
    try:
        articles = json.loads(corpora.wiki_summaries_file().read_text(encoding="utf-8"))
    except corpora.CorpusMissing as err:
        pytest.skip(str(err))
    titles = corpora.wiki_titles(articles)[:600]
    return [{"id": f"w{i}", "text": corpora.wiki_extract(articles[t]),
             "url": "https://en.wikipedia.org/wiki/" + t.replace(" ", "_"), "date": f"2024-0{1 + i % 9}-1{i % 10}",
             "score": round(i / 7, 3), "metadata": {"title": t}} for i, t in enumerate(titles)]


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return wiki_records()


@pytest.fixture(scope="module")
def pages() -> list[tuple[str, bytes, str]]:
    return doc_pages()


def _read(specs: list[C.InputSpec], world_size: int = 1) -> list[list]:
    """Documents of every rank, as (id, text, metadata) lists per rank."""
    return [[(d.id, d.text, d.metadata) for d in InputReader(specs).run((), r, world_size)] for r in range(world_size)]


def _flat(per_rank: list[list]) -> list:
    return [doc for rank in per_rank for doc in rank]


def _expected_meta(rec: dict) -> dict:
    return {"title": rec["metadata"]["title"], "url": rec["url"], "date": rec["date"], "score": rec["score"],
            "id": rec["id"]}


def test_jsonl_top_level_fields_reach_the_metadata(tmp_path, records):
    (tmp_path / "crawl.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    docs = _flat(_read([C.InputSpec(kind="jsonl", path=str(tmp_path / "crawl.jsonl"))]))
    assert [(i, t) for i, t, _ in docs] == [(r["id"], r["text"]) for r in records]
    assert all(meta == {**_expected_meta(r), "file": "crawl.jsonl", "line": n}
               for n, ((_, _, meta), r) in enumerate(zip(docs, records), 1))


def _parquet_files(folder: Path, records: list[dict]) -> None:
    """Two files, row groups of 37 rows, typed columns (timestamp, list) as a real export has them."""
    for name, part in (("a.parquet", records[:400]), ("b.parquet", records[400:])):
        table = pa.table({"id": [r["id"] for r in part], "text": [r["text"] for r in part],
                          "url": [r["url"] for r in part],
                          "date": [datetime.datetime.fromisoformat(r["date"]) for r in part],
                          "score": [r["score"] for r in part], "tags": [[r["metadata"]["title"]] for r in part]})
        pq.write_table(table, folder / name, row_group_size=37)


@pytest.mark.parametrize("world_size", [1, 2, 3, 8, 23])
def test_parquet_row_groups_spread_over_ranks_each_row_once(tmp_path, records, world_size):
    _parquet_files(tmp_path, records)
    spec = C.InputSpec(kind="parquet", path=str(tmp_path))
    per_rank = _read([spec], world_size)
    assert [d[0] for d in _flat(per_rank)] == [r["id"] for r in records]
    if world_size > 2:  # two files alone could feed only two ranks
        assert sum(bool(docs) for docs in per_rank) > 2
    shards = plan_shards([spec], world_size)
    assert all(len({u.path for u in shard}) == len(shard) for shard in shards)  # adjacent row groups merged
    _, text, meta = _flat(per_rank)[450]
    assert text == records[450]["text"]
    assert meta == {"id": "w450", "url": records[450]["url"], "date": records[450]["date"] + "T00:00:00",
                    "score": records[450]["score"], "tags": [records[450]["metadata"]["title"]],
                    "file": "b.parquet", "line": 51}


def _csv_bytes(records: list[dict]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["id", "text", "url", "date"])
    writer.writerows([r["id"], r["text"] + '\n"quoted", line two', r["url"], r["date"]] for r in records)
    return out.getvalue().encode()


@pytest.mark.parametrize("name", ["crawl.csv", "crawl.csv.gz"])
def test_csv_rows_keep_every_column(tmp_path, records, name):
    data = _csv_bytes(records)
    (tmp_path / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    docs = _flat(_read([C.InputSpec(kind="csv", path=str(tmp_path))], 2))
    assert [(i, t) for i, t, _ in docs] == [(r["id"], r["text"] + '\n"quoted", line two') for r in records]
    assert docs[1][2] == {"id": "w1", "url": records[1]["url"], "date": records[1]["date"], "file": name,
                          "line": 2 + records[0]["text"].count("\n") + 2}  # the header, then 2-line-plus rows


def test_datasets_save_to_disk_folders(tmp_path, records):
    flat = [{k: v for k, v in r.items() if k != "metadata"} | {"title": r["metadata"]["title"]} for r in records]
    ds = datasets.Dataset.from_list(flat)
    ds.save_to_disk(str(tmp_path / "one"), num_shards=3)
    datasets.DatasetDict({"train": ds.select(range(500)), "test": ds.select(range(500, 600))}).save_to_disk(
        str(tmp_path / "dict"))
    for folder in ("one", "dict"):
        per_rank = _read([C.InputSpec(kind="hf_dataset", path=str(tmp_path / folder))], 3)
        assert [d[0] for d in _flat(per_rank)] == [r["id"] for r in records]
        assert all(per_rank) or folder == "dict"  # three shards feed three ranks
    _, text, meta = _flat(_read([C.InputSpec(kind="hf_dataset", path=str(tmp_path / "dict"))]))[550]
    assert text == records[550]["text"]
    assert meta == {**_expected_meta(records[550]), "file": "test/data-00000-of-00001.arrow", "line": 51}


def doc_pages() -> list[tuple[str, bytes, str]]:
    """(url, HTML, reStructuredText source) of 12 real pages of the Python docs, json.html among them."""
    try:
        root = corpora.debian_root(corpora.PYTHON_DOC_PACKAGE) / DOC_HTML
    except corpora.CorpusMissing as err:
        pytest.skip(str(err))
    names = ["json"] + sorted(p.stem for p in (root / "library").glob("[a-c]*.html"))[:11]
    return [(f"https://docs.python.org/3.11/library/{n}.html", (root / "library" / f"{n}.html").read_bytes(),
             (root / "_sources/library" / f"{n}.rst.txt").read_text()) for n in names]


def _warc(path: Path, pages: list[tuple[str, bytes, str]], kind: str) -> None:
    """A gzipped WARC (warcinfo, then request + response per page), WET (conversion) or WAT (metadata)."""
    with open(path, "wb") as fh:
        writer = WARCWriter(fh, gzip=True)
        writer.write_record(writer.create_warcinfo_record(path.name, {"software": "warcio test"}))
        for url, html, source in pages:
            if kind == "warc":
                request = StatusAndHeaders("GET / HTTP/1.1", [("Host", "docs.python.org")], is_http_request=True)
                writer.write_record(writer.create_warc_record(url, "request", http_headers=request))
                http = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8")], protocol="HTTP/1.1")
                writer.write_record(writer.create_warc_record(url, "response", payload=io.BytesIO(html),
                                                              http_headers=http))
            elif kind == "wet":
                writer.write_record(writer.create_warc_record(url, "conversion", payload=io.BytesIO(source.encode()),
                                                              warc_content_type="text/plain"))
            else:
                title = unescape(html.split(b"<title>")[1].split(b"</title>")[0].decode())
                envelope = {"Envelope": {"Payload-Metadata": {"HTTP-Response-Metadata": {
                    "HTML-Metadata": {"Head": {"Title": title, "Metas": [{"name": "generator", "content": "x"}]}}}}}}
                writer.write_record(writer.create_warc_record(
                    url, "metadata", payload=io.BytesIO(json.dumps(envelope).encode()),
                    warc_content_type="application/json"))


def test_warc_wet_and_wat_records_become_documents(tmp_path, pages):
    for kind in ("warc", "wet", "wat"):
        _warc(tmp_path / f"docs.warc.{kind}.gz" if kind != "warc" else tmp_path / "docs.warc.gz", pages, kind)
    reader = InputReader([C.InputSpec(kind="warc", path=str(tmp_path / "docs.warc.gz"))])
    docs = list(reader.run())
    assert [d.metadata["url"] for d in docs] == [url for url, _, _ in pages]
    assert reader.stats.extra["warc_skipped"] == 1 + len(pages)  # warcinfo and the requests
    json_page = docs[0]
    assert json_page.text.startswith("json — JSON encoder and decoder")
    assert "JSON (JavaScript Object Notation), specified by RFC 7159" in json_page.text
    assert "Previous topic" not in json_page.text and "<span" not in json_page.text  # main content, no markup
    assert json_page.id == json_page.metadata["WARC-Record-ID"] and json_page.metadata["http_status"] == 200
    assert json_page.metadata["date"].startswith(str(datetime.date.today().year))
    assert json_page.metadata["WARC-Type"] == "response" and json_page.metadata["line"] == 3

    wet = _flat(_read([C.InputSpec(kind="warc", path=str(tmp_path / "docs.warc.wet.gz"))]))
    assert [text for _, text, _ in wet] == [source.strip() for _, _, source in pages]
    wat = _flat(_read([C.InputSpec(kind="warc", path=str(tmp_path / "docs.warc.wat.gz"))]))
    assert wat[0][1] == "json — JSON encoder and decoder — Python 3.11.2 documentation"
    assert "HTML-Metadata" in json.dumps(wat[0][2]["wat"])

    both = _read([C.InputSpec(kind="warc", path=str(tmp_path))], 2)  # the default glob finds all three files
    assert sorted(d[0] for d in _flat(both)) == sorted([d.id for d in docs] + [d[0] for d in wet + wat])


def _inputs(tmp_path: Path, records: list[dict], pages) -> dict[str, C.InputSpec]:
    """One input of every kind, each of several files, built from the same real records."""
    (tmp_path / "jsonl").mkdir(parents=True)
    for n in range(3):
        part = "".join(json.dumps(r) + "\n" for r in records[n * 200:(n + 1) * 200])
        (tmp_path / "jsonl" / f"{n}.jsonl").write_text(part)
        (tmp_path / "jsonl" / f"{n}.jsonl.gz").write_bytes(gzip.compress(part.encode()))
    (tmp_path / "parquet").mkdir()
    _parquet_files(tmp_path / "parquet", records)
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "a.csv").write_bytes(_csv_bytes(records[:300]))
    (tmp_path / "csv" / "b.csv").write_bytes(_csv_bytes(records[300:]))
    (tmp_path / "warc").mkdir()
    _warc(tmp_path / "warc" / "a.warc.gz", pages[:6], "warc")
    _warc(tmp_path / "warc" / "b.warc.gz", pages[6:], "warc")
    (tmp_path / "text").mkdir()
    for n, r in enumerate(records[:40]):
        (tmp_path / "text" / f"{n:03d}.txt").write_text(r["text"])
    return {"jsonl": C.InputSpec(kind="jsonl", path=str(tmp_path / "jsonl"), glob="*.jsonl"),
            "jsonl.gz": C.InputSpec(kind="jsonl", path=str(tmp_path / "jsonl"), glob="*.jsonl.gz"),
            "parquet": C.InputSpec(kind="parquet", path=str(tmp_path / "parquet")),
            "csv": C.InputSpec(kind="csv", path=str(tmp_path / "csv")),
            "warc": C.InputSpec(kind="warc", path=str(tmp_path / "warc")),
            "text": C.InputSpec(kind="text", path=str(tmp_path / "text"))}


def test_max_docs_reads_the_first_documents_of_every_kind(tmp_path, records, pages):
    for name, spec in _inputs(tmp_path, records, pages).items():
        full = [d[0] for d in _flat(_read([spec]))]
        spec.max_docs = 7
        per_rank = _read([spec], 3)
        assert [d[0] for d in _flat(per_rank)] == full[:7], name
        spec.max_docs = 250  # more than one file's worth: the cap spans files
        assert [d[0] for d in _flat(_read([spec], 4))] == full[:250], name


def test_a_resumed_read_stage_reads_every_record_once(tmp_path, records, pages):
    specs = list(_inputs(tmp_path / "in", records, pages).values())
    cfg = C.DataJobConfig(inputs=specs, shards=5)
    cfg.filters.length.min_chars = 1  # keep every document: the read stage's sharding is what is checked
    for name in ("language", "gopher_repetition", "gopher_quality", "c4", "fineweb"):
        getattr(cfg.filters, name).enabled = False
    read_filter = job.build_data_stages(cfg)[0]
    run_dir = tmp_path / "run"
    run_inline([read_filter], run_dir)
    out = run_dir / layout.READ_FILTER / "out"
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / "00002.jsonl.zst").unlink()
    (run_dir / layout.READ_FILTER / "completions" / "00002").unlink()
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    run_inline([read_filter], run_dir)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name in mtimes} == mtimes  # only rank 2 ran
    ids = [(d.metadata["file"], d.id) for _, p in layout.numbered_files(out, ".jsonl.zst") for d in read_docs(p)]
    expected = [(d[2]["file"], d[0]) for d in _flat(_read(specs))]
    assert sorted(ids) == sorted(expected) and len(set(ids)) == len(ids)

