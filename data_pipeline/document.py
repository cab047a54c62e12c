"""Documents and the step interface every reader, filter, dedup pass and writer implements.

A step sees a stream of documents and yields the ones it keeps, counting what it did as it goes
(docs and bytes in/out, drops per reason, errors with file:line, seconds). Stats are plain data so a
stage can return them to the launcher, which stores them in the completion marker, and the summary
stage can add them up across ranks without re-reading any corpus.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import time
from typing import Any, Iterable, Iterator, Optional

from puyu.launcher.stage import Progress

log = logging.getLogger("puyu.data_pipeline")

MAX_ERRORS_KEPT = 50  # error messages kept per step and rank; the count is always exact


@dataclasses.dataclass
class Document:
    id: str
    text: str
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class StepStats:
    name: str
    docs_in: int = 0
    docs_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    dropped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    errors: int = 0
    error_messages: list[str] = dataclasses.field(default_factory=list)
    extra: dict[str, float] = dataclasses.field(default_factory=dict)

    def drop(self, reason: str) -> None:
        self.dropped[reason] += 1

    def error(self, message: str) -> None:
        """Count a bad input record; keep the first messages (file:line: what) for the report."""
        self.errors += 1
        if len(self.error_messages) < MAX_ERRORS_KEPT:
            self.error_messages.append(message)
        log.warning("%s: %s", self.name, message)

    def add(self, key: str, value: float) -> None:
        self.extra[key] = self.extra.get(key, 0) + value

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["dropped"] = dict(sorted(self.dropped.items()))
        out["seconds"] = round(self.seconds, 4)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "StepStats":
        data = dict(data)
        data["dropped"] = collections.Counter(data.get("dropped", {}))
        return cls(**data)

    def merge(self, other: "StepStats") -> None:
        """Add another rank's stats for the same step into these."""
        self.docs_in += other.docs_in
        self.docs_out += other.docs_out
        self.bytes_in += other.bytes_in
        self.bytes_out += other.bytes_out
        self.seconds += other.seconds
        self.dropped.update(other.dropped)
        self.errors += other.errors
        room = MAX_ERRORS_KEPT - len(self.error_messages)
        self.error_messages.extend(other.error_messages[:max(room, 0)])
        for key, value in other.extra.items():
            self.add(key, value)


def utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


class Step:
    """A stage building block: ``run(docs, rank, world_size)`` yields the documents it keeps.

    Subclasses override :meth:`process` (one document in, the document or ``None`` out, with the
    drop reason recorded via ``self.stats.drop``) or, for sources and sinks, :meth:`run` itself.
    """

    name = "step"

    def __init__(self) -> None:
        self.stats = StepStats(self.name)

    def process(self, doc: Document) -> Document | None:
        raise NotImplementedError

    def run(self, docs: Iterable[Document], rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        stats = self.stats
        for doc in docs:
            stats.docs_in += 1
            stats.bytes_in += utf8_len(doc.text)
            start = time.perf_counter()
            out = self.process(doc)
            stats.seconds += time.perf_counter() - start
            if out is not None:
                stats.docs_out += 1
                stats.bytes_out += utf8_len(out.text)
                yield out


def run_steps(steps: list[Step], rank: int = 0, world_size: int = 1, progress: Optional[Progress] = None
              ) -> list[StepStats]:
    """Chain the steps (the first is a source and gets no input), drain the stream, return stats.

    ``progress`` (the task's counter) counts the documents that come out of the last step."""
    stream: Iterable[Document] = iter(())
    for step in steps:
        stream = step.run(stream, rank, world_size)
    count = 0
    start = time.perf_counter()
    for count, _ in enumerate(stream, 1):
        if progress is not None:
            progress.update()
    if progress is not None:
        progress.close()
    log.info("rank %d: done, %d documents out (%.1fs)", rank, count, time.perf_counter() - start)
    return [step.stats for step in steps]
