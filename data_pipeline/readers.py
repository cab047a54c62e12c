"""Readers: turn input specs into documents, each rank reading a balanced share.

Inputs are fsspec URLs (local paths, ``file://``, ``s3://``, ... see :mod:`puyu.data_pipeline.sources`)
of kind jsonl, parquet, csv, warc (WARC/WAT/WET, :mod:`puyu.data_pipeline.warc`), hf_dataset (a
``datasets`` ``save_to_disk`` folder) or text, plus the packaged corpora (wiki_summaries, debian, fortunes).

Sharding: all input files, in a fixed order, form one virtual byte stream cut into ``world_size``
equal ranges. A plain ``.jsonl`` or fortune file (and the Wikipedia JSON, whose records are spread
over its size) is cut exactly at those boundaries, a record belonging to the range its start falls in;
a parquet file is cut into row groups (weighed by their compressed bytes); a unit that cannot be cut
(a compressed file, a csv, WARC or Arrow file, a one-document text file) goes to the rank holding its
midpoint. So every record is read exactly once whatever the world size, and a rank's share depends only
on the listing and the world size, which completion markers rely on when a run resumes.

``max_docs`` (a trial run): for text/debian the first files, for wiki_summaries the first articles,
for the record kinds the first documents of the input, read in order on rank 0.

Text inputs are decompressed by file extension as a stream. A bad record is counted and reported with
file and line; once more than ``error_rate_limit`` of a file's records are bad (for one-document-per-file
inputs: of the rank's files of that input) the rank fails with one line naming the first bad one, so a
broken crawl cannot pass as an empty corpus. A file that cannot be decompressed or parsed at all counts
as one bad record, so it fails the stage unless it is one of many files of a text input.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import re
from pathlib import Path
from typing import Iterable, Iterator

from puyu.data_pipeline import corpora, tabular, warc
from puyu.data_pipeline.config import InputSpec
from puyu.data_pipeline.document import Document, Step, utf8_len
from puyu.data_pipeline.sources import (DECOMPRESSION_ERRORS, Unit, decompress_error, is_compressed, list_files,
                                        open_input, record_document)
from puyu.launcher.errors import ConfigError

SPLITTABLE = {"jsonl", "wiki", "fortunes"}
DEFAULT_GLOBS = {"jsonl": "**/*.jsonl*", "parquet": "**/*.parquet", "csv": "**/*.csv*", "warc": "**/*.warc*",
                 "text": "**/*.txt", "debian": "**/*.txt"}
RECORD_KINDS = {"jsonl", "parquet", "csv", "warc", "hf_dataset"}  # max_docs caps documents, read on rank 0


def _folder_files(root: Path, pattern: str) -> list[Path]:
    return sorted(p for p in root.glob(pattern) if p.is_file())


def expand_input(index: int, spec: InputSpec, data_dir: str | None = None) -> list[Unit]:
    """Units for one spec, in a deterministic order; an input that matches no file is a config error."""
    def local_unit(mode: str, path: Path, label: str) -> Unit:
        size = path.stat().st_size
        return Unit(index, mode, str(path), 0, size, size, label)

    if spec.kind == "wiki_summaries":
        path = corpora.wiki_summaries_file(spec.lang)
        return [local_unit("wiki", path, f"wiki-{spec.lang}")]
    if spec.kind == "fortunes":
        root = corpora.debian_root(spec.package, data_dir)
        files = [p for p in _folder_files(root, spec.glob or "usr/share/games/fortunes/*")
                 if not p.name.endswith(".dat") and not p.is_symlink()]  # .dat: strfile's offsets; .u8 links
        return [local_unit("fortunes", p, f"{spec.package}/{p.name}") for p in files]
    if spec.kind == "hf_dataset":
        return tabular.arrow_units(index, spec)
    if spec.kind not in DEFAULT_GLOBS:
        raise ConfigError(f"input {index}: unknown kind {spec.kind!r} (jsonl, parquet, csv, warc, hf_dataset, "
                          f"text, debian, fortunes, wiki_summaries)")
    root = str(corpora.debian_root(spec.package, data_dir)) if spec.kind == "debian" else spec.path
    pattern = spec.glob or DEFAULT_GLOBS[spec.kind]
    files = list_files(root, pattern, spec.storage_options)
    if not files:
        raise ConfigError(f"input {index} ({spec.kind} {root}): no file matches {pattern!r}")
    if spec.kind in ("text", "debian"):
        name = spec.package or root.rstrip("/").rsplit("/", 1)[-1]
        files = files[: spec.max_docs] if spec.max_docs else files
        return [Unit(index, "text", path, 0, size, size, f"{name}/{rel}") for path, rel, size in files]
    if spec.kind == "parquet":
        return [u for path, rel, size in files for u in tabular.parquet_units(index, spec, path, rel, size)]
    return [Unit(index, spec.kind, path, 0, size, size, rel) for path, rel, size in files]


def plan_shards(specs: list[InputSpec], world_size: int, data_dir: str | None = None) -> list[list[Unit]]:
    """Split all inputs into ``world_size`` lists of units of about equal bytes (see the module docstring)."""
    units = [u for i, spec in enumerate(specs) for u in expand_input(i, spec, data_dir)]
    total = sum(u.size for u in units)
    bounds = [total * r // world_size for r in range(world_size + 1)]
    shards: list[list[Unit]] = [[] for _ in range(world_size)]
    offset = 0
    for u in units:
        spec = specs[u.source]
        if spec.max_docs and spec.kind in RECORD_KINDS:
            shards[0].append(u)
        elif u.mode in SPLITTABLE and not is_compressed(u.path):
            for r in range(world_size):
                lo, hi = max(bounds[r], offset), min(bounds[r + 1], offset + u.size)
                if lo < hi:
                    shards[r].append(dataclasses.replace(u, start=lo - offset, end=hi - offset))
        else:
            middle = offset + u.size // 2
            owner = next((r for r in range(world_size) if middle < bounds[r + 1]), world_size - 1)
            shards[owner].append(u)
        offset += u.size
    return [_merge_row_groups(shard) for shard in shards]


def _merge_row_groups(shard: list[Unit]) -> list[Unit]:
    """Adjacent row groups of one parquet file on one rank become one unit (the file is opened once)."""
    merged: list[Unit] = []
    for u in shard:
        last = merged[-1] if merged else None
        if last and u.mode == "parquet" and last.mode == "parquet" and last.path == u.path and last.end == u.start:
            merged[-1] = dataclasses.replace(last, end=u.end, size=last.size + u.size)
        else:
            merged.append(u)
    return merged


class InputReader(Step):
    """Source step: yields the documents of this rank's units (``run`` ignores incoming docs)."""

    name = "read"

    def __init__(self, specs: list[InputSpec], data_dir: str | None = None) -> None:
        super().__init__()
        self.specs = specs
        self.data_dir = data_dir

    def run(self, docs: Iterable[Document] = (), rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        shard = plan_shards(self.specs, world_size, self.data_dir)[rank]
        taken: collections.Counter = collections.Counter()  # documents per capped record input
        for (source, *_), units in itertools.groupby(shard, key=_tally_key):
            spec = self.specs[source]
            capped = bool(spec.max_docs) and spec.kind in RECORD_KINDS
            tally = _ErrorTally(self.stats)
            for u in units:
                stream = _READERS[u.mode](u, spec, tally)
                if capped:
                    stream = itertools.islice(stream, max(spec.max_docs - taken[source], 0))
                for doc in stream:
                    taken[source] += 1
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
    return record_document(record, spec.text_key, record.get(spec.id_key), u, lineno)


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
    """Records of a plain .jsonl whose first byte lies in [u.start, u.end); a compressed one is read whole.

    Line numbers of a later range are found by counting newlines before it (a read of the file's start).
    """
    if is_compressed(u.path):
        yield from _read_compressed_jsonl(u, spec, stats)
        return
    with open_input(u.path, spec.storage_options, decompress=False) as fh:
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


def _read_compressed_jsonl(u: Unit, spec: InputSpec, stats) -> Iterator[Document]:
    lineno = 0
    try:
        with open_input(u.path, spec.storage_options) as fh:
            for raw in fh:
                lineno += 1
                if raw.strip():
                    doc = _record_to_doc(raw, f"{u.path}:{lineno}", u, spec, lineno, stats)
                    if doc is not None:
                        yield doc
    except DECOMPRESSION_ERRORS as err:
        stats.error(decompress_error(u.path, lineno + 1, err))


def _file_bytes(path: str, spec: InputSpec, stats) -> bytes | None:
    """The (decompressed) content of a whole-file input, or None after reporting why it cannot be read."""
    if not is_compressed(path):
        with open_input(path, spec.storage_options) as fh:
            return fh.read()
    parts: list[bytes] = []
    try:
        with open_input(path, spec.storage_options) as fh:
            parts.extend(fh)
    except DECOMPRESSION_ERRORS as err:
        stats.error(decompress_error(path, len(parts) + 1, err, "file"))
        return None
    return b"".join(parts)


def read_text_file(u: Unit, spec: InputSpec, stats) -> Iterator[Document]:
    raw = _file_bytes(u.path, spec, stats)
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
    raw = _file_bytes(u.path, spec, stats)
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


_READERS = {"jsonl": read_jsonl, "parquet": tabular.read_parquet, "csv": tabular.read_csv,
            "arrow": tabular.read_arrow, "warc": warc.read_warc,
            "text": read_text_file, "wiki": read_wiki, "fortunes": read_fortunes}
