"""Run untrusted Python programs in isolation; the far side of :mod:`codefoundry.eval.sandbox`.

Started once per worker as ``python -I sandbox_launcher.py`` with a clean environment, it
serves jobs: one JSON object per line on stdin (code and limits, see
:class:`codefoundry.eval.sandbox.SandboxLimits`), one JSON report per line on stdout. It
uses the standard library only and imports nothing from codefoundry; ``-I`` keeps user
paths and ``PYTHON*`` variables out, while the interpreter's installed packages stay
importable, as they are under the official harness. The server never runs untrusted code
itself: every job gets freshly forked processes, so a job inherits nothing from the
previous one, while the interpreter start-up is paid once per worker.

Per job, three processes:

* jail (trusted): enters new mount/network/IPC/UTS namespaces, makes the whole filesystem
  read-only, mounts a private size-limited tmpfs on ``/tmp`` (the working directory) and
  ``/dev/shm``, and exposes the interpreter's library directories read-only under
  ``/tmp/.python`` (the uid running the program may not reach the real ones, e.g. a
  Python installed under ``/root``).
* supervisor (trusted; PID 1 of a new PID namespace): mounts a fresh ``/proc``, starts the
  program, enforces the wall-clock deadline, classifies the outcome and reports. When it
  exits the kernel kills every process left in the namespace, so nothing the program
  started (even with ``setsid``) outlives it.
* program (untrusted): new session, rlimits (CPU, address space, file size, open files,
  processes/threads), an unprivileged uid with no supplementary groups and
  ``no_new_privs``, stdin/stdout/stderr on ``/dev/null``; it ``exec``s the code in fresh
  globals exactly as the official human-eval harness does and writes its verdict as one
  JSON line to a pipe.

Without namespaces (``"namespaces": false``) the jail only makes a private temporary
directory, and the supervisor kills the program's session at the end.

A program written against this harness can forge a "passed" line on its pipe: the
sandbox contains damage, it does not defend the score against code built to cheat it.
"""

from __future__ import annotations

import builtins  # noqa: F401 - the reference guard edits it (and shutil, subprocess) via sys.modules
import ctypes
import faulthandler
import json
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_BIND, MS_REC, MS_PRIVATE = 0x1000, 0x4000, 0x40000
SYS_MOUNT_SETATTR = 442  # same number on every architecture (new-style syscall table)
AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY = -100, 0x8000, 0x1
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38

WORKDIR_NS = "/tmp/work"
PYTHON_DIRS_NS = "/tmp/.python"
MAX_VERDICT_BYTES = 1 << 16
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


def _make_tree_readonly() -> None:
    """Make every mount of this (private) mount namespace read-only, recursively."""
    attr = (ctypes.c_uint64 * 4)(MOUNT_ATTR_RDONLY, 0, 0, 0)  # struct mount_attr
    _check(_libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, b"/", AT_RECURSIVE, ctypes.byref(attr),
                         ctypes.sizeof(attr)), "mount_setattr / read-only")


def enter_namespaces(job: dict) -> tuple[str, dict[str, str]]:
    """Isolate this process's view of the system.

    Returns the working directory and where each import directory of this interpreter
    is visible to the program (original path -> read-only bind mount under /tmp/.python).
    """
    _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWPID),
           "unshare")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing below propagates to the host
    _make_tree_readonly()
    tmp_flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
    _mount("tmpfs", "/tmp", "tmpfs", tmp_flags, f"size={job['tmpfs_bytes']},mode=1777")
    if os.path.isdir("/dev/shm"):
        _mount("tmpfs", "/dev/shm", "tmpfs", tmp_flags, f"size={job['tmpfs_bytes']},mode=1777")
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


def run_program(job: dict, workdir: str, python_dirs: dict[str, str] | None, verdict_fd: int) -> None:
    """The untrusted side: lock down this process, run the code, report. Never returns."""
    try:
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.closerange(3, verdict_fd)
        os.closerange(verdict_fd + 1, 1 << 16)
        cpu = int(job["timeout"]) + 1  # SIGXCPU at the soft limit (a timeout), SIGKILL a second later
        nproc = job["max_procs"]
        if job["uid"] is None:  # we keep the caller's uid, whose existing threads count against the limit
            nproc += _threads_of(os.getuid())
        for limit, soft, hard in ((resource.RLIMIT_CPU, cpu, cpu + 1),
                                  (resource.RLIMIT_AS, job["memory_bytes"], job["memory_bytes"]),
                                  (resource.RLIMIT_FSIZE, job["file_bytes"], job["file_bytes"]),
                                  (resource.RLIMIT_NOFILE, 64, 64),
                                  (resource.RLIMIT_NPROC, nproc, nproc),
                                  (resource.RLIMIT_CORE, 0, 0)):
            resource.setrlimit(limit, (soft, hard))
        os.chdir(workdir)
        if job["uid"] is not None and os.getuid() == 0:
            os.setgroups([])
            os.setgid(job["gid"])
            os.setuid(job["uid"])
        _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl no_new_privs")
        _check(_libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0), "prctl pdeathsig")
        os.environ.clear()
        os.environ.update(HOME=workdir, TMPDIR=workdir, PATH="/usr/bin:/bin", LANG="C.UTF-8",
                          OMP_NUM_THREADS="1")
        if python_dirs is not None:
            _use_python_dirs(python_dirs)
        code = job["code"]
        job.clear()  # the program gets nothing of the harness it does not need
    except BaseException as exc:  # noqa: BLE001 - reported as this program's failure ("setup")
        os.write(verdict_fd, (json.dumps({"error": "setup", "detail": repr(exc)}) + "\n").encode())
        os._exit(70)
    verdict = execute(code)
    os.write(verdict_fd, (json.dumps(verdict) + "\n").encode())
    os._exit(0)


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


def execute(code: str) -> dict:
    """Compile and exec ``code`` in fresh globals, as human-eval's ``unsafe_execute`` does."""
    try:
        compiled = compile(code, "<program>", "exec")
    except (SyntaxError, ValueError) as exc:  # ValueError: source with NUL bytes
        return {"error": "syntax", "detail": _describe(exc)}
    reference_guard()
    try:
        exec(compiled, {})  # noqa: S102 - this is the point; we are inside the sandbox
    except AssertionError as exc:
        return {"error": "assertion", "detail": _describe(exc)}
    except MemoryError as exc:
        return {"error": "memory", "detail": _describe(exc)}
    except (SystemExit, KeyboardInterrupt) as exc:
        return {"error": "exit", "detail": _describe(exc)}
    except BaseException as exc:  # noqa: BLE001 - every other way the program can fail
        return {"error": "exception", "detail": _describe(exc)}
    return {"error": None, "detail": ""}


def _describe(exc: BaseException) -> str:
    try:
        text = f"{type(exc).__name__}: {exc}"
    except BaseException:  # noqa: BLE001 - a hostile __str__
        text = type(exc).__name__
    return text[:300]


def supervise(job: dict, workdir: str, python_dirs: dict[str, str] | None, report_fd: int) -> None:
    """Run the program to completion or its deadline and write one report line. Never returns."""
    _check(_libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0), "prctl pdeathsig")
    if python_dirs is not None:  # we are PID 1 of the new PID namespace
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    verdict_r, verdict_w = os.pipe()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os.close(verdict_r)
        os.close(report_fd)
        run_program(job, workdir, python_dirs, verdict_w)
    os.close(verdict_w)
    deadline = start + job["timeout"]
    pidfd = os.pidfd_open(pid)
    verdict, status, readers = b"", None, [verdict_r, pidfd]
    while status is None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        ready, _, _ = select.select(readers, [], [], remaining)
        if verdict_r in ready:
            chunk = os.read(verdict_r, MAX_VERDICT_BYTES)
            verdict += chunk
            if not chunk or len(verdict) >= MAX_VERDICT_BYTES:
                readers.remove(verdict_r)
        if pidfd in ready:
            status = os.waitpid(pid, 0)[1]
    duration = time.monotonic() - start
    timed_out = status is None
    try:
        os.killpg(pid, signal.SIGKILL)  # whatever is left of the program's session
    except OSError:
        pass
    if timed_out:
        status = os.waitpid(pid, 0)[1]
    os.set_blocking(verdict_r, False)
    try:
        verdict += os.read(verdict_r, MAX_VERDICT_BYTES)
    except BlockingIOError:
        pass
    report = classify(verdict, status, timed_out)
    report["duration"] = round(duration, 4)
    os.write(report_fd, (json.dumps(report) + "\n").encode())
    os._exit(0)


def classify(verdict: bytes, status: int, timed_out: bool) -> dict:
    """Turn the program's own verdict line and its wait status into {error, detail}."""
    if timed_out:
        return {"error": "timeout", "detail": "wall-clock limit"}
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


def jail(job: dict, report_fd: int) -> None:
    """Set up the isolated view for one job and run its supervisor. Never returns."""
    try:
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)  # the job protocol's pipes are not ours to touch
        os.dup2(null, 1)
        if job["namespaces"]:
            workdir, python_dirs = enter_namespaces(job)
        else:
            workdir, python_dirs = tempfile.mkdtemp(prefix="codefoundry-sandbox-"), None
            if job["uid"] is not None and os.getuid() == 0:
                os.chown(workdir, job["uid"], job["gid"])
        pid = os.fork()
        if pid == 0:
            supervise(job, workdir, python_dirs, report_fd)
        os.close(report_fd)
        os.waitpid(pid, 0)
        if python_dirs is None:
            shutil.rmtree(workdir, ignore_errors=True)
    except BaseException as exc:  # noqa: BLE001 - reported to the evaluator as a sandbox failure
        os.write(report_fd, (json.dumps({"error": "sandbox", "detail": repr(exc)}) + "\n").encode())
        os._exit(70)
    os._exit(0)


def run_job(job: dict) -> dict:
    """Fork a jail for ``job`` and return the supervisor's report."""
    report_r, report_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(report_r)
        jail(job, report_w)
    os.close(report_w)
    with os.fdopen(report_r, "rb") as f:
        line = f.readline()
    os.waitpid(pid, 0)
    try:
        return json.loads(line)
    except ValueError:
        return {"error": "sandbox", "detail": "supervisor exited without a report"}


def preload_like_the_reference() -> None:
    """Import numpy once, if installed, as the official harness's process has it loaded.

    numpy's import calls ``os.putenv``, which the reference guard disables, so in the
    official harness ``import numpy`` works only because the harness imported it first;
    without this, a completion using numpy would pass there and fail here.
    """
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # no BLAS threads in a process that forks
    try:
        import numpy  # noqa: F401
    except ImportError:
        pass


def serve() -> None:
    preload_like_the_reference()
    for line in sys.stdin:
        sys.stdout.write(json.dumps(run_job(json.loads(line))) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    serve()
