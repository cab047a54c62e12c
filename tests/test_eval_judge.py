"""The LLM judge: verdicts read from crafted judge replies; a real engine and puyu's own OpenAI server as
judges (same greedy text from both, on every run, every item with a verdict or a recorded parse failure);
the judge inside ``job=eval``; bad ``job.judges`` entries as one-line errors naming the key.

The judge here is the tiny random engine of conftest's ``engine`` fixture: it never writes a verdict, so
these tests check the plumbing and the parsing, not the judge's quality.
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys
import threading

import pytest
import torch

from puyu.evaluation import judge
from puyu.evaluation.config import EvalJobConfig, InferenceConfig
from puyu.evaluation.items import Dataset, EvalError, Item
from puyu.evaluation.metrics import score
from puyu.serving.config import RuntimeConfig

RUNTIME = RuntimeConfig(kv_cache_mb=64, threads=1)
ITEMS = [Item("qa/0", "What is the capital of France?", answer=["Paris", "Paris, France"]),
         Item("qa/1", "How many legs does a spider have?", answer="8"),
         Item("qa/2", "Who wrote Hamlet?", answer="William Shakespeare")]
RECORDS = [{"id": it.id, "prediction": p, "correct": False} for it, p in zip(ITEMS, ["Paris", " eight\n", ""])]
SHORT_PROMPT = "Q: {question}\nReference: {reference}\nAnswer: {prediction}\nCorrect? [[A]] yes, [[B]] no."


@pytest.mark.parametrize("reply, verdict", [
    ("The prediction names the same city.\n[[A]]", "correct"),
    ("[[B]]", "incorrect"),
    ("Say [[A]] if correct or [[B]] if not. It is wrong.\nVerdict: [[ b ]]", "incorrect"),  # the last one counts
    ("[[A]] ... on reflection, [[B]]\n\n", "incorrect"),
    ("verdict: [[a]].", "correct"),
    ("Yes, the answer is right.", "correct"),
    ("  no. it names another person", "incorrect"),
    ("Incorrect: 7 is not 8", "incorrect"),
    ("Correct.", "correct"),
    ("The answer is not correct", None),  # no marker and no leading verdict word: not guessed
    ("[[C]]", None), ("[A]", None), ("", None), ("yesterday it rained", None), (None, None),
    ("\x00\ufffd junk ]]]][[[[", None),
])
def test_verdicts_are_read_from_crafted_judge_replies(reply, verdict):
    assert judge.parse_verdict(reply) == verdict


def test_replies_become_records_and_scores(monkeypatch):
    """Crafted replies through judge_records: output kept, verdict or error per item, metrics over all."""
    replies = [("Same city. [[A]]", None), ("I cannot tell.", None), ("", "judge refused the request (400): too long")]
    seen = []
    monkeypatch.setattr(judge, "ask_server", lambda spec, prompts: seen.extend(prompts) or replies)
    spec = judge.judge_spec("qa", {"base_url": "http://127.0.0.1:9/v1"})
    records = judge.judge_records(spec, ITEMS, RECORDS, RUNTIME)
    assert "Reference answer(s): Paris | Paris, France\nPredicted answer: Paris\n" in seen[0]
    assert "Predicted answer: eight\n" in seen[1]  # the prediction stripped
    assert [r["judge_output"] for r in records] == [text for text, _ in replies]
    assert [r["judge_verdict"] for r in records] == ["correct", None, None]
    assert "judge_error" not in records[0]
    assert records[1]["judge_error"] == "no [[A]]/[[B]] verdict in the judge's output"
    assert records[2]["judge_error"].startswith("judge refused the request (400)")
    scores = score("gen", records)
    assert scores["judge_accuracy"] == pytest.approx(100 / 3) and scores["judge_parsed"] == pytest.approx(100 / 3)
    assert "judge_accuracy" not in score("gen", RECORDS)


@pytest.fixture(scope="module")
def server_url(engine):
    """puyu's OpenAI server over the engine, on a free loopback port."""
    from puyu.serving.llm import LLM
    from puyu.serving.server import make_server

    threads = torch.get_num_threads()
    server = make_server(LLM(engine, runtime=RUNTIME))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host, port = server.server_address
    yield f"http://{host}:{port}/v1"
    server.shutdown()
    server.server_close()
    torch.set_num_threads(threads)


def test_engine_and_server_judges_agree_and_repeat(engine, server_url):
    by_engine = judge.judge_spec("qa", {"engine": str(engine), "prompt": SHORT_PROMPT, "max_tokens": 12})
    by_server = judge.judge_spec("qa", {"base_url": server_url, "prompt": SHORT_PROMPT, "max_tokens": 12})
    threads = torch.get_num_threads()
    try:
        first = judge.judge_records(by_engine, ITEMS, RECORDS, RUNTIME)
        again = judge.judge_records(by_engine, ITEMS, RECORDS, RUNTIME)
    finally:
        torch.set_num_threads(threads)
    served = judge.judge_records(by_server, ITEMS, RECORDS, RUNTIME)
    assert first == again  # greedy: the same verdicts every run
    assert [r["judge_output"] for r in served] == [r["judge_output"] for r in first]
    assert any(r["judge_output"] for r in first), "the judge engine wrote nothing"
    for r in first + served:
        assert r["judge_verdict"] == judge.parse_verdict(r["judge_output"])
        assert (r["judge_verdict"] is None) == ("judge_error" in r)


def test_eval_job_with_an_engine_judge(engine, tmp_path):
    from puyu.evaluation.job import eval_stages
    from puyu.launcher.config import ClusterConfig, ClusterKind, LauncherConfig
    from puyu.launcher.pipeline import Pipeline

    rows = tmp_path / "qa.jsonl"
    rows.write_text("".join(json.dumps({"question": it.question, "answer": a}) + "\n"
                            for it, a in zip(ITEMS, ["Paris", "8", "William Shakespeare"])))
    cfg = EvalJobConfig(kind="eval", models=[str(engine)], datasets=["qa"],
                        custom_datasets={"qa": {"path": str(rows), "kind": "gen"}},
                        judges={"qa": {"engine": str(engine), "prompt": SHORT_PROMPT, "max_tokens": 8}},
                        infer=InferenceConfig(num_fewshot=0, max_tokens=6), runtime=RUNTIME)
    threads = torch.get_num_threads()
    try:
        Pipeline(eval_stages(cfg), tmp_path / "run", ClusterConfig(kind=ClusterKind.inline), LauncherConfig()).run()
    finally:
        torch.set_num_threads(threads)
    summary = tmp_path / "run" / "eval_summary"
    metrics = {r[1] for r in csv.reader((summary / "report.csv").open())}
    assert {"accuracy", "judge_accuracy", "judge_parsed"} <= metrics
    details = [json.loads(ln) for ln in next((summary / "details").glob("*/qa.jsonl")).read_text().splitlines()]
    assert len(details) == 3 and all("judge_output" in r and "judge_verdict" in r for r in details)
    assert f"LLM judge (qa): engine {engine}, greedy." in (summary / "report.md").read_text()


@pytest.mark.parametrize("judges, message", [
    ({"qa": {"engine": "E", "temperature": 0}}, "job.judges.qa: unknown key(s) ['temperature']"),
    ({"qa": {"model": "x"}}, "job.judges.qa: set exactly one of engine"),
    ({"qa": {"engine": "E", "base_url": "http://h/v1"}}, "job.judges.qa: set exactly one of engine"),
    ({"qa": {"engine": "/nonexistent"}}, "job.judges.qa.engine: /nonexistent is not an engine directory"),
    ({"qa": {"base_url": "localhost:8000"}}, "job.judges.qa.base_url: must be an http(s):// URL"),
    ({"qa": {"base_url": "http://h/v1", "max_tokens": 0}}, "job.judges.qa.max_tokens: must be an integer >= 1"),
    ({"qa": {"base_url": "http://h/v1", "prompt": "{question} {answer}"}}, "job.judges.qa.prompt: only {question}"),
    ({"qa": {"base_url": "http://h/v1", "prompt": "{question}"}}, "job.judges.qa.prompt: must contain {prediction}"),
    ({"qa": "http://h/v1"}, "job.judges.qa: expected {engine"),
    ({"other": {"base_url": "http://h/v1"}}, "job.judges.other: 'other' is not in job.datasets"),
    ({"mc": {"base_url": "http://h/v1"}}, "job.judges.mc: a judge scores open answers (generation datasets); 'mc' is mc"),
])
def test_bad_judge_entries_are_one_line_errors_naming_the_key(engine, judges, message):
    judges = {ds: {k: str(engine) if v == "E" else v for k, v in spec.items()} if isinstance(spec, dict) else spec
              for ds, spec in judges.items()}
    datasets = {"qa": Dataset("qa", "gen", ITEMS), "mc": Dataset("mc", "mc", [])}
    with pytest.raises(EvalError) as err:
        judge.check_judges(judges, datasets)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_bad_judge_entry_on_the_command_line(engine, tmp_path):
    rows = tmp_path / "qa.jsonl"
    rows.write_text(json.dumps({"question": "2+2?", "answer": "4"}) + "\n")
    out = subprocess.run([sys.executable, "-m", "puyu.launcher", "job=eval", "cluster=inline", f"run={tmp_path}/r",
                          f"job.models=[{engine}]", "job.datasets=[qa]",
                          f"++job.custom_datasets={{qa:{{path:{rows},kind:gen}}}}",
                          f"++job.judges={{qa:{{engine:{engine},max_token:5}}}}"],
                         capture_output=True, text=True, timeout=120)
    lines = out.stderr.strip().splitlines()
    assert out.returncode != 0 and len(lines) == 1 and "job.judges.qa: unknown key(s) ['max_token']" in lines[0], out.stderr
