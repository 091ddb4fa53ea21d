"""Run untrusted code in isolation; the far side of :mod:`codefoundry.sandbox.runner`.

Started once per worker as ``python -I launcher.py`` with a clean environment, it
serves jobs: on stdin, per job, a length-prefixed JSON frame with the code and limits (see
:class:`codefoundry.sandbox.runner.SandboxLimits`) and, for a checked job, a second one with
the test; one JSON report per line on stdout. It uses the standard library only and
imports nothing from codefoundry; ``-I`` keeps user paths and ``PYTHON*`` variables out,
while the interpreter's installed packages stay importable, as they are under the
official harness. The server never runs untrusted code, nor reads a job: it forks a jail
per job, which reads it.

Per job:

* jail (trusted): enters new mount/network/IPC/UTS namespaces, makes the whole filesystem
  read-only, mounts a private size-limited tmpfs on ``/tmp`` (the working directory) and
  ``/dev/shm``, and exposes the interpreter's library directories read-only under
  ``/tmp/.python`` (the uid running the program may not reach the real ones, e.g. a
  Python installed under ``/root``).
* supervisor (trusted; PID 1 of a new PID namespace): mounts a fresh ``/proc``, starts the
  processes below, enforces the wall-clock deadline and reports. When it exits the kernel
  kills every process left in the namespace, so nothing the program started (even with
  ``setsid``) outlives it.
* program (untrusted): forked before the test is read (so no copy of it is in its memory),
  in a new session, with rlimits (CPU, address space, file size, open files,
  processes/threads), an unprivileged uid with no supplementary groups and
  ``no_new_privs``, stdin/stdout/stderr on ``/dev/null``. It ``exec``s the code in fresh
  globals exactly as the official human-eval harness does.
* checker (trusted, only for a checked job): runs the benchmark's test. The program's
  process never sees the test, so it cannot read the expected values, trace or replace
  ``check()``, or patch what the test uses. The test calls the program's functions over a
  pipe; what crosses back is plain data (None, bool, int, float, complex, str, bytes and
  containers of them), rebuilt by the checker as genuine builtins, so an object whose
  ``__eq__`` is always true never reaches a comparison: any other object stays in the
  program's process, and the test holds an opaque handle to it, compared by identity.
  Only the checker holds the verdict pipe, and it is not dumpable (no ptrace, no
  ``/proc/PID/fd``), so the program cannot write the verdict.

A plain job (no test split) is checked by the program's own process, so a program written
against this harness can forge it: plain jobs contain damage, they do not defend a score.

Without namespaces (``"namespaces": false``) the jail only makes a private temporary
directory, and the supervisor kills the program's session at the end.

``--command`` runs one shell command for the agent's ``bash`` tool (see
:func:`run_command`) with the same namespace machinery, or, unsandboxed, as a child
subreaper that kills everything the command started.
"""

from __future__ import annotations

import ctypes
import faulthandler
import json
import os
import resource
import select
import shutil
import signal
import subprocess  # noqa: F401 - the reference guard edits it via sys.modules
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # wire.py lies next to this script
from wire import (
    Channel,
    Handles,
    Link,
    ProgramExit,
    ProgramGone,
    ProtocolError,
    decode,
    describe,
    encode_global,
    send,
    serve_calls,
    trusted_module,
)

del sys.path[0]  # programs must not import this directory's modules

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_BIND, MS_REC, MS_PRIVATE = 0x1000, 0x4000, 0x40000
SYS_MOUNT_SETATTR = 442  # same number on every architecture (new-style syscall table)
AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY = -100, 0x8000, 0x1
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 4, 24, 38
PR_SET_CHILD_SUBREAPER = 36
LINUX_CAPABILITY_VERSION_3 = 0x20080522

WORKDIR_NS = "/tmp/work"
PYTHON_DIRS_NS = "/tmp/.python"
MAX_VERDICT_BYTES = 1 << 16
NO_MORE_JOBS = 3  # a jail's exit code at the end of the job stream
# What the program process itself may report; "setup" means locking it down failed (the
# evaluator's start-up probe catches a sandbox that always fails that way).
PROGRAM_ERRORS = (None, "syntax", "assertion", "exception", "memory", "exit", "setup")

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    def c_str(s: str | None) -> bytes | None:
        return s.encode() if s is not None else None

    _check(_libc.mount(c_str(source), c_str(target), c_str(fstype), ctypes.c_ulong(flags), c_str(data)),
           f"mount {target}")


def _set_readonly(path: str, readonly: bool, recursive: bool) -> None:
    """Set or clear the read-only flag of the mount at ``path`` (and the mounts below it)."""
    attr = (ctypes.c_uint64 * 4)(MOUNT_ATTR_RDONLY if readonly else 0, 0 if readonly else MOUNT_ATTR_RDONLY, 0, 0)
    _check(_libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, path.encode(), AT_RECURSIVE if recursive else 0,
                         ctypes.byref(attr), ctypes.sizeof(attr)), f"mount_setattr {path}")


def _private_readonly_root(tmpfs_bytes: int, hold: str | None = None) -> int | None:
    """In fresh namespaces: nothing propagates to the host, every mount is read-only, and
    ``/tmp`` and ``/dev/shm`` are private tmpfs. Returns a descriptor on the directory
    ``hold`` taken before /tmp is covered (None without ``hold``)."""
    _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWPID), "unshare")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _set_readonly("/", True, recursive=True)
    held = os.open(hold, os.O_PATH | os.O_DIRECTORY) if hold is not None else None
    tmp_flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
    _mount("tmpfs", "/tmp", "tmpfs", tmp_flags, f"size={tmpfs_bytes},mode=1777")
    if os.path.isdir("/dev/shm"):
        _mount("tmpfs", "/dev/shm", "tmpfs", tmp_flags, f"size={tmpfs_bytes},mode=1777")
    return held


def enter_namespaces(job: dict) -> tuple[str, dict[str, str]]:
    """Isolate this process's view of the system.

    Returns the working directory and where each import directory of this interpreter
    is visible to the program (original path -> read-only bind mount under /tmp/.python).
    """
    _private_readonly_root(job["tmpfs_bytes"])
    os.mkdir(WORKDIR_NS, 0o700)
    os.chown(WORKDIR_NS, job["uid"], job["gid"])
    python_dirs = {}
    for path in sys.path:
        if os.path.isdir(path) and path not in python_dirs:
            target = f"{PYTHON_DIRS_NS}/{len(python_dirs)}"
            os.makedirs(target)
            _mount(path, target, None, MS_BIND)  # inherits the read-only flag of its source
            python_dirs[path] = target
    return WORKDIR_NS, python_dirs


def _use_python_dirs(python_dirs: dict[str, str]) -> None:
    """Point sys.path and the already-imported packages' __path__ at the bind mounts."""
    def remap(path: str) -> str:
        for orig in sorted(python_dirs, key=len, reverse=True):
            if path == orig or path.startswith(orig + os.sep):
                return python_dirs[orig] + path[len(orig):]
        return path

    sys.path[:] = [remap(p) for p in sys.path]
    for module in list(sys.modules.values()):
        if isinstance(getattr(module, "__path__", None), list):
            module.__path__[:] = [remap(p) for p in module.__path__]
    sys.path_importer_cache.clear()


def _threads_of(uid: int) -> int:
    """Threads owned by ``uid`` now: RLIMIT_NPROC counts all of them, not just the program's."""
    count = 0
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit() and os.stat(f"/proc/{pid}").st_uid == uid:
                count += len(os.listdir(f"/proc/{pid}/task"))
        except OSError:
            continue  # the process ended meanwhile
    return count


def _null_stdio() -> None:
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def _set_limits(limits: list[tuple[int, int]]) -> None:
    for limit, value in limits:
        resource.setrlimit(limit, (value, value))


def lock_down(job: dict, keep_fds: tuple[int, ...]) -> None:
    """The program process's confinement, applied to itself before it reads any code."""
    os.setsid()
    _null_stdio()
    keep = sorted(keep_fds)
    for low, high in zip([3] + [fd + 1 for fd in keep], keep + [1 << 16]):
        os.closerange(low, high)
    cpu = int(job["timeout"]) + 1  # SIGXCPU at the soft limit (a timeout), SIGKILL a second later
    nproc = job["max_procs"]
    if job["uid"] is None:  # we keep the caller's uid, whose existing threads count against the limit
        nproc += _threads_of(os.getuid())
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    _set_limits([(resource.RLIMIT_AS, job["memory_bytes"]), (resource.RLIMIT_FSIZE, job["file_bytes"]),
                 (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_NPROC, nproc), (resource.RLIMIT_CORE, 0)])
    os.chdir(job["workdir"])
    if job["uid"] is not None and os.getuid() == 0:
        os.setgroups([])
        os.setgid(job["gid"])
        os.setuid(job["uid"])
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl no_new_privs")
    _check(_libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0), "prctl pdeathsig")
    os.environ.clear()
    os.environ.update(HOME=job["workdir"], TMPDIR=job["workdir"], PATH="/usr/bin:/bin", LANG="C.UTF-8",
                      OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    if job["python_dirs"] is not None:
        _use_python_dirs(job["python_dirs"])


# What the reference harnesses' ``reliability_guard`` disables before running a program
# (human-eval, human-eval-infilling, bigcode's MBPP). It is no protection: anything can
# reach these through ``posix`` or ``ctypes``, and the sandbox above is what contains
# them. It is replicated so that verdicts match: a completion that calls ``os.system``
# or ``exit()`` fails there, so it must fail here too.
REFERENCE_GUARD = {
    "os": ("kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork", "forkpty",
           "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown", "chmod", "chown",
           "chroot", "lchflags", "lchmod", "lchown", "getcwd", "chdir"),
    "shutil": ("rmtree", "move", "chown"),
    "subprocess": ("Popen",),
    "builtins": ("exit", "quit", "help"),
}
REFERENCE_BLOCKED_MODULES = ("ipdb", "joblib", "resource", "psutil", "tkinter")


def reference_guard() -> None:
    faulthandler.disable()
    for module, names in REFERENCE_GUARD.items():  # all imported at the top of this file
        for name in names:
            setattr(sys.modules[module], name, None)
    for name in REFERENCE_BLOCKED_MODULES:
        sys.modules[name] = None  # type: ignore[assignment]


def execute(code: str, namespace: dict) -> dict:
    """Compile and exec ``code`` in ``namespace``, as human-eval's ``unsafe_execute`` does
    (after the reference guard); return {error, detail}."""
    try:
        compiled = compile(code, "<program>", "exec")
    except (SyntaxError, ValueError) as exc:  # ValueError: source with NUL bytes
        return {"error": "syntax", "detail": describe(exc)}
    reference_guard()
    try:
        exec(compiled, namespace)  # noqa: S102 - this is the point; we are inside the sandbox
    except (ProgramGone, ProtocolError):
        raise  # the checker's channel failed: not a verdict on the test
    except BaseException as exc:  # noqa: BLE001 - every way the program can fail
        return _failure(exc)
    return {"error": None, "detail": ""}


def _failure(exc: BaseException) -> dict:
    """{error, detail} for an exception, by its class as bound when this module was imported
    (rebinding ``builtins.AssertionError`` afterwards changes nothing)."""
    kind = next((kind for classes, kind in _FAILURE_KINDS if isinstance(exc, classes)), "exception")
    return {"error": kind, "detail": describe(exc)}


_FAILURE_KINDS = ((AssertionError, "assertion"), (MemoryError, "memory"),
                  ((SystemExit, KeyboardInterrupt, ProgramExit), "exit"))


# ---- the program's process ---------------------------------------------------------------

def run_program(job: dict, read_fd: int, write_fd: int) -> None:
    """The untrusted side: lock down this process, run the code, report its outcome, then (for a
    checked job) serve the checker's calls until it closes the channel. Never returns."""
    channel = Channel(read_fd, write_fd)
    try:
        lock_down(job, (read_fd, write_fd))
        code = job.pop("code")
        checked = job["checked"]
        job.clear()  # the program gets nothing of the harness it does not need
    except BaseException as exc:  # noqa: BLE001 - reported as this program's failure ("setup")
        channel.send({"error": "setup", "detail": repr(exc)})
        os._exit(70)
    namespace: dict = {}
    result = execute(code, namespace)
    if not checked or result["error"] is not None:
        channel.send(result)
        os._exit(0)
    handles = Handles()
    channel.send({"globals": {name: encode_global(value, handles) for name, value in namespace.items()
                              if name != "__builtins__"}})
    serve_calls(channel, handles)
    os._exit(0)


def _import_numpy() -> None:
    """Import numpy once, if installed, as the official harness's process has it loaded:
    numpy's import calls ``os.putenv``, which the reference guard disables, so there
    ``import numpy`` works only because the harness imported it first."""
    try:
        import numpy  # noqa: F401
    except ImportError:
        pass


def check(tests: dict, channel: Channel) -> dict:
    """The checker's verdict: over the trusted prelude, the program's globals the test is meant to
    take (``tests["names"]``) and the modules it imported; then the test."""
    first = channel.receive()
    if "globals" not in first:  # the program failed on its own, or broke the protocol
        error = first.get("error")
        if error not in PROGRAM_ERRORS or error is None:
            raise ProtocolError("a first message that is neither globals nor a failure")
        return {"error": error, "detail": str(first.get("detail", ""))[:300]}
    reference_guard()  # as the official harness runs all of it; and a module named below imports guarded
    namespace: dict = {}
    exec(compile(tests["prelude"], "<prelude>", "exec"), namespace)  # noqa: S102 - the benchmark's own code
    trusted = set(namespace)
    link = Link(channel)
    if type(first["globals"]) is not dict:
        raise ProtocolError("globals that are not an object")
    wanted = set(tests["names"])
    for name, data in first["globals"].items():
        is_module = type(data) is dict and set(data) == {"m"}
        if name not in trusted and (name in wanted or is_module):
            namespace[name] = decode(data, link.remote, trusted_module)
    return execute(tests["test"], namespace)


def run_checker(job: dict, tests: dict, channel: Channel, verdict_fd: int) -> None:
    """The trusted side of a checked job. Never returns."""
    try:
        _check(_libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0), "prctl dumpable")
        _check(_libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0), "prctl pdeathsig")
        _null_stdio()
        cpu = int(job["timeout"]) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        _set_limits([(resource.RLIMIT_AS, job["memory_bytes"]), (resource.RLIMIT_CORE, 0)])
        verdict = check(tests, channel)
    except ProgramGone:
        verdict = {"error": "gone", "detail": "the program's process ended during the test"}
    except ProtocolError as exc:
        verdict = {"error": "protocol", "detail": describe(exc)}
    except BaseException as exc:  # noqa: BLE001 - e.g. the program stopped reading (EPIPE)
        verdict = _failure(exc)
    os.write(verdict_fd, (json.dumps(verdict) + "\n").encode())
    os._exit(0)


# ---- the supervisor ----------------------------------------------------------------------

def start_program(job: dict, read_fd: int, write_fd: int) -> int:
    """Fork the program process; return its pid."""
    pid = os.fork()
    if pid == 0:
        run_program(job, read_fd, write_fd)
    return pid


def _await_exit(pid: int, fd: int, deadline: float) -> tuple[bytes, int | None]:
    """Read ``fd`` until process ``pid`` exits or the deadline; (what was read, wait status or None)."""
    pidfd = os.pidfd_open(pid)
    data, status, readers = b"", None, [fd, pidfd]
    while status is None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        ready, _, _ = select.select(readers, [], [], remaining)
        if fd in ready:
            chunk = os.read(fd, MAX_VERDICT_BYTES)
            data += chunk
            if not chunk or len(data) >= MAX_VERDICT_BYTES:
                readers.remove(fd)
        if pidfd in ready:
            status = os.waitpid(pid, 0)[1]
    os.close(pidfd)
    os.set_blocking(fd, False)
    try:
        data += os.read(fd, MAX_VERDICT_BYTES)
    except BlockingIOError:
        pass
    return data, status


def supervise(job: dict, job_fd: int, report_fd: int) -> None:
    """Run the program (and its checker) to completion or the deadline; write one report line.
    A checked job's test is read from ``job_fd`` only once the program is forked, so it is
    never in the program's memory. Never returns."""
    tests = None
    try:
        _check(_libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0), "prctl pdeathsig")
        if job["python_dirs"] is not None:  # we are PID 1 of the new PID namespace
            _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        program_in_r, program_in_w = os.pipe()
        program_out_r, program_out_w = os.pipe()
        start = time.monotonic()
        program = start_program(job, program_in_r, program_out_w)
    finally:  # even on failure, so that the next job's frame comes next
        tests = json.loads(_read_frame(job_fd) or b"null") if job["checked"] else None
    os.close(program_in_r)
    os.close(program_out_w)
    checker = None
    if tests is not None:
        verdict_r, verdict_w = os.pipe()
        checker = os.fork()
        if checker == 0:
            os.close(verdict_r)
            os.close(report_fd)
            run_checker(job, tests, Channel(program_out_r, program_in_w), verdict_w)
        os.close(verdict_w)
        os.close(program_in_w)
        os.close(program_out_r)
        verdict, status = _await_exit(checker, verdict_r, start + job["timeout"])
    else:
        os.close(program_in_w)
        verdict, status = _await_exit(program, program_out_r, start + job["timeout"])
    duration = time.monotonic() - start
    if status is None:
        report = {"error": "timeout", "detail": "wall-clock limit"}
    elif tests is not None:
        report = classify_checked(verdict, status, lambda: _exit_status(program))
    else:
        report = classify(verdict, status)
    report["duration"] = round(duration, 4)
    for kill, pid in ((os.killpg, program), (os.kill, program), (os.kill, checker)):  # the program's session
        try:
            if pid is not None:
                kill(pid, signal.SIGKILL)
        except OSError:
            pass
    send(report_fd, report)
    os._exit(0)


def _exit_status(pid: int, wait_s: float = 0.2) -> int | None:
    """The wait status of ``pid`` if it ends within ``wait_s``, else None. (A process's pipes
    close just before it can be waited for, so the checker may see it go a little early.)"""
    pidfd = os.pidfd_open(pid)
    try:
        select.select([pidfd], [], [], wait_s)
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None
    finally:
        os.close(pidfd)
    return status if done else None


def classify(verdict: bytes, status: int) -> dict:
    """{error, detail} from the program's own verdict line (a plain job) and its wait status."""
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGXCPU:
        return {"error": "timeout", "detail": "CPU-time limit"}
    line = verdict.split(b"\n", 1)[0]
    try:
        reported = json.loads(line)
        if isinstance(reported, dict) and "error" in reported:
            # The line comes from the untrusted process: keep it to the kinds it may report.
            error = reported["error"] if reported["error"] in PROGRAM_ERRORS else "exception"
            return {"error": error, "detail": str(reported.get("detail", ""))[:300]}
    except ValueError:
        pass
    if os.WIFSIGNALED(status):
        return {"error": "crash", "detail": f"killed by {signal.Signals(os.WTERMSIG(status)).name}"}
    return {"error": "exit", "detail": f"exited with code {os.waitstatus_to_exitcode(status)} before finishing"}


def classify_checked(verdict: bytes, checker_status: int, program_status: Callable[[], int | None]) -> dict:
    """{error, detail} from the checker's verdict; when the program's process ended under the
    test, its wait status (``program_status()``) says how."""
    try:
        report = json.loads(verdict.split(b"\n", 1)[0])
    except ValueError:
        report = classify(b"", checker_status)  # the checker itself died (its own limits)
        report["detail"] = "checker: " + report["detail"]
        return report
    if report["error"] == "gone":
        status = program_status()
        if status is None:
            return {"error": "exit", "detail": "the program closed its channel during the test"}
        return classify(b"", status)
    return report


def _read_frame(fd: int) -> bytes | None:
    """One length-prefixed frame ("N\\n" then N bytes), read without reading past it; None at EOF."""
    header = b""
    while not header.endswith(b"\n"):
        byte = os.read(fd, 1)
        if not byte:
            return None
        header += byte
    size, data = int(header), b""
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def jail() -> None:
    """Read one job from stdin, set up its isolated view, run its supervisor and relay its report
    to stdout. Never returns; exits NO_MORE_JOBS at the end of stdin."""
    job_fd, out_fd = os.dup(0), os.dup(1)  # the job protocol's pipes, out of reach of our children
    job = {}
    try:
        _null_stdio()
        frame = _read_frame(job_fd)
        if frame is None:
            os._exit(NO_MORE_JOBS)
        job = json.loads(frame)
        if job["namespaces"]:
            workdir, python_dirs = enter_namespaces(job)
        else:
            import tempfile  # here: the program process, forked from this one, needs none of it

            workdir, python_dirs = tempfile.mkdtemp(prefix="codefoundry-sandbox-"), None
            if job["uid"] is not None and os.getuid() == 0:
                os.chown(workdir, job["uid"], job["gid"])
        job.update(workdir=workdir, python_dirs=python_dirs)
        report_r, report_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(report_r)
            os.close(out_fd)
            try:
                supervise(job, job_fd, report_w)
            except BaseException as exc:  # noqa: BLE001 - reported by the jail as a sandbox failure
                send(report_w, {"error": "sandbox", "detail": repr(exc)})
            os._exit(70)
        os.close(report_w)
        with os.fdopen(report_r, "rb") as f:
            report = f.readline()
        os.waitpid(pid, 0)
        if python_dirs is None:
            shutil.rmtree(workdir, ignore_errors=True)
        os.write(out_fd, report if report.endswith(b"\n") else
                 (json.dumps({"error": "sandbox", "detail": "supervisor exited without a report"}) + "\n").encode())
    except BaseException as exc:  # noqa: BLE001 - reported to the evaluator as a sandbox failure
        if job.get("checked") and "workdir" not in job:
            _read_frame(job_fd)  # the test frame the supervisor never got to read
        send(out_fd, {"error": "sandbox", "detail": repr(exc)})
    os._exit(0)


def serve() -> None:
    """Fork a jail per job. This process never reads a job itself, so nothing of a test is in
    the memory the program processes are forked from; nor is it dumpable (nor its forks): a
    program running with this uid cannot trace it."""
    _check(_libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0), "prctl dumpable")
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # no BLAS threads in a process that forks
    _import_numpy()
    while True:
        pid = os.fork()
        if pid == 0:
            jail()
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        if code == NO_MORE_JOBS:
            return
        if code != 0:
            send(1, {"error": "sandbox", "detail": f"the jail exited with {code}"})


# ---- shell commands for the agent --------------------------------------------------------

def run_command(job: dict) -> None:
    """Run ``bash -c job["command"]`` in ``job["workspace"]`` until it ends or its timeout, then
    kill everything it started; write {exit_code | timed_out | error} to ``job["status_fd"]``.

    Sandboxed: new namespaces, a read-only filesystem but for the workspace and a private
    /tmp, no network, rlimits, no capabilities, in a PID namespace whose end kills all.
    Otherwise the command keeps the user's rights, and this process, a child subreaper,
    inherits whatever the command orphans (``setsid`` daemons included) and kills it.
    Never returns.
    """
    status_fd = job["status_fd"]
    os.set_inheritable(status_fd, False)
    try:
        if job["sandbox"]:
            _command_namespaces(job)
        else:
            _check(_libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl subreaper")
        pid = os.fork()
        if pid == 0:
            (_command_init if job["sandbox"] else _exec_command)(job)
        null = os.open(os.devnull, os.O_RDWR)
        _, status = _await_exit(pid, null, time.monotonic() + job["timeout"])
        if status is None:
            os.kill(pid, signal.SIGKILL)  # sandboxed: PID 1, and with it the namespace
            os.waitpid(pid, 0)
        _kill_descendants()
        report = {"timed_out": True} if status is None else {"exit_code": _shell_code(status)}
    except BaseException as exc:  # noqa: BLE001 - reported as the runner's failure
        report = {"error": repr(exc)}
    os.write(status_fd, json.dumps(report).encode())
    os._exit(0)


def _command_namespaces(job: dict) -> None:
    """Private namespaces with only the workspace (and /tmp, /dev/shm) writable."""
    workspace = job["workspace"]
    held = _private_readonly_root(job["tmpfs_bytes"], hold=workspace)
    os.makedirs(workspace, exist_ok=True)  # in the new /tmp when the workspace lived in the old one
    _mount(f"/proc/self/fd/{held}", workspace, None, MS_BIND)
    os.close(held)
    _set_readonly(workspace, False, recursive=False)


def _command_init(job: dict) -> None:
    """PID 1 of the command's namespace: run the command, reap, exit with its code. Never returns."""
    try:
        _check(_libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0), "prctl pdeathsig")
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        pid = os.fork()
        if pid == 0:
            _exec_command(job)
        while True:
            done, status = os.wait()
            if done == pid:
                os._exit(_shell_code(status))
    except BaseException:  # noqa: BLE001 - exit code 125 is reported; the namespace dies with us
        os._exit(125)


def _exec_command(job: dict) -> None:
    """Become the command (sandboxed: with rlimits and without capabilities). Never returns."""
    try:
        os.setsid()
        os.chdir(job["workspace"])
        env = dict(os.environ)
        if job["sandbox"]:
            cpu = int(job["timeout"]) + 1
            # RLIMIT_DATA, not RLIMIT_AS: runtimes that reserve address space (JVM, V8, Go) still start.
            _set_limits([(resource.RLIMIT_CPU, cpu), (resource.RLIMIT_DATA, job["memory_bytes"]),
                         (resource.RLIMIT_FSIZE, job["file_bytes"]), (resource.RLIMIT_NOFILE, 1024),
                         (resource.RLIMIT_NPROC, 512), (resource.RLIMIT_CORE, 0)])
            _drop_capabilities()
            _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl no_new_privs")
            env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "HOME": "/tmp",
                   "TMPDIR": "/tmp"}
        os.execvpe("bash", ["bash", "-c", job["command"]], env)
    except BaseException as exc:  # noqa: BLE001 - shown to the model with the command's output
        os.write(2, f"cannot run the command: {exc!r}\n".encode())
    finally:
        os._exit(127)


def _drop_capabilities() -> None:
    """Leave root (if we are root) without any capability, now or after exec: it cannot remount
    the read-only filesystem, and RLIMIT_NPROC still does not bind uid 0."""
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for cap in range(last + 1):
        _check(_libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), "prctl capbset_drop")
    header = (ctypes.c_uint32 * 2)(LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable, twice (64 bits)
    _check(_libc.capset(ctypes.byref(header), ctypes.byref(data)), "capset")


def _shell_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code


def _kill_descendants() -> None:
    """SIGKILL every live descendant (as subreaper, orphans are ours too) and reap them."""
    me = os.getpid()
    while True:
        parents: dict[int, list[int]] = {}
        for entry in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
            except (OSError, IndexError, ValueError):
                continue
            if fields[0] != b"Z":
                parents.setdefault(int(fields[1]), []).append(int(entry))
        live, todo = [], list(parents.get(me, []))
        while todo:
            pid = todo.pop()
            live.append(pid)
            todo += parents.get(pid, [])
        for pid in live:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        while True:  # reap what died (ours directly, or reparented to us)
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break
        if not live:
            return
        time.sleep(0.01)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--command"]:
        run_command(json.loads(sys.argv[2]))
    else:
        serve()
