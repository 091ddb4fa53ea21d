"""kill -9 of `data prepare`: its workers die with it, and the rerun redoes only unfinished tasks
(issue 18 item 13, issue 17 "resume at scale")."""

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from codefoundry.data.prepare import prepare
from tests.conftest import TINY_SOURCES

TASKS = 2
STAGE_TASKS = {"filter": TASKS, "exact_dedup": 1, "minhash_signatures": TASKS, "minhash_buckets": TASKS,
               "minhash_clusters": 1, "tokenize": TASKS, "copy_tokens": TASKS, "merge": 1}


def marked_processes(marker: bytes) -> list[int]:
    """Processes whose environment carries ``marker``: the command and every process it started."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if marker in f.read():
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


def completions(work: Path) -> dict[str, set[str]]:
    logs = work / "logs"
    return {stage: {p.name for p in (logs / stage / "completions").glob("*")} for stage in STAGE_TASKS}


def run_cli(args: list[str], marker: str) -> subprocess.Popen:
    env = {**os.environ, "CF_TEST_MARKER": marker, "OMP_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", "from codefoundry.cli import main; raise SystemExit(main())", *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; PR_SET_PDEATHSIG is Linux's")
def test_kill_9_leaves_no_worker_and_resume_redoes_only_unfinished_tasks(tiny_tokenizer, tmp_path):
    tok, tok_path = tiny_tokenizer
    opts = {"fim_rate": 0.5, "tasks": TASKS, "decontaminate": False, "show_progress": False}
    sources = TINY_SOURCES[:3]
    prepare(sources, tok, tmp_path / "straight", 0.1, workers=1, **opts)

    out = tmp_path / "killed"
    args = ["data", "prepare", f"--tokenizer={tok_path}", f"--out={out}", "--val-fraction=0.1", "--fim-rate=0.5",
            f"--tasks={TASKS}", "--workers=2", "--no-decontaminate", *[f"--source={s}" for s in sources]]
    marker = f"cf-kill-{uuid.uuid4().hex}"
    proc = run_cli(args, marker)
    try:
        started = out / ".work" / "logs" / "minhash_signatures" / "logs"
        deadline = time.time() + 120
        while not (started.is_dir() and any(started.iterdir())) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before the kill: " + proc.stdout.read().decode()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)  # mid-stage: workers are busy on MinHash tasks
        proc.wait()
        deadline = time.time() + 10
        while marked_processes(marker.encode()) and time.time() < deadline:
            time.sleep(0.1)
        survivors = marked_processes(marker.encode())
        assert not survivors, f"processes outlived the killed command: {survivors}"
    finally:
        for pid in marked_processes(marker.encode()):  # only processes this test started
            os.kill(pid, signal.SIGKILL)
    done = completions(out / ".work")
    time.sleep(1)
    assert completions(out / ".work") == done  # nothing finished a task after the kill
    assert len(done["filter"]) == TASKS and len(done["tokenize"]) == 0

    rerun = run_cli(args, f"cf-rerun-{uuid.uuid4().hex}")
    output = rerun.communicate(timeout=240)[0].decode()
    assert rerun.returncode == 0, output[-3000:]
    timings = json.loads((out / "prepare.json").read_text())["result"]["timings"]
    for stage, tasks in STAGE_TASKS.items():
        assert timings[stage.replace("_", " ")]["tasks_run"] == tasks - len(done[stage]), stage
    for split in ("train", "val"):
        for name in ("tokens.bin", "index.npy"):
            assert (tmp_path / "straight" / split / name).read_bytes() == (out / split / name).read_bytes()
    for split in ("train", "val"):
        straight = json.loads((tmp_path / "straight" / split / "metadata.json").read_text())
        resumed = json.loads((out / split / "metadata.json").read_text())
        assert resumed["removed"] == straight["removed"] and resumed["skipped"] == straight["skipped"]
