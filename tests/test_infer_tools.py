"""Agent tools: workspace confinement, edits, command confirmation, timeouts and output caps,
and the attacks of issue 18 (items 9-11): symlink races, hard links, FIFOs, huge files,
daemons that outlive their command, and the command sandbox."""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from pathlib import Path

import pytest

from codefoundry.sandbox.runner import namespaces_available
from codefoundry.infer import tools
from codefoundry.infer.tools import ToolError, ToolLimits, Workspace

SANDBOX_MODES = [False, pytest.param(True, marks=pytest.mark.skipif(
    namespaces_available() is not None, reason="command sandbox needs root with namespaces"))]


@pytest.fixture
def ws(tmp_path):
    root = tmp_path / "work"
    root.mkdir()
    (tmp_path / "secret.txt").write_text("top secret")
    return Workspace(root, ToolLimits(timeout_s=1.0, max_output_bytes=200, max_file_bytes=1000),
                     confirm=lambda command: True, sandbox=False)


def run_bounded(ws: Workspace, name: str, arguments: dict, seconds: float = 3.0) -> str:
    """The tool's result, or a marker if it blocks (so a regression fails instead of hanging)."""
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("out", ws.run(name, arguments)), daemon=True)
    thread.start()
    thread.join(seconds)
    return box.get("out", f"BLOCKED for {seconds} s")


def test_file_tools_roundtrip(ws):
    assert ws.run("write_file", {"path": "pkg/m.py", "content": "x = 1\ny = 2\n"}).startswith("wrote")
    assert ws.run("read_file", {"path": "pkg/m.py"}) == "x = 1\ny = 2\n"
    assert ws.run("edit_file", {"path": "pkg/m.py", "old": "y = 2", "new": "y = 3"}).startswith("edited")
    assert (ws.root / "pkg/m.py").read_text() == "x = 1\ny = 3\n"
    ws.run("write_file", {"path": "dup.txt", "content": "a a"})
    assert "occurs 2 times" in ws.run("edit_file", {"path": "dup.txt", "old": "a", "new": "b"})
    assert "occurs 0 times" in ws.run("edit_file", {"path": "dup.txt", "old": "zzz", "new": "b"})
    assert ws.run("read_file", {"path": "missing.txt"}).startswith("error:")
    assert ws.run("write_file", {"path": str(ws.root / "abs.txt"), "content": "in"}).startswith("wrote")
    assert sorted(p.name for p in ws.root.iterdir()) == ["abs.txt", "dup.txt", "pkg"]  # no temp files left


def test_writes_replace_the_file_and_keep_its_mode(ws):
    (ws.root / "run.sh").write_text("old")
    (ws.root / "run.sh").chmod(0o751)
    assert ws.run("write_file", {"path": "run.sh", "content": "new"}).startswith("wrote")
    assert (ws.root / "run.sh").read_text() == "new"
    assert stat.S_IMODE((ws.root / "run.sh").stat().st_mode) == 0o751


def test_paths_cannot_escape(ws, tmp_path):
    os.symlink(tmp_path / "secret.txt", ws.root / "link.txt")
    os.symlink(tmp_path, ws.root / "up")
    for path in ["../secret.txt", str(tmp_path / "secret.txt"), "a/../../secret.txt"]:
        assert "outside the workspace" in ws.run("read_file", {"path": path}), path
        assert "outside the workspace" in ws.run("write_file", {"path": path, "content": "pwned"}), path
    for path in ["link.txt", "up/secret.txt", "up/new.txt"]:
        assert "symbolic link" in ws.run("read_file", {"path": path}), path
        assert "symbolic link" in ws.run("write_file", {"path": path, "content": "pwned"}), path
        assert "symbolic link" in ws.run("edit_file", {"path": path, "old": "top", "new": "pwned"}), path
    assert (tmp_path / "secret.txt").read_text() == "top secret" and not (tmp_path / "new.txt").exists()
    assert ws.run("read_file", {"path": "sub/../inside.txt"}) == "error: sub/../inside.txt is not a file"


def test_a_symlink_swapped_in_during_writes_is_never_followed(ws, tmp_path):
    """Issue 18 item 9: the old check-then-write lost this race within one write."""
    secret, target = tmp_path / "secret.txt", ws.root / "race.txt"
    stop = time.monotonic() + 1.0

    def swap() -> None:
        while time.monotonic() < stop:
            for make in (lambda: os.symlink(secret, target), lambda: target.write_text("x")):
                try:
                    target.unlink()
                except OSError:
                    pass
                try:
                    make()
                except OSError:
                    pass

    swapper = threading.Thread(target=swap)
    swapper.start()
    writes = 0
    while time.monotonic() < stop:
        ws.run("write_file", {"path": "race.txt", "content": "pwned"})
        writes += 1
    swapper.join()
    assert writes > 10 and secret.read_text() == "top secret"


def test_hard_links_are_refused(ws, tmp_path):
    os.link(tmp_path / "secret.txt", ws.root / "hard.txt")
    assert "2 hard links" in ws.run("write_file", {"path": "hard.txt", "content": "pwned"})
    assert "2 hard links" in ws.run("edit_file", {"path": "hard.txt", "old": "top", "new": "pwned"})
    assert (tmp_path / "secret.txt").read_text() == "top secret"


def test_fifos_and_file_components_give_errors_not_hangs(ws):
    """Issue 18 item 10: write_file on a FIFO blocked forever; a file used as a directory raised."""
    os.mkfifo(ws.root / "pipe")
    assert run_bounded(ws, "write_file", {"path": "pipe", "content": "x"}) == "error: pipe is not a regular file"
    assert run_bounded(ws, "read_file", {"path": "pipe"}) == "error: pipe is not a regular file"
    assert run_bounded(ws, "edit_file", {"path": "pipe", "old": "a", "new": "b"}).startswith("error: pipe is not")
    (ws.root / "nul.txt").write_text("")
    assert ws.run("write_file", {"path": "nul.txt/x", "content": "x"}) == "error: nul.txt is not a directory"
    assert ws.run("read_file", {"path": "nul.txt/x"}) == "error: nul.txt is not a directory"
    assert ws.run("write_file", {"path": ".", "content": "x"}) == "error: . is a directory"


def test_edit_file_refuses_files_over_the_cap(ws):
    with open(ws.root / "big.txt", "wb") as f:
        f.truncate(300 << 20)  # sparse: 300 MB that edit_file used to load whole
    out = ws.run("edit_file", {"path": "big.txt", "old": "a", "new": "b"})
    assert out == "error: big.txt is 314572800 bytes; edit_file handles files up to 1000 bytes"
    assert ws.run("read_file", {"path": "big.txt"}).endswith("[truncated at 200 bytes]")


def test_bad_calls(ws):
    assert "unknown tool" in ws.run("rm_rf", {})
    assert "takes string arguments" in ws.run("read_file", {"file": "x"})
    assert "takes string arguments" in ws.run("bash", {"command": 3})


def processes_with(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if marker.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except (OSError, ValueError):
            continue
    return found


@pytest.mark.parametrize("sandbox", SANDBOX_MODES)
def test_bash_runs_in_workspace_with_limits(tmp_path, sandbox):
    ws = Workspace(tmp_path, ToolLimits(timeout_s=1.0, max_output_bytes=200), lambda c: True, sandbox=sandbox)
    out = ws.run("bash", {"command": "pwd; echo oops >&2; exit 3"})
    assert out.splitlines()[0] == str(ws.root) and "oops" in out and out.endswith("[exit code 3]")
    big = ws.run("bash", {"command": "head -c 5000 /dev/zero | tr '\\0' q"})
    assert big.count("q") == 200 and "output truncated: 4800 more bytes" in big
    start = time.perf_counter()
    slow = ws.run("bash", {"command": "sleep 30 & sleep 30"})
    assert time.perf_counter() - start < 5 and "killed after the 1 s timeout" in slow


@pytest.mark.parametrize("sandbox", SANDBOX_MODES)
def test_no_process_outlives_its_command(tmp_path, sandbox):
    """Issue 18 item 11: a setsid daemon survived the timeout kill."""
    ws = Workspace(tmp_path, ToolLimits(timeout_s=1.0), lambda c: True, sandbox=sandbox)
    marker = f"daemon-{os.getpid()}-{int(sandbox)}"
    daemon = f"setsid bash -c 'sleep 100; : {marker}'"
    timed_out = ws.run("bash", {"command": f"{daemon} & ({daemon} &); sleep 30"})
    assert timed_out.endswith("[killed after the 1 s timeout]")
    finished = ws.run("bash", {"command": f"{daemon} & echo started"})
    assert finished == "started\n[exit code 0]"
    deadline = time.monotonic() + 2
    while processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_with(marker) == []


@pytest.mark.skipif(namespaces_available() is not None, reason="command sandbox needs root with namespaces")
def test_sandboxed_commands_write_only_the_workspace_and_have_no_network(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "outside.txt").write_text("keep")
    elsewhere = Path("/var/tmp") / f"codefoundry-sandbox-probe-{os.getpid()}"
    ws = Workspace(work, ToolLimits(timeout_s=10.0, max_output_bytes=4000, memory_mb=512), lambda c: True)
    assert ws.sandboxed
    out = ws.run("bash", {"command": (
        "echo made > made.txt && echo ws-ok; "
        f"echo x > {tmp_path}/outside.txt; "  # lands in the sandbox's private /tmp, not on the host
        f"echo x > {elsewhere} || echo outside-refused; "
        "echo x > /tmp/private.txt && echo tmp-ok; "
        "python3 -c \"import socket; socket.create_connection(('1.1.1.1', 53), timeout=2)\" 2>/dev/null "
        "|| echo net-refused; "
        "grep CapEff /proc/self/status; ulimit -d")})
    assert (work / "made.txt").read_text() == "made\n"
    assert "ws-ok" in out and "outside-refused" in out and "tmp-ok" in out and "net-refused" in out
    assert "CapEff:\t0000000000000000" in out and str(512 * 1024) in out
    assert (tmp_path / "outside.txt").read_text() == "keep"
    assert not Path("/tmp/private.txt").exists() and not elsewhere.exists()


def test_sandbox_default_degrades_with_one_notice(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(tools, "namespaces_available", lambda: "not running as root")
    with caplog.at_level(logging.WARNING):
        ws = Workspace(tmp_path, confirm=lambda c: True)
    assert not ws.sandboxed
    assert [r.getMessage() for r in caplog.records] == [
        "agent: commands run unsandboxed, with your rights (not running as root)"]
    with pytest.raises(ToolError, match="cannot sandbox commands here"):
        Workspace(tmp_path, sandbox=True)


def test_commands_need_confirmation(tmp_path):
    asked = []
    ws = Workspace(tmp_path, confirm=lambda command: asked.append(command) or False)
    assert ws.run("bash", {"command": "touch made"}) == "error: the user declined to run this command"
    assert asked == ["touch made"] and not (tmp_path / "made").exists()
