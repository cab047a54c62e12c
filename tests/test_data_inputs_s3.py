"""Inputs read from s3:// through fsspec (s3fs) against a real S3-API server the test starts (moto in server
mode on 127.0.0.1, an ephemeral port): the same documents as from local files, for every kind."""
from __future__ import annotations

import gzip
import json
import re
import uuid

import datasets
import pytest
import s3fs
from moto.moto_server.threaded_moto_server import ThreadedMotoServer

from puyu.data_pipeline import config as C
from puyu.data_pipeline.readers import InputReader
from puyu.launcher.errors import ConfigError
from test_data_inputs_kinds import _inputs, doc_pages, wiki_records



@pytest.fixture(scope="module")
def s3():
    """(filesystem, storage_options, bucket) of a fresh bucket on a moto server started for this module."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {"endpoint_url": f"http://{host}:{port}", "key": "testing", "secret": "testing"}
    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    bucket = f"crawl-{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    yield fs, options, bucket
    server.stop()


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return wiki_records()


@pytest.fixture(scope="module")
def pages() -> list[tuple[str, bytes, str]]:
    return doc_pages()


def _docs(specs: list[C.InputSpec], world_size: int = 1) -> list[tuple]:
    return [(d.id, d.text, d.metadata) for r in range(world_size) for d in InputReader(specs).run((), r, world_size)]


def test_every_kind_reads_the_same_from_s3_as_from_disk(tmp_path, s3, records, pages):
    fs, options, bucket = s3
    local = _inputs(tmp_path, records, pages)
    datasets.Dataset.from_list([{"id": r["id"], "text": r["text"], "url": r["url"]} for r in records]).save_to_disk(
        str(tmp_path / "hf"), num_shards=2)
    local["hf_dataset"] = C.InputSpec(kind="hf_dataset", path=str(tmp_path / "hf"))
    fs.put(str(tmp_path) + "/", f"{bucket}/all/", recursive=True)
    for name, spec in local.items():
        remote = C.InputSpec(kind=spec.kind, glob=spec.glob, storage_options=options,
                             path=f"s3://{bucket}/all/" + spec.path[len(str(tmp_path)) + 1:])
        for world_size in (1, 3):  # plain jsonl: byte ranges read with seeks; parquet: row groups
            assert _docs([remote], world_size) == _docs([spec], world_size), (name, world_size)
        assert len(_docs([remote])) > 10


def test_a_file_url_reads_as_its_path(tmp_path, records):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:50]))
    assert _docs([C.InputSpec(kind="jsonl", path=f"file://{tmp_path}")]) == _docs(
        [C.InputSpec(kind="jsonl", path=str(tmp_path))])


def test_a_corrupt_file_on_s3_is_named_by_its_url(s3, records):
    fs, options, bucket = s3
    payload = gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode())
    fs.pipe(f"{bucket}/bad/part-0.jsonl.gz", payload[: len(payload) // 3])
    url = f"s3://{bucket}/bad/part-0.jsonl.gz"
    with pytest.raises(ConfigError, match=f"^{re.escape(url)}:[0-9]+: corrupt or truncated gzip stream") as info:
        _docs([C.InputSpec(kind="jsonl", path=f"s3://{bucket}/bad", storage_options=options, error_rate_limit=0)])
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="no file matches '\\*\\*/\\*.parquet'"):
        _docs([C.InputSpec(kind="parquet", path=f"s3://{bucket}/bad", storage_options=options)])
