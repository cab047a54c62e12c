"""The read_filter stage's chain of steps, built from ``filters.chain``, and the URL, bad-words and PII steps.

A chain entry is a registered name (``REGISTRY``) or ``{_target_: package.module.Class, ...keywords}``:
a user step, instantiated in each task with the keywords. A user class that is a puyu
:class:`Step` counts its own stats; any other class only needs datatrove's
``run(docs, rank, world_size)`` yielding the documents it keeps (our :class:`Document` has the
``id``/``text``/``metadata`` datatrove steps use), and :class:`UserStep` counts documents and bytes in
and out around it, so it shows in the summary like the built-in steps. Everything is checked by
:func:`validate_chain` before submission, so a typo fails on the login node, not in every task.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import ipaddress
import re
import time
from typing import Any, Callable, Iterable, Iterator, Optional
from urllib.parse import urlsplit

import fsspec

from puyu.data_pipeline import config as C
from puyu.data_pipeline import filters as F
from puyu.data_pipeline import language
from puyu.data_pipeline.document import Document, Step, utf8_len
from puyu.launcher.errors import ConfigError

EMAIL_RE = re.compile(r"\b[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}\b")
IPV4_RE = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.])")
TARGET = "_target_"


def _list_file(path: str) -> list[str]:
    """Non-empty, non-comment lines of a local file or fsspec URL."""
    with fsspec.open(path, "rt", encoding="utf-8") as fh:
        return [ln.strip() for ln in fh if ln.strip() and not ln.lstrip().startswith("#")]


class URLFilter(F.Filter):
    name = "url"

    def __init__(self, cfg: C.UrlFilterConfig, sink: Optional[F.ExclusionSink] = None) -> None:
        super().__init__(sink)
        self.field = cfg.field
        domains = [d.lower().lstrip(".") for d in cfg.blocked_domains]
        if cfg.blocklist_file:
            domains += [d.lower().lstrip(".") for d in _list_file(cfg.blocklist_file)]
        self.domains = frozenset(domains)
        self.substrings = [s.lower() for s in cfg.blocked_substrings]

    def check(self, doc: Document) -> Optional[str]:
        url = doc.metadata.get(self.field)
        if not url or not (self.domains or self.substrings):
            return None
        url = str(url).lower()
        host = urlsplit(url if "//" in url else "//" + url).hostname or ""
        parts = host.split(".")
        if any(".".join(parts[i:]) in self.domains for i in range(len(parts))):
            return "blocked_domain"
        if any(s in url for s in self.substrings):
            return "blocked_substring"
        return None


class BadWordsFilter(F.Filter):
    name = "bad_words"

    def __init__(self, cfg: C.BadWordsConfig, sink: Optional[F.ExclusionSink] = None) -> None:
        super().__init__(sink)
        words = [w.strip().lower() for w in cfg.words] + ([w.lower() for w in _list_file(cfg.file)] if cfg.file else [])
        unspaced = re.compile(f"[{language.UNSPACED}]")
        # whole words where words have spaces around them; a CJK word is matched anywhere
        alternatives = [re.escape(w) if unspaced.search(w) else rf"(?<!\w){re.escape(w)}(?!\w)"
                        for w in sorted(set(words), key=len, reverse=True) if w]
        self.pattern = re.compile("|".join(alternatives), re.IGNORECASE) if alternatives else None
        self.min_hits = cfg.min_hits

    def check(self, doc: Document) -> Optional[str]:
        if self.pattern is None:
            return None
        hits = 0
        for _ in self.pattern.finditer(doc.text):
            hits += 1
            if hits >= self.min_hits:
                return "bad_words"
        return None


class PIIFormatter(Step):
    """E-mail and IPv4 addresses -> placeholders; counts replacements under ``extra``."""

    name = "pii"

    def __init__(self, cfg: C.PIIConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def _ip(self, match: re.Match) -> str:
        try:
            address = ipaddress.IPv4Address(match.group())
        except ipaddress.AddressValueError:  # 999.1.2.3: not an address
            return match.group()
        if self.cfg.only_public_ips and not address.is_global:
            return match.group()
        self.stats.add("ips_replaced", 1)
        return self.cfg.ip_placeholder

    def process(self, doc: Document) -> Document:
        text, emails = EMAIL_RE.subn(self.cfg.email_placeholder, doc.text)
        if emails:
            self.stats.add("emails_replaced", emails)
        doc.text = IPV4_RE.sub(self._ip, text)
        return doc


class UserStep(Step):
    """A datatrove-style step (``run(docs, rank, world_size)``) with puyu's stats counted around it.

    ``seconds`` is the time spent inside the user's generator; documents it did not yield are counted as
    dropped under ``removed`` (it gives no reason).
    """

    def __init__(self, inner: Any, name: str) -> None:
        self.name = name
        super().__init__()
        self.inner = inner

    def _counted(self, docs: Iterable[Document]) -> Iterator[Document]:
        for doc in docs:
            self.stats.docs_in += 1
            self.stats.bytes_in += utf8_len(doc.text)
            yield doc

    def run(self, docs: Iterable[Document], rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        stream = iter(self.inner.run(self._counted(docs), rank, world_size))
        while True:
            start = time.perf_counter()
            try:
                doc = next(stream)
            except StopIteration:
                break
            finally:
                self.stats.seconds += time.perf_counter() - start
            self.stats.docs_out += 1
            self.stats.bytes_out += utf8_len(doc.text)
            yield doc
        self.stats.dropped["removed"] = self.stats.docs_in - self.stats.docs_out


# name -> builder(its settings: the FilterConfig field of that name, exclusion sink)
REGISTRY: dict[str, Callable[[Any, Optional[F.ExclusionSink]], Step]] = {
    "normalize": lambda cfg, sink: F.Normalize(cfg),
    "length": F.LengthFilter,
    "url": URLFilter,
    "language": F.LanguageFilter,
    "bad_words": BadWordsFilter,
    "gopher_repetition": F.GopherRepetitionFilter,
    "gopher_quality": F.GopherQualityFilter,
    "c4": F.C4Filter,
    "fineweb": F.FineWebFilter,
    "pii": lambda cfg, sink: PIIFormatter(cfg),
}


def _import(path: str, key: str) -> type:
    module, _, attr = str(path).rpartition(".")
    if not module:
        raise ConfigError(f"data job: {key}.{TARGET} {path!r} is not an import path (package.module.Class)")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"data job: {key}.{TARGET} {path!r} cannot be imported: {exc}") from exc


def _user_step(entry: dict, key: str) -> tuple[str, Callable[[], Step]]:
    """(step name, a factory) for a ``_target_`` entry, its class and keywords checked without instantiating."""
    kwargs = {k: v for k, v in entry.items() if k != TARGET}
    cls = _import(entry[TARGET], key)
    if not callable(getattr(cls, "run", None)):
        raise ConfigError(f"data job: {key}.{TARGET} {entry[TARGET]!r} has no run(docs, rank, world_size) method")
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"data job: {key}: {entry[TARGET]} does not take these keywords: {exc}") from exc
    except ValueError:  # no signature to inspect (a builtin): let the call decide
        pass
    name = getattr(cls, "name", None) if isinstance(getattr(cls, "name", None), str) else None
    name = name if name and name != Step.name else cls.__name__

    def make() -> Step:
        obj = cls(**kwargs)
        return obj if isinstance(obj, Step) else UserStep(obj, name)
    return name, make


def _entries(cfg: C.FilterConfig) -> list[tuple[str, Callable[[Optional[F.ExclusionSink]], Step]]]:
    """(name, factory taking the exclusion sink) per enabled chain entry, in order; raises ConfigError."""
    out = []
    for i, entry in enumerate(cfg.chain):
        key = f"filters.chain[{i}]"
        if isinstance(entry, str):
            if entry not in REGISTRY:
                raise ConfigError(f"data job: {key} {entry!r} is not a registered step ({', '.join(REGISTRY)}) "
                                  f"nor a {{{TARGET}: package.module.Class}} mapping")
            step_cfg = getattr(cfg, entry)
            if getattr(step_cfg, "enabled", True):
                out.append((entry, functools.partial(REGISTRY[entry], step_cfg)))
        elif isinstance(entry, dict) and TARGET in entry:
            name, make = _user_step(entry, key)
            out.append((name, lambda sink, make=make: make()))
        else:
            raise ConfigError(f"data job: {key} must be a step name or a mapping with {TARGET}, got {entry!r}")
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ConfigError(f"data job: filters.chain has step {dup!r} twice; each step's stats are kept under its name")
    return out


def validate_chain(cfg: C.FilterConfig) -> None:
    """Every setting of the chain that can be checked before submission."""
    _entries(cfg)
    if "language" in cfg.chain and cfg.language.enabled:
        language.validate(cfg.language)
    for name in ("gopher_quality", "c4", "fineweb"):
        language.check_codes(getattr(cfg, name).languages, f"filters.{name}.languages")
    language.check_codes(cfg.gopher_repetition.ngram_skip_languages, "filters.gopher_repetition.ngram_skip_languages")
    for key, path in (("filters.url.blocklist_file", cfg.url.blocklist_file), ("filters.bad_words.file", cfg.bad_words.file)):
        if path:
            try:
                _list_file(path)
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"data job: {key} {path!r} cannot be read: {exc}") from exc
    if cfg.bad_words.min_hits < 1:
        raise ConfigError(f"data job: filters.bad_words.min_hits must be >= 1, got {cfg.bad_words.min_hits}")


def build_chain(cfg: C.FilterConfig, sink: Optional[F.ExclusionSink] = None) -> list[Step]:
    """The steps of ``cfg.chain`` (datatrove's usual order by default: cheapest and broadest first)."""
    return [make(sink) for _, make in _entries(cfg)]
