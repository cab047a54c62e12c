"""``search``: an agent's search over a corpus the data stage wrote -- in the pipeline, the run's own.

Why its own index rather than a search service: an agent job runs as a batch task on a node that may reach
nothing, and the corpus it should look things up in is the one the run built (deduplicated, filtered),
sitting in the run directory. The index is BM25 (Robertson et al.; k1 = 1.5, b = 0.75, as Lucene's
defaults) over lower-cased word tokens, built in memory on the first call of a task (a few seconds for
the demo's ~10k documents) and shared by all its episodes. A hit is shown as the document's title (or
id) and a window of its text around the first query word it holds, so the observation stays short.
"""
from __future__ import annotations

import collections
import math
import re
import threading
from pathlib import Path
from typing import ClassVar

from puyu.agents.actions import Action, ActionError

WORD = re.compile(r"\w+")
K1, B = 1.5, 0.75
SNIPPET_CHARS = 240
MAX_QUERY_WORDS = 32


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


class BM25Index:
    """Documents as (title, text); ``search(query, k)`` -> the k best (score, title, text)."""

    def __init__(self, docs: list[tuple[str, str]]):
        self.docs = docs
        self.postings: dict[str, list[tuple[int, int]]] = collections.defaultdict(list)
        self.lengths = []
        for i, (_, text) in enumerate(docs):
            counts = collections.Counter(words(text))
            self.lengths.append(sum(counts.values()))
            for word, tf in counts.items():
                self.postings[word].append((i, tf))
        self.mean_length = sum(self.lengths) / max(1, len(self.lengths))

    def search(self, query: str, k: int) -> list[tuple[float, str, str]]:
        scores: dict[int, float] = collections.defaultdict(float)
        n = len(self.docs)
        for word in dict.fromkeys(words(query)[:MAX_QUERY_WORDS]):
            hits = self.postings.get(word, ())
            idf = math.log(1 + (n - len(hits) + 0.5) / (len(hits) + 0.5))
            for i, tf in hits:
                norm = K1 * (1 - B + B * self.lengths[i] / self.mean_length)
                scores[i] += idf * tf * (K1 + 1) / (tf + norm)
        best = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
        return [(score, *self.docs[i]) for i, score in best]


def snippet(text: str, query: str) -> str:
    """About SNIPPET_CHARS of ``text`` around the first query word it contains, on one line."""
    lowered = text.lower()
    found = [m.start() for w in words(query) for m in [re.search(rf"\b{re.escape(w)}\b", lowered)] if m]
    start = max(0, min(found, default=0) - SNIPPET_CHARS // 3)
    body = " ".join(text[start:start + SNIPPET_CHARS].split())
    return ("..." if start else "") + body + ("..." if start + SNIPPET_CHARS < len(text) else "")


def read_corpus(path: Path) -> list[tuple[str, str]]:
    """(title, text) of every document in the data stage's files under ``path`` (a folder or one file)."""
    from puyu.data_pipeline.writers import read_docs

    files = sorted(f for f in path.iterdir() if f.is_file()) if path.is_dir() else [path]
    return [(str(d.metadata.get("title") or d.id), d.text) for f in files for d in read_docs(f)]


class CorpusSearch(Action):
    """BM25 search over the documents under ``corpus`` (module doc); ``k`` hits per query."""

    name = "search"
    description = "Searches the corpus for documents about a query and returns the best matches with an excerpt."
    parameters: ClassVar[dict] = {"type": "object", "properties": {"query": {"type": "string"}},
                                  "required": ["query"]}

    def __init__(self, corpus: str, k: int = 3):
        self.path, self.k = Path(corpus), k
        if not self.path.exists():
            raise ValueError(f"search: corpus {corpus} not found (job.corpus)")
        self._index: BM25Index | None = None
        self._lock = threading.Lock()

    def index(self) -> BM25Index:
        with self._lock:  # episodes' calls run on several threads: one builds, the others wait
            if self._index is None:
                docs = read_corpus(self.path)
                if not docs:
                    raise ActionError(f"search: no documents in {self.path}")
                self._index = BM25Index(docs)
            return self._index

    def run(self, query: str) -> str:
        if not words(query):
            raise ActionError("search: the query holds no words")
        hits = self.index().search(query, self.k)
        if not hits:
            return f"no document matches {query!r}"
        return "\n".join(f"{n}. {title}: {snippet(text, query)}" for n, (_, title, text) in enumerate(hits, 1))
