"""Execute untrusted generated programs, each isolated in its own processes, in parallel.

Programs go to ``launcher.py`` servers (one ``python -I`` per worker, started
with an empty environment so no secret is inherited), which fork fresh processes for every
program. What isolation holds depends on what the OS grants, probed once per
:class:`Sandbox`:

* as root with namespaces (the normal case on these machines and in containers with
  CAP_SYS_ADMIN): new PID/network/mount/IPC/UTS namespaces, read-only filesystem with a
  private tmpfs working directory, an unprivileged uid (65534) so that RLIMIT_NPROC binds
  (it does not bind root), ``no_new_privs``, rlimits on CPU, memory, file size, open
  files and processes/threads, and a wall-clock deadline after which every process the
  program started is killed with its PID namespace;
* otherwise rlimits, a new session killed on the deadline, a private temporary directory
  and the clean environment only (:attr:`Sandbox.isolation` says which, and a warning is
  logged), because an unprivileged process cannot change uid or enter namespaces.

RLIMIT_NPROC counts every process of the sandbox uid, so concurrent programs share it: a
fork bomb in one can make another's fork fail (benchmark programs do not fork).

A :class:`CheckedProgram` (what scoring uses) is judged by a separate checker process that
runs the test and talks to the program over a pipe, so a program built to cheat cannot
forge its verdict; :meth:`Sandbox.verdict_integrity` lists which guarantees hold on this
host. A plain program string is judged by its own process (it passes if it runs to the
end), which contains damage but can be forged.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import queue
import select
import subprocess
import sys
import weakref
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

from codefoundry.errors import UserError

log = logging.getLogger(__name__)

LAUNCHER = Path(__file__).with_name("launcher.py")
NOBODY = 65534
MB = 1 << 20
# Extra wall-clock time a launcher gets beyond the program's own deadline (start-up,
# namespace set-up) before we treat the sandbox itself as broken.
LAUNCHER_GRACE_S = 15.0


class SandboxError(UserError):
    """The sandbox machinery itself failed or cannot run here (not the program under test)."""


@dataclass(frozen=True)
class SandboxLimits:
    """Per-program limits. The 3 s timeout is the one the official HumanEval harness uses."""

    timeout: float = 3.0
    memory_mb: int = 1024
    # Processes + threads: of uid 65534 in all (concurrent programs share it) when run as root,
    # else beyond those the user already has.
    max_procs: int = 16
    file_mb: int = 16
    tmpfs_mb: int = 64


@dataclass(frozen=True)
class CheckedProgram:
    """A program split so that the code under test never meets its test.

    ``code`` (the answer's module) runs alone in the untrusted process. The checker runs
    ``prelude`` (the benchmark's own definitions the test relies on, e.g. a prompt's helper
    functions), binds over it the program's globals listed in ``names`` (what the test is
    meant to take from the program, e.g. the entry point) and the modules the program
    imported, then runs ``test``; the program's functions are called across the process
    boundary. Other globals of the program (say a function named ``abs``) never reach the test.
    """

    code: str
    prelude: str
    test: str
    names: tuple[str, ...]


# Imports modules the launcher has not loaded (an extension module, a pure module, and a
# submodule of a loaded package): each needs the interpreter's library directories to be
# readable by the sandbox uid. The test exercises the checker's calls and values.
PROBE_PROGRAM = CheckedProgram(code="import cmath, colorsys, json.tool\ndef f(x):\n    return [x, (x,), {x}]\n",
                               prelude="import math\n", test="assert f(math.pi) == [math.pi, (math.pi,), {math.pi}]\n",
                               names=("f",))


@dataclass(frozen=True)
class ExecResult:
    """Outcome of one program. ``error`` is None when it ran to the end without raising,
    else one of: syntax, assertion, exception, memory, timeout, exit (SystemExit or exited
    early), crash (killed by a signal), setup (the sandbox could not lock it down), protocol
    (the program's process sent the checker something malformed: a program built to cheat)."""

    error: str | None
    detail: str
    duration: float

    @property
    def passed(self) -> bool:
        return self.error is None


class Sandbox:
    """Runs programs in isolation; construct once and reuse (the capability probe runs once).

    ``namespaces=None`` probes for them; tests pass False to exercise the fallback.
    """

    def __init__(self, limits: SandboxLimits | None = None, workers: int | None = None,
                 namespaces: bool | None = None) -> None:
        self.limits = limits or SandboxLimits()
        self.workers = max(1, workers or len(os.sched_getaffinity(0)))
        self.root = os.geteuid() == 0
        self._idle: queue.SimpleQueue[_Server] = queue.SimpleQueue()
        self._finalizer = weakref.finalize(self, _close_servers, self._idle)
        self.namespaces = self._probe(namespaces)

    @property
    def isolation(self) -> list[str]:
        """The mechanisms in force, for reports."""
        held = ["own process + session", "clean environment", "rlimits (cpu, memory, files, nproc)",
                "wall-clock deadline"]
        if self.root:
            held.append(f"unprivileged uid {NOBODY}, no_new_privs")
        if self.namespaces:
            held += ["pid/net/mount/ipc/uts namespaces", "read-only filesystem + private tmpfs"]
        else:
            held.append("private temporary directory")
        return held

    def verdict_integrity(self) -> dict[str, bool]:
        """Which guarantees protect a checked program's verdict against a program built to cheat.

        Verdicts are unforgeable only when all hold. Without root the program keeps the
        evaluator's uid, so it can still reach the evaluator's pipes and files."""
        return {
            "the verdict comes from a checker process; the program's own process never reports it": True,
            "the test runs only in the checker: the program cannot read it, trace it or replace check()": True,
            "results cross as plain data rebuilt by the checker: a forged __eq__ is never called": True,
            "the test takes only its target names and imported modules from the program (no shadowed "
            "builtins or prompt helpers)": True,
            "the program runs under another uid, so it cannot signal, trace or write to the checker "
            "or to the evaluator's pipes (through /proc)": self.root,
            "the program cannot modify the evaluator's files (including this harness)": self.root,
        }

    def _probe(self, namespaces: bool | None) -> bool:
        """Use namespaces when allowed; either way check that a program can run and import."""
        probe = None
        if namespaces is None and self.root:
            try:
                probe, namespaces = self._launch(PROBE_PROGRAM, namespaces=True), True
            except SandboxError as exc:
                log.warning("sandbox: namespaces unavailable (%s); falling back to uid %d + rlimits", exc, NOBODY)
                namespaces = False
        elif namespaces is None:
            log.warning("sandbox: not running as root, so programs keep this uid and share the network "
                        "and filesystem (rlimits and a deadline only); run evaluation as root or in a "
                        "container for full isolation")
            namespaces = False
        probe = probe or self._launch(PROBE_PROGRAM, namespaces)
        if not probe.passed:
            hint = "" if namespaces or not self.root else (
                f"; without namespaces the Python installation must be readable by uid {NOBODY}")
            raise SandboxError(f"sandbox self-test failed ({probe.error}: {probe.detail}){hint}")
        return namespaces

    def _launch(self, program: str | CheckedProgram, namespaces: bool) -> ExecResult:
        lim = self.limits
        checked = isinstance(program, CheckedProgram)
        job = {"code": program.code if checked else program, "checked": checked, "timeout": lim.timeout, "memory_bytes": lim.memory_mb * MB,
               "max_procs": lim.max_procs, "file_bytes": lim.file_mb * MB, "tmpfs_bytes": lim.tmpfs_mb * MB,
               "uid": NOBODY if self.root else None, "gid": NOBODY if self.root else None,
               "namespaces": namespaces}
        try:
            server = self._idle.get_nowait()
        except queue.Empty:
            server = _Server()
        try:
            tests = {"prelude": program.prelude, "test": program.test, "names": program.names} if checked else None
            report = server.request(job, tests, lim.timeout + LAUNCHER_GRACE_S)
        except BaseException:
            server.close()
            raise
        self._idle.put(server)
        if report["error"] == "sandbox":
            raise SandboxError(f"sandbox set-up failed: {report['detail']}")
        return ExecResult(report["error"], report["detail"], report["duration"])

    def run(self, program: str | CheckedProgram) -> ExecResult:
        """Run one program and return how it ended."""
        return self._launch(program, self.namespaces)

    def run_many(self, programs: Iterable[str | CheckedProgram]) -> Iterator[tuple[int, ExecResult]]:
        """Run programs ``workers`` at a time; yield (index, result) in completion order."""
        with ThreadPoolExecutor(self.workers) as pool:
            futures = {pool.submit(self.run, code): i for i, code in enumerate(programs)}
            try:
                for future in as_completed(futures):
                    yield futures[future], future.result()
            finally:
                for future in futures:
                    future.cancel()

    def describe(self) -> dict:
        return {"isolation": self.isolation, "verdict_integrity": self.verdict_integrity(), "workers": self.workers,
                **asdict(self.limits)}

    def close(self) -> None:
        """Stop the launcher servers (also done at garbage collection, and they exit by
        themselves when this process dies)."""
        self._finalizer()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _close_servers(idle: queue.SimpleQueue) -> None:
    while True:
        try:
            idle.get_nowait().close()
        except queue.Empty:
            return


class _Server:
    """One launcher process; serves one job at a time over JSON lines."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-I", str(LAUNCHER)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, cwd="/", env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})

    def request(self, job: dict, tests: dict | None, timeout: float) -> dict:
        """Send a job (and a checked job's tests, as a second frame) and wait for its report."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        frames = [json.dumps(job).encode()] + ([json.dumps(tests).encode()] if tests is not None else [])
        try:
            self.proc.stdin.write(b"".join(b"%d\n%s" % (len(f), f) for f in frames))
            self.proc.stdin.flush()
        except BrokenPipeError as exc:
            raise SandboxError(f"sandbox launcher died (exit {self.proc.poll()})") from exc
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise SandboxError("sandbox launcher " + ("did not answer in time" if not ready else
                                                     f"died (exit {self.proc.poll()})"))
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


@functools.cache
def namespaces_available() -> str | None:
    """None when commands can run in the sandbox's namespaces here, else why not (probed once)."""
    if os.geteuid() != 0:
        return "not running as root"
    status_r, status_w = os.pipe()
    job = {"command": "true", "workspace": "/", "timeout": 10.0, "sandbox": True, "memory_bytes": 1 << 30,
           "tmpfs_bytes": 1 << 20, "file_bytes": 1 << 20, "status_fd": status_w}
    try:
        proc = subprocess.run([sys.executable, "-I", str(LAUNCHER), "--command", json.dumps(job)], cwd="/",
                              stdin=subprocess.DEVNULL, capture_output=True, pass_fds=(status_w,), timeout=30,
                              check=False)
    except subprocess.TimeoutExpired:
        return "the namespace probe did not finish"
    finally:
        os.close(status_w)
    with os.fdopen(status_r, "rb") as f:
        report = f.read()
    try:
        status = json.loads(report)
    except ValueError:
        return f"the namespace probe failed (exit {proc.returncode})"
    return None if status.get("exit_code") == 0 else f"namespaces unavailable: {status.get('error', status)}"
