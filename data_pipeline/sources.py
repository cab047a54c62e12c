"""Input files through fsspec: listing any URL, opening it decompressed by extension, records as documents.

A path is any fsspec URL (``/data/crawl``, ``file:///data/crawl``, ``s3://bucket/crawl``, ``hf://...``);
``storage_options`` of the input go to the filesystem (e.g. ``endpoint_url`` for an S3-API server), and
fsspec's own ``FSSPEC_<PROTOCOL>_<OPTION>`` environment variables and the usual AWS variables work too.
Local files keep their plain path in document ids and error lines; other files are named by URL.

Every record field survives: :func:`record_document` puts all fields but the text into the document's
metadata, with values made JSON-friendly (:func:`plain`) because the writers store metadata as JSON.
"""
from __future__ import annotations

import base64
import dataclasses
import datetime
import io
import lzma
import zlib
from pathlib import Path
from typing import Any

import fsspec
import zstandard
from fsspec.implementations.local import LocalFileSystem
from fsspec.utils import infer_compression

from puyu.data_pipeline.document import Document

DECOMPRESSION_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError, zstandard.ZstdError)


@dataclasses.dataclass(frozen=True)
class Unit:
    """A piece of one input file owned by one rank.

    ``start``/``end``: a byte range for the splittable text kinds, a row-group range for parquet, the
    whole file (0, size) otherwise. ``size`` weighs the unit when ranks are balanced.
    """

    source: int  # index of the InputSpec
    mode: str  # jsonl, parquet, csv, warc, arrow, text, wiki, fortunes
    path: str  # local path or URL
    start: int
    end: int
    size: int
    label: str  # prefix of document ids; the file as named in metadata
    line: int = 0  # records before ``start`` (parquet: rows of the earlier row groups)


def is_compressed(path: str) -> bool:
    """Whether ``path``'s extension names a codec (byte offsets then mean nothing for the text inside)."""
    return infer_compression(path) is not None


def filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem of ``url`` and the path on it (fsspec caches filesystems, so this is cheap to repeat)."""
    return fsspec.core.url_to_fs(url, **(storage_options or {}))


def display_path(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """How a file is named in units and messages: its plain path if local, else its full URL."""
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def list_files(url: str, pattern: str, storage_options: dict[str, Any] | None = None) -> list[tuple[str, str, int]]:
    """``(path or URL, path relative to url, size)`` of the file ``url`` or of its files matching ``pattern``.

    Sorted by path so that every rank plans the same shards. Local folders are listed with ``pathlib``'s
    glob, which follows symlinked folders and files (Debian's ``/usr/share/doc`` has many; fsspec's local
    glob skips them); other filesystems with fsspec's glob.
    """
    fs, root = filesystem(url, storage_options)
    if isinstance(fs, LocalFileSystem):
        base = Path(root)
        if base.is_file():
            return [(str(base), base.name, base.stat().st_size)]
        files = sorted(p for p in base.glob(pattern) if p.is_file())
        return [(str(p), str(p.relative_to(base)), p.stat().st_size) for p in files]
    if fs.isfile(root):
        return [(fs.unstrip_protocol(root), root.rsplit("/", 1)[-1], fs.size(root))]
    root = root.rstrip("/")
    found = fs.glob(f"{root}/{pattern}", detail=True)
    return [(fs.unstrip_protocol(name), name[len(root) + 1:], int(info["size"]))
            for name, info in sorted(found.items()) if info["type"] == "file"]


class _ZstdFrames(io.RawIOBase):
    """A (multi-frame) zstd stream decompressed to its end; a cut inside a frame raises ``ZstdError``.

    zstandard's stream reader ends quietly at a truncated frame and fsspec's stops after the first
    frame, so frames are followed by hand.
    """

    def __init__(self, raw) -> None:
        super().__init__()
        self.raw, self.dctx = raw, zstandard.ZstdDecompressor()
        self.dobj, self.pending, self.finished = self.dctx.decompressobj(), b"", True

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self.pending:
            chunk = self.raw.read(1 << 20)
            if not chunk:
                if not self.finished:
                    raise zstandard.ZstdError("stream ends inside a frame (truncated file)")
                return 0
            while chunk:
                self.pending += self.dobj.decompress(chunk)
                self.finished = self.dobj.eof
                chunk = self.dobj.unused_data if self.dobj.eof else b""
                if self.dobj.eof:
                    self.dobj = self.dctx.decompressobj()
        n = min(len(buffer), len(self.pending))
        buffer[:n], self.pending = self.pending[:n], self.pending[n:]
        return n

    def close(self) -> None:
        self.raw.close()
        super().close()


def open_input(path: str, storage_options: dict[str, Any] | None = None, decompress: bool = True):
    """A binary stream of ``path``, decompressed by extension (gz, bz2, xz, zst, ...) unless told not to."""
    codec = infer_compression(path) if decompress else None
    fs, fs_path = filesystem(path, storage_options)
    if codec == "zstd":
        return io.BufferedReader(_ZstdFrames(fs.open(fs_path, "rb")), 1 << 20)
    return fs.open(fs_path, "rb", compression=codec)


def one_line(err: BaseException) -> str:
    """An exception as one line (pyarrow and warcio messages can span several)."""
    return " ".join(str(err).split()) or type(err).__name__


def decompress_error(path: str, where: int, err: BaseException, skipped: str = "rest of file") -> str:
    return f"{path}:{where}: corrupt or truncated {infer_compression(path)} stream ({one_line(err)}); {skipped} skipped"


def plain(value: Any) -> Any:
    """``value`` as JSON can store it: dates as ISO strings, decimals as strings, non-UTF-8 bytes as base64."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return base64.b64encode(value).decode("ascii")
    return str(value)  # Decimal, timedelta, anything else: its usual text


def record_document(record: dict[str, Any], text_key: str, doc_id: Any, u: Unit, line: int) -> Document:
    """A document of ``record[text_key]`` whose metadata is every other field, plus ``file`` and ``line``.

    A nested ``metadata`` object (datatrove's layout) is flattened into the metadata; the record's own
    fields win over it, and over ``file``/``line`` too when a record has fields of those names.
    """
    nested = record.get("metadata")
    meta = {"file": u.label, "line": line, **(nested if isinstance(nested, dict) else {})}
    meta.update((k, plain(v)) for k, v in record.items()
                if k != text_key and not (k == "metadata" and isinstance(v, dict)))
    return Document(str(doc_id) if doc_id is not None else f"{u.label}:{line}", record[text_key], meta)
