"""The agent's tools, confined to one workspace directory.

``read_file``, ``write_file`` and ``edit_file`` resolve every path (``..`` and symlinks
included) and refuse anything that lands outside the workspace. ``bash`` runs a command
in the workspace with a timeout (the whole process group is killed) and an output cap,
and only after the ``confirm`` callback agrees. Note that ``bash`` itself is not a
sandbox: a confirmed command runs with the user's rights, which is why it needs consent.

Tool failures come back as ``error: ...`` text, because the model must see them to recover.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

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


class ToolError(Exception):
    """A tool call that cannot be carried out; its message goes back to the model."""


@dataclass(frozen=True)
class ToolLimits:
    timeout_s: float = 30.0  # wall clock per command
    max_output_bytes: int = 16_000  # command output and file reads shown to the model
    max_file_bytes: int = 1_000_000  # largest file write_file / edit_file will produce


class Workspace:
    """Runs tool calls inside ``root``. ``confirm(command) -> bool`` gates every command."""

    def __init__(self, root: str | Path, limits: ToolLimits | None = None,
                 confirm: Callable[[str], bool] | None = None) -> None:
        self.root = Path(os.path.realpath(root))
        if not self.root.is_dir():
            raise ToolError(f"workspace {root} is not a directory")
        self.limits = limits or ToolLimits()
        self.confirm = confirm or (lambda command: False)

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

    def resolve(self, path: str) -> Path:
        """The real path of ``path`` inside the workspace; ToolError if it escapes (via .., absolute
        paths or symlinks)."""
        if not path or "\0" in path:
            raise ToolError("empty or invalid path")
        real = Path(os.path.realpath(self.root / path))
        if real != self.root and self.root not in real.parents:
            raise ToolError(f"path {path!r} is outside the workspace")
        return real

    def read_file(self, path: str) -> str:
        target = self.resolve(path)
        if not target.is_file():
            raise ToolError(f"{path} is not a file")
        cap = self.limits.max_output_bytes
        with open(target, "rb") as f:
            data = f.read(cap + 1)
        text = data[:cap].decode("utf-8", errors="replace")
        return text + (f"\n[truncated at {cap} bytes]" if len(data) > cap else "")

    def write_file(self, path: str, content: str) -> str:
        target = self.resolve(path)
        data = content.encode()
        if len(data) > self.limits.max_file_bytes:
            raise ToolError(f"content is {len(data)} bytes; the limit is {self.limits.max_file_bytes}")
        if target.is_dir():
            raise ToolError(f"{path} is a directory")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        return f"wrote {len(data)} bytes to {path}"

    def edit_file(self, path: str, old: str, new: str) -> str:
        target = self.resolve(path)
        if not target.is_file():
            raise ToolError(f"{path} is not a file")
        text = target.read_text(errors="replace")
        count = text.count(old) if old else 0
        if count != 1:
            raise ToolError(f"the text to replace occurs {count} times in {path}; give text that occurs exactly once")
        return self.write_file(path, text.replace(old, new, 1)).replace("wrote", "edited; wrote", 1)

    def bash(self, command: str) -> str:
        if not command.strip():
            raise ToolError("empty command")
        if not self.confirm(command):
            raise ToolError("the user declined to run this command")
        proc = subprocess.Popen(["bash", "-c", command], cwd=self.root, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        reader = _Reader(proc.stdout, self.limits.max_output_bytes)
        reader.start()
        try:
            code = proc.wait(timeout=self.limits.timeout_s)
            status = f"exit code {code}"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the command and everything it started
            proc.wait()
            status = f"killed after the {self.limits.timeout_s:g} s timeout"
        reader.join(timeout=1.0)  # a daemon that escaped the process group may hold the pipe open
        out = bytes(reader.data).decode("utf-8", errors="replace")
        if reader.dropped:
            out += f"\n[output truncated: {reader.dropped} more bytes]"
        return f"{out.rstrip()}\n[{status}]".lstrip()


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

