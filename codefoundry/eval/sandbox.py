"""Execute untrusted generated programs, each isolated in its own processes, in parallel.

Programs go to ``sandbox_launcher.py`` servers (one ``python -I`` per worker, started
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
"""

from __future__ import annotations

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

LAUNCHER = Path(__file__).with_name("sandbox_launcher.py")
NOBODY = 65534
# Imports modules the launcher has not loaded (an extension module, a pure module, and a
# submodule of a loaded package): each needs the interpreter's library directories to be
# readable by the sandbox uid.
PROBE_PROGRAM = "import cmath, colorsys, json.tool\n"
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
class ExecResult:
    """Outcome of one program. ``error`` is None when it ran to the end without raising,
    else one of: syntax, assertion, exception, memory, timeout, exit (SystemExit or exited
    early), crash (killed by a signal), setup (the sandbox could not lock it down)."""

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

    def _launch(self, code: str, namespaces: bool) -> ExecResult:
        lim = self.limits
        job = {"code": code, "timeout": lim.timeout, "memory_bytes": lim.memory_mb * MB,
               "max_procs": lim.max_procs, "file_bytes": lim.file_mb * MB, "tmpfs_bytes": lim.tmpfs_mb * MB,
               "uid": NOBODY if self.root else None, "gid": NOBODY if self.root else None,
               "namespaces": namespaces}
        try:
            server = self._idle.get_nowait()
        except queue.Empty:
            server = _Server()
        try:
            report = server.request(job, lim.timeout + LAUNCHER_GRACE_S)
        except BaseException:
            server.close()
            raise
        self._idle.put(server)
        if report["error"] == "sandbox":
            raise SandboxError(f"sandbox set-up failed: {report['detail']}")
        return ExecResult(report["error"], report["detail"], report["duration"])

    def run(self, code: str) -> ExecResult:
        """Run one program and return how it ended."""
        return self._launch(code, self.namespaces)

    def run_many(self, programs: Iterable[str]) -> Iterator[tuple[int, ExecResult]]:
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
        return {"isolation": self.isolation, "workers": self.workers, **asdict(self.limits)}

    def close(self) -> None:
        """Stop the launcher servers (also done at garbage collection, and they exit by
        themselves when this process dies)."""
        self._finalizer()

    def __enter__(self) -> "Sandbox":
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
                                     stdout=subprocess.PIPE, text=True, cwd="/",
                                     env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})

    def request(self, job: dict, timeout: float) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(json.dumps(job) + "\n")
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
