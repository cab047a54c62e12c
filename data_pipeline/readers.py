"""Readers: turn input specs into documents, each rank reading a balanced share.

Sharding: all input files, in a fixed order, form one virtual byte stream cut into ``world_size``
equal ranges. A plain ``.jsonl`` or fortune file (and the Wikipedia JSON, whose records are spread
over its size) is cut exactly at those boundaries, a record belonging to the range its start falls in; a
file that cannot be cut (compressed ``.gz``/``.bz2``/``.xz``/``.zst``, parquet, one-document text files)
goes to the rank holding its midpoint.

Text inputs are decompressed by file extension as a stream. A bad record is counted and reported with
file and line; once more than ``error_rate_limit`` of a file's records are bad (for one-document-per-file
inputs: of the rank's files of that input) the rank fails with one line naming the first bad one, so a
broken crawl cannot pass as an empty corpus.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import lzma
import re
import zlib
from pathlib import Path
from typing import Iterable, Iterator

import fsspec
import pyarrow.parquet as pq
import zstandard
from fsspec.utils import infer_compression

from puyu.data_pipeline import corpora
from puyu.data_pipeline.config import InputSpec
from puyu.data_pipeline.document import Document, Step, utf8_len
from puyu.launcher.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Unit:
    """A piece of one input file owned by one rank: bytes [start, end) of ``path``."""

    source: int  # index of the InputSpec
    mode: str  # jsonl, parquet, text, wiki, fortunes
    path: str
    start: int
    end: int
    size: int
    label: str  # prefix of document ids and the file name shown in error lines


SPLITTABLE = {"jsonl", "wiki", "fortunes"}
DECOMPRESSION_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError, zstandard.ZstdError)


def is_compressed(path: str) -> bool:
    """Whether ``path``'s extension names a codec (byte offsets then mean nothing for the text inside)."""
    return infer_compression(path) is not None


def _folder_files(root: Path, pattern: str, max_docs: int) -> list[Path]:
    files = sorted(p for p in root.glob(pattern) if p.is_file())
    return files[:max_docs] if max_docs else files


def expand_input(index: int, spec: InputSpec, data_dir: str | None = None) -> list[Unit]:
    """Whole-file units for one spec, in a deterministic order."""
    def unit(mode: str, path: Path, label: str) -> Unit:
        size = path.stat().st_size
        return Unit(index, mode, str(path), 0, size, size, label)

    if spec.kind == "wiki_summaries":
        path = corpora.wiki_summaries_file(spec.lang)
        return [unit("wiki", path, f"wiki-{spec.lang}")]
    if spec.kind == "fortunes":
        root = corpora.debian_root(spec.package, data_dir)
        files = [p for p in _folder_files(root, spec.glob or "usr/share/games/fortunes/*", 0)
                 if not p.name.endswith(".dat") and not p.is_symlink()]  # .dat: strfile's offsets; .u8 links
        return [unit("fortunes", p, f"{spec.package}/{p.name}") for p in files]
    if spec.kind in ("text", "debian"):
        root = corpora.debian_root(spec.package, data_dir) if spec.kind == "debian" else Path(spec.path)
        pattern = spec.glob or "**/*.txt"
        name = spec.package or root.name
        return [unit("text", p, f"{name}/{p.relative_to(root)}") for p in _folder_files(root, pattern, spec.max_docs)]
    if spec.max_docs:
        raise ConfigError(f"input {index} ({spec.kind} {spec.path}): max_docs is only supported for text, debian "
                          f"and wiki_summaries inputs")
    root = Path(spec.path)
    if spec.kind == "jsonl":
        files = [root] if root.is_file() else _folder_files(root, spec.glob or "**/*.jsonl*", 0)
        return [unit("jsonl", p, p.name) for p in files]
    if spec.kind == "parquet":
        files = [root] if root.is_file() else _folder_files(root, spec.glob or "**/*.parquet", 0)
        return [unit("parquet", p, p.name) for p in files]
    raise ConfigError(f"input {index}: unknown kind {spec.kind!r} "
                      f"(jsonl, parquet, text, debian, fortunes, wiki_summaries)")


def plan_shards(specs: list[InputSpec], world_size: int, data_dir: str | None = None) -> list[list[Unit]]:
    """Split all inputs into ``world_size`` lists of units of about equal bytes."""
    units = [u for i, spec in enumerate(specs) for u in expand_input(i, spec, data_dir)]
    total = sum(u.size for u in units)
    bounds = [total * r // world_size for r in range(world_size + 1)]
    shards: list[list[Unit]] = [[] for _ in range(world_size)]
    offset = 0
    for u in units:
        if u.mode in SPLITTABLE and not is_compressed(u.path):
            for r in range(world_size):
                lo, hi = max(bounds[r], offset), min(bounds[r + 1], offset + u.size)
                if lo < hi:
                    shards[r].append(dataclasses.replace(u, start=lo - offset, end=hi - offset))
        else:
            middle = offset + u.size // 2
            owner = next((r for r in range(world_size) if middle < bounds[r + 1]), world_size - 1)
            shards[owner].append(u)
        offset += u.size
    return shards


class InputReader(Step):
    """Source step: yields the documents of this rank's units (``run`` ignores incoming docs)."""

    name = "read"

    def __init__(self, specs: list[InputSpec], data_dir: str | None = None) -> None:
        super().__init__()
        self.specs = specs
        self.data_dir = data_dir

    def run(self, docs: Iterable[Document] = (), rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        shard = plan_shards(self.specs, world_size, self.data_dir)[rank]
        for _, units in itertools.groupby(shard, key=_tally_key):
            tally = _ErrorTally(self.stats)
            for u in units:
                spec = self.specs[u.source]
                for doc in _READERS[u.mode](u, spec, tally):
                    tally.good += 1
                    self.stats.docs_out += 1
                    self.stats.bytes_out += utf8_len(doc.text)
                    yield doc
            tally.check(spec.error_rate_limit)


def _tally_key(u: Unit) -> tuple:
    """Units whose bad records are weighed together: one file, or all files of a one-document-per-file input.

    A text file is a single record, so one unreadable file among thousands must not fail the input.
    """
    return (u.source,) if u.mode == "text" else (u.source, u.path)


class _ErrorTally:
    """Bad and good records of one file (see :func:`_tally_key`), forwarding errors to the step's stats.

    Readers report through this instead of the stats so the error rate is judged per file, while the
    stats keep counting across files as before.
    """

    def __init__(self, stats) -> None:
        self.stats, self.good, self.bad, self.first = stats, 0, 0, ""

    def error(self, message: str) -> None:
        self.bad += 1
        self.first = self.first or message
        self.stats.error(message)

    def add(self, key: str, value: float) -> None:
        self.stats.add(key, value)

    def check(self, limit: float) -> None:
        """Fail in one line once more than ``limit`` of the records are bad (an unreadable file counts one)."""
        total = self.good + self.bad
        if self.bad > limit * total:
            raise ConfigError(f"{self.first} (first of {self.bad} bad records out of {total}: "
                              f"{self.bad / total:.1%} > error_rate_limit {limit:g})")


def _record_to_doc(raw: bytes, where: str, u: Unit, spec: InputSpec, lineno: int, stats) -> Document | None:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        stats.error(f"{where}: invalid UTF-8 at byte {err.start} of the line")
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        stats.error(f"{where}: invalid JSON ({err.msg} at column {err.colno})")
        return None
    if not isinstance(record, dict):
        stats.error(f"{where}: not a JSON object")
        return None
    text = record.get(spec.text_key)
    if not isinstance(text, str):
        what = "missing field" if text is None else "non-string field"
        stats.error(f"{where}: {what} {spec.text_key!r}")
        return None
    doc_id = record.get(spec.id_key)
    doc_id = str(doc_id) if doc_id is not None else f"{u.label}:{lineno}"
    meta = record.get("metadata") if isinstance(record.get("metadata"), dict) else {}
    meta = {**meta, "file": u.label, "line": lineno}
    return Document(doc_id, text, meta)


def _count_newlines(fh, upto: int) -> int:
    fh.seek(0)
    count, left = 0, upto
    while left > 0:
        chunk = fh.read(min(left, 1 << 20))
        if not chunk:
            break
        count += chunk.count(b"\n")
        left -= len(chunk)
    return count


def read_jsonl(u: Unit, spec: InputSpec, stats) -> Iterator[Document]:
    """Records of a plain .jsonl whose first byte lies in [u.start, u.end); a compressed one is read whole."""
    if is_compressed(u.path):
        yield from _read_compressed_jsonl(u, spec, stats)
        return
    with open(u.path, "rb") as fh:
        lineno = _count_newlines(fh, u.start)
        fh.seek(u.start)
        pos = u.start
        if u.start > 0:
            fh.seek(u.start - 1)
            if fh.read(1) != b"\n":  # we are inside a record that belongs to the previous range
                skipped = fh.readline()
                pos += len(skipped)
                lineno += 1
        while pos < u.end:
            raw = fh.readline()
            if not raw:
                break
            pos += len(raw)
            lineno += 1
            if raw.strip():
                doc = _record_to_doc(raw, f"{u.path}:{lineno}", u, spec, lineno, stats)
                if doc is not None:
                    yield doc


def _zst_lines(path: str) -> Iterator[bytes]:
    """Lines of a (multi-frame) zstd file; raises ``zstandard.ZstdError`` if the stream is cut short.

    zstandard's stream reader ends quietly at a truncated frame, so frames are followed by hand
    and an unfinished one is an error.
    """
    dctx = zstandard.ZstdDecompressor()
    dobj, pending, finished = dctx.decompressobj(), b"", True
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            while chunk:
                pending += dobj.decompress(chunk)
                finished = dobj.eof
                chunk = dobj.unused_data if dobj.eof else b""
                if dobj.eof:
                    dobj = dctx.decompressobj()
            *lines, pending = pending.split(b"\n")
            for line in lines:
                yield line + b"\n"
    if not finished:
        raise zstandard.ZstdError("stream ends inside a frame (truncated file)")
    if pending:
        yield pending


def decompressed_lines(path: str) -> Iterator[bytes]:
    """Lines of a compressed file, decompressed as a stream (codec from the extension).

    ``.zst`` goes through :func:`_zst_lines` because fsspec's zstandard reader stops after the first
    frame and passes a truncated one silently; gz, bz2, xz (and whatever else fsspec infers) through fsspec.
    """
    if infer_compression(path) == "zstd":
        yield from _zst_lines(path)
        return
    with fsspec.open(path, "rb", compression="infer") as fh:
        yield from fh


def _decompress_error(path: str, lineno: int, err: Exception, skipped: str = "rest of file") -> str:
    return f"{path}:{lineno}: corrupt or truncated {infer_compression(path)} stream ({err}); {skipped} skipped"


def _read_compressed_jsonl(u: Unit, spec: InputSpec, stats) -> Iterator[Document]:
    lineno = 0
    try:
        for raw in decompressed_lines(u.path):
            lineno += 1
            if raw.strip():
                doc = _record_to_doc(raw, f"{u.path}:{lineno}", u, spec, lineno, stats)
                if doc is not None:
                    yield doc
    except DECOMPRESSION_ERRORS as err:
        stats.error(_decompress_error(u.path, lineno + 1, err))


def _file_bytes(path: str, stats) -> bytes | None:
    """The (decompressed) content of a whole-file input, or None after reporting why it cannot be read."""
    if not is_compressed(path):
        return Path(path).read_bytes()
    parts: list[bytes] = []
    try:
        parts.extend(decompressed_lines(path))
    except DECOMPRESSION_ERRORS as err:
        stats.error(_decompress_error(path, len(parts) + 1, err, "file"))
        return None
    return b"".join(parts)


def read_parquet(u: Unit, spec: InputSpec, stats) -> Iterator[Document]:
    try:
        pfile = pq.ParquetFile(u.path)
    except Exception as err:  # pyarrow raises several types for unreadable files
        stats.error(f"{u.path}: unreadable parquet ({err})")
        return
    names = pfile.schema_arrow.names
    if spec.text_key not in names:
        stats.error(f"{u.path}: missing column {spec.text_key!r} (has {names})")
        return
    columns = [spec.text_key] + ([spec.id_key] if spec.id_key in names else [])
    row = 0
    for batch in pfile.iter_batches(columns=columns):
        data = batch.to_pydict()
        ids = data.get(spec.id_key, [None] * batch.num_rows)
        for text, doc_id in zip(data[spec.text_key], ids):
            row += 1
            if not isinstance(text, str):
                stats.error(f"{u.path}: row {row}: missing field {spec.text_key!r}")
                continue
            yield Document(str(doc_id) if doc_id is not None else f"{u.label}:{row}", text,
                           {"file": u.label, "line": row})


def read_text_file(u: Unit, spec: InputSpec, stats) -> Iterator[Document]:
    raw = _file_bytes(u.path, stats)
    if raw is None:
        return
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        stats.error(f"{u.path}:{line}: invalid UTF-8 at byte {err.start}; file skipped")
        return
    yield Document(u.label, text, {"file": u.label})


def read_wiki(u: Unit, spec: InputSpec, stats) -> Iterator[Document]:
    """Articles whose proportional position ``i * size / n`` lies in [u.start, u.end).

    The evaluation tail (:func:`corpora.wiki_eval_titles`, the documents ``wiki_bpb`` scores) is skipped
    and counted under ``extra.wiki_eval_held_out`` unless ``spec.include_eval_tail``; ``max_docs`` counts
    the documents read, not the skipped ones.
    """
    articles = json.loads(Path(u.path).read_text(encoding="utf-8"))
    held_out = set() if spec.include_eval_tail else set(corpora.wiki_eval_titles(articles))
    titles = list(articles)
    if spec.max_docs:
        titles = [t for t in titles if t not in held_out][: spec.max_docs]
    n = len(titles)
    for i, title in enumerate(titles):
        if not u.start <= i * u.size // max(n, 1) < u.end:
            continue
        if title in held_out:
            stats.add("wiki_eval_held_out", 1)
            continue
        entry = articles[title]
        text = entry.get("extract") if isinstance(entry, dict) else None
        if not isinstance(text, str):
            stats.error(f"{u.path}: article {title!r}: missing field 'extract'")
            continue
        yield Document(f"{u.label}/{title}", text, {"file": u.label, "title": title})


FORTUNE_SEPARATOR = re.compile(rb"^%\r?\n", re.MULTILINE)
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def read_fortunes(u: Unit, spec: InputSpec, stats) -> Iterator[Document]:
    """Items of a fortune file (between ``%`` lines) whose first byte lies in [u.start, u.end).

    A compressed file is one whole unit, so its range is widened to the decompressed size.
    """
    raw = _file_bytes(u.path, stats)
    if raw is None:
        return
    if is_compressed(u.path):
        u = dataclasses.replace(u, start=0, end=len(raw))
    starts = [0] + [m.end() for m in FORTUNE_SEPARATOR.finditer(raw)]
    ends = [m.start() for m in FORTUNE_SEPARATOR.finditer(raw)] + [len(raw)]
    for number, (lo, hi) in enumerate(zip(starts, ends), 1):
        if not u.start <= lo < u.end or lo >= hi:
            continue
        line = raw.count(b"\n", 0, lo) + 1
        try:
            text = raw[lo:hi].decode("utf-8")
        except UnicodeDecodeError as err:
            bad_line = raw.count(b"\n", 0, lo + err.start) + 1
            stats.error(f"{u.path}:{bad_line}: invalid UTF-8; item skipped")
            continue
        yield Document(f"{u.label}:{number}", ANSI_ESCAPE.sub("", text).strip(), {"file": u.label, "line": line})


_READERS = {"jsonl": read_jsonl, "parquet": read_parquet,
            "text": read_text_file, "wiki": read_wiki, "fortunes": read_fortunes}
