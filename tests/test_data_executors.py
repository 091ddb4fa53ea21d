"""The same stages under every executor, with fsspec folders: identical shards and filter counts
(issue 17). Ray runs on a real local cluster; Slurm's generated sbatch scripts are checked and
run by bash with stand-ins for sbatch/srun/scontrol, and where Debian's Slurm packages are
installed a real one-node cluster (munged, slurmctld, slurmd) runs the jobs."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from codefoundry.data.executors import ExecutorOptions
from codefoundry.data.prepare import prepare
from codefoundry.errors import UserError
from tests.conftest import TINY_SOURCES

SOURCES = TINY_SOURCES[:2]
OPTS = {"fim_rate": 0.5, "tasks": 2, "decontaminate": False, "show_progress": False}
CLI = [sys.executable, "-c", "from codefoundry.cli import main; raise SystemExit(main())"]


def same_output(a: Path, b: Path) -> None:
    """Byte-identical tokens and index, and identical per-filter counts, in every split."""
    for split in ("train", "val"):
        for name in ("tokens.bin", "index.npy"):
            assert (a / split / name).read_bytes() == (b / split / name).read_bytes(), f"{split}/{name}"
        ma, mb = (json.loads((d / split / "metadata.json").read_text()) for d in (a, b))
        assert ma["removed"] == mb["removed"] and ma["skipped"] == mb["skipped"]
        assert ma["documents"] == mb["documents"] > 0


@pytest.fixture(scope="module")
def local_run(tiny_tokenizer, tmp_path_factory) -> Path:
    tok, _ = tiny_tokenizer
    out = tmp_path_factory.mktemp("local")
    prepare(SOURCES, tok, out, 0.2, workers=1, **OPTS)
    return out


def test_fsspec_file_and_memory_urls_give_the_same_shards(tiny_tokenizer, local_run, tmp_path):
    import fsspec

    tok, _ = tiny_tokenizer
    memory = fsspec.filesystem("memory")
    for src in SOURCES:  # a source that lives in memory:// too
        for path in Path(src).rglob("*.py"):
            memory.pipe(f"/corpus/{src.name}/{path.relative_to(src)}", path.read_bytes())
    prepare([f"memory://corpus/{s.name}" for s in SOURCES], tok, "memory://out", 0.2, workers=1, **OPTS)
    got = tmp_path / "from_memory"
    memory.get("/out", str(got), recursive=True)
    assert not memory.exists("/out/.work")
    same_output(local_run, got)
    prepare([f"file://{s}" for s in SOURCES], tok, f"file://{tmp_path / 'from_file'}", 0.2, workers=1, **OPTS)
    same_output(local_run, tmp_path / "from_file")
    memory.rm("/corpus", recursive=True)
    memory.rm("/out", recursive=True)


def test_a_pool_of_workers_writes_what_one_process_writes_and_times_its_tasks(tiny_tokenizer, local_run, tmp_path):
    """More tasks than workers: each worker takes the next task when it is free. Same shards as one
    process running every task in turn, and each stage's CPU time counts the workers' tasks."""
    tok, _ = tiny_tokenizer
    opts = {**OPTS, "tasks": 3}
    one = prepare(SOURCES, tok, tmp_path / "one", 0.2, workers=1, **opts)
    two = prepare(SOURCES, tok, tmp_path / "two", 0.2, workers=2, **opts)
    same_output(tmp_path / "one", tmp_path / "two")
    for stage in ("filter", "minhash signatures", "tokenize"):
        assert one["timings"][stage]["tasks_run"] == two["timings"][stage]["tasks_run"] == 3
        # the command itself only hands tasks out: without its workers' time this was ~0.02 s of ~1 s
        assert two["timings"][stage]["cpu_s"] > 0.5 * one["timings"][stage]["cpu_s"], stage
        # the critical path counts this process and only the busiest worker
        assert 0 < two["timings"][stage]["critical_cpu_s"] <= two["timings"][stage]["cpu_s"], stage
        assert one["timings"][stage]["critical_cpu_s"] == one["timings"][stage]["cpu_s"], stage
    assert two["timings"]["total"]["cpu_s"] > 0.5 * one["timings"]["total"]["cpu_s"]


def fail_on_rank_1(data, rank: int, world_size: int, pids: Path = Path()):
    """A pipeline step (datatrove takes callables) that records its process and breaks in task 1."""
    (pids / f"{rank}.pid").write_text(str(os.getpid()))
    if rank == 1:
        raise RuntimeError("task 1 broke")
    return data


def test_a_failing_task_stops_the_stage_and_its_workers(tmp_path):
    from functools import partial

    from codefoundry.data.executors import QuietLocalExecutor, StagePool

    executor = QuietLocalExecutor([partial(fail_on_rank_1, pids=tmp_path)], tasks=3, workers=2,
                                  logging_dir=str(tmp_path / "logs"))
    with pytest.raises(RuntimeError, match="task 1 broke"), StagePool(2) as pool:
        pool.run(executor)
    assert 1 in executor.get_incomplete_ranks()  # a rerun redoes it
    workers = {int(p.read_text()) for p in tmp_path.glob("*.pid")}
    assert os.getpid() not in workers  # the tasks ran in the pool's processes...
    for pid in workers:  # ...which are gone
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ray_cluster_writes_the_same_shards_as_local(tiny_tokenizer, local_run, tmp_path):
    pytest.importorskip("ray", reason="needs the cluster extra: pip install 'codefoundry[cluster]'")
    _, tok_path = tiny_tokenizer
    ray_bin = Path(sys.executable).parent / "ray"
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="cfray", dir="/tmp")  # Ray's socket paths must stay short
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    head = subprocess.Popen([str(ray_bin), "start", "--head", "--block", "--num-cpus=2", "--node-ip-address=127.0.0.1",
                             f"--port={port}", "--include-dashboard=false", "--object-store-memory=100000000",
                             f"--temp-dir={temp}"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, text=True)
    try:
        for line in head.stdout:  # up once it says so (or fails and ends its output)
            if "Ray runtime started" in line:
                break
        assert head.poll() is None, "ray start --head failed"
        out = tmp_path / "ray"
        run = subprocess.run([*CLI, "data", "prepare", f"--tokenizer={tok_path}", f"--out={out}", "--val-fraction=0.2",
                              "--fim-rate=0.5", "--tasks=2", "--workers=2", "--no-decontaminate", "--executor=ray",
                              f"--ray-address=127.0.0.1:{port}", *[f"--source={s}" for s in SOURCES]],
                             env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        same_output(local_run, out)
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` stops the processes it started
        head.wait(timeout=60)
        shutil.rmtree(temp, ignore_errors=True)


FAKE_SBATCH = """#!/bin/bash
# Records each submission (arguments, then the script) and answers as sbatch does.
n=$(ls "$SBATCH_LOG" | wc -l)
{ printf '%s\\n' "$@"; echo "---"; cat "${@: -1}"; } > "$SBATCH_LOG/$n"
echo "Submitted batch job $((1000 + n))"
"""
FAKE_SRUN = """#!/bin/bash
while [[ $1 == -* ]]; do [[ $1 == -n ]] && shift; shift; done
exec "$@"
"""
FAKE_SCONTROL = """#!/bin/bash
echo localhost
"""


@pytest.mark.slow
def test_slurm_sbatch_scripts_and_dependencies_then_the_jobs_run(tiny_tokenizer, local_run, tmp_path, monkeypatch):
    tok, _ = tiny_tokenizer
    bin_dir, log = tmp_path / "bin", tmp_path / "sbatch_log"
    bin_dir.mkdir()
    log.mkdir()
    for name, body in (("sbatch", FAKE_SBATCH), ("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}")
    monkeypatch.setenv("SBATCH_LOG", str(log))
    out = tmp_path / "slurm"
    execution = ExecutorOptions("slurm", slurm_partition="cpu", slurm_time="01:30:00", slurm_cpus_per_task=3,
                                slurm_job_name="cfdata")
    submitted = prepare(SOURCES, tok, out, 0.2, workers=1, execution=execution, **OPTS)["slurm_jobs"]
    stages = ["filter", "exact dedup", "minhash signatures", "minhash buckets", "minhash clusters", "tokenize",
              "copy tokens", "merge"]
    assert list(submitted) == stages

    jobs = [(f.read_text().split("---\n", 1)) for f in sorted(log.iterdir(), key=lambda p: int(p.name))]
    arrays = [(args.split("\n"), script) for args, script in jobs if "launch_pickled_pipeline" in script]
    assert len(arrays) == len(stages)  # (the others are datatrove's stats-merging jobs)
    previous = None
    for stage, (args, script) in zip(stages, arrays):
        job_id = 1000 + next(i for i, (_, s) in enumerate(jobs) if s == script)
        assert submitted[stage] == str(job_id)
        assert f"#SBATCH --job-name=cfdata-{stage.replace(' ', '_')}\n" in script
        for directive in ("--partition=cpu", "--time=01:30:00", "--cpus-per-task=3", "--mem-per-cpu=2G"):
            assert f"#SBATCH {directive}\n" in script
        tasks = 1 if stage in ("exact dedup", "minhash clusters", "merge") else 2
        assert f"#SBATCH --array=0-{tasks - 1}\n" in script
        assert f"source {sys.prefix}/bin/activate" in script
        depends = [a for a in args if a.startswith("--dependency=")]
        assert depends == ([f"--dependency=afterok:{previous}"] if previous else [])
        previous = job_id

    # Slurm would now run each array task in dependency order: run the scripts the same way.
    for stage, (_, script) in zip(stages, arrays):
        path = tmp_path / "job.sh"
        path.write_text(script)
        tasks = int(re.search(r"--array=0-(\d+)", script).group(1)) + 1
        for task in range(tasks):
            env = {**os.environ, "SLURM_ARRAY_TASK_ID": str(task), "RUN_OFFSET": "0", "SLURM_NODELIST": "localhost",
                   "SLURM_JOB_ID": "1"}
            run = subprocess.run(["bash", str(path)], env=env, capture_output=True, text=True, timeout=120)
            assert run.returncode == 0, f"{stage}[{task}]: {run.stderr[-2000:]}"
    result = prepare(SOURCES, tok, out, 0.2, workers=1, execution=execution, **OPTS)  # the same command, again
    assert "train" in result and not (out / ".work").exists()
    same_output(local_run, out)


def test_slurm_needs_a_partition_and_ray_names_its_extra(monkeypatch):
    from codefoundry.data.executors import start_ray

    with pytest.raises(UserError, match="--slurm-partition"):
        ExecutorOptions("slurm")
    with pytest.raises(UserError, match="--executor must be one of"):
        ExecutorOptions("dask")
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the cluster extra were not installed
    with pytest.raises(UserError, match=r"pip install 'codefoundry\[cluster\]'"):
        start_ray(None)


SLURM_CONF = """ClusterName=cftest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
AuthInfo=socket={dir}/munge.sock
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
MpiDefault=none
ReturnToService=2
NodeName={host} NodeAddr=127.0.0.1 CPUs=2 RealMemory=8000 State=UNKNOWN
PartitionName=cf Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""
SLURM_BINARIES = ("mungekey", "munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo")


@pytest.mark.slow
def test_real_one_node_slurm_cluster_writes_the_same_shards(tiny_tokenizer, local_run, tmp_path, monkeypatch):
    missing = [b for b in SLURM_BINARIES if shutil.which(b) is None and not Path(f"/usr/sbin/{b}").exists()]
    if missing:
        pytest.skip(f"no Slurm here ({', '.join(missing)} missing): apt-get install slurmctld slurmd slurm-client "
                    "munge to run a real one-node cluster; the sbatch scripts are still checked and run above")
    if os.geteuid() != 0:
        pytest.skip("a one-node Slurm cluster needs root (slurmd launches the jobs)")
    tok, _ = tiny_tokenizer
    d = Path(tempfile.mkdtemp(prefix="cfslurm", dir="/tmp"))
    for sub in ("state", "spool"):
        (d / sub).mkdir()
    d.chmod(0o700)  # munged refuses a key or socket in a folder others can write
    conf = d / "slurm.conf"
    conf.write_text(SLURM_CONF.format(host=socket.gethostname(), ctld_port=_free_port(), d_port=_free_port(), dir=d))
    sbin = lambda name: shutil.which(name) or f"/usr/sbin/{name}"  # noqa: E731
    subprocess.run([sbin("mungekey"), "-c", "-k", str(d / "munge.key")], check=True)
    daemons = [subprocess.Popen([sbin("munged"), "-F", "--force", f"--socket={d}/munge.sock", f"--key-file={d}/munge.key",
                                 f"--pid-file={d}/munged.pid", f"--log-file={d}/munged.log", f"--seed-file={d}/seed"],
                                start_new_session=True)]
    monkeypatch.setenv("SLURM_CONF", str(conf))
    try:
        time.sleep(0.5)
        daemons.append(subprocess.Popen([sbin("slurmctld"), "-D", "-f", str(conf)], start_new_session=True))
        time.sleep(1)
        daemons.append(subprocess.Popen([sbin("slurmd"), "-D", "-f", str(conf)], start_new_session=True))
        deadline = time.time() + 60
        while "idle" not in subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True).stdout:
            assert time.time() < deadline, "the one-node Slurm cluster did not come up: " + (d / "slurmctld.log").read_text()
            time.sleep(0.5)
        out = tmp_path / "slurm"
        execution = ExecutorOptions("slurm", slurm_partition="cf", slurm_time="00:10:00")
        jobs = prepare(SOURCES, tok, out, 0.2, workers=1, execution=execution, **OPTS)["slurm_jobs"]
        deadline = time.time() + 300
        while subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout.strip():
            assert time.time() < deadline, f"slurm jobs {jobs} still queued"
            time.sleep(1)
        result = prepare(SOURCES, tok, out, 0.2, workers=1, execution=execution, **OPTS)
        assert "train" in result, (d / "slurmctld.log").read_text()[-3000:]
        same_output(local_run, out)
    finally:
        for p in reversed(daemons):  # only the daemons this test started
            p.terminate()
            p.wait(timeout=30)
        shutil.rmtree(d, ignore_errors=True)
