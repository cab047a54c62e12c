"""Filters: each rule fires on the case it is for, names its reason, and leaves good text alone."""
from __future__ import annotations

import collections
import itertools
import json

import pytest

from puyu.data_pipeline import config as C
from puyu.data_pipeline import corpora, repetition
from puyu.data_pipeline import filters as F
from puyu.data_pipeline.steps import build_chain
from puyu.data_pipeline.document import Document

GOOD = ("The river flows through the old town and past the mill. It has been the heart of the valley "
        "for centuries, and the people who live along its banks depend on it for water and trade. "
        "Farmers bring their goods to the market by boat, and children learn to swim in its shallow "
        "bends during the summer. In spring the water rises with the melting snow from the mountains. "
        "The town council maintains the stone bridges that connect the two halves of the settlement.")


def doc(text: str, **meta) -> Document:
    return Document("d", text, dict(meta))


def reason(step, text: str, **meta):
    d = doc(text, **meta)
    return step.check(d), d


def test_good_english_passes_every_filter():
    cfg = C.FilterConfig()
    steps = build_chain(cfg)
    out = list(steps[-1].run(_chain(steps[:-1], [doc(GOOD)])))
    assert len(out) == 1 and out[0].metadata["lang"] == "en"
    assert all(sum(s.stats.dropped.values()) == 0 for s in steps)


def _chain(steps, docs):
    for step in steps:
        docs = step.run(docs)
    return docs


def test_normalize():
    step = F.Normalize(C.NormalizeConfig())
    out = step.process(doc("Ｃａｆé\u0301\r\n\n\n\n\nline\t\t two\x00  \u200b"))
    assert out.text == "Ｃａｆé́\n\n\nline two"
    assert F.Normalize(C.NormalizeConfig(unicode_form="NFKC")).process(doc("Ｃａｆｅ")).text == "Cafe"


def test_length_bounds():
    step = F.LengthFilter(C.LengthConfig(min_chars=10, max_chars=20))
    assert reason(step, "short")[0] == "too_short"
    assert reason(step, "x" * 21)[0] == "too_long"
    assert reason(step, "just right")[0] is None


def test_gopher_quality_rules():
    step = F.GopherQualityFilter(C.GopherQualityConfig())
    assert reason(step, "the cat and the dog " * 5)[0] == "short_doc"
    assert reason(step, GOOD + " #tag" * 30)[0] == "too_many_hashes"
    assert reason(step, " ".join(["xylophone quartz zephyr"] * 40))[0] == "few_stop_words"
    assert reason(step, GOOD + " 1234 5678" * 60)[0] == "below_alpha_threshold"
    assert reason(step, "\n".join(["- the item and that one with it"] * 20))[0] == "too_many_bullets"
    assert reason(step, GOOD)[0] is None


def test_gopher_repetition_rules():
    step = F.GopherRepetitionFilter(C.GopherRepetitionConfig())
    assert reason(step, "\n\n".join(["same paragraph here"] * 5 + ["other one"]))[0] == "dup_para_frac"
    assert reason(step, "\n".join(["buy now"] * 4 + ["a", "b", "c", "d", "e"]))[0] == "dup_line_frac"
    assert reason(step, GOOD + " big sale " * 40)[0] == "top_2_gram"
    assert reason(step, GOOD)[0] is None


def test_c4_line_rules():
    step = F.C4Filter(C.C4Config())
    assert reason(step, GOOD + "\nfunction() { return 1; }.")[0] == "curly_bracket"
    assert reason(step, GOOD + "\nLorem ipsum dolor sit amet.")[0] == "lorem_ipsum"
    assert reason(step, "One short sentence here.")[0] == "too_few_sentences"
    kept_reason, d = reason(step, GOOD + "\nMenu Home About\nEnable JavaScript to see this page.\n"
                                         "Read our privacy policy for details.")
    assert kept_reason is None and d.text == GOOD  # lines without end punctuation, js and policy lines removed


def test_fineweb_rules():
    step = F.FineWebFilter(C.FineWebConfig())
    assert reason(step, "\n".join(["a line without end"] * 3 + ["x"]))[0] == "line_punct_ratio"
    assert reason(step, "\n".join(f"Item {i}." for i in range(20)))[0] == "short_line_ratio"
    assert reason(step, GOOD)[0] is None


def test_dropped_docs_go_to_the_exclusion_sink_with_reason():
    class Sink(F.ExclusionSink):
        def __init__(self):
            self.got = []

        def write(self, doc, why):
            self.got.append((doc.id, why))

    sink = Sink()
    step = F.LengthFilter(C.LengthConfig(min_chars=100), sink)
    assert list(step.run([doc("tiny")])) == []
    assert sink.got == [("d", "length/too_short")] and step.stats.dropped["too_short"] == 1


def _top_ngram_chars_reference(words: list[str], n: int) -> int:
    counts = collections.Counter(" ".join(words[i:i + n]) for i in range(len(words) - n + 1))
    if not counts:
        return 0
    gram, count = counts.most_common(1)[0]
    return len(gram) * count if count > 1 else 0


def _repeated_ngram_chars_reference(words: list[str], n: int) -> int:
    seen: set[tuple[str, ...]] = set()
    chars, i = 0, 0
    while i < len(words) - n + 1:
        gram = tuple(words[i:i + n])
        if gram in seen:
            chars += sum(map(len, gram))
            i += n
        else:
            seen.add(gram)
            i += 1
    return chars


def test_compiled_ngram_statistics_equal_the_string_versions():
    texts = [GOOD, GOOD + " big sale " * 40, "a b a b a b c", "", "x", "one two one two three one two"]
    try:
        texts += [a["extract"] for a in itertools.islice(
            json.loads(corpora.wiki_summaries_file().read_text()).values(), 300)]
    except corpora.CorpusMissing:
        pass  # the synthetic cases still run
    for text in texts:
        words = F.words_of(text)
        ids, lengths = repetition.encode_words(words)
        for n in (2, 3, 4):
            assert repetition.top_ngram_chars(ids, lengths, n) == _top_ngram_chars_reference(words, n), (text, n)
        for n in range(5, 11):
            assert repetition.repeated_ngram_chars(ids, lengths, n) == _repeated_ngram_chars_reference(words, n)
