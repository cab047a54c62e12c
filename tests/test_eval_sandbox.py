"""HumanEval through the sandbox: every canonical solution passes; programs that loop, eat memory,
use the network, fork or write files are stopped and scored as failures, and the test process that
ran them is unharmed."""
from __future__ import annotations

import math
import os
import resource
import socket
import time

import pytest

from puyu.evaluation import humaneval, sandbox
from puyu.evaluation.items import EvalError

LIMITS_AT_START = {r: resource.getrlimit(r) for r in (resource.RLIMIT_AS, resource.RLIMIT_CPU,
                                                       resource.RLIMIT_FSIZE, resource.RLIMIT_NPROC)}
CWD_AT_START = os.getcwd()


@pytest.fixture(scope="module")
def problems():
    return humaneval.load_problems()


def _dead(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # killed, waiting for init to reap it
    except FileNotFoundError:
        return True


def _all_dead(pids: list[int], within_s: float = 3.0) -> bool:
    deadline = time.monotonic() + within_s
    while not all(_dead(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_all_164_canonical_solutions_pass(problems):
    assert len(problems) == 164 and len({p["task_id"] for p in problems}) == 164
    start = time.monotonic()
    results = humaneval.check_many([(p, p["canonical_solution"]) for p in problems], workers=2)
    seconds = time.monotonic() - start
    failed = [(p["task_id"], r) for p, r in zip(problems, results) if not r["passed"]]
    assert failed == []
    assert all(r == {"passed": True, "status": "passed", "detail": "", "sandbox": results[0]["sandbox"]}
               for r in results)
    assert results[0]["sandbox"].startswith("rlimits, ")
    assert seconds < 60, f"164 canonical solutions took {seconds:.1f} s"
    print(f"\n164/164 canonical solutions passed in {seconds:.1f} s (2 workers)")


def test_wrong_solutions_fail_and_results_keep_input_order(problems):
    p0, p1 = problems[0], problems[1]
    pairs = [(p0, "    return False\n"),
             (p1, p1["canonical_solution"]), (p0, "    retrun True\n"), (p0, "    raise ValueError('nope')\n")]
    results = humaneval.check_many(pairs, timeout_s=5, memory_mb=512, workers=2)
    assert [r["status"] for r in results] == ["failed", "passed", "failed", "failed"]
    assert results[0]["detail"] == "AssertionError"
    assert results[2]["detail"].startswith("SyntaxError")
    assert results[3]["detail"] == "ValueError: nope"
    # exiting with 0 before the tests ran is no pass
    assert humaneval.check_completion(p0, "    import sys; sys.exit(0)\n")["status"] == "failed"


@pytest.mark.parametrize("body, returncodes", [("while True:\n    pass", (-24, -9)),  # SIGXCPU or SIGKILL
                                              ("import time\ntime.sleep(60)", (-9,))])
def test_endless_program_times_out(body, returncodes):
    """A busy loop meets RLIMIT_CPU or the wall clock, whichever comes first; a sleeper only the wall clock."""
    result = sandbox.run_python(body, timeout_s=1, memory_mb=256)
    assert result.status == "timeout" and result.seconds < 3
    assert result.returncode in returncodes


@pytest.mark.parametrize("ending", ["while True:\n    pass\n", ""])
def test_forked_grandchildren_die_with_the_run(ending):
    """The program gets around the guard (posix.fork) and leaves sleepers behind, then loops or ends."""
    code = ("import posix, time\npids = []\nfor _ in range(3):\n    pid = posix.fork()\n"
            "    if pid == 0:\n        time.sleep(60)\n        posix._exit(0)\n    pids.append(pid)\n"
            "print(*pids, flush=True)\n" + ending)
    result = sandbox.run_python(code, timeout_s=1.5, memory_mb=256)
    if os.geteuid() != 0:  # RLIMIT_NPROC = 0 refuses the fork before anything is left behind
        assert result.status == "failed" and "BlockingIOError" in result.stderr
        return
    assert result.status == ("timeout" if ending else "passed")
    pids = [int(p) for p in result.stdout.split()]
    assert len(pids) == 3 and _all_dead(pids)


@pytest.mark.parametrize("code", ["import os\nwhile True:\n    os.fork()",
                                  "import subprocess\nsubprocess.run(['sleep', '60'])",
                                  "import os\nos.system('sleep 60')"])
def test_fork_bomb_and_subprocesses_are_refused(code):
    result = sandbox.run_python(code, timeout_s=5, memory_mb=256)
    assert result.status == "failed" and result.seconds < 3
    assert "TypeError: 'NoneType' object is not callable" in result.stderr


@pytest.mark.parametrize("completion", ["    x = bytearray(10**10)\n",
                                        "    x = []\n    while True:\n        x.append(' ' * 10**6)\n"])
def test_memory_hog_is_stopped(problems, completion):
    result = humaneval.check_completion(problems[0], completion, timeout_s=10, memory_mb=256)
    assert {k: result[k] for k in ("passed", "status", "detail")} == {"passed": False, "status": "memory",
                                                                      "detail": "MemoryError"}


@pytest.fixture
def listening_server():
    server = socket.create_server(("127.0.0.1", 0))
    server.setblocking(False)
    yield server
    server.close()


def _saw_connection(server) -> bool:
    try:
        server.accept()[0].close()
        return True
    except BlockingIOError:
        return False


def test_network_use_is_stopped(problems, listening_server):
    port = listening_server.getsockname()[1]
    for attempt in (f"    import socket\n    socket.create_connection(('127.0.0.1', {port}))\n",
                    f"    import urllib.request\n    urllib.request.urlopen('http://127.0.0.1:{port}/')\n",
                    "    import socket\n    socket.getaddrinfo('pypi.org', 443)\n"):
        result = humaneval.check_completion(problems[0], attempt, timeout_s=5, memory_mb=512)
        assert result["status"] == "network" and not result["passed"], attempt
        assert "network access stopped" in result["detail"]
    assert not _saw_connection(listening_server)


def test_network_namespace_holds_when_the_guard_is_bypassed(listening_server):
    port = listening_server.getsockname()[1]
    code = ("import socket\nraw = socket.socket.__mro__[2]  # the C socket type under the guard's classes\n"
            f"raw(socket.AF_INET, socket.SOCK_STREAM).connect(('127.0.0.1', {port}))\n")
    result = sandbox.run_python(code, timeout_s=5, memory_mb=256)
    if result.network != "namespace":
        pytest.skip(f"no network namespace here (isolation: {result.network!r}); the guard is the only layer")
    assert result.status == "failed" and "Network is unreachable" in result.stderr
    assert not _saw_connection(listening_server)


def test_files_stay_in_a_temporary_directory_that_is_removed():
    code = ("import os\nopen('left_behind.txt', 'w').write('x')\n"
            "print(os.environ['HOME'], os.environ['TMPDIR'], os.path.abspath('left_behind.txt'))\n")
    result = sandbox.run_python(code, timeout_s=5, memory_mb=256)
    assert result.status == "passed"
    home, tmp, written = result.stdout.split()
    assert home == tmp and written == os.path.join(home, "left_behind.txt")
    assert os.path.basename(home).startswith("puyu-sandbox-")
    assert not os.path.exists(home) and not os.path.exists("left_behind.txt")


WRITES = """
import os
open('inside.txt', 'w').write('kept')
print('inside', open(os.path.join(os.environ['TMPDIR'], 'inside.txt')).read())
for target in {targets!r}:
    try:
        open(target, 'w').write('x')
        print('wrote', target)
    except OSError as error:
        print('refused', target, error.errno)
"""


def _write_attempts(result) -> dict[str, str]:
    """target -> "wrote" or "refused <errno>", from the lines WRITES prints (after its "inside kept")."""
    first, *rest = result.stdout.splitlines()
    assert first == "inside kept", result.stderr
    return {words[1]: " ".join(words[:1] + words[2:]) for words in map(str.split, rest)}


def test_mount_namespace_leaves_only_the_temporary_directory_writable(tmp_path):
    """Writes outside the run's temporary directory fail with EROFS (30) where the mount namespace is
    active, also as root; where the kernel refuses it the result says so, and nothing else changes."""
    targets = [str(tmp_path / "outside.txt"), f"/usr/local/puyu-sandbox-probe-{os.getpid()}.txt"]
    session = sandbox.PythonSession(5, 256)
    try:
        result = sandbox.run_python(WRITES.format(targets=targets), timeout_s=5, memory_mb=256)
        cell = session.run(WRITES.format(targets=targets))
    finally:
        session.close()
        written = [t for t in targets if os.path.exists(t)]
        for target in written:
            os.remove(target)
    for run in (result, cell):
        assert run.status == "passed", run.stderr
        attempts = _write_attempts(run)
        if run.mounts != "namespace":
            assert run.mounts == "none" and "read-only root" not in run.protections
            pytest.skip(f"the kernel refused the mount namespace here (protections: {run.protections})")
        assert attempts == {target: "refused 30" for target in targets}
        assert run.protections == "rlimits, network namespace, read-only root (mount namespace)"
    assert written == []
    with open(tmp_path / "parent.txt", "w") as f:  # the copies were made read-only, not the parent's mounts
        f.write("still writable")


def test_file_and_output_floods_are_cut_off():
    flood = sandbox.run_python("while True:\n    print('x' * 10000)", timeout_s=10, memory_mb=256)
    assert flood.status == "failed" and flood.seconds < 5
    assert flood.stderr.endswith("OSError: [Errno 27] File too large\n")  # RLIMIT_FSIZE (Python ignores SIGXFSZ)
    assert len(flood.stdout) <= sandbox.TAIL_BYTES
    big = sandbox.run_python("open('big', 'wb').write(bytes(100 << 20))", timeout_s=10, memory_mb=512)
    assert big.status == "failed" and big.stderr.endswith("File too large\n")


def test_destructive_calls_are_disabled():
    code = "import shutil\nshutil.rmtree('/definitely/not/here')"
    result = sandbox.run_python(code, timeout_s=5, memory_mb=256)
    assert result.status == "failed" and "NoneType" in result.stderr


def test_pass_at_k_matches_hand_values():
    assert humaneval.pass_at_k(1, 1, 1) == 1.0
    assert humaneval.pass_at_k(1, 0, 1) == 0.0
    assert humaneval.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert humaneval.pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert humaneval.pass_at_k(200, 1, 100) == pytest.approx(0.5)  # 1 - C(199,100)/C(200,100)
    assert humaneval.pass_at_k(10, 8, 3) == 1.0  # fewer than k failures: some k-subset always passes
    assert humaneval.pass_at_k(200, 0, 100) == 0.0
    for n, c, k in [(20, 5, 10), (100, 37, 10), (200, 13, 100)]:
        assert humaneval.pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), rel=1e-12)
    for bad in [(5, 6, 1), (5, 2, 0), (5, 2, 6), (-1, 0, 1)]:
        with pytest.raises(EvalError, match="pass@k"):
            humaneval.pass_at_k(*bad)


def test_bad_input_is_one_line_eval_error(problems, monkeypatch):
    broken = {k: v for k, v in problems[0].items() if k != "entry_point"}
    with pytest.raises(EvalError, match="HumanEval/0: key 'entry_point' is missing"):
        humaneval.check_completion(broken, "    return True\n")
    with pytest.raises(EvalError, match="completion must be a str"):
        humaneval.check_many([(problems[0], None)])
    with pytest.raises(EvalError, match="memory_mb"):
        sandbox.run_python("pass", timeout_s=1, memory_mb=8)

    def missing(name):
        raise humaneval.importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(humaneval.importlib.metadata, "distribution", missing)
    with pytest.raises(EvalError, match="make data") as err:
        humaneval.load_problems()
    assert "\n" not in str(err.value)


def test_the_test_process_is_unharmed(problems):
    """Runs last: after every hostile program above, this process still has its limits, cwd and network."""
    assert {r: resource.getrlimit(r) for r in LIMITS_AT_START} == LIMITS_AT_START
    assert os.getcwd() == CWD_AT_START
    with socket.create_server(("127.0.0.1", 0)) as server:
        socket.create_connection(server.getsockname(), timeout=5).close()
    assert humaneval.check_completion(problems[2], problems[2]["canonical_solution"])["passed"]
