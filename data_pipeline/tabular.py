"""Table-shaped inputs: parquet (split at row groups), csv, and ``datasets`` ``save_to_disk`` folders (Arrow).

Every column but the text becomes document metadata (:func:`sources.record_document`), so a crawl's
``url``, ``date``, scores and the like reach the output. A file that cannot be parsed is reported once,
naming the file and the error, and counts as a bad record of that file.

A ``save_to_disk`` folder is read with pyarrow from its ``state.json`` (Arrow IPC stream files, in
order; a ``DatasetDict`` folder lists its splits in ``dataset_dict.json``): no ``datasets`` import at
run time, and the folder may sit behind any fsspec URL like every other input.
"""
from __future__ import annotations

import csv
import io
import json
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from puyu.data_pipeline.config import InputSpec
from puyu.data_pipeline.document import Document
from puyu.data_pipeline.sources import (DECOMPRESSION_ERRORS, Unit, decompress_error, display_path, filesystem,
                                        is_compressed, one_line, open_input, record_document)
from puyu.launcher.errors import ConfigError

CSV_FIELD_LIMIT = 2**31 - 1  # the csv module's default 128 KiB per field is less than many web pages


def _rows_as_docs(batches: Iterable[pa.RecordBatch], u: Unit, spec: InputSpec, stats, row: int) -> Iterator[Document]:
    """Documents of record batches, rows numbered from ``row + 1``; a row without a string text is bad."""
    for batch in batches:
        for record in batch.to_pylist():
            row += 1
            if not isinstance(record.get(spec.text_key), str):
                stats.error(f"{u.path}: row {row}: missing field {spec.text_key!r}")
                continue
            yield record_document(record, spec.text_key, record.get(spec.id_key), u, row)


def parquet_units(index: int, spec: InputSpec, path: str, label: str, size: int) -> list[Unit]:
    """One unit per row group, weighed by its compressed bytes, so a few large files still spread over ranks.

    A file whose footer cannot be read stays one unit; reading it then reports the error.
    """
    try:
        with open_input(path, spec.storage_options, decompress=False) as fh:
            meta = pq.ParquetFile(fh).metadata
    except Exception:  # noqa: BLE001 - pyarrow raises several types; read_parquet names the error
        return [Unit(index, "parquet", path, 0, 0, size, label)]
    units, rows = [], 0
    for i in range(meta.num_row_groups):
        group = meta.row_group(i)
        weight = sum(group.column(c).total_compressed_size for c in range(group.num_columns))
        units.append(Unit(index, "parquet", path, i, i + 1, weight, label, line=rows))
        rows += group.num_rows
    return units


def read_parquet(u: Unit, spec: InputSpec, stats) -> Iterator[Document]:
    """All columns of row groups [u.start, u.end); the text column is required."""
    row = u.line
    try:
        with open_input(u.path, spec.storage_options, decompress=False) as fh:
            pfile = pq.ParquetFile(fh)
            names = pfile.schema_arrow.names
            if spec.text_key not in names:
                stats.error(f"{u.path}: missing column {spec.text_key!r} (has {names})")
                return
            groups = list(range(u.start, min(u.end, pfile.num_row_groups)))
            if groups:
                yield from _rows_as_docs(pfile.iter_batches(row_groups=groups), u, spec, stats, row)
    except (pa.ArrowException, OSError) as err:
        stats.error(f"{u.path}: unreadable parquet ({one_line(err)})")


def read_csv(u: Unit, spec: InputSpec, stats) -> Iterator[Document]:
    """Rows of a UTF-8 csv with a header line; a row with more or fewer fields than the header is bad."""
    csv.field_size_limit(CSV_FIELD_LIMIT)
    line = 0
    try:
        with open_input(u.path, spec.storage_options) as raw:
            rows = csv.reader(io.TextIOWrapper(raw, encoding="utf-8", newline=""))
            header = next(rows, [])
            if spec.text_key not in header:
                stats.error(f"{u.path}: missing column {spec.text_key!r} (has {header})")
                return
            line = rows.line_num
            for fields in rows:
                first, line = line + 1, rows.line_num
                if not fields:
                    continue
                if len(fields) != len(header):
                    stats.error(f"{u.path}:{first}: {len(fields)} fields, the header has {len(header)}")
                    continue
                record = dict(zip(header, fields))
                yield record_document(record, spec.text_key, record.get(spec.id_key), u, first)
    except DECOMPRESSION_ERRORS as err:
        if not is_compressed(u.path):
            raise
        stats.error(decompress_error(u.path, line + 1, err))
    except (csv.Error, UnicodeDecodeError) as err:
        stats.error(f"{u.path}:{line + 1}: unreadable csv ({one_line(err)}); rest of file skipped")


def _split_files(fs, folder: str) -> list[str]:
    state = json.loads(fs.cat_file(f"{folder}/state.json"))
    return [f"{folder}/{entry['filename']}" for entry in state["_data_files"]]


def arrow_units(index: int, spec: InputSpec) -> list[Unit]:
    """Whole-file units of a ``save_to_disk`` folder: a ``Dataset``'s Arrow files, or every split's of a
    ``DatasetDict`` in its listed order."""
    fs, root = filesystem(spec.path, spec.storage_options)
    root = root.rstrip("/")
    if fs.isfile(f"{root}/dataset_dict.json"):
        splits = json.loads(fs.cat_file(f"{root}/dataset_dict.json"))["splits"]
        files = [f for split in splits for f in _split_files(fs, f"{root}/{split}")]
    elif fs.isfile(f"{root}/state.json"):
        files = _split_files(fs, root)
    else:
        raise ConfigError(f"input {index} (hf_dataset {spec.path}): not a datasets save_to_disk folder "
                          f"(no state.json or dataset_dict.json)")
    units = []
    for path in files:
        size = fs.size(path)
        units.append(Unit(index, "arrow", display_path(fs, path), 0, size, size, path[len(root) + 1:]))
    return units


def read_arrow(u: Unit, spec: InputSpec, stats) -> Iterator[Document]:
    """Rows of one Arrow IPC stream file as ``datasets`` writes them."""
    try:
        with open_input(u.path, spec.storage_options, decompress=False) as fh:
            reader = pa.ipc.open_stream(fh)
            if spec.text_key not in reader.schema.names:
                stats.error(f"{u.path}: missing column {spec.text_key!r} (has {reader.schema.names})")
                return
            yield from _rows_as_docs(reader, u, spec, stats, 0)
    except (pa.ArrowException, OSError) as err:
        stats.error(f"{u.path}: unreadable Arrow stream ({one_line(err)})")
