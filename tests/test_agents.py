"""Agents: tools and their executor, the InternLM2 and ReAct protocols, the batched agent loop, job=agent."""
from __future__ import annotations

import dataclasses
import json
import pickle
from typing import ClassVar

import pytest
import torch
from puyu.agents.actions import (
    Action,
    ActionExecutor,
    ActionResult,
    Calculator,
    PythonInterpreter,
    ToolCall,
    make_actions,
    notebook_cell,
)
from puyu.agents.agent import ANSWER, MAX_TURNS, MODEL_ERROR, TRUNCATED, Agent
from puyu.agents.config import AgentJobConfig
from puyu.agents.job import AgentTask, build_agent_stages, report_section, summarize
from puyu.agents.protocol import ACTION_END, ACTION_START, INTERPRETER, PLUGIN, InternLM2Protocol, ReActProtocol
from puyu.agents.scripted import ScriptedPolicy, answer_from_observation, last_observation
from puyu.launcher.config import ClusterConfig, ClusterKind, LauncherConfig
from puyu.launcher.pipeline import Pipeline
from puyu.serving.config import RuntimeConfig, SamplingParams, ServingError


def run_in_process(stages, run_dir):
    return Pipeline(stages, run_dir, ClusterConfig(kind=ClusterKind.inline), LauncherConfig()).run()


# --------------------------------------------------------------------------- scripted replies
def plugin(name, params) -> str:
    return f"Let me use {name}.{ACTION_START}{PLUGIN}\n{json.dumps({'name': name, 'parameters': params})}{ACTION_END}"


def interpreter(code) -> str:
    return f"I will compute it.{ACTION_START}{INTERPRETER}\n```python\n{code}\n```{ACTION_END}"


# --------------------------------------------------------------------------- tools
@pytest.fixture(scope="module")
def executor():
    ex = ActionExecutor(make_actions(["python", "calculator"], timeout_s=2.0, memory_mb=256), timeout_s=20)
    yield ex
    ex.close()


def test_calculator_computes_and_rejects_code():
    calc = Calculator()
    assert calc(expression="(3 + 4) * 2 / 7").output == "2"
    assert calc(expression="2 ^ 10").output == "1024"
    assert calc(expression="sqrt(16) + pi * 0").output == "4"
    assert calc(expression="1,000 * 3").output == "3000" and calc(expression="max(1, 2.5)").output == "2.5"
    for bad in ["__import__('os')", "().__class__.__bases__", "open('/etc/passwd')", "x", "[1, 2][0]", "'a' * 3",
                "lambda: 1", "(1).real"]:
        r = calc(expression=bad)
        assert r.status == "error" and "not allowed" in r.output, (bad, r)
    for huge in ["9 ** 9 ** 9", "10 ** 1000 * 10 ** 1000", "factorial(10 ** 6)"]:
        r = calc(expression=huge)
        assert r.status == "error" and ("too large" in r.output or "factorial" in r.output), (huge, r)
    assert "ZeroDivisionError" in calc(expression="1 / 0").output
    assert "not an arithmetic expression" in calc(expression="1 +").output


def test_executor_turns_bad_calls_into_error_observations(executor):
    cases = [(ToolCall("browser", {"q": "x"}), "unknown tool 'browser'; available: python, calculator"),
             (ToolCall("calculator", {"expr": "1"}), "missing required parameter(s) ['expression']"),
             (ToolCall("calculator", {"expression": "1", "extra": 2}), "unknown parameter(s) ['extra']"),
             (ToolCall("calculator", ["1 + 1"]), "parameters must be a JSON object"),
             (ToolCall("python", {"code": 42}), "parameter 'code' must be a string, got int"),
             (ToolCall("python", {"code": "1", "state": {}}), "unknown parameter(s) ['state']"),
             (ToolCall(None, {}), "unknown tool None")]
    for call, message in cases:
        result = executor.execute(call)
        assert result.status == "error" and message in result.output, (call, result)


class Broken(Action):
    name = "broken"
    parameters: ClassVar[dict] = {"type": "object", "properties": {}, "required": []}

    def run(self):
        raise KeyError("boom")


class Slow(Action):
    name = "slow"
    parameters: ClassVar[dict] = {"type": "object", "properties": {}, "required": []}

    def run(self):
        import time

        time.sleep(1.0)
        return "late"


def test_executor_survives_tool_exceptions_and_hangs():
    ex = ActionExecutor([Broken(), Slow(), Calculator()], timeout_s=0.2, workers=2)
    try:
        r = ex.execute(ToolCall("broken", {}))
        assert r.status == "error" and r.output == "broken failed: KeyError: 'boom'"
        r = ex.execute(ToolCall("slow", {}))
        assert r.status == "error" and "no result within 0.2 s" in r.output
        results = ex.execute_many([(ToolCall("calculator", {"expression": f"{i} * 2"}), None) for i in range(5)])
        assert [r.output for r in results] == ["0", "2", "4", "6", "8"]
    finally:
        ex.close()


def test_python_tool_in_the_sandbox(executor):
    state: dict = {}
    r = executor.execute(ToolCall("python", {"code": "import os\nx = 6 * 7\nx"}), state)
    assert r.to_record()["status"] == "ok" and r.output == "42"
    pid = executor.execute(ToolCall("python", {"code": "os.getpid()"}), state).output
    # a live interpreter: later calls of the episode see earlier variables in the same process (no replay)
    r = executor.execute(ToolCall("python", {"code": "print(x + 1, os.getpid())\nprint('done')"}), state)
    assert r.output == f"43 {pid}\ndone"
    r = executor.execute(ToolCall("python", {"code": "import time\ntime.sleep(1.5)"}), state)
    r = executor.execute(ToolCall("python", {"code": "x"}), state)
    assert r.output == "42" and r.seconds < 1.0  # the slow cell did not run again
    other: dict = {}
    assert executor.execute(ToolCall("python", {"code": "x"}), other).output == "NameError: name 'x' is not defined"
    r = executor.execute(ToolCall("python", {"code": "def f(:\n  pass"}), state)
    assert r.status == "error" and r.output.startswith("SyntaxError")
    r = executor.execute(ToolCall("python", {"code": "b = bytearray(400 * 2**20)"}), state)
    assert r.status == "error" and "MemoryError" in r.output
    assert executor.execute(ToolCall("python", {"code": "y = x"}), state).output == "(no output)"  # still alive
    r = executor.execute(ToolCall("python", {"code": "while True:\n    pass"}), state)
    assert r.status == "error" and r.seconds < 6
    assert r.output.startswith("TimeoutError: the code ran longer than 2 s; the interpreter was stopped")
    r = executor.execute(ToolCall("python", {"code": "x"}), state)  # a fresh interpreter
    assert r.output == "NameError: name 'x' is not defined"
    r = executor.execute(ToolCall("python", {"code": "import socket\nsocket.create_connection(('1.1.1.1', 80))"}), other)
    assert r.status == "error" and "network" in r.output
    session = state["python"]
    executor.release(state)  # the episode is over: its interpreter goes
    assert "python" not in state and not session.alive
    executor.release(other)


def test_notebook_cell_shows_the_last_expression():
    assert notebook_cell("a = 1\na + 1").endswith("print(repr(__puyu_value))\n")
    assert notebook_cell("print(3)") == "print(3)" and notebook_cell("a = 1") == "a = 1"
    assert notebook_cell("x = (") == "x = ("  # does not parse: left to the sandbox to report


# --------------------------------------------------------------------------- protocols
TOOLS = [PythonInterpreter().spec(), Calculator().spec()]


def test_internlm2_render_and_parse_round_trip():
    proto = InternLM2Protocol(tools=TOOLS)
    prompt = proto.render("What is 2+2?", [])
    assert prompt.startswith("<|im_start|>system\n") and f"system name={PLUGIN}" in prompt
    assert f"system name={INTERPRETER}" in prompt and '"name": "calculator"' in prompt
    assert '"name": "python"' not in prompt  # python is the interpreter, not a plugin
    assert prompt.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")

    text = plugin("calculator", {"expression": "2+2"})
    step = proto.parse(text.split(ACTION_END)[0])  # as the runtime returns it: the stop string cut
    assert step.call == ToolCall("calculator", {"expression": "2+2"}) and step.thought == "Let me use calculator."
    obs = proto.observation(step, ActionResult("ok", "4"))
    assert obs == f"<|im_start|>environment name={PLUGIN}\n4<|im_end|>\n"
    second = proto.render("What is 2+2?", [(proto.reply(text.split(ACTION_END)[0], step), obs)])
    assert second.startswith(prompt)  # append-only: the prefix cache holds the previous turn
    assert second[len(prompt):] == f"{text}<|im_end|>\n{obs}<|im_start|>assistant\n"

    step = proto.parse(interpreter("print(1)\nprint(2)").split(ACTION_END)[0])
    assert step.call == ToolCall("python", {"code": "print(1)\nprint(2)"})
    assert proto.observation(step, ActionResult("error", "NameError: x")).startswith(
        f"<|im_start|>environment name={INTERPRETER}\nerror: NameError: x")
    assert proto.parse(f"{ACTION_START}{INTERPRETER}\nx = 1\nx").call.parameters == {"code": "x = 1\nx"}
    assert proto.parse("The answer is 4.").final == "The answer is 4."


def test_internlm2_malformed_calls_become_errors():
    proto = InternLM2Protocol(tools=TOOLS)
    cases = {f"hm{ACTION_START}{PLUGIN}\n{{\"name\": \"calculator\", \"parameters\": {{\"expression\": }}":
             "could not read the tool call: invalid JSON",
             f"{ACTION_START}{PLUGIN}\nno json here": "could not read the tool call: no JSON object",
             f"{ACTION_START}{PLUGIN}\n{{\"parameters\": {{}}}}": 'a tool call needs "name"',
             f"{ACTION_START}<|web|>\n{{}}": "an action must start with",
             f"{ACTION_START}{INTERPRETER}\n```python\n```": "holds no code"}
    for text, message in cases.items():
        step = proto.parse(text)
        assert step.call is None and step.final is None and message in step.error, (text, step)
        assert proto.observation(step, None).startswith(f"<|im_start|>environment name={PLUGIN}\nerror: ")
    # words after the JSON and "arguments" instead of "parameters" are tolerated
    step = proto.parse(f"{ACTION_START}{PLUGIN}\n{{\"name\": \"calculator\", \"arguments\": {{\"expression\": \"1\"}}}} ok")
    assert step.call == ToolCall("calculator", {"expression": "1"})


def test_react_render_and_parse():
    proto = ReActProtocol(tools=TOOLS)
    prompt = proto.render("What is 2+2?", [])
    assert "Action: the tool to use, one of [python, calculator]" in prompt and prompt.endswith("<|im_start|>assistant\n")
    text = 'Thought: add them\nAction: calculator\nAction Input: {"expression": "2+2"}\n'
    step = proto.parse(text)
    assert step.call == ToolCall("calculator", {"expression": "2+2"}) and step.thought == "add them"
    obs = proto.observation(step, ActionResult("ok", "4"))
    assert obs == "Observation: 4\n"
    second = proto.render("What is 2+2?", [(proto.reply(text, step), obs)])
    assert second == prompt + text + obs
    assert proto.parse("Thought: done\nFinal Answer: 4").final == "4"
    assert proto.parse("just words").final == "just words"
    # a plain (non-JSON) input goes to a tool's one required parameter, as Lagent does
    assert proto.parse("Action: calculator\nAction Input: 3 * 3").call == ToolCall("calculator", {"expression": "3 * 3"})
    assert "has no Action Input" in proto.parse("Action: calculator\n").error
    assert "could not read the Action Input" in proto.parse("Action: nosuch\nAction Input: 3").error
    assert proto.parse("Thought: t\nAction:\nAction Input: {}").error == "Action names no tool"


# --------------------------------------------------------------------------- the agent loop
@dataclasses.dataclass
class Refused:
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None


class RefuseTooLong:
    """A model whose runtime refuses one episode's prompt, as ``LLM`` refuses one longer than the model."""

    def generate(self, prompts, sampling):
        return [Refused(error="prompt exceeds the model length" if "too long" in p else None) for p in prompts]


def test_episodes_advance_together_with_tools_and_max_turns(executor):
    script = {
        "calc": [plugin("calculator", {"expression": "12 * 7"}), answer_from_observation],
        "code": [interpreter("n = sum(range(10))\nprint(n)"), interpreter("n * 2"), answer_from_observation],
        "direct": ["The answer is 5."],
        "loop": [plugin("calculator", {"expression": "1 + 1"})],  # never answers
        "bad": ["oops" + ACTION_START + PLUGIN + "\n{broken", "The answer is 0."],
        "cut": ["The answer is 12[LENGTH]"],
    }
    policy = ScriptedPolicy(script, model=RefuseTooLong())
    agent = Agent(policy, InternLM2Protocol(tools=executor.specs()), executor, SamplingParams(max_tokens=64), max_turns=3)
    eps = agent.run(list(script) + ["too long"])
    by = {e.task: e for e in eps}
    assert policy.calls == [7, 4, 2]  # one generate call per round for every unfinished episode
    assert by["calc"].final == "The answer is 84." and by["calc"].finish_reason == ANSWER
    assert [t.observation["output"] for t in by["code"].turns[:2]] == ["45", "90"]  # state kept across calls
    assert by["code"].final == "The answer is 90."
    assert all("python" not in e.state for e in eps)  # every episode's interpreter ended with it
    assert by["direct"].finish_reason == ANSWER and len(by["direct"].turns) == 1
    assert by["loop"].finish_reason == MAX_TURNS and by["loop"].final is None and len(by["loop"].turns) == 3
    bad = by["bad"].to_record()
    assert bad["parse_errors"] == 1 and "invalid JSON" in bad["turns"][0]["parse_error"] and bad["final"] == "The answer is 0."
    assert by["cut"].finish_reason == TRUNCATED and by["cut"].final == "The answer is 12"
    assert by["too long"].finish_reason == MODEL_ERROR and "model length" in by["too long"].error
    rec = by["calc"].to_record()
    assert rec["tool_calls"] == 1 and rec["tool_errors"] == 0 and rec["turns"][0]["call"] == {
        "name": "calculator", "parameters": {"expression": "12 * 7"}}
    # the stop strings reached the model: the action was cut before <|action_end|> and put back in the history
    assert by["calc"].turns[0].text.endswith("}}") and by["calc"].history[0][0].endswith(ACTION_END)
    # sequential (Lagent-style) gives the same episodes with one call per turn
    seq_policy = ScriptedPolicy(script, model=RefuseTooLong())
    seq = Agent(seq_policy, InternLM2Protocol(tools=executor.specs()), executor, SamplingParams(max_tokens=64),
                max_turns=3).run_sequential(list(script) + ["too long"])
    assert [e.to_record()["final"] for e in seq] == [e.to_record()["final"] for e in eps]
    assert all(n == 1 for n in seq_policy.calls) and len(seq_policy.calls) == sum(len(e.turns) or 1 for e in seq)


def test_react_episode(executor):
    script = {"q": ['Thought: compute\nAction: python\nAction Input: {"code": "print(3 ** 4)"}\nObservation: fake',
                    lambda p: f"Thought: done\nFinal Answer: {last_observation(p)}"]}
    agent = Agent(ScriptedPolicy(script), ReActProtocol(tools=executor.specs()), executor, max_turns=3)
    ep = agent.run(["q"])[0]
    assert ep.final == "81" and ep.turns[0].observation["output"] == "81"  # the model's "Observation" was cut


# --------------------------------------------------------------------------- GSM8K with a scripted policy
# Real GSM8K test items (ids from load_dataset("gsm8k", limit=6)) and python a careful model would write.
GSM8K_CODE = {
    "gsm8k/109": "price = 3.00 - 0.20\nprint(round(price * 10, 2))",
    "gsm8k/327": "left = 24 - 2 - 14\nbought = 2 * 14\nprint(left + bought - 3 - 2)",
    "gsm8k/546": "written = 26 * 2 + 13\nprint(written * 2)",
}


def gsm8k_tasks(tmp_path, limit=6, extra_lines=()):
    from puyu.evaluation.datasets import load_dataset

    items = load_dataset("gsm8k", limit=limit).items
    lines = [json.dumps({"id": it.id, "question": it.question, "answer": it.answer}) for it in items]
    lines += list(extra_lines)
    path = tmp_path / "tasks.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, items


def gsm8k_policy(items) -> ScriptedPolicy:
    script = {}
    for it in items:
        if it.id in GSM8K_CODE:
            script[it.question] = [interpreter(GSM8K_CODE[it.id]), answer_from_observation]
        else:  # no tool: a guess, graded wrong unless lucky
            script[it.question] = ["I think the answer is 7."]
    script["broken call"] = [f"{ACTION_START}{PLUGIN}\n{{'name': 'calculator'}}", "The answer is 1."]
    return ScriptedPolicy(script)


def test_scripted_policy_job_on_gsm8k_graded_through_the_python_tool(tmp_path):
    path, items = gsm8k_tasks(tmp_path, extra_lines=[json.dumps({"task": "broken call"}), "{oops",
                                                     json.dumps({"question": ""})])
    cfg = AgentJobConfig(kind="agent", engine="unused", input=str(path), shards=2, tools=["python", "calculator"],
                         max_turns=3, tool_timeout_s=5.0, tool_memory_mb=256)
    stages = build_agent_stages(cfg)
    assert [(s.name, s.shards) for s in stages] == [("agent", 2), ("agent_merge", 1)]
    stages[0].fn = AgentTask(cfg, model=gsm8k_policy(items))
    results = run_in_process(stages, tmp_path / "run")
    out = [json.loads(ln) for ln in (tmp_path / "run" / "agent" / "trajectories.jsonl").read_text().splitlines()]
    assert [r["index"] for r in out] == list(range(9))
    assert [r["id"] for r in out[:6]] == [it.id for it in items]
    graded = {r["id"]: r for r in out[:6]}
    for item_id in GSM8K_CODE:
        r = graded[item_id]
        assert r["correct"] and r["tool_calls"] == 1 and r["turns"][0]["observation"]["status"] == "ok", r
        assert r["extracted"] == r["gold"]
    assert sum(r["correct"] for r in out[:6]) == 3
    assert out[6]["parse_errors"] == 1 and "could not read the tool call" in out[6]["turns"][0]["parse_error"]
    assert out[7]["error"].endswith("tasks.jsonl:8: invalid JSON (Expecting property name enclosed in double quotes)")
    assert 'tasks.jsonl:9: needs "task" or "question"' in out[8]["error"]
    summary = results["agent_merge"][0]
    assert summary["accuracy"] == 50.0 and summary["accuracy_with_tools"] == 100.0 and summary["input_errors"] == 2
    assert summary["tool_calls"] == 3 and summary["tool_error_rate"] == 0.0 and summary["parse_errors"] == 1
    report = (tmp_path / "run" / "agent" / "report.md").read_text()
    assert "| accuracy (graded 6) | 50.00 |" in report and "| python | 3 | 0 |" in report
    section = report_section(tmp_path / "run")  # what a pipeline report.md appends
    assert section[0] == "## Agents" and "# Agent run" not in section[2] and "| episodes | 7 |" in section[2]


def test_summary_counts_tool_errors():
    recs = [{"finish_reason": "answer", "num_turns": 2, "tool_calls": 2, "tool_errors": 1, "parse_errors": 0,
             "output_tokens": 5, "turns": [{"call": {"name": "python"}, "observation": {"status": "error"}},
                                           {"call": {"name": "calculator"}, "observation": {"status": "ok"}}]},
            {"error": "x"}]
    s = summarize(recs)
    assert s["tool_error_rate"] == 50.0 and s["per_tool"]["python"] == {"calls": 1, "errors": 1}
    assert s["input_errors"] == 1 and "accuracy" not in s


# --------------------------------------------------------------------------- the job on a real tiny engine


def test_job_on_a_tiny_engine_runs_in_order_and_a_rerun_redoes_nothing(engine, tmp_path):
    long_task = json.dumps({"id": "long", "task": "word " * 400})
    path, items = gsm8k_tasks(tmp_path, limit=8, extra_lines=[long_task, "not json"])
    cfg = AgentJobConfig(kind="agent", engine=str(engine), input=str(path), shards=2, tools=["python"],
                         max_turns=2, sampling=SamplingParams(max_tokens=24, temperature=0.8, top_k=50),
                         runtime=RuntimeConfig(block_size=8, num_blocks=512, max_num_batched_tokens=256, threads=1))
    threads = torch.get_num_threads()
    try:
        stages = pickle.loads(pickle.dumps(build_agent_stages(cfg)))
        results = run_in_process(stages, tmp_path / "run")
    finally:
        torch.set_num_threads(threads)
    traj = tmp_path / "run" / "agent" / "trajectories.jsonl"
    first = traj.read_bytes()
    out = [json.loads(ln) for ln in first.decode().splitlines()]
    assert [r["index"] for r in out] == list(range(10)) and [r.get("id") for r in out[:8]] == [it.id for it in items]
    for r in out[:8]:  # whatever the random model wrote, each episode ended with a recorded reason
        assert r["finish_reason"] in (ANSWER, TRUNCATED, MAX_TURNS, MODEL_ERROR) and r["num_turns"] >= 1, r
        assert r["gold"] == items[out.index(r)].answer and isinstance(r["correct"], bool)
        assert r["output_tokens"] > 0 and r["prompt_tokens"] > 100
    assert out[8]["finish_reason"] == MODEL_ERROR and "tasks.jsonl:9: " in out[8]["error"]
    assert "exceeds the model length" in out[8]["error"]
    assert out[9]["error"].startswith(f"{path}:10: invalid JSON")
    tasks = results["agent"]
    assert [t["episodes"] for t in tasks] == [5, 5] and all(t["model_calls"] >= 1 for t in tasks)
    assert sum(t["prefix_cache_block_hits"] for t in tasks) > 0  # the shared system prompt was cached
    assert "| episodes | 9 |" in (tmp_path / "run" / "agent" / "report.md").read_text()
    # rerun of the same run: every task has its marker, nothing runs and nothing is rewritten
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "run" / "agent").rglob("*") if p.is_file()}
    run_in_process(build_agent_stages(cfg), tmp_path / "run")
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "run" / "agent").rglob("*") if p.is_file()} == mtimes
    assert traj.read_bytes() == first


def test_scripted_policy_over_the_real_runtime(engine, tmp_path):
    """Multi-turn episodes through the runtime: every round one generate call, the prompts grow by the
    turn before, and the prefix cache serves the earlier turns' blocks; answers graded via the python tool."""
    from puyu.agents.job import grade
    from puyu.evaluation.datasets import load_dataset
    from puyu.serving.llm import LLM

    items = [it for it in load_dataset("gsm8k", limit=6).items if it.id in GSM8K_CODE]
    llm = LLM(engine, runtime=RuntimeConfig(block_size=8, num_blocks=512, max_num_batched_tokens=256, threads=1))
    threads = torch.get_num_threads()
    hits = []
    try:
        policy = ScriptedPolicy({it.question: [interpreter(GSM8K_CODE[it.id]), answer_from_observation]
                                 for it in items}, model=llm)
        original = policy.generate

        def generate(prompts, sampling):  # the runtime's prefix-cache hits of each round
            outs = original(prompts, sampling)
            hits.append(llm.stats["prefix_cache_block_hits"])
            return outs

        policy.generate = generate
        ex = ActionExecutor(make_actions(["python"], timeout_s=5.0, memory_mb=256))
        agent = Agent(policy, InternLM2Protocol(tools=ex.specs()), ex, SamplingParams(max_tokens=16), max_turns=3)
        eps = agent.run([it.question for it in items])
        ex.close()
    finally:
        torch.set_num_threads(threads)
    assert policy.calls == [3, 3] and len(hits) == 2
    for ep, it in zip(eps, items):
        assert ep.finish_reason == ANSWER and grade(ep.final, it.answer)[1], (ep.final, it.answer)
        first, second = ep.turns
        assert first.output_tokens == second.output_tokens == 16  # the runtime really generated
        assert second.prompt_tokens > first.prompt_tokens + 20
    # round 2: each episode's whole first prompt (but a partial last block) came from the cache
    assert hits[1] >= sum(ep.turns[0].prompt_tokens // 8 - 1 for ep in eps)


def test_bad_job_config_is_one_clear_line(tmp_path):
    with pytest.raises(ServingError, match="needs engine"):
        build_agent_stages(AgentJobConfig(kind="agent"))
    (tmp_path / "t.jsonl").write_text('{"task": "x"}\n')
    base = {"kind": "agent", "engine": "e", "input": str(tmp_path / "t.jsonl")}
    with pytest.raises(ServingError, match="unknown tool"):
        build_agent_stages(AgentJobConfig(**base, tools=["browser"]))
    with pytest.raises(ServingError, match="protocol must be one of"):
        build_agent_stages(AgentJobConfig(**base, protocol="xml"))
    with pytest.raises(ServingError, match="not found"):
        build_agent_stages(AgentJobConfig(kind="agent", engine="e", input=str(tmp_path / "nope.jsonl")))


def test_agent_config_is_an_omegaconf_structured_config():
    from omegaconf import OmegaConf

    conf = OmegaConf.merge(OmegaConf.structured(AgentJobConfig(kind="agent")),
                           OmegaConf.from_dotlist(["tools=[calculator]", "sampling.max_tokens=32", "max_turns=6"]))
    cfg = OmegaConf.to_object(conf)
    assert cfg.tools == ["calculator"] and cfg.sampling.max_tokens == 32 and cfg.max_turns == 6
    with pytest.raises(Exception, match="max_turn"):
        OmegaConf.merge(OmegaConf.structured(AgentJobConfig(kind="agent")), OmegaConf.from_dotlist(["max_turn=1"]))
