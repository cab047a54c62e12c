"""The filter chain from config: registered names, a user step by import path, URL, bad-words and PII steps."""
from __future__ import annotations

import json

import pytest

from jobs_for_tests import run_inline
from puyu.data_pipeline import config as C
from puyu.data_pipeline import job, layout
from puyu.data_pipeline import steps as S
from puyu.data_pipeline.document import Document
from puyu.data_pipeline.writers import read_docs
from puyu.launcher.errors import ConfigError


class KeepEvenIds:
    """A datatrove-style step (no puyu base class): keeps documents with an even numeric id, tags them."""

    def __init__(self, tag: str = "even"):
        self.tag = tag

    def run(self, data, rank: int = 0, world_size: int = 1):
        for doc in data:
            if int(doc.id) % 2 == 0:
                doc.metadata["tag"] = self.tag
                yield doc


def doc(text: str, **meta) -> Document:
    return Document("d", text, dict(meta))


def test_default_chain_order_and_disabled_rules():
    cfg = C.FilterConfig()
    cfg.c4.enabled = False
    assert [s.name for s in S.build_chain(cfg)] == ["normalize", "length", "url", "language", "gopher_repetition",
                                                     "gopher_quality", "fineweb", "pii"]


@pytest.mark.parametrize("chain,match", [
    (["normalize", "lenght"], r"filters\.chain\[1\] 'lenght' is not a registered step"),
    ([{"_target_": "nowhere.Step"}], r"filters\.chain\[0\]\._target_ 'nowhere\.Step' cannot be imported"),
    ([{"_target_": "json.dumps"}], r"filters\.chain\[0\]\._target_ 'json\.dumps' has no run"),
    ([{"_target_": f"{__name__}.KeepEvenIds", "colour": 1}], r"filters\.chain\[0\]: .*KeepEvenIds does not take"),
    (["pii", "pii"], r"filters\.chain has step 'pii' twice"),
    ([3], r"filters\.chain\[0\] must be a step name"),
])
def test_bad_chain_entries_name_the_key(chain, match):
    cfg = C.FilterConfig(chain=chain)
    with pytest.raises(ConfigError, match=match) as info:
        S.validate_chain(cfg)
    assert "\n" not in str(info.value)


def test_url_filter(tmp_path):
    blocklist = tmp_path / "domains.txt"
    blocklist.write_text("# spam\nspam.example\n")
    step = S.URLFilter(C.UrlFilterConfig(blocked_domains=["bad.org"], blocked_substrings=["/ads/"],
                                         blocklist_file=str(blocklist)))
    assert step.check(doc("t", url="https://www.bad.org/page")) == "blocked_domain"
    assert step.check(doc("t", url="http://SPAM.example:8080/x")) == "blocked_domain"
    assert step.check(doc("t", url="https://notbad.org/")) is None  # a suffix of the name is not the domain
    assert step.check(doc("t", url="https://news.example/ads/1")) == "blocked_substring"
    assert step.check(doc("t")) is None


def test_bad_words_whole_words_and_cjk_substrings(tmp_path):
    words = tmp_path / "words.txt"
    words.write_text("赌博\n")
    step = S.BadWordsFilter(C.BadWordsConfig(words=["Darn"], file=str(words)))
    assert step.check(doc("well, darn it")) == "bad_words"
    assert step.check(doc("darning socks")) is None
    assert step.check(doc("网上赌博网站")) == "bad_words"
    two = S.BadWordsFilter(C.BadWordsConfig(words=["darn"], min_hits=2))
    assert two.check(doc("darn")) is None and two.check(doc("darn, darn")) == "bad_words"


def test_pii_formatter():
    step = S.PIIFormatter(C.PIIConfig())
    out = step.process(doc("mail jane.doe+x@mail.example.org or 8.8.8.8; not 192.168.1.1, 127.0.0.1, 999.1.2.3, v1.2.3.4.5"))
    assert out.text == "mail email@example.com or 0.0.0.0; not 192.168.1.1, 127.0.0.1, 999.1.2.3, v1.2.3.4.5"
    assert step.stats.extra == {"emails_replaced": 1, "ips_replaced": 1}


def test_user_step_by_import_path_counts_its_stats():
    cfg = C.FilterConfig(chain=["normalize", {"_target_": f"{__name__}.KeepEvenIds", "tag": "kept"}])
    chain = S.build_chain(cfg)
    stream = [Document(str(i), f"text {i}") for i in range(5)]
    for step in chain:
        stream = step.run(stream)
    out = list(stream)
    assert [d.id for d in out] == ["0", "2", "4"] and out[0].metadata["tag"] == "kept"
    stats = chain[1].stats
    assert (stats.name, stats.docs_in, stats.docs_out, stats.dropped["removed"]) == ("KeepEvenIds", 5, 3, 2)


def test_read_filter_stage_runs_the_configured_chain(tmp_path):
    records = [{"id": str(i), "text": f"Document {i} from jane{i}@mail.example.org about rivers and towns.",
                "url": f"https://{'blocked.example' if i == 3 else 'ok.example'}/{i}"} for i in range(6)]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = C.DataJobConfig(inputs=[C.InputSpec(kind="jsonl", path=str(tmp_path / "in"))], shards=1)
    cfg.filters.chain = ["normalize", "url", {"_target_": f"{__name__}.KeepEvenIds"}, "pii"]
    cfg.filters.url.blocked_domains = ["blocked.example"]
    stages = job.build_data_stages(cfg)[:1]
    results = run_inline(stages, tmp_path / "run")
    out = list(read_docs(tmp_path / "run" / layout.READ_FILTER / "out" / "00000.jsonl.zst"))
    assert [d.id for d in out] == ["0", "2", "4"]
    assert "email@example.com" in out[0].text and out[0].metadata["url"] == "https://ok.example/0"
    by_name = {s["name"]: s for s in results[layout.READ_FILTER][0]["steps"]}
    assert by_name["url"]["dropped"] == {"blocked_domain": 1}
    assert by_name["KeepEvenIds"]["docs_in"] == 5 and by_name["pii"]["extra"] == {"emails_replaced": 3}
