"""Writers: deterministic, atomic document files, and the reader for the files they write.

Same documents in, same bytes out: records are JSON with sorted keys, zstd runs single-threaded at
a fixed level, parquet is written with fixed row groups. Files appear under their final name only
when complete (``puyu.launcher.atomic``), so a killed task leaves nothing half-written behind.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from puyu.data_pipeline.document import Document, Step, utf8_len
from puyu.launcher.atomic import atomic_open

FORMATS = ("jsonl.zst", "jsonl", "parquet")


def doc_to_json(doc: Document, **extra: Any) -> str:
    record = {"id": doc.id, "text": doc.text, "metadata": doc.metadata, **extra}
    return json.dumps(record, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


class DocWriter(Step):
    """Pass-through step that writes every document it sees to ``path`` (format from its suffix)."""

    name = "write"

    def __init__(self, path: str | Path, zstd_level: int = 3, row_group: int = 10_000) -> None:
        super().__init__()
        self.path = Path(path)
        self.zstd_level = zstd_level
        self.row_group = row_group
        self.format = next((f for f in FORMATS if self.path.name.endswith("." + f)), None)
        if self.format is None:
            raise ValueError(f"{self.path}: output name must end in one of {', '.join('.' + f for f in FORMATS)}")

    def run(self, docs: Iterable[Document], rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        with atomic_open(self.path, "wb") as fh:
            if self.format == "parquet":
                yield from self._run_parquet(docs, fh)
            elif self.format == "jsonl.zst":
                cctx = zstandard.ZstdCompressor(level=self.zstd_level, threads=0)
                with cctx.stream_writer(fh, closefd=False) as out:
                    yield from self._run_jsonl(docs, out)
            else:
                yield from self._run_jsonl(docs, fh)

    def _count(self, doc: Document) -> None:
        self.stats.docs_in += 1
        self.stats.docs_out += 1
        size = utf8_len(doc.text)
        self.stats.bytes_in += size
        self.stats.bytes_out += size

    def _run_jsonl(self, docs: Iterable[Document], out) -> Iterator[Document]:
        for doc in docs:
            out.write(doc_to_json(doc).encode("utf-8", "surrogatepass") + b"\n")
            self._count(doc)
            yield doc

    def _run_parquet(self, docs: Iterable[Document], fh) -> Iterator[Document]:
        schema = pa.schema([("id", pa.string()), ("text", pa.string()), ("metadata", pa.string())])
        batch: list[Document] = []
        with pq.ParquetWriter(fh, schema, compression="zstd", compression_level=self.zstd_level) as writer:
            def flush() -> None:
                columns = {"id": [d.id for d in batch], "text": [d.text for d in batch],
                           "metadata": [json.dumps(d.metadata, sort_keys=True, ensure_ascii=False) for d in batch]}
                writer.write_table(pa.table(columns, schema=schema), row_group_size=self.row_group)
                batch.clear()

            for doc in docs:
                batch.append(doc)
                self._count(doc)
                yield doc
                if len(batch) >= self.row_group:
                    flush()
            if batch:
                flush()


def read_docs(path: str | Path) -> Iterator[Document]:
    """Documents of a file written by :class:`DocWriter` (trusted: errors here are bugs, not data)."""
    path = Path(path)
    if path.name.endswith(".parquet"):
        for batch in pq.ParquetFile(path).iter_batches():
            for row in batch.to_pylist():
                yield Document(row["id"], row["text"], json.loads(row["metadata"]))
        return
    if path.name.endswith(".zst"):
        with open(path, "rb") as fh, zstandard.ZstdDecompressor().stream_reader(fh) as raw:
            lines: Iterable[bytes] = _lines(raw)
            yield from _json_docs(lines)
        return
    with open(path, "rb") as fh:
        yield from _json_docs(fh)


def _lines(raw) -> Iterator[bytes]:
    pending = b""
    while chunk := raw.read(1 << 20):
        *lines, pending = (pending + chunk).split(b"\n")
        yield from lines
    if pending:
        yield pending


def _json_docs(lines: Iterable[bytes]) -> Iterator[Document]:
    for raw in lines:
        if raw.strip():
            record = json.loads(raw)
            yield Document(record["id"], record["text"], record["metadata"])


class ExclusionFile:
    """Exclusion sink for filters: dropped documents with their reason, as jsonl.zst (atomic on close)."""

    def __init__(self, path: str | Path, zstd_level: int = 3) -> None:
        self._opened = atomic_open(path, "wb")
        self._fh = self._opened.__enter__()
        self._out = zstandard.ZstdCompressor(level=zstd_level).stream_writer(self._fh, closefd=False)

    def write(self, doc: Document, reason: str) -> None:
        """``reason`` is ``step/why``; the step also goes into the metadata, for per-step counts."""
        dropped = Document(doc.id, doc.text, {**doc.metadata, "dropped_by": reason.split("/")[0]})
        self._out.write(doc_to_json(dropped, reason=reason).encode("utf-8", "surrogatepass") + b"\n")

    def close(self, failed: bool = False) -> None:
        self._out.close()
        if failed:
            self._opened.__exit__(RuntimeError, RuntimeError("stage failed"), None)
        else:
            self._opened.__exit__(None, None, None)
