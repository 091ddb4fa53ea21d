"""The agent's tools, confined to one workspace directory.

The file tools never follow a symbolic link and never leave the workspace: a path is split
into names (``..`` may not climb above the workspace, absolute paths must lie inside it) and
each name is opened relative to the directory opened before it, starting from a handle on
the workspace taken once, with ``O_NOFOLLOW`` at every step. Nothing is resolved by path
string, so swapping a component for a symlink between a check and the write changes
nothing. ``write_file`` writes a temporary file in the target's directory and renames it
over the target, so it never writes into an existing file's inode: a hard link to a file
outside is refused (and would be left untouched anyway), and a FIFO or device is refused
without being opened. ``read_file`` and ``edit_file`` open without blocking and take
regular files only; ``edit_file`` refuses files larger than ``write_file`` may produce.

``bash`` runs a command in the workspace after the ``confirm`` callback agrees, with a
timeout and an output cap, through the sandbox's command runner
(:func:`codefoundry.sandbox.launcher.run_command`). Sandboxed (the default where the
host allows namespaces), it gets a read-only view of the system with only the workspace
and a private ``/tmp`` writable, no network, rlimits and no capabilities, in its own PID
namespace. Otherwise it runs with the user's rights, and the runner, a child subreaper,
kills every process the command started when it ends, daemons that called ``setsid``
included.

Tool failures come back as ``error: ...`` text, because the model must see them to recover.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import stat
import subprocess
import sys
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from codefoundry.sandbox.runner import LAUNCHER, namespaces_available

log = logging.getLogger(__name__)

TOOL_SPECS: dict[str, dict[str, str]] = {
    "bash": {"command": "shell command to run in the workspace"},
    "read_file": {"path": "file path relative to the workspace"},
    "write_file": {"path": "file path relative to the workspace", "content": "the full new file content"},
    "edit_file": {"path": "file path relative to the workspace", "old": "exact text to replace (must occur once)",
                  "new": "replacement text"},
}

AGENT_SYSTEM_PROMPT = (
    "You are a coding agent working in a project directory. To use a tool, emit one JSON object "
    'between the tool-call tokens: {"name": TOOL, "arguments": {...}}. Its result comes back between '
    "the tool-output tokens. Tools: "
    + "; ".join(f"{name}({', '.join(args)})" for name, args in TOOL_SPECS.items())
    + ". When the task is done, answer without a tool call."
)
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# Extra seconds the runner gets beyond the command's timeout before it is killed itself.
RUNNER_GRACE_S = 5.0


class ToolError(Exception):
    """A tool call that cannot be carried out; its message goes back to the model."""


@dataclass(frozen=True)
class ToolLimits:
    timeout_s: float = 30.0  # wall clock per command
    max_output_bytes: int = 16_000  # command output and file reads shown to the model
    max_file_bytes: int = 1_000_000  # largest file write_file / edit_file will produce or edit_file load
    memory_mb: int = 4096  # data (heap) per sandboxed process
    tmpfs_mb: int = 512  # the sandbox's private /tmp


class Workspace:
    """Runs tool calls inside ``root``. ``confirm(command) -> bool`` gates every command.

    ``sandbox``: True runs commands in the sandbox (an error where the host cannot), False
    runs them with the user's rights, None (the default) sandboxes where possible and logs
    one line where not.
    """

    def __init__(self, root: str | Path, limits: ToolLimits | None = None,
                 confirm: Callable[[str], bool] | None = None, sandbox: bool | None = None) -> None:
        self.root = Path(os.path.realpath(root))
        if not self.root.is_dir():
            raise ToolError(f"workspace {root} is not a directory")
        self.limits = limits or ToolLimits()
        self.confirm = confirm or (lambda command: False)
        self.sandboxed = self._choose_sandbox(sandbox)
        # A handle on the workspace taken now: renaming or replacing the directory later
        # cannot redirect the file tools.
        self._root_fd = os.open(self.root, DIR_FLAGS)
        self._finalizer = weakref.finalize(self, os.close, self._root_fd)

    @staticmethod
    def _choose_sandbox(wanted: bool | None) -> bool:
        if wanted is False:
            return False
        why_not = namespaces_available()
        if why_not is None:
            return True
        if wanted:
            raise ToolError(f"cannot sandbox commands here ({why_not}); run as root with namespaces, "
                            "or pass --no-sandbox")
        log.warning("agent: commands run unsandboxed, with your rights (%s)", why_not)
        return False

    def close(self) -> None:
        self._finalizer()

    def run(self, name: str, arguments: dict[str, Any]) -> str:
        """Result text of one tool call (``error: ...`` when it failed or was refused)."""
        handler = {"bash": self.bash, "read_file": self.read_file, "write_file": self.write_file,
                   "edit_file": self.edit_file}.get(name)
        if handler is None:
            return f"error: unknown tool {name!r}; tools are {', '.join(TOOL_SPECS)}"
        expected = set(TOOL_SPECS[name])
        if set(arguments) != expected or not all(isinstance(v, str) for v in arguments.values()):
            return f"error: {name} takes string arguments {sorted(expected)}, got {sorted(arguments)}"
        try:
            return handler(**arguments)
        except ToolError as exc:
            return f"error: {exc}"
        except OSError as exc:  # whatever the filesystem refuses that is not foreseen below
            return f"error: {arguments.get('path', name)}: {exc.strerror or exc}"

    def names(self, path: str) -> list[str]:
        """``path`` as names below the workspace; ToolError if it leaves it. Lexical only:
        nothing is looked up, and ``..`` cannot pass through a symlink since none is followed."""
        if not path or "\0" in path:
            raise ToolError("empty or invalid path")
        pure = PurePosixPath(path)
        if pure.is_absolute():
            try:
                pure = pure.relative_to(self.root)
            except ValueError:
                raise ToolError(f"path {path!r} is outside the workspace") from None
        names: list[str] = []
        for name in pure.parts:
            if name == "..":
                if not names:
                    raise ToolError(f"path {path!r} is outside the workspace")
                names.pop()
            elif name != ".":
                names.append(name)
        return names

    def _open_dir(self, path: str, names: list[str], create: bool) -> int:
        """A descriptor for the directory ``names`` (made if ``create``), walked one name at a time."""
        fd = os.dup(self._root_fd)
        try:
            for i, name in enumerate(names):
                if create:
                    try:
                        os.mkdir(name, dir_fd=fd)
                    except FileExistsError:
                        pass
                try:
                    child = os.open(name, DIR_FLAGS, dir_fd=fd)
                except OSError as exc:
                    if exc.errno == errno.ENOTDIR and _is_symlink(name, fd):  # O_DIRECTORY is checked first
                        exc = OSError(errno.ELOOP, os.strerror(errno.ELOOP))
                    raise _refusal(path, "/".join(names[:i + 1]), exc) from None
                os.close(fd)
                fd = child
            return fd
        except BaseException:
            os.close(fd)
            raise

    def _open_regular(self, path: str) -> tuple[int, os.stat_result]:
        """A read descriptor for the regular file at ``path``. O_NONBLOCK keeps a FIFO from
        blocking the open; anything but a regular file is closed again before any read."""
        names = self.names(path)
        if not names:
            raise ToolError(f"{path} is not a file")
        dir_fd = self._open_dir(path, names[:-1], create=False)
        try:
            fd = os.open(names[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
        except OSError as exc:
            raise _refusal(path, path, exc) from None
        finally:
            os.close(dir_fd)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise ToolError(f"{path} is not a regular file")
        return fd, st

    def read_file(self, path: str) -> str:
        fd, _ = self._open_regular(path)
        cap = self.limits.max_output_bytes
        with os.fdopen(fd, "rb") as f:
            data = f.read(cap + 1)
        text = data[:cap].decode("utf-8", errors="replace")
        return text + (f"\n[truncated at {cap} bytes]" if len(data) > cap else "")

    def write_file(self, path: str, content: str) -> str:
        data = content.encode("utf-8", errors="replace")  # a lone surrogate becomes "?"
        if len(data) > self.limits.max_file_bytes:
            raise ToolError(f"content is {len(data)} bytes; the limit is {self.limits.max_file_bytes}")
        names = self.names(path)
        if not names:
            raise ToolError(f"{path} is a directory")
        dir_fd = self._open_dir(path, names[:-1], create=True)
        try:
            mode = self._replaceable_mode(path, names[-1], dir_fd)
            tmp = f".{names[-1][:200]}.{secrets.token_hex(6)}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=dir_fd)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    os.fchmod(f.fileno(), mode)
                os.rename(tmp, names[-1], src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            except BaseException:
                os.unlink(tmp, dir_fd=dir_fd)
                raise
        finally:
            os.close(dir_fd)
        return f"wrote {len(data)} bytes to {path}"

    @staticmethod
    def _replaceable_mode(path: str, name: str, dir_fd: int) -> int:
        """The permission bits the new file gets (the old file's, else 0o666 less the umask);
        ToolError when what is there now must not be replaced."""
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            umask = os.umask(0o022)
            os.umask(umask)
            return 0o666 & ~umask
        if stat.S_ISDIR(st.st_mode):
            raise ToolError(f"{path} is a directory")
        if stat.S_ISLNK(st.st_mode):
            raise ToolError(f"{path} is a symbolic link; the file tools do not follow links")
        if not stat.S_ISREG(st.st_mode):
            raise ToolError(f"{path} is not a regular file")
        if st.st_nlink > 1:
            raise ToolError(f"{path} has {st.st_nlink} hard links (one may be outside the workspace); "
                            "refusing to replace it")
        return stat.S_IMODE(st.st_mode)

    def edit_file(self, path: str, old: str, new: str) -> str:
        fd, st = self._open_regular(path)
        cap = self.limits.max_file_bytes
        with os.fdopen(fd, "rb") as f:
            if st.st_size > cap:
                raise ToolError(f"{path} is {st.st_size} bytes; edit_file handles files up to {cap} bytes")
            data = f.read(cap + 1)
        if len(data) > cap:  # it grew since fstat
            raise ToolError(f"{path} is over {cap} bytes; edit_file handles files up to {cap} bytes")
        text = data.decode("utf-8", errors="replace")
        count = text.count(old) if old else 0
        if count != 1:
            raise ToolError(f"the text to replace occurs {count} times in {path}; give text that occurs exactly once")
        return self.write_file(path, text.replace(old, new, 1)).replace("wrote", "edited; wrote", 1)

    def bash(self, command: str) -> str:
        if not command.strip():
            raise ToolError("empty command")
        if not self.confirm(command):
            raise ToolError("the user declined to run this command")
        lim = self.limits
        status_r, status_w = os.pipe()
        job = {"command": command, "workspace": str(self.root), "timeout": lim.timeout_s,
               "sandbox": self.sandboxed, "memory_bytes": lim.memory_mb << 20, "tmpfs_bytes": lim.tmpfs_mb << 20,
               "file_bytes": max(lim.max_file_bytes, 1 << 30), "status_fd": status_w}
        try:
            proc = subprocess.Popen([sys.executable, "-I", str(LAUNCHER), "--command", json.dumps(job)],
                                    cwd=self.root, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, start_new_session=True, pass_fds=(status_w,))
        finally:
            os.close(status_w)
        reader = _Reader(proc.stdout, lim.max_output_bytes)
        reader.start()
        try:
            proc.wait(timeout=lim.timeout_s + RUNNER_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()  # the runner is stuck; in the sandbox its namespace dies with it
            proc.wait()
        with os.fdopen(status_r, "rb") as f:
            report = f.read()
        reader.join(timeout=1.0)
        out = bytes(reader.data).decode("utf-8", errors="replace")
        if reader.dropped:
            out += f"\n[output truncated: {reader.dropped} more bytes]"
        return f"{out.rstrip()}\n[{_status_line(report, lim.timeout_s, proc.returncode)}]".lstrip()


def _is_symlink(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _refusal(path: str, where: str, exc: OSError) -> ToolError:
    """The model-facing reason an open of ``where`` (part of ``path``) failed."""
    if exc.errno == errno.ELOOP:
        return ToolError(f"{where} is a symbolic link; the file tools do not follow links")
    if exc.errno == errno.ENOTDIR:
        return ToolError(f"{where} is not a directory")
    if exc.errno == errno.ENOENT:
        return ToolError(f"{path} is not a file")
    return ToolError(f"{where}: {exc.strerror}")


def _status_line(report: bytes, timeout: float, runner_code: int | None) -> str:
    """How the command ended, from the runner's status line."""
    try:
        status = json.loads(report)
    except ValueError:
        return f"the command runner failed (exit {runner_code})"
    if status.get("timed_out"):
        return f"killed after the {timeout:g} s timeout"
    if status.get("error"):
        return f"the command runner failed: {status['error']}"
    return f"exit code {status['exit_code']}"


class _Reader(threading.Thread):
    """Reads a pipe to EOF, keeping the first ``cap`` bytes and counting the rest."""

    def __init__(self, pipe, cap: int) -> None:
        super().__init__(daemon=True)
        self.pipe, self.cap = pipe, cap
        self.data = bytearray()
        self.dropped = 0

    def run(self) -> None:
        while chunk := self.pipe.read1(65536):
            room = self.cap - len(self.data)
            self.data += chunk[:max(room, 0)]
            self.dropped += max(0, len(chunk) - max(room, 0))
        self.pipe.close()
