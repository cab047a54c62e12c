"""Stage names and where each stage leaves its outputs under the run directory.

Stage i+1 reads stage i's outputs from ``<run_dir>/<stage i name>/``. Sharded outputs are named
by a five-digit file number, which is the rank that wrote them; a later stage with the same number
of shards therefore reads the file of its own rank.
"""
from __future__ import annotations

import re
from pathlib import Path

READ_FILTER = "read_filter"
SIGNATURES = "minhash_signatures"
BUCKETS = "minhash_buckets"
CLUSTERS = "minhash_clusters"
DEDUP = "minhash_filter"
TOKENIZER = "tokenizer"
TOKENIZE = "tokenize"
SUMMARY = "summary"

_NUMBERED = re.compile(r"^(\d{5})[._]")


def numbered_files(folder: Path, suffix: str) -> list[tuple[int, Path]]:
    """(number, path) of ``NNNNN<suffix>`` files in ``folder``, by number."""
    found = []
    for path in sorted(Path(folder).glob(f"*{suffix}")):
        match = _NUMBERED.match(path.name)
        if match and path.name == f"{match.group(1)}{suffix}":
            found.append((int(match.group(1)), path))
    return found


def owned(items: list, rank: int, world_size: int) -> list:
    """Round-robin share of ``items`` for one rank."""
    return items[rank::world_size]
