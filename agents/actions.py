"""Tools an agent can call (Lagent's "actions") and the executor that runs a model's tool calls.

Why an executor between the model and the tools: the caller is a language model, so every call may be
wrong -- an unknown tool, a missing or mistyped argument, code that raises or never ends. None of that
may stop a batch job of thousands of episodes. ``ActionExecutor.execute`` therefore never raises for
anything the model wrote: each failure becomes an ``ActionResult(status="error")`` whose ``output`` is
one line the model sees as the observation, and can act on in its next turn.

Tools:
- ``python`` (``PythonInterpreter``, InternLM2's "IPythonInterpreter"): runs code in a live interpreter of
  puyu's evaluation sandbox, one per episode (``puyu.evaluation.sandbox.PythonSession``: own process
  group, rlimits, no network, temporary directory, a timeout per cell). Like a notebook cell, the value of
  a final bare expression is shown, and later calls of the episode see its variables -- nothing is rerun.
  The executor's ``release(state)`` ends the interpreter when the episode ends.
- ``calculator`` (``Calculator``): arithmetic over an ``ast`` whitelist -- no ``eval``, so
  ``__import__('os')`` and attribute access are rejected before anything runs; huge powers are refused.
- ``search`` (:mod:`puyu.agents.search`): BM25 search over a corpus the data stage wrote (the run's own).
- ``convert`` (:mod:`puyu.agents.units`): unit conversion (length, mass, time, volume, speed, temperature).
"""
from __future__ import annotations

import ast
import concurrent.futures
import dataclasses
import json
import math
import operator
import re
import time
from typing import Any, ClassVar

OK, ERROR = "ok", "error"
MAX_OUTPUT_CHARS = 2000  # an observation longer than this is cut (the middle goes): it fills the context


@dataclasses.dataclass
class ActionResult:
    status: str  # "ok" | "error"
    output: str  # what the model sees as the observation
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == OK

    def to_record(self) -> dict:
        return {"status": self.status, "output": self.output, "seconds": round(self.seconds, 4)}


class ActionError(Exception):
    """A failure a tool reports to the model (bad input, failed program): its message is the observation."""


_JSON_TYPES = {"string": str, "number": (int, float), "integer": int, "boolean": bool, "object": dict,
               "array": list}


def check_arguments(schema: dict, args: Any) -> str | None:
    """Why ``args`` does not fit the JSON-schema-like ``schema`` (object with ``properties``/``required``), or
    None. Only what tool calls need: required keys, no unknown keys, the basic JSON types."""
    if not isinstance(args, dict):
        return f"parameters must be a JSON object, got {type(args).__name__}"
    props = schema.get("properties", {})
    missing = [k for k in schema.get("required", []) if k not in args]
    if missing:
        return f"missing required parameter(s) {missing}"
    unknown = sorted(set(args) - set(props))
    if unknown:
        return f"unknown parameter(s) {unknown}; known: {sorted(props)}"
    for key, value in args.items():
        want = props[key].get("type")
        py = _JSON_TYPES.get(want)
        bad_bool = isinstance(value, bool) and want in ("number", "integer")
        if py is not None and (not isinstance(value, py) or bad_bool):
            return f"parameter {key!r} must be a {want}, got {type(value).__name__}"
    return None


class Action:
    """A tool: a name, a description and parameters the model reads, and ``run`` doing the work.

    ``__call__(**kwargs)`` checks the arguments against ``parameters`` and turns an ``ActionError`` into an
    error result; other exceptions are left to the executor (it names their type). ``stateful`` actions
    also get ``state=``, a dict that lives as long as one episode.
    """

    name: str = ""
    description: str = ""
    parameters: ClassVar[dict] = {"type": "object", "properties": {}, "required": []}
    stateful: bool = False

    def spec(self) -> dict:
        return {"name": self.name, "description": self.description, "parameters": self.parameters}

    def run(self, **kwargs) -> str:
        raise NotImplementedError

    def close_state(self, state: dict) -> None:
        """Free what ``run`` kept in an episode's ``state`` (stateful actions; the episode is over)."""

    def __call__(self, state: dict | None = None, **kwargs) -> ActionResult:
        t0 = time.perf_counter()
        problem = check_arguments(self.parameters, kwargs)
        if problem:
            return ActionResult(ERROR, f"{self.name}: {problem}", time.perf_counter() - t0)
        try:
            out = self.run(state=state if state is not None else {}, **kwargs) if self.stateful else self.run(**kwargs)
        except ActionError as exc:
            return ActionResult(ERROR, clip(str(exc)), time.perf_counter() - t0)
        return ActionResult(OK, clip(out), time.perf_counter() - t0)


def clip(text: str, limit: int = MAX_OUTPUT_CHARS) -> str:
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}\n... [{len(text) - 2 * half} characters cut] ...\n{text[-half:]}"


# --------------------------------------------------------------------------- python
def notebook_cell(code: str) -> str:
    """``code`` with a final bare expression printed as a notebook shows it (its repr, unless None).

    Code that does not parse is returned unchanged: the sandbox then reports the SyntaxError itself."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return code
    if not tree.body or not isinstance(tree.body[-1], ast.Expr):
        return code
    last = tree.body[-1]
    call = last.value
    if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "print":
        return code
    lines = code.splitlines()
    head = "\n".join(lines[:last.lineno - 1] + [lines[last.lineno - 1][:last.col_offset]])
    expr = ast.get_source_segment(code, last) or ast.unparse(last)
    return (f"{head}\n__puyu_value = ({expr})\n"
            "if __puyu_value is not None:\n    print(repr(__puyu_value))\n")


def error_line(stderr: str) -> str:
    """The last non-empty line of a traceback: ``ZeroDivisionError: division by zero``."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


class PythonInterpreter(Action):
    """InternLM2's code interpreter over puyu's sandbox; stdout is the observation, or the error's last line."""

    name = "python"
    description = ("Runs Python 3 code (standard library, no network) and returns what it prints or the value "
                   "of a final expression; variables are kept between calls.")
    parameters: ClassVar[dict] = {"type": "object", "properties": {"code": {"type": "string"}},
                  "required": ["code"]}
    stateful = True

    def __init__(self, timeout_s: float = 10.0, memory_mb: int = 512):
        self.timeout_s, self.memory_mb = timeout_s, memory_mb

    def run(self, code: str, state: dict) -> str:
        from puyu.evaluation.sandbox import PythonSession

        session = state.get(self.name)
        if session is None:
            session = state[self.name] = PythonSession(self.timeout_s, self.memory_mb)
        result = session.run(notebook_cell(code))
        if result.status == "passed":
            return result.stdout.rstrip("\n") or "(no output)"
        if result.status == "memory":
            raise ActionError(f"MemoryError: the code used more than {self.memory_mb} MB")
        gone = "" if session.alive else "; the interpreter was stopped (the next call starts without earlier variables)"
        if result.status == "timeout":
            raise ActionError(f"TimeoutError: the code ran longer than {self.timeout_s:g} s{gone}")
        if result.status == "network":
            raise ActionError(f"PermissionError: no network access in the interpreter{gone}")
        raise ActionError((error_line(result.stderr) or f"exit code {result.returncode}") + gone)

    def close_state(self, state: dict) -> None:
        session = state.pop(self.name, None)
        if session is not None:
            session.close()


# --------------------------------------------------------------------------- calculator
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCS = {"sqrt": math.sqrt, "log": math.log, "log10": math.log10, "log2": math.log2, "exp": math.exp,
          "sin": math.sin, "cos": math.cos, "tan": math.tan, "floor": math.floor, "ceil": math.ceil,
          "abs": abs, "round": round, "min": min, "max": max, "factorial": math.factorial}
_CONSTS = {"pi": math.pi, "e": math.e}
MAX_EXPONENT = 1000  # 9**9**9 would run (and allocate) for minutes
MAX_MAGNITUDE = 10 ** 100
MAX_EXPRESSION_CHARS = 500
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


class Calculator(Action):
    """Arithmetic on numbers: + - * / // % **, parentheses, pi, e and a few math functions."""

    name = "calculator"
    description = ("Evaluates arithmetic, e.g. '(3.5 + 2) * 4 / 7': + - * / // % **, pi, e, sqrt, log, exp, "
                   "sin, cos, tan, floor, ceil, abs, round, min, max, factorial.")
    parameters: ClassVar[dict] = {"type": "object", "properties": {"expression": {"type": "string"}},
                  "required": ["expression"]}

    def run(self, expression: str) -> str:
        if len(expression) > MAX_EXPRESSION_CHARS:
            raise ActionError(f"calculator: expression longer than {MAX_EXPRESSION_CHARS} characters")
        # as people write numbers: 2^10 is a power, 1,000 a thousand (but max(1, 2) keeps its comma)
        text = _THOUSANDS.sub("", expression.strip().replace("^", "**"))
        try:
            tree = ast.parse(text, mode="eval")
        except SyntaxError as exc:
            raise ActionError(f"calculator: not an arithmetic expression ({exc.msg})") from None
        try:
            value = self._eval(tree.body)
        except (ZeroDivisionError, OverflowError, ValueError, TypeError) as exc:
            raise ActionError(f"calculator: {type(exc).__name__}: {exc}") from None
        if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
            value = int(value)
        return repr(value) if isinstance(value, float) else str(value)

    def _eval(self, node: ast.AST):
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.Name) and node.id in _CONSTS:
            return _CONSTS[node.id]
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](self._eval(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = self._eval(node.left), self._eval(node.right)
            if isinstance(node.op, ast.Pow) and (abs(right) > MAX_EXPONENT or abs(left) > MAX_MAGNITUDE):
                raise ActionError(f"calculator: power too large ({left!r} ** {right!r})")
            value = _BINARY[type(node.op)](left, right)
            if isinstance(value, complex):
                raise ActionError("calculator: the result is not a real number")
            if abs(value) > MAX_MAGNITUDE:
                raise ActionError("calculator: result too large")
            return value
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS
                and not node.keywords):
            args = [self._eval(a) for a in node.args]
            if node.func.id == "factorial" and (len(args) != 1 or args[0] > 200):
                raise ActionError("calculator: factorial takes one argument <= 200")
            return _FUNCS[node.func.id](*args)
        raise ActionError(f"calculator: {ast.unparse(node)[:60]} is not allowed (numbers, operators, "
                          f"{', '.join(sorted(_FUNCS))}, pi, e only)")


# --------------------------------------------------------------------------- executor
TOOLS = ("python", "calculator", "search", "convert")


def make_actions(names: list[str], timeout_s: float = 10.0, memory_mb: int = 512, corpus: str = "") -> list[Action]:
    """The built-in tools by name (``python`` gets the sandbox limits, ``search`` the corpus: a folder of the
    data stage's document files); an unknown name, or ``search`` without a corpus, raises ValueError."""
    unknown = [n for n in names if n not in TOOLS]
    if unknown:
        raise ValueError(f"unknown tool(s) {unknown}; known: {sorted(TOOLS)}")
    actions: list[Action] = []
    for name in names:
        if name == "python":
            actions.append(PythonInterpreter(timeout_s, memory_mb))
        elif name == "calculator":
            actions.append(Calculator())
        elif name == "search":
            from puyu.agents.search import CorpusSearch

            if not corpus:
                raise ValueError("the search tool needs a corpus (job.corpus=<folder of the data stage's documents>)")
            actions.append(CorpusSearch(corpus))
        else:
            from puyu.agents.units import UnitConverter

            actions.append(UnitConverter())
    return actions


@dataclasses.dataclass
class ToolCall:
    name: str
    parameters: Any  # what the model wrote; checked by the action, not here

    def to_record(self) -> dict:
        return {"name": self.name, "parameters": self.parameters}


class ActionExecutor:
    """Dispatches tool calls by name; never raises for a bad call.

    ``timeout_s`` bounds how long the executor waits for one call (the python tool also kills its sandbox at
    its own timeout; a pure-Python tool that hangs is abandoned on its thread). ``execute_many`` runs the
    calls of many episodes at once on ``workers`` threads: tool time overlaps (sandboxes are processes).
    """

    def __init__(self, actions: list[Action], timeout_s: float = 30.0, workers: int = 2):
        names = [a.name for a in actions]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate tool names {names}")
        self.actions = {a.name: a for a in actions}
        self.timeout_s, self.workers = timeout_s, workers
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers) + 1,
                                                           thread_name_prefix="puyu-tool")

    def specs(self) -> list[dict]:
        return [a.spec() for a in self.actions.values()]

    def execute(self, call: ToolCall, state: dict | None = None) -> ActionResult:
        t0 = time.perf_counter()
        action = self.actions.get(call.name) if isinstance(call.name, str) else None
        if action is None:
            return ActionResult(ERROR, f"unknown tool {call.name!r}; available: {', '.join(self.actions)}")
        args = call.parameters
        if not isinstance(args, dict):
            return ActionResult(ERROR, f"{call.name}: parameters must be a JSON object, got "
                                       f"{json.dumps(args)[:80]}")
        if "state" in args:  # the name is the executor's (per-episode tool state), never the model's
            return ActionResult(ERROR, f"{call.name}: unknown parameter(s) ['state']")
        future = self._pool.submit(self._guarded, action, state, dict(args))
        try:
            result = future.result(timeout=self.timeout_s)
        except concurrent.futures.TimeoutError:
            return ActionResult(ERROR, f"{call.name}: no result within {self.timeout_s:g} s", time.perf_counter() - t0)
        result.seconds = time.perf_counter() - t0
        return result

    @staticmethod
    def _guarded(action: Action, state: dict | None, kwargs: dict) -> ActionResult:
        try:
            return action(state=state, **kwargs)
        except Exception as exc:  # noqa: BLE001 - a tool's bug is an observation, not a crash of the job
            return ActionResult(ERROR, f"{action.name} failed: {type(exc).__name__}: {exc}")

    def execute_many(self, calls: list[tuple[ToolCall, dict | None]]) -> list[ActionResult]:
        """``execute`` for each (call, episode state), ``workers`` at a time; results in order. Calls sharing
        one state dict (one episode) would race on it: the agent sends at most one call per episode."""
        if len(calls) <= 1 or self.workers <= 1:
            return [self.execute(c, s) for c, s in calls]
        with concurrent.futures.ThreadPoolExecutor(max_workers=self.workers) as pool:
            return list(pool.map(lambda cs: self.execute(*cs), calls))

    def release(self, state: dict) -> None:
        """An episode ended: its tools free what they kept for it (the python tool ends its interpreter)."""
        for action in self.actions.values():
            if action.stateful:
                action.close_state(state)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
