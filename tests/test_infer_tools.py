"""Agent tools: workspace confinement, edits, command confirmation, timeouts and output caps."""

from __future__ import annotations

import os
import time

import pytest

from codefoundry.infer.tools import ToolLimits, Workspace


@pytest.fixture
def ws(tmp_path):
    root = tmp_path / "work"
    root.mkdir()
    (tmp_path / "secret.txt").write_text("top secret")
    return Workspace(root, ToolLimits(timeout_s=1.0, max_output_bytes=200), confirm=lambda command: True)


def test_file_tools_roundtrip(ws):
    assert ws.run("write_file", {"path": "pkg/m.py", "content": "x = 1\ny = 2\n"}).startswith("wrote")
    assert ws.run("read_file", {"path": "pkg/m.py"}) == "x = 1\ny = 2\n"
    assert ws.run("edit_file", {"path": "pkg/m.py", "old": "y = 2", "new": "y = 3"}).startswith("edited")
    assert (ws.root / "pkg/m.py").read_text() == "x = 1\ny = 3\n"
    ws.run("write_file", {"path": "dup.txt", "content": "a a"})
    assert "occurs 2 times" in ws.run("edit_file", {"path": "dup.txt", "old": "a", "new": "b"})
    assert "occurs 0 times" in ws.run("edit_file", {"path": "dup.txt", "old": "zzz", "new": "b"})
    assert ws.run("read_file", {"path": "missing.txt"}).startswith("error:")


def test_paths_cannot_escape(ws, tmp_path):
    os.symlink(tmp_path / "secret.txt", ws.root / "link.txt")
    os.symlink(tmp_path, ws.root / "up")
    for path in ["../secret.txt", str(tmp_path / "secret.txt"), "link.txt", "up/secret.txt", "a/../../secret.txt"]:
        assert "outside the workspace" in ws.run("read_file", {"path": path}), path
        assert "outside the workspace" in ws.run("write_file", {"path": path, "content": "pwned"}), path
    assert (tmp_path / "secret.txt").read_text() == "top secret"
    assert ws.run("read_file", {"path": "sub/../inside.txt"}).startswith("error: sub/../inside.txt is not a file")


def test_bad_calls(ws):
    assert "unknown tool" in ws.run("rm_rf", {})
    assert "takes string arguments" in ws.run("read_file", {"file": "x"})
    assert "takes string arguments" in ws.run("bash", {"command": 3})


def test_bash_runs_in_workspace_with_limits(ws):
    out = ws.run("bash", {"command": "pwd; echo oops >&2; exit 3"})
    assert out.splitlines()[0] == str(ws.root) and "oops" in out and out.endswith("[exit code 3]")
    big = ws.run("bash", {"command": "head -c 5000 /dev/zero | tr '\\0' q"})
    assert big.count("q") == 200 and "output truncated: 4800 more bytes" in big
    start = time.perf_counter()
    slow = ws.run("bash", {"command": "sleep 30 & sleep 30"})
    assert time.perf_counter() - start < 5 and "killed after the 1 s timeout" in slow


def test_commands_need_confirmation(tmp_path):
    asked = []
    ws = Workspace(tmp_path, confirm=lambda command: asked.append(command) or False)
    assert ws.run("bash", {"command": "touch made"}) == "error: the user declined to run this command"
    assert asked == ["touch made"] and not (tmp_path / "made").exists()
