"""Normalization, language ID and quality filters (Gopher, C4, FineWeb, length).

Each rule follows the published recipe as implemented in datatrove, with thresholds in
:mod:`puyu.data_pipeline.config`. Word-based rules (Gopher quality, C4, FineWeb) carry English
thresholds (stop words, word lengths), so they judge documents whose ``lang`` is in their
``languages`` (default ``[en]``) and pass others through (counted under ``extra.skipped_lang``); the
repetition rules work on lines, paragraphs and words (a CJK or Thai character is a word, see
:mod:`puyu.data_pipeline.language`) and apply to every document. A dropped document is counted under
``<step>/<reason>`` and, if an exclusion sink is attached, written there with its reason.
"""
from __future__ import annotations

import re
import unicodedata
from typing import Optional

from puyu.data_pipeline import config as C
from puyu.data_pipeline import language, repetition
from puyu.data_pipeline.document import Document, Step
from puyu.data_pipeline.language import words_of

SENTENCE_END_RE = re.compile(r"[.!?]+[\"')\]]*(?=\s|$)")
CITATION_RE = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b\ufeff]")
SPACES_RE = re.compile(r"[ \t\u00a0\u3000]+")
PARAGRAPH_RE = re.compile(r"\n{2,}")
LINES_RE = re.compile(r"\n+")
STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
END_PUNCTUATION = (".", "?", "!", '"', "'", "。", "！", "？", "…")
POLICY_SUBSTRINGS = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies",
                     "use cookies")
PUNCTUATION = frozenset("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~…·•—–‘’“”«»")


class ExclusionSink:
    """Where filters send dropped documents (anything with ``write(doc, reason)``)."""

    def write(self, doc: Document, reason: str) -> None:  # pragma: no cover - interface
        raise NotImplementedError


class Filter(Step):
    """A step that keeps or drops each document; ``check`` returns the drop reason or ``None``."""

    def __init__(self, sink: Optional[ExclusionSink] = None) -> None:
        super().__init__()
        self.sink = sink

    def check(self, doc: Document) -> Optional[str]:
        raise NotImplementedError

    def process(self, doc: Document) -> Optional[Document]:
        reason = self.check(doc)
        if reason is None:
            return doc
        self.stats.drop(reason)
        if self.sink is not None:
            self.sink.write(doc, f"{self.name}/{reason}")
        return None


class Normalize(Step):
    """Unicode normal form, no control characters, single spaces, at most N blank lines in a row."""

    name = "normalize"

    def __init__(self, cfg: C.NormalizeConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.blank_run = re.compile(r"\n{%d,}" % (cfg.max_blank_lines + 2))

    def process(self, doc: Document) -> Document:
        text = doc.text.replace("\r\n", "\n").replace("\r", "\n")
        if self.cfg.unicode_form:
            text = unicodedata.normalize(self.cfg.unicode_form, text)
        if self.cfg.strip_control_chars:
            text = CONTROL_RE.sub("", text)
        if self.cfg.collapse_spaces:
            text = "\n".join(SPACES_RE.sub(" ", line).strip() for line in text.split("\n"))
        text = self.blank_run.sub("\n" * (self.cfg.max_blank_lines + 1), text).strip()
        doc.text = text
        return doc


class LengthFilter(Filter):
    name = "length"

    def __init__(self, cfg: C.LengthConfig, sink: Optional[ExclusionSink] = None) -> None:
        super().__init__(sink)
        self.cfg = cfg

    def check(self, doc: Document) -> Optional[str]:
        if len(doc.text) < self.cfg.min_chars:
            return "too_short"
        if self.cfg.max_chars and len(doc.text) > self.cfg.max_chars:
            return "too_long"
        return None


class LanguageFilter(Filter):
    """Tags ``lang``/``lang_score`` in the metadata, counts documents per language, drops unkept ones."""

    name = "language"

    def __init__(self, cfg: C.LanguageConfig, sink: Optional[ExclusionSink] = None) -> None:
        super().__init__(sink)
        self.cfg = cfg
        self.keep = {c.lower() for c in cfg.keep}

    def check(self, doc: Document) -> Optional[str]:
        lang, score = language.identify(doc.text, self.cfg)
        doc.metadata["lang"], doc.metadata["lang_score"] = lang, score
        self.stats.add(f"lang_{lang}", 1)
        if self.keep and lang not in self.keep:
            return f"lang_{lang}"
        if score < self.cfg.min_score:
            return "low_score"
        return None


class LanguageScopedFilter(Filter):
    """Base of the word-based rules: a document tagged with a language outside ``cfg.languages`` passes
    untouched (counted); one without a tag (no language step in the chain) is judged."""

    def process(self, doc: Document) -> Optional[Document]:
        lang = doc.metadata.get("lang")
        if lang is not None and lang not in self.cfg.languages:
            self.stats.add("skipped_lang", 1)
            return doc
        return super().process(doc)


class GopherQualityFilter(LanguageScopedFilter):
    name = "gopher_quality"

    def __init__(self, cfg: C.GopherQualityConfig, sink: Optional[ExclusionSink] = None) -> None:
        super().__init__(sink)
        self.cfg = cfg

    def check(self, doc: Document) -> Optional[str]:
        cfg, text = self.cfg, doc.text
        words = words_of(text)
        n_words = len(words)
        non_symbol = [w for w in words if any(ch not in PUNCTUATION for ch in w)]
        if not non_symbol or len(non_symbol) < cfg.min_doc_words:
            return "short_doc"
        if len(non_symbol) > cfg.max_doc_words:
            return "long_doc"
        avg = sum(len(w) for w in non_symbol) / len(non_symbol)
        if avg < cfg.min_avg_word_length:
            return "below_avg_word_length"
        if avg > cfg.max_avg_word_length:
            return "above_avg_word_length"
        if text.count("#") / n_words > cfg.max_symbol_word_ratio:
            return "too_many_hashes"
        if (text.count("...") + text.count("…")) / n_words > cfg.max_symbol_word_ratio:
            return "too_many_ellipsis"
        lines = text.splitlines()
        if sum(line.lstrip().startswith(("•", "-")) for line in lines) / len(lines) > cfg.max_bullet_lines_ratio:
            return "too_many_bullets"
        if sum(line.rstrip().endswith(("...", "…")) for line in lines) / len(lines) > cfg.max_ellipsis_lines_ratio:
            return "too_many_end_ellipsis"
        spaced = text.split()  # the paper's "words" here are whitespace-separated
        if sum(any(c.isalpha() for c in w) for w in spaced) / len(spaced) < cfg.max_non_alpha_words_ratio:
            return "below_alpha_threshold"
        if sum(w.lower() in STOP_WORDS for w in words) < cfg.min_stop_words:
            return "few_stop_words"
        return None


def _duplicates(items: list[str]) -> tuple[int, int]:
    """(number of items seen before, their characters)."""
    seen: set[str] = set()
    count = chars = 0
    for item in items:
        if item in seen:
            count += 1
            chars += len(item)
        else:
            seen.add(item)
    return count, chars


class GopherRepetitionFilter(Filter):
    name = "gopher_repetition"

    def __init__(self, cfg: C.GopherRepetitionConfig, sink: Optional[ExclusionSink] = None) -> None:
        super().__init__(sink)
        self.cfg = cfg

    def check(self, doc: Document) -> Optional[str]:
        cfg, text = self.cfg, doc.text
        if not text:
            return None
        paragraphs = PARAGRAPH_RE.split(text.strip())
        count, chars = _duplicates(paragraphs)
        if count / len(paragraphs) > cfg.dup_para_frac:
            return "dup_para_frac"
        if chars / len(text) > cfg.dup_para_char_frac:
            return "dup_para_char_frac"
        lines = LINES_RE.split(text)
        count, chars = _duplicates(lines)
        if count / len(lines) > cfg.dup_line_frac:
            return "dup_line_frac"
        if chars / len(text) > cfg.dup_line_char_frac:
            return "dup_line_char_frac"
        if doc.metadata.get("lang") in cfg.ngram_skip_languages:
            self.stats.add("ngrams_skipped_lang", 1)
            return None
        ids, lengths = repetition.encode_words(words_of(text))
        for n, frac in sorted(cfg.top_n_grams.items(), key=lambda kv: int(kv[0])):
            if repetition.top_ngram_chars(ids, lengths, int(n)) / len(text) > frac:
                return f"top_{n}_gram"
        for n, frac in sorted(cfg.dup_n_grams.items(), key=lambda kv: int(kv[0])):
            if repetition.repeated_ngram_chars(ids, lengths, int(n)) / len(text) > frac:
                return f"duplicated_{n}_n_grams"
        return None


class C4Filter(LanguageScopedFilter):
    """C4 line rules: drops bad lines (rewriting the text) and documents left with too few sentences."""

    name = "c4"

    def __init__(self, cfg: C.C4Config, sink: Optional[ExclusionSink] = None) -> None:
        super().__init__(sink)
        self.cfg = cfg

    def check(self, doc: Document) -> Optional[str]:
        cfg = self.cfg
        lines = doc.text.splitlines() if cfg.split_paragraph else SENTENCE_END_RE.split(doc.text)
        kept, sentences = [], 0
        for line in lines:
            line = line.strip()
            words = line.split()
            if cfg.max_word_length != -1 and any(len(w) > cfg.max_word_length for w in words):
                self.stats.add("lines_too_long_word", 1)
                continue
            if cfg.remove_citations:
                line = CITATION_RE.sub("", line)
            if cfg.filter_no_terminal_punct and (not line.endswith(END_PUNCTUATION) or line.endswith("...")):
                self.stats.add("lines_no_terminal_punct", 1)
                continue
            if len(words) < cfg.min_words_per_line:
                self.stats.add("lines_few_words", 1)
                continue
            lowered = line.lower()
            if cfg.filter_lorem_ipsum and "lorem ipsum" in lowered:
                return "lorem_ipsum"
            if cfg.filter_javascript and "javascript" in lowered:
                self.stats.add("lines_javascript", 1)
                continue
            if cfg.filter_curly_bracket and "{" in line:
                return "curly_bracket"
            if cfg.filter_policy and any(p in lowered for p in POLICY_SUBSTRINGS):
                self.stats.add("lines_policy", 1)
                continue
            sentences += max(1, len(SENTENCE_END_RE.findall(line))) if cfg.split_paragraph else 1
            kept.append(line)
        if cfg.min_num_sentences != -1 and sentences < cfg.min_num_sentences:
            return "too_few_sentences"
        doc.text = ("\n" if cfg.split_paragraph else " ").join(kept).strip()
        return None


class FineWebFilter(LanguageScopedFilter):
    name = "fineweb"

    def __init__(self, cfg: C.FineWebConfig, sink: Optional[ExclusionSink] = None) -> None:
        super().__init__(sink)
        self.cfg = cfg

    def check(self, doc: Document) -> Optional[str]:
        cfg, text = self.cfg, doc.text
        lines = [line for line in text.split("\n") if line.strip()]
        if not lines:
            return "empty"
        ratio = sum(line.endswith(END_PUNCTUATION) for line in lines) / len(lines)
        if ratio < cfg.line_punct_thr and not (ratio == 0 and cfg.line_punct_exclude_zero):
            return "line_punct_ratio"
        if sum(len(line) <= cfg.short_line_length for line in lines) / len(lines) > cfg.short_line_thr:
            return "short_line_ratio"
        if _duplicates(lines)[1] / max(len(text.replace("\n", "")), 1) > cfg.char_duplicates_ratio:
            return "char_dup_ratio"
        if text.count("\n") / max(len(words_of(text)), 1) > cfg.new_line_ratio:
            return "list_ratio"
        return None
