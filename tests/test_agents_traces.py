"""Agents' search and unit tools, the protocols' call writers, and agent-trace SFT data (real tools, real
GSM8K); the finetuned model's own tool calls are checked on the pipeline's run (tests/test_pipeline.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from puyu.agents.actions import ActionExecutor, ToolCall, make_actions
from puyu.agents.config import AgentJobConfig
from puyu.agents.job import summarize
from puyu.agents.protocol import ACTION_END, IM_END, InternLM2Protocol, ReActProtocol
from puyu.agents.traces import AgentTracesTask, heldout_ids, parse_tool_row, solution_steps
from puyu.launcher.errors import PuyuError
from puyu.launcher.stage import TaskContext
from puyu.serving.config import ServingError


def write_corpus(path: Path) -> Path:
    docs = [("a", "Paris is the capital and largest city of France.", {"title": "Paris"}),
            ("b", "The Python language was created by Guido van Rossum.", {"title": "Python"}),
            ("c", "Lyon is a city in France on the Rhone.", {})]
    path.mkdir()
    (path / "00000.jsonl").write_text("".join(json.dumps({"id": i, "text": t, "metadata": m}) + "\n" for i, t, m in docs))
    return path


def test_search_tool_ranks_the_corpus_documents(tmp_path):
    ex = ActionExecutor(make_actions(["search"], corpus=str(write_corpus(tmp_path / "corpus"))))
    try:
        r = ex.execute(ToolCall("search", {"query": "capital of France"}))
        assert r.ok and r.output.startswith("1. Paris: Paris is the capital") and "2. c: Lyon" in r.output
        assert ex.execute(ToolCall("search", {"query": "zebra"})).output == "no document matches 'zebra'"
        assert "holds no words" in ex.execute(ToolCall("search", {"query": "?!"})).output
    finally:
        ex.close()
    with pytest.raises(ValueError, match="needs a corpus"):
        make_actions(["search"])
    with pytest.raises(ServingError, match="job.corpus is empty"):
        AgentJobConfig(tools=["search"]).validate()


def test_convert_tool():
    (convert,) = make_actions(["convert"])
    assert convert(value=90, from_unit="minutes", to_unit="h").output == "1.5"
    assert convert(value=212, from_unit="°F", to_unit="celsius").output == "100"
    assert convert(value=1, from_unit="mile", to_unit="km").output == "1.609344"
    assert convert(value=3, from_unit="gallons", to_unit="qt").output == "12"
    assert "cannot convert length (km) to mass (kg)" in convert(value=1, from_unit="km", to_unit="kg").output
    assert "unknown unit 'parsec'" in convert(value=1, from_unit="parsec", to_unit="m").output


@pytest.mark.parametrize("proto", [InternLM2Protocol, ReActProtocol])
def test_call_text_is_what_parse_reads(proto):
    p = proto(tools=[t.spec() for t in make_actions(["python", "calculator"])])
    for call in (ToolCall("python", {"code": "x = 2\nx * 3"}), ToolCall("calculator", {"expression": "48/2"})):
        step = p.parse(p.call_text(call, "I compute."))
        assert step.call == call and step.error is None
    assert p.parse(p.final_text("The answer is 7.")).final == "The answer is 7."


def test_summary_tool_rates():
    ok, err = {"observation": {"status": "ok"}}, {"observation": {"status": "error"}}
    eps = [{"finish_reason": "answer", "num_turns": 2, "tool_calls": 2, "tool_errors": 1, "parse_errors": 0,
            "output_tokens": 1, "turns": [{"call": {"name": "python"}, **ok}, {"call": {"name": "python"}, **err}]},
           {"finish_reason": "answer", "num_turns": 1, "tool_calls": 0, "tool_errors": 0, "parse_errors": 1,
            "output_tokens": 1, "turns": [{}]}]
    s = summarize(eps)
    assert s["tool_call_rate"] == 50.0 and s["tool_success_rate"] == 50.0


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    cfg = AgentJobConfig(tools=["python", "calculator"], tool_timeout_s=5.0)
    summary = AgentTracesTask(cfg, limit=6, holdout_limits=[16], tool="python")(TaskContext(run, run / "agent_traces"))
    return summary, [json.loads(ln) for ln in Path(summary["file"]).read_text().splitlines()]


def test_traces_run_the_tools_and_hold_out_the_scored_questions(traces):
    summary, rows = traces
    assert summary["traces"] == len(rows) == 6
    from puyu.evaluation.datasets import GSM8K_FEWSHOT, load_dataset

    held = heldout_ids([16])
    assert len(held) == 16 + GSM8K_FEWSHOT and not held & {r["id"] for r in rows}  # agents' 16 and the few-shot

    solutions = {it.id: it.meta["solution"] for it in load_dataset("gsm8k").items}
    for row in rows:
        calls = [m for m in row["messages"] if m.get("tool_calls")]
        results = [m["content"] for m in row["messages"] if m["role"] == "tool"]
        steps = solution_steps(solutions[row["id"]])
        assert [json.loads(c["tool_calls"][0]["function"]["arguments"])["code"] for c in calls] == [e for e, _ in steps]
        assert [float(r) for r in results] == [float(v) for _, v in steps]  # the interpreter's real outputs
        assert row["messages"][-1]["content"].startswith("The answer is ")


def test_traces_render_as_the_agents_prompt_them(traces):
    from puyu.data_pipeline.sft import parse_row, render

    row = traces[1][0]
    messages = parse_row(row, "traces.jsonl:1")
    text, spans = render(messages)
    proto = InternLM2Protocol(row["messages"][0]["content"], [t["function"] for t in row["tools"]])
    first_prompt = proto.render(row["messages"][1]["content"], [])
    assert text.startswith(first_prompt) and spans[0][0] == len(first_prompt)  # the prompt the agent serves
    trained = [text[a:b] for a, b in spans]
    code = json.loads(row["messages"][2]["tool_calls"][0]["function"]["arguments"])["code"]
    assert trained[0] == f"<|action_start|><|interpreter|>{code}{ACTION_END}"
    assert trained[-1] == row["messages"][-1]["content"] + IM_END and len(trained) == len(spans)
    assert all(text[b:].startswith(IM_END) for a, b in spans[:-1])  # the environment turn is not trained


def test_bad_tool_rows_name_the_line_and_message(traces):
    row = traces[1][0]
    broken = [({**row, "protocol": "xml"}, "protocol 'xml'"),
              ({**row, "tools": "python"}, "'tools' must be a list"),
              ({**row, "messages": row["messages"][:3]}, "messages[3] must be the tool's result"),
              ({**row, "messages": row["messages"][:4]}, "must end with an assistant answer"),
              ({**row, "messages": [row["messages"][0], *row["messages"][2:]]}, "needs one user turn")]
    bad_args = json.loads(json.dumps(row))
    bad_args["messages"][2]["tool_calls"][0]["function"]["arguments"] = "{code"
    broken.append((bad_args, "messages[2] arguments of python: invalid JSON"))
    unknown = json.loads(json.dumps(row))
    unknown["messages"][2]["tool_calls"][0]["function"]["name"] = "shell"
    broken.append((unknown, "messages[2] calls 'shell'"))
    for bad, message in broken:
        with pytest.raises(PuyuError, match="^t.jsonl:7: ") as info:
            parse_tool_row(bad, "t.jsonl:7")
        assert message in str(info.value), (message, info.value)


def test_data_stage_tokenizer_has_the_agent_markers_as_single_tokens(tmp_path):
    from puyu.data_pipeline.tokenize import CHAT_TOKENS, train_tokenizer
    from puyu.model.tokenizer import Tokenizer

    train_tokenizer(["the cat sat on the mat; print(1 + 2)"] * 20, 300, 2, tmp_path / "tokenizer.json")
    tok = Tokenizer(tmp_path / "tokenizer.json")
    call = InternLM2Protocol(tools=[t.spec() for t in make_actions(["python"])]).call_text(ToolCall("python", {"code": "1"}))
    ids = tok.encode(call + ACTION_END)
    assert [tok.decode([i]) for i in ids[:2]] == ["<|action_start|>", "<|interpreter|>"]
    assert tok.decode(ids) == call + ACTION_END  # the runtime's text, stop strings included, reads back whole
    assert all(len(tok.encode(t)) == 1 for t in CHAT_TOKENS) and tok.eos_ids == [tok.token_to_id("<|endoftext|>")]
