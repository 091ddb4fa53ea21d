"""Which datatrove executor runs the pipeline's stages: local processes, a Ray cluster, or Slurm.

The stages are the same datatrove pipelines whichever engine runs them, so the output is too
(tested: byte-identical shards and identical filter counts, local against a real Ray cluster).
Options follow each engine's conventions: ``--ray-address`` is what ``ray.init`` takes;
the Slurm options are sbatch's ``--partition``, ``--time``, ``--cpus-per-task`` and
``--job-name`` (a prefix: each stage is its own job array, ``PREFIX-STAGE``, chained with
``--dependency=afterok``). Every stage marks its finished tasks in its logging folder
(datatrove's ``completions/``), so whichever engine ran a killed run, running it again redoes
only the unfinished tasks.

Local stages share one :class:`StagePool`: worker processes forked from the command once, with
every module the tasks need already imported, instead of datatrove's per-stage pool, forkserver
and manager (whose start-up was most of what a second worker lost). The workers die with the
command: each asks the kernel for SIGKILL when its parent exits (``PR_SET_PDEATHSIG``), so
``kill -9`` of ``data prepare`` leaves no worker finishing its task behind the user's back.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from copy import deepcopy
from dataclasses import dataclass
from functools import partial
from typing import Any

import multiprocess
from datatrove.executor import LocalPipelineExecutor, SlurmPipelineExecutor
from datatrove.executor.base import PipelineExecutor
from datatrove.executor.ray import RayPipelineExecutor
from datatrove.pipeline.base import PipelineStep
from datatrove.utils.stats import PipelineStats
from loguru import logger

from codefoundry.errors import UserError

EXECUTORS = ("local", "ray", "slurm")
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_die_with_parent = False  # read by the fork hook: only forks made while the stages run are tied to us


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when the thread that forked it exits (Linux only)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _after_fork_in_child() -> None:
    if _die_with_parent:
        die_with_parent()


if hasattr(os, "register_at_fork"):
    # Forks of this process while stages run (the stage pool's workers) die with it.
    os.register_at_fork(after_in_child=_after_fork_in_child)


@dataclass
class ExecutorOptions:
    """How to run the stages; none of this changes the output, so none of it is fingerprinted."""

    kind: str = "local"
    ray_address: str | None = None  # None: a Ray instance started for this run
    slurm_partition: str | None = None
    slurm_time: str = "24:00:00"
    slurm_cpus_per_task: int = 1
    slurm_mem_per_cpu_gb: int = 2
    slurm_job_name: str = "codefoundry-data"  # prefix; each stage's job is PREFIX-STAGE
    slurm_env_command: str | None = None  # shell line that activates the environment; default: this venv

    def __post_init__(self) -> None:
        if self.kind not in EXECUTORS:
            raise UserError(f"--executor must be one of {', '.join(EXECUTORS)}, got {self.kind!r}")
        if self.kind == "slurm" and not self.slurm_partition:
            raise UserError("--executor slurm needs --slurm-partition (the partition to submit to)")


class QuietLocalExecutor(LocalPipelineExecutor):
    """datatrove's local executor with datatrove's own logging off in every task, in this process
    or a worker (its per-task banners drowned the one line per stage). Run it with
    :meth:`StagePool.run`; datatrove's own ``run`` would start a pool of its own."""

    def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1) -> Any:
        logger.disable("datatrove")
        return super()._run_for_rank(rank, local_rank, node_rank)


def _timed_task(executor: QuietLocalExecutor, rank: int) -> tuple[PipelineStats, int, float]:
    """One task, the worker that ran it and the CPU seconds it took there."""
    cpu = time.process_time()
    return executor._run_for_rank(rank), os.getpid(), time.process_time() - cpu


class StagePool:
    """Worker processes forked once from this process for every local stage of a run.

    A stage's unfinished tasks go to the workers in rank order, one at a time, so a worker that
    finishes early takes the next one. A stage with one task to run, or a pool of one worker, runs
    its tasks here in turn, as datatrove's executor does. Workers are forked while
    ``tied_to_this_process`` holds, so they die with this process.
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool: Any = None
        self._tied = tied_to_this_process()

    def __enter__(self) -> StagePool:
        self._tied.__enter__()
        if self.workers > 1:
            self._pool = multiprocess.get_context("fork").Pool(self.workers)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        try:
            if self._pool is not None:
                if exc_type is None:
                    self._pool.close()
                else:
                    self._pool.terminate()
                self._pool.join()
        finally:
            self._tied.__exit__(exc_type, *exc)

    def run(self, executor: QuietLocalExecutor) -> dict[int, float]:
        """Run the stage's unfinished tasks and save datatrove's stats; returns the CPU seconds its
        tasks took in each worker, by process id (none when they ran here)."""
        ranks = executor.get_incomplete_ranks()
        if not ranks:
            return {}
        executor.save_executor_as_json()
        busy: dict[int, float] = {}
        if self._pool is None or len(ranks) == 1:
            pipeline, results = executor.pipeline, []
            for rank in ranks:  # steps keep per-task state: each task gets a fresh copy, as datatrove does
                executor.pipeline = deepcopy(pipeline)
                results.append(executor._run_for_rank(rank))
            executor.pipeline = pipeline
        else:
            results = []
            for stats, pid, cpu in self._pool.imap_unordered(partial(_timed_task, executor), ranks):
                results.append(stats)
                busy[pid] = busy.get(pid, 0.0) + cpu
        with executor.logging_dir.open("stats.json", "wt") as f:
            sum(results, start=PipelineStats()).save_to_disk(f)
        return busy


class QuietRayExecutor(RayPipelineExecutor):
    """datatrove's Ray executor with datatrove's per-task logging off in the Ray workers."""

    def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1) -> Any:
        logger.disable("datatrove")
        return super()._run_for_rank(rank, local_rank, node_rank)


def start_ray(address: str | None) -> None:
    """Connect to a Ray cluster (``ray.init``), once per process."""
    try:
        import ray
    except ImportError:
        raise UserError("--executor ray needs Ray: pip install 'codefoundry[cluster]'") from None
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False, include_dashboard=False, logging_level="ERROR")


def make_executor(pipeline: list[PipelineStep], tasks: int, workers: int, logging_dir: str, job: str,
                  opts: ExecutorOptions, depends: PipelineExecutor | None = None) -> PipelineExecutor:
    """One stage's executor. ``depends`` chains Slurm jobs; local and Ray stages run in order anyway."""
    if opts.kind == "local":  # run by a StagePool
        return QuietLocalExecutor(pipeline, tasks=tasks, workers=min(workers, tasks), logging_dir=logging_dir)
    if opts.kind == "ray":
        return QuietRayExecutor(pipeline, tasks=tasks, workers=min(workers, tasks), logging_dir=logging_dir)
    env = opts.slurm_env_command or (f"source {sys.prefix}/bin/activate" if sys.prefix != sys.base_prefix else None)
    return SlurmPipelineExecutor(pipeline, tasks=tasks, time=opts.slurm_time, partition=opts.slurm_partition,
                                 cpus_per_task=opts.slurm_cpus_per_task, mem_per_cpu_gb=opts.slurm_mem_per_cpu_gb,
                                 job_name=f"{opts.slurm_job_name}-{job}", env_command=env, logging_dir=logging_dir,
                                 depends=depends)  # no cap on running array tasks: the cluster schedules


class tied_to_this_process:
    """While active, processes forked from this one die with it (see ``die_with_parent``)."""

    def __enter__(self) -> None:
        global _die_with_parent
        _die_with_parent = True

    def __exit__(self, *exc: object) -> None:
        global _die_with_parent
        _die_with_parent = False
